"""Cross-depth alignment: fine-tune the student with LoRA against a frozen teacher, then merge.

Step 3 and 4 of the method (docs/method.md, docs/compression.md "Cross-depth alignment"):

    add_lora(student) -> fit(AlignLoss(teacher)) -> keep the best (EMA) weights -> merge_lora

What trains besides LoRA is `lora.trained_in_full`: the target's set (or ``trainable``) and the
blocks' adapters (AdaTAD), on by default when there are any; ``lora=False`` trains that set alone
and has nothing to merge.

The losses compare the student with the teacher through the target only:
- feature (the engine's own term): for every kept student block, MSE to the teacher block of the
  same ORIGINAL index (`kept_blocks` of each model), averaged over kept blocks. The blocks around a
  hole learn to cover for the dropped one: the "cross-depth" part.
- the target's output terms (`target.distill_terms`): for the detector class and segment
  distillation (blockdrop.tad.target), for a feature model the output MSE (compress.target).
- gt: the target's own task loss, when it has one (`Supervised`).

Training is `blockdrop.core.training.fit`, the project's one loop: AlignLoss is its ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop.compress.lora import add_lora, merge_lora, release, train_in_full, trained_in_full
from blockdrop.compress.stack import kept_blocks
from blockdrop.compress.target import Supervised, TargetForward, run_blocks
from blockdrop.core import distributed as dist
from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import load_state, save_torch
from blockdrop.core.torchutil import model_device, to_device
from blockdrop.core.training import fit

BEST_FILE = "align_best.pt"  # in out_dir: the selected weights, for a resumed run


def loss_terms(target) -> tuple[str, ...]:
    """Every alignment term ``target`` supports, in the order they are summed."""
    return ("feature", *target.distill_terms, *(("gt",) if isinstance(target, Supervised) else ()))


def resolve_weights(target, weights: Mapping[str, float] | None = None, where: str = "weights") -> dict:
    """Each supported term's weight: 1.0 (the released recipe) unless ``weights`` says otherwise.

    Unknown names, negative weights or all zero are a BlockdropError naming ``where``."""
    terms = loss_terms(target)
    given = dict(weights or {})
    unknown = sorted(set(given) - set(terms))
    if unknown:
        raise BlockdropError(f"{where}: unknown loss terms {unknown}; {type(target).__name__} has {list(terms)}")
    merged = {term: float(given.get(term, 1.0)) for term in terms}
    bad = {k: v for k, v in merged.items() if not v >= 0}
    if bad or not any(merged.values()):
        raise BlockdropError(f"{where}: weights must be >= 0 and not all 0, got {merged}")
    return merged


# ---- the loss terms, as functions of tensors -----------------------------------------------------

def feature_loss(student_blocks, teacher_blocks, student_kept, teacher_kept) -> torch.Tensor:
    """Mean over the student's blocks of MSE(student block i, teacher block of the same original index).

    ``*_kept`` are the models' `kept_blocks` (original index of each current block); the teacher
    may itself be compressed (the "previous step" teacher) but must hold every student block.
    """
    assert len(student_blocks) == len(student_kept) and len(teacher_blocks) == len(teacher_kept)
    where = {original: position for position, original in enumerate(teacher_kept)}
    missing = [o for o in student_kept if o not in where]
    if missing:
        raise BlockdropError(f"feature alignment: the student's blocks of original index {missing} are not in "
                             f"the teacher (teacher keeps {list(teacher_kept)}); the teacher must be the "
                             f"student's ancestor")
    terms = [F.mse_loss(s.float(), teacher_blocks[where[o]].float()) for s, o in zip(student_blocks, student_kept)]
    return torch.stack(terms).mean()


# ---- the loss_fn for fit -------------------------------------------------------------------------

class AlignLoss:
    """``loss_fn(student, batch) -> {term: loss, ..., "total"}`` for `fit`.

    ``weights``: per term (see `resolve_weights`); a term of weight 0 is neither computed nor
    logged, and the teacher does not run when only "gt" is left. The teacher is put in eval mode
    with requires_grad off here and always runs under no_grad. ``student`` may be the student itself
    (one process) or a `TargetForward` of it, possibly DDP-wrapped (what `align` passes to fit).
    """

    def __init__(self, teacher: nn.Module, target, *, weights: Mapping[str, float] | None = None):
        self.teacher, self.target = teacher, target
        self.weights = resolve_weights(target, weights)
        teacher.eval().requires_grad_(False)

    def _student(self, model: nn.Module, batch, blocks: bool):
        inner = dist.unwrap(model)
        if isinstance(inner, TargetForward):
            output, outputs = model(batch, True) if blocks else (model(batch), [])  # through DDP, if any
            return inner.model, output, outputs
        if inner is not model:
            raise BlockdropError("AlignLoss: wrap the student in a TargetForward before DistributedDataParallel "
                                 "(blockdrop.compress.align.align does)")
        if blocks:
            return (model, *run_blocks(model, self.target, batch, return_blocks=True))
        return model, run_blocks(model, self.target, batch), []

    @torch.no_grad()
    def _teacher(self, batch, blocks: bool):
        self.teacher.eval()
        if blocks:
            return run_blocks(self.teacher, self.target, batch, return_blocks=True)
        return run_blocks(self.teacher, self.target, batch), []

    def __call__(self, model: nn.Module, batch) -> dict:
        w, path = self.weights, self.target.stack_path
        student, s_out, s_blocks = self._student(model, batch, blocks=w["feature"] > 0)
        losses = {}
        if any(v for k, v in w.items() if k != "gt"):
            t_out, t_blocks = self._teacher(batch, blocks=w["feature"] > 0)
            if w["feature"]:
                losses["feature"] = feature_loss(s_blocks, t_blocks, kept_blocks(student, stack=path),
                                                 kept_blocks(self.teacher, stack=path))
            losses.update(self.target.distill(student, s_out, self.teacher, t_out, batch, w))
        if w.get("gt"):
            losses["gt"] = self.target.task_loss(student, s_out, batch)["total"]
        losses["total"] = sum(w[k] * v for k, v in losses.items())
        return losses


# ---- the recipe ----------------------------------------------------------------------------------

class _BestState:
    """The weights fit hands to on_best (the EMA copy when EMA is on): trainable tensors and buffers."""

    def __init__(self, out_dir, resume: bool):
        self.path = Path(out_dir) / BEST_FILE if out_dir is not None else None
        self.state = None
        if self.path is not None and self.path.exists():
            if resume:
                self.state = self._load()
            elif dist.is_main():
                self.path.unlink()  # a previous run's choice must not be merged into this one

    def _load(self) -> dict:
        return load_state(self.path, remedy=f"delete {self.path.parent} to redo this alignment, or start over "
                                            f"with --overwrite")

    def keep(self, model: nn.Module, record: dict) -> None:
        wanted = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in wanted}
        if self.path is not None and dist.is_main():
            save_torch(self.state, self.path)

    def restore(self, runner: TargetForward, metric: str | None) -> None:
        if self.state is None and self.path is not None and self.path.exists():  # other ranks: rank 0's file
            self.state = self._load()
        if self.state is None and not dist.is_main():
            raise BlockdropError("align: under torchrun with an evaluate_fn, pass out_dir: the other ranks "
                                 "read the weights rank 0 selected from there")
        if self.state is None:
            raise BlockdropError(f"align: evaluate_fn never reported {metric!r}, so no epoch was selected; "
                                 f"pass metric= naming one of its metrics")
        unexpected = runner.load_state_dict(self.state, strict=False).unexpected_keys
        assert not unexpected, f"selected state does not fit the student: {unexpected[:5]}"


def _check_separate(student: nn.Module, teacher: nn.Module) -> None:
    teacher_params = {id(p) for p in teacher.parameters()}
    if student is teacher or any(id(p) in teacher_params for p in student.parameters()):
        raise BlockdropError("align: the student shares parameters with the teacher; "
                             "pass a copy as the student (copy.deepcopy(teacher) before dropping)")


def _first_batch(data, device: torch.device):
    for batch in data:
        return to_device(batch, device)
    raise BlockdropError("align: the training data yields no batches")


def align(student: nn.Module, teacher: nn.Module, target, train_data, train_cfg, *,
          rank: int | None = None, alpha: float | None = None, targets=None, trainable=None,
          adapters: bool | None = None, lora: bool = True, dropout: float = 0.0,
          weights: Mapping[str, float] | None = None, evaluate_fn=None,
          metric: str | None = None, score_unaligned: bool = True, out_dir=None, resume: bool = False,
          progress: bool = True, config_name: str = "train", on_checkpoint=None, merge_atol: float = 1e-4,
          merge_rtol: float = 1e-3):
    """LoRA-fine-tune ``student`` against ``teacher``; return (merged student, FitResult).

    ``student`` is modified in place (LoRA added, trained, merged) and returned; ``teacher`` is
    frozen (the original model, or the previous step's). LoRA options go to `add_lora` (targets:
    the blocks' attention projections); trained in full beside it: ``trainable`` (None: the
    target's own set) and, per ``adapters`` (None: when the blocks have any), the blocks' adapters
    (`lora.trained_in_full`); ``lora=False`` trains only that set (nothing is merged).
    ``weights`` go to `AlignLoss`, the rest to `fit`: ``evaluate_fn(student) -> metrics`` selects
    the best epoch by ``metric``, the unaligned student (epoch 0) included when ``score_unaligned``,
    so the result is never worse on validation than the student given; without ``evaluate_fn`` the
    last epoch is kept. ``train_data`` is a DataLoader or any re-iterable of batches (a list). The
    selected weights (the EMA's when ``train_cfg.ema_decay > 0``) are merged, checked on the first
    training batch.
    """
    _check_separate(student, teacher)
    if evaluate_fn is not None and not metric:
        raise BlockdropError("align: evaluate_fn needs metric= (the key of its result that picks the epoch)")
    loss_fn = AlignLoss(teacher, target, weights=weights)
    full = trained_in_full(student, target.stack_path, target.trainable if trainable is None else trainable,
                           adapters)
    if lora:
        add_lora(student, target, rank=rank, alpha=alpha, targets=targets, trainable=full, dropout=dropout)
    elif targets is not None or rank is not None:
        raise BlockdropError("align: lora=False takes no LoRA targets or rank")
    else:
        train_in_full(student, full)
    runner = TargetForward(student, target)
    best = _BestState(out_dir, resume)
    validate = (lambda m: evaluate_fn(m.model)) if evaluate_fn is not None else None
    result = fit(runner, loss_fn, train_data, train_cfg, evaluate_fn=validate, select_metric=metric or "",
                 evaluate_initial=score_unaligned and validate is not None, out_dir=out_dir, resume=resume,
                 on_best=best.keep, progress=progress, config_name=config_name, on_checkpoint=on_checkpoint)
    best.restore(runner, metric)
    if not lora:
        return release(student), result
    batch = _first_batch(train_data, model_device(student))
    merged = merge_lora(student, lambda m: run_blocks(m, target, batch), atol=merge_atol, rtol=merge_rtol)
    return merged, result
