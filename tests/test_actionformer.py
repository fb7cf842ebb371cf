"""ActionFormer head: points, assignment, masking, normaliser, decoding, inference."""

import math

import pytest
import torch

from blockdrop.core.errors import ConfigError
from blockdrop.models.actionformer import ActionFormerHead, HeadOutput
from blockdrop.models.actionformer_layers import ConvAttention
from blockdrop.models.points import default_regression_ranges, make_points


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_head(**overrides) -> ActionFormerHead:
    torch.manual_seed(0)
    kwargs = dict(max_seq_len=64, embed_dim=16, head_dim=16, num_heads=2, attn_window=5, drop_path=0.0)
    kwargs.update(overrides)
    return ActionFormerHead(8, 3, **kwargs)


def level_points(head, length=64):
    sizes = tuple(length // s for s in head.strides)
    return make_points(sizes, head.strides, head.regression_ranges)


def positives_as_set(points, positive):
    """{(stride, t)} of the positive points of one sample."""
    return {(int(points[i, 3]), int(points[i, 0])) for i in torch.nonzero(positive).flatten().tolist()}


# ---- points ------------------------------------------------------------------------------------


def test_default_regression_ranges():
    assert default_regression_ranges(6) == [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, math.inf)]


def test_point_generator_counts_strides_and_ranges():
    head = tiny_head()
    points = level_points(head)  # T = 64: 64 + 32 + 16 + 8 + 4 + 2
    assert points.shape == (126, 4)
    assert head.strides == (1, 2, 4, 8, 16, 32)
    level4 = points[64 + 32 + 16 + 8 : 64 + 32 + 16 + 8 + 4]  # stride 16
    assert level4[:, 0].tolist() == [0, 16, 32, 48]
    assert level4[:, 1:].tolist() == [[32, 64, 16]] * 4
    assert points[-1].tolist() == [32, 64, math.inf, 32]


# ---- shapes, init, masking ---------------------------------------------------------------------


def test_forward_shapes_when_length_is_not_a_multiple_of_32():
    head = tiny_head().eval()
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 37:] = False
    out = head(torch.randn(2, 8, 50), mask)
    assert out.level_sizes == (64, 32, 16, 8, 4, 2)  # padded to 64
    assert out.cls_logits.shape == (2, 126, 3)
    assert out.offsets.shape == (2, 126, 2) and (out.offsets >= 0).all()
    assert out.points.shape == (126, 4) and out.valid.shape == (2, 126)
    assert out.valid[0, :64].sum() == 50 and out.valid[1, :64].sum() == 37
    assert out.valid[1, 64:96].sum() == 19  # stride-2 level: steps 0, 2, ..., 36
    assert head.decode(out).shape == (2, 126, 2)


def test_classifier_prior_bias():
    head = tiny_head(cls_prior=0.01)
    assert torch.allclose(head.cls_out.bias, torch.full((3,), math.log(0.01 / 0.99)))


@pytest.mark.parametrize("window", [5, None])
def test_padded_content_never_reaches_valid_points(window):
    head = tiny_head(attn_window=window).eval()
    torch.manual_seed(1)
    x = torch.randn(1, 8, 40)
    long_x = torch.cat([x, 100 * torch.randn(1, 8, 10)], dim=2)  # garbage after step 40
    mask = torch.ones(1, 50, dtype=torch.bool)
    mask[:, 40:] = False
    with torch.no_grad():
        # the projection convs alone (level 0 of the pyramid, before the stem)
        conv_a, _ = head.proj_convs[0](x, torch.ones(1, 40, dtype=torch.bool))
        conv_b, _ = head.proj_convs[0](long_x * mask[:, None], mask)
        assert torch.allclose(conv_a, conv_b[..., :40], atol=1e-6)
        a = head(x, torch.ones(1, 40, dtype=torch.bool))
        b = head(long_x, mask)
    assert torch.equal(a.valid, b.valid)
    assert torch.allclose(a.cls_logits[a.valid], b.cls_logits[b.valid], atol=1e-5)
    assert torch.allclose(a.offsets[a.valid], b.offsets[b.valid], atol=1e-5)


