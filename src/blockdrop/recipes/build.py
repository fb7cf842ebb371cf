"""From a config file to the objects a recipe runs: the checked config, annotations, sources,
datasets, detector.

Everything a config can say is turned into objects here and nowhere else, so `train`, `eval`
and `compress` build identical models and data from the same file. `load_experiment` reads a
config and checks, before anything runs, what only the model can tell: the LoRA targets and
trainable patterns exist, and ``max_blocks`` leaves a block (a detector built on the meta device,
which costs no memory).
"""

from __future__ import annotations

import hashlib
import platform
import sys
from collections.abc import Sequence
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import av
import numpy as np
import torch
from torch import nn

from blockdrop.compress.align import resolve_weights
from blockdrop.compress.lora import check_lora
from blockdrop.compress.saving import load_compressed, read_compressed_metadata
from blockdrop.compress.stack import find_block_stack
from blockdrop.compress.width import apply_widths
from blockdrop.core.config import from_dict, load_config, to_dict
from blockdrop.core.errors import BlockdropError, CheckpointError, ConfigError, DataError
from blockdrop.core.schema import BackboneConfig, DataConfig, ExperimentConfig, HeadConfig
from blockdrop.data.annotations import Annotations, get_preset, load_annotations
from blockdrop.data.check import check_media, describe_problems
from blockdrop.data.dataset import TADDataset
from blockdrop.data.sequences import SequenceSource
from blockdrop.data.video import VideoSource
from blockdrop.models import checkpoints, vit
from blockdrop.models.actionformer import ActionFormerHead
from blockdrop.models.detector import Detector
from blockdrop.tad.target import DETECTOR_TRAINABLE, DetectorTarget

SHIPPED = Path(str(files("blockdrop") / "configs"))


# ---- the config -----------------------------------------------------------------------------------

def resolve_config_path(text: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``hapt`` -> configs/hapt.yaml)."""
    path = Path(text)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = SHIPPED / f"{text}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    raise ConfigError(f"config {str(text)!r}: no such file, and not a shipped config ({', '.join(names)})")


def load_experiment(config: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a config file (or a shipped config's name) with ``--set`` overrides, and check it."""
    path = resolve_config_path(config)
    cfg = load_config(ExperimentConfig, path, overrides)
    check_experiment(cfg, source=str(path))
    return cfg


def _num_classes(cfg: ExperimentConfig) -> int:
    return get_preset(cfg.data.preset).num_classes if cfg.data.preset is not None else 1


def check_experiment(cfg: ExperimentConfig, source: str = "config") -> None:
    """What a config says that only the model can check, named by flag; raises ConfigError."""
    with torch.device("meta"):  # shapes and names only: no memory, no weights read
        model = build_detector(without_checkpoint(cfg), _num_classes(cfg), 3 if cfg.data.kind == "video" else 1)
    a, stop = cfg.compress.alignment, cfg.compress.stopping
    trainable = a.trainable if a.trainable is not None else DETECTOR_TRAINABLE
    try:
        check_lora(model, DetectorTarget.stack_path, targets=a.lora_targets, trainable=trainable,
                   rank=a.lora_rank, lora=a.lora, adapters=a.adapters, where="compress.alignment.")
        resolve_weights(DetectorTarget, a.weights, where="compress.alignment.weights")
    except BlockdropError as err:
        raise ConfigError(f"{source}: {err}") from None
    depth = find_block_stack(model, DetectorTarget.stack_path).depth
    if stop.max_blocks is not None and stop.max_blocks >= depth:
        raise ConfigError(f"{source}: compress.stopping.max_blocks {stop.max_blocks} must be below the backbone's "
                          f"{depth} blocks (at least one stays)")


def load_experiment_annotations(data: DataConfig) -> Annotations:
    path = Path(data.root) / data.annotations
    if not path.exists():
        hint = f"; to obtain it: {data.obtain}" if data.obtain else ""
        raise DataError(f"{path}: annotation file not found (data.root / data.annotations){hint}")
    return load_annotations(path, preset=data.preset)


