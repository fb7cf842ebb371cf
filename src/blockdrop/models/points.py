"""Temporal points of the ActionFormer pyramid: generation, label assignment, decoding.

A *point* is one step of one pyramid level, stored as a row ``[t, reg_lo, reg_hi, stride]``:
``t`` is its position in feature steps (level step i sits at ``i * stride``), and
``(reg_lo, reg_hi]`` the range of regression distances (feature steps) it is responsible for.
Offsets predicted or assigned at a point are ``(left, right) >= 0`` in units of its stride,
so the segment is ``[t - left * stride, t + right * stride]``.
"""

import math

import torch
import torch.nn.functional as F


def default_regression_ranges(num_levels: int) -> list[tuple[float, float]]:
    """(0, 4), (4, 8), (8, 16), ... doubling per level, the last one open: (.., inf)."""
    ranges = [(0.0 if lvl == 0 else 2.0 ** (lvl + 1), 2.0 ** (lvl + 2)) for lvl in range(num_levels)]
    ranges[-1] = (ranges[-1][0], math.inf)
    return ranges


def make_points(level_sizes, strides, regression_ranges, device=None) -> torch.Tensor:
    """Points of all levels, level after level: (P, 4) [t, reg_lo, reg_hi, stride], P = sum(level_sizes)."""
    rows = []
    for size, stride, (lo, hi) in zip(level_sizes, strides, regression_ranges):
        t = torch.arange(size, device=device, dtype=torch.float32) * stride  # (T_l,)
        info = torch.tensor([lo, hi, stride], device=device, dtype=torch.float32)
        rows.append(torch.cat([t[:, None], info.expand(size, 3)], dim=1))  # (T_l, 4)
    return torch.cat(rows, dim=0)


def decode_offsets(points: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(P, 4) points, (..., P, 2) offsets in strides -> (..., P, 2) segments in feature steps."""
    t, stride = points[:, 0], points[:, 3]
    return torch.stack((t - offsets[..., 0] * stride, t + offsets[..., 1] * stride), dim=-1)


def offsets_as_segments(offsets: torch.Tensor) -> torch.Tensor:
    """(N, 2) offsets (left, right) from a common point -> (N, 2) segments [-left, right]."""
    return torch.stack((-offsets[:, 0], offsets[:, 1]), dim=-1)


@torch.no_grad()
def assign_single(points, segments, labels, num_classes: int, center_radius: float):
    """Targets of one window. points (P, 4), segments (N, 2) feature steps, labels (N,).

    A point is a candidate for a segment when it lies strictly inside the segment's
    centre region (centre +- radius * stride, clipped to the segment) and the farther
    of its two boundary distances falls in the point's regression range (inclusive).
    Among candidates the shortest segment wins (easiest to regress); segments tied
    in length within 1e-3 all lend their class (multi-hot), the first one its offsets.
    Returns cls_targets (P, K) in {0, 1} and reg_targets (P, 2) in units of stride.
    """
    num_points = points.shape[0]
    if segments.shape[0] == 0:
        return points.new_zeros(num_points, num_classes), points.new_zeros(num_points, 2)
    t, lo, hi, stride = (points[:, i, None] for i in range(4))  # each (P, 1)
    start, end = segments[:, 0][None], segments[:, 1][None]  # each (1, N)
    dist = torch.stack((t - start, end - t), dim=-1)  # (P, N, 2) left/right distances

    centre = 0.5 * (start + end)
    region_lo = torch.maximum(centre - center_radius * stride, start)  # (P, N)
    region_hi = torch.minimum(centre + center_radius * stride, end)
    in_centre = (t > region_lo) & (t < region_hi)
    max_dist = dist.max(dim=-1).values  # (P, N)
    in_range = (max_dist >= lo) & (max_dist <= hi)

    lengths = (end - start).expand(num_points, -1)  # (P, N)
    lengths = lengths.masked_fill(~(in_centre & in_range), math.inf)
    min_len, best = lengths.min(dim=1)  # (P,)
    winners = (lengths <= min_len[:, None] + 1e-3) & torch.isfinite(lengths)  # (P, N)

    one_hot = F.one_hot(labels.long(), num_classes).to(points.dtype)  # (N, K)
    cls_targets = (winners.to(points.dtype) @ one_hot).clamp(max=1.0)  # (P, K)
    reg_targets = dist[torch.arange(num_points, device=points.device), best] / stride  # (P, 2)
    return cls_targets, reg_targets


@torch.no_grad()
def assign_points(points, gt_segments, gt_labels, num_classes: int, center_radius: float, valid=None):
    """Batched :func:`assign_single`: lists of B (N_b, 2) / (N_b,) -> (B, P, K), (B, P, 2), (B, P) bool.

    ``positive`` marks points with any class target; with ``valid`` (B, P) given,
    padded points are never positive (their targets are zeroed).
    """
    pairs = [assign_single(points, s.to(points), l.to(points.device), num_classes, center_radius)
             for s, l in zip(gt_segments, gt_labels)]
    cls_targets = torch.stack([c for c, _ in pairs])  # (B, P, K)
    reg_targets = torch.stack([r for _, r in pairs])  # (B, P, 2)
    if valid is not None:
        cls_targets = cls_targets * valid[..., None].to(cls_targets.dtype)
    positive = cls_targets.sum(dim=-1) > 0  # (B, P)
    return cls_targets, reg_targets, positive


@torch.no_grad()
def select_candidates(probs, segments, *, pre_nms_thresh: float, pre_nms_topk: int,
                      duration_thresh: float):
    """One window's detections before NMS.

    probs (P, K) class probabilities (0 at padded points), segments (P, 2) feature steps.
    Keeps (point, class) pairs scoring above ``pre_nms_thresh``, the ``pre_nms_topk``
    best of them over the whole window, then drops segments not longer than
    ``duration_thresh`` feature steps. Returns (segments (N, 2), scores (N,), labels (N,)),
    sorted by descending score.
    """
    num_classes = probs.shape[1]
    flat = probs.flatten()  # (P * K,)
    idx = torch.nonzero(flat > pre_nms_thresh).squeeze(1)
    scores, order = flat[idx].sort(descending=True)
    scores, idx = scores[:pre_nms_topk], idx[order[:pre_nms_topk]]
    point_idx = torch.div(idx, num_classes, rounding_mode="floor")
    labels = idx % num_classes
    segs = segments[point_idx]  # (N, 2)
    keep = (segs[:, 1] - segs[:, 0]) > duration_thresh
    return segs[keep], scores[keep], labels[keep]
