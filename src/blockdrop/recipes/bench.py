"""`blockdrop bench`: what a config's detector costs, and what dropping blocks saves.

Also the shared pieces of benchmarks/depth_vs_width.py and benchmarks/gpu.py: the cost of a
model (operator-level MACs counted on the meta device, parameters) and latency measured in
interleaved rounds, so that a slow drift of the machine (another job starting, thermal limits)
spreads over every variant instead of landing on one. Protocol: docs/measurement.md.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
from dataclasses import replace

import torch
from torch import nn

from blockdrop.compress.stack import drop_blocks
from blockdrop.compress.width import prune_to_macs
from blockdrop.core.errors import BlockdropError
from blockdrop.core.measure import count_macs, count_params, measure_latency
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.annotations import get_preset
from blockdrop.recipes.build import (build_detector, example_window, input_channels, load_experiment_annotations,
                                     make_source)


# ---- cost and latency ----------------------------------------------------------------------------

def model_cost(model: nn.Module, *inputs) -> dict:
    """gmacs (operator level), linear_gmacs and params of one forward; counted on `meta` from shapes."""
    meta = copy.deepcopy(model).to("meta")
    macs = count_macs(meta, *(x.to("meta") for x in inputs))
    return {"macs": macs["macs"], "gmacs": macs["gmacs"], "linear_gmacs": macs["linear_gmacs"],
            "params": count_params(model)["total"]}


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def measure_interleaved(variants: dict, inputs: tuple, *, rounds: int = 5, threads: int | None = None,
                        warmup: int = 3, min_run_time: float = 1.0, device=None, progress=None) -> dict:
    """Latency of every variant (name -> callable or module), measured in `rounds` interleaved rounds.

    Each round times every variant once with `measure_latency` (the first round with `warmup`
    untimed calls, later ones with one, to refill caches after the other variants ran), starting
    one variant later each round so no variant is always first. Per variant: latency_ms = median
    of the round medians, iqr_ms = their interquartile range, rounds_ms = the round medians.
    """
    names = list(variants)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            result = measure_latency(variants[name], *inputs, device=device, threads=threads,
                                     warmup=warmup if r == 0 else 1, min_run_time=min_run_time)
            per_round[name].append(result["median_ms"])
            if progress is not None:
                progress(f"round {r + 1}/{rounds} {name}: {result['median_ms']:.1f} ms ({result['runs']} runs)")
    out = {}
    for name, values in per_round.items():
        low, high = _quartiles(values)
        out[name] = {"latency_ms": statistics.median(values), "iqr_ms": high - low, "rounds_ms": values}
    return out


def add_ratios(rows: list[dict], reference: dict) -> list[dict]:
    """speedup = reference latency / latency; macs_ratio = reference MACs / MACs;
    efficiency = speedup / macs_ratio (1.0: latency fell exactly in proportion to MACs)."""
    for row in rows:
        row["macs_ratio"] = reference["macs"] / row["macs"]
        if "latency_ms" in row:
            row["speedup"] = reference["latency_ms"] / row["latency_ms"]
            row["efficiency"] = row["speedup"] / row["macs_ratio"]
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of cost rows (keys from model_cost, measure_interleaved and add_ratios)."""
    head = ("variant", "kind", "blocks", "heads", "mlp", "GMACs", "lin GMACs", "params M",
            "latency ms", "IQR ms", "speedup", "MACs x", "effic.")
    lines = [head]
    for r in rows:
        lines.append((r["name"], r["kind"], str(r.get("blocks", "")), str(r.get("heads", "")),
                      str(r.get("mlp_hidden", "")), f"{r['gmacs']:.2f}", f"{r['linear_gmacs']:.2f}",
                      f"{r['params'] / 1e6:.2f}", _num(r, "latency_ms", 1), _num(r, "iqr_ms", 1),
                      _num(r, "speedup", 3), f"{r['macs_ratio']:.3f}", _num(r, "efficiency", 3)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def _num(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


def block_shapes(backbone: nn.Module) -> dict:
    """blocks, heads and MLP hidden width of a blockdrop ViT (heads/hidden of the first block)."""
    blocks = backbone.blocks
    return {"blocks": len(blocks), "heads": blocks[0].attn.heads, "mlp_hidden": blocks[0].mlp.fc1.out_features}


def cpu_name() -> str:
    """The CPU model string from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- the command ---------------------------------------------------------------------------------

def _num_classes(cfg: ExperimentConfig, classes: int | None) -> int:
    if classes is not None:
        return classes
    return get_preset(cfg.data.preset).num_classes if cfg.data.preset is not None else 20


def _in_channels(cfg: ExperimentConfig, channels: int | None) -> int:
    """The flag's value; 3 for video; else read from the config's data (the first sequence)."""
    if channels is not None:
        return channels
    if cfg.data.kind == "video":
        return 3
    try:  # the annotation file, the sequence folder and the first sequence can each be missing
        annotations = load_experiment_annotations(cfg.data)
        return input_channels(cfg.data, annotations, make_source(cfg.data, annotations))
    except BlockdropError as err:
        raise BlockdropError(f"{err}; or pass the number of input channels with --in-channels") from None


def _backbone_example(cfg, in_channels: int) -> torch.Tensor:
    """Input for width pruning: one clip (cost is linear in clips) or the whole sequence."""
    if cfg.data.kind == "video":
        size = cfg.data.frame_size
        return torch.randn(1, 3, cfg.backbone.clip_len, size, size)
    return torch.randn(1, cfg.data.window, in_channels)


def _dropped_copy(model: nn.Module, part: str, count: int) -> nn.Module:
    """A copy of `model` whose backbone (`part`) lost its last `count` blocks (all blocks cost the same)."""
    copied = copy.deepcopy(model)
    backbone = copied.get_submodule(part)
    depth = len(backbone.blocks)
    drop_blocks(backbone, list(range(depth - count, depth)), stack="blocks")
    return copied


def depth_width_variants(model: nn.Module, example: torch.Tensor, *, drops: int, width: bool = True,
                         combo: tuple[int, float] | None = None, part: str = "", importance: str = "l2") -> list[dict]:
    """The variants of a depth vs width comparison, each {name, kind, model, width}.

    original; "drop d" (kind depth) for d = 1..drops; with `width`, "width @ drop d" (kind width):
    width pruning of the original to the backbone MACs of "drop d" at `example`; with
    combo = (d, f), "drop d + width f" (kind depth+width): drop d blocks, then width-prune a
    further fraction f of the backbone's MACs. `part` names the backbone inside `model` ("" = the
    model itself); `example` is the backbone input used to trace and match MACs (one clip suffices:
    cost is linear in the number of clips). `width` holds prune_to_macs' WidthResult or None.
    """
    depth = len(model.get_submodule(part).blocks)
    last = max([drops] + ([combo[0]] if combo else []))
    if not 0 <= last < depth:
        raise BlockdropError(f"cannot drop {last} of {depth} blocks: at least one must stay")
    out = [{"name": "original", "kind": "original", "model": model, "width": None}]
    dropped = {d: _dropped_copy(model, part, d) for d in range(1, last + 1)}
    out += [{"name": f"drop {d}", "kind": "depth", "model": dropped[d], "width": None} for d in range(1, drops + 1)]
    if width:
        for d in range(1, drops + 1):
            target = model_cost(dropped[d].get_submodule(part), example)["macs"]
            pruned = copy.deepcopy(model)
            result = prune_to_macs(pruned.get_submodule(part), target, example, importance=importance)
            out.append({"name": f"width @ drop {d}", "kind": "width", "model": pruned, "width": result})
    if combo:
        d, fraction = combo
        pruned = copy.deepcopy(dropped[d])
        target = round(model_cost(pruned.get_submodule(part), example)["macs"] * (1 - fraction))
        result = prune_to_macs(pruned.get_submodule(part), target, example, importance=importance)
        out.append({"name": f"drop {d} + width {fraction:.0%}", "kind": "depth+width", "model": pruned,
                    "width": result})
    return out


def check_counts(*, rounds: int, warmup: int, threads: int | None, classes: int | None,
                 in_channels: int | None) -> None:
    """The counting flags, before any model is built (each error names the flag)."""
    for flag, value, least in (("--rounds", rounds, 0), ("--warmup", warmup, 0), ("--threads", threads, 1),
                               ("--classes", classes, 1), ("--in-channels", in_channels, 1)):
        if value is not None and value < least:
            raise BlockdropError(f"{flag} {value}: must be at least {least}")


def bench_config(cfg: ExperimentConfig, *, drop: int = 4, width: bool = False, rounds: int = 3,
                 threads: int | None = None, warmup: int = 2, min_run_time: float = 1.0,
                 classes: int | None = None, in_channels: int | None = None) -> list[dict]:
    """Cost rows of the config's detector (random weights): original, 1..``drop`` blocks dropped,
    and with ``width`` the width-pruned models of equal MACs; latency in ``rounds`` interleaved rounds."""
    check_counts(rounds=rounds, warmup=warmup, threads=threads, classes=classes, in_channels=in_channels)
    cfg = replace(cfg, backbone=replace(cfg.backbone, checkpoint=None, checkpoint_format=None))  # cost only
    in_channels = _in_channels(cfg, in_channels)
    torch.manual_seed(0)
    detector = build_detector(cfg, _num_classes(cfg, classes), in_channels).eval()
    depth = len(detector.backbone.blocks)
    if not 0 <= drop < depth:
        raise BlockdropError(f"--drop {drop}: must be between 0 and {depth - 1} (the backbone has {depth} blocks)")
    inputs = example_window(cfg, in_channels)  # one zero window, batch 1, as the dataset delivers it
    variants = depth_width_variants(detector, _backbone_example(cfg, in_channels), drops=drop, width=width,
                                    part="backbone")
    rows = [{"name": v["name"], "kind": v["kind"], **block_shapes(v["model"].backbone),
             **model_cost(v["model"], *inputs)} for v in variants]
    if rounds > 0:
        latency = measure_interleaved({v["name"]: v["model"] for v in variants}, inputs, rounds=rounds,
                                      threads=threads, warmup=warmup, min_run_time=min_run_time)
        for row in rows:
            row.update(latency[row["name"]])
    return add_ratios(rows, rows[0])
