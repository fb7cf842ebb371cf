"""Detector: backbone + head composition, input/feature step conversion, overfitting one batch."""

import pytest
import torch
import torch.nn as nn

from blockdrop.models.actionformer import ActionFormerHead
from blockdrop.models.detector import Detector, feature_mask


pytestmark = pytest.mark.usefixtures("one_thread")


class ResidualConv(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class TinyConvBackbone(nn.Module):
    """Stand-in following the backbone contract: (B, T_in, C_in) -> (B, C, T_in / 4)."""

    feature_stride = 4

    def __init__(self, in_channels: int = 3, width: int = 16, depth: int = 2):
        super().__init__()
        self.stem = nn.Conv1d(in_channels, width, 4, stride=4)
        self.blocks = nn.ModuleList(ResidualConv(width) for _ in range(depth))
        self.out_channels = width

    def embed(self, x):
        return self.stem(x.transpose(1, 2)), None  # tokens (B, C, T_feat), no context

    def pool(self, tokens, ctx):
        return tokens

    def forward(self, x, return_blocks: bool = False):
        tokens, ctx = self.embed(x)
        outputs = []
        for block in self.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        features = self.pool(tokens, ctx)
        return (features, outputs) if return_blocks else features


def tiny_detector(num_classes: int = 2, **head_overrides) -> Detector:
    torch.manual_seed(0)
    head_kwargs = dict(max_seq_len=64, embed_dim=16, head_dim=16, num_heads=2, attn_window=9,
                       drop_path=0.0, init_loss_norm=None)
    head_kwargs.update(head_overrides)
    return Detector(TinyConvBackbone(), ActionFormerHead(16, num_classes, **head_kwargs))


def make_batch(length: int = 256, valid: int = 256, segment=(80.0, 144.0), label: int = 1) -> dict:
    """One window of noise where the action shows: channel 0 steps up, channels 1-2 ramp across it."""
    torch.manual_seed(1)
    inputs = 0.1 * torch.randn(1, length, 3)
    start, end = int(segment[0]), int(segment[1])
    inputs[0, start:end, 0] += 1.0
    inputs[0, start:end, 1] += torch.linspace(0, 1, end - start)
    inputs[0, start:end, 2] += torch.linspace(1, 0, end - start)
    mask = torch.arange(length)[None] < valid
    return {"inputs": inputs, "mask": mask, "segments": [torch.tensor([segment])], "labels": [torch.tensor([label])]}


def test_feature_mask_covers_every_partly_valid_step():
    mask = torch.arange(40)[None] < 22  # valid input steps 0..21
    assert feature_mask(mask, 10, 4).sum().item() == 6  # feature steps 0..5 (5 covers 20..23)
    assert feature_mask(mask, 12, 4)[0, 10:].tolist() == [False, False]  # past the input's end


def test_segments_are_converted_to_feature_steps_for_assignment():
    detector = tiny_detector().eval()
    batch = make_batch(segment=(80.0, 144.0))  # = feature steps [20, 36]
    out = detector(batch["inputs"], batch["mask"])
    _, reg_targets, positive = detector.assign(batch, out)
    points = out.head.points
    found = {(int(points[i, 3]), int(points[i, 0])) for i in positive[0].nonzero().flatten().tolist()}
    assert found == {(2, 28), (4, 24), (4, 28), (4, 32)}  # as for [20, 36] in test_actionformer


def test_forward_from_features_and_return_blocks():
    detector = tiny_detector().eval()
    batch = make_batch(length=200, valid=150)  # 50 feature steps, not a multiple of 32
    with torch.no_grad():
        out = detector(batch["inputs"], batch["mask"], return_blocks=True)
        again = detector.forward_from_features(out.features, out.feature_mask)
    assert out.features.shape == (1, 16, 50) and out.feature_mask.shape == (1, 50)
    assert out.feature_mask.sum() == 38  # ceil(150 / 4)
    assert len(out.blocks) == 2 and torch.equal(out.blocks[-1], out.features)
    assert out.head.level_sizes == (64, 32, 16, 8, 4, 2)
    assert torch.equal(out.head.cls_logits, again.head.cls_logits)
    assert again.blocks is None


def test_predict_returns_input_steps():
    detector = tiny_detector().eval()
    batch = make_batch()
    with torch.no_grad():
        head_dets = detector.head.inference(detector(batch["inputs"], batch["mask"]).head, pre_nms_topk=50)
    segs, scores, labels = detector.predict(batch, pre_nms_topk=50)[0]
    assert len(scores) > 0
    assert torch.allclose(segs, head_dets[0][0] * 4)
    assert torch.allclose(scores, head_dets[0][1])


def test_losses_reuse_an_output():
    detector = tiny_detector().eval()
    batch = make_batch()
    out = detector(batch["inputs"], batch["mask"])
    assert detector.losses(batch)["total"].item() == pytest.approx(detector.losses(batch, out)["total"].item())


def test_overfits_one_batch_and_finds_the_segment():
    # A lean head (1 stem block, 1 conv per tower) keeps 40 steps fast. The seed matters: with
    # only 4 positive points, ActionFormer's ReLU on the offsets can start (and stay) at 0 for
    # all of them in some initialisations (about 1 in 12 here); seed 0 is not one of those.
    detector = tiny_detector(num_stem_blocks=1, head_num_convs=1).train()
    batch = make_batch(segment=(80.0, 144.0), label=1)
    optimizer = torch.optim.Adam(detector.parameters(), lr=5e-3)
    history = []
    for _ in range(40):
        losses = detector.losses(batch)
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append(losses["total"].item())
    assert history[-1] < history[0] / 5

    detector.eval()
    segs, scores, labels = detector.predict(batch)[0]
    best = scores.argmax()
    assert labels[best].item() == 1
    start, end = segs[best].tolist()
    iou = (min(end, 144.0) - max(start, 80.0)) / (max(end, 144.0) - min(start, 80.0))
    assert iou > 0.7, segs[best]
