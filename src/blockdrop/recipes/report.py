"""A readable report of a `blockdrop compress` run: report.md and a self-contained report.html.

    blockdrop report runs/hapt_pbd/main     # writes report.md, report.html and the figures' PNGs

`compress` writes the report at the end of every run; this command rebuilds it (e.g. after an
interrupted run, or without the plot extra installed at the time). Both files have the outcome,
the per-step table, every selection's candidate ranking, the alignment losses and a rolled-back
step with its reason, all read from history.json (nothing is recomputed). report.html adds the
figures (report_figures.py), a detection timeline of the teacher and the final model on a few
validation videos (the one part that runs the models: it needs the run's data and teacher),
the run's config and what the run folders record of the environment. docs/report.md reads it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import torch

from blockdrop.compress.history import History, StepRecord
from blockdrop.core.config import load_config
from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import atomic_path, atomic_write_text
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes import report_figures as figures
from blockdrop.recipes.build import load_detector, software_versions
from blockdrop.recipes.runs import MODEL_FILE, file_sha256
from blockdrop.recipes.timeline import compare_figure, validation_detections

LOSS_ORDER = ("loss/feature", "loss/cls_kd", "loss/reg_kd", "loss/gt", "loss/total")
TIMELINE_TOP = 25  # detections drawn per video and model: the confident ones, not the tail
NEEDS_EXTRA = "figures need matplotlib: pip install 'blockdrop[report]'"


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


def step_cells(history: History) -> tuple[list[str], list[list[str]]]:
    """The per-step table (teacher, kept steps, a rolled-back step): (header, rows of cell text)."""
    teacher, metrics = history.teacher, _metrics(history)
    header = (["model", "dropped (original idx)", "blocks", "GMACs", "x teacher", "params (M)", "latency ms (IQR)"]
              + [f"val {m}" for m in metrics] + ["before alignment", "step time s"])
    rows = []
    for name, r, dropped in _rows(history):
        before = r.align.val_before if isinstance(r, StepRecord) else None
        rows.append([name, dropped, str(len(r.kept_blocks)), f"{r.cost.gmacs:.3f}",
                     f"{r.cost.gmacs / teacher.cost.gmacs:.3f}", f"{r.cost.params / 1e6:.3f}",
                     f"{_fmt(r.cost.latency_ms)} ({_fmt(r.cost.latency_iqr_ms)})"]
                    + [_fmt(_val(r, m)) for m in metrics]
                    + [_fmt(before.get(history.metric)) if before and history.metric else "-",
                       _fmt(r.time_s if isinstance(r, StepRecord) else None, ".0f")])
    return header, rows


def step_table(history: History) -> str:
    header, rows = step_cells(history)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


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
    t = sel.trial
    trial = (f" Recovery-aware: the {len(t.shortlist)} best ({t.shortlist}) each aligned for {t.batches} batches on a "
             f"copy, then scored by {t.evaluator}{f' ({t.metric})' if t.metric else ''}: "
             + ", ".join(f"{i}: {t.scores[i]:.3f}" for i in t.ranking) + ".") if t is not None else ""
    return (f"Step {step.step}: {len(ranked)} candidates scored by {sel.evaluator}"
            f"{f' ({sel.metric})' if sel.metric else ''}, {'higher' if sel.higher_is_better else 'lower'} is better, "
            f"without each block; chose original block {sel.chosen_original}. Best {min(top, len(ranked))} "
            f"(original idx: score): {shown}; least removable: {worst[0]}: {worst[1]:.3f}.{also}{trial}{cost}")


def alignment_cells(step: StepRecord) -> list[str]:
    """One step's alignment row: epochs trained, the kept epoch, each loss first -> last epoch."""
    epochs = [e for e in step.align.epochs if e.get("epoch", 0) >= 1]
    if not epochs:  # best_epoch None: no alignment ran (compress.alignment.enabled false, drop-only)
        kept = "none (drop-only)" if step.align.best_epoch is None else str(step.align.best_epoch)
        return [str(step.step), "-", kept] + ["-"] * len(LOSS_ORDER)
    first, last = epochs[0], epochs[-1]
    return [str(step.step), str(len(epochs)), str(step.align.best_epoch)] + [
        f"{_fmt(first.get(k), '.4g')} -> {_fmt(last.get(k), '.4g')}" for k in LOSS_ORDER]


