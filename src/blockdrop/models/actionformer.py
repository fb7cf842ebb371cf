"""ActionFormer head (Zhang, Wu, Li, ECCV 2022) on backbone features.

features (B, C, T) + mask (B, T)
  -> projection: masked convs (+ LayerNorm + ReLU), then stride-1 transformer "stem" blocks
  -> pyramid: num_levels - 1 stride-2 transformer blocks (levels of stride 1, 2, ..., 2^(L-1))
  -> neck: identity + LayerNorm per level (ActionFormer's "FPNIdentity")
  -> classification and regression towers (conv + LayerNorm + ReLU), shared across levels
  -> per point: class logits (K), offsets (left, right) >= 0 in units of the level stride.

Points, assignment and decoding live in ``points.py``; layers in ``actionformer_layers.py``;
the losses in ``losses.py``. NMS is not done here (see ``blockdrop.tad.postprocess``).
Everything the head returns is in *feature steps* (see docs/architecture.md).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from blockdrop.core.errors import ConfigError
from blockdrop.models.actionformer_layers import (ChannelLayerNorm, MaskedConv1d, Scale, TransformerBlock,
                                  mask_steps, resize_embedding, sinusoid_embedding, zero_biases)
from blockdrop.models.losses import diou_loss, sigmoid_focal_loss
from blockdrop.models.points import (assign_points, decode_offsets, default_regression_ranges, make_points,
                     offsets_as_segments, select_candidates)


@dataclass
class HeadOutput:
    """Per-point predictions, levels concatenated (level 0 first). P = sum(level_sizes)."""

    cls_logits: torch.Tensor  # (B, P, K)
    offsets: torch.Tensor  # (B, P, 2) >= 0, (left, right) in units of the point's stride
    points: torch.Tensor  # (P, 4) [t, reg_lo, reg_hi, stride], t in feature steps
    valid: torch.Tensor  # (B, P) bool, False at padded steps
    level_sizes: tuple[int, ...]  # points per pyramid level


class ConvTower(nn.Module):
    """num_convs x (masked conv + LayerNorm + ReLU), applied to one level at a time."""

    def __init__(self, in_dim: int, dim: int, num_convs: int, kernel_size: int):
        super().__init__()
        self.convs = nn.ModuleList(
            MaskedConv1d(in_dim if i == 0 else dim, dim, kernel_size, bias=False) for i in range(num_convs)
        )
        self.norms = nn.ModuleList(ChannelLayerNorm(dim) for _ in range(num_convs))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x, _ = conv(x, mask)
            x = mask_steps(F.relu(norm(x)), mask)
        return x


class ActionFormerHead(nn.Module):
    """ActionFormer's projection, pyramid, towers, point assignment, losses and decoding.

    ``attn_window``: each query sees keys within +-attn_window // 2 steps of its level
    (19 is ActionFormer's THUMOS setting; None = global attention). ``drop_path`` > 0 also
    adds ActionFormer's learnable residual scales. ``init_loss_norm`` starts the EMA of the
    number of positives (100 as in ActionFormer/OpenTAD; None = the first batch's count).
    ``loss_weight`` multiplies the regression loss in ``"total"``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, max_seq_len: int,
                 embed_dim: int = 512, fpn_dim: int | None = None, head_dim: int = 512,
                 num_levels: int = 6, num_heads: int = 4, attn_window: int | None = 19,
                 num_proj_convs: int = 2, num_stem_blocks: int = 2, head_num_convs: int = 2,
                 kernel_size: int = 3, dropout: float = 0.0, drop_path: float = 0.1,
                 use_abs_pe: bool = False, regression_ranges=None, center_radius: float = 1.5,
                 cls_prior: float = 0.01, loss_weight: float = 1.0, label_smoothing: float = 0.0,
                 init_loss_norm: float | None = 100.0, loss_norm_momentum: float = 0.9):
        super().__init__()
        fpn_dim = embed_dim if fpn_dim is None else fpn_dim
        ranges = default_regression_ranges(num_levels) if regression_ranges is None else regression_ranges
        _check_args(num_classes, num_levels, embed_dim, fpn_dim, ranges, max_seq_len)
        self.num_classes, self.max_seq_len = num_classes, max_seq_len
        self.strides = tuple(2**lvl for lvl in range(num_levels))
        self.regression_ranges = tuple((float(lo), float(hi)) for lo, hi in ranges)
        self.center_radius, self.loss_weight = center_radius, loss_weight
        self.label_smoothing, self.loss_norm_momentum = label_smoothing, loss_norm_momentum

        self.proj_convs = nn.ModuleList(
            MaskedConv1d(in_channels if i == 0 else embed_dim, embed_dim, kernel_size, bias=False)
            for i in range(num_proj_convs)
        )
        self.proj_norms = nn.ModuleList(ChannelLayerNorm(embed_dim) for _ in range(num_proj_convs))
        block = dict(window=attn_window, dropout=dropout, drop_path=drop_path)
        self.stem = nn.ModuleList(TransformerBlock(embed_dim, num_heads, **block) for _ in range(num_stem_blocks))
        self.branch = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, stride=2, **block) for _ in range(num_levels - 1)
        )
        zero_biases(self)  # before the towers: the classifier keeps its prior bias
        self.neck_norms = nn.ModuleList(ChannelLayerNorm(fpn_dim) for _ in range(num_levels))
        self.cls_tower = ConvTower(fpn_dim, head_dim, head_num_convs, kernel_size)
        self.reg_tower = ConvTower(fpn_dim, head_dim, head_num_convs, kernel_size)
        self.cls_out = MaskedConv1d(head_dim, num_classes, kernel_size)
        self.reg_out = MaskedConv1d(head_dim, 2, kernel_size)
        self.reg_scales = nn.ModuleList(Scale() for _ in range(num_levels))
        # prior: every class starts at probability cls_prior, so the focal loss starts small
        nn.init.constant_(self.cls_out.bias, -math.log((1 - cls_prior) / cls_prior))

        pos_embed = sinusoid_embedding(max_seq_len, embed_dim) if use_abs_pe else None
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        # EMA of the number of positive points; a buffer so checkpoints restore it. 0 = unset.
        init = 0.0 if init_loss_norm is None else float(init_loss_norm)
        self.register_buffer("loss_normalizer", torch.tensor(init))

    @property
    def max_stride(self) -> int:
        """Feature lengths are padded to a multiple of this (the coarsest level's stride)."""
        return self.strides[-1]

    # ---- forward -------------------------------------------------------------------------

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> HeadOutput:
        """features (B, C, T), mask (B, T) bool -> HeadOutput over T padded to a multiple of max_stride."""
        features, mask = pad_to_multiple(features, mask, self.max_stride)
        levels, masks = self.forward_pyramid(features, mask)  # L x (B, D, T_l), L x (B, T_l)
        logits, offsets = [], []
        for lvl, (x, m) in enumerate(zip(levels, masks)):
            x = mask_steps(self.neck_norms[lvl](x), m)
            cls, _ = self.cls_out(self.cls_tower(x, m), m)  # (B, K, T_l)
            reg, _ = self.reg_out(self.reg_tower(x, m), m)  # (B, 2, T_l)
            logits.append(cls.transpose(1, 2))
            offsets.append(F.relu(self.reg_scales[lvl](reg)).transpose(1, 2))
        sizes = tuple(x.shape[-1] for x in levels)
        points = make_points(sizes, self.strides, self.regression_ranges, device=features.device)
        return HeadOutput(torch.cat(logits, 1), torch.cat(offsets, 1), points, torch.cat(masks, 1), sizes)

    def forward_pyramid(self, features: torch.Tensor, mask: torch.Tensor):
        """Projection + stem + downsampling blocks: lists of (B, D, T / 2^l) features and (B, T / 2^l) masks."""
        x = mask_steps(features, mask)  # what the backbone wrote at padded steps must not leak
        for conv, norm in zip(self.proj_convs, self.proj_norms):
            x, _ = conv(x, mask)
            x = mask_steps(F.relu(norm(x)), mask)
        if self.pos_embed is not None:
            x = x + mask_steps(resize_embedding(self.pos_embed, x.shape[-1]), mask)
        for block in self.stem:
            x, mask = block(x, mask)
        levels, masks = [x], [mask]
        for block in self.branch:
            x, mask = block(x, mask)
            levels.append(x)
            masks.append(mask)
        return levels, masks

    # ---- training --------------------------------------------------------------------------

    def assign(self, points, gt_segments, gt_labels, valid=None):
        """Targets per point: (cls_targets (B, P, K), reg_targets (B, P, 2) in strides, positive (B, P)).

        gt_segments: list of B (N, 2) tensors in feature steps; gt_labels: list of B (N,).
        Pass ``valid`` (B, P) to keep padded points from ever being positive.
        """
        return assign_points(points, gt_segments, gt_labels, self.num_classes, self.center_radius, valid)

    def losses(self, output: HeadOutput, gt_segments, gt_labels) -> dict[str, torch.Tensor]:
        """{"cls", "reg", "total"}: focal and DIoU sums over the batch, divided by the EMA normaliser.

        The EMA is updated in training mode only; in eval mode the batch's own number of
        positives is used, so evaluating never changes the model's state.
        """
        cls_targets, reg_targets, positive = self.assign(output.points, gt_segments, gt_labels, output.valid)
        normalizer = self._normalizer(positive.sum())
        targets = cls_targets[output.valid]  # (V, K)
        targets = targets * (1 - self.label_smoothing) + self.label_smoothing / (self.num_classes + 1)
        cls = sigmoid_focal_loss(output.cls_logits[output.valid], targets, reduction="sum") / normalizer
        pred = offsets_as_segments(output.offsets[positive])  # (N_pos, 2)
        reg = diou_loss(pred, offsets_as_segments(reg_targets[positive]), reduction="sum") / normalizer
        return {"cls": cls, "reg": reg, "total": cls + self.loss_weight * reg}

    def _normalizer(self, num_positive: torch.Tensor) -> torch.Tensor:
        count = num_positive.clamp(min=1).float()
        if not self.training:
            return count
        with torch.no_grad():
            m, old = self.loss_norm_momentum, self.loss_normalizer
            ema = m * old + (1 - m) * count
            self.loss_normalizer.copy_(torch.where(old > 0, ema, count))  # 0: first batch sets it
        return self.loss_normalizer.clone()

    # ---- inference -------------------------------------------------------------------------

    def decode(self, output: HeadOutput) -> torch.Tensor:
        """Predicted segment at every point: (B, P, 2) [start, end] in feature steps."""
        return decode_offsets(output.points, output.offsets)

    @torch.no_grad()
    def inference(self, output: HeadOutput, *, pre_nms_thresh: float = 0.001, pre_nms_topk: int = 2000,
                  duration_thresh: float = 0.05):
        """Per window, before NMS: list of B (segments (N, 2) feature steps, scores (N,), labels (N,))."""
        probs = output.cls_logits.sigmoid() * output.valid[..., None]  # (B, P, K)
        segments = self.decode(output)  # (B, P, 2)
        return [
            select_candidates(p, s, pre_nms_thresh=pre_nms_thresh, pre_nms_topk=pre_nms_topk,
                              duration_thresh=duration_thresh)
            for p, s in zip(probs, segments)
        ]


def pad_to_multiple(features: torch.Tensor, mask: torch.Tensor, multiple: int):
    """Right-pad (B, C, T) features with zeros and (B, T) mask with False to a multiple of ``multiple``."""
    pad = -features.shape[-1] % multiple
    if pad == 0:
        return features, mask
    return F.pad(features, (0, pad)), F.pad(mask, (0, pad), value=False)


def _check_args(num_classes, num_levels, embed_dim, fpn_dim, ranges, max_seq_len) -> None:
    if num_classes < 1:
        raise ConfigError(f"head: num_classes must be >= 1, got {num_classes}")
    if num_levels < 1:
        raise ConfigError(f"head: num_levels must be >= 1, got {num_levels}")
    if fpn_dim != embed_dim:
        raise ConfigError(f"head: fpn_dim ({fpn_dim}) must equal embed_dim ({embed_dim}); the neck is an identity")
    if len(ranges) != num_levels:
        raise ConfigError(f"head: regression_ranges has {len(ranges)} entries for num_levels={num_levels}")
    if max_seq_len < 1:
        raise ConfigError(f"head: max_seq_len must be >= 1, got {max_seq_len}")
