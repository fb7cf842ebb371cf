"""The run record of Progressive Block Drop: typed, versioned, and the only thing readers read.

The loop writes a `History` to ``history.json`` after every change; the report, the demo and the
benchmarks load it back as these dataclasses and never reach into training state. Format 2 is
written; format 1 (the first releases: no "version" key, costs and `val_<metric>` at the top of
each record) is read and converted. Anything else is an error that says how to re-run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import write_json

VERSION = 2
_COST_KEYS = ("gmacs", "params", "latency_ms", "latency_iqr_ms", "latency_device")


class HistoryError(BlockdropError):
    """A history.json that cannot be read as a run record."""


@dataclass
class Cost:
    """What a model costs on the run's unit input (one test window for a detector)."""

    gmacs: float
    params: int
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    latency_device: str | None = None
    extra: dict[str, float] = field(default_factory=dict)  # e.g. backbone_gmacs


def rank_candidates(scores: dict, rounds: list, higher_is_better: bool) -> list:
    """Candidates best first: those that survived more successive-halving rounds first (an
    eliminated one's score is from fewer batches, not comparable), then by score, NaN last; ties go
    to the lower key. ``rounds`` name their candidates by the same keys as ``scores``."""
    survived = dict.fromkeys(scores, len(rounds))
    for i, r in enumerate(rounds):
        for k in set(scores) - set(r["candidates"]):
            survived[k] = min(survived[k], i)
    sign = -1.0 if higher_is_better else 1.0
    return sorted(scores, key=lambda k: (-survived[k], math.isnan(scores[k]), sign * scores[k], k))


@dataclass
class TrialRecord:
    """Recovery-aware selection: the shortlist's trial alignments, and its scores after them."""

    shortlist: list[int]  # original indices, best first by the cheap pre-alignment score
    batches: int  # alignment batches each candidate was given (the same for all)
    evaluator: str  # what scored them after it: the selection's evaluator, or "align_loss"
    metric: str | None
    higher_is_better: bool
    scores: dict[int, float]  # per shortlisted original index, on the selection data after its trial
    ranking: list[int]  # the post-alignment ranking: the shortlist by those scores, best first
    block_forwards: int = 0  # block forwards of the trials: training (student and teacher) and scoring
    wall_time_s: float = 0.0


@dataclass
class SelectionRecord:
    """One selection: every candidate's score (by original index) and the blocks this step drops.

    ``scores`` / ``ranking`` are the pre-alignment ones (the strategy's evaluator, or for
    recovery-aware its cheap shortlist score); ``trial`` holds recovery-aware's post-alignment
    ranking; `order` is the ranking the choice follows. ``block_forwards`` and ``wall_time_s``
    count the whole selection, trials included."""

    evaluator: str
    metric: str | None
    higher_is_better: bool
    scores: dict[int, float]
    chosen: int  # current position of the best candidate
    chosen_original: int
    drop: list[int]  # original indices dropped by this step ([chosen_original], or a one-shot set)
    block_forwards: int = 0
    naive_block_forwards: int = 0
    wall_time_s: float = 0.0
    naive: bool = False
    batches: int = 0
    rounds: list[dict] = field(default_factory=list)  # successive halving: per round, the survivors
    strategy: str = "pre-recovery"  # compress.selection.strategy (histories before it: the paper's)
    ranking: list[int] = field(default_factory=list)  # pre-alignment, best first (empty: derived from scores)
    trial: TrialRecord | None = None  # recovery-aware only

    def __post_init__(self) -> None:
        if not self.ranking:
            self.ranking = rank_candidates(self.scores, self.rounds, self.higher_is_better)

    @property
    def order(self) -> list[int]:
        """Every candidate, best first, as the choice ranks them: recovery-aware's post-alignment
        ranking of its shortlist, then the rest by the pre-alignment ranking."""
        first = self.trial.ranking if self.trial is not None else []
        return first + [k for k in self.ranking if k not in first]


@dataclass
class AlignRecord:
    """The alignment fine-tune of a step: its epochs (fit's records) and the epoch it kept."""

    best_epoch: int | None  # 0: the unaligned student scored best and was kept
    epochs: list[dict] = field(default_factory=list)  # {"epoch", "lr", "time_s", "loss/<term>", "val/<metric>"}
    val_before: dict[str, float] | None = None  # the unaligned student on validation (epoch 0)


@dataclass
class StepRecord:
    step: int
    dropped_original: list[int]
    kept_blocks: list[int]
    blocks_dropped: int  # in total, counted from the teacher
    selection: SelectionRecord
    align: AlignRecord
    val: dict[str, float]  # the merged model on validation
    cost: Cost
    status: str = "kept"  # or "rolled_back"
    time_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # selection_s, align_s, validate_s, measure_s


@dataclass
class TeacherRecord:
    kept_blocks: list[int]
    val: dict[str, float]
    cost: Cost


