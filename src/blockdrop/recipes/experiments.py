"""Recipes: `blockdrop train` and `blockdrop eval`, each a readable setup -> run -> save.

A run folder holds: config.yaml (as resolved), metrics.jsonl (one line per epoch),
train_state.pt (resume), model.safetensors (best on validation, with the metadata to
rebuild it without the config file), summary.json. The test split is only ever
touched by `evaluate_checkpoint`, never for selection.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from blockdrop.core import distributed as dist
from blockdrop.recipes.build import (build_detector, build_from_builder, data_fingerprint, detector_builder, input_channels,
                             load_experiment_annotations, make_dataset, make_source, software_versions,
                             split_annotations)
from blockdrop.core.config import save_config
from blockdrop.data.dataset import collate_windows
from blockdrop.core.fileio import atomic_write_text
from blockdrop.core.errors import ConfigError
from blockdrop.core.schema import ExperimentConfig
from blockdrop.tad.inference import evaluate
from blockdrop.core.training import fit, make_loader, seed_everything

MODEL_FILE = "model.safetensors"


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


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"{out}: output folder is not empty; pass --resume to continue or --overwrite to replace")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:  # the user asked to start over: clear what a previous run left
        import shutil

        for name in ("metrics.jsonl", "train_state.pt", "history.json", MODEL_FILE, "summary.json"):
            (out / name).unlink(missing_ok=True)
        for step in out.glob("step_*"):
            shutil.rmtree(step)


def train_experiment(cfg: ExperimentConfig, *, out: str | Path | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool = True) -> dict:
    """Train a detector from ``cfg``; select the best epoch on the validation split."""
    from blockdrop.compress.saving import save_compressed

    out = Path(out or cfg.output)
    device = dist.init_from_env()  # first: rank is only known once the process group is up
    annotations = load_experiment_annotations(cfg.data)  # before the output folder is touched
    if dist.is_main():
        _prepare_output(out, resume, overwrite)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    source = make_source(cfg.data, annotations)
    channels = input_channels(cfg.data, annotations, source)
    model = build_detector(cfg, len(annotations.classes), channels).to(device)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    train_ds = make_dataset(cfg, parts["train"], source, train=True, feature_stride=model.feature_stride)
    val_ds = make_dataset(cfg, parts["val"], source, train=False, feature_stride=model.feature_stride)
    loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                         collate_fn=collate_windows, num_workers=cfg.data.num_workers)
    builder = detector_builder(cfg, annotations.classes, channels)

    def on_best(best_model, record):
        if dist.is_main():
            save_compressed(best_model, out / MODEL_FILE, builder=builder)

    def validate(m):
        return {k: v for k, v in evaluate(m, val_ds, cfg.eval).items() if k != "predictions"}

    start = time.perf_counter()
    result = fit(model, detection_loss, loader, cfg.train, evaluate_fn=validate,
                 select_metric=cfg.eval.select_metric, param_groups=param_groups(model, cfg),
                 out_dir=out, resume=resume, on_best=on_best, progress=progress)
    summary = {"best_epoch": result.best_epoch, f"val_{cfg.eval.select_metric}": result.best_metric,
               "epochs": result.epochs_run, "wall_time_s": round(time.perf_counter() - start, 1),
               "blocks": model.backbone.depth, "model": str(out / MODEL_FILE),
               "threads": torch.get_num_threads(), "world_size": dist.world_size(),
               "data": data_fingerprint(cfg.data, annotations, source),
               "software": software_versions(cfg.data.kind == "video")}
    if dist.is_main():
        write_json(out / "summary.json", summary)
    return summary


def load_detector(path: str | Path):
    """A detector saved by `train` or `compress`, rebuilt from its own metadata (no config needed)."""
    from blockdrop.compress.saving import load_compressed, read_compressed_metadata

    model = load_compressed(path, build_from_builder)
    return model, read_compressed_metadata(path).builder


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path, *, subset: str | None = None,
                        predictions_out: str | Path | None = None) -> dict:
    """Score a saved detector on one subset (default: the config's test subset)."""
    from blockdrop.tad.postprocess import save_results

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
    if predictions_out is not None:
        if dist.is_main():
            save_results(predictions, predictions_out)
    metrics["subset"] = subset or "test"
    metrics["blocks"] = model.backbone.depth
    return metrics


def measure_detector(model, cfg: ExperimentConfig, channels: int) -> dict:
    """Cost of one test window (batch 1): operator-level GMACs (all, backbone), params, and the
    latency on the model's device (CPU: with ``compress.latency_threads`` threads)."""
    from blockdrop.recipes.build import example_window
    from blockdrop.core.measure import count_macs, count_params, measure_latency

    device = dist.model_device(model)
    inputs, mask = (t.to(device) for t in example_window(cfg, channels))
    latency = measure_latency(model, inputs, mask, threads=cfg.compress.latency_threads, min_run_time=1.0)
    return {"gmacs": count_macs(model, inputs, mask)["gmacs"],
            "backbone_gmacs": count_macs(model.backbone, inputs)["gmacs"],
            "params": count_params(model)["total"], "latency_ms": latency["median_ms"],
            "latency_iqr_ms": latency["iqr_ms"], "latency_device": latency["device"]}


def selection_setup(cfg: ExperimentConfig, model, annotations=None, source=None):
    """(target, loader) over the selection split: training videos in test-mode windows (no
    augmentation), optionally a seeded subset of ``compress.selection_videos`` of them."""
    from dataclasses import replace

    import numpy as np

    from blockdrop.compress.target import DetectorTarget

    annotations = annotations or load_experiment_annotations(cfg.data)
    source = source or make_source(cfg.data, annotations)
    part = split_annotations(cfg.data, annotations, cfg.train.seed)["train"]
    if cfg.compress.selection_videos is not None:
        ids = sorted(part.videos)
        chosen = set(np.random.default_rng(cfg.train.seed).permutation(ids)[: cfg.compress.selection_videos].tolist())
        part = replace(part, videos={v: i for v, i in part.videos.items() if v in chosen})
    dataset = make_dataset(cfg, part, source, train=False, feature_stride=model.feature_stride)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.eval.batch_size, collate_fn=collate_windows)
    return DetectorTarget(dataset, cfg.eval), loader


