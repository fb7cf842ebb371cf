"""A readable report of a `blockdrop compress` run, from its history.json alone.

    blockdrop report runs/hapt_pbd/main          # writes report.md (+ report.png with matplotlib)

`compress` writes the report at the end of every run; this command rebuilds it (e.g. after an
interrupted run, or without the plot extra installed at the time). The report has: the outcome
in one paragraph, the per-step table (what was dropped, cost, speed, validation accuracy), every
selection step's candidate ranking, the alignment losses of each step, and a step that was
rolled back with its reason. Every number is read from history.json; nothing is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import atomic_path, atomic_write_text

LOSS_ORDER = ("loss/feature", "loss/cls_kd", "loss/reg_kd", "loss/gt", "loss/total")


def load_history(run: str | Path) -> dict:
    path = Path(run) / "history.json"
    if not path.is_file():
        raise BlockdropError(f"{path}: not found (give the folder of a `blockdrop compress` run)")
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BlockdropError(f"{path}: not valid JSON ({err})") from None
    for key in ("teacher", "steps"):
        if key not in history:
            raise BlockdropError(f"{path}: field '{key}' missing (not a compress history)")
    return history


def _val(record: dict, key: str) -> float:
    return float(record.get("val", {}).get(key, float("nan")))


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def summary_text(history: dict) -> str:
    teacher, steps = history["teacher"], history["steps"]
    depth = len(teacher["kept_blocks"])
    if not steps:
        return f"No block was dropped from the {depth}-block teacher. Stopped: {history.get('stopped')}."
    last = steps[-1]
    dropped = sorted(i for s in steps for i in s["dropped_original"])
    return (f"{len(dropped)} of {depth} blocks dropped ({100 * len(dropped) / depth:.0f}%; original indices "
            f"{dropped}): {teacher['gmacs']:.3f} -> {last['gmacs']:.3f} GMACs per window "
            f"(x{last['gmacs'] / teacher['gmacs']:.3f}), latency {_fmt(teacher.get('latency_ms'))} -> "
            f"{_fmt(last.get('latency_ms'))} ms (x{last.get('latency_ms', float('nan')) / teacher.get('latency_ms', float('nan')):.3f}"
            f"{', on ' + teacher['latency_device'] if teacher.get('latency_device') else ''}), "
            f"validation average mAP {_fmt(_val(teacher, 'average_mAP'))} -> {_fmt(_val(last, 'average_mAP'))}. "
            f"Stopped: {history.get('stopped')}.")


def step_table(history: dict) -> str:
    teacher = history["teacher"]
    rows = [("teacher", teacher, "-")] + [(f"step {s['step']}", s, ", ".join(map(str, s["dropped_original"])))
                                          for s in history["steps"]]
    if history.get("rejected"):
        rej = history["rejected"]
        rows.append((f"step {rej['step']} (rolled back)", rej, ", ".join(map(str, rej["dropped_original"]))))
    lines = ["| model | dropped (original idx) | blocks | GMACs | x teacher | params (M) | latency ms (IQR) | "
             "val avg mAP | val mAP@0.5 | step time s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r, dropped in rows:
        lines.append(
            f"| {name} | {dropped} | {len(r['kept_blocks'])} | {r['gmacs']:.3f} | {r['gmacs'] / teacher['gmacs']:.3f} | "
            f"{r.get('params', float('nan')) / 1e6:.3f} | {_fmt(r.get('latency_ms'))} ({_fmt(r.get('latency_iqr_ms'))}) | "
            f"{_fmt(_val(r, 'average_mAP'))} | {_fmt(_val(r, 'mAP@0.5'))} | {_fmt(r.get('time_s'), '.0f')} |")
    return "\n".join(lines)


def selection_text(step: dict, top: int = 5) -> str:
    sel = step.get("selection") or {}
    scores = {int(k): float(v) for k, v in sel.get("scores", {}).items()}
    if not scores:
        return f"Step {step['step']}: no candidate scores recorded (one-shot drop)."
    better = sel.get("higher_is_better", True)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1] if better else kv[1])
    shown = ", ".join(f"{i}: {v:.3f}" for i, v in ranked[:top])
    worst = ranked[-1]
    cost = ""
    if "block_forwards" in sel:
        cost = (f" Cost: {sel['block_forwards']} block forwards (naive: {sel.get('naive_block_forwards', '-')}), "
                f"{_fmt(sel.get('wall_time_s'), '.0f')} s.")
    return (f"Step {step['step']}: {len(scores)} candidates scored by {sel.get('evaluator')} "
            f"({sel.get('metric')}, {'higher' if better else 'lower'} is better) without each block; chose original "
            f"block {sel.get('chosen_original')}. Best {min(top, len(ranked))} (original idx: score): {shown}; "
            f"least removable: {worst[0]}: {worst[1]:.3f}.{cost}")


def alignment_text(step: dict) -> str:
    align = step.get("align") or {}
    epochs = align.get("history") or []
    if not epochs:
        return f"| {step['step']} | - | - |" + " - |" * len(LOSS_ORDER)
    first, last = epochs[0], epochs[-1]
    cells = " | ".join(f"{_fmt(first.get(k), '.4f')} -> {_fmt(last.get(k), '.4f')}" for k in LOSS_ORDER)
    return f"| {step['step']} | {len(epochs)} | {align.get('best_epoch', '-')} | {cells} |"


def noisy_latency(history: dict, limit: float = 0.1) -> list[str]:
    """Rows whose latency spread (IQR) exceeds ``limit`` of the median: timings taken under load."""
    rows = [("teacher", history["teacher"])] + [(f"step {s['step']}", s) for s in history["steps"]]
    return [name for name, r in rows
            if r.get("latency_ms") and r.get("latency_iqr_ms", 0) > limit * r["latency_ms"]]


def render_report(history: dict, title: str = "Progressive Block Drop", plot: str | None = None) -> str:
    parts = [f"# {title}", "", summary_text(history), "", "## Steps", "", step_table(history), ""]
    noisy = noisy_latency(history)
    if noisy:
        parts += [f"Latency spread (IQR) above 10% of the median for {', '.join(noisy)}: the machine was busy "
                  "while those were timed; re-time the saved models with `blockdrop bench` on a quiet machine "
                  "before comparing speed-ups.", ""]
    if plot:
        parts += [f"![validation average mAP against GMACs]({plot})", ""]
    steps = history["steps"] + ([history["rejected"]] if history.get("rejected") else [])
    if steps:
        parts += ["## Block selection", ""] + [f"- {selection_text(s)}" for s in steps] + [""]
        parts += ["## Alignment fine-tuning (first -> last epoch)", "",
                  "| step | epochs | best epoch | " + " | ".join(LOSS_ORDER) + " |",
                  "|---|---|---|" + "---|" * len(LOSS_ORDER)] + [alignment_text(s) for s in steps] + [""]
    if history.get("rejected"):
        parts += ["## Rolled back", "", f"{history.get('stopped')}", ""]
    return "\n".join(parts)


def _plot(history: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [("teacher", history["teacher"])] + [(f"step {s['step']}", s) for s in history["steps"]]
    xs = [r["gmacs"] for _, r in rows]
    ys = [_val(r, "average_mAP") for _, r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(xs, ys, "o-")
    for (name, _), x, y in zip(rows, xs, ys):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if history.get("rejected"):
        rej = history["rejected"]
        ax.plot([rej["gmacs"]], [_val(rej, "average_mAP")], "x", color="red", label="rolled back")
        ax.legend(fontsize=8)
    ax.set_xlabel("GMACs per window")
    ax.set_ylabel("validation average mAP")
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
    history = load_history(run)
    written = []
    image = run / "report.png"
    if plot and _plot(history, image):
        written.append(image)
    md = atomic_write_text(run / "report.md", render_report(history, f"Progressive Block Drop: {run.name}",
                                                             plot=image.name if written else None))
    return [md, *written]
