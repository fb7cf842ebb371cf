"""Run a detector over test windows, merge per video, score against the annotations.

windows -> detector.predict (input steps) -> per-video merge + soft-NMS (seconds)
-> results JSON -> ActivityNet-standard mAP. Used for validation during training,
for `blockdrop eval`, and by the compression engine.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from blockdrop.data.annotations import Annotations
from blockdrop.data.dataset import TADDataset, collate_windows
from blockdrop.tad.evaluation import detection_map
from blockdrop.core.schema import EvalConfig
from blockdrop.tad.postprocess import PostprocessConfig, detections_to_results, postprocess_video


def postprocess_config(cfg: EvalConfig) -> PostprocessConfig:
    return PostprocessConfig(min_score=cfg.min_score, pre_nms_top_k=cfg.pre_nms_topk, sigma=cfg.nms_sigma,
                             voting_threshold=cfg.voting_threshold, max_segments=cfg.max_segments)


@torch.no_grad()
def predict_windows(model: nn.Module, dataset: TADDataset, cfg: EvalConfig, device: torch.device | None = None):
    """{video_id: [(segments (N, 2) input steps in the window, scores, labels, window_start)]}."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                                         collate_fn=collate_windows)
    per_video = defaultdict(list)
    for batch in loader:
        inputs, mask = batch["inputs"].to(device), batch["mask"].to(device)
        detections = model.predict({"inputs": inputs, "mask": mask}, pre_nms_thresh=cfg.min_score,
                                   pre_nms_topk=cfg.pre_nms_topk)
        for i, (segs, scores, labels) in enumerate(detections):
            start = int(batch["window_start"][i])
            per_video[batch["video_id"][i]].append((segs.cpu(), scores.cpu(), labels.cpu(), start))
    model.train(was_training)
    return per_video


def predict_results(model: nn.Module, dataset: TADDataset, annotations: Annotations, cfg: EvalConfig) -> dict:
    """The predictions JSON ({"results": ...}) for every video of ``dataset``."""
    windows = predict_windows(model, dataset, cfg)
    config = postprocess_config(cfg)
    per_video = {}
    for video_id, wins in windows.items():
        info = annotations.videos[video_id]
        # predict() already returns input steps: feature_stride 1 here
        per_video[video_id] = postprocess_video(wins, feature_stride=1, rate=dataset.rate, duration=info.duration,
                                                config=config)
    return detections_to_results(per_video, annotations.classes)


def evaluate(model: nn.Module, dataset: TADDataset, cfg: EvalConfig) -> dict:
    """mAP (percent) of ``model`` on the videos of ``dataset``, plus the predictions themselves."""
    results = predict_results(model, dataset, dataset.annotations, cfg)
    metrics = detection_map(dataset.annotations.to_json(), results, cfg.tiou_thresholds)
    metrics["predictions"] = results
    return metrics
