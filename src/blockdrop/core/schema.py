"""The experiment schema: what a `blockdrop train` / `eval` YAML file may say.

Each section is a frozen dataclass; ``blockdrop.core.config.load_config`` rejects unknown
keys by name. Values are checked here once (``__post_init__``), so the rest of the
code can trust them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


def _positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"'{name}' must be positive, got {value}")


AUGMENTATIONS = ("hflip", "channel_shuffle")  # implemented in blockdrop.data.dataset.augment_window


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset lives and how it is cut into windows (lengths in input steps)."""

    kind: Literal["sequence", "video"]
    root: str  # folder with the annotation file and the media folder
    window: int  # input steps per training/test window
    annotations: str = "annotations.json"
    media: str = "sequences"  # subfolder of root: <video_id>.npy or <video_id>.mp4
    rate: float | None = None  # sequence: samples per second (else taken from the file's fps); video: decode fps
    frame_size: int = 64  # video: frames resized (short side) and centre-cropped to this square
    preset: str | None = None  # "thumos14" or "activitynet13": fixes classes and subsets
    train_subset: str = "train"
    val_subset: str | None = "val"  # None: hold out val_fraction of the training videos instead
    val_fraction: float = 0.1
    test_subset: str = "test"
    test_stride: int | None = None  # default: window // 2
    train_repeats: int = 1  # random training windows drawn per video per epoch
    min_keep: float = 0.5  # a segment cut by a training window is kept if this fraction survives
    cache_dir: str | None = None  # video: where decoded frames are cached as .npy
    # what fills a window past the end of a video shorter than it (the mask marks those steps invalid):
    # zeros (black frames), or repeat the last frame (step), as OpenTAD's LoadFrames pads its frame indices
    tail_pad: Literal["zeros", "repeat"] = "zeros"
    augment: tuple[str, ...] = ()  # video training windows: "hflip", "channel_shuffle" (see data/dataset.py)
    num_workers: int = 0
    obtain: str | None = None  # how to get the data when root is missing (shown in the error)

    def __post_init__(self) -> None:
        _positive("window", self.window)
        _positive("rate", self.rate)
        _positive("test_stride", self.test_stride)
        if self.test_stride is not None and self.test_stride > self.window:
            raise ValueError(f"'test_stride' {self.test_stride} must be at most 'window' {self.window} "
                             f"(test windows would leave gaps)")
        _positive("train_repeats", self.train_repeats)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"'val_fraction' must be in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"'min_keep' must be in (0, 1], got {self.min_keep}")
        if self.num_workers < 0:
            raise ValueError(f"'num_workers' must be >= 0, got {self.num_workers}")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"'augment': unknown {unknown}; choose from {list(AUGMENTATIONS)}")


