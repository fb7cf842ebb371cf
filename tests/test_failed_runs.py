"""Runs that fail: an --overwrite that fails at any moment before its new run has finished puts the
previous run back byte for byte (the bad-input suite's style: one error line, the exit code, no
traceback, every file of both runs hashed before and after, nothing left beside them).

The moments: before the new run's first saved state, after its first epoch, and in the last step
of a compress run (its alignment, and the report, the run's very last write). Failures that no
config can place at a chosen epoch are injected into the real code: the loss turns non-finite once
N resumable states were saved (the real TrainingError path), a Ctrl-C, a full disk at the report.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blockdrop.cli import main
from blockdrop.core.config import load_config
from blockdrop.core.fileio import disk_full, is_temporary
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes.train import train_experiment

from conftest import tiny_config

torch.set_num_threads(1)
COMPRESS = ["backbone.depth=3", "compress.stopping.max_blocks=2", "compress.selection.block_metric=average_mAP",
            "compress.alignment.train.epochs=2", "compress.alignment.train.warmup_epochs=0",
            "compress.alignment.train.ema_decay=0", "compress.latency_threads=1"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished training run (the teacher), a finished two-step compression run, a link to each."""
    root = tmp_path_factory.mktemp("failed")
    config = tiny_config(root, epochs=1, threads=1)
    train_experiment(load_config(ExperimentConfig, config, ["backbone.depth=3"]), out=root / "teacher", progress=False)
    teacher = root / "teacher" / "model.safetensors"
    assert main(["compress", str(config), *sets(*COMPRESS), "--teacher", str(teacher), "--out", str(root / "compressed"),
                 "--quiet"]) == 0
    for name in ("teacher", "compressed"):
        (root / f"{name}_link").symlink_to(root / name)
    return {"root": root, "config": config, "teacher": teacher}


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train(w, out: str, *items: str) -> list[str]:
    return ["train", str(w["config"]), *sets("backbone.depth=3", *items), "--out", str(w["root"] / out), "--overwrite",
            "--quiet"]


def compress(w, out: str, *items: str) -> list[str]:
    return ["compress", str(w["config"]), *sets(*COMPRESS, *items), "--teacher", str(w["teacher"]), "--out",
            str(w["root"] / out), "--overwrite", "--quiet"]


def fail_after_states(states: int, failure: str = "diverge"):
    """Once ``states`` resumable states were saved, the next training step fails: 'diverge' turns
    the loss non-finite (the real TrainingError path), 'interrupt' is a Ctrl-C."""
    def inject(monkeypatch):
        import blockdrop.core.training as training

        saved, real_save, real_step = [], training._save_state, training._train_step

        def save(*args, **kwargs):
            real_save(*args, **kwargs)
            saved.append(1)

        def step(model, loss_fn, *args, **kwargs):
            if len(saved) >= states:
                if failure == "interrupt":
                    raise KeyboardInterrupt
                nan_loss = lambda m, b: {k: v * float("nan") for k, v in loss_fn(m, b).items()}  # noqa: E731
                return real_step(model, nan_loss, *args, **kwargs)
            return real_step(model, loss_fn, *args, **kwargs)

        monkeypatch.setattr(training, "_save_state", save)
        monkeypatch.setattr(training, "_train_step", step)
    return inject


def disk_full_at_the_report(monkeypatch):
    def full(path, text):
        raise disk_full(Path(path), len(text.encode()))
    monkeypatch.setattr("blockdrop.recipes.report.atomic_write_text", full)


# (name, argv, failure injected or None, exit code, regex of the one error line)
ROWS = [
    ("train: before the first state", lambda w: train(w, "teacher", "train.lr=1e30", "train.grad_clip=0"), None, 2,
     r"loss term went non-finite at epoch 1, step \d+ .*no epoch had completed"),
    ("train: after the first epoch", lambda w: train(w, "teacher", "train.epochs=2"), fail_after_states(1), 2,
     r"went non-finite at epoch 2, step 1 .*the weights of epoch 1 are restored"),
    ("train: Ctrl-C after the first epoch", lambda w: train(w, "teacher", "train.epochs=3"),
     fail_after_states(2, "interrupt"), 130, r"^blockdrop: interrupted$"),
    ("train through a link: after the first epoch", lambda w: train(w, "teacher_link", "train.epochs=2"),
     fail_after_states(1), 2, r"went non-finite at epoch 2"),
    ("compress through a link: before the first state",
     lambda w: compress(w, "compressed_link", "compress.alignment.train.lr=1e30", "compress.alignment.train.grad_clip=0"),
     None, 2, r"went non-finite at epoch 1, step \d+ .*no epoch had completed.*lower compress.alignment.train.lr"),
    ("compress: in its last step's alignment", lambda w: compress(w, "compressed", "compress.alignment.train.seed=1"),
     fail_after_states(3), 2, r"went non-finite at epoch 2, step 1 .*epoch 1 are restored.*compress.alignment.train"),
    ("compress: at its report, the last write", lambda w: compress(w, "compressed", "compress.alignment.train.seed=1"),
     disk_full_at_the_report, 2, r"compressed: no space left on its disk for report.md \(needs [\d.]+ KiB"),
]


@pytest.mark.parametrize("name,argv,inject,code,pattern", ROWS, ids=[r[0] for r in ROWS])
def test_a_failed_overwrite_puts_the_previous_run_back(world, capsys, monkeypatch, name, argv, inject, code, pattern):
    runs = [world["root"] / "teacher", world["root"] / "compressed"]
    before = [digest(run) for run in runs]
    if inject is not None:
        inject(monkeypatch)
    assert main(argv(world)) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and re.search(pattern, lines[0]), err
    assert [digest(run) for run in runs] == before, name
    beside = [p.name for p in world["root"].iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert beside == [], beside
    assert all(os.readlink(world["root"] / f"{r.name}_link") == str(r) for r in runs)


def test_a_report_killed_mid_write_leaves_only_what_the_next_start_removes(world):
    run = world["root"] / "compressed"
    code = textwrap.dedent(f"""
        import contextlib, os, signal
        import blockdrop.recipes.report as report
        real = report.atomic_path
        @contextlib.contextmanager
        def dying(path, *args, **kwargs):  # SIGTERM with the first figure written to its temporary
            with real(path, *args, **kwargs) as tmp:
                yield tmp
                os.kill(os.getpid(), signal.SIGTERM)
        report.atomic_path = dying
        from blockdrop.cli import main
        main(["report", {str(run)!r}])
    """)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGTERM, killed.stderr[-2000:]
    left = [p for p in run.iterdir() if p.name.startswith(".report")]
    assert len(left) == 1 and left[0].suffix == ".png" and is_temporary(left[0]), left
    argv = compress(world, "compressed")
    assert main([a for a in argv if a != "--overwrite"] + ["--resume"]) == 0  # the next start cleans up
    assert not [p for p in run.rglob("*") if is_temporary(p)]
