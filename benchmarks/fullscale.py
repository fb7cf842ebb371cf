"""The real size, measured: the THUMOS14 detectors at their real input, on this machine.

    python benchmarks/fullscale.py                     # CPU; writes benchmarks/results/fullscale.json
    python benchmarks/fullscale.py --device cuda       # a GPU, bf16 autocast
    python benchmarks/fullscale.py --smoke --results /tmp/fs.json   # the same path at a tiny size (the test)

`thumos14_videomae_s` and `thumos14_adatad_s` as shipped: one 768-frame window at 160 px (48 clips
of 16 frames through VideoMAE-S, 800 tokens a clip), batch 1, random weights (the cost does not
depend on their values; the position table is the pretrained layout, 224 px resized to 10 x 10).
For each config:

- inference: one test window through the detector in eval mode, with 0 and with 3 blocks dropped;
- iteration: one alignment iteration of a compress step, as the config sets it: the frozen teacher's
  forward (its block outputs kept for the feature loss) under no_grad, the student's forward with
  LoRA (rank and targets of compress.alignment) and the config's trained-in-full set (norms,
  tokenizer, head, adapters), the losses of compress.alignment.weights (feature, class and segment
  distillation, ground truth), backward with activation checkpointing per block as
  backbone.grad_checkpointing says, and an AdamW step. The step-1 student (1 block dropped) and the
  step-3 student (3 dropped).

Each measurement runs in a fresh process started from a bare interpreter (the launcher below), so
its peak resident set is its own: the report gives that peak, and the same process's peak just
before the first timed call (models built, inputs made), so that the difference is what the
computation itself adds. Times: `--repeats` calls after `--warmup` untimed ones, median and each. The projected
memory at the config's batch size (compress.alignment.train.batch_size) scales the computation's
part linearly: static + batch x (peak - static); it is a projection, not a measurement.
On CUDA the peaks are torch.cuda.max_memory_allocated (the same process's allocation before the first
timed call is the "before" figure) and the computation runs under bf16 autocast, as the configs'
`amp: true` does on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "fullscale.json"
CONFIGS = ("thumos14_videomae_s", "thumos14_adatad_s")
CASES = (("inference", 0), ("inference", 3), ("iteration", 1), ("iteration", 3))
SMOKE = ["backbone.depth=4", "data.frame_size=32", "data.window=32", "data.test_stride=16", "head.embed_dim=32",
         "head.fpn_dim=32", "head.head_dim=32"]
# Forks the measured command from a bare interpreter and reports that child's own peak RSS (Linux carries
# the pre-exec address space's peak into ru_maxrss, so forking from a process with torch loaded would
# put a floor of its size under every figure).
LAUNCH = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[2], sys.argv[2:])\n"
          "_, status, usage = os.wait4(pid, 0)\n"
          "open(sys.argv[1], 'w').write(f'{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}')")


# ---- the measured process ----------------------------------------------------------------------------

def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def build(config: str, batch: int, device: torch.device, overrides=()):
    """The shipped config's detector at its real size (pretrained table layout, no file read), and one
    window batch: uint8 frames (B, 768, 160, 160, 3), a full mask, two segments per window."""
    from blockdrop.recipes.build import build_detector, load_experiment

    cfg = load_experiment(config, overrides)
    cfg = replace(cfg, backbone=replace(cfg.backbone, checkpoint=None, checkpoint_format=None, pos_size=224))
    torch.manual_seed(0)
    model = build_detector(cfg, 20, 3).to(device)
    window, size = cfg.data.window, cfg.data.frame_size
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (batch, window, size, size, 3), dtype=torch.uint8, generator=gen)
    segments = torch.tensor([[0.13, 0.34], [0.52, 0.68]], device=device) * window  # input steps
    batch_dict = {"inputs": frames.to(device), "mask": torch.ones(batch, window, dtype=torch.bool, device=device),
                  "segments": [segments] * batch,
                  "labels": [torch.tensor([3, 7], device=device)] * batch}
    return cfg, model, batch_dict


def _drop(model, count: int):
    from blockdrop.compress.stack import drop_blocks

    if count:  # evenly spread, as selection tends to spare the first blocks: the cost does not depend on which
        depth = model.backbone.depth
        drop_blocks(model, [round((i + 1) * depth / (count + 1)) for i in range(count)], stack="backbone.blocks")
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_case(cfg, model, batch, dropped: int, device, autocast):
    model = _drop(model, dropped).eval()

    def call():
        with torch.inference_mode(), autocast():
            model(batch["inputs"], batch["mask"])
    return call


def iteration_case(cfg, teacher, batch, dropped: int, device, autocast):
    """One alignment iteration of a compress step, with the config's alignment settings."""
    from blockdrop.compress.align import AlignLoss
    from blockdrop.compress.lora import add_lora, trained_in_full
    from blockdrop.compress.target import TargetForward
    from blockdrop.tad.target import DETECTOR_TRAINABLE, DetectorTarget

    a = cfg.compress.alignment
    target = DetectorTarget(None, cfg.eval, temperature=a.temperature)
    student = _drop(copy.deepcopy(teacher), dropped).train()
    trainable = a.trainable if a.trainable is not None else DETECTOR_TRAINABLE
    full = trained_in_full(student, target.stack_path, trainable, a.adapters)
    add_lora(student, target, rank=a.lora_rank, targets=a.lora_targets, trainable=full)
    loss_fn = AlignLoss(teacher, target, weights=a.weights)
    runner = TargetForward(student, target)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.train.lr, weight_decay=a.train.weight_decay)

    def call():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            losses = loss_fn(runner, batch)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, a.train.grad_clip)
        optimizer.step()
    return call, sum(p.numel() for p in params)


