"""`blockdrop eval`: score a saved detector (trained or compressed) once on one subset.

The model rebuilds from its own checkpoint; the config says where the data is and how to score.
A checkpoint of another architecture than the config's (backbone, head, or the data keys that shape
its input: kind, window, frame size, rate) is refused, naming the keys, as `compress --teacher`
is: its windows would be cut for another model, and a wrong config is the likelier mistake.
"""

from __future__ import annotations

from pathlib import Path

from blockdrop.core import distributed as dist
from blockdrop.core.errors import ConfigError
from blockdrop.core.fileio import check_output_file, is_json_object
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes.build import load_detector, load_experiment_annotations, make_dataset, make_source, split_annotations
from blockdrop.recipes.compress import check_teacher
from blockdrop.tad.inference import evaluate
from blockdrop.tad.postprocess import save_results


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path, *, subset: str | None = None,
                        predictions_out: str | Path | None = None) -> dict:
    """Score a saved detector on one subset (default: the config's test subset)."""
    if predictions_out is not None:
        check_output_file(predictions_out, "--predictions", ours=is_json_object, what="a JSON file (earlier predictions)")
    model, builder = load_detector(checkpoint, "--checkpoint")
    model.to(dist.init_from_env())  # the GPU when there is one (this process's under torchrun)
    annotations = load_experiment_annotations(cfg.data)
    check_teacher(cfg, builder, annotations, Path(checkpoint), role="checkpoint")
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
