"""Run folders: one run per folder, never destroying the previous one, resuming only the same run.

A run folder holds config.yaml (as resolved), run.json (what the run is tied to: the teacher's
SHA-256, the command), the run's records and model.safetensors. Rules:

- **One run per folder.** ``.<name>.lock`` beside the folder is held (``fcntl.flock``) for the
  whole run; a second run is refused with a message naming the holder. The kernel releases the
  lock of a dead process, so a lock file left by a killed run is stale and is taken over.
- **A folder with a run is written only with --resume (continue) or --overwrite (start over).**
  A folder holding only what a failed start leaves (config.yaml, run.json, temporary files) is
  not a run and is reused.
- **--overwrite never destroys the previous run before the new one exists.** The previous run
  is moved aside to ``.<name>.previous`` and deleted only once the new run has saved its first
  resumable state (``RunFolder.commit``); a failure before that puts it back. If the process is
  killed before that, the next start puts it back.
- **--resume checks what it resumes.** The config must equal the run's config.yaml in every key
  that changes results (the stopping rules, paths and worker counts may change), and the teacher
  must be the same file; otherwise the differing keys are named, unless ``allow_changes``.
  config.yaml is never overwritten silently: an allowed change keeps the old one beside it.
- Leftover temporary files of interrupted atomic writes are removed at every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

from blockdrop.core import distributed as dist
from blockdrop.core.config import save_config, to_dict
from blockdrop.core.errors import ConfigError, RunFolderError
from blockdrop.core.fileio import write_json
from blockdrop.core.schema import ExperimentConfig

MODEL_FILE = "model.safetensors"
NOT_A_RUN = {"config.yaml", "run.json"}  # what a start writes before the run has any state
TRAIN_SECTIONS = ("data", "backbone", "head", "train", "eval")  # what a training run's results depend on
COMPRESS_SECTIONS = TRAIN_SECTIONS + ("compress",)
# keys that may change on --resume: they do not change what the run computes
RESUMABLE_CHANGES = ("output", "data.num_workers", "data.cache_dir", "data.obtain", "compress.teacher",
                     "compress.stopping.")


def _is_temporary(path: Path) -> bool:
    """Atomic writes' temporaries: `.<name>.<random>.tmp` files and `.<name>.tmp-<random>` folders
    (core/fileio.py), and the fixed `<name>.tmp` of the first releases."""
    return path.name.endswith(".tmp") or (path.name.startswith(".") and ".tmp-" in path.name)


def holds_a_run(out: Path) -> bool:
    """Whether ``out`` holds anything beyond what a failed start leaves behind."""
    return out.is_dir() and any(p.name not in NOT_A_RUN and not _is_temporary(p) for p in out.iterdir())


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files and folders of interrupted atomic writes under ``out``."""
    found = [p for p in out.rglob("*") if _is_temporary(p)] if out.is_dir() else []
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return found


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(before: dict, after: dict, sections: tuple[str, ...]) -> list[str]:
    """``key (old -> new)`` for every key of ``sections`` that differs and changes results."""
    a, b = flatten(before), flatten(after)
    keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] in sections and a.get(k) != b.get(k)
                  and not any(k == allowed or (allowed.endswith(".") and k.startswith(allowed))
                              for allowed in RESUMABLE_CHANGES))
    return [f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})" for k in keys]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RunFolder:
    """The run folder of one `train` or `compress` run (rank 0 does the file work)."""

    def __init__(self, out: Path, *, resume: bool, overwrite: bool, sections: tuple[str, ...],
                 identity: dict | None = None, allow_changes: bool = False):
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.sections, self.identity, self.allow_changes = sections, dict(identity or {}), allow_changes
        self.lock_path = self.out.parent / f".{self.out.name}.lock"
        self.previous = self.out.parent / f".{self.out.name}.previous"
        self.created, self.prepared, self.committed, self._lock = False, False, False, None

    # ---- opening ---------------------------------------------------------------------------------

    def open(self, cfg: ExperimentConfig) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: exists and is not a folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._restore_interrupted_overwrite()
        clean_temporaries(self.out)
        if self.resume and holds_a_run(self.out):
            self._check_resume(cfg)
            return
        if holds_a_run(self.out):
            if not self.overwrite:
                raise RunFolderError(f"{self.out}: output folder holds a run; pass --resume to continue it or "
                                     f"--overwrite to replace it")
            os.replace(self.out, self.previous)  # set aside, not deleted: restored if the new run fails
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepared = True  # from here on a failure is undone
        save_config(cfg, self.out / "config.yaml")
        write_json(self.out / "run.json", {**self.identity, "command": " ".join(sys.argv)})

    def _take_lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.out}: in use by {holder}; wait for it to finish or choose another "
                                 f"--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                     f"({' '.join(sys.argv)[:200]})".encode())
        self._lock = fd

    def _restore_interrupted_overwrite(self) -> None:
        """An --overwrite killed before its first state: the previous run comes back."""
        if not self.previous.exists():
            return
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.previous, self.out)
        print(f"blockdrop: restored {self.out}: an interrupted --overwrite had set it aside", file=sys.stderr)

    def _check_resume(self, cfg: ExperimentConfig) -> None:
        path = self.out / "config.yaml"
        try:
            recorded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RunFolderError(f"{path}: cannot read the run's config ({err}); it cannot be resumed safely") from None
        changes = config_changes(recorded, to_dict(cfg), self.sections)
        recorded_identity = self._recorded_identity()
        changes += [f"{k} ({recorded_identity.get(k)} -> {v})" for k, v in self.identity.items()
                    if k in recorded_identity and recorded_identity[k] != v]
        if changes and not self.allow_changes:
            raise RunFolderError(f"--resume {self.out}: the run was made with other settings: {'; '.join(changes)}; "
                                 f"a resume would mix two setups: use another --out, or pass "
                                 f"--allow-config-change to go on anyway")
        if changes:  # allowed: keep what the run was started with beside the new config
            number = len(list(self.out.glob("config.before-resume-*.yaml"))) + 1
            shutil.copyfile(path, self.out / f"config.before-resume-{number}.yaml")
            save_config(cfg, path)
            write_json(self.out / "run.json", {**recorded_identity, **self.identity,
                                               "command": " ".join(sys.argv)})

    def _recorded_identity(self) -> dict:
        path = self.out / "run.json"
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            return {}

    # ---- closing ---------------------------------------------------------------------------------

    def commit(self) -> None:
        """The new run has resumable state: the run an --overwrite set aside is deleted now."""
        if not self.committed:
            self.committed = True
            if self.previous.exists():
                shutil.rmtree(self.previous)

    def close(self, failed: bool) -> None:
        try:
            if failed and not self.committed:
                self._undo()
        finally:
            if self._lock is not None:
                os.close(self._lock)  # releases the flock
                self._lock = None

    def _undo(self) -> None:
        """A run that failed before any state: leave the folder as it was found."""
        if not self.prepared:
            return
        if self.previous.exists():
            shutil.rmtree(self.out, ignore_errors=True)
            os.replace(self.previous, self.out)
        elif self.created and not holds_a_run(self.out):
            shutil.rmtree(self.out, ignore_errors=True)
        elif not self.resume and not holds_a_run(self.out):
            for name in NOT_A_RUN:
                (self.out / name).unlink(missing_ok=True)


@contextlib.contextmanager
def run_folder(cfg: ExperimentConfig, out: Path, *, resume: bool, overwrite: bool, sections: tuple[str, ...],
               identity: dict | None = None, allow_changes: bool = False):
    """Hold the run folder for the block (rank 0 does the file work; every rank gets rank 0's
    refusal). A failure before the run's first resumable state leaves the folder as it was."""
    folder = RunFolder(out, resume=resume, overwrite=overwrite, sections=sections, identity=identity,
                       allow_changes=allow_changes)
    problem = dist.main_result(lambda: _open(folder, cfg))
    if problem is not None:  # every rank stops with rank 0's reason
        raise problem
    failed = True
    try:
        yield folder
        failed = False
    finally:
        if dist.is_main():
            folder.close(failed)


def _open(folder: RunFolder, cfg: ExperimentConfig) -> Exception | None:
    try:
        folder.open(cfg)
    except (ConfigError, RunFolderError, OSError) as err:
        folder.close(failed=True)
        return err
    return None
