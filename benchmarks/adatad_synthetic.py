"""Do AdaTAD adapters change what Progressive Block Drop can drop? Two teachers on synthetic video.

    python benchmarks/adatad_synthetic.py                      # render (or reuse), train, compress, report
    python benchmarks/adatad_synthetic.py --only adapted       # one variant (what the full run starts twice)
    python benchmarks/adatad_synthetic.py --report             # collect finished runs only

The shipped `synthetic_adatad` config (a 6-block ViT with an AdaTAD adapter at the end of every
block) and the same config without adapters (`backbone.adapter_blocks=null`) are each trained from
scratch on the synthetic-video render (`blockdrop data synthetic --out data/synthetic_small
--videos 160`, rendered here when missing) and compressed by `--blocks` blocks with the
`blockdrop compress` recipe (alignment: LoRA on attention, adapters trained in full when there are
any). The two variants run as two processes side by side, one thread each. Teachers, blocks and
alignment epochs are chosen on the validation split; the test split is scored once per reported
model. Writes benchmarks/results/adatad_synthetic.json and prints a table and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from blockdrop.compress.history import History
from blockdrop.core.config import load_config
from blockdrop.core.fileio import write_json
from blockdrop.core.measure import measure_latency
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.synthetic import render_synthetic
from blockdrop.data.synthetic_spec import SyntheticSpec
from blockdrop.recipes.build import example_window, load_detector, resolve_config_path
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.evaluate import evaluate_checkpoint
from blockdrop.recipes.runs import MODEL_FILE
from blockdrop.recipes.train import train_experiment

RESULTS = Path(__file__).parent / "results"
CONFIG = "synthetic_adatad"
VARIANTS = {"adapted": [], "plain": ["backbone.adapter_blocks=null"]}  # the same detector but the adapters


def variant_config(name: str, args) -> ExperimentConfig:
    overrides = [f"data.root={args.data}", f"data.cache_dir={args.data}/cache",
                 f"compress.stopping.max_blocks={args.blocks}", *args.set, *VARIANTS[name]]
    return load_config(ExperimentConfig, resolve_config_path(CONFIG), overrides)


def run_variant(name: str, args) -> None:
    """Train the teacher, then compress it (both resumable: a finished run is reused)."""
    cfg = variant_config(name, args)
    torch.set_num_threads(1)
    out = args.out / name
    start = time.perf_counter()
    if not (out / "teacher" / MODEL_FILE).exists() or not (out / "teacher" / "summary.json").exists():
        train_experiment(cfg, out=out / "teacher", resume=(out / "teacher").exists(), progress=False)
    trained = time.perf_counter()
    compress_experiment(cfg, teacher=out / "teacher" / MODEL_FILE, out=out / "pbd",
                        resume=(out / "pbd").exists(), progress=False)
    write_json(out / "wall_time.json", {"train_s": round(trained - start, 1),
                                        "compress_s": round(time.perf_counter() - trained, 1)})


def test_scores(cfg: ExperimentConfig, path: Path) -> dict:
    m = evaluate_checkpoint(cfg, path, subset="test")
    return {"average_mAP": m["average_mAP"], **{k: v for k, v in m.items() if k.startswith("mAP@")}}


def interleaved_latency(paths: list[Path], cfg: ExperimentConfig, rounds: int) -> list[dict]:
    """Median latency of one test window per model, in alternating rounds so drift hits all alike."""
    inputs, mask = example_window(cfg, 3)
    models = [load_detector(p)[0].eval() for p in paths]
    samples = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            samples[i].append(measure_latency(model, inputs, mask, threads=1, min_run_time=0.5)["median_ms"])
    return [{"latency_ms": float(torch.tensor(s).median()), "latency_rounds_ms": s} for s in samples]


def report(args) -> dict:
    rows, paths = {}, []
    for name in VARIANTS:
        cfg = variant_config(name, args)
        history = History.load(args.out / name / "pbd" / "history.json")
        teacher_path, student_path = args.out / name / "teacher" / MODEL_FILE, args.out / name / "pbd" / MODEL_FILE
        paths += [teacher_path, student_path]
        metric = cfg.eval.best_epoch_metric
        wall = args.out / name / "wall_time.json"
        rows[name] = {
            "adapter_blocks": cfg.backbone.adapter_blocks, "blocks": len(history.teacher.kept_blocks),
            "teacher": {"gmacs": history.teacher.cost.gmacs, "backbone_gmacs": history.teacher.cost.extra["backbone_gmacs"],
                        "params": history.teacher.cost.params, "val_" + metric: history.teacher.val[metric],
                        **test_scores(cfg, teacher_path)},
            "steps": [{"step": s.step, "dropped_original": s.dropped_original, "kept_blocks": s.kept_blocks,
                       "gmacs": s.cost.gmacs, "backbone_gmacs": s.cost.extra["backbone_gmacs"], "params": s.cost.params,
                       "val_before_" + metric: (s.align.val_before or {}).get(metric), "val_" + metric: s.val[metric],
                       "best_epoch": s.align.best_epoch,
                       "selection_scores": {str(k): v for k, v in s.selection.scores.items()}}
                      for s in history.steps],
            "compressed": test_scores(cfg, student_path),
            "stopped": history.stopped,
            "wall_time_s": json.loads(wall.read_text()) if wall.exists() else None,
        }
    latencies = interleaved_latency(paths, variant_config("adapted", args), args.rounds)
    for i, name in enumerate(VARIANTS):
        rows[name]["teacher"].update(latencies[2 * i])
        rows[name]["compressed"].update(latencies[2 * i + 1])
        last = rows[name]["steps"][-1]
        rows[name]["compressed"].update(gmacs=last["gmacs"], backbone_gmacs=last["backbone_gmacs"], params=last["params"],
                                        dropped_original=[o for s in rows[name]["steps"] for o in s["dropped_original"]])
    cfg = variant_config("adapted", args)
    return {"name": "adatad_synthetic", "config": CONFIG, "variants": rows, "blocks_dropped": args.blocks,
            "data": {"root": str(args.data), "videos": args.videos, "frame_size": cfg.data.frame_size,
                     "window_frames": cfg.data.window, "fps": cfg.data.rate},
            "teacher_epochs": cfg.train.epochs, "alignment_epochs_per_step": cfg.compress.alignment.train.epochs,
            "seed": cfg.train.seed,
            "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores shared with other jobs), 1 thread per run, "
                      f"latency with 1 thread, torch {torch.__version__}",
            "command": "python benchmarks/adatad_synthetic.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}


def format_report(record: dict) -> str:
    lines = ["| detector | model | blocks | dropped (original idx) | GMACs | backbone GMACs | latency ms | "
             "test avg mAP | test mAP@0.5 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in record["variants"].items():
        t, c = row["teacher"], row["compressed"]
        lines.append(f"| {name} | teacher | {row['blocks']} | - | {t['gmacs']:.3f} | {t['backbone_gmacs']:.3f} | "
                     f"{t['latency_ms']:.1f} | {t['average_mAP']:.2f} | {t['mAP@0.5']:.2f} |")
        lines.append(f"| {name} | compressed | {row['blocks'] - len(c['dropped_original'])} | {c['dropped_original']} | "
                     f"{c['gmacs']:.3f} | {c['backbone_gmacs']:.3f} | {c['latency_ms']:.1f} | {c['average_mAP']:.2f} | "
                     f"{c['mAP@0.5']:.2f} |")
    a, p = record["variants"]["adapted"], record["variants"]["plain"]
    same = sorted(a["compressed"]["dropped_original"]) == sorted(p["compressed"]["dropped_original"])
    loss = {k: v["teacher"]["average_mAP"] - v["compressed"]["average_mAP"] for k, v in record["variants"].items()}
    lines.append(f"\nadapters {'did not change' if same else 'changed'} the dropped blocks "
                 f"(adapted {sorted(a['compressed']['dropped_original'])}, plain "
                 f"{sorted(p['compressed']['dropped_original'])}); test avg mAP loss: adapted {loss['adapted']:.2f}, "
                 f"plain {loss['plain']:.2f} points (one seed)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synthetic_small"))
    parser.add_argument("--videos", type=int, default=160, help="videos to render when --data is missing")
    parser.add_argument("--out", type=Path, default=Path("runs/adatad_synthetic"))
    parser.add_argument("--blocks", type=int, default=2, help="blocks to drop from each teacher")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    parser.add_argument("--only", choices=list(VARIANTS), help="run one variant and stop (no report)")
    parser.add_argument("--report", action="store_true", help="only collect the finished runs and write the results")
    parser.add_argument("--set", action="append", default=[], help="config override for both variants")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.only:
        run_variant(args.only, args)
        return 0
    if not args.report:
        start = time.perf_counter()
        if not (args.data / "annotations.json").exists():
            print(render_synthetic(args.data, SyntheticSpec(seed=0, num_videos=args.videos)).describe())
        passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report"]
        jobs = [subprocess.Popen([sys.executable, __file__, *passed, "--only", name]) for name in VARIANTS]
        if any(job.wait() for job in jobs):
            print("a variant failed; see its output above", file=sys.stderr)
            return 1
        print(f"both variants finished in {time.perf_counter() - start:.0f} s")
    record = report(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "adatad_synthetic.json", record)
    print(format_report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
