"""Bad input across the commands: each case is one line on stderr naming the file, field or flag,
exit code 2, no traceback, and every earlier output intact (the files of a trained run and of a
compression run are hashed before and after each case).

Cases that write a run folder aim at an existing run with --overwrite or --resume where that
makes the protection matter: a failure must leave that run exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blockdrop.cli import main
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
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
    return {"root": root, "config": config, "teacher": teacher, "files": files}


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def s(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


D3 = "backbone.depth=3"
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
]


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(world, capsys, name, argv, pattern):
    protected = [world["root"] / "teacher", world["root"] / "compressed"]
    before = [digest(p) for p in protected]
    code = main(argv(world))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("blockdrop: warning")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("blockdrop: error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert [digest(p) for p in protected] == before, name
    assert not list(world["root"].glob(".*.previous"))


def test_there_are_at_least_forty_distinct_cases():
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 40