def measure(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext
    batch_size = args.batch
    cfg, model, batch = build(args.config, batch_size, device, SMOKE if args.smoke else ())
    trainable = None
    if args.kind == "inference":
        call = inference_case(cfg, model, batch, args.dropped, device, autocast)
    else:
        call, trainable = iteration_case(cfg, model, batch, args.dropped, device, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_peak_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    times = []
    for i in range(args.warmup + args.repeats):  # warm-up calls first (allocator, kernels), not timed
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = _rss_peak_bytes() if device.type == "cpu" else torch.cuda.max_memory_allocated(device)
    return {"config": args.config, "kind": args.kind, "blocks_dropped": args.dropped, "batch": batch_size,
            "device": str(device), "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
            "threads": torch.get_num_threads(), "depth": model.backbone.depth - (args.dropped if args.kind ==
                                                                                 "iteration" else 0),
            "seconds": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
            "before_bytes": before, "peak_bytes": peak, "trainable_params": trainable,
            "grad_checkpointing": cfg.backbone.grad_checkpointing,
            "window": {"frames": cfg.data.window, "frame_size": cfg.data.frame_size,
                       "feature_steps": round(cfg.data.window / model.feature_stride)}}


# ---- the orchestrator ---------------------------------------------------------------------------------

def run_child(args, config: str, kind: str, dropped: int, batch: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, rss = Path(tmp) / "out.json", Path(tmp) / "rss"
        command = [sys.executable, __file__, "--child", "--config", config, "--kind", kind, "--dropped", str(dropped),
                   "--device", args.device, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup),
                   "--batch", str(batch), "--child-out", str(out), *(["--smoke"] if args.smoke else [])]
        subprocess.run([sys.executable, "-c", LAUNCH, str(rss), *command], check=True)
        maxrss_kib, code = (int(x) for x in rss.read_text().split())
        if code:
            raise SystemExit(f"measurement failed ({code}): {shlex.join(command)}")
        result = json.loads(out.read_text())
    if args.device == "cpu":
        result["peak_bytes"] = maxrss_kib * 1024  # the child's own peak, from its parent's wait4
    return result


def _gib(b: float) -> float:
    return round(b / 2**30, 3)


def summarise(results: list[dict], configs) -> list[dict]:
    rows = []
    for r in results:
        added = r["peak_bytes"] - r["before_bytes"]
        row = {"config": r["config"], "kind": r["kind"], "blocks_dropped": r["blocks_dropped"],
               "depth": r["depth"], "median_s": r["median_s"], "seconds": r["seconds"],
               "peak_gib": _gib(r["peak_bytes"]), "before_gib": _gib(r["before_bytes"]), "added_gib": _gib(added)}
        if r["kind"] == "iteration":
            batch = configs[r["config"]]
            row["projected_batch"] = batch
            row["projected_peak_gib"] = _gib(r["before_bytes"] + batch * added)
        rows.append(row)
    return rows


def table(rows) -> str:
    lines = [f"{'config':<22}{'case':<11}{'dropped':>8}{'depth':>6}{'median s':>10}{'peak GiB':>10}"
             f"{'computation GiB':>16}{'projected GiB':>15}"]
    for r in rows:
        proj = f"{r['projected_peak_gib']:.2f} (b{r['projected_batch']})" if "projected_peak_gib" in r else ""
        lines.append(f"{r['config']:<22}{r['kind']:<11}{r['blocks_dropped']:>8}{r['depth']:>6}{r['median_s']:>10.2f}"
                     f"{r['peak_gib']:>10.2f}{r['added_gib']:>16.2f}{proj:>15}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them (0 for calls of minutes)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="tiny windows and depth: checks the path, measures nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--dropped", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(measure(args)))
        return 0

    from blockdrop.core.fileio import write_json
    from blockdrop.recipes.build import load_experiment

    batches = {c: load_experiment(c).compress.alignment.train.batch_size for c in args.configs}
    load_before = os.getloadavg()
    start = time.perf_counter()
    results = []
    for config in args.configs:
        for kind, dropped in CASES:
            results.append(run_child(args, config, kind, dropped))
            print(f"{config} {kind} dropped {dropped}: {results[-1]['median_s']:.2f} s", flush=True)
    rows = summarise(results, batches)
    print(table(rows))
    record = {"smoke": args.smoke, "warmup": args.warmup, "command": "python " + shlex.join(["benchmarks/fullscale.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": args.device, "threads": args.threads, "repeats": args.repeats,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "cuda_device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "wall_time_s": round(time.perf_counter() - start, 1), "rows": rows, "raw": results,
              "notes": ["peak_gib: the measuring process's peak resident set (CPU) or allocator peak (CUDA)",
                        "computation GiB: that peak minus the same process's peak before the first timed call",
                        "projected GiB: before + batch x computation, the config's compress.alignment.train.batch_size;"
                        " a linear projection, not a measurement"]}
    for row in rows:
        row["command"] = record["command"]
    write_json(args.results, record)
    it = {r["config"]: r for r in rows if r["kind"] == "iteration" and r["blocks_dropped"] == 1}
    first = next(iter(it.values()))
    print(f"summary: one alignment iteration of {first['config']} at 768 frames x 160 px, batch 1, takes "
          f"{first['median_s']:.1f} s and {first['peak_gib']:.2f} GiB peak on {args.device} ({args.threads} threads); "
          f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
