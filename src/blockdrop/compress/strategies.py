"""Selection strategies: which block a step drops (``compress.selection.strategy``).

Step 1 of the loop asks a strategy, a small frozen object, for a `SelectionRecord`: every
candidate's score, the ranking it chose by, and what the choice cost. (How many blocks a step
drops, and how long it aligns, is the other kind of strategy, in compress/rules.py.)

- `PreRecovery` (the paper's): score the model without each block with the target's metric,
  its loss, or the block's feature change (`selection.select_block`); drop the one that hurts least.
- `BlockInfluence` (ShortGPT): 1 - cosine between each block's input and output on the full
  model; drop the block that changes its input least. One forward per batch.
- `TruncateLast`: drop the last kept block (the highest original index). No data, no forwards:
  the baseline that fancier selection often fails to beat.
- `RecoveryAware`: shortlist the ``shortlist`` best candidates by a pre-recovery score (by
  default the paper's: the strategy's evaluator), give each a
  short alignment of ``batches`` training batches (`LoraTrial`: the step's own LoRA recipe, on a
  copy of the student), score each on the selection data after it, and drop the best.

Every strategy's `select` runs on every rank under torchrun: what is scored runs on rank 0 and is
handed to the others (`dist.main_result`), and recovery-aware's trial alignments train on all
ranks, as the step's alignment does.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch
from torch import nn

from blockdrop.compress.align import AlignLoss, align
from blockdrop.compress.history import SelectionRecord, TrialRecord, rank_candidates
from blockdrop.compress.selection import (HIGHER_IS_BETTER, SCORE_EVALUATORS, SUBNETWORK_EVALUATORS, ForwardCounter,
                                          Halving, SelectionResult, check_evaluator, score_model, select_block)
from blockdrop.compress.stack import drop_original, kept_blocks
from blockdrop.compress.target import blocks_of
from blockdrop.core import distributed as dist
from blockdrop.core.errors import BlockdropError
from blockdrop.core.schema import AlignmentConfig, CompressConfig
from blockdrop.core.torchutil import eval_mode, model_device, to_device

ALIGN_LOSS = "align_loss"  # recovery-aware's score after a trial when the evaluator scores blocks, not models


def _check_scorer(target, evaluator: str, metric: str | None, prefix: str, key: str = "evaluator") -> None:
    """The target can serve ``evaluator``, and a score evaluator has its metric (errors name the key)."""
    check_evaluator(target, evaluator, where=f"{prefix}{key}")
    if evaluator in SCORE_EVALUATORS and not metric:
        raise BlockdropError(f"{prefix}block_metric: the {evaluator!r} evaluator ({prefix}{key}) ranks candidates by "
                             f"a key of the target's score; name it")


@dataclass(frozen=True)
class SelectionContext:
    """What a strategy may use besides the student: built once per run by the loop."""

    target: object  # the CompressionTarget that scores candidates (its score knows the selection data)
    data: Iterable  # selection batches: training data without augmentation
    align_target: object  # the target of alignment (training batches)
    train_data: Iterable  # alignment batches
    teacher: nn.Module | None  # what the step aligns to; None: the model it starts from (teacher_mode previous)
    alignment: AlignmentConfig


def _record(name: str, result: SelectionResult, trial: TrialRecord | None = None, *, forwards: int = 0,
            seconds: float = 0.0) -> SelectionRecord:
    fields = asdict(result)
    fields.update(block_forwards=result.block_forwards + forwards, wall_time_s=result.wall_time_s + seconds)
    return SelectionRecord(**fields, drop=[], strategy=name, trial=trial)


@dataclass(frozen=True)
class PreRecovery:
    """The paper's: the candidate whose removal hurts the ``evaluator``'s score least, before any recovery."""

    evaluator: str = "score"
    metric: str | None = None
    halving: Halving | None = None
    name = "pre-recovery"

    def check(self, target, prefix: str = "compress.selection.") -> None:
        _check_scorer(target, self.evaluator, self.metric, prefix)

    def select(self, student: nn.Module, ctx: SelectionContext) -> SelectionRecord:
        result = dist.main_result(lambda: select_block(student, ctx.target, ctx.data, evaluator=self.evaluator,
                                                       metric=self.metric, halving=self.halving))
        return _record(self.name, result)


@dataclass(frozen=True)
class BlockInfluence:
    """ShortGPT's block influence: the block whose output is most like its input (feature_cosine)."""

    name = "block-influence"

    def check(self, target, prefix: str = "compress.selection.") -> None:
        return None

    def select(self, student: nn.Module, ctx: SelectionContext) -> SelectionRecord:
        result = dist.main_result(lambda: select_block(student, ctx.target, ctx.data, evaluator="feature_cosine"))
        return _record(self.name, result)


