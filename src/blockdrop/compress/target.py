"""How the compression engine sees a model: a small protocol, and its TAD implementation.

The engine (selection, alignment, the progressive loop) only calls the methods of
``CompressionTarget``; it never imports the detector. A user's own model is compressed by
writing the same handful of callables for it (see ``SequentialTarget`` in the tests for a
minimal one). The methods take the model explicitly, so one target serves the teacher, the
student and every candidate sub-network.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

import torch
from torch import nn

from blockdrop.compress.stack import find_block_stack


class CompressionTarget(Protocol):
    stack_path: str  # dotted path of the block stack inside the model

    def embed(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Any]: ...

    def finish(self, model: nn.Module, tokens: torch.Tensor, ctx: Any, batch: dict) -> Any: ...

    def task_loss(self, model: nn.Module, output: Any, batch: dict) -> dict: ...

    def predict(self, model: nn.Module, output: Any, batch: dict) -> Any: ...

    def score(self, predictions: list) -> dict: ...

    def align_outputs(self, model: nn.Module, output: Any, batch: dict) -> dict: ...


def blocks_of(model: nn.Module, target: CompressionTarget) -> nn.ModuleList:
    return find_block_stack(model, target.stack_path).modules


def run_blocks(model: nn.Module, target: CompressionTarget, batch: dict, *, skip: int | None = None,
               return_blocks: bool = False):
    """The model's forward through the target: embed -> blocks (without current block ``skip``) -> finish.

    Returns (output, block outputs) with ``return_blocks``: one tensor per block that ran.
    """
    tokens, ctx = target.embed(model, batch)
    outputs = []
    for i, block in enumerate(blocks_of(model, target)):
        if i == skip:
            continue
        tokens = block(tokens)
        if return_blocks:
            outputs.append(tokens)
    output = target.finish(model, tokens, ctx, batch)
    return (output, outputs) if return_blocks else output


class DetectorTarget:
    """``CompressionTarget`` for ``models.detector.Detector`` over a ``TADDataset``'s windows.

    ``predict`` keeps each window's candidates (input steps) with its video id; ``score``
    merges them per video, runs soft-NMS and computes ActivityNet-standard mAP on the
    dataset's annotations, exactly as ``blockdrop.tad.inference.evaluate`` does.
    """

    stack_path = "backbone.blocks"

    def __init__(self, dataset, eval_cfg):
        self.dataset, self.eval_cfg = dataset, eval_cfg

    def embed(self, model, batch):
        return model.backbone.embed(batch["inputs"])  # (tokens (B', N, C), ctx)

    def finish(self, model, tokens, ctx, batch):
        from blockdrop.models.detector import feature_mask

        features = model.backbone.pool(tokens, ctx)  # (B, C, T_feat)
        mask = feature_mask(batch["mask"], features.shape[-1], model.feature_stride)
        return model.forward_from_features(features, mask)

    def task_loss(self, model, output, batch):
        return model.losses(batch, output)

    @torch.no_grad()
    def predict(self, model, output, batch):
        detections = model.head.inference(output.head, pre_nms_thresh=self.eval_cfg.min_score,
                                          pre_nms_topk=self.eval_cfg.pre_nms_topk)
        starts = batch["window_start"]
        return [(batch["video_id"][i], (segs * model.feature_stride).cpu(), scores.cpu(), labels.cpu(), int(starts[i]))
                for i, (segs, scores, labels) in enumerate(detections)]

    def score(self, predictions: list) -> dict:
        from blockdrop.tad.evaluation import detection_map
        from blockdrop.tad.inference import postprocess_config
        from blockdrop.tad.postprocess import detections_to_results, postprocess_video

        windows = defaultdict(list)
        for video_id, segs, scores, labels, start in predictions:
            windows[video_id].append((segs, scores, labels, start))
        annotations = self.dataset.annotations
        config = postprocess_config(self.eval_cfg)
        per_video = {vid: postprocess_video(w, feature_stride=1, rate=self.dataset.rate,
                                            duration=annotations.videos[vid].duration, config=config)
                     for vid, w in windows.items()}
        results = detections_to_results(per_video, annotations.classes)
        metrics = detection_map(annotations.to_json(), results, self.eval_cfg.tiou_thresholds)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def align_outputs(self, model, output, batch):
        _, _, positive = model.assign(batch, output)
        return {"cls_logits": output.head.cls_logits, "segments": model.head.decode(output.head),
                "valid": output.head.valid, "positive": positive}
