"""One function per CLI command: parsed flags in, a recipe run, its result printed.

``cli.py`` holds the parsers and maps each command to one of these; the work itself lives in the
recipes. User errors (`BlockdropError`) propagate to the CLI, which prints them on one line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from blockdrop.core import distributed as dist
from blockdrop.core.errors import BlockdropError, DataError
from blockdrop.core.fileio import write_json
from blockdrop.compress.progressive import format_history
from blockdrop.data.check import check_media, describe_problems
from blockdrop.data.annotations import load_annotations
from blockdrop.data.hapt import convert_hapt
from blockdrop.data.synthetic import SyntheticSpec, render_synthetic
from blockdrop.recipes.bench import bench_config, cpu_name, format_table
from blockdrop.recipes.build import describe_annotations, load_experiment, load_experiment_annotations, make_source
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.demo import run_demo
from blockdrop.recipes.detect import detect_videos, plot_detections
from blockdrop.recipes.evaluate import evaluate_checkpoint
from blockdrop.recipes.export import export_detector
from blockdrop.recipes.report import write_report
from blockdrop.recipes.train import train_experiment
from blockdrop.tad.evaluation import detection_map, format_map_table, parse_tiou
from blockdrop.tad.postprocess import save_results


def _config(args: argparse.Namespace):
    return load_experiment(args.config, args.set or ())


def cmd_data_hapt(args: argparse.Namespace) -> int:
    summary = convert_hapt(args.out, source=args.source, val_users=args.val_users, overwrite=args.overwrite)
    print(summary.describe())
    return 0


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    spec = SyntheticSpec(seed=args.seed, num_videos=args.videos, size=args.size, fps=args.fps)
    summary = render_synthetic(args.out, spec, overwrite=args.overwrite)
    print(summary.describe())
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    result = detection_map(args.ground_truth, args.predictions, parse_tiou(args.tiou, flag="--tiou"),
                           subset=args.subset, keep_duplicates=args.keep_duplicates,
                           ignore_unknown_videos=args.ignore_unknown_videos)
    print(format_map_table(result))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    annotations = load_experiment_annotations(cfg.data)
    source = make_source(cfg.data, annotations)
    for line in describe_annotations(cfg.data, annotations, cfg.train.seed):
        print(line)
    problems = check_media(source, annotations.videos, video=cfg.data.kind == "video", cache_dir=cfg.data.cache_dir)
    if problems:
        raise DataError(describe_problems(source, problems, shown=len(problems)))
    print(f"{len(annotations.videos)} media files in {source.root}: all readable")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    summary = train_experiment(_config(args), out=args.out, resume=args.resume, overwrite=args.overwrite,
                               progress=not args.quiet, skip_bad_media=args.skip_bad_media,
                               allow_config_change=args.allow_config_change)
    if dist.is_main():  # under torchrun: one summary, not one per process
        print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if not args.checkpoint.exists():
        raise BlockdropError(f"--checkpoint {args.checkpoint}: file not found")
    metrics = evaluate_checkpoint(cfg, args.checkpoint, subset=args.subset, predictions_out=args.predictions)
    if not dist.is_main():  # under torchrun every rank scores the whole subset; rank 0 reports it
        return 0
    print(format_map_table(metrics))
    if args.json is not None:
        write_json(args.json, {k: v for k, v in metrics.items() if k != "per_class"})
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    history = compress_experiment(_config(args), teacher=args.teacher, out=args.out, resume=args.resume,
                                  overwrite=args.overwrite, progress=not args.quiet,
                                  skip_bad_media=args.skip_bad_media, allow_config_change=args.allow_config_change)
    if dist.is_main():
        print(format_history(history))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    fmt = args.format or ("onnx" if args.out.suffix.lower() == ".onnx" else "pt2")
    result = export_detector(args.checkpoint, args.out, fmt=fmt, batch=args.batch, tolerance=args.tolerance)
    print(f"wrote {', '.join(map(str, result.files))} ({result.format}; "
          f"max |exported - eager| = {result.max_abs_diff:.2e})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    for path in write_report(args.run, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, overrides=args.set or (), progress=not args.quiet)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rows = bench_config(cfg, drop=args.drop, width=args.width, rounds=args.rounds, threads=args.threads,
                        warmup=args.warmup, min_run_time=args.min_run_time, classes=args.classes,
                        in_channels=args.in_channels)
    threads = args.threads or torch.get_num_threads()
    print(f"{args.config}: window {cfg.data.window} ({cfg.data.kind}), batch 1, random weights, "
          f"{threads} CPU threads, {cpu_name()}, torch {torch.__version__}")
    print(format_table(rows))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    if args.annotations is not None and args.plot is None:
        raise BlockdropError("--annotations is drawn by --plot: pass --plot too")
    ground_truth = load_annotations(args.annotations) if args.annotations is not None else None  # fail early
    results = detect_videos(args.videos, args.checkpoint, fps=args.fps, device=args.device, min_score=args.min_score,
                            warn=lambda message: print(f"blockdrop: warning: {message}", file=sys.stderr))
    log = sys.stdout if args.out is not None else sys.stderr  # without --out, stdout is the JSON alone
    for video_id, detections in results["results"].items():
        print(f"{video_id}: {len(detections)} detections", file=log)
    if args.out is None:
        print(json.dumps(results, indent=2))
    else:
        print(f"wrote {save_results(results, args.out)}", file=log)
    if args.plot is not None:
        path = plot_detections(results, args.plot, args.videos, args.checkpoint, ground_truth=ground_truth)
        print(f"wrote {path}", file=log)
    return 0