@dataclass(frozen=True)
class BackboneConfig:
    """The ViT: a named size with optional overrides, and the tokenizer for the input kind."""

    kind: Literal["sequence", "videomae", "dinov2"]
    size: str | None = None  # S, B, L, H, g (paper sizes); None: give depth/width/heads
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    patch: int = 16  # sequence: samples per token; video: pixels per patch side
    tubelet: int = 2
    clip_len: int = 16  # video: frames per clip fed to the ViT independently
    drop_path: float = 0.1
    checkpoint: str | None = None  # pretrained backbone weights (local path only)
    # mmaction: a VideoMAE backbone (adapters, if any, start fresh); adatad: an OpenTAD AdaTAD
    # checkpoint, whose adapters must all be there (docs/models.md, "AdaTAD adapters")
    checkpoint_format: Literal["hf_videomae", "mmaction", "adatad", "hf_dinov2", "onnx_dinov2"] | None = None
    grad_checkpointing: bool = False
    # videomae and dinov2: "rgb" (the frames) or "rgb_diff", the difference of consecutive normalised
    # frames within a window (TSN's RGB-difference modality); see docs/models.md
    input: Literal["rgb", "rgb_diff"] = "rgb"
    spatial_pool: Literal["mean", "max"] = "mean"  # videomae only: tokens -> one feature per tubelet step
    # videomae only: the pixels the fixed sin-cos position table is laid out for (grid pos_size / patch, resized
    # bicubically to the frames' grid). null: 224, the pretraining table, when backbone.checkpoint is set, else
    # data.frame_size. A saved model records the value it was built with, so it rebuilds without its checkpoint
    pos_size: int | None = None
    # video kinds: input frames per feature step after a linear temporal resampling of the backbone's output.
    # null: none, one step per tubelet (2 frames for VideoMAE); 1: one step per frame, as OpenTAD's
    # Interpolate(size=window_size) after the VideoMAE backbone on THUMOS14 (768 frames -> 768 steps)
    feature_stride: float | None = None
    # videomae only, AdaTAD temporal adapters: null (none), "all", or a list of block indices
    adapter_blocks: Any = None
    adapter_ratio: float = 0.25  # adapter channels = width * ratio
    adapter_kernel: int = 3  # the adapter's temporal depth-wise kernel (odd)
    train_only_adapters: bool = False  # AdaTAD: the ViT stays frozen, only its adapters train

    def __post_init__(self) -> None:
        if self.kind == "sequence" and self.input != "rgb":
            raise ValueError(f"'input': {self.input!r} is for the video kinds (videomae, dinov2) only")
        if self.kind == "sequence" and self.feature_stride is not None:
            raise ValueError("'feature_stride' is for the video kinds (videomae, dinov2) only")
        _positive("feature_stride", self.feature_stride)
        _positive("pos_size", self.pos_size)
        if self.kind != "videomae":
            for name, default in (("spatial_pool", "mean"), ("adapter_blocks", None), ("adapter_ratio", 0.25),
                                  ("adapter_kernel", 3), ("train_only_adapters", False), ("pos_size", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"'{name}': {getattr(self, name)!r} is for kind videomae only")
        self._check_adapters()
        if self.size is None and None in (self.depth, self.width, self.heads):
            raise ValueError("give 'size' or all of 'depth', 'width', 'heads'")
        for name in ("depth", "width", "heads", "patch", "tubelet", "clip_len"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"'drop_path' must be in [0, 1), got {self.drop_path}")
        if self.checkpoint is not None and self.checkpoint_format is None:
            raise ValueError("'checkpoint' needs 'checkpoint_format'")

    def _check_adapters(self) -> None:
        blocks = self.adapter_blocks
        if isinstance(blocks, list):  # YAML lists arrive as lists (the field is Any): keep configs hashable
            object.__setattr__(self, "adapter_blocks", blocks := tuple(blocks))
        ints = isinstance(blocks, tuple) and all(type(i) is int and i >= 0 for i in blocks)
        if not (blocks is None or blocks == "all" or (ints and blocks and len(set(blocks)) == len(blocks))):
            raise ValueError(f"'adapter_blocks' must be null, 'all' or a list of distinct block indices >= 0, "
                             f"got {blocks!r}")
        if not 0.0 < self.adapter_ratio <= 1.0:
            raise ValueError(f"'adapter_ratio' must be in (0, 1], got {self.adapter_ratio}")
        if self.adapter_kernel < 1 or self.adapter_kernel % 2 == 0:
            raise ValueError(f"'adapter_kernel' must be a positive odd number, got {self.adapter_kernel}")
        if self.train_only_adapters and blocks is None:
            raise ValueError("'train_only_adapters' needs 'adapter_blocks'")
        if self.checkpoint_format == "adatad" and blocks is None:
            raise ValueError("'checkpoint_format' adatad needs 'adapter_blocks' (the checkpoint's adapters)")


@dataclass(frozen=True)
class HeadConfig:
    """ActionFormer head sizes (see blockdrop.models.actionformer)."""

    embed_dim: int = 128  # channels of the projection from the backbone and of the pyramid's transformer
    fpn_dim: int = 128  # channels of the feature pyramid's outputs
    head_dim: int = 128  # channels of the classification and regression heads' convolutions
    num_levels: int = 6  # pyramid levels, strides 1, 2, 4, ... feature steps
    attn_window: int = 9  # local self-attention window in the pyramid (ActionFormer uses 19 on THUMOS)
    center_sample_radius: float = 1.5  # positives: points within this many strides of a segment's centre
    dropout: float = 0.0  # in the pyramid's transformer layers

    def __post_init__(self) -> None:
        for name in ("embed_dim", "fpn_dim", "head_dim", "num_levels", "attn_window"):
            _positive(name, getattr(self, name))


@dataclass(frozen=True)
class TrainConfig:
    """The one training loop's settings (AdamW, warm-up + cosine, EMA, clipping)."""

    epochs: int = 30  # the schedule's length (warm-up + cosine to zero)
    batch_size: int = 2  # windows per step (per process under torchrun)
    lr: float = 1e-4  # AdamW's peak learning rate
    backbone_lr_mult: float = 1.0  # the backbone's learning rate is lr times this
    weight_decay: float = 0.05  # AdamW's (not applied to norms and biases)
    warmup_epochs: int = 5  # linear warm-up from 0 to lr
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    ema_decay: float = 0.999  # 0 disables EMA
    amp: bool = True  # bf16 autocast on CUDA only; ignored on CPU
    seed: int = 0  # seeds weights, data order, crops and splits; each stage derives its own from it
    eval_every: int = 1  # epochs between validation runs
    freeze_backbone: bool = False  # train the head only
    threads: int | None = None  # CPU threads (torch.set_num_threads); None: leave as is
    # early stopping: end the run once this many epochs passed since the last validation score that
    # beat all earlier ones by more than `min_delta` (checked at each validation; the LR schedule
    # still spans `epochs`; the best-scored model is kept). None: off
    patience: int | None = None
    min_delta: float = 0.0  # early stopping counts only gains larger than this as better (metric units)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr", "eval_every", "patience"):
            _positive(name, getattr(self, name))
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.min_delta < 0:
            raise ValueError("'warmup_epochs', 'weight_decay', 'grad_clip' and 'min_delta' must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"'ema_decay' must be in [0, 1), got {self.ema_decay}")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"'warmup_epochs' {self.warmup_epochs} must be below 'epochs' {self.epochs}: the "
                             f"learning rate would never leave the warm-up")
        _positive("threads", self.threads)


@dataclass(frozen=True)
class EvalConfig:
    """Post-processing, and the validation metric that picks the best epoch (and the compression's
    accuracy budget)."""

    tiou_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    best_epoch_metric: str = "average_mAP"  # or "mAP@0.5", ...: one of metric_names()
    min_score: float = 0.001  # candidates scoring at or below this are dropped, before and during soft-NMS
    pre_nms_topk: int = 2000  # candidates kept per window before NMS
    max_segments: int = 200  # detections kept per video after soft-NMS
    nms_sigma: float = 0.7  # Gaussian soft-NMS's sigma
    voting_threshold: float = 0.75  # tIoU for score-weighted boundary voting after NMS
    batch_size: int = 4  # windows per forward pass in eval and validation

    MOVED: ClassVar[dict] = {"select_metric": "eval.best_epoch_metric"}

    def __post_init__(self) -> None:
        if not self.tiou_thresholds or not all(0.0 < t < 1.0 for t in self.tiou_thresholds):
            raise ValueError("'tiou_thresholds' must be a non-empty list of values in (0, 1)")
        for name in ("min_score", "pre_nms_topk", "max_segments", "nms_sigma", "batch_size"):
            _positive(name, getattr(self, name))
        if self.best_epoch_metric not in self.metric_names():
            raise ValueError(f"'best_epoch_metric' {self.best_epoch_metric!r} is not a metric the evaluator "
                             f"reports ({', '.join(self.metric_names())})")

    def metric_names(self) -> tuple[str, ...]:
        """The metrics validation reports (the names evaluation.detection_map gives them)."""
        return ("average_mAP", *(f"mAP@{t:g}" for t in self.tiou_thresholds))


@dataclass(frozen=True)
class SelectionConfig:
    """Step 1, block selection: which block a step drops, and how it is scored (docs/compression.md)."""

    # pre-recovery: the block whose removal hurts `evaluator` least (the paper); block-influence:
    # the block whose output is most like its input (1 - cosine, ShortGPT); truncate-last: the last
    # kept block; recovery-aware: the `shortlist` best by `shortlist_by` (null: by `evaluator`, the
    # pre-recovery ranking), each trial-aligned for `trial_batches` batches on a copy of the student,
    # scored by `evaluator` after it
    strategy: Literal["pre-recovery", "block-influence", "truncate-last", "recovery-aware"] = "pre-recovery"
    # map: the detection metric of the model without the block (the paper; "score" is the same for
    # any target: its own metric); loss: its ground-truth loss; feature_mse / feature_cosine: how
    # much the block changes its input (block influence; recovery-aware then scores a trial by the
    # alignment loss)
    evaluator: Literal["map", "score", "loss", "feature_mse", "feature_cosine"] = "map"
    block_metric: str = "mAP@0.5"  # the map evaluator's score of a candidate (the released THUMOS recipe)
    videos: int | None = None  # score candidates on this many training videos, seeded (None: all)
    # exhaustive: every candidate on all selection data; halving: successive halving over the data
    # (all candidates on halving_first batches, the best halving_keep go on to twice as many, ...,
    # until the share halving_final of the candidates remains, which is scored on all of it; windows
    # in a seeded order, so that every slice samples all videos)
    search: Literal["exhaustive", "halving"] = "exhaustive"
    halving_first: int = 8
    halving_keep: float = 0.5
    # a third: the smallest share whose finalists held the full-data best in every step of the HAPT
    # and synthetic runs (benchmarks/results/selection_cost.json; 2 finalists agreed in 0 of 3 HAPT steps)
    halving_final: float = 0.33
    # recovery-aware's defaults, measured on DINOv2-S's training side (benchmarks/recovery_defaults.py
    # -> benchmarks/results/recovery_defaults.json, docs/benchmarks.md "Recovery-aware selection"):
    # the block that recovered best was 2nd by the pre-recovery task score and 10th of 12 by block
    # influence; trials of 4 and 8 batches among the task score's best 2..6 chose it, 16 did not
    shortlist: int = 3  # recovery-aware: candidates given a trial alignment
    # recovery-aware's ranking for the shortlist; null: `evaluator` (with `search`), the paper's score
    shortlist_by: Literal["map", "score", "loss", "feature_mse", "feature_cosine"] | None = None
    trial_batches: int = 4  # recovery-aware: alignment batches per shortlisted candidate (the same for all)

    def __post_init__(self) -> None:
        _positive("videos", self.videos)
        _positive("halving_first", self.halving_first)
        if not 0 <= self.halving_final <= 1:
            raise ValueError(f"'halving_final' must be in [0, 1], got {self.halving_final}")
        _positive("trial_batches", self.trial_batches)
        if not 0 < self.halving_keep < 1:
            raise ValueError(f"'halving_keep' must be in (0, 1), got {self.halving_keep}")
        if self.shortlist < 2:
            raise ValueError(f"'shortlist' must be at least 2 (one candidate leaves nothing to compare), "
                             f"got {self.shortlist}")


@dataclass(frozen=True)
class StoppingConfig:
    """When the loop ends: the first rule that fires (at least one of max_blocks / target_macs_reduction)."""

    max_blocks: int | None = None  # stop after dropping this many blocks
    target_macs_reduction: float | None = None  # stop once MACs fell by this fraction (e.g. 0.25)
    max_accuracy_drop: float | None = None  # validation points below the teacher that end the run (that step is rolled back)

    def __post_init__(self) -> None:
        if self.max_blocks is None and self.target_macs_reduction is None:
            raise ValueError("give 'max_blocks' or 'target_macs_reduction' (or both)")
        _positive("max_blocks", self.max_blocks)
        if self.target_macs_reduction is not None and not 0 < self.target_macs_reduction < 1:
            raise ValueError(f"'target_macs_reduction' must be in (0, 1), got {self.target_macs_reduction}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ValueError(f"'max_accuracy_drop' must be >= 0, got {self.max_accuracy_drop}")


def _alignment_train() -> TrainConfig:
    return TrainConfig(epochs=10, lr=1e-4, warmup_epochs=1)


@dataclass(frozen=True)
class AlignmentConfig:
    """Step 3, the LoRA fine-tune of each step against the frozen teacher."""

    # false: no recovery at all (drop-only, the "no fine-tune" baseline): each step's student is the
    # model with the block removed, validated and measured; nothing below applies
    enabled: bool = True
    lora: bool = True  # LoRA on the kept blocks' lora_targets; false: only the fully trained set below trains
    lora_rank: int | None = None  # default: (smallest in_features of the wrapped Linears) // 4, i.e. width / 4
    lora_targets: tuple[str, ...] | None = None  # Linears inside a block; default: the block's attention projections
    trainable: tuple[str, ...] | None = None  # regexes trained in full besides LoRA; default: the target's own set
    # the blocks' adapters (AdaTAD) trained in full: null trains them when the backbone has any, true
    # the same but a model without adapters is an error, false freezes them (docs/compression.md)
    adapters: bool | None = None
    weights: dict[str, float] = field(default_factory=dict)  # per loss term; unnamed terms weigh 1.0 (the released recipe)
    temperature: float = 3.5  # class distillation temperature
    score_unaligned: bool = True  # score the unaligned student (epoch 0) as a candidate: a step never gets worse
    videos: int | None = None  # fine-tune on this many training videos, a seeded subset (None: all)
    train: TrainConfig = field(default_factory=_alignment_train)

    def __post_init__(self) -> None:
        _positive("lora_rank", self.lora_rank)
        _positive("videos", self.videos)
        if not self.lora and (self.lora_rank is not None or self.lora_targets is not None):
            raise ValueError("'lora_rank' and 'lora_targets' set LoRA, which 'lora: false' switches off; "
                             "leave them out or set 'lora: true'")
        if self.lora_targets is not None and not self.lora_targets:
            raise ValueError("'lora_targets' must name at least one Linear (or be left out for the default)")
        if self.temperature <= 0:
            raise ValueError(f"'temperature' must be positive, got {self.temperature}")
        bad = {k: v for k, v in self.weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool)
               or not v >= 0}
        if bad:
            raise ValueError(f"'weights' must be numbers >= 0, got {bad}")
        object.__setattr__(self, "weights", {str(k): float(v) for k, v in self.weights.items()})


@dataclass(frozen=True)
class CompressConfig:
    """Progressive Block Drop: selection, stopping rules, and the alignment fine-tune of each step."""

    teacher: str | None = None  # model.safetensors of the trained teacher (or --teacher)
    teacher_mode: Literal["original", "previous"] = "original"  # previous: the model the step starts from
    strategy: Literal["progressive", "one_shot"] = "progressive"  # one_shot: the ablation (max_blocks at once)
    latency_threads: int = 2  # CPU threads for latency (on a GPU the GPU is timed)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    stopping: StoppingConfig = field(default_factory=lambda: StoppingConfig(max_blocks=1))
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    MOVED: ClassVar[dict] = {
        "evaluator": "compress.selection.evaluator", "selection_metric": "compress.selection.block_metric",
        "selection_videos": "compress.selection.videos", "max_blocks": "compress.stopping.max_blocks",
        "target_macs_reduction": "compress.stopping.target_macs_reduction", "max_accuracy_drop": "compress.stopping.max_accuracy_drop",
        "one_shot": "compress.strategy (one_shot)", "lora_rank": "compress.alignment.lora_rank", "lora_targets": "compress.alignment.lora_targets",
        "trainable": "compress.alignment.trainable", "feature_weight": "compress.alignment.weights.feature",
        "cls_kd_weight": "compress.alignment.weights.cls_kd", "reg_kd_weight": "compress.alignment.weights.reg_kd",
        "gt_weight": "compress.alignment.weights.gt", "temperature": "compress.alignment.temperature", "train": "compress.alignment.train"}

    def __post_init__(self) -> None:
        _positive("latency_threads", self.latency_threads)
        if self.strategy == "one_shot" and self.stopping.max_blocks is None:
            raise ValueError("strategy 'one_shot' needs 'stopping.max_blocks'")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig
    backbone: BackboneConfig
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    output: str = "runs/experiment"

    def __post_init__(self) -> None:
        selection = self.compress.selection
        if selection.evaluator in ("map", "score") and selection.block_metric not in self.eval.metric_names():
            raise ValueError(f"compress.selection.block_metric {selection.block_metric!r} is not a metric the "
                             f"evaluator reports ({', '.join(self.eval.metric_names())})")
