"""Post-processing: per-window detections in input steps -> one video's detections in seconds.

The recipe (``postprocess_video``): keep the top-k candidates above a score floor in each
window (the detector has already turned feature steps into input steps), shift each window by its start and
concatenate a video's windows, Gaussian soft-NMS per class with score voting, input steps ->
seconds (/ rate) clamped to [0, duration]. ``detections_to_results`` and ``save_results``
write the ``{"results": {video: [{segment, label, score}]}}`` file that evaluation reads.

Everything is plain torch on whatever device the tensors live on; loops run once per kept
segment, never per candidate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blockdrop.core.errors import BlockdropError, DataError
from blockdrop.core.fileio import atomic_path
from blockdrop.tad.segments import tiou

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # segments (N, 2), scores (N,), labels (N,)


@dataclass(frozen=True)
class PostprocessConfig:
    """Defaults follow the method: score > 0.001, top-2000 per window, sigma 0.7, voting 0.75."""

    min_score: float = 0.001  # candidates at or below are dropped, before and during soft-NMS
    pre_nms_top_k: int = 2000  # per window, before merging
    sigma: float = 0.7  # Gaussian soft-NMS: score *= exp(-iou^2 / sigma)
    voting_threshold: float = 0.75  # 0 disables score voting
    max_segments: int = 200  # per video, after soft-NMS


def input_steps_to_seconds(segments: torch.Tensor, rate: float, duration: float | None = None) -> torch.Tensor:
    """(N, 2) input steps of a video -> (N, 2) seconds, clamped to [0, duration] when given."""
    seconds = segments / rate
    return seconds.clamp(min=0.0, max=duration) if duration is not None else seconds.clamp(min=0.0)


def top_candidates(segments, scores, labels, *, min_score: float = 0.001, top_k: int = 2000) -> Detections:
    """The ``top_k`` highest-scoring detections with score > ``min_score`` (ties: input order)."""
    segments, scores, labels = _as_detections(segments, scores, labels)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] > min_score][:top_k]
    return segments[order], scores[order], labels[order]


def merge_windows(window_detections: Sequence, *, min_score: float = 0.001, top_k: int = 2000) -> Detections:
    """Concatenate one video's windows, each ``(segments (N, 2) in input steps from the window
    start, scores (N,), labels (N,), window_start in input steps)``, after keeping each window's
    ``top_k`` candidates above ``min_score``. -> segments in input steps of the video."""
    merged = []
    for segments, scores, labels, window_start in window_detections:
        segments, scores, labels = top_candidates(segments, scores, labels, min_score=min_score, top_k=top_k)
        merged.append((segments + window_start, scores, labels))
    if not merged:
        return torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return tuple(torch.cat(parts) for parts in zip(*merged))


def nms(segments, scores, labels, iou_threshold: float, class_agnostic: bool = False, *,
        max_segments: int | None = None) -> Detections:
    """Greedy hard NMS: a segment is dropped when its IoU with a kept, higher-scoring segment of
    the same class (any class if ``class_agnostic``) is > ``iou_threshold``. Sorted by score
    (ties: input order)."""
    segments, scores, labels = _as_detections(segments, scores, labels)
    group = torch.zeros_like(labels) if class_agnostic else labels
    remaining = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while remaining.numel() and (max_segments is None or len(keep) < max_segments):
        best, rest = remaining[0], remaining[1:]
        keep.append(best)
        iou = tiou(segments[best][None], segments[rest])[0]  # (R,)
        remaining = rest[~((iou > iou_threshold) & (group[rest] == group[best]))]
    keep = torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)
    return segments[keep], scores[keep], labels[keep]


def soft_nms(segments, scores, labels, *, sigma: float = 0.7, min_score: float = 0.001,
             max_segments: int = 200, voting_threshold: float = 0.75, class_agnostic: bool = False) -> Detections:
    """Gaussian soft-NMS per class, then score voting.

    Repeatedly keep the highest (decayed) score, then decay every other candidate of its class by
    ``exp(-iou^2 / sigma)``; candidates whose score falls to ``min_score`` or below are dropped.
    Voting moves each kept segment to the average of the candidates of its class with
    IoU >= ``voting_threshold`` against it, weighted by original score x IoU (as ActionFormer's
    ``seg_voting``). Returns at most ``max_segments``, sorted by kept score.
    """
    segments, scores, labels = _as_detections(segments, scores, labels)
    if not sigma > 0 or not 0 <= voting_threshold <= 1 or max_segments < 1:
        raise ValueError("soft_nms: need sigma > 0, 0 <= voting_threshold <= 1, max_segments >= 1")
    group = torch.zeros_like(labels) if class_agnostic else labels
    candidate = scores > min_score  # (N,)
    # Classes never decay each other, so all classes run side by side, one row each; merging the
    # per-class picks by kept score (non-increasing within a class) gives the global order.
    cand = candidate.cpu().numpy()
    picks = _soft_nms_rows(segments.cpu().numpy()[cand], scores.cpu().numpy()[cand], group.cpu().numpy()[cand],
                           np.flatnonzero(cand), sigma, min_score, max_segments)
    picks.sort(key=lambda p: (-p[0], p[1]))
    picks = picks[:max_segments]
    if not picks:
        return segments[:0], scores[:0], labels[:0]
    keep = torch.tensor([i for _, i in picks], device=scores.device)
    kept_scores = torch.tensor([k for k, _ in picks], dtype=scores.dtype, device=scores.device)
    kept_segments = segments[keep]
    if voting_threshold > 0:
        kept_segments = _vote(kept_segments, group[keep], segments[candidate], scores[candidate],
                              group[candidate], voting_threshold)
    return kept_segments, kept_scores, labels[keep]


def _soft_nms_rows(segments: np.ndarray, scores: np.ndarray, groups: np.ndarray, index: np.ndarray,
                   sigma: float, min_score: float, max_segments: int) -> list[tuple[float, int]]:
    """Gaussian soft-NMS of every group at once -> [(kept score, input index)], each group's in pick order.

    Row g of the (G, M) matrices holds group g's candidates in input order (padding is never alive),
    so every pick, decay and kill is the same elementwise arithmetic as running each group alone;
    one Python iteration serves all groups."""
    ids, inverse = np.unique(groups, return_inverse=True)
    if not len(ids):
        return []
    rows = [np.flatnonzero(inverse == g) for g in range(len(ids))]  # ascending: input order
    width = max(len(r) for r in rows)
    starts, ends = np.zeros((len(rows), width), segments.dtype), np.zeros((len(rows), width), segments.dtype)
    decayed = np.zeros((len(rows), width), scores.dtype)
    alive = np.zeros((len(rows), width), dtype=bool)
    where = np.zeros((len(rows), width), dtype=np.int64)
    for g, r in enumerate(rows):
        starts[g, :len(r)], ends[g, :len(r)], decayed[g, :len(r)] = segments[r, 0], segments[r, 1], scores[r]
        alive[g, :len(r)], where[g, :len(r)] = True, index[r]
    picks, count = [], np.zeros(len(rows), dtype=np.int64)
    while True:
        active = np.flatnonzero(alive.any(axis=1) & (count < max_segments))  # (A,)
        if not len(active):
            return picks
        best = np.argmax(np.where(alive[active], decayed[active], -np.inf), axis=1)  # first index on ties
        picks += [(float(decayed[g, b]), int(where[g, b])) for g, b in zip(active.tolist(), best.tolist())]
        count[active] += 1
        alive[active, best] = False
        s, e = starts[active], ends[active]  # (A, M)
        sb, eb = s[np.arange(len(active)), best][:, None], e[np.arange(len(active)), best][:, None]
        inter = np.clip(np.minimum(eb, e) - np.maximum(sb, s), 0, None)
        union = (eb - sb) + (e - s) - inter  # the same sums as tiou(best, row)
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        decayed[active] = decayed[active] * np.exp(-np.square(iou) / sigma)
        alive[active] &= decayed[active] > min_score
        columns = alive.any(axis=0)  # columns dead in every row are dropped: late picks touch few elements
        if 2 * np.count_nonzero(columns) < len(columns):
            starts, ends, decayed, alive, where = (a[:, columns] for a in (starts, ends, decayed, alive, where))


def _vote(kept, kept_group, segments, scores, group, threshold: float) -> torch.Tensor:
    """kept (K, 2) -> (K, 2): weighted average of same-group candidates (N, 2) with IoU >= threshold,
    computed per group (the other groups' candidates would only add zero weights). The sums run in
    float64, so the result does not depend on how the candidates are grouped or ordered."""
    voted = torch.empty_like(kept)
    for g in torch.unique(kept_group).tolist():
        rows, cols = kept_group == g, group == g
        iou = tiou(kept[rows], segments[cols])  # (K_g, N_g)
        weights = ((iou >= threshold) * iou * scores[cols][None, :]).double()  # each kept segment votes for itself
        voted[rows] = ((weights @ segments[cols].double()) / weights.sum(dim=1, keepdim=True)).to(kept.dtype)
    return voted


def postprocess_video(window_detections: Sequence, *, rate: float, duration: float,
                      config: PostprocessConfig = PostprocessConfig()) -> Detections:
    """One video's windows ``(segments (N, 2) in input steps from the window start, scores,
    labels, window_start in input steps)`` -> merged, soft-NMS'ed detections in seconds."""
    merged = merge_windows(window_detections, min_score=config.min_score, top_k=config.pre_nms_top_k)
    segments, scores, labels = soft_nms(*merged, sigma=config.sigma, min_score=config.min_score,
                                        max_segments=config.max_segments, voting_threshold=config.voting_threshold)
    return input_steps_to_seconds(segments, rate, duration), scores, labels


