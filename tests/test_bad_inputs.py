"""Bad input across the commands: each case is one line on stderr naming the file, field or flag,
exit code 2, no traceback, and every earlier output intact (the files of a trained run and of a
compression run are hashed before and after each case).

Cases that write a run folder aim at an existing run with --overwrite or --resume where that
makes the protection matter: a failure must leave that run exactly as it was. Everything under the
test's root is compared by content (files), target (links) and kind (folders, fifos), and /dev/null
must still be the device it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

from blockdrop.cli import main
from blockdrop.compress.saving import save_compressed
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.video import write_video
from blockdrop.recipes.build import build_detector, detector_builder, resolve_config_path
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.train import train_experiment

from conftest import tiny_config

torch.set_num_threads(1)
COMPRESS = ["compress.stopping.max_blocks=1", "compress.selection.block_metric=average_mAP",
            "compress.alignment.train.epochs=1", "compress.alignment.train.warmup_epochs=0",
            "compress.alignment.train.ema_decay=0", "compress.latency_threads=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset, a trained teacher run, a finished compression run, and damaged files."""
    root = tmp_path_factory.mktemp("bad")
    config = tiny_config(root, epochs=1)
    train_experiment(load_config(ExperimentConfig, config, ["backbone.depth=3"]), out=root / "teacher",
                     progress=False)
    teacher = root / "teacher" / "model.safetensors"
    compress_experiment(load_config(ExperimentConfig, config, ["backbone.depth=3", *COMPRESS]), teacher=teacher,
                        out=root / "compressed", progress=False)
    files = root / "files"
    files.mkdir()
    (files / "half.safetensors").write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 2])
    save_file({"w": torch.zeros(2)}, str(files / "plain.safetensors"))
    (files / "bad.json").write_text("{not json")
    (files / "no_results.json").write_text(json.dumps({"predictions": {}}))
    (files / "bad.yaml").write_text("data: [unclosed\n")
    (files / "a_file").write_text("x")
    (files / "folder.onnx").mkdir()
    state_run = files / "state_run"  # a copy of the teacher run with its resume state cut short
    shutil.copytree(root / "teacher", state_run)
    state = state_run / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    history_run = files / "history_run"  # a copy of the compression run with history.json cut short
    shutil.copytree(root / "compressed", history_run)
    cut = (history_run / "history.json").read_text()
    (history_run / "history.json").write_text(cut[: len(cut) // 3])
    bad_data = files / "data"  # the dataset with one sequence file cut short
    shutil.copytree(root / "data", bad_data)
    npy = sorted((bad_data / "sequences").glob("*.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:60])
    history = (root / "compressed" / "history.json").read_text()
    for name, text in (("cut", history[: len(history) // 2]),
                       ("nokey", json.dumps({k: v for k, v in json.loads(history).items() if k != "teacher"}))):
        run = files / f"report_{name}"
        run.mkdir()
        (run / "history.json").write_text(text)
    _resume_states(root, files)
    _odd_files(config, files)
    _video_files(files)
    return {"root": root, "config": config, "teacher": teacher, "files": files}


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resume_states(root: Path, files: Path) -> None:
    """Runs to resume whose state is damaged, or of the other kind (an old run without a recorded kind)."""
    def unfinished(name: str) -> Path:  # the compression run as if stopped inside step 1
        run = files / name
        shutil.copytree(root / "compressed", run)
        data = json.loads((run / "history.json").read_text())
        (run / "history.json").write_text(json.dumps({**data, "steps": [], "stopped": None}))
        return run

    _cut(unfinished("align_cut") / "step_01" / "align" / "align_best.pt")
    _cut(unfinished("selection_cut") / "step_01" / "selection.json")
    shutil.copytree(root / "teacher", files / "run_json_cut")
    _cut(files / "run_json_cut" / "run.json")
    shutil.copytree(root / "compressed", files / "old_compress")
    recorded = json.loads((files / "old_compress" / "run.json").read_text())
    (files / "old_compress" / "run.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "kind"}))
    os.symlink(root / "teacher", files / "teacher_link")


def _odd_files(config: Path, files: Path) -> None:
    """Duplicate keys, a fifo, a folder and a user's file where outputs are asked for."""
    text = config.read_text()
    assert "\ntrain:\n" in text
    (files / "dup_key.yaml").write_text(text.replace("\ntrain:\n", "\ntrain:\n  epochs: 5\n"))
    (files / "dup_section.yaml").write_text(text + "train:\n  epochs: 5\n")
    os.mkfifo(files / "fifo")
    (files / "folder.json").mkdir()
    (files / "notes.txt").write_text("a user's own file\n")


def _video_files(files: Path) -> None:
    """A random-weight video detector, a 3-frame clip and two files that are no videos."""
    cfg = load_config(ExperimentConfig, resolve_config_path("synthetic"), VIDEO)
    torch.manual_seed(0)
    save_compressed(build_detector(cfg, 3, 3).eval(), files / "video_model.safetensors",
                    builder=detector_builder(cfg, ("a", "b", "c"), 3))
    write_video(files / "clip.mp4", np.full((3, 32, 32, 3), 128, np.uint8), fps=25)
    (files / "noise.mp4").write_bytes(b"not a video" * 100)


def digest(folder: Path) -> dict:
    """Every entry under ``folder``: files by content, links by target, the rest by kind (lock files
    and the media check's cache of passed files are not outputs)."""
    out = {}
    for parent, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(parent) / name
            if name.endswith(".lock") or name.startswith(".blockdrop-"):
                continue
            mode = path.lstat().st_mode
            key = str(path.relative_to(folder))
            if stat.S_ISREG(mode):
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[key] = os.readlink(path) if stat.S_ISLNK(mode) else stat.S_IFMT(mode)
    return out


def s(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


D3 = "backbone.depth=3"
VIDEO = ["backbone.depth=2", "backbone.width=32", "backbone.heads=2", "head.embed_dim=32", "head.fpn_dim=32",
         "head.head_dim=32", "data.frame_size=32", "data.cache_dir=null"]


def train_over(w, run: str, *sets: str, flag: str = "--overwrite") -> list[str]:
    return ["train", str(w["config"]), *s(D3, *sets), "--out", str(w["root"] / run), flag, "--quiet"]


def compress_over(w, run, *sets: str, flag: str = "--resume") -> list[str]:
    return ["compress", str(w["config"]), *s(D3, *COMPRESS, *sets), "--teacher", str(w["teacher"]), "--out",
            str(run), flag, "--quiet"]


def detect(w, *args: str) -> list[str]:
    return ["detect", *args, "--checkpoint", str(w["files"] / "video_model.safetensors")]

# (name, argv built from the world, regex the one error line must match)
CASES = [
    # ---- configs: keys, values, load-time checks -------------------------------------------------
    ("unknown key", lambda w: ["train", str(w["config"]), *s("train.epochz=3")], r"unknown key 'epochz' in section 'train'"),
    ("moved key", lambda w: ["train", str(w["config"]), *s("compress.selection_metric=x")],
     r"'selection_metric' in section 'compress' has moved to 'compress.selection.block_metric'"),
    ("wrong type", lambda w: ["train", str(w["config"]), *s("train.epochs=ten")], r"train.epochs must be an integer"),
    ("epoch metric typo", lambda w: ["train", str(w["config"]), *s("eval.best_epoch_metric=avg")],
     r"'best_epoch_metric' 'avg' is not a metric"),
    ("block metric typo", lambda w: ["compress", str(w["config"]), *s(D3, "compress.selection.block_metric=map")],
     r"compress.selection.block_metric 'map' is not a metric"),
    ("lora target typo", lambda w: ["train", str(w["config"]), *s("compress.alignment.lora_targets=[attn.qkvv]")],
     r"compress.alignment.lora_targets \['attn.qkvv'\]"),
    ("lora rank 0", lambda w: ["train", str(w["config"]), *s("compress.alignment.lora_rank=0")], r"'lora_rank' must be positive"),
    ("lora rank negative", lambda w: ["train", str(w["config"]), *s("compress.alignment.lora_rank=-4")],
     r"'lora_rank' must be positive, got -4"),
    ("trainable typo", lambda w: ["train", str(w["config"]), *s("compress.alignment.trainable=[nrom]")],
     r"compress.alignment.trainable: patterns \['nrom'\] match no parameter"),
    ("weights all zero", lambda w: ["train", str(w["config"]),
                                    *s("compress.alignment.weights={feature: 0, cls_kd: 0, reg_kd: 0, gt: 0}")],
     r"compress.alignment.weights: weights must be >= 0 and not all 0"),
    ("unknown loss term", lambda w: ["train", str(w["config"]), *s("compress.alignment.weights.kd=1")],
     r"compress.alignment.weights: unknown loss terms \['kd'\]"),
    ("max blocks >= depth", lambda w: ["train", str(w["config"]), *s("compress.stopping.max_blocks=2")],
     r"compress.stopping.max_blocks 2 must be below the backbone's 2 blocks"),
    ("selection videos -1", lambda w: ["train", str(w["config"]), *s("compress.selection.videos=-1")],
     r"'videos' must be positive, got -1"),
    ("latency threads 0", lambda w: ["train", str(w["config"]), *s("compress.latency_threads=0")],
     r"'latency_threads' must be positive, got 0"),
    ("negative threads", lambda w: ["train", str(w["config"]), *s("train.threads=-1")], r"'threads' must be positive, got -1"),
    ("negative workers", lambda w: ["train", str(w["config"]), *s("data.num_workers=-1")], r"'num_workers' must be >= 0"),
    ("warm-up too long", lambda w: ["train", str(w["config"]), *s("train.warmup_epochs=2")],
     r"'warmup_epochs' 2 must be below 'epochs' 1"),
    ("ema too slow", lambda w: ["train", str(w["config"]), *s("train.ema_decay=0.999"), "--out", str(w["root"] / "teacher"),
                                "--overwrite", "--quiet"], r"train.ema_decay 0.999 averages over ~1000 steps .* use at most"),
    ("test stride > window", lambda w: ["train", str(w["config"]), *s("data.test_stride=999")],
     r"'test_stride' 999 must be at most 'window' 128"),
    ("one-shot needs max_blocks", lambda w: ["train", str(w["config"]), *s(
        "compress.strategy=one_shot", "compress.stopping={max_blocks: null, target_macs_reduction: 0.2}")],
     r"strategy 'one_shot' needs 'stopping.max_blocks'"),
    ("invalid yaml", lambda w: ["train", str(w["files"] / "bad.yaml")], r"bad.yaml: invalid YAML at line"),
    ("no such config", lambda w: ["train", "no_such_config"], r"config 'no_such_config': no such file, and not a shipped"),
    ("--set without =", lambda w: ["train", str(w["config"]), "--set", "train.epochs"], r"--set 'train.epochs': expected SECTION.KEY=VALUE"),
    # ---- data ------------------------------------------------------------------------------------
    ("missing data", lambda w: ["train", "synthetic", *s(f"data.root={w['root'] / 'absent'}"), "--out",
                                str(w["root"] / "teacher"), "--overwrite"],
     r"absent/annotations.json: annotation file not found .* to obtain it: blockdrop data synthetic"),
    ("bad media", lambda w: ["train", str(w["config"]), *s(f"data.root={w['files'] / 'data'}"), "--out",
                             str(w["root"] / "teacher"), "--overwrite"],
     r"1 bad media file: .*v0.npy not a readable .npy array.*--skip-bad-media"),
    ("broken annotations", lambda w: ["train", str(w["config"]), *s(f"data.annotations={w['files'] / 'bad.json'}")],
     r"bad.json"),
    # ---- run folders -----------------------------------------------------------------------------
    ("run folder holds a run", lambda w: ["train", str(w["config"]), "--out", str(w["root"] / "teacher")],
     r"teacher: output folder holds a run; pass --resume to continue it or --overwrite"),
    ("--out is a file", lambda w: ["train", str(w["config"]), "--out", str(w["files"] / "a_file")],
     r"--out .*a_file: exists and is not a folder"),
    ("resume with changed config", lambda w: ["train", str(w["config"]), *s(D3, "train.lr=0.5"), "--out",
                                              str(w["root"] / "teacher"), "--resume"],
     r"--resume .*teacher: the run was made with other settings: train.lr \(0.001 -> 0.5\)"),
    ("unwritable output", lambda w: ["train", str(w["config"]), "--out", "/sys/blockdrop-test/run"],
     r"/sys/blockdrop-test.*(Operation not permitted|Permission denied|Read-only).*choose another --out"),
    ("diverging loss", lambda w: ["train", str(w["config"]), *s(D3, "train.lr=1e30", "train.grad_clip=0"), "--out",
                                  str(w["root"] / "teacher"), "--overwrite", "--quiet"],
     r"loss term went non-finite at epoch 1, step \d+ .*lower train.lr"),
    ("resume from a cut train_state.pt", lambda w: ["train", str(w["config"]), *s(D3), "--out",
                                                    str(w["files"] / "state_run"), "--resume", "--quiet"],
     r"state_run/train_state.pt: cannot resume from it .*--overwrite"),
    ("resume from a cut history.json", lambda w: ["compress", str(w["config"]), *s(D3, *COMPRESS), "--teacher",
                                                  str(w["teacher"]), "--out", str(w["files"] / "history_run"),
                                                  "--resume", "--quiet"],
     r"history_run/history.json: not a readable history"),
    # ---- teachers and checkpoints ----------------------------------------------------------------
    ("teacher missing", lambda w: ["compress", str(w["config"]), *s(D3), "--teacher", str(w["root"] / "nope.safetensors")],
     r"--teacher .*nope.safetensors: no such file"),
    ("teacher truncated", lambda w: ["compress", str(w["config"]), *s(D3), "--teacher", str(w["files"] / "half.safetensors")],
     r"half.safetensors: cannot read as safetensors"),
    ("teacher of another architecture", lambda w: ["compress", str(w["config"]), *s("backbone.depth=4"), "--teacher",
                                                   str(w["teacher"])],
     r"--teacher .*: its architecture differs from the config in backbone.depth \(teacher 3, config 4\)"),
    ("teacher not a blockdrop model", lambda w: ["compress", str(w["config"]), *s(D3), "--teacher",
                                                 str(w["files"] / "plain.safetensors")],
     r"plain.safetensors is not a blockdrop compressed checkpoint"),
    ("resume another teacher", lambda w: ["compress", str(w["config"]), *s(D3, *COMPRESS), "--teacher",
                                          str(w["root"] / "compressed" / "model.safetensors"), "--out",
                                          str(w["root"] / "compressed"), "--resume"],
     r"architecture differs|teacher_sha256 \("),
    ("eval checkpoint missing", lambda w: ["eval", str(w["config"]), "--checkpoint", str(w["root"] / "x.safetensors")],
     r"--checkpoint .*x.safetensors: file not found"),
    ("eval checkpoint truncated", lambda w: ["eval", str(w["config"]), "--checkpoint", str(w["files"] / "half.safetensors")],
     r"half.safetensors: cannot read as safetensors"),
    ("eval unknown subset", lambda w: ["eval", str(w["config"]), *s(D3), "--checkpoint", str(w["teacher"]), "--subset",
                                      "holdout"],
     r"annotations.json: field 'subset': unknown subset\(s\) \['holdout'\]"),
    ("export out is a folder", lambda w: ["export", str(w["teacher"]), "--out", str(w["files"] / "folder.onnx")],
     r"folder.onnx.*(is a folder|a directory|not a file)"),
    ("export checkpoint missing", lambda w: ["export", str(w["root"] / "x.safetensors"), "--out", str(w["root"] / "x.pt2")],
     r"x.safetensors"),
    # ---- reports and histories -------------------------------------------------------------------
    ("report without history", lambda w: ["report", str(w["files"])], r"history.json: not found"),
    ("report of a cut history", lambda w: ["report", str(w["files"] / "report_cut")],
     r"history.json: not a readable history .*re-run the compression with --overwrite"),
    ("report of a history missing a key", lambda w: ["report", str(w["files"] / "report_nokey")],
     r"history.json: field 'teacher' missing .*re-run the compression with --overwrite"),
    # ---- mAP -------------------------------------------------------------------------------------
    ("map predictions without results", lambda w: ["map", str(w["root"] / "data" / "annotations.json"),
                                                   str(w["files"] / "no_results.json")], r"no_results.json: missing 'results'"),
    ("map bad tiou", lambda w: ["map", str(w["root"] / "data" / "annotations.json"), str(w["files"] / "no_results.json"),
                                "--tiou", "0.9:0.1:0.1"], r"--tiou: expected START:STOP:STEP"),
    ("map ground truth missing", lambda w: ["map", str(w["root"] / "gt.json"), str(w["files"] / "no_results.json")],
     r"gt.json: cannot read ground truth file"),
    # ---- datasets and bench ----------------------------------------------------------------------
    ("synthetic odd size", lambda w: ["data", "synthetic", "--out", str(w["root"] / "syn"), "--size", "33"],
     r"synthetic spec field 'size' \(--size\): expected an even frame side"),
    ("synthetic into a run", lambda w: ["data", "synthetic", "--out", str(w["root"] / "teacher")],
     r"teacher: output folder exists and is not empty"),
    ("hapt source missing", lambda w: ["data", "hapt", "--out", str(w["root"] / "hapt"), "--source",
                                       str(w["root"] / "no.zip")], r"no.zip"),
    ("bench drop too large", lambda w: ["bench", str(w["config"]), "--drop", "2", "--rounds", "0"],
     r"--drop 2: must be between 0 and 1"),
    ("bench threads 0", lambda w: ["bench", str(w["config"]), "--threads", "0", "--rounds", "0"], r"--threads 0: must be at least 1"),
    ("bench in-channels 0", lambda w: ["bench", str(w["config"]), "--in-channels", "0", "--rounds", "0"],
     r"--in-channels 0: must be at least 1"),
    ("bench rounds -1", lambda w: ["bench", str(w["config"]), "--rounds", "-1"], r"--rounds -1: must be at least 0"),
    # ---- issue 25: config loading ----------------------------------------------------------------
    ("duplicate key in a section", lambda w: ["train", str(w["files"] / "dup_key.yaml")],
     r"dup_key.yaml: key 'epochs' appears twice in section 'train', at lines \d+ and \d+"),
    ("duplicate section", lambda w: ["train", str(w["files"] / "dup_section.yaml")],
     r"dup_section.yaml: key 'train' appears twice in the top level, at lines \d+ and \d+"),
    ("duplicate key in --set", lambda w: ["train", str(w["config"]), *s("train={epochs: 2, epochs: 5}")],
     r"--set 'train=\{epochs: 2, epochs: 5\}': key 'epochs' appears twice in section 'train'"),
    ("lr nan", lambda w: train_over(w, "teacher", "train.lr=nan"), r"train.lr must be a finite number, got 'nan'"),
    ("lr inf", lambda w: train_over(w, "teacher", "train.lr=.inf"), r"train.lr must be a finite number, got inf"),
    ("loss weight inf", lambda w: compress_over(w, w["root"] / "compressed", "compress.alignment.weights.feature=.inf",
                                                flag="--overwrite"),
     r"compress.alignment.weights.feature must be a finite number, got inf"),
    ("tiou nan", lambda w: ["eval", str(w["config"]), *s(D3, "eval.tiou_thresholds=[0.5, .nan]"), "--checkpoint",
                            str(w["teacher"])], r"eval.tiou_thresholds\[1\] must be a finite number"),
    # ---- issue 25: run folders -------------------------------------------------------------------
    ("--resume with --overwrite", lambda w: train_over(w, "teacher", flag="--resume") + ["--overwrite"],
     r"--resume and --overwrite exclude each other"),
    ("compress --resume of a train run", lambda w: compress_over(w, w["root"] / "teacher"),
     r"--resume .*teacher: the folder holds a train run, and `blockdrop compress` would write a compress run"),
    ("train --resume of a compress run", lambda w: train_over(w, "compressed", flag="--resume"),
     r"--resume .*compressed: the folder holds a compress run, and `blockdrop train` would write a train run"),
    ("train --resume of an older compress run", lambda w: train_over(w, "files/old_compress", flag="--resume"),
     r"old_compress: the folder holds a compress run"),
    ("--overwrite through a link, failing", lambda w: ["train", str(w["config"]), *s(D3, "train.lr=1e30", "train.grad_clip=0"),
                                                       "--out", str(w["files"] / "teacher_link"), "--overwrite", "--quiet"],
     r"loss term went non-finite at epoch 1"),
    ("resume from a cut align_best.pt", lambda w: compress_over(w, w["files"] / "align_cut"),
     r"align_cut/step_01/align/align_best.pt: cannot resume from it .*delete .*step_01/align to redo"),
    ("resume from a cut selection.json", lambda w: compress_over(w, w["files"] / "selection_cut"),
     r"selection_cut/step_01/selection.json: cannot resume from it \(JSONDecodeError"),
    ("resume from a cut run.json", lambda w: train_over(w, "files/run_json_cut", flag="--resume"),
     r"run_json_cut/run.json: cannot resume from it"),
    # ---- issue 25: files the user names ----------------------------------------------------------
    ("eval architecture differs", lambda w: ["eval", str(w["config"]), *s("backbone.depth=4"), "--checkpoint",
                                             str(w["teacher"])],
     r"--checkpoint .*teacher/model.safetensors: its architecture differs from the config in backbone.depth "
     r"\(checkpoint 3, config 4\)"),
    ("eval --json a folder", lambda w: ["eval", str(w["config"]), *s(D3), "--checkpoint", str(w["teacher"]), "--json",
                                        str(w["files"] / "folder.json")],
     r"--json .*files/folder.json: exists and is a folder, not a regular file"),
    ("eval --json a user's file", lambda w: ["eval", str(w["config"]), *s(D3), "--checkpoint", str(w["teacher"]),
                                             "--json", str(w["files"] / "notes.txt")],
     r"--json .*notes.txt: exists and is not a JSON file"),
    ("eval --predictions a fifo", lambda w: ["eval", str(w["config"]), *s(D3), "--checkpoint", str(w["teacher"]),
                                             "--predictions", str(w["files"] / "fifo")],
     r"--predictions .*files/fifo: exists and is a fifo"),
    ("eval --json unwritable", lambda w: ["eval", str(w["config"]), *s(D3), "--checkpoint", str(w["teacher"]),
                                          "--json", "/sys/blockdrop-test.json"],
     r"^blockdrop: error: /sys/blockdrop-test.json: cannot write there"),
    ("export to a device", lambda w: ["export", str(w["teacher"]), "--out", "/dev/null"],
     r"--out /dev/null: exists and is a character device"),
    ("export to a fifo", lambda w: ["export", str(w["teacher"]), "--out", str(w["files"] / "fifo")],
     r"--out .*files/fifo: exists and is a fifo"),
    ("export over a user's file", lambda w: ["export", str(w["teacher"]), "--out", str(w["files"] / "notes.txt")],
     r"--out .*notes.txt: exists and is not a file an earlier export to notes.txt wrote"),
    ("export over a checkpoint", lambda w: ["export", str(w["teacher"]), "--out", str(w["teacher"])],
     r"--out .*teacher/model.safetensors: exists and is not a file an earlier export"),
    ("export unwritable", lambda w: ["export", str(w["teacher"]), "--out", "/sys/blockdrop-test.pt2"],
     r"^blockdrop: error: /sys/blockdrop-test.pt2: cannot write there"),
    ("detect several bad videos", lambda w: detect(w, str(w["files"] / "noise.mp4"), str(w["files"] / "absent.mp4")),
     r"2 bad video files: .*noise.mp4: .*; .*absent.mp4: video file not found"),
    ("detect window under a frame", lambda w: detect(w, str(w["files"] / "clip.mp4"), "--fps", "100000"),
     r"--fps 100000: a window of 256 frames would span 2.6 ms, less than one frame of .*clip.mp4 \(25 fps"),
    ("detect --out a folder", lambda w: detect(w, str(w["files"] / "clip.mp4"), "--out", str(w["files"] / "folder.json")),
     r"--out .*folder.json: exists and is a folder"),
    ("detect --plot over a user's file", lambda w: detect(w, str(w["files"] / "clip.mp4"), "--plot",
                                                          str(w["files"] / "notes.txt")),
     r"--plot .*notes.txt: exists and is not a PNG image"),
    ("detect --plot unwritable", lambda w: detect(w, str(w["files"] / "clip.mp4"), "--plot", "/sys/blockdrop-test.png"),
     r"^blockdrop: error: /sys/blockdrop-test.png: cannot write there"),
]


NOT_ERRORS = re.compile(r"blockdrop: warning: |\S+: \d+ detections$")  # what else stderr may carry


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(world, capsys, name, argv, pattern):
    before, device = digest(world["root"]), os.stat("/dev/null").st_rdev
    code = main(argv(world))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not NOT_ERRORS.match(line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("blockdrop: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    after = digest(world["root"])
    assert after == before, (name, {k for k in set(after) | set(before) if after.get(k) != before.get(k)})
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_rdev == device
    assert not list(world["root"].rglob(".*.previous"))


def test_there_are_at_least_eighty_distinct_cases():
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 80
