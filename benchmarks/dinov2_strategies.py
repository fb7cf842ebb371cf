"""Which block to drop: the selection strategies on the real pretrained DINOv2-S, 1..6 blocks.

    python benchmarks/dinov2_strategies.py --only recovery_aware --seeds 0   # one (strategy, seed)
    python benchmarks/dinov2_strategies.py --collect                         # rewrite the results only
    python benchmarks/dinov2_strategies.py --smoke --out /tmp/s              # every strategy, seconds

The data, model, probes, alignment and cost of benchmarks/dinov2.py (read its docstring), at
--epochs (default 4) alignment epochs per dropped block, the budget at which the method met its
goal at 3 and 4 blocks (dinov2_long.json). One progressive run per (strategy, seed) gives every
depth 1..--blocks (default 6); one-shot needs a run per count. The strategies, in this order:

  task_select       the paper's: pre-recovery, ranked by the task score (a probe fitted and scored
                    on training digits, never the test half)
  block_influence   ShortGPT's 1 - cosine between each block's input and output (dinov2.py's `method`)
  truncate_last     the last kept block
  recovery_aware    the --shortlist best by the paper's task score, each aligned for
                    --trial-batches batches on a copy, ranked by the task score after it
  one_shot_task     one-shot (one alignment of k budgets), the paper's selection
  output_only_task  output-only alignment (feature weight 0), the paper's selection

Every command writes its entries into --results (default
benchmarks/results/selection_strategies.json; with --smoke, <--out>/selection_strategies.json),
merged under a file lock with the entries already there (the same strategy, seed and depth
replaced), and recomputes from all of them the summary (mean, std, range over seeds), the claims
(supported / refuted / not separated by the seed ranges, dinov2.py's rule) and the goal (at 6
blocks, the teacher's probe keeps >= 85% of its accuracy on the student's features, mean of the
seeds). Each entry: probe_acc, teacher_probe_acc, cosine, gmacs, latency_ms (per depth: measured
once, interleaved, and cached in --out), the selection's own cost (its step, and steps 1..k: wall
time and block forwards), the run's wall time to that depth, and the command that made it.
"""

from __future__ import annotations

import fcntl
import json
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dinov2  # noqa: E402
from pretrained_common import RESULTS, RUNS, Stopwatch, cached, machine, markdown_table  # noqa: E402

from blockdrop.core.fileio import write_json  # noqa: E402

STRATEGIES = ("task_select", "block_influence", "truncate_last", "recovery_aware", "one_shot_task", "output_only_task")
CLAIMS = {"progressive > one-shot": ("task_select", "one_shot_task"),
          "cross-depth > output-only": ("task_select", "output_only_task"),
          "task-aware > block influence": ("task_select", "block_influence"),
          "pre-recovery selection > truncate-last": ("task_select", "truncate_last"),
          "recovery-aware > pre-recovery": ("recovery_aware", "task_select")}
GOAL_BLOCKS, GOAL_KEPT = 6, 0.85  # the goal: half the depth, 85% of the teacher's probe kept
METRICS = ("probe_acc", "teacher_probe_acc", "cosine")


def plan(args, only: list[str]) -> list[tuple[str, int, list[int]]]:
    """(strategy, max_blocks of the run, blocks dropped reported) of every run of one seed."""
    depths = list(range(1, args.blocks + 1))
    runs = []
    for name in (s for s in STRATEGIES if s in only):
        runs += [(name, k, [k]) for k in depths] if name in dinov2.ONE_SHOT else [(name, args.blocks, depths)]
    return runs


def depth_costs(args, teacher, data) -> dict[int, dict]:
    """GMACs and latency per blocks dropped (0..--blocks), measured once and kept in --out."""
    path = args.out / f"costs_{args.size}{'_smoke' if args.smoke else ''}_{args.blocks}.json"
    found = cached(path, lambda: {str(k): v for k, v in
                                  dinov2.costs(args, teacher, data, list(range(args.blocks + 1))).items()})
    return {int(k): v for k, v in found.items()}


def run_command(args, variant: str, seed: int, blocks: int, command: str) -> str:
    """The command that started a run (kept in its folder), so that --collect leaves it on its entries."""
    path = dinov2.run_dir(args, variant, seed, blocks) / "command.txt"
    if path.is_file():
        return path.read_text().strip()
    if args.collect:
        return command
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(command + "\n")
    return command


@contextmanager
def locked(path: Path):
    """An exclusive lock beside ``path``: workers merge their entries one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def goal(summary: dict, teacher_acc: float) -> dict:
    """Per strategy at GOAL_BLOCKS: the share of the teacher's probe accuracy kept; the best one."""
    kept = {v: by_k[GOAL_BLOCKS]["teacher_probe_acc"]["mean"] / teacher_acc
            for v, by_k in summary.items() if GOAL_BLOCKS in by_k}
    best = max(kept, key=kept.get) if kept else None
    return {"blocks": GOAL_BLOCKS, "required": GOAL_KEPT, "teacher_probe_kept": {v: round(x, 4) for v, x in kept.items()},
            "seeds": {v: summary[v][GOAL_BLOCKS]["teacher_probe_acc"]["n"] for v in kept},
            "best": best, "met": bool(best is not None and kept[best] >= GOAL_KEPT)}


