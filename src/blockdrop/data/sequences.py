"""Per-video ``.npy`` arrays (T, C): sensor streams or pre-extracted features at a known rate.

One file per video, ``<root>/<video_id><suffix>``, first axis time. Arrays are memory-mapped
by default so a training crop reads only its window from disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blockdrop.core.errors import DataError


def _open(path: Path, mmap: bool) -> np.ndarray:
    try:
        # allow_pickle=False: a .npy of Python objects could run code when loaded
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array: {e}") from None


def _check_shape(array: np.ndarray, path: Path) -> None:
    if array.ndim != 2:
        raise DataError(f"{path}: expected a (T, C) array, got shape {tuple(array.shape)}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise DataError(f"{path}: empty array of shape {tuple(array.shape)}")
    if array.dtype.kind != "f":
        raise DataError(f"{path}: expected a floating-point array, got dtype {array.dtype}")


def load_sequence(path, *, mmap: bool = True) -> np.ndarray:
    """A validated (T, C) floating-point array; NaN/inf is an error, not a silent training crash."""
    path = Path(path)
    array = _open(path, mmap)
    _check_shape(array, path)
    finite = np.isfinite(array)
    if not finite.all():
        t = int(np.argwhere(~finite)[0, 0])
        raise DataError(f"{path}: non-finite values (first at time step {t})")
    return array


class SequenceSource:
    """Per-video (T, C) arrays at ``rate`` input steps per second; the dataset's source protocol."""

    def __init__(self, root, rate: float, suffix: str = ".npy"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: sequence folder not found")
        if not rate > 0:
            raise DataError(f"{self.root}: field 'rate': must be positive, got {rate!r}")
        self.rate = float(rate)
        self.suffix = suffix

    def path(self, video_id: str) -> Path:
        return self.root / f"{video_id}{self.suffix}"

    def _existing(self, video_id: str) -> Path:
        path = self.path(video_id)
        if not path.is_file():
            raise DataError(f"{path}: no sequence file for video {video_id!r}")
        return path

    def load(self, video_id: str) -> np.ndarray:
        """(T, C) float32; a float32 file stays memory-mapped (no copy)."""
        array = load_sequence(self._existing(video_id))
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def length(self, video_id: str) -> int:
        """T, read from the header only (no data is read)."""
        path = self._existing(video_id)
        array = _open(path, mmap=True)
        _check_shape(array, path)
        return int(array.shape[0])

    def __repr__(self) -> str:
        return f"SequenceSource(root={str(self.root)!r}, rate={self.rate}, suffix={self.suffix!r})"
