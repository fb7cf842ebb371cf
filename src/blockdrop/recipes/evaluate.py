"""`blockdrop eval`: score a saved detector (trained or compressed) once on one subset.

The model rebuilds from its own checkpoint; the config says where the data is and how to score.
"""

from __future__ import annotations

from pathlib import Path

from blockdrop.core import distributed as dist
from blockdrop.core.errors import ConfigError
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes.build import load_detector, load_experiment_annotations, make_dataset, make_source, split_annotations
from blockdrop.tad.inference import evaluate
from blockdrop.tad.postprocess import save_results


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path, *, subset: str | None = None,
                        predictions_out: str | Path | None = None) -> dict:
    """Score a saved detector on one subset (default: the config's test subset)."""
    model, builder = load_detector(checkpoint)
    model.to(dist.init_from_env())  # the GPU when there is one (this process's under torchrun)
    annotations = load_experiment_annotations(cfg.data)
    if list(annotations.classes) != list(builder["classes"]):
        raise ConfigError(f"{checkpoint}: the model's classes differ from {cfg.data.root}/{cfg.data.annotations}")
    source = make_source(cfg.data, annotations)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    if subset in (None, "test", "val", "train"):
        part = parts[subset or "test"]
    else:
        part = annotations.subset(subset)
        if not part.videos:
            raise ConfigError(f"--subset {subset}: no videos in {cfg.data.root}/{cfg.data.annotations}")
    dataset = make_dataset(cfg, part, source, train=False, feature_stride=model.feature_stride)
    metrics = evaluate(model, dataset, cfg.eval)
    predictions = metrics.pop("predictions")
    if predictions_out is not None and dist.is_main():
        save_results(predictions, predictions_out)
    metrics["subset"] = subset or "test"
    metrics["blocks"] = model.backbone.depth
    return metrics
