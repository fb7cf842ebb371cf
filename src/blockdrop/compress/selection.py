"""Step 1 of the method: score every block's removal and pick the one that hurts least.

Four evaluators (see docs/compression.md, "Block selection"):

- ``"score"`` (``"map"`` for a detector): the target's task metric of the sub-network
  "model minus block k", e.g. detection mAP (higher is better);
- ``"loss"``: mean ground-truth loss of that sub-network (lower is better);
- ``"feature_mse"`` / ``"feature_cosine"``: how much block k changes its own input on the full
  model (ShortGPT's block influence): mean squared difference, or 1 - cosine similarity over
  the last (channel) dim averaged over tokens. Small change = unimportant = dropped first.

The sub-network evaluators share prefixes. Candidate k needs the activation entering block k,
h_k, which is the same for every k' >= k; so one pass walks the stack once and, at each
position k, branches off: run blocks k+1..N-1 on h_k and finish. Per batch that is N-1 prefix
block forwards (h_{N-1} needs blocks 0..N-2; no candidate uses the full stack's output) plus
sum_k (N-1-k) = N(N-1)/2 branch forwards, against N(N-1) when every candidate is run from
scratch (``naive=True``, kept to benchmark against). Because the branch of candidate k is
finished before the prefix advances, at most two activations of one batch are alive at a time
(the prefix and the branch), not all N.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop.compress.history import rank_candidates
from blockdrop.compress.stack import kept_blocks
from blockdrop.compress.target import CompressionTarget, Scored, Supervised, blocks_of, run_blocks
from blockdrop.core.errors import BlockdropError
from blockdrop.core.torchutil import eval_mode, model_device, to_device

# "map" is the detector's name for "score": the target's own metric of each sub-network
HIGHER_IS_BETTER = {"score": True, "map": True, "loss": False, "feature_mse": False, "feature_cosine": False}
SCORE_EVALUATORS = ("score", "map")
SUBNETWORK_EVALUATORS = (*SCORE_EVALUATORS, "loss")  # they score a model without block k (the others, block k)


@dataclass(frozen=True)
class SelectionResult:
    """Which block to drop, and every candidate's score."""

    chosen: int  # current position of the chosen block
    chosen_original: int  # its original index
    scores: dict  # {original index: score} for every candidate
    evaluator: str
    metric: str | None  # the score key for evaluator "map", else None
    higher_is_better: bool
    block_forwards: int  # block forwards this selection ran (counted on the blocks themselves)
    naive_block_forwards: int  # what running every candidate from scratch costs (or cost, naive=True)
    wall_time_s: float
    naive: bool  # whether the naive method ran
    batches: int
    rounds: list = field(default_factory=list)  # successive halving: per round {candidates, batches, scores}
    ranking: list = field(default_factory=list)  # original indices, best first (halving: survivors of later rounds first)

    def to_dict(self) -> dict:
        """Plain JSON types; score keys are strings, as they come back from a JSON file."""
        record = asdict(self)
        record["scores"] = {str(k): v for k, v in self.scores.items()}
        return record


# ---- counting and plumbing -----------------------------------------------------------------------

class ForwardCounter:
    """Counts calls of the blocks of one or more stacks with forward pre-hooks, whoever calls them
    (a context manager: the hooks are removed on exit)."""

    def __init__(self, *stacks: nn.Module):
        self.count = 0
        self._handles = [block.register_forward_pre_hook(self._hook) for blocks in stacks for block in blocks]

    def __enter__(self) -> ForwardCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _hook(self, module, args) -> None:
        self.count += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _check_candidates(candidates, depth: int) -> list[int]:
    if candidates is None:
        return list(range(depth))
    values = list(candidates)
    bad = [repr(c) for c in values if isinstance(c, bool) or not hasattr(c, "__index__")]
    if bad:
        raise BlockdropError(f"select_block: candidates must be current block positions (integers), "
                             f"got {', '.join(bad)}")
    values = [operator.index(c) for c in values]
    outside = sorted({c for c in values if not 0 <= c < depth})
    if outside:
        raise BlockdropError(f"select_block: candidates {outside} are out of range for a stack of depth {depth} "
                             f"(valid: 0..{depth - 1})")
    if not values:
        raise BlockdropError("select_block: candidates is empty: nothing to choose from")
    return sorted(set(values))