@dataclass
class History:
    teacher: TeacherRecord
    metric: str | None  # the validation metric the accuracy budget and the epoch choice use
    steps: list[StepRecord] = field(default_factory=list)
    stopped: str | None = None
    rejected: StepRecord | None = None  # the step the accuracy budget rolled back
    world_size: int = 1
    version: int = VERSION

    @property
    def kept_blocks(self) -> list[int]:
        """Original indices of the blocks of the last kept model (the teacher's if none)."""
        return self.steps[-1].kept_blocks if self.steps else self.teacher.kept_blocks

    @property
    def blocks_dropped(self) -> int:
        return self.steps[-1].blocks_dropped if self.steps else 0

    @property
    def dropped_original(self) -> list[int]:
        return sorted(i for s in self.steps for i in s.dropped_original)

    def to_json(self) -> dict:
        data = asdict(self)
        records = self.steps + ([self.rejected] if self.rejected else [])
        for json_record, record in zip(data["steps"] + ([data["rejected"]] if data["rejected"] else []), records):
            json_record["selection"] = self.selection_to_json(record.selection)
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "history") -> History:
        if not isinstance(data, dict):
            raise HistoryError(f"{source}: expected a JSON object")
        version = data.get("version", 1)
        if version == 1:
            data = _from_version_1(data, source)
        elif version != VERSION:
            raise HistoryError(f"{source}: history format {version!r} is newer than this blockdrop reads "
                               f"({VERSION}); upgrade blockdrop, or re-run the compression with --overwrite")
        reader = _Reader(source)
        return reader.history(data)

    def save(self, path: Path) -> None:
        """Write atomically (callers under torchrun write on rank 0 only)."""
        write_json(path, self.to_json())

    @staticmethod
    def selection_to_json(record: SelectionRecord) -> dict:
        data = asdict(record)
        data["scores"] = {str(k): v for k, v in record.scores.items()}
        if record.trial is not None:
            data["trial"]["scores"] = {str(k): v for k, v in record.trial.scores.items()}
        return data

    @staticmethod
    def selection_from_json(data: Any, source: str) -> SelectionRecord:
        return _Reader(source).selection(data, "")

    @classmethod
    def load(cls, path: str | Path) -> History:
        path = Path(path)
        if not path.is_file():
            raise HistoryError(f"{path}: not found (give the folder of a `blockdrop compress` run)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise HistoryError(f"{path}: not a readable history ({err}); the run's record is damaged: restore it, "
                               f"or re-run the compression with --overwrite") from None
        return cls.from_json(data, str(path))