def noisy_latency(history: History, limit: float = 0.1) -> list[str]:
    """Rows whose latency spread (IQR) exceeds ``limit`` of the median: timings taken under load."""
    rows = [("teacher", history.teacher)] + [(f"step {s.step}", s) for s in history.steps]
    return [name for name, r in rows
            if r.cost.latency_ms and (r.cost.latency_iqr_ms or 0) > limit * r.cost.latency_ms]


def noisy_text(noisy: list[str]) -> str:
    return (f"Latency spread (IQR) above 10% of the median for {', '.join(noisy)}: the machine was busy while "
            "those were timed; re-time the saved models with `blockdrop bench` on a quiet machine before "
            "comparing speed-ups.")


def _steps_shown(history: History) -> list[StepRecord]:
    return history.steps + ([history.rejected] if history.rejected else [])


def render_report(history: History, title: str = "Progressive Block Drop", plot: str | None = None) -> str:
    parts = [f"# {title}", "", summary_text(history), "", "## Steps", "", step_table(history), ""]
    if noisy_latency(history):
        parts += [noisy_text(noisy_latency(history)), ""]
    if plot:
        parts += [f"![validation {history.metric} against GMACs and latency]({plot})", ""]
    steps = _steps_shown(history)
    if steps:
        parts += ["## Block selection", ""] + [f"- {selection_text(s)}" for s in steps] + [""]
        parts += ["## Alignment fine-tuning (first -> last epoch; best epoch 0 = the unaligned student was kept)", "",
                  "| step | epochs | best epoch | " + " | ".join(LOSS_ORDER) + " |",
                  "|---|---|---|" + "---|" * len(LOSS_ORDER)]
        parts += ["| " + " | ".join(alignment_cells(s)) + " |" for s in steps] + [""]
    if history.rejected:
        parts += ["## Rolled back", "", f"{history.stopped}", ""]
    parts += ["Figures, detections on validation videos, the config and the environment: report.html.", ""]
    return "\n".join(parts)


# ---- what the run folders hold beside history.json -------------------------------------------------

@dataclass
class RunFiles:
    """The run's config (text and typed), run.json, and its teacher when it can be found."""

    config_text: str | None = None
    config: ExperimentConfig | None = None
    identity: dict = field(default_factory=dict)  # run.json: teacher_sha256, skipped_media, command
    teacher: Path | None = None
    teacher_summary: dict | None = None  # the teacher's training summary.json (software, data)
    notes: list[str] = field(default_factory=list)  # what could not be read, said plainly


def _flag(command: str | None, name: str) -> str | None:
    words = (command or "").split()
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word[len(name) + 1:]
    return None


def read_run(run: Path, teacher: str | Path | None = None) -> RunFiles:
    """The teacher is ``teacher``, else run.json's, the config's compress.teacher, or the command's
    --teacher; it is used only if its SHA-256 is the one run.json recorded."""
    files = RunFiles()
    if (run / "run.json").is_file():
        files.identity = json.loads((run / "run.json").read_text())
    if (run / "config.yaml").is_file():
        files.config_text = (run / "config.yaml").read_text()
        try:
            files.config = load_config(ExperimentConfig, run / "config.yaml")
        except BlockdropError as err:
            files.notes.append(f"the run's config does not load: {err}")
    else:
        files.notes.append(f"{run / 'config.yaml'}: not found")
    cfg_teacher = files.config.compress.teacher if files.config else None
    given = teacher or files.identity.get("teacher") or cfg_teacher or _flag(files.identity.get("command"), "--teacher")
    if given is None:
        files.notes.append("the run folder does not record the teacher's path (set compress.teacher in the config, "
                           "or pass teacher= to write_report)")
        return files
    path, sha = Path(given), files.identity.get("teacher_sha256")
    if not path.is_file():
        files.notes.append(f"teacher {path}: not found")
    elif sha and file_sha256(path) != sha:
        files.notes.append(f"teacher {path}: not the run's teacher (its SHA-256 differs from run.json's)")
    else:
        files.teacher = path
        summary = path.parent / "summary.json"
        files.teacher_summary = json.loads(summary.read_text()) if summary.is_file() else None
    return files


