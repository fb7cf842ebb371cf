"""Run folders: one run per folder, never destroying the previous one, resuming only the same run.

A run folder holds config.yaml (as resolved), run.json (what the run is: its kind, `train` or
`compress`, the teacher's SHA-256, the command), the run's records and model.safetensors. Rules:

- **One run per folder, whatever it is called.** The folder is the real one: a symbolic link or
  a `..` in ``--out`` is resolved first. ``.<name>.lock`` beside it is held (``fcntl.flock``) for
  the whole run; a second run is refused with a message naming the holder (process, host, start,
  command). The kernel releases the lock of a dead process, so a lock file left by a killed run
  is stale and is taken over.
- **A folder with a run is written only with --resume (continue) or --overwrite (start over)**,
  never both. A folder holding only what a failed start leaves (config.yaml, run.json, temporary
  files) is not a run and is reused.
- **--overwrite never destroys the previous run before the new one has finished.** The previous
  run is moved aside to ``.<name>.previous`` and deleted only when the new run ends without error;
  any failure before that, at any epoch or step, puts it back in place. If the process is killed,
  the next start puts it back (the unfinished new run is removed). A previous run that could not
  be deleted at the end (read-only) is refused before anything moves.
- **--resume checks what it resumes.** The run must be of the same kind (a `train` run is not
  continued by `compress`, nor the reverse). The config must equal the run's config.yaml in every
  key that changes results (the stopping rules, paths and worker counts may change), and the
  teacher must be the same file; otherwise the differing keys are named, unless ``allow_changes``.
  config.yaml is never overwritten silently: an allowed change keeps the old one beside it.
- Leftover temporary files of interrupted atomic writes are removed at every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from blockdrop.core import distributed as dist
from blockdrop.core.config import save_config, to_dict
from blockdrop.core.errors import BlockdropError, ConfigError, RunFolderError
from blockdrop.core.fileio import TEMP_MARK, new_temporary, is_temporary, load_state, write_json
from blockdrop.core.schema import ExperimentConfig

MODEL_FILE = "model.safetensors"
NOT_A_RUN = {"config.yaml", "run.json"}  # what a start writes before the run has any state
TRAIN_SECTIONS = ("data", "backbone", "head", "train", "eval")  # what a training run's results depend on
COMPRESS_SECTIONS = TRAIN_SECTIONS + ("compress",)
# keys that may change on --resume: they do not change what the run computes
RESUMABLE_CHANGES = ("output", "data.num_workers", "data.cache_dir", "data.obtain", "compress.teacher",
                     "compress.stopping.")
HOLDER_WAIT_S = 2.0  # a lock just taken may not hold its holder's line yet: wait this long for it


@dataclass(frozen=True)
class RunKind:
    """What a run folder holds: the command that makes it, the config sections its results depend
    on, and the files only it writes (to tell the kind of a run recorded before run.json named it)."""

    name: str
    sections: tuple[str, ...]
    marks: tuple[str, ...]


TRAIN_RUN = RunKind("train", TRAIN_SECTIONS, marks=("train_state.pt", "summary.json", "metrics.jsonl"))
COMPRESS_RUN = RunKind("compress", COMPRESS_SECTIONS, marks=("history.json",))
RUN_KINDS = (COMPRESS_RUN, TRAIN_RUN)  # in the order a folder's files are matched


def check_run_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                          "--overwrite replaces it; pass one")


def holds_a_run(out: Path) -> bool:
    """Whether ``out`` holds anything beyond what a failed start leaves behind."""
    return out.is_dir() and any(p.name not in NOT_A_RUN and not is_temporary(p) for p in out.iterdir())


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files and folders of interrupted atomic writes under ``out``."""
    found = [p for p in out.rglob("*") if is_temporary(p)] if out.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
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