def compress_experiment(cfg: ExperimentConfig, *, teacher: str | Path | None = None, out: str | Path | None = None,
                        resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Progressive Block Drop of a trained detector, as configured in ``cfg.compress``."""
    from blockdrop.compress.progressive import Setup, progressive_block_drop
    from blockdrop.compress.target import DetectorTarget

    teacher_path = Path(teacher or cfg.compress.teacher or "")
    if not teacher_path.is_file():
        raise ConfigError(f"--teacher {teacher_path}: no such file (give the model.safetensors of a trained "
                          "teacher, from `blockdrop train`)")
    out = Path(out or cfg.output)
    device = dist.init_from_env()  # first: rank is only known once the process group is up
    annotations = load_experiment_annotations(cfg.data)  # before the output folder is touched
    if dist.is_main():
        _prepare_output(out, resume, overwrite)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    if cfg.compress.train.threads or cfg.train.threads:
        torch.set_num_threads(cfg.compress.train.threads or cfg.train.threads)
    seed_everything(cfg.compress.train.seed)
    teacher_model, builder = load_detector(teacher_path)
    teacher_model.to(device).eval().requires_grad_(False)
    if list(annotations.classes) != list(builder["classes"]):
        raise ConfigError(f"--teacher {teacher_path}: its classes differ from {cfg.data.root}/{cfg.data.annotations}")
    source = make_source(cfg.data, annotations)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    stride = teacher_model.feature_stride
    selection_target, selection_loader = selection_setup(cfg, teacher_model, annotations, source)
    train_ds = make_dataset(cfg, parts["train"], source, train=True, feature_stride=stride)
    val_ds = make_dataset(cfg, parts["val"], source, train=False, feature_stride=stride)
    channels = builder["in_channels"]
    setup = Setup(
        teacher=teacher_model, builder=builder,
        selection_target=selection_target, selection_loader=selection_loader,
        align_target=DetectorTarget(train_ds, cfg.eval),
        train_loader=make_loader(train_ds, cfg.compress.train.batch_size, shuffle=True, seed=cfg.compress.train.seed,
                                 collate_fn=collate_windows, num_workers=cfg.data.num_workers),
        validate=lambda m: {k: v for k, v in evaluate(m, val_ds, cfg.eval).items() if k != "predictions"},
        measure=lambda m: measure_detector(m, cfg, channels),
        load=lambda path: load_detector(path)[0].to(device),
        progress=progress,
    )
    log = print if progress and dist.is_main() else (lambda _msg: None)
    history = progressive_block_drop(setup, cfg.compress, out, resume=resume, select_metric=cfg.eval.select_metric,
                                     log=log)
    if dist.is_main():
        from blockdrop.recipes.report import write_report

        log(f"report: {', '.join(str(p) for p in write_report(out))}")
    return history