# ---- the evaluators ------------------------------------------------------------------------------

class _SubnetworkScores:
    """Accumulates, per candidate, what the "map" or "loss" evaluator needs from its outputs."""

    def __init__(self, target: CompressionTarget, evaluator: str, metric: str, candidates: list[int]):
        self.target, self.evaluator, self.metric = target, evaluator, metric
        self.predictions = {k: [] for k in candidates}  # "map": predictions over the batches seen
        self.loss_sum = dict.fromkeys(candidates, 0.0)  # "loss": sum of per-batch totals
        self.seen = dict.fromkeys(candidates, 0)  # batches each candidate was scored on
        self.batches = 0

    def add(self, k: int, model: nn.Module, output, batch: dict) -> None:
        if self.evaluator in SCORE_EVALUATORS:
            self.predictions[k].extend(self.target.predict(model, output, batch))
        else:
            self.loss_sum[k] += float(self.target.task_loss(model, output, batch)["total"])
        self.seen[k] += 1

    def scores(self, keys=None) -> dict[int, float]:
        keys = list(self.predictions) if keys is None else keys
        if self.evaluator == "loss":
            return {k: self.loss_sum[k] / self.seen[k] for k in keys}
        return {k: self._metric(self.target.score(self.predictions[k])) for k in keys}

    def _metric(self, metrics: dict) -> float:
        if self.metric not in metrics:
            raise BlockdropError(f"select_block: metric {self.metric!r} is not among the target's scores "
                                 f"({', '.join(sorted(metrics))})")
        return float(metrics[self.metric])


def _shared_prefix_batch(model, target, batch, blocks, candidates, acc: _SubnetworkScores) -> None:
    """One batch, all candidates: walk the prefix once, branch off at each candidate."""
    tokens, ctx = target.embed(model, batch)  # h_0
    last, wanted = candidates[-1], set(candidates)
    for k in range(last + 1):
        if k in wanted:
            branch = tokens
            for block in blocks[k + 1:]:
                branch = target.call_block(block, branch, ctx)
            acc.add(k, model, target.finish(model, branch, ctx, batch), batch)
        if k < last:
            tokens = target.call_block(blocks[k], tokens, ctx)  # h_{k+1}


def _naive_batch(model, target, batch, blocks, candidates, acc: _SubnetworkScores) -> None:
    """One batch, all candidates, each from scratch: the reference for the shared-prefix pass."""
    for k in candidates:
        acc.add(k, model, run_blocks(model, target, batch, skip=k), batch)


def _block_change(x: torch.Tensor, y: torch.Tensor, evaluator: str) -> tuple[float, int]:
    """(sum of the per-element or per-token change, how many were summed) for one block."""
    x, y = x.double(), y.double()  # sums over many tokens: keep them exact enough to compare
    if evaluator == "feature_mse":
        return float((y - x).pow(2).sum()), x.numel()
    cosine = F.cosine_similarity(x, y, dim=-1)  # (..., tokens): over the channel (last) dim
    return float((1 - cosine).sum()), cosine.numel()


def _feature_scores(model, target, loader, device, blocks, candidates, evaluator) -> tuple[dict, int]:
    """Block influence on the full model: one forward per batch through blocks 0..max(candidates)."""
    sums, counts, batches = dict.fromkeys(candidates, 0.0), dict.fromkeys(candidates, 0), 0
    for batch in loader:
        tokens, ctx = target.embed(model, to_device(batch, device))
        for k in range(candidates[-1] + 1):
            out = target.call_block(blocks[k], tokens, ctx)
            if k in sums:
                total, n = _block_change(tokens, out, evaluator)
                sums[k], counts[k] = sums[k] + total, counts[k] + n
            tokens = out
        batches += 1
    return {k: sums[k] / counts[k] if counts[k] else math.nan for k in candidates}, batches


