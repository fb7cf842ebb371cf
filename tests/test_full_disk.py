"""Real `blockdrop train` and `compress` runs on a size-limited filesystem (a small tmpfs mounted in
a private mount namespace with `unshare`; skipped where that is not allowed).

Each row is a sequence of commands run one after another on the same small disk; before each, the
disk is filled to leave a chosen number of bytes free (sized from an uninterrupted reference run's
files, so the failure lands where the row says). Every command that runs out of space must end
with one line naming the folder and the space needed, exit code 2 and no traceback; the records
(metrics.jsonl, history.json) must then agree with the last saved state, no temporary file may be
left, a previous run set aside by --overwrite must be back byte for byte, and once space is freed
a --resume must finish with exactly the uninterrupted run's results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockdrop.compress.history import History
from blockdrop.core.fileio import is_temporary

from conftest import tiny_config

COMPRESS = ["backbone.depth=3", "compress.stopping.max_blocks=2", "compress.selection.block_metric=average_mAP",
            "compress.alignment.train.epochs=2", "compress.alignment.train.warmup_epochs=0",
            "compress.alignment.train.ema_decay=0", "compress.latency_threads=1", "compress.alignment.train.threads=1"]
TRAIN = ["backbone.depth=3", "train.epochs=2", "train.threads=1"]
DISK_MB = 24
FULL = re.compile(r"^blockdrop: error: (?P<folder>\S+): no space left on its disk for (?P<file>\S+) "
                  r"\(needs (?P<needed>[\d.]+ \w+), [\d.]+ \w+ free\); free some space")

# The child: fill the disk to leave each command's budget free, run it, keep a copy of the disk.
DRIVER = """
import json, os, shutil, subprocess, sys
from pathlib import Path
disk, report, plan = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
results = []
for i, (argv, free) in enumerate(plan):
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    if free is not None:
        st = os.statvfs(disk)
        with open(filler, "wb") as f:
            f.write(bytes(max(0, st.f_bavail * st.f_frsize - free)))
    done = subprocess.run([sys.executable, "-m", "blockdrop", *argv], capture_output=True, text=True, env=env)
    results.append({"rc": done.returncode, "stderr": done.stderr})
    copy = report / f"after_{i}"
    copy.mkdir()
    for entry in disk.iterdir():
        if entry.name != "filler":
            (shutil.copytree(entry, copy / entry.name, symlinks=True) if entry.is_dir()
             else shutil.copy2(entry, copy / entry.name))
