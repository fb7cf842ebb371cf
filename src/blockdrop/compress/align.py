"""Cross-depth alignment: fine-tune the student with LoRA against a frozen teacher, then merge.

Step 3 and 4 of the method (docs/method.md, docs/compression.md "Cross-depth alignment"):

    add_lora(student) -> fit(AlignLoss(teacher)) -> keep the best (EMA) weights -> merge_lora

The losses compare the student with the teacher through the `CompressionTarget` only:
- feature: for every kept student block, MSE to the teacher block of the same ORIGINAL index
  (`kept_blocks` of each model), averaged over kept blocks. The blocks around a hole learn to
  cover for the dropped one: the "cross-depth" part.
- cls_kd: KL(teacher || student) of the temperature-softened class scores at valid points, * T^2.
- reg_kd: DIoU between student and teacher decoded segments at ground-truth-assigned points.
- gt: the target's own task loss.

Training is `blockdrop.core.training.fit`, the project's one loop: AlignLoss is its ``loss_fn``.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop.core import distributed as dist
from blockdrop.compress.lora import DEFAULT_TARGETS, add_lora, merge_lora
from blockdrop.compress.stack import kept_blocks
from blockdrop.compress.target import run_blocks
from blockdrop.core.errors import BlockdropError
from blockdrop.models.losses import diou_loss

LOSS_TERMS = ("feature", "cls_kd", "reg_kd", "gt")
DEFAULT_WEIGHTS = MappingProxyType({term: 1.0 for term in LOSS_TERMS})  # the released recipe
CLS_KD_MODES = ("auto", "softmax", "sigmoid")
BEST_FILE = "align_best.pt"  # in out_dir: the selected weights, for a resumed run


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


def class_kd(student_logits, teacher_logits, valid, temperature: float = 3.5, mode: str = "auto") -> torch.Tensor:
    """Distillation of (B, P, K) class logits over the valid (B, P) points, mean per point, * T^2.

    softmax: KL(softmax(z_T / T) || softmax(z_S / T)) over the K classes (the released recipe).
    sigmoid: sum over classes of KL(Bernoulli(sigmoid(z_T / T)) || Bernoulli(sigmoid(z_S / T))),
    matching a head trained with per-class sigmoid (focal) losses. auto: softmax when K > 1,
    sigmoid when K == 1, where the softmax of one class is 1 and its KL identically zero.
    """
    if mode not in CLS_KD_MODES:
        raise BlockdropError(f"cls_kd mode must be one of {CLS_KD_MODES}, got {mode!r}")
    zs, zt = student_logits[valid].float() / temperature, teacher_logits[valid].float() / temperature  # (V, K)
    if mode == "softmax" or (mode == "auto" and zs.shape[-1] > 1):
        log_ps, log_pt = F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1)
        per_point = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:  # log p = logsigmoid(z), log(1 - p) = logsigmoid(-z): stable for large logits
        pt = torch.sigmoid(zt)
        per_point = (pt * (F.logsigmoid(zt) - F.logsigmoid(zs))
                     + (1 - pt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))).sum(-1)
    mean = per_point.mean() if per_point.numel() else per_point.sum() * 0.0
    return mean * temperature ** 2


def segment_kd(student_segments, teacher_segments, positive) -> torch.Tensor:
    """Mean DIoU loss between (B, P, 2) student and teacher segments at the positive (B, P) points.

    A pair of identical segments counts 0 even when both have zero length (where DIoU itself,
    IoU 0 / 0, would say 1): ReLU offsets make such segments common in an untrained head.
    """
    s, t = student_segments[positive].float(), teacher_segments[positive].float()  # (N, 2)
    loss = torch.where((s == t).all(-1), torch.zeros_like(s[:, 0]), diou_loss(s, t))
    return loss.mean() if loss.numel() else loss.sum() * 0.0


# ---- the loss_fn for fit -------------------------------------------------------------------------

class StudentRunner(nn.Module):
    """The student's forward through a target as one module, so fit's DDP wrapper sees the forward.

    `run_blocks` calls the student's submodules directly; wrapped in DistributedDataParallel the
    student itself would never run its forward and the gradients would not be synchronised.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, batch: dict, target, return_blocks: bool):
        if return_blocks:
            return run_blocks(self.student, target, batch, return_blocks=True)
        return run_blocks(self.student, target, batch), []