def test_local_attention_window_limits_receptive_field():
    torch.manual_seed(0)
    mask = torch.ones(1, 32, dtype=torch.bool)
    x = torch.randn(1, 8, 32)
    x2 = x.clone()
    x2[..., 10] += 5.0
    for window, far_changes in [(3, False), (None, True)]:
        attn = ConvAttention(8, 2, window=window).eval()
        with torch.no_grad():
            diff = (attn(x, mask)[0] - attn(x2, mask)[0]).abs().amax(dim=1)[0]  # (T,)
        # window 3: query i sees keys i-1..i+1, each a 3-tap depthwise conv: steps 8..12 only
        assert diff[8:13].min() > 0
        assert (diff[20:].max() > 1e-6) == far_changes


def test_absolute_positions_are_not_saved_and_stretch_to_longer_inputs():
    head = tiny_head(use_abs_pe=True).eval()
    assert "pos_embed" not in head.state_dict()  # a fixed table, rebuilt from max_seq_len
    with torch.no_grad():
        out = head(torch.randn(1, 8, 128), torch.ones(1, 128, dtype=torch.bool))  # > max_seq_len
    assert out.cls_logits.shape == (1, 252, 3) and torch.isfinite(out.cls_logits).all()


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="regression_ranges"):
        tiny_head(num_levels=4, regression_ranges=[(0, 4), (4, math.inf)])
    with pytest.raises(ConfigError, match="fpn_dim"):
        tiny_head(fpn_dim=32)


# ---- assignment ---------------------------------------------------------------------------------


def test_assignment_centre_region_and_regression_range():
    head = tiny_head()
    points = level_points(head)
    cls_t, reg_t, pos = head.assign(points, [torch.tensor([[20.0, 36.0]])], [torch.tensor([2])])
    # centre 28, radius 1.5 strides; farthest boundary distance must fit the level's range:
    # stride 1: t=27..29, distances 8-9 > 4: none; stride 2: t=26,28,30 -> only t=28 (8 in [4, 8]);
    # stride 4: t=24,28,32 (8..12 in [8, 16]); stride 8: t=24,32 (12 < 16): none.
    assert positives_as_set(points, pos[0]) == {(2, 28), (4, 24), (4, 28), (4, 32)}
    assert cls_t[0][pos[0]].tolist() == [[0, 0, 1]] * 4
    at_24 = ((points[:, 3] == 4) & (points[:, 0] == 24)).nonzero().item()
    assert reg_t[0, at_24].tolist() == [1.0, 3.0]  # (24 - 20) / 4, (36 - 24) / 4


def test_assignment_prefers_the_shorter_segment():
    head = tiny_head()
    points = level_points(head)
    segments = torch.tensor([[20.0, 36.0], [22.0, 30.0]])
    cls_t, reg_t, pos = head.assign(points, [segments], [torch.tensor([0, 1])])
    # [22, 30] alone: stride 1 t=26; stride 2 t=24,26,28. It takes (2, 28) from [20, 36].
    assert positives_as_set(points, pos[0]) == {(1, 26), (2, 24), (2, 26), (2, 28), (4, 24), (4, 28), (4, 32)}
    at = ((points[:, 3] == 2) & (points[:, 0] == 28)).nonzero().item()
    assert cls_t[0, at].tolist() == [0, 1, 0]
    assert reg_t[0, at].tolist() == [3.0, 1.0]  # (28 - 22) / 2, (30 - 28) / 2


def test_assignment_equal_segments_share_multi_hot_labels_and_empty_sample():
    head = tiny_head()
    points = level_points(head)
    same = torch.tensor([[20.0, 36.0], [20.0, 36.0]])
    cls_t, _, pos = head.assign(points, [same, torch.zeros(0, 2)], [torch.tensor([0, 2]), torch.zeros(0)])
    assert cls_t[0][pos[0]].tolist() == [[1, 0, 1]] * 4
    assert not pos[1].any() and cls_t[1].sum() == 0


