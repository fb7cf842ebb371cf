"""A readable report of a `blockdrop compress` run, from its history.json alone.

    blockdrop report runs/hapt_pbd/main          # writes report.md (+ report.png with matplotlib)

`compress` writes the report at the end of every run; this command rebuilds it (e.g. after an
interrupted run, or without the plot extra installed at the time). The report has: the outcome
in one paragraph, the per-step table (what was dropped, cost, speed, validation accuracy), every
selection step's candidate ranking, the alignment losses of each step, and a step that was
rolled back with its reason. Every number is read from history.json; nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path

from blockdrop.compress.history import History, StepRecord
from blockdrop.core.fileio import atomic_path, atomic_write_text

LOSS_ORDER = ("loss/feature", "loss/cls_kd", "loss/reg_kd", "loss/gt", "loss/total")


def _val(record, key: str) -> float:
    return float(record.val.get(key, float("nan")))


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else float("nan")


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _metrics(history: History) -> list[str]:
    """The validation metrics shown: the run's own metric, and mAP@0.5 for a detector."""
    names = [history.metric] if history.metric else []
    if "mAP@0.5" in history.teacher.val and "mAP@0.5" not in names:
        names.append("mAP@0.5")
    return names


def summary_text(history: History) -> str:
    teacher, steps, metric = history.teacher, history.steps, history.metric
    depth = len(teacher.kept_blocks)
    if not steps:
        return f"No block was dropped from the {depth}-block teacher. Stopped: {history.stopped}."
    last, dropped = steps[-1], history.dropped_original
    device = f", on {teacher.cost.latency_device}" if teacher.cost.latency_device else ""
    accuracy = (f"validation {metric} {_fmt(_val(teacher, metric))} -> {_fmt(_val(last, metric))}. " if metric else "")
    return (f"{len(dropped)} of {depth} blocks dropped ({100 * len(dropped) / depth:.0f}%; original indices "
            f"{dropped}): {teacher.cost.gmacs:.3f} -> {last.cost.gmacs:.3f} GMACs per window "
            f"(x{last.cost.gmacs / teacher.cost.gmacs:.3f}), latency {_fmt(teacher.cost.latency_ms)} -> "
            f"{_fmt(last.cost.latency_ms)} ms (x{_ratio(last.cost.latency_ms, teacher.cost.latency_ms):.3f}{device}), "
            f"{accuracy}Stopped: {history.stopped}.")


def _rows(history: History) -> list[tuple[str, object, str]]:
    rows = [("teacher", history.teacher, "-")]
    rows += [(f"step {s.step}", s, ", ".join(map(str, s.dropped_original))) for s in history.steps]
    if history.rejected:
        rej = history.rejected
        rows.append((f"step {rej.step} (rolled back)", rej, ", ".join(map(str, rej.dropped_original))))
    return rows


def step_table(history: History) -> str:
    teacher, metrics = history.teacher, _metrics(history)
    head = ("| model | dropped (original idx) | blocks | GMACs | x teacher | params (M) | latency ms (IQR) | "
            + "".join(f"val {m} | " for m in metrics) + "before alignment | step time s |")
    lines = [head, "|" + "---|" * (8 + len(metrics))]
    for name, r, dropped in _rows(history):
        before = r.align.val_before if isinstance(r, StepRecord) else None
        cells = "".join(f"{_fmt(_val(r, m))} | " for m in metrics)
        lines.append(
            f"| {name} | {dropped} | {len(r.kept_blocks)} | {r.cost.gmacs:.3f} | {r.cost.gmacs / teacher.cost.gmacs:.3f} | "
            f"{r.cost.params / 1e6:.3f} | {_fmt(r.cost.latency_ms)} ({_fmt(r.cost.latency_iqr_ms)}) | {cells}"
            f"{_fmt(before.get(history.metric)) if before and history.metric else '-'} | "
            f"{_fmt(r.time_s if isinstance(r, StepRecord) else None, '.0f')} |")
    return "\n".join(lines)