@dataclass(frozen=True)
class TruncateLast:
    """The last kept block (highest original index); its score is the original index itself."""

    name = "truncate-last"

    def check(self, target, prefix: str = "compress.selection.") -> None:
        return None

    def select(self, student: nn.Module, ctx: SelectionContext) -> SelectionRecord:
        kept = kept_blocks(student, stack=ctx.target.stack_path)
        if len(kept) < 2:
            raise BlockdropError(f"truncate-last: block stack {ctx.target.stack_path!r} has {len(kept)} block(s); "
                                 f"dropping one would leave none")
        scores = {original: float(original) for original in kept}
        return SelectionRecord(evaluator="original_index", metric=None, higher_is_better=True, scores=scores,
                               chosen=len(kept) - 1, chosen_original=kept[-1], drop=[], strategy=self.name,
                               ranking=kept[::-1])


# ---- recovery-aware ------------------------------------------------------------------------------

class TrialAlignment(Protocol):
    """A short recovery of one candidate: ``student`` (a copy, the candidate dropped), aligned to
    ``teacher`` on ``batches`` -> the model to score."""

    def __call__(self, student: nn.Module, teacher: nn.Module, batches: list, ctx: SelectionContext) -> nn.Module: ...


@dataclass(frozen=True)
class LoraTrial:
    """The step's own alignment recipe (LoRA, what trains in full, loss weights, AdamW at its lr),
    shortened to one pass over ``batches``: no warm-up (the cosine decays over those batches), no
    EMA, no validation; merged, as a step's alignment is."""

    def __call__(self, student: nn.Module, teacher: nn.Module, batches: list, ctx: SelectionContext) -> nn.Module:
        a = ctx.alignment
        train = replace(a.train, epochs=1, warmup_epochs=0, ema_decay=0.0, patience=None, eval_every=1)
        merged, _ = align(student, teacher, ctx.align_target, batches, train, lora=a.lora, rank=a.lora_rank,
                          targets=a.lora_targets, trainable=a.trainable, adapters=a.adapters, weights=a.weights,
                          progress=False, config_name="compress.selection (trial alignment)")
        return merged


@torch.no_grad()
def align_loss(model: nn.Module, teacher: nn.Module, target, data: Iterable,
               weights: Mapping[str, float] | None = None) -> tuple[float, int]:
    """Mean alignment loss (AlignLoss's total) of ``model`` against ``teacher`` over ``data``:
    recovery-aware's score after a trial when the target has no model score to rank by."""
    loss, total, batches = AlignLoss(teacher, target, weights=weights), 0.0, 0
    device = model_device(model)
    with eval_mode(model):
        for batch in data:
            total += float(loss(model, to_device(batch, device))["total"])
            batches += 1
    if not batches:
        raise BlockdropError("recovery-aware: the selection loader yielded no batches")
    return total / batches, batches