def test_padded_points_never_become_positive():
    head = tiny_head().eval()
    out = head(torch.randn(1, 8, 64), torch.arange(64)[None] < 30)
    segments = [torch.tensor([[10.0, 40.0]])]  # runs past the valid end (30)
    _, _, pos_unmasked = head.assign(out.points, segments, [torch.tensor([0])])
    _, _, pos = head.assign(out.points, segments, [torch.tensor([0])], valid=out.valid)
    assert (pos_unmasked & ~out.valid).any()  # the check below is not vacuous
    assert pos.any() and not (pos & ~out.valid).any()


# ---- losses and the normaliser ------------------------------------------------------------------


def test_losses_are_finite_named_scalars_and_ema_normaliser_updates():
    head = tiny_head(init_loss_norm=100.0).train()
    out = head(torch.randn(2, 8, 64), torch.ones(2, 64, dtype=torch.bool))
    segments = [torch.tensor([[20.0, 36.0]]), torch.tensor([[20.0, 36.0], [22.0, 30.0]])]
    labels = [torch.tensor([2]), torch.tensor([0, 1])]
    losses = head.losses(out, segments, labels)  # 4 + 7 positives
    assert set(losses) == {"cls", "reg", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["total"], losses["cls"] + losses["reg"])
    assert head.loss_normalizer.item() == pytest.approx(0.9 * 100 + 0.1 * 11)
    losses["total"].backward()

    head.eval()  # evaluating never moves the EMA
    head.losses(out, segments, labels)
    assert head.loss_normalizer.item() == pytest.approx(0.9 * 100 + 0.1 * 11)


def test_normaliser_from_first_batch_and_saved_in_state_dict():
    head = tiny_head(init_loss_norm=None).train()
    out = head(torch.randn(1, 8, 64), torch.ones(1, 64, dtype=torch.bool))
    head.losses(out, [torch.tensor([[20.0, 36.0]])], [torch.tensor([0])])
    assert head.loss_normalizer.item() == 4.0  # first batch's positives, no decay from an arbitrary init
    state = head.state_dict()
    assert state["loss_normalizer"].item() == 4.0
    fresh = tiny_head(init_loss_norm=100.0)
    fresh.load_state_dict(state)
    assert fresh.loss_normalizer.item() == 4.0


def test_label_smoothing_changes_the_classification_loss_only():
    out = tiny_head().eval()(torch.randn(1, 8, 64), torch.ones(1, 64, dtype=torch.bool))
    gt = ([torch.tensor([[20.0, 36.0]])], [torch.tensor([0])])
    plain = tiny_head().eval().losses(out, *gt)
    smooth = tiny_head(label_smoothing=0.1).eval().losses(out, *gt)
    assert smooth["cls"] != plain["cls"] and smooth["reg"] == plain["reg"]


# ---- decoding and inference ---------------------------------------------------------------------


def hand_output(logits, offsets, valid) -> HeadOutput:
    points = torch.tensor([[0.0, 0, 4, 1], [1, 0, 4, 1], [0, 4, math.inf, 2]])
    return HeadOutput(logits[None], offsets[None], points, valid[None], (2, 1))


def test_decode_and_inference_by_hand():
    head = tiny_head()
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.tensor([[logit(0.9), logit(0.0005), logit(0.3)],
                           [logit(0.8), logit(0.6), logit(0.2)],
                           [logit(0.7), logit(0.99), logit(0.95)]])
    offsets = torch.tensor([[0.5, 1.5], [0.01, 0.02], [1.0, 2.0]])
    valid = torch.tensor([True, True, False])  # the stride-2 point is padding
    out = hand_output(logits, offsets, valid)
    assert torch.allclose(head.decode(out)[0], torch.tensor([[-0.5, 1.5], [0.99, 1.02], [-2.0, 4.0]]))

    segs, scores, labels = head.inference(out, pre_nms_thresh=0.001, pre_nms_topk=4, duration_thresh=0.05)[0]
    # above 0.001 and valid: 0.9, 0.3 (point 0); 0.8, 0.6, 0.2 (point 1); top-4 drops 0.2;
    # point 1's segment lasts 0.03 <= 0.05 steps, so its 0.8 and 0.6 go too.
    assert scores.tolist() == pytest.approx([0.9, 0.3])
    assert labels.tolist() == [0, 2]
    assert torch.allclose(segs, torch.tensor([[-0.5, 1.5], [-0.5, 1.5]]))
