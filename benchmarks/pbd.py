"""Progressive Block Drop on a trained teacher, with the paper's ablations.

    python benchmarks/pbd.py hapt --teacher runs/hapt_teacher/model.safetensors --name hapt_pbd
    python benchmarks/pbd.py synthetic --teacher runs/synthetic_teacher/model.safetensors \
        --name synthetic_pbd --only main

Every variant is one resumable `blockdrop compress` run in <out>/<variant>; run variants in
separate processes with --only and collect them with a final run (finished runs are reused).
Blocks, checkpoints and stopping are chosen on the validation split; the test split is scored
once per reported model here. Writes benchmarks/results/<name>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from blockdrop.recipes.build import resolve_config_path
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
from blockdrop.compress.history import History
from blockdrop.core.fileio import write_json
from blockdrop.core.measure import measure_latency
from blockdrop.recipes.build import load_detector
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.evaluate import evaluate_checkpoint
from blockdrop.recipes.runs import MODEL_FILE
from blockdrop.recipes.train import train_experiment

RESULTS = Path(__file__).parent / "results"
PAPER = [  # VideoMAE-S + ActionFormer, THUMOS14 (method.md, from a secondary summary of the paper)
    (0, 286.3, 104.9, 70.43), (1, 263.5, 98.4, 71.06), (2, 240.8, 89.8, 71.37), (3, 218.0, 81.2, 70.47),
    (4, 195.2, 73.6, 69.65)]
VARIANTS = {  # name -> config overrides (on top of compress.stopping.max_blocks)
    "main": [],
    "one_shot": ["compress.strategy=one_shot"],
    "gt_only": ["compress.alignment.weights={feature: 0, cls_kd: 0, reg_kd: 0, gt: 1}"],
    "feature_only": ["compress.alignment.weights={feature: 1, cls_kd: 0, reg_kd: 0, gt: 0}"],
    "select_loss": ["compress.selection.evaluator=loss"],
    "select_feature": ["compress.selection.evaluator=feature_mse"],
}


def test_scores(cfg, model_path: Path) -> dict:
    m = evaluate_checkpoint(cfg, model_path, subset="test")
    return {"average_mAP": m["average_mAP"], **{k: v for k, v in m.items() if k.startswith("mAP@")}}


def run_variant(cfg, name: str, teacher: Path, out: Path, blocks: int) -> dict:
    variant_cfg = load_config(ExperimentConfig, cfg["path"], cfg["overrides"] + VARIANTS[name]
                              + [f"compress.stopping.max_blocks={blocks}"])
    history = compress_experiment(variant_cfg, teacher=teacher, out=out / name, resume=True)
    return {"history": history, "cfg": variant_cfg}


def run_scratch(cfg, teacher_cfg: ExperimentConfig, out: Path, blocks: int, epochs_per_step: int) -> dict:
    """A model with (depth - blocks) blocks trained from scratch for the teacher's epochs plus the
    fine-tuning epochs the compression spent (the same total training budget)."""
    depth = teacher_cfg.backbone.depth - blocks
    epochs = teacher_cfg.train.epochs + blocks * epochs_per_step
    scratch_cfg = load_config(ExperimentConfig, cfg["path"], cfg["overrides"] + [
        f"backbone.depth={depth}", f"train.epochs={epochs}"])
    train_experiment(scratch_cfg, out=out / "scratch", resume=True)
    return {"cfg": scratch_cfg, "depth": depth, "epochs": epochs}


def interleaved_latency(paths: list[Path], cfg, channels: int, rounds: int, threads: int) -> list[dict]:
    """Median latency per model, measured in alternating rounds so drift hits all models alike."""
    from blockdrop.recipes.build import example_window

    inputs, mask = example_window(cfg, channels)
    models = [load_detector(p)[0].eval() for p in paths]
    samples = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            samples[i].append(measure_latency(model, inputs, mask, threads=threads, min_run_time=0.5)["median_ms"])
    return [{"latency_ms": float(torch.tensor(s).median()), "latency_rounds": s} for s in samples]


def selection_cost(cfg: ExperimentConfig, teacher: Path) -> dict:
    """The map evaluator at the first step, shared-prefix vs naive, on the same selection batches."""
    from blockdrop.compress.selection import select_block
    from blockdrop.recipes.compress import selection_setup

    model, _ = load_detector(teacher)
    target, loader = selection_setup(cfg, model)
    cached = select_block(model, target, loader, evaluator="map", metric=cfg.compress.selection.block_metric)
    naive = select_block(model, target, loader, evaluator="map", metric=cfg.compress.selection.block_metric, naive=True)
    return {"cached_block_forwards": cached.block_forwards, "naive_block_forwards": naive.block_forwards,
            "cached_wall_time_s": round(cached.wall_time_s, 2), "naive_wall_time_s": round(naive.wall_time_s, 2),
            "same_choice": cached.chosen_original == naive.chosen_original,
            "chosen_original": cached.chosen_original,
            "max_score_difference": max(abs(cached.scores[k] - naive.scores[k]) for k in cached.scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<name>")
    parser.add_argument("--blocks", type=int, default=3, help="blocks to drop")
    parser.add_argument("--only", default=None, help="comma-separated variants to run (and not report): "
                        + ",".join([*VARIANTS, "scratch", "selection_cost"]))
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    parser.add_argument("--report", action="store_true",
                        help="only collect the finished variant runs in --out (no training) and write the results")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)

    path = resolve_config_path(args.config)
    spec = {"path": path, "overrides": args.set}
    cfg = load_config(ExperimentConfig, path, args.set + [f"compress.stopping.max_blocks={args.blocks}"])
    out = args.out or Path("runs") / args.name
    if args.report:
        report(args, cfg, out, finished_runs(spec, out, args.blocks, cfg))
        return 0
    wanted = args.only.split(",") if args.only else [*VARIANTS, "scratch", "selection_cost"]
    done = {}
    for name in wanted:
        start = time.perf_counter()
        if name in VARIANTS:
            done[name] = run_variant(spec, name, args.teacher, out, args.blocks)
        elif name == "scratch":
            teacher_cfg = load_config(ExperimentConfig, path, args.set)
            done[name] = run_scratch(spec, teacher_cfg, out, args.blocks, cfg.compress.alignment.train.epochs)
        elif name == "selection_cost":
            done[name] = selection_cost(cfg, args.teacher)
            write_json(out / "selection_cost.json", done[name])
        else:
            parser.error(f"--only: unknown variant {name!r}")
        print(f"{name}: finished in {time.perf_counter() - start:.0f} s")
    if args.only:
        return 0
    report(args, cfg, out, done)
    return 0


def finished_runs(spec, out: Path, blocks: int, cfg: ExperimentConfig) -> dict:
    """The variants whose runs in ``out`` completed (a run still going or never started is left out)."""
    done = {}
    for name in VARIANTS:
        path = out / name / "history.json"
        if path.exists():
            history = History.load(path)
            if history.stopped and (out / name / MODEL_FILE).exists():
                overrides = spec["overrides"] + VARIANTS[name] + [f"compress.stopping.max_blocks={blocks}"]
                done[name] = {"history": history, "cfg": load_config(ExperimentConfig, spec["path"], overrides)}
    summary = out / "scratch" / "summary.json"
    if summary.exists():
        teacher_cfg = load_config(ExperimentConfig, spec["path"], spec["overrides"])
        depth = teacher_cfg.backbone.depth - blocks
        epochs = teacher_cfg.train.epochs + blocks * cfg.compress.alignment.train.epochs
        scratch_cfg = load_config(ExperimentConfig, spec["path"], spec["overrides"] + [
            f"backbone.depth={depth}", f"train.epochs={epochs}"])
        done["scratch"] = {"cfg": scratch_cfg, "depth": depth, "epochs": epochs}
    if (out / "selection_cost.json").exists():
        done["selection_cost"] = json.loads((out / "selection_cost.json").read_text())
    return done


def report(args, cfg: ExperimentConfig, out: Path, done: dict) -> None:
    main_history = done["main"]["history"]
    channels = load_detector(args.teacher)[1]["in_channels"]
    step_paths = [args.teacher] + [out / "main" / f"step_{s.step:02d}" / MODEL_FILE for s in main_history.steps]
    latencies = interleaved_latency(step_paths, cfg, channels, args.rounds, cfg.compress.latency_threads)
    teacher_cost = main_history.teacher.cost
    teacher = {"blocks": len(main_history.teacher.kept_blocks), "gmacs": teacher_cost.gmacs,
               "backbone_gmacs": teacher_cost.extra.get("backbone_gmacs"), **latencies[0],
               **test_scores(cfg, args.teacher)}
    steps = []
    metric = cfg.eval.best_epoch_metric
    for s, path, lat in zip(main_history.steps, step_paths[1:], latencies[1:]):
        steps.append({"blocks_dropped": s.blocks_dropped, "dropped_original": s.dropped_original,
                      "gmacs": s.cost.gmacs, "backbone_gmacs": s.cost.extra.get("backbone_gmacs"), **lat,
                      "val_" + metric: s.val[metric], "val_before_" + metric: (s.align.val_before or {}).get(metric),
                      "selection_scores": {str(k): v for k, v in s.selection.scores.items()},
                      "timings": s.timings, **test_scores(cfg, path)})
    ablations = {}
    for name in VARIANTS:
        if name != "main" and name in done:
            h = done[name]["history"]
            ablations[name] = {"blocks_dropped": h.blocks_dropped, "dropped_original": h.dropped_original,
                               **test_scores(cfg, out / name / MODEL_FILE)}
    if "scratch" in done:
        ablations["scratch"] = {"blocks": done["scratch"]["depth"], "epochs": done["scratch"]["epochs"],
                                **test_scores(done["scratch"]["cfg"], out / "scratch" / MODEL_FILE)}
    record = {"name": args.name, "teacher": teacher, "steps": steps, "ablations": ablations,
              "selection_cost": done.get("selection_cost"), "stopped": main_history.stopped,
              "not_run": [n for n in [*VARIANTS, "scratch", "selection_cost"] if n not in done],
              "device": f"CPU ({platform.machine()}), latency with {cfg.compress.latency_threads} threads",
              "command": "python benchmarks/pbd.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", record)
    print(format_report(record))


def format_report(record: dict) -> str:
    t = record["teacher"]
    lines = ["| blocks dropped | GMACs | latency ms | test avg mAP | test mAP@0.5 |", "|---|---|---|---|---|",
             f"| 0 | {t['gmacs']:.3f} | {t['latency_ms']:.2f} | {t['average_mAP']:.2f} | {t['mAP@0.5']:.2f} |"]
    for s in record["steps"]:
        lines.append(f"| {s['blocks_dropped']} | {s['gmacs']:.3f} | {s['latency_ms']:.2f} | "
                     f"{s['average_mAP']:.2f} | {s['mAP@0.5']:.2f} |")
    lines += ["", "| ablation | test avg mAP |", "|---|---|"]
    lines += [f"| {k} | {v['average_mAP']:.2f} |" for k, v in record["ablations"].items()]
    last = record["steps"][-1] if record["steps"] else None
    if last:
        lines.append(f"\n{record['name']}: {last['blocks_dropped']} blocks dropped, GMACs x{last['gmacs'] / t['gmacs']:.3f}, "
                     f"latency x{last['latency_ms'] / t['latency_ms']:.3f}, test avg mAP {t['average_mAP']:.2f} -> "
                     f"{last['average_mAP']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
