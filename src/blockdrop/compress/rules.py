"""The loop's policies as small objects: when to stop, and how many blocks a step drops.

Stopping rules look at the history before a step (`before`: a reason to stop, or None) and
judge a finished step (`reject`: a reason to roll it back, or None). The strategy decides what a
selection drops, how long the step's alignment trains, and when it is done (`done`):

- `Progressive` (the method): the single best block, one alignment budget per step;
- `OneShot` (the paper's ablation): the ``count`` best blocks of the first selection at once (by
  the selection's ranking), one alignment of ``count`` budgets, then stop.

Which block is best is the selection strategy's business (compress/strategies.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from blockdrop.compress.history import History, SelectionRecord, StepRecord


@dataclass(frozen=True)
class MaxBlocks:
    limit: int

    def before(self, history: History) -> str | None:
        return f"dropped max_blocks={self.limit}" if history.blocks_dropped >= self.limit else None

    def reject(self, history: History, step: StepRecord) -> str | None:
        return None


@dataclass(frozen=True)
class MacsTarget:
    fraction: float  # of the teacher's MACs to remove

    def before(self, history: History) -> str | None:
        if not history.steps:
            return None
        reduction = 1 - history.steps[-1].cost.gmacs / history.teacher.cost.gmacs
        return (f"MACs reduced by {reduction:.1%} >= target {self.fraction:.0%}"
                if reduction >= self.fraction else None)

    def reject(self, history: History, step: StepRecord) -> str | None:
        return None


@dataclass(frozen=True)
class AccuracyBudget:
    """Roll back the step whose validation ``metric`` fell more than ``max_drop`` below the teacher's."""

    max_drop: float
    metric: str

    def before(self, history: History) -> str | None:
        return None

    def reject(self, history: History, step: StepRecord) -> str | None:
        lost = history.teacher.val[self.metric] - step.val[self.metric]
        if lost > self.max_drop:
            return (f"step {step.step} lost {lost:.2f} validation {self.metric} points > "
                    f"max_accuracy_drop={self.max_drop}; rolled back")
        return None


@dataclass(frozen=True)
class OneBlockLeft:
    def before(self, history: History) -> str | None:
        return "one block left" if len(history.kept_blocks) <= 1 else None

    def reject(self, history: History, step: StepRecord) -> str | None:
        return None


def stopping_rules(*, max_blocks: int | None, target_macs_reduction: float | None,
                   max_accuracy_drop: float | None, metric: str | None) -> list:
    rules = [MaxBlocks(max_blocks)] if max_blocks is not None else []
    if target_macs_reduction is not None:
        rules.append(MacsTarget(target_macs_reduction))
    if max_accuracy_drop is not None:
        rules.append(AccuracyBudget(max_accuracy_drop, metric))
    return rules + [OneBlockLeft()]


@dataclass(frozen=True)
class Progressive:
    def drop(self, selection: SelectionRecord) -> list[int]:
        return [selection.chosen_original]

    def epochs(self, per_step: int, dropping: int) -> int:
        return per_step

    def done(self, history: History) -> str | None:
        return None


@dataclass(frozen=True)
class OneShot:
    count: int

    def drop(self, selection: SelectionRecord) -> list[int]:
        return sorted(selection.order[: self.count])  # the selection's own ranking (halving rounds, trials)

    def epochs(self, per_step: int, dropping: int) -> int:
        return per_step * dropping  # the same total budget as `dropping` progressive steps

    def done(self, history: History) -> str | None:
        return f"one-shot drop of {history.blocks_dropped} blocks" if history.steps else None


def strategy_for(name: str, max_blocks: int | None):
    if name == "progressive":
        return Progressive()
    if name == "one_shot":
        return OneShot(max_blocks)
    raise ValueError(f"unknown strategy {name!r}")
