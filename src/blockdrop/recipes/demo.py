"""`blockdrop demo`: the whole job on real data, small enough for a laptop.

HAPT recordings (offline, from the `hapt` extra) -> train a 6-block teacher until its validation
score stops improving -> Progressive Block Drop of 2 blocks with cross-depth alignment -> score
every step once on the test users -> print the table, write ``demo.json`` and the run's report.
Re-running continues where an interrupted run stopped.

The teacher's training and the compression's extra training are kept apart in what is shown:
the table's first row is the teacher as trained (to its plateau: early stopping on validation),
and the lines above it say when it stopped, so that no gain of the compressed model can be read
as the method's when it is only the teacher's missing epochs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from blockdrop.core.fileio import write_json
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.hapt import convert_hapt
from blockdrop.recipes.build import load_experiment
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.evaluate import evaluate_checkpoint
from blockdrop.recipes.runs import MODEL_FILE
from blockdrop.recipes.train import train_experiment


def demo_config(out: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    return load_experiment("demo", [f"data.root={out / 'data' / 'hapt'}", f"output={out}", *overrides])


def run_demo(out: str | Path = "blockdrop-demo", overrides: Sequence[str] = (), progress: bool = True) -> dict:
    """Run (or continue) the demo in ``out``; returns what it writes to ``out/demo.json``."""
    out = Path(out)
    start = time.perf_counter()
    cfg = demo_config(out, overrides)
    data = Path(cfg.data.root)
    say = print if progress else (lambda _msg: None)
    if not (data / "annotations.json").exists():
        say(f"converting HAPT into {data}")
        convert_hapt(data)
    say(f"training the teacher ({cfg.backbone.depth} blocks, up to {cfg.train.epochs} epochs, "
        f"early stopping after {cfg.train.patience} epochs without a better validation score) in {out / 'teacher'}")
    train_experiment(cfg, out=out / "teacher", resume=True, progress=progress)
    teacher_summary = json.loads((out / "teacher" / "summary.json").read_text())
    say(f"compressing it in {out / 'compressed'}")
    history = compress_experiment(cfg, teacher=out / "teacher" / MODEL_FILE, out=out / "compressed", resume=True,
                                  progress=progress)
    rows = [("teacher", out / "teacher" / MODEL_FILE, history.teacher)]
    rows += [(f"step {s.step}", out / "compressed" / f"step_{s.step:02d}" / MODEL_FILE, s) for s in history.steps]
    table = []
    for name, model_path, record in rows:
        test = evaluate_checkpoint(cfg, model_path, subset="test")
        table.append({"model": name, "blocks": test["blocks"], "gmacs": record.cost.gmacs,
                      "latency_ms": record.cost.latency_ms, "val_average_mAP": record.val["average_mAP"],
                      "test_average_mAP": test["average_mAP"], "test_mAP@0.5": test["mAP@0.5"]})
    final = table[-1]
    result = {
        "teacher": {"average_mAP": table[0]["test_average_mAP"], "val_average_mAP": table[0]["val_average_mAP"],
                    "val_best_epoch": teacher_summary["best_epoch"], "epochs": teacher_summary["epochs"],
                    "planned_epochs": teacher_summary.get("planned_epochs"),
                    "stopped_early": bool(teacher_summary.get("stopped_early")),
                    "plateaued": bool(teacher_summary.get("plateaued")),
                    "patience": teacher_summary.get("patience"), "min_delta": teacher_summary.get("min_delta"),
                    "blocks": table[0]["blocks"]},
        "compressed": {"average_mAP": final["test_average_mAP"], "val_average_mAP": final["val_average_mAP"],
                       "blocks": final["blocks"], "model": str(out / "compressed" / MODEL_FILE)},
        "blocks_dropped": table[0]["blocks"] - final["blocks"],
        "dropped_original_blocks": [i for s in history.steps for i in s.dropped_original],
        "stopped": history.stopped,
        "table": table,
        "wall_s_this_invocation": round(time.perf_counter() - start, 1),
    }
    write_json(out / "demo.json", result)
    print(teacher_line(result["teacher"]))
    print(format_table(table))
    print(f"stopped: {history.stopped}")
    print(f"report:  {out / 'compressed' / 'report.html'}")
    print(f"model:   {result['compressed']['model']} (standalone: blockdrop eval demo --checkpoint it "
          f"--set data.root={data})")
    print(f"export:  blockdrop export {result['compressed']['model']} --out {out / 'compressed' / 'model.onnx'}")
    print("detect:  blockdrop detect VIDEO --checkpoint M runs a video model the same way (the demo's model "
          "reads HAPT sensor streams, not video)")
    return result


def teacher_line(teacher: dict) -> str:
    if teacher["stopped_early"]:
        how = f"stopped early at epoch {teacher['epochs']} of {teacher['planned_epochs']}"
    else:
        how = f"ran all {teacher['epochs']} epochs"
    if teacher["plateaued"]:
        how += (f": on a plateau, no validation gain above {teacher['min_delta']:g} points in its last "
                f"{teacher['patience']}+ epochs")
    else:
        how += ": NOT on a plateau (validation still rising; the teacher may be undertrained)"
    return (f"teacher: best validation avg mAP {teacher['val_average_mAP']:.2f} at epoch {teacher['val_best_epoch']}, "
            f"{how}. The steps below train only by alignment to that teacher.")


def format_table(rows: list[dict]) -> str:
    lines = ["| model | blocks | GMACs | latency ms | val avg mAP | test avg mAP | test mAP@0.5 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['blocks']} | {r['gmacs']:.3f} | {r['latency_ms']:.2f} | "
                     f"{r['val_average_mAP']:.2f} | {r['test_average_mAP']:.2f} | {r['test_mAP@0.5']:.2f} |")
    return "\n".join(lines)
