"""Block selection: what it costs and whether the cheap ways choose as the full-data evaluator does.

    python benchmarks/selection_cost.py hapt --run runs/hapt_pbd/main
    python benchmarks/selection_cost.py synthetic --run runs/synthetic_pbd/main --set ...

For every step of a finished `blockdrop compress` run, on the model that step selected from (the
teacher, then each kept step's model), on ALL training videos in test-mode windows:

- exhaustive, naive (every candidate from scratch) and shared-prefix: the full-data choice and
  every candidate's full-data score, and the wall time of each;
- successive halving over the same data (compress.selection.search: halving);
- the 8-video heuristic of the shipped configs (exhaustive on a seeded subset of 8 videos);
- the feature evaluators (block influence: feature_cosine, feature_mse).

The timed variants run interleaved within a step, on the same batches (decoded once, before any
timing). Reports per step the choices, the agreement with the full-data choice and, where a cheap
choice differs, its score gap (its full-data score minus the best). Writes
benchmarks/results/<--name>.json (one section per teacher; results of earlier invocations kept)
and prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from blockdrop.compress.history import History
from blockdrop.compress.selection import Halving, select_block
from blockdrop.core.fileio import write_json
from blockdrop.recipes.bench import cpu_name, load_average
from blockdrop.recipes.build import load_detector, load_experiment
from blockdrop.recipes.compress import selection_setup

RESULTS = Path(__file__).parent / "results"


def step_models(run: Path, teacher: Path) -> list[Path]:
    """The model each step of the run selected from: the teacher, then every kept step but the last."""
    history = History.load(run / "history.json")
    return [teacher] + [run / f"step_{s.step:02d}" / "model.safetensors" for s in history.steps[:-1]]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def one_step(cfg, model_path: Path, halving: Halving, metric: str) -> dict:
    model, _ = load_detector(model_path)
    model.eval()
    target, loader = selection_setup(replace(cfg, compress=replace(cfg.compress, selection=replace(
        cfg.compress.selection, videos=None))), model)
    batches = list(loader)  # decoded once: the timed variants below only compute
    _, subset_loader = selection_setup(replace(cfg, compress=replace(cfg.compress, selection=replace(
        cfg.compress.selection, videos=8))), model)
    subset = list(subset_loader)
    _, shuffled_loader = selection_setup(replace(cfg, compress=replace(cfg.compress, selection=replace(
        cfg.compress.selection, videos=None, search="halving"))), model)  # the same windows, in the seeded order
    shuffled = list(shuffled_loader)
    runs = {}
    for name, data, kwargs in (("naive", batches, {"naive": True}), ("shared_prefix", batches, {}),
                               ("halving", shuffled, {"halving": halving})):
        runs[name], seconds = timed(lambda d=data, kw=kwargs: select_block(model, target, d, evaluator="map",
                                                                            metric=metric, **kw))
        runs[name] = {"result": runs[name], "wall_s": seconds}
    full = runs["naive"]["result"]
    cheap = {"halving": runs["halving"]["result"],
             "videos_8": select_block(model, target, subset, evaluator="map", metric=metric)}
    for evaluator in ("feature_cosine", "feature_mse"):
        cheap[evaluator] = select_block(model, target, batches, evaluator=evaluator)
    best = max(full.scores.values())
    return {
        "model": str(model_path), "batches": len(batches), "full_choice": full.chosen_original,
        "full_scores": {str(k): v for k, v in full.scores.items()},
        "max_score_difference_shared_vs_naive": max(abs(runs["shared_prefix"]["result"].scores[k] - v)
                                                    for k, v in full.scores.items()),
        "timed": {name: {"wall_s": round(r["wall_s"], 2), "block_forwards": r["result"].block_forwards,
                         "choice": r["result"].chosen_original} for name, r in runs.items()},
        "halving_rounds": runs["halving"]["result"].rounds,
        "cheap": {name: {"choice": r.chosen_original, "agrees": r.chosen_original == full.chosen_original,
                         "score_gap": full.scores[r.chosen_original] - best} for name, r in cheap.items()},
    }


def summarize(steps: list[dict]) -> dict:
    naive = sum(s["timed"]["naive"]["wall_s"] for s in steps)
    halving = sum(s["timed"]["halving"]["wall_s"] for s in steps)
    shared = sum(s["timed"]["shared_prefix"]["wall_s"] for s in steps)
    names = steps[0]["cheap"] if steps else {}
    return {"wall_ratio": halving / naive, "shared_prefix_ratio": shared / naive,
            "wall_s": {"naive": naive, "shared_prefix": shared, "halving": halving},
            "agreement": sum(s["cheap"]["halving"]["agrees"] for s in steps) / len(steps),
            "agreement_by_method": {n: sum(s["cheap"][n]["agrees"] for s in steps) / len(steps) for n in names},
            "worst_gap_by_method": {n: min(s["cheap"][n]["score_gap"] for s in steps) for n in names}}


def table(name: str, steps: list[dict]) -> str:
    lines = [f"{name}: step | batches | naive s | shared s | halving s | full choice | halving | 8 videos | "
             "feature_cosine | feature_mse"]
    for i, s in enumerate(steps, 1):
        c = s["cheap"]
        lines.append(f"  {i} | {s['batches']} | {s['timed']['naive']['wall_s']:.1f} | "
                     f"{s['timed']['shared_prefix']['wall_s']:.1f} | {s['timed']['halving']['wall_s']:.1f} | "
                     f"{s['full_choice']} | " + " | ".join(f"{c[n]['choice']} ({c[n]['score_gap']:+.2f})"
                                                          for n in ("halving", "videos_8", "feature_cosine", "feature_mse")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run", type=Path, required=True, help="a finished compress run folder")
    parser.add_argument("--teacher", type=Path, default=None, help="default: the run's config compress.teacher")
    parser.add_argument("--name", default="selection_cost", help="results file name under benchmarks/results/")
    parser.add_argument("--section", default=None, help="section of the results file (default: the config name)")
    parser.add_argument("--first", type=int, default=8, help="successive halving: batches of the first round")
    parser.add_argument("--keep", type=float, default=0.5, help="successive halving: fraction kept per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_experiment(args.config, args.set)
    teacher = args.teacher or Path(cfg.compress.teacher or "")
    metric = cfg.compress.selection.block_metric
    steps = [one_step(cfg, path, Halving(args.first, args.keep), metric) for path in step_models(args.run, teacher)]
    section = {**summarize(steps), "steps": steps, "metric": metric, "halving": {"first": args.first, "keep": args.keep},
               "device": f"CPU {cpu_name()} ({platform.machine()}), {args.threads} thread(s)",
               "load_average_end": load_average(),
               "command": "python benchmarks/selection_cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    path = RESULTS / f"{args.name}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[args.section or Path(args.config).stem] = section
    write_json(path, record)
    print(table(args.section or args.config, steps))
    print(f"{args.config}: halving / naive wall {section['wall_ratio']:.3f}, shared-prefix / naive "
          f"{section['shared_prefix_ratio']:.3f}, halving agrees with the full-data choice in "
          f"{section['agreement']:.0%} of {len(steps)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
