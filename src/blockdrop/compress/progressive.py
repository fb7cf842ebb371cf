"""The Progressive Block Drop loop, as the method reads:

    repeat: select a block -> drop it -> align (LoRA, teacher) -> merge -> evaluate on
            validation -> measure -> save the step
    until:  max blocks dropped, target MACs reduction reached, or the accuracy drop on
            validation exceeds the limit (that step is rolled back and the reason recorded).

A run folder holds `history.json` (teacher + one record per step, every candidate's score),
`step_NN/` (selection.json, the alignment's metrics and resumable state, model.safetensors)
and `model.safetensors` (the last kept step). `--resume` continues from the last completed
step, and inside a step from the alignment's last saved epoch, re-using the recorded choice.

Under torchrun every rank runs the loop: the alignment trains with DistributedDataParallel over
all ranks, while selection, validation and measurement run on rank 0 and their results are
broadcast (so every rank drops the same block and stops at the same step), and only rank 0
writes to the run folder.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from blockdrop.core import distributed as dist
from blockdrop.compress.saving import save_compressed
from blockdrop.compress.stack import drop_blocks, kept_blocks
from blockdrop.core.fileio import atomic_path, atomic_write_text
from blockdrop.core.errors import ConfigError

@dataclass
class Setup:
    """Everything the loop needs, built once by the recipe (see recipes.compress_experiment)."""

    teacher: nn.Module
    builder: dict
    selection_target: object  # CompressionTarget over training videos, no augmentation
    selection_loader: object
    align_target: object  # CompressionTarget used for the alignment losses
    train_loader: object
    validate: Callable[[nn.Module], dict]  # validation metrics (percent)
    measure: Callable[[nn.Module], dict]  # {"gmacs", "backbone_gmacs", "params", "latency_ms", ...}
    load: Callable[[Path], nn.Module]  # a saved step's model.safetensors -> model (for --resume)
    progress: bool = True  # progress bars during alignment


def write_json(path: Path, data) -> None:
    """Rank 0 writes (atomically); other ranks of a torchrun job do nothing."""
    if dist.is_main():
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def stop_reason(cfg, history: dict) -> str | None:
    """Why the loop should stop before another step, or None to continue."""
    steps = history["steps"]
    dropped = steps[-1]["blocks_dropped"] if steps else 0
    if cfg.max_blocks is not None and dropped >= cfg.max_blocks:
        return f"dropped max_blocks={cfg.max_blocks}"
    if cfg.target_macs_reduction is not None and steps:
        reduction = 1 - steps[-1]["gmacs"] / history["teacher"]["gmacs"]
        if reduction >= cfg.target_macs_reduction:
            return f"MACs reduced by {reduction:.1%} >= target {cfg.target_macs_reduction:.0%}"
    if len(kept_after(history)) <= 1:
        return "one block left"
    return history.get("stopped")


def kept_after(history: dict) -> list[int]:
    return history["steps"][-1]["kept_blocks"] if history["steps"] else history["teacher"]["kept_blocks"]


def _select(setup: Setup, student: nn.Module, cfg, step_dir: Path) -> dict:
    """The recorded choice of this step, or a fresh selection (recorded before anything changes).
    Rank 0 only: `run_step` hands the result to the other ranks."""
    from blockdrop.compress.selection import select_block

    path = step_dir / "selection.json"
    if path.exists():
        return json.loads(path.read_text())
    result = select_block(student, setup.selection_target, setup.selection_loader, evaluator=cfg.evaluator,
                          metric=cfg.selection_metric)
    record = result.to_dict()
    if cfg.one_shot:  # ablation: the max_blocks least harmful blocks by this first step's scores
        ranked = sorted(record["scores"].items(), key=lambda kv: -kv[1] if result.higher_is_better else kv[1])
        record["one_shot_original"] = sorted(int(k) for k, _ in ranked[: cfg.max_blocks])
    step_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def _drop(student: nn.Module, selection: dict, stack_path: str) -> list[int]:
    originals = selection.get("one_shot_original") or [selection["chosen_original"]]
    kept = kept_blocks(student, stack=stack_path)
    positions = [kept.index(o) for o in originals]
    drop_blocks(student, positions, stack=stack_path)
    return originals


def _align(setup: Setup, student: nn.Module, teacher: nn.Module, cfg, step_dir: Path, resume: bool, epochs: int,
           select_metric: str):
    from dataclasses import replace

    from blockdrop.compress.align import align

    weights = {"feature": cfg.feature_weight, "cls_kd": cfg.cls_kd_weight, "reg_kd": cfg.reg_kd_weight,
               "gt": cfg.gt_weight}
    train_cfg = replace(cfg.train, epochs=epochs)
    return align(student, teacher, setup.align_target, setup.train_loader, train_cfg, rank=cfg.lora_rank,
                 targets=cfg.lora_targets, trainable=cfg.trainable, weights=weights,
                 temperature=cfg.temperature, evaluate_fn=setup.validate, select_metric=select_metric,
                 out_dir=step_dir / "align", resume=resume, progress=setup.progress)


def run_step(setup: Setup, student: nn.Module, cfg, step: int, step_dir: Path, resume: bool,
             select_metric: str) -> tuple[nn.Module, dict]:
    """One step on a copy of ``student``: returns (merged model, step record)."""
    start = time.perf_counter()
    selection = dist.main_result(lambda: _select(setup, student, cfg, step_dir))
    student = copy.deepcopy(student)
    previous = copy.deepcopy(student) if cfg.teacher_mode == "previous" else None
    dropped = _drop(student, selection, setup.selection_target.stack_path)
    # "previous": the model this step starts from, frozen (the authors' ActivityNet setting)
    teacher = setup.teacher if previous is None else previous
    epochs = cfg.train.epochs * (len(dropped) if cfg.one_shot else 1)  # one-shot: the same total budget
    merged, fit = _align(setup, student, teacher, cfg, step_dir, resume, epochs, select_metric)
    val, cost = dist.main_result(lambda: (setup.validate(merged), setup.measure(merged)))
    record = {
        "step": step,
        "dropped_original": dropped,
        "kept_blocks": kept_blocks(merged, stack=setup.selection_target.stack_path),
        "selection": selection,
        "align": {"best_epoch": fit.best_epoch, "history": fit.history},
        "val": val,
        f"val_{select_metric}": val.get(select_metric),
        **cost,
        "time_s": round(time.perf_counter() - start, 1),
    }
    return merged, record


def progressive_block_drop(setup: Setup, cfg, out: Path, *, resume: bool = False, select_metric: str,
                           log: Callable[[str], None] = print) -> dict:
    """Run the loop in ``out``; returns the history (also written to out/history.json)."""
    history_path = out / "history.json"
    stack_path = setup.selection_target.stack_path
    teacher_kept = kept_blocks(setup.teacher, stack=stack_path)
    if resume and history_path.exists():
        history = json.loads(history_path.read_text())
    else:
        log("measuring the teacher on the validation split")
        val, cost = dist.main_result(lambda: (setup.validate(setup.teacher), setup.measure(setup.teacher)))
        history = {"teacher": {"kept_blocks": teacher_kept, "val": val, **cost}, "steps": [], "stopped": None,
                   "world_size": dist.world_size()}
        history["teacher"][f"val_{select_metric}"] = history["teacher"]["val"].get(select_metric)
        write_json(history_path, history)
    student = setup.teacher
    if history["steps"]:
        student = setup.load(out / f"step_{history['steps'][-1]['step']:02d}" / "model.safetensors")
    while stop_reason(cfg, history) is None:
        step = len(history["steps"]) + 1
        step_dir = out / f"step_{step:02d}"
        log(f"step {step}: selecting among {len(kept_after(history))} blocks ({cfg.evaluator})")
        merged, record = run_step(setup, student, cfg, step, step_dir, resume, select_metric)
        record["blocks_dropped"] = len(teacher_kept) - len(record["kept_blocks"])
        teacher_score = history["teacher"][f"val_{select_metric}"]
        if cfg.max_accuracy_drop is not None and teacher_score - record["val"][select_metric] > cfg.max_accuracy_drop:
            record["status"] = "rolled_back"
            history["rejected"] = record
            history["stopped"] = (f"step {step} lost {teacher_score - record['val'][select_metric]:.2f} "
                                  f"validation {select_metric} points > max_accuracy_drop={cfg.max_accuracy_drop}; "
                                  "rolled back")
            write_json(history_path, history)
            break
        record["status"] = "kept"
        if dist.is_main():
            save_compressed(merged, step_dir / "model.safetensors", builder=setup.builder)
        history["steps"].append(record)
        write_json(history_path, history)
        log(f"step {step}: dropped block {record['dropped_original']}, val {select_metric} "
            f"{record['val'][select_metric]:.2f}, {record['gmacs']:.3f} GMACs")
        student = merged
        if cfg.one_shot:
            history["stopped"] = f"one-shot drop of {len(record['dropped_original'])} blocks"
    history["stopped"] = history.get("stopped") or stop_reason(cfg, history)
    write_json(history_path, history)
    if history["steps"] and dist.is_main():
        final = out / f"step_{history['steps'][-1]['step']:02d}" / "model.safetensors"
        with atomic_path(out / "model.safetensors") as tmp:  # never a half-copied final model
            shutil.copyfile(final, tmp)
    dist.barrier()  # the run folder is complete before any rank returns
    if not history["steps"] and not (out / "model.safetensors").exists():
        raise ConfigError(f"{out}: no step was kept ({history['stopped']})")
    return history


def format_history(history: dict, metric: str) -> str:
    """The per-step table (blocks, GMACs, latency, validation metrics)."""
    rows = [("teacher", 0, history["teacher"])] + [(f"step {s['step']}", s["blocks_dropped"], s)
                                                  for s in history["steps"]]
    head = f"| model | blocks dropped | dropped (original idx) | GMACs | latency ms | val {metric} |"
    lines = [head, "|---|---|---|---|---|---|"]
    for name, dropped, r in rows:
        lines.append(f"| {name} | {dropped} | {r.get('dropped_original', '-')} | {r['gmacs']:.3f} | "
                     f"{r.get('latency_ms', float('nan')):.2f} | {r['val'].get(metric, float('nan')):.2f} |")
    lines.append(f"stopped: {history.get('stopped')}")
    return "\n".join(lines)
