"""`compress_model`: Progressive Block Drop of any PyTorch model from Python, in one call.

    from blockdrop.compress import compress_model
    student, history = compress_model(model, train_data=batches, selection_data=held_batches,
                                      max_blocks=3, out="runs/my_model")

It runs the same loop as `blockdrop compress` (compress/progressive.py), with the model seen
through a target: by default a `FeatureTarget`, which needs no task head and aligns the student
to the uncompressed model alone (per-block features of the same original index, plus the output).
Every setting is checked against the model before anything runs. With ``out`` the run is a folder
like the CLI's (history.json, step_NN/, model.safetensors) and ``resume=True`` continues it.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import get_args, get_type_hints

from torch import nn

from blockdrop.compress.align import resolve_weights
from blockdrop.compress.history import Cost, History
from blockdrop.compress.lora import check_lora
from blockdrop.compress.progressive import MODEL_FILE, Setup, progressive_block_drop
from blockdrop.compress.saving import load_compressed, save_compressed
from blockdrop.compress.stack import find_block_stack
from blockdrop.compress.strategies import selection_strategy
from blockdrop.compress.target import FeatureTarget, Scored, TargetForward, output_cosine
from blockdrop.core.errors import BlockdropError
from blockdrop.core.measure import count_macs, count_params, measure_latency
from blockdrop.core.schema import AlignmentConfig, CompressConfig, SelectionConfig, StoppingConfig, TrainConfig
from blockdrop.core.torchutil import model_device, to_device
from blockdrop.core.training import check_schedule, seed_everything


def _first_batch(data: Iterable, what: str):
    for batch in data:
        return batch
    raise BlockdropError(f"compress_model: {what} yields no batches")


def model_cost(target, example, *, latency: bool = True, threads: int | None = None,
               min_run_time: float = 0.5) -> Callable[[nn.Module], Cost]:
    """A `measure` for the loop: operator-level GMACs and parameters of the model through the
    target on one example batch, and its latency there (when ``latency``)."""
    def measure(model: nn.Module) -> Cost:
        forward = TargetForward(model, target)
        batch = to_device(example, model_device(model))
        cost = Cost(gmacs=count_macs(forward, batch)["gmacs"], params=count_params(model)["total"])
        if latency:
            timing = measure_latency(forward, batch, threads=threads, min_run_time=min_run_time)
            cost.latency_ms, cost.latency_iqr_ms = timing["median_ms"], timing["iqr_ms"]
            cost.latency_device = timing["device"]
        return cost

    return measure


def compress_model(model: nn.Module, *, train_data: Iterable, selection_data: Iterable, target=None,
                   val_data: Iterable | None = None, validate: Callable[[nn.Module], dict] | None = None,
                   metric: str | None = None, max_blocks: int | None = None,
                   target_macs_reduction: float | None = None, max_accuracy_drop: float | None = None,
                   evaluator: str | None = None, block_metric: str | None = None,
                   selection: str | SelectionConfig = "pre-recovery", strategy: str = "progressive",
                   teacher_mode: str = "original", align: bool = True, lora: bool = True, lora_rank: int | None = None,
                   lora_targets=None, trainable=None, adapters: bool | None = None,
                   weights: Mapping[str, float] | None = None, score_unaligned: bool = True,
                   train: TrainConfig | None = None, example=None, latency: bool = True,
                   latency_threads: int | None = None, builder: dict | None = None, out: str | Path | None = None,
                   resume: bool = False, seed: int = 0, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> tuple[nn.Module, History]:
    """Compress ``model`` by Progressive Block Drop; return (the compressed model, its History).

    ``model`` is not changed: it is the frozen teacher (a copy is). ``train_data`` (alignment) and
    ``selection_data`` (block scoring, training data without augmentation) are DataLoaders or lists
    of batches in the form the target takes (for a `FeatureTarget`: the model's input tensor, or a
    dict of its keyword inputs). ``target`` defaults to ``FeatureTarget(model)``.

    Validation decides each alignment's epoch (epoch 0, the unaligned student, included when
    ``score_unaligned``) and the accuracy budget: ``validate(model) -> metrics`` with ``metric``
    naming the key, or by default for a `FeatureTarget` the output cosine to the teacher on
    ``val_data`` (else ``selection_data``), metric "cosine". ``selection`` names the selection
    strategy ("pre-recovery", "block-influence", "truncate-last", "recovery-aware"; docs/compression.md)
    with its defaults, or is a `SelectionConfig` with every setting (then without ``evaluator`` /
    ``block_metric``). ``evaluator`` defaults to "score" for a target with a score (ranked by
    ``block_metric``) and to "feature_cosine" otherwise. Stopping:
    ``max_blocks``, ``target_macs_reduction``, ``max_accuracy_drop`` (at least one of the first two).
    ``align=False`` drops without any recovery (the drop-only baseline; the LoRA and training
    arguments are then unused). LoRA: ``lora_rank`` (width // 4), ``lora_targets`` (the blocks' attention projections),
    ``lora=False`` for none; trained in full: ``trainable`` (the target's own set; none for a
    FeatureTarget) and ``adapters``, the blocks' adapter submodules (None: trained when the blocks
    have any; True: required; False: frozen). ``weights`` per loss term
    (1.0 each by default). ``train``: the alignment's TrainConfig per step (default: 1 epoch,
    lr 1e-4, no warm-up, no EMA). Cost is measured through the target on ``example`` (default:
    the first selection batch). ``out``: the run folder (a temporary one if None); ``builder``: a
    JSON-able description stored with each step's weights (informational: resume rebuilds the
    architecture from ``model`` itself).
    """
    target = target if target is not None else FeatureTarget(model)
    if not isinstance(selection, SelectionConfig):
        evaluator = evaluator or ("score" if isinstance(target, Scored) else "feature_cosine")
    if validate is None and isinstance(target, FeatureTarget):
        held = list(val_data if val_data is not None else selection_data)
        validate, metric = output_cosine(target, model, held), "cosine"
    if validate is not None and not metric:
        raise BlockdropError("compress_model: validate needs metric= (the key of its result that picks epochs)")
    try:
        cfg = _settings(_selection(selection, evaluator, block_metric), strategy, teacher_mode, max_blocks,
                        target_macs_reduction, max_accuracy_drop, AlignmentConfig(
                            enabled=align, lora=lora, lora_rank=lora_rank, lora_targets=lora_targets, trainable=trainable,
                            adapters=adapters, weights=dict(weights or {}), score_unaligned=score_unaligned,
                            train=train or TrainConfig(epochs=1, lr=1e-4, warmup_epochs=0, ema_decay=0.0)))
    except ValueError as err:  # the schema's own checks
        raise BlockdropError(f"compress_model: {err}") from None
    _check(model, target, cfg, validate, metric, max_accuracy_drop, train_data)
    if seed is not None:
        seed_everything(seed)
    teacher = copy.deepcopy(model)
    builder = builder or {"kind": "python", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    example = example if example is not None else _first_batch(selection_data, "selection_data")
    setup = Setup(
        teacher=teacher, target=target, train_data=train_data, selection_data=selection_data,
        validate=validate, metric=metric, measure=model_cost(target, example, latency=latency, threads=latency_threads),
        save=lambda m, path: save_compressed(m, path, builder=builder),
        load=lambda path: load_compressed(path, lambda _builder: copy.deepcopy(model)).to(model_device(model)),
        progress=progress, log=log or (lambda _msg: None), seed=seed if seed is not None else 0)
    with tempfile.TemporaryDirectory(prefix="blockdrop-") if out is None else _folder(out) as folder:
        history = progressive_block_drop(setup, cfg, Path(folder), resume=resume)
        compressed = setup.load(Path(folder) / MODEL_FILE) if history.steps else copy.deepcopy(model)
    return compressed, history


def _selection(selection, evaluator, block_metric) -> SelectionConfig:
    """``selection`` as a SelectionConfig: a strategy's name takes ``evaluator`` / ``block_metric``."""
    if isinstance(selection, SelectionConfig):
        if evaluator is not None or block_metric is not None:
            raise BlockdropError("compress_model: selection=SelectionConfig(...) carries its own evaluator and "
                                 "block_metric; leave the evaluator= and block_metric= arguments out")
        return selection
    names = get_args(get_type_hints(SelectionConfig)["strategy"])
    if selection not in names:
        raise BlockdropError(f"selection: unknown strategy {selection!r} (choose from {', '.join(names)}, or pass "
                             f"a SelectionConfig)")
    return SelectionConfig(strategy=selection, evaluator=evaluator, block_metric=block_metric or "")