def cost_table(entries: list[dict]) -> str:
    """Mean over seeds of the selection's cost and the run's wall time at each depth, per strategy."""
    groups: dict = {}
    for e in entries:
        groups.setdefault((e["variant"], e["blocks_dropped"]), []).append(e)
    rows = []
    for (variant, k), es in sorted(groups.items(), key=lambda kv: (STRATEGIES.index(kv[0][0]), kv[0][1])):
        def mean(key, es=es):
            return sum(e[key] for e in es) / len(es)

        rows.append([variant, k, len(es), f"{mean('selection_wall_s'):.1f}", f"{mean('selection_block_forwards'):.0f}",
                     f"{mean('selection_wall_s_total'):.1f}", f"{mean('run_wall_s'):.0f}"])
    return "selection cost and run time (means over seeds)\n" + markdown_table(
        ["strategy", "blocks dropped", "seeds", "selection s (this step)", "block forwards (this step)",
         "selection s (steps 1..k)", "run s (steps 1..k)"], rows)


def write_results(args, new: list[dict], ref, cost: dict, seconds: float) -> dict:
    """Merge ``new`` into --results (same strategy, seed and depth replaced) and recompute the rest."""
    with locked(args.results):
        old = json.loads(args.results.read_text()) if args.results.is_file() else {}
        replaced = {(e["variant"], e["seed"], e["blocks_dropped"]) for e in new}
        entries = [e for e in old.get("entries", []) if (e["variant"], e["seed"], e["blocks_dropped"]) not in replaced]
        entries = sorted(entries + new, key=lambda e: (STRATEGIES.index(e["variant"]), e["seed"], e["blocks_dropped"]))
        summary = dinov2.summarise(entries)
        ks = sorted({e["blocks_dropped"] for e in entries})
        teacher = {"probe_acc": ref.probe_acc, "teacher_probe_acc": ref.probe_acc, "cosine": 1.0, **cost[0]}
        record = {
            "about": "selection strategies on DINOv2-S (benchmarks/dinov2_strategies.py); each entry has its command",
            "resolution": args.size, "alignment_epochs_per_block": args.epochs, "images_per_epoch": args.images_per_epoch,
            "lr": args.lr, "lora_rank": args.rank or 96, "batch": args.batch,
            "recovery_aware": {"shortlist": args.shortlist, "trial_batches": args.trial_batches,
                               "shortlist_by": "probe_acc (the paper's pre-recovery task score)",
                               "scored_after_by": "probe_acc"},
            "probe": {"l2": ref.l2, "l2_chosen_on": "teacher features, training digits columns 0-24 -> 25-49"},
            "smoke": args.smoke, "machine": machine(args.threads), "teacher": teacher,
            "costs": {str(k): v for k, v in cost.items()}, "entries": entries,
            "summary": {v: {str(k): s for k, s in by_k.items()} for v, by_k in summary.items()},
            "claims": {m: dinov2.claims(summary, m, ks, CLAIMS) for m in METRICS},
            "goal": goal(summary, ref.probe_acc),
            "last_command_wall_s": seconds}
        write_json(args.results, record)
    print(dinov2.tables(summary, teacher, cost, [0, *ks], order=STRATEGIES))
    print(cost_table(entries))
    return record


def parse(argv):
    parser = dinov2.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(epochs=4, out=RUNS / "dinov2_strategies", results=None)
    args = parser.parse_args(argv)
    dinov2.smoke_settings(args)
    if args.results is None:
        args.results = (args.out if args.smoke else RESULTS) / "selection_strategies.json"
    only = args.only.split(",") if args.only else list(STRATEGIES)
    unknown = sorted(set(only) - set(STRATEGIES))
    if unknown:
        parser.error(f"--only: unknown strategies {unknown} (choose from {', '.join(STRATEGIES)})")
    return args, only


def main(argv: list[str] | None = None) -> int:
    args, only = parse(argv)
    command = f"python {shlex.join(sys.argv if argv is None else ['benchmarks/dinov2_strategies.py', *argv])}"
    torch.set_num_threads(args.threads)
    clock = Stopwatch()
    data = dinov2.load_data(args)
    teacher = dinov2.build_teacher()
    ref = dinov2.reference(args, teacher, data)
    print(f"teacher: probe {ref.probe_acc:.2f}% (L2 {ref.l2}); data {data.described['counts']}", flush=True)
    entries = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant, blocks, report in plan(args, only):
            made_by = run_command(args, variant, seed, blocks, command)
            entries += [{**e, "command": made_by}
                        for e in dinov2.collect_run(args, variant, seed, blocks, report, teacher, data, ref)]
    cost = depth_costs(args, teacher, data)
    for e in entries:
        c = cost[e["blocks_dropped"]]
        if abs(e["gmacs_run"] - c["gmacs"]) > 1e-6 * c["gmacs"]:
            raise SystemExit(f"GMACs of {e['run']} ({e['gmacs_run']}) differ from the depth's ({c['gmacs']})")
        e.update(gmacs=c["gmacs"], latency_ms=c["latency_ms"], gmacs_224=c["gmacs_224"],
                 latency_224_ms=c["latency_224_ms"])
    record = write_results(args, entries, ref, cost, clock())
    g = record["goal"]
    reached = ", ".join(f"{v} {100 * x:.1f}%" for v, x in g["teacher_probe_kept"].items()) or "no run at that depth"
    print(f"summary: {len(entries)} entries from this command, {len(record['entries'])} in {args.results}; goal at "
          f"{GOAL_BLOCKS} blocks (teacher's probe kept >= {100 * GOAL_KEPT:.0f}%): "
          f"{'met by ' + g['best'] if g['met'] else 'not met'} ({reached}); {clock()} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
