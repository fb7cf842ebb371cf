"""The one training loop, used by `blockdrop train` and by alignment fine-tuning.

The loop knows nothing about detection: it gets a model, a ``loss_fn(model, batch)``
returning a dict of named scalar losses with a ``"total"`` entry, and an
``evaluate_fn(model)`` returning validation metrics. Alignment fine-tuning reuses it
by passing a loss_fn that also runs the frozen teacher.

Model selection uses the validation metrics only; the test split is never seen here.
Everything needed to resume (model, EMA, optimiser, scheduler, epoch, best) is saved
after every epoch with an atomic write, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from blockdrop.core import distributed as dist
from blockdrop.core.errors import ConfigError, TrainingError
from blockdrop.core.fileio import append_text, atomic_write_text, load_state, save_torch, truncate_to
from blockdrop.core.schema import TrainConfig
from blockdrop.core.torchutil import model_device, to_device

LossFn = Callable[[nn.Module, dict], dict]
EvalFn = Callable[[nn.Module], dict]


@dataclass
class FitResult:
    best_metric: float | None
    best_epoch: int | None  # 0: the model as given scored best (evaluate_initial)
    epochs_run: int
    history: list[dict] = field(default_factory=list)  # one record per trained epoch
    initial: dict | None = None  # the metrics before the first epoch (evaluate_initial)
    stopped_early: bool = False  # cfg.patience epochs passed without a better validation score
    # at the end, cfg.patience epochs or more had passed since the last gain above cfg.min_delta
    # (true when stopped early; also when the schedule ran out on a plateau)
    plateaued: bool = False


def stage_seed(seed: int, *keys: int) -> int:
    """A seed for one stage of a run, e.g. (seed, step, stage): each stage starts from its own
    random stream, so a resumed run that skips finished stages draws exactly what an
    uninterrupted run draws (a validation pass iterating a DataLoader draws from the global RNG)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])  # 32 bits: numpy legacy seeding takes no more


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, collate_fn=None,
                num_workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): resumable and DDP-ready.

    The DistributedSampler shards across ranks under torchrun and is the whole dataset
    in one process; ``fit`` calls its ``set_epoch`` before every epoch.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(),
                                 shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, drop_last=drop_last, persistent_workers=num_workers > 0)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up from ~0 to 1, then cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(param_groups: Iterable[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay, as is usual for ViTs."""
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        lr = cfg.lr * group.get("lr_mult", 1.0)
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class _Logger:
    """Metrics as JSON lines; only rank 0 writes."""

    def __init__(self, path: Path | None):
        self.path, self.before = path, None

    def __call__(self, record: dict) -> None:
        if self.path is not None and dist.is_main():
            self.before = append_text(self.path, json.dumps(record) + "\n")  # whole line or none

    def undo(self) -> None:
        """Drop the last line (its epoch's state was never saved)."""
        if self.before is not None:
            truncate_to(self.path, self.before)

    def rewrite(self, records: list[dict]) -> None:
        """Exactly these records (a resumed run: an epoch logged after the last saved state is
        dropped, so it is not logged twice when it runs again)."""
        if self.path is not None and dist.is_main():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))


class _NonFinite(Exception):
    def __init__(self, term: str, values: dict):
        super().__init__(term)
        self.term, self.values = term, values


def check_schedule(cfg: TrainConfig, steps_per_epoch: int, config_name: str = "train") -> None:
    """Refuse an EMA that would still be mostly the initial weights at the end of the run.

    After n steps the EMA gives the starting weights a share of decay**n; above 10% the "best"
    weights fit hands on are largely untrained (a 0.999 EMA over a 2-epoch alignment is)."""
    steps = cfg.epochs * steps_per_epoch
    if cfg.ema_decay > 0 and cfg.ema_decay ** steps > 0.1:
        suggestion = 0.1 ** (1 / steps)
        raise ConfigError(f"{config_name}.ema_decay {cfg.ema_decay} averages over ~{1 / (1 - cfg.ema_decay):.0f} steps "
                          f"but the run has {steps} ({cfg.epochs} epochs x {steps_per_epoch}): the initial weights "
                          f"would keep {cfg.ema_decay ** steps:.0%} of the average; use at most {suggestion:.3f}, "
                          f"or 0 to turn EMA off")


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader,
    cfg: TrainConfig,
    *,
    evaluate_fn: EvalFn | None = None,
    select_metric: str = "average_mAP",
    evaluate_initial: bool = False,
    param_groups: list[dict] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_best: Callable[[nn.Module, dict], None] | None = None,
    progress: bool = True,
    config_name: str = "train",
    on_checkpoint: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs``; keep the best validation state via ``on_best``.

    ``train_loader`` is a DataLoader (its sampler and dataset are told the epoch) or any
    re-iterable of batches. ``param_groups`` defaults to all parameters that require grad. The
    evaluated (and saved) weights are the EMA weights when ``cfg.ema_decay > 0``. With
    ``evaluate_initial`` the model is scored before the first epoch ("epoch 0") as a candidate
    for best: training then only replaces it by an epoch that scores higher. ``config_name`` is
    the section the settings came from, for error messages (e.g. "compress.alignment.train").
    ``on_checkpoint(epoch)`` runs on rank 0 after each epoch's resumable state is saved.
    """
    from tqdm.auto import tqdm

    device = model_device(model)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    log = _Logger(out / "metrics.jsonl" if out is not None else None)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = make_optimizer(groups, cfg)
    steps_per_epoch = max(1, len(train_loader))
    check_schedule(cfg, steps_per_epoch, config_name)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema_decay > 0 else None
    train_model = dist.wrap_ddp(model)
    result = FitResult(best_metric=None, best_epoch=None, epochs_run=0)
    start_epoch = 0
    state_path = out / "train_state.pt" if out is not None else None
    if resume and state_path is not None and state_path.exists():
        start_epoch = _load_state(state_path, model, ema, optimizer, scheduler, result)
        log.rewrite(([{"epoch": 0, **{f"val/{k}": v for k, v in result.initial.items()}}] if result.initial else [])
                    + result.history)
    elif evaluate_initial and evaluate_fn is not None:
        record = {"epoch": 0}
        _validate(evaluate_fn, ema.module if ema is not None else model, record, 0, select_metric, result, on_best)
        result.initial = {k[4:]: v for k, v in record.items() if k.startswith("val/")}
        log(record)

    sampler, dataset = getattr(train_loader, "sampler", None), getattr(train_loader, "dataset", None)
    for epoch in range(start_epoch, cfg.epochs):
        if _plateaued(cfg, result, epoch, select_metric):  # at the top, so a resumed run stops where the original did
            result.stopped_early = True
            break
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        t0 = time.perf_counter()
        train_model.train()
        sums: dict[str, float] = {}
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (progress and dist.is_main()))
        for step, batch in enumerate(bar):
            try:
                losses = _train_step(train_model, loss_fn, to_device(batch, device), optimizer, cfg, device)
            except _NonFinite as bad:
                raise _diverged(bad, epoch + 1, step + 1, config_name, state_path, model, ema, optimizer,
                                scheduler) from None
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{losses['total']:.4f}")
        record = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "time_s": time.perf_counter() - t0}
        record.update({f"loss/{k}": v / steps_per_epoch for k, v in sums.items()})
        if evaluate_fn is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            t1 = time.perf_counter()
            _validate(evaluate_fn, ema.module if ema is not None else model, record, epoch + 1, select_metric,
                      result, on_best)
            record["val_time_s"] = time.perf_counter() - t1
        result.history.append(record)
        result.epochs_run = epoch + 1
        log(record)
        if state_path is not None and dist.is_main():
            try:
                _save_state(state_path, model, ema, optimizer, scheduler, result, epoch + 1)
            except BaseException:  # metrics.jsonl holds the epochs of the saved state, no more
                log.undo()
                raise
            if on_checkpoint is not None:
                on_checkpoint(epoch + 1)
        dist.barrier()
    if evaluate_fn is None and on_best is not None:
        on_best(ema.module if ema is not None else model, result.history[-1] if result.history else {})
    result.plateaued = result.stopped_early or _plateaued(cfg, result, result.epochs_run, select_metric, final=True)
    return result


def _plateaued(cfg: TrainConfig, result: FitResult, epochs_done: int, metric: str, final: bool = False) -> bool:
    """Early stopping: after a validation epoch (or, ``final``, after the last one), ``cfg.patience``
    epochs or more since the last one that beat every earlier score by more than ``cfg.min_delta``.
    Rank 0 decides (only it validates)."""
    if cfg.patience is None or epochs_done == 0 or (epochs_done % cfg.eval_every and not final):
        return False
    def since_gain() -> bool:
        last = _last_gain(result, f"val/{metric}", cfg.min_delta)
        return last is not None and epochs_done - last >= cfg.patience

    return bool(dist.main_result(since_gain))


def _last_gain(result: FitResult, key: str, min_delta: float) -> int | None:
    """The last validated epoch whose score exceeded the best before it by more than ``min_delta``
    (the first validated epoch counts as one; epoch 0 is the model as given)."""
    best, last = None, None
    scored = ([(0, result.initial.get(key[4:]))] if result.initial else []) + [(r["epoch"], r.get(key))
                                                                              for r in result.history]
    for epoch, score in scored:
        if score is None:
            continue
        if best is None or score > best + min_delta:
            last = epoch
        best = score if best is None else max(best, score)
    return last


def _validate(evaluate_fn, eval_model, record: dict, epoch: int, select_metric: str, result: FitResult,
              on_best) -> None:
    """Score ``eval_model`` (rank 0), add its metrics to ``record``, and keep it if it is the best yet."""
    metrics = evaluate_fn(eval_model) if dist.is_main() else {}
    record.update({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    score = metrics.get(select_metric)
    if score is not None and (result.best_metric is None or score > result.best_metric):
        result.best_metric, result.best_epoch = float(score), epoch
        if on_best is not None:
            on_best(eval_model, record)


def _train_step(model, loss_fn, batch, optimizer, cfg: TrainConfig, device) -> dict[str, float]:
    with _autocast(device, cfg.amp):
        losses = loss_fn(model, batch)
    if not torch.isfinite(losses["total"]):
        values = {k: float(v.detach()) for k, v in losses.items()}
        term = next((k for k, v in values.items() if k != "total" and not math.isfinite(v)), "total")
        raise _NonFinite(term, values)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if not torch.isfinite(norm):  # a finite loss whose gradient overflowed would poison the weights
        raise _NonFinite("gradient", {"grad_norm": float(norm)})
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _diverged(bad: _NonFinite, epoch: int, step: int, config_name: str, state_path, model, ema, optimizer,
              scheduler) -> TrainingError:
    """The error for a non-finite loss or gradient, after putting back the last good state (the one
    saved at the end of the last complete epoch), so neither the model nor the run folder holds it."""
    restored = "no epoch had completed, so there is no saved state to return to"
    if state_path is not None and state_path.exists():
        scratch = FitResult(best_metric=None, best_epoch=None, epochs_run=0)
        restored = f"the weights of epoch {_load_state(state_path, model, ema, optimizer, scheduler, scratch)} " \
                   f"are restored (and stay in {state_path})"
    shown = ", ".join(f"{k}={v:.4g}" for k, v in bad.values.items())
    return TrainingError(f"the {bad.term!r} loss term went non-finite at epoch {epoch}, step {step} ({shown}); "
                         f"{restored}; lower {config_name}.lr or set {config_name}.grad_clip, then resume")


def _save_state(path: Path, model, ema, optimizer, scheduler, result: FitResult, epoch: int) -> None:
    save_torch(
        {
            "epoch": epoch,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_metric": result.best_metric,
            "best_epoch": result.best_epoch,
            "history": json.dumps(result.history),
            "initial": json.dumps(result.initial),
            "torch_rng": torch.get_rng_state(),
        },
        path,
    )


def _load_state(path: Path, model, ema, optimizer, scheduler, result: FitResult) -> int:
    def apply(state: dict) -> int:
        model.load_state_dict(state["model"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result.best_metric, result.best_epoch = state["best_metric"], state["best_epoch"]
        result.history = json.loads(state["history"])
        result.initial = json.loads(state.get("initial", "null"))
        result.epochs_run = int(state["epoch"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["epoch"])

    return load_state(path, apply=apply, remedy="delete it to redo this part of the run, or start over with --overwrite")