def _settings(selection: SelectionConfig, strategy, teacher_mode, max_blocks, target_macs_reduction,
              max_accuracy_drop, alignment: AlignmentConfig) -> CompressConfig:
    return CompressConfig(
        teacher_mode=teacher_mode, strategy=strategy, selection=selection,
        stopping=StoppingConfig(max_blocks=max_blocks, target_macs_reduction=target_macs_reduction,
                                max_accuracy_drop=max_accuracy_drop),
        alignment=alignment)


class _folder:
    """A user's run folder as a context manager (kept afterwards)."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc) -> None:
        return None


def _check(model: nn.Module, target, cfg: CompressConfig, validate, metric, max_accuracy_drop, train_data) -> None:
    """Every setting against the model, before the teacher is even scored (errors name the argument)."""
    a = cfg.alignment
    if cfg.selection.strategy == "recovery-aware" and not a.enabled:
        raise BlockdropError("selection: recovery-aware ranks candidates by how they recover in a trial alignment, "
                             "but align=False (drop-only); choose pre-recovery, block-influence or truncate-last")
    selection_strategy(cfg).check(target, prefix="")  # errors name the argument: evaluator, block_metric, ...
    resolve_weights(target, a.weights, where="weights")
    check_lora(model, target.stack_path, targets=a.lora_targets,
               trainable=a.trainable if a.trainable is not None else target.trainable, rank=a.lora_rank,
               lora=a.lora, adapters=a.adapters)
    depth = find_block_stack(model, target.stack_path).depth
    if cfg.stopping.max_blocks is not None and cfg.stopping.max_blocks >= depth:
        raise BlockdropError(f"max_blocks {cfg.stopping.max_blocks} must be below the model's {depth} blocks")
    if max_accuracy_drop is not None and validate is None:
        raise BlockdropError("max_accuracy_drop needs validation: pass validate= and metric=")
    if hasattr(train_data, "__len__"):
        check_schedule(a.train, max(1, len(train_data)), config_name="train")