def _weights(weights: dict | None) -> dict:
    merged = dict(DEFAULT_WEIGHTS) | dict(weights or {})
    unknown = sorted(set(merged) - set(LOSS_TERMS))
    if unknown:
        raise BlockdropError(f"unknown alignment loss weights {unknown}; the terms are {list(LOSS_TERMS)}")
    bad = {k: v for k, v in merged.items() if not float(v) >= 0}
    if bad or not any(merged.values()):
        raise BlockdropError(f"alignment loss weights must be >= 0 and not all 0, got {merged}")
    return {k: float(v) for k, v in merged.items()}


class AlignLoss:
    """``loss_fn(student, batch) -> {"feature", "cls_kd", "reg_kd", "gt", "total"}`` for `train.fit`.

    ``weights`` override DEFAULT_WEIGHTS by term; a term of weight 0 is neither computed nor logged
    (and the teacher does not run when only "gt" is left). The teacher is put in eval mode with
    requires_grad off here and always runs under no_grad. ``student`` may be the student itself
    (one process) or a StudentRunner, possibly DDP-wrapped (what `align` passes to fit).
    """

    def __init__(self, teacher: nn.Module, target, *, weights: dict | None = None, temperature: float = 3.5,
                 cls_kd: str = "auto"):
        if not temperature > 0:
            raise BlockdropError(f"alignment temperature must be positive, got {temperature}")
        if cls_kd not in CLS_KD_MODES:
            raise BlockdropError(f"cls_kd must be one of {CLS_KD_MODES}, got {cls_kd!r}")
        self.teacher, self.target, self.temperature, self.cls_kd = teacher, target, temperature, cls_kd
        self.weights = _weights(weights)
        teacher.eval().requires_grad_(False)

    def _student(self, model: nn.Module, batch: dict, blocks: bool):
        inner = dist.unwrap(model)
        if isinstance(inner, StudentRunner):
            output, outputs = model(batch, self.target, blocks)  # through the DDP wrapper, if any
            return inner.student, output, outputs
        if inner is not model:
            raise BlockdropError("AlignLoss: wrap the student in a StudentRunner before DistributedDataParallel "
                                 "(blockdrop.compress.align.align does)")
        if blocks:
            return (model, *run_blocks(model, self.target, batch, return_blocks=True))
        return model, run_blocks(model, self.target, batch), []

    @torch.no_grad()
    def _teacher(self, batch: dict, blocks: bool):
        self.teacher.eval()
        if blocks:
            return run_blocks(self.teacher, self.target, batch, return_blocks=True)
        return run_blocks(self.teacher, self.target, batch), []

    def _head_kd(self, student, s_out, t_out, batch) -> dict:
        s = self.target.align_outputs(student, s_out, batch)
        with torch.no_grad():
            t = self.target.align_outputs(self.teacher, t_out, batch)
        losses = {}
        if self.weights["cls_kd"]:
            losses["cls_kd"] = class_kd(s["cls_logits"], t["cls_logits"], s["valid"], self.temperature, self.cls_kd)
        if self.weights["reg_kd"]:
            losses["reg_kd"] = segment_kd(s["segments"], t["segments"], s["positive"])
        return losses

    def __call__(self, model: nn.Module, batch: dict) -> dict:
        w, path = self.weights, self.target.stack_path
        student, s_out, s_blocks = self._student(model, batch, blocks=w["feature"] > 0)
        losses = {}
        if w["feature"] or w["cls_kd"] or w["reg_kd"]:
            t_out, t_blocks = self._teacher(batch, blocks=w["feature"] > 0)
            if w["feature"]:
                losses["feature"] = feature_loss(s_blocks, t_blocks, kept_blocks(student, stack=path),
                                                 kept_blocks(self.teacher, stack=path))
            if w["cls_kd"] or w["reg_kd"]:
                losses.update(self._head_kd(student, s_out, t_out, batch))
        if w["gt"]:
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
                self.state = torch.load(self.path, map_location="cpu", weights_only=True)
            elif dist.is_main():
                self.path.unlink()  # a previous run's choice must not be merged into this one

    def keep(self, model: nn.Module, record: dict) -> None:
        wanted = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in wanted}
        if self.path is not None and dist.is_main():
            tmp = self.path.with_name(self.path.name + ".tmp")
            torch.save(self.state, tmp)
            tmp.replace(self.path)

    def restore(self, runner: StudentRunner, select_metric: str) -> None:
        if self.state is None and self.path is not None and self.path.exists():  # other ranks: rank 0's file
            self.state = torch.load(self.path, map_location="cpu", weights_only=True)
        if self.state is None and not dist.is_main():
            raise BlockdropError("align: under torchrun with an evaluate_fn, pass out_dir: the other ranks "
                                 "read the weights rank 0 selected from there")
        if self.state is None:
            raise BlockdropError(f"align: evaluate_fn never reported {select_metric!r}, so no epoch was selected; "
                                 f"pass select_metric= naming one of its metrics")
        unexpected = runner.load_state_dict(self.state, strict=False).unexpected_keys
        assert not unexpected, f"selected state does not fit the student: {unexpected[:5]}"