def detections_to_results(per_video: Mapping[str, Sequence], classes: Sequence[str]) -> dict:
    """{video: (segments (N, 2) seconds, scores (N,), labels (N,) class indices)} -> results dict,
    each video's detections sorted by score."""
    results = {}
    for video, (segments, scores, labels) in per_video.items():
        segments, scores, labels = _as_detections(segments, scores, labels)
        if not (torch.isfinite(segments).all() and torch.isfinite(scores).all()):
            raise DataError(f"detections for video {video!r}: non-finite segment or score")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < len(classes)):
            raise BlockdropError(f"detections for video {video!r}: label index outside the {len(classes)} classes")
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        seg, sc, lab = segments.double().tolist(), scores.double().tolist(), labels.tolist()
        results[video] = [{"segment": seg[i], "label": classes[lab[i]], "score": sc[i]} for i in order]
    return {"results": results}


def save_results(results: Mapping, path: str | os.PathLike) -> Path:
    """Write a results dict as JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, allow_nan=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot write results ({err})") from None
    return path


def _as_detections(segments, scores, labels) -> Detections:
    segments = torch.as_tensor(segments)
    scores = torch.as_tensor(scores, device=segments.device)
    labels = torch.as_tensor(labels, device=segments.device).long()
    if segments.ndim != 2 or segments.shape[1] != 2 or scores.shape != (len(segments),) or labels.shape != scores.shape:
        raise ValueError(f"expected segments (N, 2), scores (N,), labels (N,); got "
                         f"{tuple(segments.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
    if not segments.is_floating_point():
        segments = segments.float()
    return segments, scores.to(segments.dtype), labels
