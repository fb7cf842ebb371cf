"""Block selection: what it costs and whether the cheap ways choose as the full-data evaluator does.

    python benchmarks/selection_cost.py hapt --run runs/hapt_pbd/main
    python benchmarks/selection_cost.py synthetic --run runs/synthetic_pbd/main --set ...

For every step of a finished `blockdrop compress` run, on the model that step selected from (the
teacher, then each kept step's model), on ALL training videos in test-mode windows:

- exhaustive, naive (every candidate from scratch) and shared-prefix: the full-data choice and
  every candidate's full-data score, and the wall time of each;
- successive halving over the same data (compress.selection.search: halving, with --first,
  --keep and --final: the last share --final of the candidates decides on all the data);
- the 8-video heuristic of the shipped configs (exhaustive on a seeded subset of 8 videos);
- the feature evaluators (block influence: feature_cosine, feature_mse);
- other halving rules (--rules), replayed from the shared-prefix pass's recorded predictions
  (no forward runs twice): each rule's choice and block forwards, computed as the library's
  halving computes them (the configured rule's replay is checked against its timed run).

The timed variants run interleaved within a step (naive on the batches in order, shared-prefix
and halving in halving's seeded order; decoded once, before any timing). Reports per step the
choices, the agreement with the full-data choice and, where a cheap choice differs, its score gap
(its full-data score minus the best). Writes benchmarks/results/<--name>.json (one section per
teacher; results of earlier invocations kept) and prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from blockdrop.compress.history import History
from blockdrop.compress.selection import Halving, select_block
from blockdrop.compress.stack import kept_blocks
from blockdrop.core.fileio import write_json
from blockdrop.core.schema import SelectionConfig
from blockdrop.recipes.bench import cpu_name, load_average
from blockdrop.recipes.build import load_detector, load_experiment
from blockdrop.recipes.compress import selection_setup

RESULTS = Path(__file__).parent / "results"
DEFAULT_RULES = "8:0.5:0,8:0.5:0.17,8:0.5:0.25,8:0.5:0.33,8:0.5:0.5,16:0.5:0,16:0.5:0.25,16:0.5:0.33,4:0.5:0.33"


def step_models(run: Path, teacher: Path) -> list[Path]:
    """The model each step of the run selected from: the teacher, then every kept step but the last."""
    history = History.load(run / "history.json")
    return [teacher] + [run / f"step_{s.step:02d}" / "model.safetensors" for s in history.steps[:-1]]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


class Recording:
    """The target, with every `predict` result kept in call order: a shared-prefix pass over all
    candidates calls it per batch for the candidates in increasing position."""

    def __init__(self, target):
        self.target, self.calls = target, []

    def __getattr__(self, name):
        return getattr(self.target, name)

    def predict(self, model, output, batch):
        predictions = self.target.predict(model, output, batch)
        self.calls.append(predictions)
        return predictions


def per_batch(recording: Recording, positions: list[int]) -> dict[int, list]:
    """{position: [predictions of batch 0, batch 1, ...]} from the recorded calls."""
    n = len(positions)
    return {k: recording.calls[i::n] for i, k in enumerate(positions)}


def shared_prefix_cost(depth: int, alive: list[int]) -> int:
    """Block forwards of one shared-prefix batch for these candidates (compress/selection.py)."""
    return max(alive) + sum(depth - 1 - k for k in alive)


def replay(predictions: dict[int, list], target, metric: str, rule: Halving, depth: int) -> dict:
    """Successive halving as `select_block` runs it, from recorded per-batch predictions: the
    choice (current position) and the block forwards it would have run."""
    def score(k: int, batches: int) -> float:
        return float(target.score([p for b in predictions[k][:batches] for p in b])[metric])

    alive, total = sorted(predictions), len(next(iter(predictions.values())))
    finalists = rule.finalists(len(alive))
    boundary, seen, forwards = (rule.first if len(alive) > finalists else None), 0, 0
    while True:
        end = total if boundary is None else min(boundary, total)
        forwards += (end - seen) * shared_prefix_cost(depth, alive)
        seen = end
        scores = {k: score(k, end) for k in alive}
        ranked = sorted(alive, key=lambda k: (-scores[k], k))
        if end == total:
            return {"choice": ranked[0], "block_forwards": forwards}
        alive = sorted(ranked[: max(finalists, math.ceil(rule.keep * len(alive)))])
        if len(alive) == 1:
            return {"choice": alive[0], "block_forwards": forwards}
        boundary = boundary * 2 if len(alive) > finalists else None


def rule_name(rule: Halving) -> str:
    return f"first {rule.first}, keep {rule.keep}, final {rule.final}"


def one_step(cfg, model_path: Path, halving: Halving, metric: str, rules: list[Halving]) -> dict:
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
    recording = Recording(target)
    runs = {}
    for name, data, scorer, kwargs in (("naive", batches, target, {"naive": True}),
                                       ("shared_prefix", shuffled, recording, {}),
                                       ("halving", shuffled, target, {"halving": halving})):
        runs[name], seconds = timed(lambda d=data, t=scorer, kw=kwargs: select_block(model, t, d, evaluator="map",
                                                                                     metric=metric, **kw))
        runs[name] = {"result": runs[name], "wall_s": seconds}
    full = runs["naive"]["result"]
    cheap = {"halving": runs["halving"]["result"],
             "videos_8": select_block(model, target, subset, evaluator="map", metric=metric)}
    for evaluator in ("feature_cosine", "feature_mse"):
        cheap[evaluator] = select_block(model, target, batches, evaluator=evaluator)
    best = max(full.scores.values())
    original = kept_blocks(model, stack=target.stack_path)
    recorded = per_batch(recording, list(range(len(original))))
    replays = {}
    for rule in rules:
        r = replay(recorded, target, metric, rule, len(original))
        choice = original[r["choice"]]
        replays[rule_name(rule)] = {"choice": choice, "agrees": choice == full.chosen_original,
                                    "score_gap": full.scores[choice] - best, "block_forwards": r["block_forwards"],
                                    "forwards_ratio": r["block_forwards"] / full.block_forwards}
    mine = replays.get(rule_name(halving))
    if mine is not None and (mine["choice"], mine["block_forwards"]) != (cheap["halving"].chosen_original,
                                                                         cheap["halving"].block_forwards):
        raise SystemExit(f"the replay of {rule_name(halving)} ({mine}) differs from its timed run "
                         f"({cheap['halving'].chosen_original}, {cheap['halving'].block_forwards} forwards)")
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
        "replayed_rules": replays,
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
            "worst_gap_by_method": {n: min(s["cheap"][n]["score_gap"] for s in steps) for n in names},
            "replayed_rules": replay_summary(steps)}


def replay_summary(steps: list[dict]) -> dict:
    """Per replayed rule: agreement over the steps, and its block forwards over the naive ones."""
    naive = sum(s["timed"]["naive"]["block_forwards"] for s in steps)
    rules = steps[0]["replayed_rules"] if steps else {}
    return {r: {"agreement": sum(s["replayed_rules"][r]["agrees"] for s in steps) / len(steps),
                "forwards_ratio": sum(s["replayed_rules"][r]["block_forwards"] for s in steps) / naive,
                "worst_gap": min(s["replayed_rules"][r]["score_gap"] for s in steps)} for r in rules}


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
    parser.add_argument("--final", type=float, default=SelectionConfig.halving_final,
                        help="successive halving: share of the candidates that decides on all the data")
    parser.add_argument("--rules", default=DEFAULT_RULES, help="halving rules to replay, first:keep:final, "
                        "comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_experiment(args.config, args.set)
    teacher = args.teacher or Path(cfg.compress.teacher or "")
    metric = cfg.compress.selection.block_metric
    halving = Halving(args.first, args.keep, args.final)
    rules = [Halving(int(f), float(k), float(n)) for f, k, n in (r.split(":") for r in args.rules.split(","))]
    steps = [one_step(cfg, path, halving, metric, rules) for path in step_models(args.run, teacher)]
    section = {**summarize(steps), "steps": steps, "metric": metric,
               "halving": {"first": args.first, "keep": args.keep, "final": args.final},
               "device": f"CPU {cpu_name()} ({platform.machine()}), {args.threads} thread(s)",
               "load_average_end": load_average(),
               "command": "python benchmarks/selection_cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    path = RESULTS / f"{args.name}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[args.section or Path(args.config).stem] = section
    write_json(path, record)
    print(table(args.section or args.config, steps))
    for name, r in section["replayed_rules"].items():
        print(f"  replayed halving ({name}): agrees in {r['agreement']:.0%}, forwards {r['forwards_ratio']:.3f}x naive, "
              f"worst gap {r['worst_gap']:+.3f}")
    print(f"{args.config}: halving / naive wall {section['wall_ratio']:.3f}, shared-prefix / naive "
          f"{section['shared_prefix_ratio']:.3f}, halving agrees with the full-data choice in "
          f"{section['agreement']:.0%} of {len(steps)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
