"""Detection losses: sigmoid focal loss (classification) and 1D DIoU loss (regression).

Both are plain functions of tensors so the compression engine can reuse them
(e.g. DIoU between student and teacher segments in the alignment loss).
"""

import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "mean", "sum")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        # mean of nothing is 0 (not NaN) and still carries a graph
        return loss.mean() if loss.numel() > 0 else loss.sum() * 0.0
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> torch.Tensor:
    """Focal loss of RetinaNet (Lin et al. 2017) on independent sigmoid outputs.

    loss = alpha_t * (1 - p_t)^gamma * BCE(logits, targets), with p = sigmoid(logits),
    p_t = p * y + (1 - p) * (1 - y) and alpha_t = alpha * y + (1 - alpha) * (1 - y).
    Soft targets in [0, 1] (label smoothing) follow the same formula. alpha < 0
    turns the class weighting off. Computed in float32 whatever the input dtype.
    """
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def diou_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "none",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Distance-IoU loss (Zheng et al. 2020) for 1D segments.

    Input convention: ``pred`` and ``target`` are (N, 2) segments ``[start, end]``
    with ``start <= end``, in any common time unit. Offsets ``(left, right) >= 0``
    measured from one shared point convert losslessly with ``[-left, right]``
    (the loss is invariant to translation and scale).

    loss = 1 - IoU + (centre distance)^2 / (enclosing length)^2, in [0, 2).
    """
    pred, target = pred.float(), target.float()
    ps, pe = pred[..., 0], pred[..., 1]
    ts, te = target[..., 0], target[..., 1]
    inter = (torch.minimum(pe, te) - torch.maximum(ps, ts)).clamp(min=0)
    union = (pe - ps) + (te - ts) - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.maximum(pe, te) - torch.minimum(ps, ts)
    centre_dist = 0.5 * (ps + pe) - 0.5 * (ts + te)
    loss = 1.0 - iou + (centre_dist / enclosing.clamp(min=eps)) ** 2
    return _reduce(loss, reduction)