def read_only_part(folder: Path) -> Path | None:
    """The first folder under ``folder`` (itself included) whose entries this process may not
    delete, or None: a run there could be set aside but never deleted."""
    for parent, _dirs, _files in os.walk(folder):
        if not os.access(parent, os.W_OK | os.X_OK):
            return Path(parent)
    return None


def _remove_aside(path: Path, label: str) -> None:
    """Rename ``path`` to a temporary name (the next start's clean-up finds it), then delete it."""
    aside = new_temporary(path.parent, f"{path.name[1:] if path.name.startswith('.') else path.name}.{label}",
                         folder=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        print(f"blockdrop: warning: could not delete all of {aside}; remove it by hand", file=sys.stderr)


class RunFolder:
    """The run folder of one `train` or `compress` run (rank 0 does the file work)."""

    def __init__(self, out: Path, *, kind: RunKind, resume: bool, overwrite: bool, identity: dict | None = None,
                 allow_changes: bool = False):
        check_run_flags(resume, overwrite)
        self.given = Path(out)  # as the user typed it: messages name it
        self.out = Path(os.path.realpath(self.given))  # the folder itself (links and '..' resolved)
        self.kind, self.resume, self.overwrite = kind, resume, overwrite
        self.identity, self.allow_changes = dict(identity or {}), allow_changes
        self.lock_path = self.out.parent / f".{self.out.name}.lock"
        self.previous = self.out.parent / f".{self.out.name}.previous"
        self.created, self.prepared, self.committed, self._lock = False, False, False, None
        self.continuing = False  # a --resume of a run the folder holds

    @property
    def sections(self) -> tuple[str, ...]:
        return self.kind.sections

    # ---- opening ---------------------------------------------------------------------------------

    def open(self, cfg: ExperimentConfig) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.given}: exists and is not a folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._clean_beside()
        self._restore_interrupted_overwrite()
        clean_temporaries(self.out)
        if self.resume and holds_a_run(self.out):
            self._check_kind()
            self._check_resume(cfg)
            self.continuing = True
            return
        if holds_a_run(self.out):
            self._set_aside()
        self.prepared = True  # from here on a failure is undone
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.yaml")
        write_json(self.out / "run.json", {"kind": self.kind.name, **self.identity, "command": " ".join(sys.argv)})

    def _set_aside(self) -> None:
        """--overwrite: the previous run moves aside (not deleted: it comes back if the new run fails)."""
        if not self.overwrite:
            raise RunFolderError(f"{self.given}: output folder holds a run; pass --resume to continue it or "
                                 f"--overwrite to replace it")
        stuck = read_only_part(self.out)
        if stuck is not None:
            raise RunFolderError(f"--overwrite {self.given}: {stuck} is read-only, so the previous run could not be "
                                 f"deleted once the new one finishes; make it writable or choose another --out")
        self.prepared = True
        os.replace(self.out, self.previous)

    def _take_lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(f"{self.given}: in use by {holder}; wait for it to finish or choose another "
                                 f"--out") from None
        os.ftruncate(fd, 0)
        alias = f" as {self.given}" if str(self.given) != str(self.out) else ""
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                     f"running on {self.out}{alias} ({' '.join(sys.argv)[:300]})".encode())
        self._lock = fd

    def _clean_beside(self) -> None:
        """Folders an interrupted deletion left beside the run folder (see `_remove_aside`)."""
        for path in self.out.parent.iterdir():
            if path.name.startswith(f".{self.out.name}.") and TEMP_MARK in path.name and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def _restore_interrupted_overwrite(self) -> None:
        """An --overwrite killed before its new run finished: the previous run comes back."""
        if not self.previous.exists():
            return
        self._put_back()
        print(f"blockdrop: restored {self.given}: an --overwrite was interrupted before its new run finished, so "
              f"the previous run is back (the unfinished new one was removed)", file=sys.stderr)

    def _put_back(self) -> None:
        if self.out.exists() or self.out.is_symlink():
            _remove_aside(self.out, "unfinished")
        os.replace(self.previous, self.out)

    def _recorded_kind(self) -> RunKind | None:
        recorded = self._recorded_identity().get("kind")
        if recorded is not None:
            return next((k for k in RUN_KINDS if k.name == recorded), None)
        return next((k for k in RUN_KINDS if any((self.out / m).exists() for m in k.marks)), None)

    def _check_kind(self) -> None:
        recorded = self._recorded_kind()
        if recorded is not None and recorded != self.kind:
            raise RunFolderError(f"--resume {self.given}: the folder holds a {recorded.name} run, and "
                                 f"`blockdrop {self.kind.name}` would write a {self.kind.name} run over it; continue "
                                 f"it with `blockdrop {recorded.name} --resume`, or choose another --out")

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
            raise RunFolderError(f"--resume {self.given}: the run was made with other settings: "
                                 f"{'; '.join(changes)}; a resume would mix two setups: use another --out, or pass "
                                 f"--allow-config-change to go on anyway")
        if changes:  # allowed: keep what the run was started with beside the new config
            number = len(list(self.out.glob("config.before-resume-*.yaml"))) + 1
            shutil.copyfile(path, self.out / f"config.before-resume-{number}.yaml")
            save_config(cfg, path)
            write_json(self.out / "run.json", {"kind": self.kind.name, **recorded_identity, **self.identity,
                                               "command": " ".join(sys.argv)})

    def _recorded_identity(self) -> dict:
        path = self.out / "run.json"
        if not path.exists():
            return {}
        recorded = load_state(path, json_file=True, remedy="restore it, or start over with --overwrite")
        if not isinstance(recorded, dict):
            raise RunFolderError(f"{path}: not a run record (a JSON object); restore it, or start over with "
                                 f"--overwrite")
        return recorded

    # ---- closing ---------------------------------------------------------------------------------

    def commit(self) -> None:
        """The new run has saved resumable state: a failure from here on keeps it (to resume), but
        the run an --overwrite set aside still comes back instead, until the new run finishes."""
        self.committed = True

    def close(self, failed: bool) -> None:
        try:
            if failed:
                self._undo()
            elif self.previous.exists():  # the new run finished: now the previous one may go
                self._drop_previous()
        finally:
            if self._lock is not None:
                os.close(self._lock)  # releases the flock
                self._lock = None

    def _drop_previous(self) -> None:
        try:
            _remove_aside(self.previous, "replaced")
        except OSError as err:  # the new run is complete: say what is left, do not fail it
            print(f"blockdrop: warning: the run {self.given} replaced is still in {self.previous} "
                  f"({err.strerror}); delete it by hand, or the next start puts it back", file=sys.stderr)

    def _undo(self) -> None:
        """A failed run: an --overwrite puts the previous run back; a fresh run that saved no state
        leaves the folder as it was found. Nothing is touched when the folder was never ours (a
        refused lock: another run holds it)."""
        if not self.prepared:
            return
        if self.previous.exists():
            self._put_back()
        elif self.committed or self.continuing:
            return
        elif self.created:
            shutil.rmtree(self.out, ignore_errors=True)
        else:  # the folder held no run when this one started: what is in it now is this run's
            for path in self.out.iterdir():
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _read_holder(fd: int) -> str:
    """The line the lock's holder wrote (it writes it right after taking the lock)."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            return text or "another process (it recorded no details)"
        time.sleep(0.05)


@contextlib.contextmanager
def run_folder(cfg: ExperimentConfig, out: Path, *, kind: RunKind, resume: bool, overwrite: bool,
               identity: dict | None = None, allow_changes: bool = False):
    """Hold the run folder for the block (rank 0 does the file work; every rank gets rank 0's
    refusal). A failure leaves the folder as it was, or resumable; an --overwrite's previous run
    comes back on any failure until the block has finished."""
    folder = RunFolder(out, kind=kind, resume=resume, overwrite=overwrite, identity=identity,
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
    except (BlockdropError, OSError) as err:
        folder.close(failed=True)
        return err
    return None
