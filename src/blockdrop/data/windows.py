"""Time units and the windows a detector sees.

Seconds live in files; *input steps* are samples of the model input: ``step = seconds * rate``.
Conversions are continuous (no rounding): a segment keeps its exact extent until the head
assigns it to points. Long sequences are cut into fixed-length windows: sliding windows at
test time (every step covered, the last window flush with the end) and one random crop per
video at training time (OpenTAD's random truncation).
"""

from __future__ import annotations

import numpy as np


def _check_rate(rate: float) -> float:
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    return float(rate)


def seconds_to_steps(t, rate: float):
    """Seconds -> input steps (float or float64 array, same shape); no rounding."""
    rate = _check_rate(rate)
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t) * rate
    return np.asarray(t, dtype=np.float64) * rate


def steps_to_seconds(s, rate: float):
    """Input steps -> seconds (float or float64 array, same shape); no rounding."""
    rate = _check_rate(rate)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s) / rate
    return np.asarray(s, dtype=np.float64) / rate


def sliding_windows(length: int, window: int, stride: int) -> list[int]:
    """Start steps of windows of ``window`` steps that together cover ``[0, length)``.

    Starts go 0, stride, 2*stride, ...; the last window is moved back so it ends exactly at
    ``length`` (no window hangs over the end, so none is mostly padding). A sequence shorter
    than the window gives the single start 0 and the caller pads.
    """
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    if window < 1 or not 1 <= stride <= window:
        # stride > window would leave gaps of uncovered steps between windows
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    if length <= window:
        return [0]
    last = length - window
    starts = list(range(0, last, stride))
    starts.append(last)
    return starts


def crop_segments(segments: np.ndarray, start: float, crop: float, min_keep: float = 0.5):
    """Segments seen through the crop ``[start, start + crop]``, relative to ``start``.

    segments: (N, 2) input steps. A segment is kept when the part inside the crop is at least
    ``min_keep`` of its length (and not empty); kept segments are clipped to the crop.
    Returns (kept (M, 2) float64 relative to start, kept_indices (M,) int64).
    """
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    inside_start = np.maximum(segments[:, 0], start)
    inside_end = np.minimum(segments[:, 1], start + crop)
    overlap = np.clip(inside_end - inside_start, 0.0, None)
    lengths = segments[:, 1] - segments[:, 0]
    keep = (overlap > 0) & (overlap >= min_keep * lengths)
    kept = np.stack([inside_start[keep], inside_end[keep]], axis=1) - start
    return kept.reshape(-1, 2), np.flatnonzero(keep).astype(np.int64)


def random_truncation(length: int, segments_steps: np.ndarray, window: int, rng: np.random.Generator,
                      min_keep: float = 0.5, max_tries: int = 200):
    """One random training crop of ``window`` steps, OpenTAD style.

    Crops with no action teach the head nothing, so up to ``max_tries`` starts are drawn and the
    first that keeps an action wins; otherwise the crop that kept the most. A sequence no longer
    than the window is not cropped (start 0; the caller pads). Deterministic given ``rng``.

    segments_steps: (N, 2) input steps. Returns (start, kept (M, 2) relative to start,
    kept_indices (M,) int64 into segments_steps).
    """
    if window < 1 or length < 1:
        raise ValueError(f"need length >= 1 and window >= 1, got length={length}, window={window}")
    if not 0.0 <= min_keep <= 1.0:
        raise ValueError(f"min_keep must be in [0, 1], got {min_keep}")
    segments = np.asarray(segments_steps, dtype=np.float64).reshape(-1, 2)
    if length <= window:
        kept, indices = crop_segments(segments, 0, length, min_keep)
        return 0, kept, indices
    best = None
    for _ in range(max(1, max_tries)):
        start = int(rng.integers(0, length - window + 1))
        kept, indices = crop_segments(segments, start, window, min_keep)
        if best is None or len(indices) > len(best[2]):
            best = (start, kept, indices)
        if len(indices) > 0 or len(segments) == 0:
            break
    return best