def check_data(cfg: ExperimentConfig, annotations: Annotations, source, *,
               skip_bad: bool = False) -> tuple[Annotations, dict[str, str]]:
    """Every media file of the annotated videos checked before a run (data/check.py).

    Bad files are an error listing all of them, or with ``skip_bad`` are left out (with a
    warning): returns (the annotations to use, {video id: problem} of the files left out)."""
    problems = check_media(source, annotations.videos, video=cfg.data.kind == "video", cache_dir=cfg.data.cache_dir)
    if not problems:
        return annotations, {}
    text = describe_problems(source, problems)
    if not skip_bad:
        raise DataError(f"{text}; see `blockdrop data check CONFIG`, or pass --skip-bad-media to leave them out")
    print(f"blockdrop: warning: leaving out {text}", file=sys.stderr)
    kept = {v: info for v, info in annotations.videos.items() if v not in problems}
    return replace(annotations, videos=kept), problems


def data_fingerprint(data: DataConfig, annotations: Annotations, source) -> dict:
    """What a run read, cheaply enough for any dataset size: the annotation file's SHA-256 and a
    SHA-256 over every annotated video's file name and byte size (a re-rendered or re-encoded
    video set changes it; file contents are not read). Written into a run's summary so two runs
    that differ can be told apart by their data."""
    listing = hashlib.sha256()
    total = 0
    for video_id in sorted(annotations.videos):
        path = source.path(video_id)
        size = path.stat().st_size
        listing.update(f"{path.name}\t{size}\n".encode())
        total += size
    annotation_file = Path(data.root) / data.annotations
    return {"annotations_sha256": hashlib.sha256(annotation_file.read_bytes()).hexdigest(),
            "media_names_sizes_sha256": listing.hexdigest(), "media_files": len(annotations.videos),
            "media_bytes": total}


def software_versions(video: bool) -> dict:
    """What decides the numbers besides code, config and data: torch, numpy, the CPU kernel level
    torch uses, and PyAV (with its FFmpeg) for video."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                # the CPU kernels torch dispatches to (e.g. AVX2 vs AVX512) change float rounding
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}
    if video:
        versions["av"] = av.__version__
        versions["ffmpeg_libavcodec"] = ".".join(map(str, av.library_versions.get("libavcodec", ())))
    return versions


def input_rate(data: DataConfig, annotations: Annotations) -> float:
    """Input steps per second: the config's rate, else the fps every video of the file agrees on."""
    if data.rate is not None:
        return data.rate
    rates = {v.fps for v in annotations.videos.values()}
    if len(rates) != 1 or None in rates:
        raise ConfigError("data.rate is not set and the annotation file has no single 'fps' for all videos")
    return float(rates.pop())


def make_source(data: DataConfig, annotations: Annotations):
    """The per-video input source (see docs/architecture.md): `.rate`, `.load(id)`, `.length(id)`."""
    media = Path(data.root) / data.media
    rate = input_rate(data, annotations)
    if data.kind == "sequence":
        return SequenceSource(media, rate)
    return VideoSource(media, fps=rate, size=data.frame_size, crop=data.frame_size, cache_dir=data.cache_dir)


def input_channels(data: DataConfig, annotations: Annotations, source) -> int:
    """Channels of a sequence input, read from the first video's array; 3 for video."""
    if data.kind == "video":
        return 3
    first = next(iter(sorted(annotations.videos)), None)
    if first is None:
        raise DataError(f"{Path(data.root) / data.annotations}: no videos")
    return int(source.load(first).shape[1])


def _subset(annotations: Annotations, name: str, data: DataConfig) -> Annotations:
    part = annotations.subset(name)
    if not part.videos:
        known = sorted({v.subset for v in annotations.videos.values()})
        raise ConfigError(f"{Path(data.root) / data.annotations}: subset '{name}' has no videos "
                          f"(the file has: {', '.join(known)})")
    return part


def split_annotations(data: DataConfig, annotations: Annotations, seed: int) -> dict[str, Annotations]:
    """{"train", "val", "test"} parts. With ``val_subset: null`` the validation videos are a
    seeded random ``val_fraction`` of the training subset (THUMOS14 has no validation split, and
    selecting on test would leak), removed from training. "train" holds what training can see
    (``Annotations.for_training``: segments past a video's duration dropped or clipped, counted in
    its ``trimmed``); "val" and "test" keep every segment as written, as the evaluators score them."""
    train = _subset(annotations, data.train_subset, data)
    test = _subset(annotations, data.test_subset, data)
    if data.val_subset is not None:
        return {"train": train.for_training(), "val": _subset(annotations, data.val_subset, data), "test": test}
    ids = sorted(train.videos)
    count = max(1, round(len(ids) * data.val_fraction))
    if count >= len(ids):
        raise ConfigError(f"data.val_fraction {data.val_fraction}: leaves no training videos out of {len(ids)}")
    held = set(np.random.default_rng(seed).choice(ids, size=count, replace=False).tolist())
    keep = {vid: info for vid, info in train.videos.items() if vid not in held}
    val = {vid: info for vid, info in train.videos.items() if vid in held}
    return {"train": replace(train, videos=keep).for_training(), "val": replace(train, videos=val), "test": test}


