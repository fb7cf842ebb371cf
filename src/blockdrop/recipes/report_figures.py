"""The report's figures, drawn from a `History` alone: accuracy against cost, the selection
heatmap, the alignment curves. Each returns PNG bytes (embedded in report.html as base64).

matplotlib is the optional extra ``report``; ``pyplot()`` imports it lazily and returns None
when it is missing, so a run without the extra still gets a report (without figures).
"""

from __future__ import annotations

import io
import math

import numpy as np

from blockdrop.compress.history import History, StepRecord

TEACHER_COLOUR, STEP_COLOUR, REJECTED_COLOUR, CHOSEN_COLOUR = "#d97706", "#2563eb", "#dc2626", "#111827"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without the ``report`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def png_bytes(plt, fig) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _value(record, metric: str | None) -> float:
    return float(record.val.get(metric, math.nan)) if metric else math.nan


def accuracy_figure(plt, history: History) -> bytes:
    """Validation accuracy against GMACs and against latency, one point per kept step, the teacher
    as a star; the x axes run from the teacher towards cheaper models (left to right)."""
    metric = history.metric
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes_x = (("GMACs per window", lambda r: r.cost.gmacs),
              (f"latency per window, ms ({history.teacher.cost.latency_device or 'device unknown'})",
               lambda r: r.cost.latency_ms))
    for ax, (label, x_of) in zip(axes, axes_x):
        steps = history.steps
        xs = [x_of(history.teacher)] + [x_of(s) for s in steps]
        ys = [_value(history.teacher, metric)] + [_value(s, metric) for s in steps]
        if None in xs:  # no latency measured
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(label)
            continue
        ax.plot(xs, ys, "-", color=STEP_COLOUR, alpha=0.5, zorder=1)
        ax.scatter(xs[1:], ys[1:], color=STEP_COLOUR, zorder=2, label="after step n")
        ax.scatter(xs[:1], ys[:1], marker="*", s=220, color=TEACHER_COLOUR, zorder=3, label="teacher")
        for s, x, y in zip(steps, xs[1:], ys[1:]):
            ax.annotate(f"{s.step}", (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9)
        if history.rejected is not None and x_of(history.rejected) is not None:
            ax.scatter([x_of(history.rejected)], [_value(history.rejected, metric)], marker="X", s=80,
                       color=REJECTED_COLOUR, zorder=3, label=f"step {history.rejected.step}, rolled back")
        ax.invert_xaxis()  # compression moves right
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {metric or '(no metric)'}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return png_bytes(plt, fig)


def _score_grid(history: History) -> tuple[list[StepRecord], np.ndarray, np.ndarray]:
    """(steps, scores (steps, depth) with NaN where a block was no candidate, early-eliminated mask)."""
    steps = history.steps + ([history.rejected] if history.rejected else [])
    depth = len(history.teacher.kept_blocks)
    grid = np.full((len(steps), depth), np.nan)
    early = np.zeros_like(grid, dtype=bool)
    for row, step in enumerate(steps):
        for index, score in step.selection.scores.items():
            if 0 <= index < depth:
                grid[row, index] = score
        finalists = step.selection.rounds[-1]["candidates"] if step.selection.rounds else None
        if finalists is not None:
            for index in step.selection.scores:
                early[row, index] = index not in {int(c) for c in finalists}
    return steps, grid, early


def selection_figure(plt, history: History) -> bytes:
    """Every candidate's selection score at every step, over the original block index; the chosen
    block outlined. Colours run per step (the scores of one step are compared with each other)."""
    steps, grid, early = _score_grid(history)
    higher = steps[0].selection.higher_is_better
    # each row scaled to its own range, so the ranking inside a step is visible whatever the scale
    low, high = np.nanmin(grid, axis=1, keepdims=True), np.nanmax(grid, axis=1, keepdims=True)
    rank = (grid - low) / np.where(high > low, high - low, 1.0)
    rank = rank if higher else 1 - rank
    width = min(11, max(6, 2.2 + 0.75 * grid.shape[1]))
    font = 8 if width / grid.shape[1] > 0.55 else 6  # a 24-block ViT-L fits 11 inches in 6 pt
    fig, ax = plt.subplots(figsize=(width, 1.3 + 0.6 * len(steps)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e5e7eb")  # NaN: already dropped
    ax.imshow(np.ma.masked_invalid(rank), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for row, step in enumerate(steps):
        for col in range(grid.shape[1]):
            if not math.isnan(grid[row, col]):  # NaN: no candidate (already dropped), left grey and blank
                text = f"{grid[row, col]:.4g}" + ("*" if early[row, col] else "")
                ax.text(col, row, text, ha="center", va="center", fontsize=font,
                        color="white" if rank[row, col] < 0.6 else "black")
        for chosen in step.selection.drop:
            ax.add_patch(plt.Rectangle((chosen - 0.5, row - 0.5), 1, 1, fill=False, lw=2.5,
                                       edgecolor=REJECTED_COLOUR if step.status == "rolled_back" else CHOSEN_COLOUR))
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(steps)),
                  [f"step {s.step}" + (" (rolled back)" if s.status == "rolled_back" else "") for s in steps])
    ax.set_xlabel("original block index")
    sel = steps[0].selection
    ax.set_title(f"{sel.evaluator}{f' ({sel.metric})' if sel.metric else ''} without each block; "
                 f"{'higher' if higher else 'lower'} = better to drop", fontsize=9, loc="left")
    fig.tight_layout()
    return png_bytes(plt, fig)


def alignment_figure(plt, step: StepRecord, metric: str | None, teacher_value: float) -> bytes:
    """One step's alignment: each loss term per epoch (left; epoch 0 too when a run recorded its
    losses) and validation per epoch (right; epoch 0 = the unaligned student), with the kept epoch
    and the teacher marked."""
    losses = [e for e in step.align.epochs if any(k.startswith("loss/") for k in e)]
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 2.8))
    terms = sorted({k for e in losses for k in e if k.startswith("loss/") and k != "loss/total"}) + ["loss/total"]
    values = []
    for term in terms:
        points = [(e["epoch"], e[term]) for e in losses if e.get(term) is not None]
        if points:
            style = {"color": "black", "ls": "--", "lw": 1.6} if term == "loss/total" else {"lw": 1.2}
            loss_ax.plot(*zip(*points), marker="o", ms=3, label=term[5:], **style)  # total dashed: gt shows under it
            values += [y for _, y in points]
    if values and min(values) > 0:  # terms differ by orders of magnitude
        loss_ax.set_yscale("log")
    if not values:
        loss_ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=loss_ax.transAxes)
    else:
        loss_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside: lines cross
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss (epoch mean)")
    loss_ax.grid(alpha=0.3)
    points = [(0, (step.align.val_before or {}).get(metric))] + [(e["epoch"], e.get(f"val/{metric}"))
                                                                  for e in step.align.epochs if e.get("epoch", 0) >= 1]
    points = [(x, y) for x, y in points if y is not None]
    if points:
        val_ax.plot([x for x, _ in points], [y for _, y in points], "o-", color=STEP_COLOUR, ms=4,
                    label="student (epoch 0: unaligned)")
    if step.align.best_epoch is not None:
        val_ax.axvline(step.align.best_epoch, color=CHOSEN_COLOUR, ls=":", label=f"kept: epoch {step.align.best_epoch}")
    if not math.isnan(teacher_value):
        val_ax.axhline(teacher_value, color=TEACHER_COLOUR, ls="--", label="teacher")
    val_ax.set_xlabel("epoch")
    val_ax.set_ylabel(f"validation {metric or '(no metric)'}")
    val_ax.legend(fontsize=7)
    val_ax.grid(alpha=0.3)
    for ax in (loss_ax, val_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs, not 0.25 steps
    status = ", rolled back" if step.status == "rolled_back" else ""
    fig.suptitle(f"step {step.step}: original block {', '.join(map(str, step.dropped_original))} dropped{status}",
                 fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    return png_bytes(plt, fig)
