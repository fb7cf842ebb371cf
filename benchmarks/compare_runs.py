"""Compare two `blockdrop compress` run folders by metrics and tensors (not file bytes).

    python benchmarks/compare_runs.py RUN_A RUN_B

For each step both runs kept: the dropped blocks, every validation metric, every candidate's
selection score, the alignment's per-epoch losses and validation metrics, and every tensor of the
step's model.safetensors. Prints one line per step and a summary line; exits 1 when they differ.
Either history may be of format 1 (the first releases) or 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from blockdrop.compress.history import History


def _epochs(step) -> list[dict]:
    return [{k: v for k, v in e.items() if k.startswith(("loss/", "val/"))} for e in step.align.epochs if e.get("epoch")]


def compare(a: Path, b: Path) -> tuple[list[str], bool]:
    first, second = History.load(a / "history.json"), History.load(b / "history.json")
    lines, same = [], first.teacher.val == second.teacher.val
    lines.append(f"teacher: validation metrics identical {same}")
    if len(first.steps) != len(second.steps):
        lines.append(f"steps: {len(first.steps)} vs {len(second.steps)}")
        same = False
    for x, y in zip(first.steps, second.steps):
        wa, wb = load_file(a / f"step_{x.step:02d}" / "model.safetensors"), load_file(b / f"step_{y.step:02d}" / "model.safetensors")
        checks = {"dropped": x.dropped_original == y.dropped_original, "validation": x.val == y.val,
                  "selection scores": x.selection.scores == y.selection.scores, "epochs": _epochs(x) == _epochs(y),
                  "weights": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)}
        same &= all(checks.values())
        lines.append(f"step {x.step}: dropped {x.dropped_original} / {y.dropped_original}, "
                     + ", ".join(f"{name} {'identical' if ok else 'DIFFER'}" for name, ok in checks.items()))
    return lines, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    lines, same = compare(args.a, args.b)
    print("\n".join(lines))
    print(f"{args.a} vs {args.b}: {'identical' if same else 'different'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