def describe_annotations(data: DataConfig, annotations: Annotations, seed: int, shown: int = 5) -> list[str]:
    """What `blockdrop data check` says of the annotation file: its size, the segments past their
    video's duration (kept for evaluation) and what training makes of them."""
    total = sum(len(v.segments) for v in annotations.videos.values())
    lines = [f"{Path(data.root) / data.annotations}: {len(annotations.videos)} videos, {total} segments, "
             f"{len(annotations.classes)} classes"]
    past = annotations.past_duration()
    if past:
        named = ", ".join(f"{vid} [{seg.start:g}, {seg.end:g}] s (duration {annotations.videos[vid].duration:g} s)"
                          for vid, _, seg in past[:shown])
        more = f" and {len(past) - shown} more" if len(past) > shown else ""
        lines.append(f"{len(past)} segment(s) in {len({vid for vid, _, _ in past})} video(s) lie past their video's "
                     f"duration, kept for evaluation as ActionFormer's and OpenTAD's evaluators keep them: "
                     f"{named}{more}")
    train = training_record(split_annotations(data, annotations, seed))
    lines.append(f"training ({data.train_subset}): {train['videos']} videos, {train['segments']} segments; "
                 f"{train.get('dropped_past_duration', 0)} dropped (they start at or after the duration), "
                 f"{train.get('clipped_to_duration', 0)} clipped to it")
    return lines


def training_record(parts: dict[str, Annotations]) -> dict:
    """What a run's record says of the training annotations: videos, segments, and how many segments
    past their video's duration training dropped or clipped."""
    train = parts["train"]
    record = {"videos": len(train.videos), "segments": sum(len(v.segments) for v in train.videos.values())}
    return record | (train.trimmed.as_dict() if train.trimmed else {})


def make_dataset(cfg: ExperimentConfig, part: Annotations, source, *, train: bool,
                 feature_stride: float = 1) -> TADDataset:
    """Windows over the videos of ``part`` (one of ``split_annotations``' values)."""
    stride = feature_stride if float(feature_stride).is_integer() else 1
    return TADDataset(part, source, window=cfg.data.window, train=train, stride=cfg.data.test_stride,
                      feature_stride=int(stride), seed=cfg.train.seed, min_keep=cfg.data.min_keep,
                      repeats=cfg.data.train_repeats if train else 1, augment=cfg.data.augment,
                      tail_pad=cfg.data.tail_pad)


DINOV2_POS_SIZE = 518  # pixels: DINOv2's pretrained position table (Dinov2Config.image_size)
VIDEOMAE_POS_SIZE = 224  # pixels: VideoMAE's pretrained sin-cos table (14 x 14 patches of 16 px)


def resolve_architecture(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with every architecture default that depends on other keys made explicit.

    A VideoMAE's position table is laid out at 224 px when a pretrained checkpoint is loaded (and
    resized to the frames), else at the frame size. The choice must outlive the checkpoint path:
    a saved model rebuilds without it (``build_from_builder``), so the builder records this
    resolved config, and a model built from a checkpoint gets the same table when it is reloaded.
    """
    bb = cfg.backbone
    if bb.kind == "videomae" and bb.pos_size is None:
        bb = replace(bb, pos_size=VIDEOMAE_POS_SIZE if bb.checkpoint else cfg.data.frame_size)
    return replace(cfg, backbone=bb)


def without_checkpoint(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same architecture, with nothing read from disk: the resolved config minus the checkpoint."""
    cfg = resolve_architecture(cfg)
    return replace(cfg, backbone=replace(cfg.backbone, checkpoint=None, checkpoint_format=None))


