"""Train a teacher with `blockdrop train`, score it once on the test split, record the figures.

    python benchmarks/teacher.py hapt --name hapt_teacher
    python benchmarks/teacher.py synthetic --name synthetic_teacher

Selection happens on the validation split inside `train`; the test split is scored once,
here, with the selected model. Writes benchmarks/results/<name>.json and prints a table.
Extra `--set` overrides pass through to the config (and are recorded in the command).
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

from blockdrop.recipes.build import (data_fingerprint, example_window, input_channels, load_experiment_annotations,
                             make_source, software_versions)
from blockdrop.recipes.build import resolve_config_path
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
from blockdrop.core.fileio import write_json
from blockdrop.core.measure import count_macs, count_params
from blockdrop.recipes.build import load_detector
from blockdrop.recipes.evaluate import evaluate_checkpoint
from blockdrop.recipes.runs import MODEL_FILE
from blockdrop.recipes.train import train_experiment

RESULTS = Path(__file__).parent / "results"


def window_macs(model, cfg: ExperimentConfig, channels: int) -> dict:
    """MACs of one test window (batch 1) through the whole detector, and of the backbone alone."""
    inputs, mask = example_window(cfg, channels)
    total = count_macs(model, inputs, mask)
    backbone = count_macs(model.backbone, inputs)
    return {"gmacs": total["gmacs"], "backbone_gmacs": backbone["gmacs"], "linear_gmacs": total["linear_gmacs"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--name", required=True, help="results file name (without .json)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<name>)")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="only score an existing run folder")
    args = parser.parse_args(argv)

    cfg = load_config(ExperimentConfig, resolve_config_path(args.config), args.set)
    out = args.out or Path("runs") / args.name
    start = time.perf_counter()
    summary = None
    if not args.skip_train:
        summary = train_experiment(cfg, out=out, resume=args.resume, overwrite=not args.resume)
    train_time = time.perf_counter() - start
    if summary is None and (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
    test = evaluate_checkpoint(cfg, out / MODEL_FILE, subset="test")
    val = evaluate_checkpoint(cfg, out / MODEL_FILE, subset="val")
    model, _ = load_detector(out / MODEL_FILE)
    annotations = load_experiment_annotations(cfg.data)
    source = make_source(cfg.data, annotations)
    channels = input_channels(cfg.data, annotations, source)
    record = {
        "name": args.name,
        "config": str(args.config),
        "average_mAP": test["average_mAP"],
        **{k: v for k, v in test.items() if k.startswith("mAP@")},
        "val_average_mAP": val["average_mAP"],
        "blocks": model.backbone.depth,
        **window_macs(model, cfg, channels),
        "params": count_params(model)["total"],
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "best_epoch": summary.get("best_epoch") if summary else None,
        "train_wall_time_s": round(summary.get("wall_time_s", train_time), 1) if summary else None,
        "train_threads": summary.get("threads", cfg.train.threads) if summary else cfg.train.threads,
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "data": data_fingerprint(cfg.data, annotations, source),  # what the figures were scored on
        "software": software_versions(cfg.data.kind == "video"),
        "command": "python benchmarks/teacher.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", record)
    keys = [k for k in record if k.startswith("mAP@")] + ["average_mAP"]
    print("| " + " | ".join(["model", "blocks", "GMACs"] + keys) + " |")
    print("|" + "---|" * (3 + len(keys)))
    print("| " + " | ".join([args.name, str(record["blocks"]), f"{record['gmacs']:.3f}"]
                            + [f"{record[k]:.2f}" for k in keys]) + " |")
    print(f"{args.name}: test average mAP {record['average_mAP']:.2f} with {record['blocks']} blocks, "
          f"{record['gmacs']:.3f} GMACs per window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
