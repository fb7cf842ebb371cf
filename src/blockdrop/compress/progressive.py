"""The Progressive Block Drop loop, as the method reads:

    repeat: select a block -> drop it -> align (LoRA, teacher) -> merge -> validate -> measure
            -> save the step
    until:  a stopping rule fires (compress/rules.py); a step that breaks the accuracy budget is
            rolled back and the reason recorded.

A run folder holds `history.json` (compress/history.py), `step_NN/` (selection.json, the
alignment's metrics and resumable state, model.safetensors) and `model.safetensors` (the last kept
step). `resume=True` continues from the last completed step, and inside a step from the
alignment's last saved epoch, re-using the recorded choice.

Under torchrun every rank runs the loop: the alignment trains with DistributedDataParallel over all
ranks, while selection, validation and measurement run on rank 0 and their results are broadcast
(so every rank drops the same blocks and stops at the same step), and only rank 0 writes.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from blockdrop.compress.align import align
from blockdrop.compress.history import AlignRecord, Cost, History, SelectionRecord, StepRecord, TeacherRecord
from blockdrop.compress.rules import stopping_rules, strategy_for
from blockdrop.compress.stack import drop_original, kept_blocks
from blockdrop.compress.strategies import SelectionContext, selection_strategy
from blockdrop.core import distributed as dist
from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import atomic_path, load_state, write_json
from blockdrop.core.schema import CompressConfig
from blockdrop.core.training import seed_everything, stage_seed

MODEL_FILE = "model.safetensors"
HISTORY_FILE = "history.json"
SELECT, ALIGN, VALIDATE = 1, 2, 3  # the stages of a step, each with its own random stream


def _enter(setup: Setup, step: int, stage: int) -> None:
    seed_everything(stage_seed(setup.seed, step, stage))


@dataclass
class Setup:
    """What the loop runs on, built once by a recipe (recipes/compress.py) or by `compress_model`."""

    teacher: nn.Module
    target: object  # the CompressionTarget of alignment (and of selection unless selection_target is set)
    train_data: Iterable  # batches for the alignment (a DataLoader, or a list)
    selection_data: Iterable  # batches of training data without augmentation, for selection
    validate: Callable[[nn.Module], dict] | None  # validation metrics; None: keep each alignment's last epoch
    metric: str | None  # the key of validate's result that picks epochs and judges the accuracy budget
    measure: Callable[[nn.Module], Cost]
    save: Callable[[nn.Module, Path], None]  # a kept step's model -> its file (rank 0 only calls it)
    load: Callable[[Path], nn.Module]  # that file -> the model (for resume)
    selection_target: object | None = None  # a target whose `score` knows the selection data
    progress: bool = True
    log: Callable[[str], None] = print
    on_checkpoint: Callable[[int], None] | None = None  # rank 0, after each alignment epoch's state
    seed: int = 0  # each stage (selection, alignment, validation of step k) starts from seed_stage(seed, k, stage)


def progressive_block_drop(setup: Setup, cfg: CompressConfig, out: Path, *, resume: bool = False) -> History:
    """Run the loop in ``out``; returns the history (also written to out/history.json)."""
    out = Path(out)
    selector, context = selection_for(setup, cfg)
    history = _start(setup, out, resume)
    stop = cfg.stopping
    strategy = strategy_for(cfg.strategy, stop.max_blocks)
    rules = stopping_rules(max_blocks=stop.max_blocks, target_macs_reduction=stop.target_macs_reduction,
                           max_accuracy_drop=stop.max_accuracy_drop, metric=setup.metric)
    student = setup.load(out / _step_name(history.steps[-1].step) / MODEL_FILE) if history.steps else setup.teacher
    while (reason := strategy.done(history) or _first(rule.before(history) for rule in rules)) is None:
        step = len(history.steps) + 1
        recorded = (out / _step_name(step) / "selection.json").exists()
        setup.log(f"step {step}: " + ("resuming with the recorded selection" if recorded else
                                      f"selecting among {len(history.kept_blocks)} blocks ({selector.name})"))
        merged, record = run_step(setup, cfg, strategy, student, history, step, out / _step_name(step), resume,
                                  selector=selector, context=context)
        rejection = _first(rule.reject(history, record) for rule in rules)
        if rejection:
            record.status, history.rejected, history.stopped = "rolled_back", record, rejection
            break
        if dist.is_main():
            setup.save(merged, out / _step_name(step) / MODEL_FILE)
        history.steps.append(record)
        _write(history, out)
        setup.log(f"step {step}: dropped block {record.dropped_original}, val {setup.metric} "
                  f"{record.val.get(setup.metric, float('nan')):.2f}, {record.cost.gmacs:.3f} GMACs")
        student = merged
    history.stopped = history.stopped or reason
    _finish(history, out)
    return history


def _first(reasons) -> str | None:
    return next(filter(None, reasons), None)


def selection_for(setup: Setup, cfg: CompressConfig):
    """(the selection strategy ``cfg.selection`` names, what it may use), checked against the targets."""
    selector = selection_strategy(cfg)
    context = SelectionContext(
        target=setup.selection_target if setup.selection_target is not None else setup.target,
        data=setup.selection_data, align_target=setup.target, train_data=setup.train_data,
        teacher=setup.teacher if cfg.teacher_mode == "original" else None, alignment=cfg.alignment)
    selector.check(context.target)
    return selector, context


def run_step(setup: Setup, cfg: CompressConfig, strategy, student: nn.Module, history: History, step: int,
             step_dir: Path, resume: bool, *, selector, context: SelectionContext) -> tuple[nn.Module, StepRecord]:
    """One step on a copy of ``student``: select -> drop -> align + merge -> validate -> measure."""
    start = time.perf_counter()
    _enter(setup, step, SELECT)
    selection = _select(selector, context, strategy, student, step_dir)
    selected = time.perf_counter()
    _enter(setup, step, ALIGN)
    student = copy.deepcopy(student)
    # "previous": the model this step starts from, frozen (the authors' ActivityNet setting)
    teacher = setup.teacher if cfg.teacher_mode == "original" else copy.deepcopy(student)
    drop_original(student, selection.drop, stack=setup.target.stack_path)
    a = cfg.alignment
    if a.enabled:
        train_cfg = replace(a.train, epochs=strategy.epochs(a.train.epochs, len(selection.drop)))
        merged, fit = align(student, teacher, setup.target, setup.train_data, train_cfg, lora=a.lora,
                            rank=a.lora_rank, targets=a.lora_targets, trainable=a.trainable, adapters=a.adapters,
                            weights=a.weights, evaluate_fn=setup.validate, metric=setup.metric,
                            score_unaligned=a.score_unaligned, out_dir=step_dir / "align", resume=resume,
                            progress=setup.progress, config_name="compress.alignment.train",
                            on_checkpoint=setup.on_checkpoint)
        align_record = AlignRecord(best_epoch=fit.best_epoch, epochs=fit.history, val_before=fit.initial)
    else:  # drop-only: the student as dropped (best_epoch None: no fine-tune ran)
        merged, align_record = student, AlignRecord(best_epoch=None)
    aligned = time.perf_counter()
    _enter(setup, step, VALIDATE)
    val, cost, times = dist.main_result(lambda: _validate_and_measure(setup, merged))
    kept = kept_blocks(merged, stack=setup.target.stack_path)
    record = StepRecord(
        step=step, dropped_original=list(selection.drop), kept_blocks=kept,
        blocks_dropped=len(history.teacher.kept_blocks) - len(kept), selection=selection,
        align=align_record,
        val=val, cost=cost, time_s=round(time.perf_counter() - start, 1),
        timings={"selection_s": round(selected - start, 3), "align_s": round(aligned - selected, 3), **times})
    return merged, record


def _validate_and_measure(setup: Setup, model: nn.Module) -> tuple[dict, Cost, dict]:
    t0 = time.perf_counter()
    val = setup.validate(model) if setup.validate is not None else {}
    val = {k: v for k, v in val.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}  # the metrics
    t1 = time.perf_counter()
    cost = setup.measure(model)
    return val, cost, {"validate_s": round(t1 - t0, 3), "measure_s": round(time.perf_counter() - t1, 3)}


def _select(selector, context: SelectionContext, strategy, student: nn.Module, step_dir: Path) -> SelectionRecord:
    """The recorded choice of this step (rank 0 reads it for all), or a fresh selection, recorded
    before anything changes. Every rank calls the selector: what it scores runs on rank 0 and is
    handed to the others, its trial alignments (recovery-aware) train on all ranks."""
    path = step_dir / "selection.json"
    recorded = dist.main_result(lambda: History.selection_from_json(
        load_state(path, json_file=True, remedy="delete it to select again, or start over with --overwrite"),
        str(path)) if path.exists() else None)
    if recorded is not None:
        return recorded
    record = selector.select(student, context)
    record.drop = strategy.drop(record)
    step_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        write_json(path, History.selection_to_json(record))
    return record


def _start(setup: Setup, out: Path, resume: bool) -> History:
    """The recorded history (resume), or a new one with the teacher validated and measured."""
    path = out / HISTORY_FILE
    if resume and path.exists():
        return History.load(path)
    setup.log("measuring the teacher on the validation split")
    _enter(setup, 0, VALIDATE)
    val, cost, _ = dist.main_result(lambda: _validate_and_measure(setup, setup.teacher))
    history = History(teacher=TeacherRecord(kept_blocks=kept_blocks(setup.teacher, stack=setup.target.stack_path),
                                            val=val, cost=cost),
                      metric=setup.metric, world_size=dist.world_size())
    _write(history, out)
    return history


def _write(history: History, out: Path) -> None:
    if dist.is_main():
        history.save(out / HISTORY_FILE)


def _finish(history: History, out: Path) -> None:
    """The final history, and the last kept step's model as out/model.safetensors."""
    _write(history, out)
    if history.steps and dist.is_main():
        final = out / _step_name(history.steps[-1].step) / MODEL_FILE
        with atomic_path(out / MODEL_FILE) as tmp:  # never a half-copied final model
            shutil.copyfile(final, tmp)
    dist.barrier()  # the run folder is complete before any rank returns
    if not history.steps and not (out / MODEL_FILE).exists():
        raise BlockdropError(f"{out}: no step was kept ({history.stopped})")


def _step_name(step: int) -> str:
    return f"step_{step:02d}"


def format_history(history: History) -> str:
    """The per-step table (blocks, GMACs, latency, validation metric)."""
    metric = history.metric
    rows = [("teacher", 0, "-", history.teacher.cost, history.teacher.val)]
    rows += [(f"step {s.step}", s.blocks_dropped, s.dropped_original, s.cost, s.val) for s in history.steps]
    lines = [f"| model | blocks dropped | dropped (original idx) | GMACs | latency ms | val {metric} |",
             "|---|---|---|---|---|---|"]
    for name, dropped, which, cost, val in rows:
        latency = cost.latency_ms if cost.latency_ms is not None else float("nan")
        lines.append(f"| {name} | {dropped} | {which} | {cost.gmacs:.3f} | {latency:.2f} | "
                     f"{val.get(metric, float('nan')):.2f} |")
    lines.append(f"stopped: {history.stopped}")
    return "\n".join(lines)
