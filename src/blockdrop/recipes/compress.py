"""`blockdrop compress`: Progressive Block Drop of a trained detector, as its config says.

setup (teacher, the detector's target over the selection / training / validation splits, cost
of one test window) -> the engine's loop (compress/progressive.py) -> report. The engine never
sees a config file: it gets the typed `compress` section and a `Setup`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from blockdrop.compress.history import Cost, History
from blockdrop.compress.progressive import Setup, progressive_block_drop
from blockdrop.compress.saving import save_compressed
from blockdrop.core import distributed as dist
from blockdrop.core.errors import ConfigError
from blockdrop.core.measure import count_macs, count_params, measure_latency
from blockdrop.core.schema import ExperimentConfig
from blockdrop.core.torchutil import model_device
from blockdrop.core.training import check_schedule, make_loader
from blockdrop.data.dataset import collate_windows
from blockdrop.core.config import to_dict
from blockdrop.recipes.build import (builder_config, check_data, check_experiment, example_window, load_detector,
                                     load_experiment_annotations, make_dataset, make_source, resolve_architecture,
                                     split_annotations, training_record)
from blockdrop.recipes.report import write_report
from blockdrop.recipes.runs import COMPRESS_RUN, file_sha256, run_folder
from blockdrop.tad.inference import evaluate
from blockdrop.tad.target import DetectorTarget


def measure_detector(model, cfg: ExperimentConfig, channels: int) -> Cost:
    """Cost of one test window (batch 1): operator-level GMACs (all, backbone), params, and the
    latency on the model's device (CPU: with ``compress.latency_threads`` threads)."""
    device = model_device(model)
    inputs, mask = (t.to(device) for t in example_window(cfg, channels))
    latency = measure_latency(model, inputs, mask, threads=cfg.compress.latency_threads, min_run_time=1.0)
    return Cost(gmacs=count_macs(model, inputs, mask)["gmacs"], params=count_params(model)["total"],
                latency_ms=latency["median_ms"], latency_iqr_ms=latency["iqr_ms"], latency_device=latency["device"],
                extra={"backbone_gmacs": count_macs(model.backbone, inputs)["gmacs"]})


def video_subset(part, count: int | None, seed: int):
    """The first ``count`` videos of ``part`` in a seeded order (all when None): selection and
    alignment subsets of the same seed are prefixes of one order, so the smaller lies inside the larger."""
    if count is None:
        return part
    chosen = set(np.random.default_rng(seed).permutation(sorted(part.videos))[:count].tolist())
    return replace(part, videos={v: i for v, i in part.videos.items() if v in chosen})


def selection_setup(cfg: ExperimentConfig, model, annotations=None, source=None):
    """(target, loader) over the selection split: training videos in test-mode windows (no
    augmentation), optionally a seeded subset of ``compress.selection.videos`` of them."""
    annotations = annotations or load_experiment_annotations(cfg.data)
    source = source or make_source(cfg.data, annotations)
    part = video_subset(split_annotations(cfg.data, annotations, cfg.train.seed)["train"],
                        cfg.compress.selection.videos, cfg.train.seed)
    dataset = make_dataset(cfg, part, source, train=False, feature_stride=model.feature_stride)
    order = None
    if cfg.compress.selection.search == "halving":  # every round's slice samples all videos, not the first few
        order = np.random.default_rng(cfg.train.seed).permutation(len(dataset)).tolist()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.eval.batch_size, collate_fn=collate_windows,
                                         sampler=order)
    return _target(cfg, dataset), loader


def _target(cfg: ExperimentConfig, dataset) -> DetectorTarget:
    return DetectorTarget(dataset, cfg.eval, temperature=cfg.compress.alignment.temperature)


ARCHITECTURE_KEYS = {"data": ("kind", "window", "frame_size", "rate"),
                     "backbone": None, "head": None}  # None: the whole section
NOT_ARCHITECTURE = {"checkpoint", "checkpoint_format", "grad_checkpointing", "drop_path", "dropout"}