def build_backbone(bb: BackboneConfig, data: DataConfig, in_channels: int) -> nn.Module:
    dims = {k: v for k, v in (("depth", bb.depth), ("width", bb.width), ("heads", bb.heads)) if v is not None}
    if bb.kind == "sequence":
        if bb.size is not None:
            depth, width, heads = vit.vit_sizes[bb.size]
            dims = {"depth": depth, "width": width, "heads": heads, **dims}
        model = vit.sequence_vit(in_channels, bb.patch, **dims, drop_path_rate=bb.drop_path,
                                 max_len=data.window // bb.patch)
    elif bb.kind == "videomae":
        if bb.pos_size is None:
            raise ValueError("build_backbone needs a resolved config (recipes.build.resolve_architecture)")
        try:
            video_vit = vit.videomae_vit(bb.size or "S", num_frames=bb.clip_len, patch=bb.patch,
                                         tubelet=bb.tubelet, pos_img_size=bb.pos_size, spatial_pool=bb.spatial_pool,
                                         drop_path_rate=bb.drop_path, adapter_blocks=bb.adapter_blocks,
                                         adapter_ratio=bb.adapter_ratio, adapter_kernel=bb.adapter_kernel, **dims)
        except ConfigError as err:  # adapter_blocks meets the depth only here
            raise ConfigError(f"backbone: {err}") from None
        model = vit.ClipVideoBackbone(video_vit, clip_len=bb.clip_len, input_mode=bb.input,
                                      feature_stride=bb.feature_stride)
    else:
        # the learned position table is always DINOv2's own (518 px, 37 x 37 at patch 14), resized to the
        # frames in the forward: a rebuilt model (no checkpoint) has the same parameters as an imported one
        model = vit.ClipVideoBackbone(
            vit.dinov2_vit(bb.size or "S", bb.patch, img_size=DINOV2_POS_SIZE, drop_path_rate=bb.drop_path, **dims),
            clip_len=bb.clip_len, input_mode=bb.input, feature_stride=bb.feature_stride)
    if bb.grad_checkpointing:
        (model.vit if hasattr(model, "vit") else model).set_grad_checkpointing(True)
    if bb.checkpoint is not None:
        load_pretrained_backbone(model, bb)
    if bb.train_only_adapters:  # AdaTAD: the optimiser sees only what requires grad (recipes/train.py)
        for name, p in model.named_parameters():
            p.requires_grad_(".adapter." in name)
    return model


def load_pretrained_backbone(model: nn.Module, bb: BackboneConfig) -> None:
    vit_model = model.vit if hasattr(model, "vit") else model
    if bb.checkpoint_format == "onnx_dinov2":
        checkpoints.load_onnx_dinov2(vit_model, bb.checkpoint)
        return
    state = checkpoints.load_checkpoint_file(bb.checkpoint)
    if bb.checkpoint_format in ("mmaction", "adatad"):  # a plain VideoMAE gets fresh adapters
        adapters = "checkpoint" if bb.checkpoint_format == "adatad" else "fresh"
        where = f"backbone.checkpoint {bb.checkpoint} (backbone.checkpoint_format: {bb.checkpoint_format})"
        try:
            checkpoints.load_mmaction_videomae(vit_model, state, adapters=adapters)
        except checkpoints.NoAdaptersInCheckpoint as err:
            raise ConfigError(f"{where}: {err}; for a pretrained VideoMAE (the adapters then start as the "
                              f"identity) set backbone.checkpoint_format: mmaction") from None
        except checkpoints.AdaptersInCheckpoint as err:
            raise ConfigError(f"{where}: {err}; for an AdaTAD detector trained by OpenTAD set "
                              f"backbone.checkpoint_format: adatad (backbone.adapter_blocks must match its "
                              f"adapters)") from None
        return
    loader = {"hf_videomae": checkpoints.load_hf_videomae, "hf_dinov2": checkpoints.load_hf_dinov2}[bb.checkpoint_format]
    loader(vit_model, state)


def build_head(head: HeadConfig, in_channels: int, num_classes: int, max_seq_len: int) -> nn.Module:
    return ActionFormerHead(in_channels, num_classes, max_seq_len=max_seq_len, embed_dim=head.embed_dim,
                            fpn_dim=head.fpn_dim, head_dim=head.head_dim, num_levels=head.num_levels,
                            attn_window=head.attn_window, center_radius=head.center_sample_radius,
                            dropout=head.dropout)


def build_detector(cfg: ExperimentConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Backbone + ActionFormer head for windows of ``cfg.data.window`` input steps."""
    cfg = resolve_architecture(cfg)
    backbone = build_backbone(cfg.backbone, cfg.data, in_channels)
    max_seq_len = int(round(cfg.data.window / backbone.feature_stride))
    return Detector(backbone, build_head(cfg.head, backbone.out_channels, num_classes, max_seq_len))


def detector_builder(cfg: ExperimentConfig, classes, in_channels: int) -> dict:
    """A JSON-able description from which ``build_from_builder`` rebuilds the same architecture
    (the resolved config: nothing depends on the checkpoint path, which is not re-read)."""
    return {"kind": "blockdrop.detector", "config": to_dict(resolve_architecture(cfg)), "classes": list(classes),
            "in_channels": int(in_channels)}


def builder_config(builder: dict, source: str = "checkpoint metadata") -> ExperimentConfig:
    """The architecture part of a builder's config (data, backbone, head) as an ExperimentConfig.

    Training, evaluation and compression settings are not read: a model saved by an earlier
    version, whose config had other keys there, still rebuilds."""
    if builder.get("kind") != "blockdrop.detector":
        raise ConfigError(f"{source}: unknown model builder kind {builder.get('kind')!r}")
    config = builder.get("config") or {}
    return from_dict(ExperimentConfig, {k: config[k] for k in ("data", "backbone", "head") if k in config},
                     source=source)


def build_from_builder(builder: dict) -> nn.Module:
    """Inverse of ``detector_builder``; pretrained-checkpoint paths are not re-read (weights follow).

    Resolved before the checkpoint is dropped, so a model saved before the builder recorded its
    position table (a VideoMAE built from a pretrained checkpoint) still rebuilds with the 224 px one."""
    cfg = without_checkpoint(builder_config(builder))
    model = build_detector(cfg, len(builder["classes"]), builder["in_channels"])
    if builder.get("widths"):  # a width-pruned model (compress.width.with_widths)
        apply_widths(model, builder["widths"], stack="backbone.blocks")
    return model


def _file_kind(path: Path) -> str:
    """"safetensors", "torch" (a torch.save zip or pickle: an OpenTAD / mmaction .pth) or "unknown",
    from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return "unknown"
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:3] == b"\x80\x02\x8a":  # torch.save: zip, or the legacy pickle's magic
        return "torch"
    return "unknown"


def check_model_file(path: str | Path, flag: str = "the model file") -> Path:
    """``path`` is a file that can be a blockdrop model; a PyTorch checkpoint (an OpenTAD or mmaction .pth
    given where a model.safetensors goes) is refused saying how it gets in. ``flag`` names where the user
    gave the path."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: file not found (a model.safetensors written by `blockdrop train` or "
                              f"`blockdrop compress`)")
    if _file_kind(path) == "torch":
        raise CheckpointError(
            f"{flag} {path}: a PyTorch checkpoint (.pth), not a blockdrop model: this takes the model.safetensors "
            f"that `blockdrop train` or `blockdrop compress` writes. An OpenTAD or mmaction file comes in as a "
            f"backbone: --set backbone.checkpoint={path} --set backbone.checkpoint_format=adatad (an AdaTAD "
            f"detector; mmaction for pretrained VideoMAE weights), then `blockdrop train` (docs/opentad.md)")
    return path


def load_detector(path: str | Path, flag: str = "the model file") -> tuple[nn.Module, dict]:
    """A detector saved by `train` or `compress`, rebuilt from its own metadata (no config needed):
    (model, builder). ``flag`` names where the user gave the path, for the error messages."""
    path = check_model_file(path, flag)
    model = load_compressed(path, build_from_builder)
    return model, read_compressed_metadata(path).builder


def example_window(cfg: ExperimentConfig, channels: int):
    """One zero test window (batch 1) and its mask: the unit MACs and latency are reported for."""
    if cfg.data.kind == "sequence":
        inputs = torch.zeros(1, cfg.data.window, channels)
    else:
        inputs = torch.zeros(1, cfg.data.window, cfg.data.frame_size, cfg.data.frame_size, 3, dtype=torch.uint8)
    return inputs, torch.ones(1, cfg.data.window, dtype=torch.bool)