def _check_separate(student: nn.Module, teacher: nn.Module) -> None:
    teacher_params = {id(p) for p in teacher.parameters()}
    if student is teacher or any(id(p) in teacher_params for p in student.parameters()):
        raise BlockdropError("align: the student shares parameters with the teacher; "
                             "pass a copy as the student (copy.deepcopy(teacher) before dropping)")


def _first_batch(loader, device: torch.device) -> dict:
    from blockdrop.core.training import _to_device

    for batch in loader:
        return _to_device(batch, device)
    raise BlockdropError("align: the training loader yields no batches")


def align(student: nn.Module, teacher: nn.Module, target, train_loader, train_cfg, *,
          rank: int | None = None, alpha: float | None = None, targets=DEFAULT_TARGETS,
          trainable=None, dropout: float = 0.0, weights: dict | None = None, temperature: float = 3.5,
          cls_kd: str = "auto", evaluate_fn=None, select_metric: str = "average_mAP", out_dir=None,
          resume: bool = False, progress: bool = True, merge_atol: float = 1e-4, merge_rtol: float = 1e-3):
    """LoRA-fine-tune ``student`` against ``teacher``; return (merged student, FitResult).

    ``student`` is modified in place (LoRA added, trained, merged) and returned; ``teacher`` is
    frozen (the original model, or the previous step's). LoRA options go to `add_lora`, loss
    options to `AlignLoss`, the rest to `train.fit`: ``evaluate_fn(student) -> metrics`` selects
    the best epoch by ``select_metric``; without it the last epoch is kept. The selected weights
    (the EMA's when ``train_cfg.ema_decay > 0``) are merged, checked on the first training batch.
    """
    from blockdrop.core.training import fit

    _check_separate(student, teacher)
    loss_fn = AlignLoss(teacher, target, weights=weights, temperature=temperature, cls_kd=cls_kd)
    add_lora(student, target, rank=rank, alpha=alpha, targets=targets, trainable=trainable, dropout=dropout)
    runner = StudentRunner(student)
    best = _BestState(out_dir, resume)
    validate = (lambda m: evaluate_fn(m.student)) if evaluate_fn is not None else None
    result = fit(runner, loss_fn, train_loader, train_cfg, evaluate_fn=validate, select_metric=select_metric,
                 out_dir=out_dir, resume=resume, on_best=best.keep, progress=progress)
    best.restore(runner, select_metric)
    batch = _first_batch(train_loader, dist.model_device(student))
    merged = merge_lora(student, lambda m: run_blocks(m, target, batch), atol=merge_atol, rtol=merge_rtol)
    return merged, result
