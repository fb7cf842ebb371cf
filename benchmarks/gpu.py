"""Depth vs width at equal MACs on a CUDA GPU, for VideoMAE-S/B/L at the paper's input size.

    python benchmarks/gpu.py                              # S, B, L; 768x160x160 window; fp32, bf16, fp16
    python benchmarks/gpu.py --sizes S --dtypes bf16 --frames 16

The paper's point (method.md, "Why depth, not width") is about GPUs: narrower matrices run
less efficiently there, so channel pruning saves less time than MACs. For each size: the
original; 1..N blocks dropped; width pruning (MLP channels + whole heads) to the MACs of each
depth point; block drop followed by width pruning. Timed per dtype (fp32, and bf16/fp16 under
torch.autocast) in interleaved rounds with CUDA synchronisation (blockdrop.core.measure.measure_latency).
Writes benchmarks/results/gpu_depth_vs_width.json. Exits with a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from blockdrop.recipes.bench import (add_ratios, block_shapes, cpu_name, depth_width_variants, format_table,
                             measure_interleaved, model_cost)
from blockdrop.core.fileio import write_json
from blockdrop.models.vit import ClipVideoBackbone, videomae_vit, vit_sizes

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DROPS = {"S": 4, "B": 4, "L": 6}  # the paper's table (S) and its VideoMAE-L points (3, 6)
KEYS = ("name", "kind", "blocks", "heads", "mlp_hidden", "gmacs", "linear_gmacs", "params", "latency_ms",
        "iqr_ms", "speedup", "macs_ratio", "efficiency", "rounds_ms", "mlp_pruned", "head_pruned")


class Autocast(nn.Module):
    """Run `model` under CUDA autocast in `dtype` (weights stay fp32, as in mixed-precision inference)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype):
            return self.model(x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S,B,L", help="comma-separated VideoMAE sizes (default S,B,L)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--frames", type=int, default=768, help="frames per window, a multiple of 16 (default 768)")
    p.add_argument("--img", type=int, default=160, help="frame side in pixels (default 160)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--drops", type=int, default=None, help="depth points 1..N (default S,B: 4, L: 6)")
    p.add_argument("--combo-fraction", type=float, default=0.1,
                   help="drop depth//4 blocks, then width-prune this fraction of the MACs left (default 0.1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds timed per variant per round")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_depth_vs_width.json")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [s for s in args.sizes if s not in vit_sizes] + [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown size or dtype: {', '.join(bad)}")
    if args.frames % 16:
        p.error(f"--frames {args.frames}: must be a multiple of 16 (the clip length)")
    return args


def run_size(size: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    depth = vit_sizes[size][0]
    backbone = ClipVideoBackbone(videomae_vit(size, num_frames=16), clip_len=16).to(device).eval()
    window = torch.randn(args.batch, 3, args.frames, args.img, args.img, device=device)
    clip = window[:1, :, :16]  # pruning traces and matches MACs on one clip (cost is linear in clips)
    drops = args.drops or DEFAULT_DROPS.get(size, depth // 4)
    variants = depth_width_variants(backbone, clip, drops=drops, combo=(depth // 4, args.combo_fraction))
    base = []
    for v in variants:
        row = {"size": size, "name": v["name"], "kind": v["kind"], **block_shapes(v["model"]),
               **model_cost(v["model"], window)}
        if v["width"] is not None:
            row["mlp_pruned"], row["head_pruned"] = v["width"].mlp_ratio, v["width"].head_ratio
        base.append(row)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        models = {v["name"]: v["model"] if dtype is None else Autocast(v["model"], dtype) for v in variants}
        latency = measure_interleaved(models, (window,), rounds=args.rounds, warmup=args.warmup,
                                      min_run_time=args.min_run_time, device=device,
                                      progress=lambda line, d=dtype_name: print(f"{size} {d} {line}", file=sys.stderr))
        measured = [{**row, "dtype": dtype_name, **latency[row["name"]]} for row in base]
        add_ratios(measured, measured[0])
        print(f"VideoMAE-{size}, {args.batch}x3x{args.frames}x{args.img}x{args.img}, {dtype_name}")
        print(format_table(measured), flush=True)
        rows += measured
    del variants, backbone
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a machine "
              "with an NVIDIA GPU and a CUDA build of torch. For the CPU comparison use "
              "benchmarks/depth_vs_width.py.", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    rows = []
    for size in args.sizes:
        rows += run_size(size, args, device)
    props = torch.cuda.get_device_properties(device)
    result = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "device": {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                         "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version(), "cpu": cpu_name(), "platform": platform.platform(),
                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32},
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "setup": {"input": [args.batch, 3, args.frames, args.img, args.img], "rounds": args.rounds,
                        "warmup": args.warmup, "min_run_time_s": args.min_run_time,
                        "autocast": "bf16/fp16 rows run under torch.autocast('cuda'); weights fp32"},
              "variants": [{k: r[k] for k in ("size", "dtype", *KEYS) if k in r} for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