def timeline_png(plt, run: Path, files: RunFiles, history: History, videos: int) -> tuple[bytes | None, list[str]]:
    """The teacher and the final model on ``videos`` validation videos, or why not."""
    notes = list(files.notes)
    final = run / MODEL_FILE
    if files.config is None:
        return None, notes
    if not history.steps:
        notes.append("no step was kept: the final model is the teacher")
    elif not final.is_file():
        notes.append(f"{final}: not found")
    paths = {"teacher": files.teacher} if files.teacher else {}
    if history.steps and final.is_file():
        paths[f"final ({len(history.kept_blocks)} blocks)"] = final
    if not paths:
        return None, notes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        models = {name: load_detector(path)[0] for name, path in paths.items()}
        results, part = validation_detections(files.config, models, videos, device)
    except (BlockdropError, OSError) as err:
        return None, notes + [f"the run's data or models cannot be read: {err}"]
    if not part.videos:
        return None, notes + ["no validation video has a ground-truth segment"]
    fig = compare_figure(plt, results, durations={v: i.duration for v, i in part.videos.items()},
                         classes=part.classes, ground_truth=part, top=TIMELINE_TOP)
    return figures.png_bytes(plt, fig), notes


# ---- report.html -----------------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #111827; max-width: 1120px;
       margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; margin: 0 0 .1em; } h2 { font-size: 1.25em; margin-top: 2.2em;
     border-bottom: 1px solid #e5e7eb; padding-bottom: .2em; } h3 { font-size: 1em; margin-bottom: .2em; }
.sub { color: #6b7280; margin-top: 0; }
.summary { background: #f9fafb; border: 1px solid #d1d5db; border-radius: 8px; padding: .6em 1.4em 1em; }
.note { background: #fffbeb; border-left: 4px solid #d97706; padding: .4em .8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .88em; }
th, td { border: 1px solid #e5e7eb; padding: .25em .65em; text-align: right; vertical-align: top; }
th { background: #f3f4f6; } td:first-child, th:first-child { text-align: left; }
table.kv td { text-align: left; } tr.rolled td { color: #b91c1c; }
figure { margin: 1em 0 1.6em; } figure img { max-width: 100%; border: 1px solid #e5e7eb; }
figcaption { font-size: .88em; color: #4b5563; margin-top: .3em; }
pre { background: #f3f4f6; padding: .8em 1em; overflow: auto; font-size: .8em; line-height: 1.35; }
pre.config { column-count: 3; column-gap: 2em; } pre.config div { break-inside: avoid; } code { font-size: .9em; }
"""


def _attr(cls: str) -> str:
    return f' class="{cls}"' if cls else ""


def _table(header: list[str] | None, rows: list[list[str]], row_class=lambda row: "", cls: str = "") -> str:
    """An HTML table of text cells (all escaped); ``row_class(row)`` names a row's CSS class."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(f"<tr{_attr(row_class(r))}>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table{_attr(cls)}>{head}{body}</table>"


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _p(text: str, cls: str = "") -> str:
    return f"<p{_attr(cls)}>{escape(text)}</p>"


def config_html(text: str | None) -> str:
    """config.yaml in columns, a top-level section never split between two."""
    if text is None:
        return _p("config.yaml: not found", "note")
    sections, lines = [], []
    for line in text.splitlines():
        if lines and line[:1] not in (" ", "-", ""):
            sections.append(lines)
            lines = []
        lines.append(line)
    sections.append(lines)
    return '<pre class="config">' + "".join(f"<div>{escape(chr(10).join(s))}</div>" for s in sections) + "</pre>"


def summary_box(history: History) -> str:
    """Teacher against final model at a glance, with the dropped blocks and why the run stopped."""
    teacher, final = history.teacher, (history.steps[-1] if history.steps else history.teacher)

    def times(a, b):
        return f"x{_fmt(_ratio(b, a), '.3f')}"

    t, f = teacher.cost, final.cost
    rows = [["blocks", str(len(teacher.kept_blocks)), str(len(final.kept_blocks)),
             f"{len(final.kept_blocks) - len(teacher.kept_blocks):+d}"],
            ["GMACs per window", f"{t.gmacs:.3f}", f"{f.gmacs:.3f}", times(t.gmacs, f.gmacs)],
            ["params (M)", f"{t.params / 1e6:.3f}", f"{f.params / 1e6:.3f}", times(t.params, f.params)],
            [f"latency ms ({t.latency_device or 'device unknown'})", _fmt(t.latency_ms), _fmt(f.latency_ms),
             times(t.latency_ms, f.latency_ms)]]
    rows += [[f"validation {m}", _fmt(_val(teacher, m)), _fmt(_val(final, m)),
              f"{_fmt(_val(final, m) - _val(teacher, m), '+.2f')} points"] for m in _metrics(history)]
    dropped = ", ".join(map(str, history.dropped_original)) or "none"
    lines = [f"Dropped (original block indices): {dropped}.", f"Stopped: {history.stopped}."]
    if history.rejected:
        lines.append(f"Step {history.rejected.step} (dropping block "
                     f"{', '.join(map(str, history.rejected.dropped_original))}) was rolled back.")
    return ('<div class="summary"><h2 style="margin-top:.4em">Summary</h2>'
            + _table(["", "teacher", "final", "change"], rows) + "".join(_p(line) for line in lines) + "</div>")


def environment_tables(history: History, files: RunFiles) -> str:
    """What the run folders record of where the run ran, then this report's own software."""
    cfg, identity = files.config, files.identity
    run = [["latency measured on", f"{history.teacher.cost.latency_device or 'not recorded'}"
            + (f", {cfg.compress.latency_threads} thread(s)" if cfg and cfg.compress.latency_threads else "")],
           ["processes (world size)", str(history.world_size)]]
    if cfg:
        run.append(["seeds", f"train.seed {cfg.train.seed} (splits, selection subset), "
                             f"compress.alignment.train.seed {cfg.compress.alignment.train.seed}"])
    run += [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in identity.items()]
    run += [["teacher", str(files.teacher)]] if files.teacher else []
    out = ["<h3>Recorded by the run (history.json, run.json)</h3>", _table(None, run, cls="kv")]
    summary = files.teacher_summary or {}
    trained = [[f"{section}: {k}", str(v)] for section in ("software", "data") for k, v in
               (summary.get(section) or {}).items()]
    if trained:
        out += ["<h3>Recorded by the teacher's training run (summary.json beside the teacher)</h3>",
                _table(None, trained, cls="kv")]
    here = software_versions(bool(cfg and cfg.data.kind == "video"))
    return "\n".join(out + ["<h3>Where this report was written</h3>",
                            _table(None, [[k, str(v)] for k, v in here.items()], cls="kv")])


def render_html(history: History, files: RunFiles, pngs: dict[str, bytes], title: str, no_figures: str | None,
                timeline_notes: list[str]) -> str:
    """report.html: every text escaped, every figure inline (no file, network or script is read)."""
    metric = history.metric or "metric"

    def figure(key: str, alt: str, caption: str, alone: bool = False) -> str:
        """The figure, or (where it is a section's only content) why it is missing."""
        if key in pngs:
            return _figure(pngs[key], alt, caption)
        return _p(f"Not drawn: {no_figures}.", "note") if alone else ""

    out = [f"<h1>{escape(title)}</h1>", _p("Progressive Block Drop run report, written from the run folder's "
                                           "history.json, config.yaml and run.json.", "sub"),
           summary_box(history)] + ([_p(f"No figures: {no_figures}.", "note")] if no_figures else [])
    header, rows = step_cells(history)
    out += ["<h2>Steps</h2>", _table(header, rows, lambda r: "rolled" if "rolled back" in r[0] else "")]
    if noisy_latency(history):
        out.append(_p(noisy_text(noisy_latency(history)), "note"))
    out += ["<h2>Accuracy against cost</h2>", figure(
        "accuracy", f"validation {metric} against cost", f"Validation {metric} against GMACs per window (left) and "
        "latency per window (right). Star: the teacher; dots: the model after each step (labelled by step); X: a "
        "rolled-back step. The x axes run from the teacher to cheaper models.", alone=True)]
    steps = _steps_shown(history)
    out.append("<h2>Block selection</h2>")
    if steps:
        out.append(figure("selection", "selection scores per step and block",
                          "One row per step, one column per block of the teacher (original index). Each cell is "
                          "the candidate's score: the model without that block. Colour ranks the candidates within "
                          "their step (yellow = best to drop, dark = worst); the outlined cell is the block the "
                          "step dropped (red outline: rolled back); grey: already dropped; * eliminated early."))
    out.append("<ul>" + "".join(f"<li>{escape(selection_text(s))}</li>" for s in steps) + "</ul>" if steps
               else _p("No selection ran."))
    out.append("<h2>Alignment fine-tuning</h2>")
    if steps:
        out.append(_table(["step", "epochs", "best epoch"] + [f"{k} first -> last" for k in LOSS_ORDER],
                          [alignment_cells(s) for s in steps]))
    out += [figure(f"align_{s.step}", f"alignment of step {s.step}",
                   f"Step {s.step}: each loss term per training epoch (left; the mean over the epoch) and validation "
                   f"{metric} per epoch (right; epoch 0 = the student before alignment). The dotted line is the "
                   "epoch kept, the dashed one the teacher.") for s in steps]
    out.append("<h2>Detections on validation videos</h2>")
    if "timeline" in pngs:
        out.append(_figure(pngs["timeline"], "detection timeline", f"Per video, the {TIMELINE_TOP} highest-"
                           "scoring detections of each model (the teacher above the final model), a lane per class: "
                           "coloured bars are detections (opacity = score), grey bars under them the ground truth."))
        out += [_p(n, "note") for n in timeline_notes]
    else:
        out.append(_p(f"Not drawn: {'; '.join(timeline_notes)}.", "note"))
    out += ["<h2>Stopping</h2>", _p(f"Stopped: {history.stopped}.")]
    if history.rejected:
        rej = history.rejected
        out.append(_p(f"Step {rej.step} dropped original block {', '.join(map(str, rej.dropped_original))}, "
                      f"reached validation {metric} {_fmt(_val(rej, history.metric or ''))} and was rolled back; "
                      "the run kept the model before it."))
    out += ["<h2>Configuration (config.yaml)</h2>", config_html(files.config_text),
            "<h2>Environment</h2>", environment_tables(history, files)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(out)
            + "\n</body></html>\n")


def _write_png(path: Path, png: bytes) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(png)
    return path


def draw_figures(plt, history: History) -> dict[str, bytes]:
    pngs = {"accuracy": figures.accuracy_figure(plt, history)}
    steps = _steps_shown(history)
    if steps:
        pngs["selection"] = figures.selection_figure(plt, history)
    teacher_value = _val(history.teacher, history.metric) if history.metric else float("nan")
    for s in steps:
        pngs[f"align_{s.step}"] = figures.alignment_figure(plt, s, history.metric, teacher_value)
    return pngs


def write_report(run: str | Path, plot: bool = True, *, teacher: str | Path | None = None,
                 timeline_videos: int = 3) -> list[Path]:
    """Write report.md and report.html into the run folder, with the figures as PNG files beside
    them when matplotlib is installed (report.png is the accuracy figure report.md shows)."""
    run = Path(run)
    history = History.load(run / "history.json")
    title = f"Progressive Block Drop: {run.name}"
    plt = figures.pyplot() if plot else None
    no_figures = None if plt else (NEEDS_EXTRA if plot else "turned off (--no-plot)")
    pngs = draw_figures(plt, history) if plt else {}
    files = read_run(run, teacher)
    timeline_notes = [no_figures or "timeline_videos=0"]
    if plt and timeline_videos > 0:
        png, timeline_notes = timeline_png(plt, run, files, history, timeline_videos)
        if png:
            pngs["timeline"] = png
    names = {"accuracy": "report.png"}
    written = [_write_png(run / names.get(k, f"report_{k}.png"), v) for k, v in pngs.items()]
    md = atomic_write_text(run / "report.md", render_report(history, title, plot="report.png" if pngs else None))
    html = atomic_write_text(run / "report.html", render_html(history, files, pngs, title, no_figures, timeline_notes))
    return [md, html, *written]
