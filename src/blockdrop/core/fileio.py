"""Writing outputs so that nothing already written is lost or left half-overwritten, and reading
back the state a resume depends on.

Files are written to a temporary sibling and renamed into place; dataset folders are built
in a temporary sibling folder and swapped in only when complete (the previous folder is
restored if the swap fails). Every temporary name carries ``.tmp-`` (`is_temporary`), so the
clean-up at the start of a run finds whatever an interrupted write left.

A write never replaces what is not a regular file (a folder, a device, a fifo): it is refused
naming the path the caller gave. A write that fails for lack of space is a `DiskFullError` naming
the folder, the size the file needs and the space that is free, and leaves no partial file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from blockdrop.core.errors import CheckpointError, DataError, DiskFullError, OutputError

TEMP_MARK = ".tmp-"  # in every temporary name: `.<name>.tmp-<random><suffix>`
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_temporary(path: Path) -> bool:
    """A temporary file or folder of an interrupted write: `.<name>.tmp-<random>[suffix]`, and the
    `.<name>.<random>.tmp` / `<name>.tmp` names of earlier releases."""
    return path.name.endswith(".tmp") or (path.name.startswith(".") and TEMP_MARK in path.name)


def new_temporary(parent: Path, name: str, suffix: str = "", *, folder: bool = False) -> Path:
    """Create a fresh, uniquely named temporary file (or folder) for ``name`` in ``parent`` with the
    permissions an ordinary ``open()`` (``mkdir``) gives, 0666 (0777) less the umask:
    ``tempfile.mkstemp`` / ``mkdtemp`` make them private (0600 / 0700), and the rename would carry
    that onto the published output."""
    for _ in range(100):
        candidate = parent / f".{name}{TEMP_MARK}{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                os.mkdir(candidate, 0o777)  # the kernel applies the umask, as for any new folder
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{parent}: no free temporary name .{name}{TEMP_MARK}*{suffix}")


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


# ---- what a write may replace ---------------------------------------------------------------------

def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def output_target(path: str | Path, flag: str | None = None) -> Path:
    """Where a write to ``path`` lands: a symbolic link is followed (its target is replaced, the
    link stays); an existing target that is not a regular file is refused, naming ``path``."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as err:
        raise OutputError(f"{_named(path, flag)}: cannot be checked ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise OutputError(f"{_named(path, flag)}: exists and is {_kind(mode)}, not a regular file; blockdrop writes "
                          f"only files it may replace: choose another path")
    return target


def check_output_file(path: str | Path, flag: str, *, ours: Callable[[Path], bool] | None = None,
                      what: str = "a file this command wrote") -> Path:
    """Refuse ``path`` (the value of ``flag``) before any work when a write could not replace it,
    or when it exists and ``ours`` says it is not ``what`` (so a typo never replaces a user's file)."""
    target = output_target(path, flag)
    if ours is not None and target.is_file() and not ours(target):
        raise OutputError(f"{flag} {path}: exists and is not {what}; remove it or choose another {flag}")
    return target