class _Reader:
    """Typed reading of the JSON with errors naming the field (e.g. ``steps[1].cost.gmacs``)."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str):
        raise HistoryError(f"{self.source}: field '{where}' {what} (not a compress history this blockdrop "
                           f"wrote; re-run the compression with --overwrite)")

    def get(self, data: dict, key: str, where: str, kind, optional: bool = False):
        if not isinstance(data, dict):
            self.fail(where, "is not an object")
        if key not in data:
            if optional:
                return None
            self.fail(f"{where}.{key}".lstrip("."), "missing")
        value = data[key]
        if value is None and optional:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(f"{where}.{key}".lstrip("."), f"is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
        return value

    def cost(self, data: dict, where: str) -> Cost:
        return Cost(gmacs=self.get(data, "gmacs", where, float), params=self.get(data, "params", where, int),
                    latency_ms=self.get(data, "latency_ms", where, float, True),
                    latency_iqr_ms=self.get(data, "latency_iqr_ms", where, float, True),
                    latency_device=self.get(data, "latency_device", where, str, True),
                    extra=dict(self.get(data, "extra", where, dict, True) or {}))

    def scores(self, data: dict, where: str) -> dict[int, float]:
        scores = self.get(data, "scores", where, dict)
        try:
            return {int(k): (float(v) if v is not None else float("nan")) for k, v in scores.items()}
        except (TypeError, ValueError):
            self.fail(f"{where}.scores".lstrip("."), "is not a map of block index -> score")

    def indices(self, data: dict, key: str, where: str, optional: bool = False) -> list[int]:
        values = self.get(data, key, where, list, optional) or []
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            self.fail(f"{where}.{key}".lstrip("."), "is not a list of block indices")
        return list(values)

    def trial(self, data: dict, where: str) -> TrialRecord:
        return TrialRecord(
            shortlist=self.indices(data, "shortlist", where), batches=self.get(data, "batches", where, int),
            evaluator=self.get(data, "evaluator", where, str), metric=self.get(data, "metric", where, str, True),
            higher_is_better=self.get(data, "higher_is_better", where, bool), scores=self.scores(data, where),
            ranking=self.indices(data, "ranking", where),
            block_forwards=self.get(data, "block_forwards", where, int, True) or 0,
            wall_time_s=self.get(data, "wall_time_s", where, float, True) or 0.0)

    def selection(self, data: dict, where: str) -> SelectionRecord:
        scores = self.scores(data, where)
        chosen_original = self.get(data, "chosen_original", where, int)
        trial = self.get(data, "trial", where, dict, True)
        return SelectionRecord(
            evaluator=self.get(data, "evaluator", where, str), metric=self.get(data, "metric", where, str, True),
            higher_is_better=self.get(data, "higher_is_better", where, bool), scores=scores,
            chosen=self.get(data, "chosen", where, int), chosen_original=chosen_original,
            drop=list(self.get(data, "drop", where, list, True) or self.get(data, "one_shot_original", where, list, True)
                      or [chosen_original]),
            block_forwards=self.get(data, "block_forwards", where, int, True) or 0,
            naive_block_forwards=self.get(data, "naive_block_forwards", where, int, True) or 0,
            wall_time_s=self.get(data, "wall_time_s", where, float, True) or 0.0,
            naive=bool(self.get(data, "naive", where, bool, True)),
            batches=self.get(data, "batches", where, int, True) or 0,
            rounds=list(self.get(data, "rounds", where, list, True) or []),
            strategy=self.get(data, "strategy", where, str, True) or "pre-recovery",
            ranking=self.indices(data, "ranking", where, optional=True),
            trial=self.trial(trial, f"{where}.trial".lstrip(".")) if trial is not None else None)

    def step(self, data: dict, where: str) -> StepRecord:
        align = self.get(data, "align", where, dict)
        return StepRecord(
            step=self.get(data, "step", where, int),
            dropped_original=list(self.get(data, "dropped_original", where, list)),
            kept_blocks=list(self.get(data, "kept_blocks", where, list)),
            blocks_dropped=self.get(data, "blocks_dropped", where, int),
            selection=self.selection(self.get(data, "selection", where, dict), f"{where}.selection"),
            align=AlignRecord(best_epoch=self.get(align, "best_epoch", f"{where}.align", int, True),
                              epochs=list(self.get(align, "epochs", f"{where}.align", list)),
                              val_before=self.get(align, "val_before", f"{where}.align", dict, True)),
            val=dict(self.get(data, "val", where, dict)),
            cost=self.cost(self.get(data, "cost", where, dict), f"{where}.cost"),
            status=self.get(data, "status", where, str, True) or "kept",
            time_s=self.get(data, "time_s", where, float, True) or 0.0,
            timings=dict(self.get(data, "timings", where, dict, True) or {}))

    def history(self, data: dict) -> History:
        teacher = self.get(data, "teacher", "", dict)
        steps = self.get(data, "steps", "", list)
        rejected = self.get(data, "rejected", "", dict, True)
        return History(
            teacher=TeacherRecord(kept_blocks=list(self.get(teacher, "kept_blocks", "teacher", list)),
                                  val=dict(self.get(teacher, "val", "teacher", dict)),
                                  cost=self.cost(self.get(teacher, "cost", "teacher", dict), "teacher.cost")),
            metric=self.get(data, "metric", "", str, True),
            steps=[self.step(s, f"steps[{i}]") for i, s in enumerate(steps)],
            stopped=self.get(data, "stopped", "", str, True),
            rejected=self.step(rejected, "rejected") if rejected is not None else None,
            world_size=self.get(data, "world_size", "", int, True) or 1)


def _numbers(values) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(values, dict) else values


def _from_version_1(data: dict, source: str) -> dict:
    """Format 1 -> format 2: costs move under "cost", the selection names what it drops, the
    alignment's "history" becomes "epochs", and the metric comes from the `val_<metric>` key."""
    if not isinstance(data.get("teacher"), dict) or not isinstance(data.get("steps"), list):
        raise HistoryError(f"{source}: field 'teacher' or 'steps' missing (not a compress history; "
                           f"re-run the compression with --overwrite)")
    metric = next((k[4:] for k in data["teacher"] if k.startswith("val_")), None)

    def record(old: dict) -> dict:
        if not isinstance(old, dict):
            return old
        new = {k: v for k, v in old.items() if k not in _COST_KEYS and k != "backbone_gmacs"
               and not k.startswith("val_")}
        new["cost"] = {k: old.get(k) for k in _COST_KEYS}
        new["val"] = _numbers(old.get("val"))
        if "backbone_gmacs" in old:
            new["cost"]["extra"] = {"backbone_gmacs": old["backbone_gmacs"]}
        if isinstance(old.get("selection"), dict):
            selection = dict(old["selection"])
            selection["drop"] = selection.pop("one_shot_original", None) or [selection.get("chosen_original")]
            new["selection"] = selection
        if isinstance(old.get("align"), dict):
            new["align"] = {"best_epoch": old["align"].get("best_epoch"), "epochs": old["align"].get("history", [])}
        return new

    return {"version": VERSION, "teacher": record(data["teacher"]), "metric": metric,
            "steps": [record(s) for s in data["steps"]], "stopped": data.get("stopped"),
            "rejected": record(data["rejected"]) if data.get("rejected") else None,
            "world_size": data.get("world_size", 1)}
