"""Detector = backbone + head, and the unit conversions between them.

The dataset speaks *input steps* (frames / samples); the head speaks *feature steps*.
``feature_step = input_step / backbone.feature_stride``. This module is the only place
that converts: ground truth on the way in (divide), detections on the way out (multiply).

Batch format (from the dataset): ``inputs`` (B, T_in, ...), ``mask`` (B, T_in) bool,
``segments`` list of B (N, 2) tensors in input steps, ``labels`` list of B (N,) tensors.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from blockdrop.models.actionformer import HeadOutput, pad_to_multiple


@dataclass
class DetectorOutput:
    head: HeadOutput  # per-point predictions in feature steps (length padded for the pyramid)
    features: torch.Tensor  # (B, C, T_feat) backbone output, before padding
    feature_mask: torch.Tensor  # (B, T_feat) bool, valid feature steps
    blocks: list | None = None  # backbone block outputs, when asked for with return_blocks=True


def feature_mask(mask_input_steps: torch.Tensor, num_feature_steps: int, feature_stride: float) -> torch.Tensor:
    """(B, T_in) bool -> (B, T_feat) bool.

    Feature step j is valid when the input step where it starts, floor(j * stride), is valid;
    steps starting past the input's end are invalid. For the usual valid-prefix masks this
    marks every feature step that covers at least one valid input step.
    """
    start = torch.floor(torch.arange(num_feature_steps, device=mask_input_steps.device) * feature_stride).long()
    inside = start < mask_input_steps.shape[1]  # (T_feat,)
    picked = mask_input_steps[:, start.clamp(max=mask_input_steps.shape[1] - 1)]  # (B, T_feat)
    return picked & inside


class Detector(nn.Module):
    """Runs ``backbone`` then ``head``; knows the step conversions and nothing about compression."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def feature_stride(self) -> float:
        """Input steps per feature step (from the backbone)."""
        return self.backbone.feature_stride

    def forward(self, inputs: torch.Tensor, mask_input_steps: torch.Tensor, return_blocks: bool = False) -> DetectorOutput:
        """inputs (B, T_in, ...), mask (B, T_in) bool -> DetectorOutput."""
        if return_blocks:
            features, blocks = self.backbone(inputs, return_blocks=True)  # (B, C, T_feat), list
        else:
            features, blocks = self.backbone(inputs), None
        mask = feature_mask(mask_input_steps, features.shape[-1], self.feature_stride)  # (B, T_feat)
        output = self.forward_from_features(features, mask)
        output.blocks = blocks
        return output

    def forward_from_features(self, features: torch.Tensor, mask: torch.Tensor) -> DetectorOutput:
        """Finish with the head from backbone features (B, C, T_feat) and their mask (B, T_feat).

        For callers that run the backbone themselves (block by block, or with blocks skipped).
        The length is zero-padded to a multiple of the head's coarsest stride.
        """
        padded, padded_mask = pad_to_multiple(features, mask, self.head.max_stride)
        return DetectorOutput(self.head(padded, padded_mask), features, mask)

    # ---- ground truth ------------------------------------------------------------------------

    def to_feature_steps(self, batch: dict) -> tuple[list, list]:
        """The batch's segments (input steps) -> (segments in feature steps, labels), on the model's device."""
        device = batch["mask"].device
        segments = [torch.as_tensor(s, dtype=torch.float32, device=device) / self.feature_stride
                    for s in batch["segments"]]
        labels = [torch.as_tensor(lab, dtype=torch.long, device=device) for lab in batch["labels"]]
        return segments, labels

    def assign(self, batch: dict, output: DetectorOutput):
        """Head targets for this batch: (cls_targets (B, P, K), reg_targets (B, P, 2), positive (B, P)).

        ``positive`` is the mask of ground-truth-assigned points (never a padded one); the
        alignment loss uses it to compare student and teacher segments.
        """
        segments, labels = self.to_feature_steps(batch)
        return self.head.assign(output.head.points, segments, labels, output.head.valid)

    def losses(self, batch: dict, output: DetectorOutput | None = None) -> dict[str, torch.Tensor]:
        """The head's named losses ({"cls", "reg", "total"}); pass ``output`` to reuse a forward pass."""
        if output is None:
            output = self(batch["inputs"], batch["mask"])
        segments, labels = self.to_feature_steps(batch)
        return self.head.losses(output.head, segments, labels)

    @torch.no_grad()
    def predict(self, batch: dict, **inference_kwargs) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per window, before NMS: (segments (N, 2) in input steps, scores (N,), labels (N,)).

        Runs in whatever mode the model is in; call ``.eval()`` first for inference.
        ``inference_kwargs`` go to the head (pre_nms_thresh, pre_nms_topk, duration_thresh).
        """
        output = self(batch["inputs"], batch["mask"])
        detections = self.head.inference(output.head, **inference_kwargs)
        return [(segs * self.feature_stride, scores, labels) for segs, scores, labels in detections]