def is_json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def _named(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


# ---- failures: no space, no permission ------------------------------------------------------------

def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` is a write refused for lack of space (writers in Rust or C++ pass only text on)."""
    if isinstance(err, OSError):
        return err.errno in _NO_SPACE
    text = str(err)
    return any(f"os error {code})" in text for code in _NO_SPACE) or "No space left on device" in text


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def disk_full(path: Path, needed: int | None, written: int = 0) -> DiskFullError:
    """The error for ``path`` that did not fit (``needed``: its full size, when known)."""
    free = shutil.disk_usage(path.parent).free
    need = _size(needed) if needed is not None else f"more than {_size(written)}"
    return DiskFullError(f"{path.parent}: no space left on its disk for {path.name} (needs {need}, {_size(free)} "
                         f"free); free some space, or choose another output path, and run the command again")


def _declared_size(tmp: Path) -> int | None:
    """The full size of a partly written safetensors file, from its header (written first)."""
    try:
        with open(tmp, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length < 2**27:
                return None
            header = json.loads(handle.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + length + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _failed_write(err: BaseException, path: Path, tmp: Path, size) -> BaseException:
    """``err`` (raised while writing ``tmp`` for ``path``) as the user should see it."""
    if out_of_space(err):
        try:
            needed = size() if callable(size) else size
        except Exception:  # the estimate is a courtesy; the failure is the news
            needed = None
        needed = needed if needed is not None else _declared_size(tmp)
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)  # free what the partial file took before measuring what is free
        return disk_full(path, needed, written)
    if isinstance(err, OSError) and err.filename is not None and Path(err.filename) == tmp:
        return OutputError(f"{path}: cannot write it ({err.strerror}); fix the permissions or choose another path")
    return err


# ---- writing --------------------------------------------------------------------------------------

def temporary_beside(path: Path, *, folder: bool = False, suffix: str = "") -> Path:
    """A new temporary file (or folder) beside ``path``, to be renamed onto it; a folder that cannot
    hold it is an error naming ``path``, not the temporary name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return new_temporary(path.parent, path.name, suffix, folder=folder)
    except OSError as err:
        if out_of_space(err):
            raise disk_full(path, None) from None
        raise OutputError(f"{path}: cannot write there ({err.strerror}); fix the permissions or choose another "
                          f"path") from None


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", *, size: int | Callable[[], int] | None = None):
    """Yield a new temporary file next to ``path`` to write; when the block succeeds it is
    flushed to disk and renamed onto ``path`` (readers see the old file or the new one, never
    half of one); when it fails it is removed and ``path`` is untouched. ``suffix`` matters to
    writers that pick a format from the extension (video containers, ``np.save``). ``size`` (bytes,
    or a function giving them) is the file's full size, for the message when the disk is full."""
    given = Path(path)
    path = output_target(given)
    tmp = temporary_beside(path, suffix=suffix)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # a writer that replaced the file (safetensors does) made it 0600
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        failure = _failed_write(err, given, tmp, size)
        if failure is err:
            raise
        raise failure from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    data = text.encode("utf-8")
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)
    return path


def write_json(path: str | Path, data) -> Path:
    """``data`` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class _Recorder:
    """A binary file wrapper that keeps the OSError of a failed write: torch.save reports a failed
    write as an 'enforce fail' RuntimeError and drops the errno (a full disk, a quota)."""

    def __init__(self, handle=None):
        self.handle, self.error, self.written = handle, None, 0

    def write(self, data) -> int:
        try:
            n = self.handle.write(data) if self.handle is not None else len(memoryview(data))
        except OSError as err:
            self.error = err
            raise
        self.written += n
        return n

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.flush()


def _torch_size(obj) -> int:
    counter = _Recorder()  # no file: counts what torch.save would write
    torch.save(obj, counter)
    return counter.written


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; a full disk is a `DiskFullError` with the size."""
    path = Path(path)
    with atomic_path(path, size=lambda: _torch_size(obj)) as tmp, open(tmp, "wb") as handle:
        recorder = _Recorder(handle)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise
    return path


def append_text(path: str | Path, text: str) -> int:
    """Append ``text`` to ``path`` and flush it to disk; on any failure the file is cut back to what
    it held, so no reader sees half a line. Returns that length (for `truncate_to`)."""
    path = Path(path)
    before = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as err:
        truncate_to(path, before)
        if out_of_space(err):
            raise disk_full(path, before + len(text.encode("utf-8")), before) from None
        raise
    return before


def truncate_to(path: str | Path, length: int) -> None:
    """Cut ``path`` back to ``length`` bytes (undo an append; needs no free space)."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(path, length)


# ---- reading the state a resume depends on --------------------------------------------------------

def load_state(path: str | Path, *, remedy: str, apply: Callable[[object], object] | None = None, json_file=False):
    """The one guarded loader of resume state: ``path`` read (``torch.load(weights_only=True)``, or
    JSON with ``json_file``) and handed to ``apply``; any failure of either (a truncated, tampered or
    foreign file) is a `CheckpointError` naming the file and saying what to do (``remedy``)."""
    path = Path(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8")) if json_file else \
            torch.load(path, map_location="cpu", weights_only=True)
        return apply(state) if apply is not None else state
    except CheckpointError:
        raise
    except Exception as err:  # torch, json and the consumer raise many kinds for a damaged file
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: cannot resume from it ({type(err).__name__}: {first}); {remedy}") from None


# ---- dataset folders ------------------------------------------------------------------------------

def check_output_folder(out: Path, overwrite: bool) -> None:
    """A folder we may fill: absent, empty, or explicitly to be replaced."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it)")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing ``out`` is swapped out, then deleted."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = new_temporary(out.parent, f"{out.name}.old", folder=True)
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)  # put the previous output back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield a temporary sibling of ``out`` to fill; it replaces ``out`` only if the block succeeds."""
    tmp = temporary_beside(out, folder=True)
    try:
        yield tmp
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