def check_teacher(cfg: ExperimentConfig, builder: dict, annotations, path: Path, role: str = "teacher") -> None:
    """The teacher (or another saved model: ``role``, its flag's name) must be the architecture the
    config describes, on the config's classes."""
    teacher = to_dict(resolve_architecture(builder_config(builder, source=str(path))))
    mine = to_dict(resolve_architecture(cfg))
    differ = []
    for section, keys in ARCHITECTURE_KEYS.items():
        names = keys or sorted(set(teacher[section]) | set(mine[section]))
        differ += [f"{section}.{k} ({role} {teacher[section].get(k)!r}, config {mine[section].get(k)!r})"
                   for k in names if k not in NOT_ARCHITECTURE and teacher[section].get(k) != mine[section].get(k)]
    if differ:
        raise ConfigError(f"--{role} {path}: its architecture differs from the config in {'; '.join(differ)}; "
                          f"use the config the {role} was trained with")
    if list(annotations.classes) != list(builder["classes"]):
        raise ConfigError(f"--{role} {path}: its classes differ from {cfg.data.root}/{cfg.data.annotations}")


def compress_experiment(cfg: ExperimentConfig, *, teacher: str | Path | None = None, out: str | Path | None = None,
                        resume: bool = False, overwrite: bool = False, progress: bool = True,
                        skip_bad_media: bool = False, allow_config_change: bool = False) -> History:
    """Progressive Block Drop of a trained detector, as configured in ``cfg.compress``.

    The config, the teacher (its architecture and classes) and every media file are checked
    before the run folder is touched."""
    check_experiment(cfg)
    teacher_path = Path(teacher or cfg.compress.teacher or "")
    if not teacher_path.is_file():
        raise ConfigError(f"--teacher {teacher_path}: no such file (give the model.safetensors of a trained "
                          "teacher, from `blockdrop train`)")
    out = Path(out or cfg.output)
    device = dist.init_from_env()  # first: rank is only known once the process group is up
    annotations = load_experiment_annotations(cfg.data)
    teacher_model, builder = load_detector(teacher_path, flag="--teacher")
    check_teacher(cfg, builder, annotations, teacher_path)
    source = make_source(cfg.data, annotations)
    annotations, skipped = dist.main_result(lambda: check_data(cfg, annotations, source, skip_bad=skip_bad_media))
    identity = {"teacher_sha256": dist.main_result(lambda: file_sha256(teacher_path)),
                "skipped_media": sorted(skipped),
                "train_annotations": training_record(split_annotations(cfg.data, annotations, cfg.train.seed))}
    with run_folder(cfg, out, resume=resume, overwrite=overwrite, kind=COMPRESS_RUN, identity=identity,
                    allow_changes=allow_config_change) as run:
        history = _compress(cfg, out, device, teacher_model.to(device), builder, annotations, source, resume,
                            progress, run.commit)
    return history


def _compress(cfg: ExperimentConfig, out: Path, device, teacher_model, builder: dict, annotations, source,
              resume: bool, progress: bool, commit) -> History:
    align_cfg = cfg.compress.alignment.train
    if align_cfg.threads or cfg.train.threads:
        torch.set_num_threads(align_cfg.threads or cfg.train.threads)
    teacher_model.eval().requires_grad_(False)
    parts = split_annotations(cfg.data, annotations, cfg.train.seed)
    stride = teacher_model.feature_stride
    selection_target, selection_loader = selection_setup(cfg, teacher_model, annotations, source)
    align_part = video_subset(parts["train"], cfg.compress.alignment.videos, cfg.train.seed)
    train_ds = make_dataset(cfg, align_part, source, train=True, feature_stride=stride)
    val_ds = make_dataset(cfg, parts["val"], source, train=False, feature_stride=stride)
    channels = builder["in_channels"]
    train_loader = make_loader(train_ds, align_cfg.batch_size, shuffle=True, seed=align_cfg.seed,
                               collate_fn=collate_windows, num_workers=cfg.data.num_workers)
    check_schedule(align_cfg, len(train_loader), config_name="compress.alignment.train")  # before any work
    log = print if progress and dist.is_main() else (lambda _msg: None)
    setup = Setup(
        teacher=teacher_model, target=_target(cfg, train_ds), selection_target=selection_target,
        train_data=train_loader, selection_data=selection_loader,
        validate=lambda m: {k: v for k, v in evaluate(m, val_ds, cfg.eval).items() if k != "predictions"},
        metric=cfg.eval.best_epoch_metric,
        measure=lambda m: measure_detector(m, cfg, channels),
        save=lambda m, path: save_compressed(m, path, builder=builder),
        load=lambda path: load_detector(path)[0].to(device),
        progress=progress, log=log, on_checkpoint=lambda _: commit(), seed=align_cfg.seed)
    history = progressive_block_drop(setup, cfg.compress, out, resume=resume)
    if dist.is_main():
        log(f"report: {', '.join(str(p) for p in write_report(out))}")
    return history