(report / "results.json").write_text(json.dumps(results))
"""


def _can_mount(tmp: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {shlex.quote(str(tmp))}"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def on_small_disk(tmp: Path, plan: list[tuple[list[str], int | None]]) -> tuple[list[dict], Path]:
    """Run ``plan`` (argv, bytes left free or None) on a fresh tmpfs; (results, folder of copies)."""
    disk, report = tmp / "disk", tmp / "report"
    disk.mkdir()
    report.mkdir()
    script = (f"mount -t tmpfs -o size={DISK_MB}m blockdrop-test {shlex.quote(str(disk))} && exec "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(DRIVER)} {shlex.quote(str(disk))} "
              f"{shlex.quote(str(report))} {shlex.quote(json.dumps(plan))}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((report / "results.json").read_text()), report


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def size(path: Path) -> int:
    return path.stat().st_size


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The dataset, a teacher, and uninterrupted reference runs of the commands the rows run."""
    root = tmp_path_factory.mktemp("disk")
    reason = _can_mount(root)
    if reason:
        pytest.skip(reason)
    config = tiny_config(root, epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def cli(*argv: str) -> None:
        done = subprocess.run([sys.executable, "-m", "blockdrop", *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    cli("train", str(config), *sets(TRAIN), "--out", str(root / "teacher"), "--quiet")
    teacher = root / "teacher" / "model.safetensors"
    cli("compress", str(config), *sets(COMPRESS), "--teacher", str(teacher), "--out", str(root / "compressed"), "--quiet")
    return {"root": root, "config": config, "teacher": teacher}


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def train_argv(w, *flags: str) -> list[str]:
    return ["train", str(w["config"]), *sets(TRAIN), "--out", "RUN", "--quiet", *flags]


def compress_argv(w, *flags: str) -> list[str]:
    return ["compress", str(w["config"]), *sets(COMPRESS), "--teacher", str(w["teacher"]), "--out", "RUN", "--quiet",
            *flags]


def step_two_budget(w) -> int:
    """Room for step 1 whole and step 2's first alignment epoch, not for its second epoch's state."""
    ref = w["root"] / "compressed"
    step_one = sum(size(p) for p in (ref / "step_01").rglob("*") if p.is_file())
    state = size(ref / "step_02" / "align" / "train_state.pt")
    small = sum(size(ref / n) for n in ("history.json", "config.yaml", "run.json"))
    return step_one + small + size(ref / "step_02" / "align" / "align_best.pt") + state + state // 2


def half_a_state(w) -> int:
    """Room for step 2's metrics and a new best, not for its next state (a resume on a full disk)."""
    return size(w["root"] / "compressed" / "step_02" / "align" / "train_state.pt") // 2


def epoch_two_budget(w) -> int:
    """Room for a training run's first epoch (model and state), not for its second epoch's state."""
    ref = w["root"] / "teacher"
    state = size(ref / "train_state.pt")
    return 2 * size(ref / "model.safetensors") + state + state // 2


# (name, [(argv, free bytes or None: no limit, what is expected)], the run to compare the end with)
# expected: "full" (the disk-full error), "ok"; "restored": full, and the folder as after the step before
ROWS = [
    ("compress fails in its last step, resumes on the full disk, then with space",
     lambda w: [(compress_argv(w), step_two_budget(w), "full"),
                (compress_argv(w, "--resume"), half_a_state(w), "full"),
                (compress_argv(w, "--resume"), None, "ok")], "compressed"),
    ("train --overwrite fails after its first epoch: the previous run comes back",
     lambda w: [(train_argv(w), None, "ok"),
                (train_argv(w, "--overwrite", "--set", "train.seed=1"), epoch_two_budget(w), "restored"),
                (train_argv(w, "--resume"), None, "ok")], "teacher"),
]


def check_records(run: Path) -> None:
    """metrics.jsonl has exactly the epochs of its train_state.pt; history.json's steps all have
    their model; no temporary file is left."""
    assert not [p for p in run.rglob("*") if is_temporary(p)]
    for metrics in run.rglob("metrics.jsonl"):
        epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
        state_path = metrics.parent / "train_state.pt"
        trained = []
        if state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            trained = [r["epoch"] for r in json.loads(state["history"])]
            assert trained == list(range(1, state["epoch"] + 1))
        assert [e for e in epochs if e > 0] == trained, metrics
    if (run / "history.json").exists():
        history = History.load(run / "history.json")
        assert all((run / f"step_{s.step:02d}" / "model.safetensors").exists() for s in history.steps)


def outcome(run: Path) -> dict:
    if (run / "history.json").exists():
        history = History.load(run / "history.json")
        return {"kept": [s.kept_blocks for s in history.steps], "val": [s.val for s in history.steps],
                "stopped": history.stopped, "model": digest(run)["model.safetensors"]}
    return {"metrics": [{k: v for k, v in json.loads(line).items() if "time" not in k}
                        for line in (run / "metrics.jsonl").read_text().splitlines()],
            "model": digest(run)["model.safetensors"]}


@pytest.mark.parametrize("name,plan,reference", ROWS, ids=[r[0] for r in ROWS])
def test_a_full_disk_is_one_line_and_loses_nothing(world, tmp_path, name, plan, reference):
    steps = plan(world)
    disk = tmp_path / "disk"
    argvs = [([str(disk / "run") if a == "RUN" else a for a in argv], free) for argv, free, _ in steps]
    results, report = on_small_disk(tmp_path, argvs)
    for i, ((*_, expected), result) in enumerate(zip(steps, results)):
        err, after = result["stderr"], report / f"after_{i}" / "run"
        if expected == "ok":
            assert result["rc"] == 0, (i, err[-3000:])
            check_records(after)
            continue
        lines = err.strip().splitlines()
        assert result["rc"] == 2 and len(lines) == 1 and "Traceback" not in err, (i, err[-3000:])
        match = FULL.match(lines[0])
        assert match and match["folder"].startswith(str(disk / "run")), lines[0]
        check_records(after)
        if expected == "restored":
            assert digest(after) == digest(report / f"after_{i - 1}" / "run")
        assert not list((report / f"after_{i}").glob(".*previous*"))
    assert outcome(report / f"after_{len(steps) - 1}" / "run") == outcome(world["root"] / reference)
