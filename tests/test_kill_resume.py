"""A real `blockdrop compress` process SIGKILLed at four points, then resumed: the final kept
blocks, metrics, tensors and file bytes equal an uninterrupted run's.

The kill is injected by a wrapper that patches one function of the real code in the child process
and then runs the CLI: during block selection (inside the shared-prefix pass), during alignment
(inside a training step of epoch 2), during a checkpoint write (the step's model.safetensors half
written to its temporary file), and between steps (right after step 1 is recorded).
"""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from blockdrop.compress.history import History
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes.train import train_experiment

from conftest import tiny_config

SETS = ["backbone.depth=4", "compress.stopping.max_blocks=2", "compress.selection.block_metric=average_mAP",
        "compress.alignment.train.epochs=2", "compress.alignment.train.batch_size=2",
        "compress.alignment.train.eval_every=1", "compress.alignment.train.ema_decay=0.5",
        "compress.latency_threads=1", "compress.alignment.train.threads=1"]

KILLS = {
    "selection": """
        import blockdrop.compress.selection as m
        real = m._shared_prefix_batch
        calls = []
        def patched(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                kill()
            return real(*args, **kwargs)
        m._shared_prefix_batch = patched
    """,
    "alignment": """
        import blockdrop.core.training as m
        real = m._train_step
        calls = []
        def patched(*args, **kwargs):
            calls.append(1)
            if len(calls) == 8:  # epoch 2 of step 1 (5 steps an epoch)
                kill()
            return real(*args, **kwargs)
        m._train_step = patched
    """,
    "checkpoint_write": """
        import safetensors.torch as m
        real = m.save_file
        def patched(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:  # the temporary file is half written when the kill lands
                f.truncate(os.path.getsize(filename) // 2)
            kill()
        m.save_file = patched
    """,
    "between_steps": """
        import blockdrop.compress.history as m
        real = m.History.save
        def patched(self, path):
            real(self, path)
            if len(self.steps) == 1:
                kill()
        m.History.save = patched
    """,
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    config = tiny_config(tmp, epochs=1, threads=1)
    train_experiment(load_config(ExperimentConfig, config, ["backbone.depth=4"]), out=tmp / "teacher", progress=False)
    return config, tmp / "teacher" / "model.safetensors"


def compress(config, teacher_path, out, *, resume=False, kill: str | None = None) -> subprocess.CompletedProcess:
    argv = ["compress", str(config), "--teacher", str(teacher_path), "--out", str(out), "--quiet"]
    argv += [a for s in SETS for a in ("--set", s)] + (["--resume"] if resume else [])
    code = "\n".join(["import os, signal",
                      "def kill():",
                      "    os.kill(os.getpid(), signal.SIGKILL)",
                      textwrap.dedent(KILLS[kill]) if kill else "",
                      "from blockdrop.cli import main",
                      f"raise SystemExit(main({argv!r}))"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    config, teacher_path = teacher
    out = tmp_path_factory.mktemp("reference") / "run"
    run = compress(config, teacher_path, out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def outcome(out) -> dict:
    history = History.load(out / "history.json")
    return {"kept": [s.kept_blocks for s in history.steps], "dropped": [s.dropped_original for s in history.steps],
            "val": [s.val for s in history.steps], "val_before": [s.align.val_before for s in history.steps],
            "scores": [s.selection.scores for s in history.steps],
            "losses": [[{k: v for k, v in e.items() if k.startswith(("loss/", "val/"))} for e in s.align.epochs]
                       for s in history.steps], "stopped": history.stopped, "teacher": history.teacher.val}


@pytest.mark.parametrize("point", list(KILLS))
def test_a_kill_then_resume_equals_an_uninterrupted_run(teacher, reference, tmp_path, point):
    config, teacher_path = teacher
    out = tmp_path / "run"
    killed = compress(config, teacher_path, out, kill=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = compress(config, teacher_path, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outcome(out) == outcome(reference)
    for name in ("step_01/model.safetensors", "step_02/model.safetensors", "model.safetensors"):
        ours, theirs = load_file(out / name), load_file(reference / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        # the bytes too: the header is written in a fixed order
        assert hashlib.sha256((out / name).read_bytes()).digest() == hashlib.sha256((reference / name).read_bytes()).digest()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
