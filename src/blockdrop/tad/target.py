"""The detector's compression target: how the engine sees `models.detector.Detector`.

A batch is the dataset's window batch (``inputs``, ``mask``, ``segments``, ``labels``,
``video_id``, ``window_start``). Selection scores a sub-network by detection mAP on the target's
dataset, through the same window inference and post-processing as `blockdrop eval`
(tad/inference.py). Alignment adds the head's two distillation terms of the released recipe:

- cls_kd: KL(teacher || student) of the temperature-softened class scores at valid points, * T^2;
- reg_kd: DIoU between student and teacher decoded segments at ground-truth-assigned points.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F

from blockdrop.core.errors import BlockdropError
from blockdrop.core.schema import EvalConfig
from blockdrop.data.dataset import TADDataset
from blockdrop.models.detector import feature_mask
from blockdrop.models.losses import diou_loss
from blockdrop.tad.inference import score_windows, window_detections

CLS_KD_MODES = ("auto", "softmax", "sigmoid")
# the released recipe trains all LayerNorms, the patch embedding (our `tokenizer`) and the whole head
DETECTOR_TRAINABLE = ("norm", "tokenizer", "head")


def class_kd(student_logits, teacher_logits, valid, temperature: float = 3.5, mode: str = "auto") -> torch.Tensor:
    """Distillation of (B, P, K) class logits over the valid (B, P) points, mean per point, * T^2.

    softmax: KL(softmax(z_T / T) || softmax(z_S / T)) over the K classes (the released recipe).
    sigmoid: sum over classes of KL(Bernoulli(sigmoid(z_T / T)) || Bernoulli(sigmoid(z_S / T))),
    matching a head trained with per-class sigmoid (focal) losses. auto: softmax when K > 1,
    sigmoid when K == 1, where the softmax of one class is 1 and its KL identically zero.
    """
    if mode not in CLS_KD_MODES:
        raise BlockdropError(f"cls_kd mode must be one of {CLS_KD_MODES}, got {mode!r}")
    zs, zt = student_logits[valid].float() / temperature, teacher_logits[valid].float() / temperature  # (V, K)
    if mode == "softmax" or (mode == "auto" and zs.shape[-1] > 1):
        log_ps, log_pt = F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1)
        per_point = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:  # log p = logsigmoid(z), log(1 - p) = logsigmoid(-z): stable for large logits
        pt = torch.sigmoid(zt)
        per_point = (pt * (F.logsigmoid(zt) - F.logsigmoid(zs))
                     + (1 - pt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))).sum(-1)
    mean = per_point.mean() if per_point.numel() else per_point.sum() * 0.0
    return mean * temperature ** 2


def segment_kd(student_segments, teacher_segments, positive) -> torch.Tensor:
    """Mean DIoU loss between (B, P, 2) student and teacher segments at the positive (B, P) points.

    A pair of identical segments counts 0 even when both have zero length (where DIoU itself,
    IoU 0 / 0, would say 1): ReLU offsets make such segments common in an untrained head.
    """
    s, t = student_segments[positive].float(), teacher_segments[positive].float()  # (N, 2)
    loss = torch.where((s == t).all(-1), torch.zeros_like(s[:, 0]), diou_loss(s, t))
    return loss.mean() if loss.numel() else loss.sum() * 0.0


class DetectorTarget:
    """`CompressionTarget` (Supervised and Scored) for a Detector over a `TADDataset`'s windows.

    ``predict`` keeps each window's candidates (input steps) with its video id; ``score`` merges
    them per video, runs soft-NMS and computes ActivityNet-standard mAP on the dataset's
    annotations, exactly as `blockdrop eval` does.
    """

    stack_path = "backbone.blocks"
    trainable = DETECTOR_TRAINABLE
    distill_terms = ("cls_kd", "reg_kd")

    def __init__(self, dataset: TADDataset, eval_cfg: EvalConfig, *, temperature: float = 3.5,
                 cls_kd: str = "auto"):
        if not temperature > 0:
            raise BlockdropError(f"alignment temperature must be positive, got {temperature}")
        if cls_kd not in CLS_KD_MODES:
            raise BlockdropError(f"cls_kd must be one of {CLS_KD_MODES}, got {cls_kd!r}")
        self.dataset, self.eval_cfg = dataset, eval_cfg
        self.temperature, self.cls_kd = temperature, cls_kd

    def embed(self, model, batch):
        return model.backbone.embed(batch["inputs"])  # (tokens (B', N, C), ctx)

    def call_block(self, block, tokens, ctx):
        # a clip backbone's ctx carries the window layout its AdaTAD adapters need (models/adapters.py)
        layout = getattr(ctx, "layout", None)
        return block(tokens) if layout is None else block(tokens, layout)

    def finish(self, model, tokens, ctx, batch):
        features = model.backbone.pool(tokens, ctx)  # (B, C, T_feat)
        mask = feature_mask(batch["mask"], features.shape[-1], model.feature_stride)
        return model.forward_from_features(features, mask)

    def task_loss(self, model, output, batch):
        return model.losses(batch, output)

    def predict(self, model, output, batch):
        return window_detections(model, output, batch, self.eval_cfg)

    def score(self, predictions: list) -> dict:
        """mAP against the videos the predictions cover (all of them for a full pass; the ones seen
        so far in a round of successive halving)."""
        annotations = self.dataset.annotations
        seen = {p[0] for p in predictions}
        if seen != set(annotations.videos):
            annotations = replace(annotations, videos={v: i for v, i in annotations.videos.items() if v in seen})
        metrics = score_windows(predictions, annotations, self.dataset.rate, self.eval_cfg)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def head_outputs(self, model, output, batch) -> dict:
        """What the distillation terms compare: class logits, decoded segments, valid and positive points."""
        _, _, positive = model.assign(batch, output)
        return {"cls_logits": output.head.cls_logits, "segments": model.head.decode(output.head),
                "valid": output.head.valid, "positive": positive}

    def distill(self, student, s_out, teacher, t_out, batch, weights: Mapping[str, float]) -> dict:
        if not (weights.get("cls_kd") or weights.get("reg_kd")):
            return {}
        s = self.head_outputs(student, s_out, batch)
        with torch.no_grad():
            t = self.head_outputs(teacher, t_out, batch)
        losses = {}
        if weights.get("cls_kd"):
            losses["cls_kd"] = class_kd(s["cls_logits"], t["cls_logits"], s["valid"], self.temperature, self.cls_kd)
        if weights.get("reg_kd"):
            losses["reg_kd"] = segment_kd(s["segments"], t["segments"], s["positive"])
        return losses
