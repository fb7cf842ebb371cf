"""Depth vs width at equal MACs, on this machine's CPU: does latency follow MACs?

    python benchmarks/depth_vs_width.py                 # VideoMAE-S, one 16x160x160 clip, 2 threads
    python benchmarks/depth_vs_width.py --frames 768    # the paper's 768-frame window (48 clips; slow)

Variants of a VideoMAE-S backbone (random weights; cost does not depend on them): the original;
1..N blocks dropped (depth); width pruning (MLP channels + whole heads, torch-pruning) to the MACs
of each depth point; and block drop followed by width pruning. All are timed in one run, in
interleaved rounds (blockdrop.recipes.bench.measure_interleaved), with a fixed number of CPU threads.
Writes benchmarks/results/depth_vs_width.json and .png and prints a table and a summary line.
Needs blockdrop[prune] (torch-pruning) and matplotlib. Protocol: docs/measurement.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from blockdrop.recipes.bench import (add_ratios, block_shapes, cpu_name, depth_width_variants, format_table,
                             load_average, measure_interleaved, model_cost)
from blockdrop.core.fileio import write_json
from blockdrop.models.vit import ClipVideoBackbone, videomae_vit

RESULTS = Path(__file__).parent / "results"
KEYS = ("name", "kind", "blocks", "heads", "mlp_hidden", "gmacs", "linear_gmacs", "params", "latency_ms",
        "iqr_ms", "speedup", "macs_ratio", "efficiency", "rounds_ms")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="S", choices=("S", "B", "L"), help="VideoMAE size (default S)")
    p.add_argument("--frames", type=int, default=16, help="frames in the window, a multiple of 16 (768: paper)")
    p.add_argument("--img", type=int, default=160, help="frame side in pixels (default 160)")
    p.add_argument("--drops", type=int, default=4, help="depth points: 1..N blocks dropped (default 4)")
    p.add_argument("--combo", default="3:0.1", help="DROP:FRACTION: drop DROP blocks, then width-prune FRACTION "
                                                    "of the MACs left (default 3:0.1); 'none' to skip")
    p.add_argument("--summary-drop", type=int, default=3, help="depth point quoted in the summary line (default 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before a variant's first timing")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds timed per variant per round")
    p.add_argument("--importance", default="l2", choices=("l2", "l1", "random"), help="width pruning criterion")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="output file stem (default depth_vs_width, with size and "
                                                 "frames appended when they are not S and 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.name is None:
        default = args.size == "S" and args.frames == 16 and args.img == 160
        args.name = "depth_vs_width" if default else f"depth_vs_width_{args.size}_{args.frames}x{args.img}"
    if args.frames % 16:
        p.error(f"--frames {args.frames}: must be a multiple of 16 (the clip length)")
    args.combo = None if args.combo == "none" else _combo(p, args.combo)
    return args


def _combo(p: argparse.ArgumentParser, text: str) -> tuple[int, float]:
    try:
        drop, fraction = text.split(":")
        return int(drop), float(fraction)
    except ValueError:
        p.error(f"--combo {text!r}: expected DROP:FRACTION, e.g. 3:0.1")


def build_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict], torch.Tensor]:
    torch.manual_seed(args.seed)
    backbone = ClipVideoBackbone(videomae_vit(args.size, num_frames=16), clip_len=16).eval()
    window = torch.randn(1, 3, args.frames, args.img, args.img)  # (B, 3, T, H, W), already normalised
    clip = window[:, :, :16]  # pruning traces and matches MACs on one clip (cost is linear in clips)
    variants = depth_width_variants(backbone, clip, drops=args.drops, combo=args.combo, importance=args.importance)
    rows = []
    for v in variants:
        row = {"name": v["name"], "kind": v["kind"], **block_shapes(v["model"]), **model_cost(v["model"], window)}
        if v["width"] is not None:
            row["mlp_pruned"], row["head_pruned"] = v["width"].mlp_ratio, v["width"].head_ratio
        rows.append(row)
    return rows, variants, window


def summary(rows: list[dict], drop: int) -> str:
    by_name = {r["name"]: r for r in rows}
    depth, width = by_name.get(f"drop {drop}"), by_name.get(f"width @ drop {drop}")
    if depth is None or width is None:
        return "summary: no depth/width pair at --summary-drop"
    line = (f"at equal MACs ({depth['gmacs']:.2f} vs {width['gmacs']:.2f} GMACs, {depth['macs_ratio']:.3f}x fewer): "
            f"dropping {drop} blocks is {depth['speedup']:.3f}x faster (efficiency {depth['efficiency']:.3f}), "
            f"width pruning {width['speedup']:.3f}x (efficiency {width['efficiency']:.3f})")
    combos = [r for r in rows if r["kind"] == "depth+width"]
    for r in combos:
        line += f"; {r['name']}: {r['macs_ratio']:.3f}x fewer MACs, {r['speedup']:.3f}x faster"
    return line


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = rows[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for kind, style in (("depth", "o-"), ("width", "s-")):
        points = [original] + [r for r in rows if r["kind"] == kind]
        ax.errorbar([r["gmacs"] for r in points], [r["latency_ms"] for r in points],
                    yerr=[r["iqr_ms"] / 2 for r in points], fmt=style, capsize=3,
                    label="block drop (depth)" if kind == "depth" else "channel pruning (width)")
    for r in rows:
        if r["kind"] == "depth+width":
            ax.errorbar([r["gmacs"]], [r["latency_ms"]], yerr=[r["iqr_ms"] / 2], fmt="D", capsize=3, label=r["name"])
    xs = sorted({r["gmacs"] for r in rows})
    ax.plot(xs, [original["latency_ms"] * x / original["gmacs"] for x in xs], "k:", lw=1,
            label="latency proportional to MACs")
    ax.set_xlabel("GMACs (operator level)")
    ax.set_ylabel("latency, median ms (bars: IQR over rounds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    if load_before and load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]} before the run (1 min): other processes share the CPU "
              f"and the latencies will be noisy; re-run on a quiet machine", file=sys.stderr, flush=True)
    rows, variants, window = build_rows(args)
    print(f"measuring {len(variants)} variants x {args.rounds} rounds ...", file=sys.stderr, flush=True)
    latency = measure_interleaved({v["name"]: v["model"] for v in variants}, (window,), rounds=args.rounds,
                                  threads=args.threads, warmup=args.warmup, min_run_time=args.min_run_time,
                                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    for row in rows:
        row.update(latency[row["name"]])
    add_ratios(rows, rows[0])
    device = {"cpu": cpu_name(), "threads": args.threads, "platform": platform.platform(), "nice": os.nice(0),
              "load_average_before": load_before, "load_average_after": load_average()}
    title = (f"VideoMAE-{args.size}, 1x3x{args.frames}x{args.img}x{args.img}, {device['cpu']}, "
             f"{args.threads} threads")
    print(title)
    print(format_table(rows))
    line = summary(rows, args.summary_drop)
    print(line)
    print(f"load average (1, 5, 15 min) before {device['load_average_before']}, after {device['load_average_after']}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "device": device,
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "setup": {"model": f"VideoMAE-{args.size} random weights", "input": [1, 3, args.frames, args.img, args.img],
                        "rounds": args.rounds, "warmup": args.warmup, "min_run_time_s": args.min_run_time,
                        "importance": args.importance, "dtype": "float32", "mode": "eval, inference_mode"},
              "summary": line,
              "variants": [{k: r[k] for k in (*KEYS, "mlp_pruned", "head_pruned") if k in r} for r in rows]}
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    write_json(json_path, result)
    plot(rows, png_path, title)
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
