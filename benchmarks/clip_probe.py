"""Can a video backbone learn a video set at all? A minutes-long check before a long detector run.

    python benchmarks/clip_probe.py synthetic --steps 600
    python benchmarks/clip_probe.py synthetic --set data.root=/tmp/syn --set data.cache_dir=/tmp/syn/cache

Trains the config's backbone (from its initialisation: scratch or the configured checkpoint) with a
linear classifier on single clips of ``backbone.clip_len`` frames drawn at random from the training
videos; a clip's label is the action at its centre frame, or "background". Every ``--every`` steps
it prints the training loss and the accuracy on a fixed set of validation clips next to the
majority-class rate. A backbone whose validation accuracy never leaves the majority rate will not
carry an ActionFormer head either. Training clips may be augmented (``--augment``: random colour
channel order and horizontal flip, which keep every synthetic class valid).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blockdrop.recipes.build import build_backbone, load_experiment_annotations, make_source, split_annotations
from blockdrop.recipes.build import resolve_config_path
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig


def frame_labels(info, length: int, rate: float, class_index) -> np.ndarray:
    """(length,) class index per frame; len(classes) = background."""
    labels = np.full(length, len(class_index), dtype=np.int64)
    for seg in info.segments:
        labels[int(round(seg.start * rate)):int(round(seg.end * rate))] = class_index[seg.label]
    return labels


class ClipSampler:
    def __init__(self, part, source, clip_len: int, class_index, seed: int, augment: bool = False):
        self.videos = []
        for vid in sorted(part.videos):
            frames = torch.from_numpy(np.asarray(source.load(vid)))
            self.videos.append((frames, frame_labels(part.videos[vid], len(frames), source.rate, class_index)))
        self.clip_len, self.augment = clip_len, augment
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int):
        clips, labels = [], []
        for _ in range(size):
            frames, per_frame = self.videos[self.rng.integers(len(self.videos))]
            start = int(self.rng.integers(0, len(frames) - self.clip_len + 1))
            clip = frames[start:start + self.clip_len]  # (L, H, W, 3) uint8
            if self.augment:
                clip = clip[..., self.rng.permutation(3).tolist()]
                if self.rng.random() < 0.5:
                    clip = clip.flip(2)
            clips.append(clip)
            labels.append(per_frame[start + self.clip_len // 2])
        return torch.stack(clips), torch.as_tensor(np.array(labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--val-clips", type=int, default=256)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="also write benchmarks/results/<name>.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_config(ExperimentConfig, resolve_config_path(args.config), args.set)
    if cfg.data.kind != "video":
        parser.error(f"{args.config}: data.kind must be video, got {cfg.data.kind}")
    torch.manual_seed(cfg.train.seed)
    annotations = load_experiment_annotations(cfg.data)
    source = make_source(cfg.data, annotations)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    class_index = {name: i for i, name in enumerate(annotations.classes)}
    clip_len = cfg.backbone.clip_len
    train = ClipSampler(parts["train"], source, clip_len, class_index, cfg.train.seed, args.augment)
    val_x, val_y = ClipSampler(parts["val"], source, clip_len, class_index, cfg.train.seed + 1).batch(args.val_clips)
    majority = float(torch.bincount(val_y).max()) / len(val_y)

    backbone = build_backbone(cfg.backbone, cfg.data, 3)
    classifier = nn.Linear(backbone.out_channels, len(class_index) + 1)
    params = [*backbone.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=cfg.train.weight_decay)

    def logits(x):
        return classifier(backbone(x).mean(-1))  # (B, C, T) -> mean over time -> classes

    print(f"{'step':>6} {'train loss':>10} {'val acc':>8} {'majority':>8} {'time s':>7}")
    start, best, rows, loss = time.perf_counter(), 0.0, [], None
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            backbone.eval()
            with torch.no_grad():
                acc = float((logits(val_x).argmax(-1) == val_y).float().mean())
            best = max(best, acc)
            loss_text = f"{loss.item():10.3f}" if step else f"{'-':>10}"
            print(f"{step:6d} {loss_text} {acc:8.3f} {majority:8.3f} {time.perf_counter() - start:7.0f}", flush=True)
            rows.append({"step": step, "train_loss": loss.item() if step else None, "val_accuracy": acc,
                         "time_s": round(time.perf_counter() - start, 1)})
        if step == args.steps:
            break
        backbone.train()
        x, y = train.batch(args.batch)
        loss = F.cross_entropy(logits(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
    command = f"python {shlex.join(sys.argv)}"
    if args.name:
        from blockdrop.core.fileio import write_json

        record = {"name": args.name, "majority": majority, "best_val_accuracy": best, "steps": args.steps,
                  "rows": rows, "wall_time_s": round(time.perf_counter() - start, 1), "command": command}
        write_json(Path(__file__).parent / "results" / f"{args.name}.json", record)
    print(f"summary: best validation clip accuracy {best:.3f} vs majority {majority:.3f} after {args.steps} steps "
          f"({time.perf_counter() - start:.0f} s); command: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
