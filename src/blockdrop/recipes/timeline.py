"""`blockdrop detect --plot`: detections on a time axis, a lane per class, ground truth under them.

matplotlib is the optional extra ``report``; it is imported only when a plot is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import atomic_path
from blockdrop.data.annotations import Annotations

# Bars drawn per video: results are sorted by score, and below the top hundred a timeline is a smear.
MAX_DRAWN = 100
_LANE = 1.0  # height of one class lane: detections in its upper half, ground truth in its lower


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BlockdropError("--plot needs matplotlib: pip install 'blockdrop[report]'") from None
    return plt


def _lanes(detections: list[dict], truth: list[tuple[float, float, str]], classes: Sequence[str]) -> list[str]:
    """The classes this video's panel shows: those with a drawn detection or a ground-truth segment,
    in the model's class order (ground-truth labels the model lacks go last)."""
    present = {d["label"] for d in detections} | {label for _, _, label in truth}
    return [c for c in classes if c in present] + sorted(present - set(classes))


def _draw_video(ax, video_id: str, detections: list[dict], truth: list, classes: Sequence[str],
                duration: float, colours) -> None:
    detections = detections[:MAX_DRAWN]
    lanes = _lanes(detections, truth, classes)
    row = {label: i for i, label in enumerate(lanes)}
    if detections:
        starts = np.array([d["segment"][0] for d in detections])
        ends = np.array([d["segment"][1] for d in detections])
        rgba = np.array([colours(row[d["label"]] % 10) for d in detections])
        rgba[:, 3] = np.clip([d["score"] for d in detections], 0.08, 1.0)  # opacity = score (faint, not gone)
        ax.barh([row[d["label"]] * _LANE + 0.25 for d in detections], ends - starts, left=starts, height=0.4,
                color=rgba, linewidth=0)
    if truth:
        ax.barh([row[label] * _LANE - 0.22 for _, _, label in truth], [e - s for s, e, _ in truth],
                left=[s for s, _, _ in truth], height=0.3, color="0.25", linewidth=0)
    ax.set_yticks([i * _LANE for i in range(len(lanes))], lanes, fontsize=8)
    ax.set_ylim(-0.5, max(1, len(lanes)) * _LANE - 0.5)
    ax.set_xlim(0, duration)
    ax.set_title(f"{video_id}: top {len(detections)} detections (opacity = score)"
                 + (", ground truth in grey below" if truth else ""), fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)


def plot_timeline(results: Mapping, path: str | os.PathLike, *, durations: Mapping[str, float],
                  classes: Sequence[str], ground_truth: Annotations | None = None) -> Path:
    """Write a PNG with one panel per video of ``results`` (the results dict detect writes).

    durations: seconds per video id (the x axis). ground_truth: annotations whose segments of the
    same video ids are drawn under the detections.
    """
    plt = _pyplot()
    per_video = results["results"]
    truths = {}
    for video_id in per_video:
        info = ground_truth.videos.get(video_id) if ground_truth is not None else None
        truths[video_id] = [(s.start, s.end, s.label) for s in info.segments] if info is not None else []
    heights = [max(1, len(_lanes(per_video[v][:MAX_DRAWN], truths[v], classes))) for v in per_video]
    fig, axes = plt.subplots(len(per_video), 1, squeeze=False, figsize=(10, 0.8 + 0.45 * sum(heights)),
                             gridspec_kw={"height_ratios": heights}, dpi=110)
    for ax, video_id in zip(axes[:, 0], per_video):
        _draw_video(ax, video_id, per_video[video_id], truths[video_id], classes, durations[video_id],
                    plt.get_cmap("tab10"))
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
