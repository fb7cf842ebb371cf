"""Run folders: the lock, a resume that checks what it resumes, an --overwrite that never loses
the previous run, failed starts that leave nothing behind, and temporary files cleaned up."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blockdrop.cli import main
from blockdrop.core.config import load_config
from blockdrop.core.errors import ConfigError, RunFolderError
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes.runs import COMPRESS_RUN, TRAIN_RUN, RunFolder, config_changes, holds_a_run
from blockdrop.recipes.train import train_experiment

from conftest import tiny_config

torch.set_num_threads(1)


def digest(folder: Path) -> dict:
    """Every file of a folder, by content: the test's "exactly as it was"."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    cfg = load_config(ExperimentConfig, config)
    train_experiment(cfg, progress=False)
    return config, tmp_path / "run"


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1)
    code = "\n".join([
        "import pathlib, time",
        "from blockdrop.recipes.runs import RunFolder, TRAIN_RUN",
        f"folder = RunFolder(pathlib.Path({str(tmp_path / 'run')!r}), resume=False, overwrite=False, kind=TRAIN_RUN)",
        "folder._take_lock()",
        "print('locked', flush=True)",
        "time.sleep(60)"])
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", str(config), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {holder.pid} on" in err[0] and "choose another --out" in err[0]
        assert not (tmp_path / "run").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file is stale and the next run takes it over
    assert (tmp_path / ".run.lock").exists()
    assert main(["train", str(config), "--quiet"]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_resume_refuses_a_changed_config_and_names_the_keys(trained, capsys):
    config, run = trained
    before = digest(run)
    assert main(["train", str(config), "--resume", "--set", "train.lr=0.5", "--set", "backbone.heads=1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "backbone.heads (2 -> 1)" in err and "train.lr (0.001 -> 0.5)" in err and "--allow-config-change" in err
    assert digest(run) == before  # config.yaml not rewritten, nothing touched
    # a stopping rule or a path may change; an allowed change keeps the old config beside the new
    assert not config_changes({"compress": {"stopping": {"max_blocks": 1}}, "output": "a"},
                              {"compress": {"stopping": {"max_blocks": 3}}, "output": "b"}, ("compress", "output"))
    assert main(["train", str(config), "--resume", "--set", "train.epochs=2", "--allow-config-change",
                 "--quiet"]) == 0
    assert (run / "config.before-resume-1.yaml").exists()
    assert "epochs: 2" in (run / "config.yaml").read_text()


def test_resume_refuses_another_teacher(tmp_path):
    folder = RunFolder(tmp_path / "c", resume=False, overwrite=False, kind=COMPRESS_RUN,
                       identity={"teacher_sha256": "aaa"})
    cfg = load_config(ExperimentConfig, tiny_config(tmp_path))
    folder.open(cfg)
    (tmp_path / "c" / "history.json").write_text("{}")  # the run has state
    folder.close(failed=False)
    again = RunFolder(tmp_path / "c", resume=True, overwrite=False, kind=COMPRESS_RUN,
                      identity={"teacher_sha256": "bbb"})
    with pytest.raises(RunFolderError, match=r"teacher_sha256 \(aaa -> bbb\)"):
        again.open(cfg)
    again.close(failed=True)
    assert (tmp_path / "c" / "history.json").exists()


def test_an_overwrite_killed_before_its_first_state_is_undone_at_the_next_start(trained):
    config, run = trained
    before = digest(run)
    code = textwrap.dedent(f"""
        import os, signal
        import blockdrop.core.training as training
        real = training.fit
        def fit(*args, **kwargs):  # the kill lands before the first epoch's state is saved
            os.kill(os.getpid(), signal.SIGKILL)
        training.fit = fit
        import blockdrop.recipes.train as recipe
        recipe.fit = fit
        from blockdrop.cli import main
        main(["train", {str(config)!r}, "--overwrite", "--quiet"])
    """)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    assert (run.parent / ".run.previous").exists() and digest(run.parent / ".run.previous") == before
    # the next start of any kind puts the previous run back first
    assert main(["train", str(config), "--resume", "--quiet"]) == 0
    assert not (run.parent / ".run.previous").exists()
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


def test_a_failed_start_leaves_no_folder_that_blocks_a_plain_rerun(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    assert main(["train", str(config), "--set", "train.lr=1e30", "--set", "train.grad_clip=0", "--quiet"]) == 2
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("left by a start that was killed\n")
    assert not holds_a_run(tmp_path / "run")
    assert main(["train", str(config), "--quiet"]) == 0  # reused: it held no run


def test_leftover_temporary_files_are_removed_at_the_next_start(trained):
    config, run = trained
    for name in (".model.safetensors.abc123.tmp", "align_best.pt.tmp", ".metrics.jsonl.x.tmp"):
        (run / name).write_bytes(b"half")
    (run / "step_01").mkdir()
    (run / "step_01" / ".model.safetensors.zz.tmp").write_bytes(b"half")
    assert main(["train", str(config), "--resume", "--quiet"]) == 0
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_outputs_are_written_with_ordinary_permissions(trained):
    _, run = trained
    umask = os.umask(0)
    os.umask(umask)
    for path in run.iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# ---- issue 25: the previous run comes back until the new one has finished ---------------------------

def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.")
                  and not p.name.endswith(".lock"))


def test_an_overwrite_killed_after_its_first_epoch_is_undone_at_the_next_start(trained, capsys):
    config, run = trained
    before = digest(run)
    code = textwrap.dedent(f"""
        import os, signal
        import blockdrop.core.training as training
        real, saved = training._save_state, []
        def save(*args, **kwargs):  # the kill lands after the new run saved its first state
            real(*args, **kwargs)
            saved.append(1)
            if len(saved) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        training._save_state = save
        from blockdrop.cli import main
        main(["train", {str(config)!r}, "--overwrite", "--set", "train.epochs=3", "--quiet"])
    """)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert digest(run.parent / ".run.previous") == before
    assert "epochs: 3" in (run / "config.yaml").read_text()  # the unfinished new run, two epochs in
    assert main(["train", str(config), "--quiet"]) == 2  # any start puts the previous run back first
    err = capsys.readouterr().err
    assert "restored" in err and "holds a run" in err
    assert digest(run) == before and leftovers(run) == []


def test_an_overwrite_through_a_link_replaces_the_real_folder_and_keeps_the_link(trained, capsys):
    config, run = trained
    link = run.parent / "link"
    link.symlink_to(run)
    assert main(["train", str(config), "--out", str(link), "--overwrite", "--set", "train.seed=1", "--quiet"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(run) and run.is_dir() and not run.is_symlink()
    assert "seed: 1" in (run / "config.yaml").read_text() and leftovers(run) == []
    assert json.loads((run / "run.json").read_text())["kind"] == "train"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        RunFolder(tmp_path / "run", kind=TRAIN_RUN, resume=True, overwrite=True)


def _drop_privileges() -> list[str] | None:
    """A prefix that runs a command without the power to write where permissions forbid it: as is for
    an ordinary user; for root, without the capabilities that override file permissions."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_a_read_only_previous_run_is_refused_before_anything_moves(trained):
    config, run = trained
    prefix = _drop_privileges()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    before = digest(run)
    for path in [run, *run.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "blockdrop", "train", str(config), "--overwrite",
                               "--quiet"], capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
        assert f"--overwrite {run}: {run} is read-only" in lines[0] and "make it writable" in lines[0]
        assert digest(run) == before and leftovers(run) == []
    finally:
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


# ---- issue 25: one lock per real folder, whatever its name ------------------------------------------

@pytest.mark.parametrize("first,second", [("run", "link"), ("link", "sub/../run")])
def test_two_names_of_one_folder_share_its_lock(tmp_path, capsys, first, second):
    config = tiny_config(tmp_path, epochs=1)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    (tmp_path / "sub").mkdir()
    code = textwrap.dedent(f"""
        import sys, time
        import blockdrop.recipes.train as recipe
        def fit(*args, **kwargs):  # the run holds its folder while it trains
            print("training", flush=True)
            time.sleep(120)
        recipe.fit = fit
        from blockdrop.cli import main
        sys.argv = ["blockdrop", "train", {str(config)!r}, "--out", {str(tmp_path / first)!r}, "--quiet"]
        main()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "training"
        before = digest(tmp_path / "run")
        assert main(["train", str(config), "--out", str(tmp_path / second), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tmp_path / second}: in use by pid {holder.pid} on " in err[0], err
        assert f"running on {tmp_path / 'run'}" in err[0] and f"--out {tmp_path / first}" in err[0], err
        assert digest(tmp_path / "run") == before  # the first run's folder untouched
    finally:
        holder.kill()
        holder.wait()



def test_a_lock_just_taken_is_refused_with_its_holder_named_not_a_blank(tmp_path):
    """Two starts at once: the second may find the lock before the first wrote who it is; it waits
    for that line instead of saying "another process"."""
    import fcntl
    import threading

    lock = tmp_path / ".run.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, its line not yet written
    writer = threading.Timer(0.3, lambda: os.write(fd, b"pid 4242 on host since now, running on x (blockdrop train)"))
    writer.start()
    try:
        with pytest.raises(RunFolderError, match=r"run: in use by pid 4242 on host .*\(blockdrop train\)"):
            RunFolder(tmp_path / "run", kind=TRAIN_RUN, resume=True, overwrite=False)._take_lock()
    finally:
        writer.join()
        os.close(fd)
