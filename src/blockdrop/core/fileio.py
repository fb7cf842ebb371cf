"""Writing outputs so that nothing already written is lost or left half-overwritten.

Files are written to a temporary sibling and renamed into place; dataset folders are built
in a temporary sibling folder and swapped in only when complete (the previous folder is
restored if the swap fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from blockdrop.core.errors import DataError


def _new_sibling(parent: Path, prefix: str, suffix: str, *, folder: bool = False) -> Path:
    """Create a fresh, uniquely named file (or folder) in ``parent`` with the permissions an ordinary
    ``open()`` (``mkdir``) gives, 0666 (0777) less the umask: ``tempfile.mkstemp`` / ``mkdtemp``
    make them private (0600 / 0700), and the rename would carry that onto the published output."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                os.mkdir(candidate, 0o777)  # the kernel applies the umask, as for any new folder
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{parent}: no free temporary name {prefix}*{suffix}")


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a new temporary file next to ``path`` to write; when the block succeeds it is
    flushed to disk and renamed onto ``path`` (readers see the old file or the new one, never
    half of one); when it fails it is removed and ``path`` is untouched. ``suffix`` matters to
    writers that pick a format from the extension (video containers, ``np.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(path.parent, f".{path.name}.", suffix)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # a writer that replaced the file (safetensors does) made it 0600
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | Path, data) -> Path:
    """``data`` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


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
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out.parent, f".{out.name}.tmp-", "", folder=True)
    try:
        yield tmp
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
