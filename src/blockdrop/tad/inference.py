"""Run a detector over test windows, merge per video, score against the annotations.

windows -> detector (input steps) -> per-video merge + soft-NMS (seconds) -> results JSON ->
ActivityNet-standard mAP. Used for validation during training, for `blockdrop eval`, and by the
detector's compression target (tad/target.py), which scores candidate sub-networks with the same
`window_detections` and `score_windows`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from blockdrop.core.schema import EvalConfig
from blockdrop.core.torchutil import eval_mode, model_device
from blockdrop.data.annotations import Annotations
from blockdrop.data.dataset import TADDataset, collate_windows
from blockdrop.tad.evaluation import detection_map
from blockdrop.tad.postprocess import PostprocessConfig, detections_to_results, postprocess_video

# one window's candidates: (video id, segments (N, 2) input steps from the window start, scores, labels, start)
WindowDetections = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]


def postprocess_config(cfg: EvalConfig) -> PostprocessConfig:
    return PostprocessConfig(min_score=cfg.min_score, pre_nms_top_k=cfg.pre_nms_topk, sigma=cfg.nms_sigma,
                             voting_threshold=cfg.voting_threshold, max_segments=cfg.max_segments)


@torch.no_grad()
def window_detections(model: nn.Module, output, batch: dict, cfg: EvalConfig) -> list[WindowDetections]:
    """The head's candidates of every window of a batch, from a forward's output, in input steps."""
    detections = model.head.inference(output.head, pre_nms_thresh=cfg.min_score, pre_nms_topk=cfg.pre_nms_topk)
    starts = batch["window_start"]
    return [(batch["video_id"][i], (segs * model.feature_stride).cpu(), scores.cpu(), labels.cpu(), int(starts[i]))
            for i, (segs, scores, labels) in enumerate(detections)]


@torch.no_grad()
def predict_windows(model: nn.Module, dataset: TADDataset, cfg: EvalConfig,
                    device: torch.device | None = None) -> list[WindowDetections]:
    """Every window of ``dataset`` through ``model`` (in eval mode; modes restored after)."""
    device = device or model_device(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                                         collate_fn=collate_windows)
    windows = []
    with eval_mode(model):
        for batch in loader:
            output = model(batch["inputs"].to(device), batch["mask"].to(device))
            windows.extend(window_detections(model, output, batch, cfg))
    return windows


def results_from_windows(windows: list[WindowDetections], annotations: Annotations, rate: float,
                         cfg: EvalConfig) -> dict:
    """The predictions JSON ({"results": ...}): each video's windows merged and soft-NMS'ed, in seconds."""
    by_video = defaultdict(list)
    for video_id, segments, scores, labels, start in windows:
        by_video[video_id].append((segments, scores, labels, start))
    config = postprocess_config(cfg)
    per_video = {video_id: postprocess_video(wins, rate=rate, duration=annotations.videos[video_id].duration,
                                             config=config)
                 for video_id, wins in by_video.items()}
    return detections_to_results(per_video, annotations.classes)


def score_windows(windows: list[WindowDetections], annotations: Annotations, rate: float, cfg: EvalConfig) -> dict:
    """mAP (percent) of window candidates against ``annotations``; plus the predictions themselves."""
    results = results_from_windows(windows, annotations, rate, cfg)
    metrics = detection_map(annotations.to_json(), results, cfg.tiou_thresholds)
    metrics["predictions"] = results
    return metrics


def evaluate(model: nn.Module, dataset: TADDataset, cfg: EvalConfig) -> dict:
    """mAP (percent) of ``model`` on the videos of ``dataset``, plus the predictions themselves."""
    return score_windows(predict_windows(model, dataset, cfg), dataset.annotations, dataset.rate, cfg)
