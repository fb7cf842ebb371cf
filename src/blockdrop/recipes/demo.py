"""`blockdrop demo`: the whole job on real data, small enough for a laptop.

HAPT recordings (offline, from the `hapt` extra) -> train a 6-block teacher -> Progressive
Block Drop of 2 blocks with cross-depth alignment -> score every step once on the test users
-> print the table. Re-running continues where an interrupted run stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.hapt import convert_hapt
from blockdrop.recipes.build import load_experiment
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.evaluate import evaluate_checkpoint
from blockdrop.recipes.runs import MODEL_FILE
from blockdrop.recipes.train import train_experiment


def demo_config(out: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    return load_experiment("demo", [f"data.root={out / 'data' / 'hapt'}", f"output={out}", *overrides])


def run_demo(out: str | Path = "blockdrop-demo", overrides: Sequence[str] = (), progress: bool = True) -> list[dict]:
    out = Path(out)
    cfg = demo_config(out, overrides)
    data = Path(cfg.data.root)
    say = print if progress else (lambda _msg: None)
    if not (data / "annotations.json").exists():
        say(f"converting HAPT into {data}")
        convert_hapt(data)
    say(f"training the teacher ({cfg.backbone.depth} blocks) in {out / 'teacher'}")
    train_experiment(cfg, out=out / "teacher", resume=True, progress=progress)
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
    print(format_table(table))
    print(f"stopped: {history.stopped}")
    return table


def format_table(rows: list[dict]) -> str:
    lines = ["| model | blocks | GMACs | latency ms | val avg mAP | test avg mAP | test mAP@0.5 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['blocks']} | {r['gmacs']:.3f} | {r['latency_ms']:.2f} | "
                     f"{r['val_average_mAP']:.2f} | {r['test_average_mAP']:.2f} | {r['test_mAP@0.5']:.2f} |")
    return "\n".join(lines)