def _subnetwork_scores(model, target, loader, device, blocks, candidates, evaluator, metric, naive,
                       halving: Halving | None = None):
    """Every candidate on every batch; with ``halving``, successive halving over the data instead:
    after ``first`` batches only the best ``keep`` fraction of the candidates goes on (never fewer
    than the finalists: the share ``final`` of the candidates, rounded up), the next round ends at
    twice as many batches, and so on until only the finalists remain: they are scored on the rest of
    the data, all of it (with ``final`` 0, one finalist: the last survivor reads no more). Each candidate's predictions accumulate over the rounds,
    so nothing is computed twice; one pass over the data. -> (scores, batches, rounds)."""
    acc = _SubnetworkScores(target, evaluator, metric, candidates)
    run_batch = _naive_batch if naive else _shared_prefix_batch
    alive, rounds = list(candidates), []
    finalists = halving.finalists(len(candidates)) if halving is not None else len(candidates)
    boundary = halving.first if len(alive) > finalists else None
    for batch in loader:
        if len(alive) == 1 and halving is not None:
            break  # the last survivor needs no more data
        run_batch(model, target, to_device(batch, device), blocks, alive, acc)
        acc.batches += 1
        if boundary is not None and acc.batches == boundary:
            alive = _halve(acc, alive, halving, finalists, rounds)
            boundary = boundary * 2 if len(alive) > finalists else None  # None: the finalists read it all
    if not acc.batches:
        return {}, 0, rounds
    final = acc.scores(alive)
    if halving is not None and (not rounds or rounds[-1]["batches"] != acc.batches):
        rounds.append({"candidates": sorted(alive), "batches": acc.batches, "scores": final})
    eliminated = {k: v for r in rounds for k, v in r["scores"].items() if k not in alive}
    return {**eliminated, **final}, acc.batches, rounds


@dataclass(frozen=True)
class Halving:
    """Successive halving over the selection data (see `_subnetwork_scores`)."""

    first: int = 2  # batches of the first round
    keep: float = 0.5  # fraction of the candidates that goes on after a round
    # share of the candidates (rounded up, at least one) that halving keeps for a decision on all
    # the data; 0: halve down to one, which reads no more (docs/benchmarks.md: why a third)
    final: float = 0.33

    def __post_init__(self) -> None:
        if self.first < 1 or not 0 < self.keep < 1 or not 0 <= self.final <= 1:
            raise BlockdropError(f"successive halving needs first >= 1 batch, 0 < keep < 1 and 0 <= final <= 1, "
                                 f"got {self}")

    def finalists(self, candidates: int) -> int:
        """How many of ``candidates`` decide on all the data."""
        return max(1, math.ceil(self.final * candidates - 1e-9))


def _halve(acc: _SubnetworkScores, alive: list[int], halving: Halving, finalists: int, rounds: list) -> list[int]:
    scores = acc.scores(alive)
    rounds.append({"candidates": sorted(alive), "batches": acc.batches, "scores": scores})
    sign = -1.0 if HIGHER_IS_BETTER[acc.evaluator] else 1.0
    ranked = sorted(alive, key=lambda k: (math.isnan(scores[k]), sign * scores[k], k))
    return sorted(ranked[: max(finalists, math.ceil(halving.keep * len(alive)))])


def naive_forwards(depth: int, candidates: list[int], evaluator: str) -> int:
    """Block forwards per batch when every candidate runs from scratch (a feature evaluator has no
    naive variant: its single forward is already minimal)."""
    if evaluator.startswith("feature"):
        return max(candidates) + 1
    return len(candidates) * (depth - 1)


# ---- the entry point -----------------------------------------------------------------------------

def check_evaluator(target, evaluator: str, where: str = "evaluator") -> None:
    """The evaluator exists and the target can serve it (a BlockdropError naming ``where`` otherwise)."""
    if evaluator not in HIGHER_IS_BETTER:
        raise BlockdropError(f"{where}: unknown evaluator {evaluator!r} (choose from {', '.join(HIGHER_IS_BETTER)})")
    if evaluator in SCORE_EVALUATORS and not isinstance(target, Scored):
        raise BlockdropError(f"{where}: {evaluator!r} scores sub-networks with the target's predict/score, which "
                             f"{type(target).__name__} does not have; use feature_cosine or feature_mse, or give "
                             f"the target a score function")
    if evaluator == "loss" and not isinstance(target, Supervised):
        raise BlockdropError(f"{where}: 'loss' needs the target's task_loss, which {type(target).__name__} does "
                             f"not have; use feature_cosine or feature_mse")


