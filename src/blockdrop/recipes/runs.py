"""Run folders: what `train` and `compress` write, and how an existing one is treated.

A run folder holds config.yaml (as resolved), the run's records and model.safetensors. A folder
that holds anything is only written to with ``--resume`` (continue) or ``--overwrite`` (start over).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from blockdrop.core import distributed as dist
from blockdrop.core.config import save_config
from blockdrop.core.errors import ConfigError
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.annotations import Annotations
from blockdrop.recipes.build import load_experiment_annotations

MODEL_FILE = "model.safetensors"
RUN_FILES = ("metrics.jsonl", "train_state.pt", "history.json", MODEL_FILE, "summary.json", "report.md",
             "report.png")


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"{out}: output folder is not empty; pass --resume to continue or --overwrite to replace")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:  # the user asked to start over: clear what a previous run left
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for step in out.glob("step_*"):
            shutil.rmtree(step)


def start_run(cfg: ExperimentConfig, out: str | Path | None, *, resume: bool,
              overwrite: bool) -> tuple[Path, torch.device, Annotations]:
    """Join the process group, read the annotations (before the folder is touched: a missing
    dataset leaves nothing behind), prepare the run folder and record the config in it.
    Returns (run folder, this process's device, annotations)."""
    out = Path(out or cfg.output)
    device = dist.init_from_env()  # first: rank is only known once the process group is up
    annotations = load_experiment_annotations(cfg.data)
    if dist.is_main():
        prepare_output(out, resume, overwrite)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    return out, device, annotations
