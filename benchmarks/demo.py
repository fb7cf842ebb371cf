"""The README's first command, run as a new user would: a fresh virtual environment, then `blockdrop demo`.

    python benchmarks/demo.py                          # writes benchmarks/results/demo.json
    python benchmarks/demo.py --venv /tmp/demo-venv    # reuse (or create) that environment

Creates a virtual environment (unless --venv names an existing one) and installs the README's
first command's packages into it (`pip install "torch==2.13.0" ".[hapt,report]"`, not timed;
every time, so a reused environment runs this checkout), then
times `blockdrop demo --out DIR` from a clean folder: HAPT conversion, teacher training to its
validation plateau, Progressive Block Drop, test scoring of every step. Records the wall time, the
teacher's and the compressed model's test average mAP, the blocks dropped, and whether the teacher
had plateaued (its best validation epoch, the epochs it ran, the epochs allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
INSTALL = ["torch==2.13.0", ".[hapt,report]"]


def ensure_venv(venv: Path) -> tuple[Path, float]:
    python = venv / "bin" / "python"
    start = time.perf_counter()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # always (re)installed, so a reused environment runs this checkout, not the one it was made from
    subprocess.run([str(python), "-m", "pip", "install", "-q", *INSTALL], cwd=ROOT, check=True)
    return venv / "bin" / "blockdrop", time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help="virtual environment (default: a new temporary one)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the demo runs (default: a new temporary folder)")
    parser.add_argument("--name", default="demo")
    args = parser.parse_args()
    venv = args.venv or Path(tempfile.mkdtemp(prefix="blockdrop-demo-venv-")) / "venv"
    blockdrop, install_s = ensure_venv(venv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="blockdrop-demo-"))
    out = work / "blockdrop-demo"
    if out.exists():
        sys.exit(f"{out} exists: the demo would continue it; give an empty --workdir")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([str(blockdrop), "demo", "--out", str(out)], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    wall = time.perf_counter() - start
    (work / "demo.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"blockdrop demo failed ({proc.returncode}); see {work / 'demo.log'}:\n{proc.stderr[-2000:]}")
    demo = json.loads((out / "demo.json").read_text())
    teacher, compressed = demo["teacher"], demo["compressed"]
    result = {
        "name": args.name,
        "wall_s": round(wall, 1),
        "install_s": round(install_s, 1),
        "teacher": {k: teacher[k] for k in ("average_mAP", "val_average_mAP", "val_best_epoch", "epochs",
                                             "planned_epochs", "patience", "min_delta", "stopped_early",
                                             "plateaued", "blocks")},
        "compressed": {k: compressed[k] for k in ("average_mAP", "val_average_mAP", "blocks")},
        "blocks_dropped": demo["blocks_dropped"],
        "dropped_original_blocks": demo["dropped_original_blocks"],
        "test_gap": round(teacher["average_mAP"] - compressed["average_mAP"], 2),
        "table": demo["table"],
        "printed": proc.stdout.strip().splitlines()[-12:],
        "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores",
        "python": platform.python_version(),
        "command": "python benchmarks/demo.py " + shlex.join(sys.argv[1:]),
        "measured": f"README's first command in a fresh venv: pip install {shlex.join(INSTALL)} (not timed), "
                    "then `blockdrop demo` timed",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(proc.stdout.strip().splitlines()[-12:]))
    print(f"demo: {result['wall_s']:.0f} s, teacher {teacher['average_mAP']:.2f} -> compressed "
          f"{compressed['average_mAP']:.2f} test avg mAP ({result['blocks_dropped']} blocks dropped; teacher "
          f"{'on a plateau' if teacher['plateaued'] else 'NOT on a plateau'}: best epoch {teacher['val_best_epoch']} "
          f"of {teacher['epochs']} run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
