"""Detections on a time axis, a lane per class, ground truth under them.

Two users: `blockdrop detect --plot` (one panel per video) and the compress report, which runs
the teacher and the final model over a few validation videos (``validation_detections``) and
draws them one above the other per video (``compare_figure``), in the same lanes.

matplotlib is the optional extra ``report``; it is imported only when a plot is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import atomic_path
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.annotations import Annotations
from blockdrop.recipes.build import load_experiment_annotations, make_dataset, make_source, split_annotations
from blockdrop.tad.inference import predict_windows, results_from_windows

# Bars drawn per video: results are sorted by score, and below the top hundred a timeline is a smear.
MAX_DRAWN = 100
_LANE = 1.0  # height of one class lane: detections in its upper half, ground truth in its lower

Truth = list[tuple[float, float, str]]  # (start s, end s, label) of one video


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BlockdropError("--plot needs matplotlib: pip install 'blockdrop[report]'") from None
    return plt


def _lanes(detections: list[dict], truth: Truth, classes: Sequence[str]) -> list[str]:
    """The classes a panel shows: those with a drawn detection or a ground-truth segment, in the
    model's class order (ground-truth labels the model lacks go last)."""
    present = {d["label"] for d in detections} | {label for _, _, label in truth}
    return [c for c in classes if c in present] + sorted(present - set(classes))


def _draw_panel(ax, title: str, detections: list[dict], truth: Truth, lanes: list[str], duration: float,
                colours) -> None:
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
    ax.set_title(f"{title}: top {len(detections)} detections (opacity = score)"
                 + (", ground truth in grey below" if truth else ""), fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)


def _truths(video_ids, ground_truth: Annotations | None) -> dict[str, Truth]:
    truths = {}
    for video_id in video_ids:
        info = ground_truth.videos.get(video_id) if ground_truth is not None else None
        truths[video_id] = [(s.start, s.end, s.label) for s in info.segments] if info is not None else []
    return truths


def compare_figure(plt, results: Mapping[str, Mapping], *, durations: Mapping[str, float], classes: Sequence[str],
                   ground_truth: Annotations | None = None, top: int = MAX_DRAWN):
    """A figure with, per video, one panel per model of ``results`` ({model name: results dict}),
    stacked in the same lanes so the models read against each other and the ground truth; each
    panel is titled ``video / model name`` (the video alone for a name "")."""
    names = list(results)
    video_ids = [v for v in results[names[0]]["results"] if all(v in results[n]["results"] for n in names)]
    truths = _truths(video_ids, ground_truth)
    panels = []  # (title, video id, detections, lanes)
    for video_id in video_ids:
        drawn = {n: results[n]["results"][video_id][:top] for n in names}
        lanes = _lanes([d for n in names for d in drawn[n]], truths[video_id], classes)
        panels += [(f"{video_id} / {n}" if n else video_id, video_id, drawn[n], lanes) for n in names]
    heights = [max(1, len(lanes)) for *_, lanes in panels]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(10, 0.8 + 0.5 * sum(heights)),
                             gridspec_kw={"height_ratios": heights}, dpi=110)
    for ax, (title, video_id, detections, lanes) in zip(axes[:, 0], panels):
        _draw_panel(ax, title, detections, truths[video_id], lanes, durations[video_id], plt.get_cmap("tab10"))
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    return fig


def plot_timeline(results: Mapping, path: str | os.PathLike, *, durations: Mapping[str, float],
                  classes: Sequence[str], ground_truth: Annotations | None = None) -> Path:
    """Write a PNG with one panel per video of ``results`` (the results dict detect writes).

    durations: seconds per video id (the x axis). ground_truth: annotations whose segments of the
    same video ids are drawn under the detections.
    """
    plt = _pyplot()
    fig = compare_figure(plt, {"": results}, durations=durations, classes=classes, ground_truth=ground_truth)
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


@torch.no_grad()
def validation_detections(cfg: ExperimentConfig, models: Mapping[str, nn.Module], videos: int = 3,
                          device: torch.device | None = None) -> tuple[dict[str, dict], Annotations]:
    """Each model's results dict on the first ``videos`` validation videos (by id) that have ground
    truth, through the same windows and post-processing as validation: ({name: results}, the
    annotations of those videos). Data problems raise BlockdropError or OSError."""
    annotations = load_experiment_annotations(cfg.data)
    source = make_source(cfg.data, annotations)
    val = split_annotations(cfg.data, annotations, cfg.train.seed)["val"]
    chosen = [v for v in sorted(val.videos) if val.videos[v].segments][:videos]
    part = replace(val, videos={v: val.videos[v] for v in chosen})
    results = {}
    for name, model in models.items():
        model.to(device or torch.device("cpu"))
        dataset = make_dataset(cfg, part, source, train=False, feature_stride=model.feature_stride)
        windows = predict_windows(model, dataset, cfg.eval)
        found = results_from_windows(windows, part, dataset.rate, cfg.eval)["results"]
        results[name] = {"results": {v: found.get(v, []) for v in chosen}}  # a video without windows: none
    return results, part
