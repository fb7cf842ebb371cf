"""Focal and DIoU losses against values worked out by hand from their defining formulas."""

import math

import pytest
import torch

from blockdrop.models.losses import diou_loss, sigmoid_focal_loss

# torchvision.ops.sigmoid_focal_loss: alpha_t * (1 - p_t)^gamma * BCE, alpha=0.25, gamma=2.
# Worked in plain floating point (math module), e.g. logit 0, target 1:
# p = 0.5, BCE = ln 2, (1 - p_t)^2 = 0.25, alpha_t = 0.25 -> 0.0625 * ln 2.
FOCAL_CASES = [
    (0.0, 1.0, 0.0625 * math.log(2)),  # 0.04332169878499658
    (0.0, 0.0, 0.1875 * math.log(2)),  # alpha_t = 0.75
    (2.0, 1.0, 0.0004508907088100953),  # easy positive: tiny
    (3.0, 0.0, 2.074710330768949),  # confident false positive: large
    (-1.0, 0.5, 0.10165771093977785),  # soft target (label smoothing): p_t = 0.5, alpha_t = 0.5
]


@pytest.mark.parametrize("logit,target,expected", FOCAL_CASES)
def test_focal_matches_hand_values(logit, target, expected):
    got = sigmoid_focal_loss(torch.tensor([logit]), torch.tensor([target]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_focal_reductions_and_options():
    logits = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    per_elem = sigmoid_focal_loss(logits, targets, reduction="none")
    assert per_elem.shape == (2, 2)
    assert sigmoid_focal_loss(logits, targets, reduction="sum").item() == pytest.approx(per_elem.sum().item())
    assert sigmoid_focal_loss(logits, targets, reduction="mean").item() == pytest.approx(per_elem.mean().item())
    # gamma 0 and no alpha: plain binary cross-entropy, ln(1 + e^-2) for logit 2, target 1
    plain = sigmoid_focal_loss(torch.tensor([2.0]), torch.tensor([1.0]), alpha=-1, gamma=0.0)
    assert plain.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(logits, targets, reduction="avg")


def test_diou_hand_values():
    pred = torch.tensor([[0.0, 4.0], [0.0, 1.0], [2.0, 5.0], [1.0, 3.0]])
    target = torch.tensor([[2.0, 6.0], [3.0, 4.0], [2.0, 5.0], [0.0, 4.0]])
    expected = [
        1 - 2 / 6 + (2 / 6) ** 2,  # overlap 2, union 6; centres 2 vs 4, enclosing [0, 6]
        1 - 0 + (3 / 4) ** 2,  # disjoint: centres 0.5 vs 3.5, enclosing [0, 4]
        0.0,  # identical
        1 - 2 / 4 + 0.0,  # nested, same centre: only the IoU term
    ]
    got = diou_loss(pred, target)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert diou_loss(pred, target, reduction="sum").item() == pytest.approx(sum(expected), abs=1e-5)


def test_diou_is_translation_and_scale_invariant_so_offsets_work():
    # offsets (left, right) from a shared point t are segments [t - left, t + right]
    # pred offsets (1, 3) and target offsets (2, 2) from the same point
    as_segments = diou_loss(torch.tensor([[-1.0, 3.0]]), torch.tensor([[-2.0, 2.0]]))
    moved = diou_loss(torch.tensor([[9.0, 13.0]]) * 4, torch.tensor([[8.0, 12.0]]) * 4)
    assert as_segments.item() == pytest.approx(moved.item(), abs=1e-6)
    # overlap 3 (of [-1, 3] and [-2, 2]), union 5, centre distance 1, enclosing 5
    assert as_segments.item() == pytest.approx(1 - 3 / 5 + (1 / 5) ** 2, abs=1e-6)


def test_empty_inputs_give_zero_with_graph():
    pred = torch.zeros(0, 2, requires_grad=True)
    loss = diou_loss(pred, torch.zeros(0, 2), reduction="mean")
    assert loss.item() == 0.0
    loss.backward()  # still differentiable
