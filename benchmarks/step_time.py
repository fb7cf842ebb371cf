"""Where a Progressive Block Drop step's time goes, read from finished runs' history.json.

    python benchmarks/step_time.py hapt=runs/hapt_pbd/main synthetic=runs/synthetic_pbd/main

Per step: selection, alignment (training epochs, the validation passes inside it, the rest:
LoRA injection, the epoch-0 score, the merge check), validation of the merged model, and cost
measurement (MACs and latency), each in seconds and as a share of the step. Writes
benchmarks/results/step_time.json and prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from blockdrop.compress.history import History
from blockdrop.core.fileio import write_json

RESULTS = Path(__file__).parent / "results"
PARTS = ("selection", "training", "alignment_validation", "alignment_other", "validation", "measurement")


def breakdown(step) -> dict:
    epochs = [e for e in step.align.epochs if e.get("epoch", 0) >= 1]
    training = sum(e.get("time_s", 0.0) for e in epochs)
    inner_val = sum(e.get("val_time_s", 0.0) for e in epochs)
    align = step.timings.get("align_s", 0.0)
    parts = {"selection": step.timings.get("selection_s", 0.0), "training": training,
             "alignment_validation": inner_val, "alignment_other": max(0.0, align - training - inner_val),
             "validation": step.timings.get("validate_s", 0.0), "measurement": step.timings.get("measure_s", 0.0)}
    total = sum(parts.values())
    return {"step": step.step, "epochs": len(epochs), "seconds": {k: round(v, 2) for k, v in parts.items()},
            "share": {k: round(v / total, 4) if total else 0.0 for k, v in parts.items()}, "total_s": round(total, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER")
    args = parser.parse_args(argv)
    record = {"command": "python benchmarks/step_time.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    summary = []
    for item in args.runs:
        name, _, folder = item.partition("=")
        history = History.load(Path(folder) / "history.json")
        steps = [breakdown(s) for s in history.steps]
        record[name] = {"run": folder, "steps": steps}
        print(f"{name}: step | epochs | " + " | ".join(PARTS) + " | total s")
        for s in steps:
            print(f"  {s['step']} | {s['epochs']} | " + " | ".join(
                f"{s['seconds'][p]:.0f} ({100 * s['share'][p]:.0f}%)" for p in PARTS) + f" | {s['total_s']:.0f}")
        totals = {p: sum(s["seconds"][p] for s in steps) for p in PARTS}
        top = max(totals, key=totals.get)
        record[name]["dominant"] = top
        summary.append(f"{name}: {top} {100 * totals[top] / max(sum(totals.values()), 1e-9):.0f}%")
    write_json(RESULTS / "step_time.json", record)
    print("largest part of a step: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