def score_model(model: nn.Module, target: CompressionTarget, loader, *, evaluator: str, metric: str | None = None,
                device=None) -> tuple[float, int]:
    """The whole model (no block skipped) scored over ``loader`` by a sub-network evaluator ("score"
    / "map" ranked by ``metric``, or "loss"): -> (score, batches). Eval mode under no_grad, training
    flags restored; used to score a candidate after its trial alignment (compress/strategies.py)."""
    check_evaluator(target, evaluator)
    if evaluator not in SUBNETWORK_EVALUATORS:
        raise BlockdropError(f"score_model: {evaluator!r} measures a block, not a model; use one of "
                             f"{', '.join(SUBNETWORK_EVALUATORS)}")
    device = torch.device(device) if device is not None else model_device(model)
    acc = _SubnetworkScores(target, evaluator, metric, [0])
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            acc.add(0, model, run_blocks(model, target, batch), batch)
            acc.batches += 1
    if not acc.batches:
        raise BlockdropError("score_model: the selection loader yielded no batches")
    return acc.scores()[0], acc.batches


def select_block(model: nn.Module, target: CompressionTarget, loader, *, evaluator: str = "score",
                 metric: str | None = None, naive: bool = False, device=None,
                 candidates=None, halving: Halving | None = None) -> SelectionResult:
    """Score every candidate block of ``model``'s stack on ``loader`` and choose one to drop.

    ``loader`` yields batches of a selection split of TRAINING data without augmentation (a
    DataLoader or a plain list); it is iterated once. The model runs in eval mode under
    ``torch.no_grad`` (every module's training flag is restored afterwards); it is not modified.
    ``metric``: the key of ``target.score`` the "score" evaluator ranks by. ``device``: where batches
    are moved (default: the model's). ``candidates``: current positions that may be dropped
    (default: all). ``naive=True`` runs every candidate from scratch (same choice and scores, more
    forwards). ``halving``: successive halving over the data for the sub-network evaluators (the
    choice among the survivors of each round; every round is recorded in ``rounds``; an eliminated
    candidate's score is its last round's). Raises BlockdropError for a stack of one block, an
    unknown evaluator or metric, a target that cannot serve the evaluator, or no batches.
    """
    check_evaluator(target, evaluator)
    if evaluator in SCORE_EVALUATORS and not metric:
        raise BlockdropError(f"select_block: the {evaluator!r} evaluator needs metric= (a key of the target's score)")
    blocks = blocks_of(model, target)
    original = kept_blocks(model, stack=target.stack_path)
    if len(blocks) < 2:
        raise BlockdropError(f"select_block: block stack {target.stack_path!r} has {len(blocks)} block(s); "
                             f"dropping one would leave none")
    candidates = _check_candidates(candidates, len(blocks))
    device = torch.device(device) if device is not None else model_device(model)
    counter = ForwardCounter(blocks)
    start = time.perf_counter()
    try:
        with eval_mode(model), torch.no_grad():
            rounds = []
            if evaluator.startswith("feature"):
                scores, batches = _feature_scores(model, target, loader, device, blocks, candidates, evaluator)
            else:
                scores, batches, rounds = _subnetwork_scores(model, target, loader, device, blocks, candidates,
                                                             evaluator, metric, naive, halving)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        counter.remove()
    if not batches:
        raise BlockdropError("select_block: the selection loader yielded no batches")
    ranking = rank_candidates(scores, rounds, HIGHER_IS_BETTER[evaluator])
    if math.isnan(scores[ranking[0]]):
        raise BlockdropError("select_block: every candidate scored NaN; the model or the selection data is broken")
    chosen = ranking[0]
    return SelectionResult(
        chosen=chosen, chosen_original=original[chosen], scores={original[k]: s for k, s in scores.items()},
        evaluator=evaluator, metric=metric if evaluator in SCORE_EVALUATORS else None,
        higher_is_better=HIGHER_IS_BETTER[evaluator], block_forwards=counter.count,
        naive_block_forwards=batches * naive_forwards(len(blocks), candidates, evaluator),
        wall_time_s=time.perf_counter() - start, naive=naive and not evaluator.startswith("feature"), batches=batches,
        rounds=[{"candidates": [original[k] for k in r["candidates"]], "batches": r["batches"],
                 "scores": {str(original[k]): v for k, v in r["scores"].items()}} for r in rounds],
        ranking=[original[k] for k in ranking])
