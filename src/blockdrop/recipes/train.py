"""`blockdrop train`: a detector from a config, its best epoch selected on the validation split.

setup (annotations, source, detector, datasets) -> fit -> save. The run folder holds
config.yaml (as resolved), metrics.jsonl (one line per epoch), train_state.pt (resume),
model.safetensors (best on validation, with the metadata to rebuild it without the config file)
and summary.json. The test split is never touched here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from blockdrop.compress.saving import save_compressed
from blockdrop.core import distributed as dist
from blockdrop.core.fileio import write_json
from blockdrop.core.schema import ExperimentConfig
from blockdrop.core.training import check_schedule, fit, make_loader, seed_everything
from blockdrop.data.dataset import collate_windows
from blockdrop.recipes.build import (build_detector, check_data, check_experiment, data_fingerprint, detector_builder,
                                     input_channels, load_experiment_annotations, make_dataset, make_source,
                                     software_versions, split_annotations, training_record)
from blockdrop.recipes.runs import MODEL_FILE, TRAIN_RUN, run_folder
from blockdrop.tad.inference import evaluate


def detection_loss(model, batch: dict) -> dict:
    """Ground-truth losses of a (possibly DDP-wrapped) detector; forward goes through the wrapper."""
    output = model(batch["inputs"], batch["mask"])
    return dist.unwrap(model).losses(batch, output)


def param_groups(model, cfg: ExperimentConfig) -> list[dict]:
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    if cfg.train.freeze_backbone:
        for p in backbone:
            p.requires_grad_(False)
        backbone = []
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad]}]
    if backbone:
        groups.append({"params": backbone, "lr_mult": cfg.train.backbone_lr_mult})
    return groups


def train_experiment(cfg: ExperimentConfig, *, out: str | Path | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool = True, skip_bad_media: bool = False,
                     allow_config_change: bool = False) -> dict:
    """Train a detector from ``cfg``; select the best epoch on the validation split.

    Everything that can be checked is checked before the run folder is touched: the config
    against the model, the data, every media file (``skip_bad_media`` leaves bad ones out)."""
    check_experiment(cfg)
    out = Path(out or cfg.output)
    device = dist.init_from_env()  # first: rank is only known once the process group is up
    annotations = load_experiment_annotations(cfg.data)
    source = make_source(cfg.data, annotations)
    annotations, skipped = dist.main_result(lambda: check_data(cfg, annotations, source, skip_bad=skip_bad_media))
    identity = {"skipped_media": sorted(skipped),
                "train_annotations": training_record(split_annotations(cfg.data, annotations, cfg.train.seed))}
    with run_folder(cfg, out, resume=resume, overwrite=overwrite, kind=TRAIN_RUN,
                    identity=identity, allow_changes=allow_config_change) as run:
        return _train(cfg, out, device, annotations, source, skipped, resume, progress, run.commit)


def _train(cfg: ExperimentConfig, out: Path, device, annotations, source, skipped: dict, resume: bool,
           progress: bool, commit) -> dict:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    channels = input_channels(cfg.data, annotations, source)
    model = build_detector(cfg, len(annotations.classes), channels).to(device)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    train_ds = make_dataset(cfg, parts["train"], source, train=True, feature_stride=model.feature_stride)
    val_ds = make_dataset(cfg, parts["val"], source, train=False, feature_stride=model.feature_stride)
    loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                         collate_fn=collate_windows, num_workers=cfg.data.num_workers)
    check_schedule(cfg.train, len(loader))
    builder = detector_builder(cfg, annotations.classes, channels)

    def on_best(best_model, record):
        if dist.is_main():
            save_compressed(best_model, out / MODEL_FILE, builder=builder)

    def validate(m):
        return {k: v for k, v in evaluate(m, val_ds, cfg.eval).items() if k != "predictions"}

    start = time.perf_counter()
    result = fit(model, detection_loss, loader, cfg.train, evaluate_fn=validate,
                 select_metric=cfg.eval.best_epoch_metric, param_groups=param_groups(model, cfg),
                 out_dir=out, resume=resume, on_best=on_best, progress=progress, on_checkpoint=lambda _: commit())
    summary = {"best_epoch": result.best_epoch, f"val_{cfg.eval.best_epoch_metric}": result.best_metric,
               "epochs": result.epochs_run, "planned_epochs": cfg.train.epochs,
               "stopped_early": result.stopped_early, "plateaued": result.plateaued,
               "patience": cfg.train.patience, "min_delta": cfg.train.min_delta,
               "wall_time_s": round(time.perf_counter() - start, 1),
               "blocks": model.backbone.depth, "model": str(out / MODEL_FILE),
               "threads": torch.get_num_threads(), "world_size": dist.world_size(),
               "data": data_fingerprint(cfg.data, annotations, source), "skipped_media": skipped,
               "train_annotations": training_record(parts),
               "software": software_versions(cfg.data.kind == "video")}
    if dist.is_main():
        write_json(out / "summary.json", summary)
    return summary