def selection_text(step: StepRecord, top: int = 5) -> str:
    sel = step.selection
    if not sel.scores:
        return f"Step {step.step}: no candidate scores recorded."
    ranked = sorted(sel.scores.items(), key=lambda kv: -kv[1] if sel.higher_is_better else kv[1])
    shown = ", ".join(f"{i}: {v:.3f}" for i, v in ranked[:top])
    worst = ranked[-1]
    cost = (f" Cost: {sel.block_forwards} block forwards (naive: {sel.naive_block_forwards}), "
            f"{_fmt(sel.wall_time_s, '.0f')} s.")
    also = f" Dropped together (one-shot): {sel.drop}." if len(sel.drop) > 1 else ""
    return (f"Step {step.step}: {len(ranked)} candidates scored by {sel.evaluator}"
            f"{f' ({sel.metric})' if sel.metric else ''}, {'higher' if sel.higher_is_better else 'lower'} is better, "
            f"without each block; chose original block {sel.chosen_original}. Best {min(top, len(ranked))} "
            f"(original idx: score): {shown}; least removable: {worst[0]}: {worst[1]:.3f}.{also}{cost}")


def alignment_text(step: StepRecord) -> str:
    epochs = [e for e in step.align.epochs if e.get("epoch", 0) >= 1]
    if not epochs:
        return f"| {step.step} | - | {step.align.best_epoch} |" + " - |" * len(LOSS_ORDER)
    first, last = epochs[0], epochs[-1]
    cells = " | ".join(f"{_fmt(first.get(k), '.4f')} -> {_fmt(last.get(k), '.4f')}" for k in LOSS_ORDER)
    return f"| {step.step} | {len(epochs)} | {step.align.best_epoch} | {cells} |"


def noisy_latency(history: History, limit: float = 0.1) -> list[str]:
    """Rows whose latency spread (IQR) exceeds ``limit`` of the median: timings taken under load."""
    rows = [("teacher", history.teacher)] + [(f"step {s.step}", s) for s in history.steps]
    return [name for name, r in rows
            if r.cost.latency_ms and (r.cost.latency_iqr_ms or 0) > limit * r.cost.latency_ms]


def render_report(history: History, title: str = "Progressive Block Drop", plot: str | None = None) -> str:
    parts = [f"# {title}", "", summary_text(history), "", "## Steps", "", step_table(history), ""]
    noisy = noisy_latency(history)
    if noisy:
        parts += [f"Latency spread (IQR) above 10% of the median for {', '.join(noisy)}: the machine was busy "
                  "while those were timed; re-time the saved models with `blockdrop bench` on a quiet machine "
                  "before comparing speed-ups.", ""]
    if plot:
        parts += [f"![validation {history.metric} against GMACs]({plot})", ""]
    steps = history.steps + ([history.rejected] if history.rejected else [])
    if steps:
        parts += ["## Block selection", ""] + [f"- {selection_text(s)}" for s in steps] + [""]
        parts += ["## Alignment fine-tuning (first -> last epoch; best epoch 0 = the unaligned student was kept)", "",
                  "| step | epochs | best epoch | " + " | ".join(LOSS_ORDER) + " |",
                  "|---|---|---|" + "---|" * len(LOSS_ORDER)] + [alignment_text(s) for s in steps] + [""]
    if history.rejected:
        parts += ["## Rolled back", "", f"{history.stopped}", ""]
    return "\n".join(parts)


def _plot(history: History, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metric = history.metric
    rows = [("teacher", history.teacher)] + [(f"step {s.step}", s) for s in history.steps]
    xs = [r.cost.gmacs for _, r in rows]
    ys = [_val(r, metric) if metric else float("nan") for _, r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(xs, ys, "o-")
    for (name, _), x, y in zip(rows, xs, ys):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if history.rejected:
        rej = history.rejected
        ax.plot([rej.cost.gmacs], [_val(rej, metric)], "x", color="red", label="rolled back")
        ax.legend(fontsize=8)
    ax.set_xlabel("GMACs per window")
    ax.set_ylabel(f"validation {metric}")
    ax.invert_xaxis()  # compression moves right
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def write_report(run: str | Path, plot: bool = True) -> list[Path]:
    """Write ``report.md`` (and ``report.png`` when matplotlib is installed) into the run folder."""
    run = Path(run)
    history = History.load(run / "history.json")
    written = []
    image = run / "report.png"
    if plot and _plot(history, image):
        written.append(image)
    md = atomic_write_text(run / "report.md", render_report(history, f"Progressive Block Drop: {run.name}",
                                                             plot=image.name if written else None))
    return [md, *written]
