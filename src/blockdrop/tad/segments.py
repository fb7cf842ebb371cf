"""Temporal IoU of segments: the one implementation, for numpy arrays and torch tensors alike.

Evaluation matches predictions to ground truth with it (numpy, float64), post-processing decays
and votes with it (torch or numpy, the detections' dtype). Segments are (N, 2) [start, end].
"""

from __future__ import annotations

import numpy as np
import torch


def tiou(a, b):
    """IoU of segments a (N, 2) against b (M, 2): (N, M), of a's kind and dtype; 0 where the union is empty."""
    if isinstance(a, torch.Tensor):
        inter = (torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
        union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
        return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))
    inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