@dataclass(frozen=True)
class RecoveryAware:
    """Shortlist by a cheap score, trial-align each shortlisted candidate on a copy, drop the one
    that scores best after its trial.

    ``shortlist`` (k) candidates, ranked by ``shortlist_by`` (a `select_block` evaluator, by default
    ``evaluator`` itself: the pre-recovery ranking; ``halving`` applies when it scores sub-networks) go on; each gets ``batches`` training batches
    of ``trial`` alignment, the same batches and the same random seed for every candidate, so only
    the candidate differs. After it each is scored on the selection data by ``evaluator`` (ranked
    by ``metric``) when that scores a model (score / map / loss), else by the alignment loss to the
    teacher. The student is never modified: every trial runs on its own deep copy.
    """

    shortlist: int = 3
    batches: int = 4
    evaluator: str = "score"
    metric: str | None = None
    shortlist_by: str | None = None  # None: ``evaluator``
    halving: Halving | None = None
    trial: TrialAlignment = LoraTrial()
    name = "recovery-aware"

    def __post_init__(self) -> None:
        if self.shortlist < 2 or self.batches < 1:
            raise BlockdropError(f"recovery-aware needs a shortlist of at least 2 candidates and at least 1 trial "
                                 f"batch, got shortlist={self.shortlist}, batches={self.batches}")

    @property
    def ranked_by(self) -> str:
        return self.shortlist_by or self.evaluator

    @property
    def post_evaluator(self) -> str:
        return self.evaluator if self.evaluator in SUBNETWORK_EVALUATORS else ALIGN_LOSS

    def check(self, target, prefix: str = "compress.selection.") -> None:
        key = "shortlist_by" if self.shortlist_by else "evaluator"
        _check_scorer(target, self.ranked_by, self.metric, prefix, key=key)
        if self.post_evaluator != ALIGN_LOSS:
            _check_scorer(target, self.evaluator, self.metric, prefix)

    def select(self, student: nn.Module, ctx: SelectionContext) -> SelectionRecord:
        seed = dist.main_result(lambda: int(torch.randint(2 ** 31 - 1, ())))  # every candidate's trial starts alike
        cheap = dist.main_result(lambda: select_block(student, ctx.target, ctx.data, evaluator=self.ranked_by,
                                                      metric=self.metric, halving=self.halving))
        start = time.perf_counter()
        shortlist = cheap.ranking[: self.shortlist]
        batches = list(itertools.islice(ctx.train_data, self.batches))  # the same batches for every candidate
        if not batches:
            raise BlockdropError("recovery-aware: the training data yields no batches for the trial alignments")
        teacher = ctx.teacher if ctx.teacher is not None else copy.deepcopy(student)
        scores, forwards = {}, 0
        for original in shortlist:
            scores[original], count = self._trial(student, teacher, original, batches, seed, ctx)
            forwards += count
        seconds = time.perf_counter() - start
        higher = HIGHER_IS_BETTER.get(self.post_evaluator, False)
        post = rank_candidates(scores, [], higher)
        if math.isnan(scores[post[0]]):
            raise BlockdropError("recovery-aware: every shortlisted candidate scored NaN after its trial alignment; "
                                 "the model, the training data or compress.alignment.train.lr is broken")
        trial = TrialRecord(shortlist=shortlist, batches=len(batches), evaluator=self.post_evaluator,
                            metric=self.metric if self.post_evaluator in SCORE_EVALUATORS else None,
                            higher_is_better=higher, scores=scores, ranking=post, block_forwards=forwards,
                            wall_time_s=seconds)
        record = _record(self.name, cheap, trial, forwards=forwards, seconds=seconds)
        record.chosen_original = post[0]
        record.chosen = kept_blocks(student, stack=ctx.target.stack_path).index(post[0])
        return record

    def _trial(self, student: nn.Module, teacher: nn.Module, original: int, batches: list, seed: int,
               ctx: SelectionContext) -> tuple[float, int]:
        """One candidate: copy, drop, trial-align, score -> (score, block forwards of all of it)."""
        candidate = copy.deepcopy(student)
        drop_original(candidate, [original], stack=ctx.align_target.stack_path)
        teacher_blocks = blocks_of(teacher, ctx.align_target)
        with torch.random.fork_rng(devices=_cuda_devices(student)), \
                ForwardCounter(blocks_of(candidate, ctx.align_target), teacher_blocks) as training:
            torch.manual_seed(seed)
            aligned = self.trial(candidate, teacher, batches, ctx)
        with ForwardCounter(blocks_of(aligned, ctx.target), teacher_blocks) as scoring:
            score = dist.main_result(lambda: self._score(aligned, teacher, ctx))
        return score, training.count + scoring.count

    def _score(self, model: nn.Module, teacher: nn.Module, ctx: SelectionContext) -> float:
        if self.post_evaluator == ALIGN_LOSS:
            return align_loss(model, teacher, ctx.target, ctx.data, ctx.alignment.weights)[0]
        return score_model(model, ctx.target, ctx.data, evaluator=self.evaluator, metric=self.metric)[0]


def _cuda_devices(model: nn.Module) -> list:
    device = model_device(model)
    return [device] if device.type == "cuda" else []


# ---- from the config ----------------------------------------------------------------------------

def selection_strategy(cfg: CompressConfig):
    """The strategy ``compress.selection`` names, with its settings (checked at load by the schema;
    against a target by its `check`)."""
    sel = cfg.selection
    halving = Halving(sel.halving_first, sel.halving_keep, sel.halving_final) if sel.search == "halving" else None
    if sel.strategy == "pre-recovery":
        return PreRecovery(sel.evaluator, sel.block_metric or None, halving)
    if sel.strategy == "block-influence":
        return BlockInfluence()
    if sel.strategy == "truncate-last":
        return TruncateLast()
    if not cfg.alignment.enabled:
        raise BlockdropError("compress.selection.strategy recovery-aware ranks candidates by how they recover in a "
                             "trial alignment, but compress.alignment.enabled is false (drop-only): no step recovers; "
                             "choose pre-recovery, block-influence or truncate-last")
    return RecoveryAware(shortlist=sel.shortlist, batches=sel.trial_batches, evaluator=sel.evaluator,
                         metric=sel.block_metric or None, shortlist_by=sel.shortlist_by, halving=halving)
