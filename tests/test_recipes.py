"""Configs -> models -> train/eval recipes, end to end on a tiny generated dataset."""

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from blockdrop.recipes.build import build_detector, load_experiment, data_fingerprint, make_source, split_annotations
from blockdrop.cli import main
from blockdrop.core.config import load_config
from blockdrop.data.annotations import load_annotations
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes.build import load_detector
from blockdrop.recipes.train import train_experiment

from conftest import free_port, tiny_config

SHIPPED = sorted(Path(str(files("blockdrop") / "configs")).glob("*.yaml"))
TINY_MODEL = ["backbone.depth=2", "backbone.width=32", "backbone.heads=2", "backbone.size=null",
              "head.embed_dim=32", "head.fpn_dim=32", "head.head_dim=32"]


def test_there_are_shipped_configs():
    names = {p.stem for p in SHIPPED}
    assert {"hapt", "synthetic", "thumos14_videomae_s", "thumos14_videomae_l", "activitynet13_videomae_s"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_experiment(path)  # the file as shipped must validate, its model-dependent settings too
    assert cfg.data.window > 0
    tiny = load_config(ExperimentConfig, path, TINY_MODEL + [
        "backbone.checkpoint=null", "backbone.checkpoint_format=null", "backbone.grad_checkpointing=false",
        "data.frame_size=32", "data.window=32", "data.test_stride=16"] if cfg.data.kind == "video" else TINY_MODEL)
    model = build_detector(tiny, num_classes=5, in_channels=6)
    channels = 6 if tiny.data.kind == "sequence" else None
    shape = (1, tiny.data.window, channels) if channels else (1, tiny.data.window, 32, 32, 3)
    x = torch.rand(shape) if channels else torch.randint(0, 255, shape, dtype=torch.uint8)
    out = model(x, torch.ones(1, tiny.data.window, dtype=torch.bool))
    assert out.head.cls_logits.shape[-1] == 5
    assert model.backbone.depth == 2


def test_train_then_eval_through_the_cli(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["train", str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    assert (run / "model.safetensors").exists() and (run / "config.yaml").exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "val/average_mAP" in json.loads(lines[-1])
    capsys.readouterr()
    assert main(["eval", str(config), "--checkpoint", str(run / "model.safetensors"),
                 "--json", str(tmp_path / "m.json"), "--predictions", str(tmp_path / "p.json")]) == 0
    assert "average" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["subset"] == "test" and metrics["blocks"] == 2 and 0 <= metrics["average_mAP"] <= 100
    summary = json.loads((run / "summary.json").read_text())
    assert summary["threads"] >= 1 and summary["world_size"] == 1
    assert summary["software"]["torch"] == torch.__version__ and "av" not in summary["software"]
    assert "results" in json.loads((tmp_path / "p.json").read_text())
    # the run folder is not silently reused
    assert main(["train", str(config), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_data_fingerprint_tells_changed_media_and_annotations_apart(tmp_path):
    config = tiny_config(tmp_path)
    cfg = load_config(ExperimentConfig, config)
    annotations = load_annotations(Path(cfg.data.root) / cfg.data.annotations)
    source = make_source(cfg.data, annotations)
    first = data_fingerprint(cfg.data, annotations, source)
    assert first == data_fingerprint(cfg.data, annotations, source)
    assert first["media_files"] == len(annotations.videos) and first["media_bytes"] > 0
    video = source.path(sorted(annotations.videos)[0])
    with open(video, "ab") as f:  # the same file name, other content and size
        f.write(b"\0" * 8)
    changed = data_fingerprint(cfg.data, annotations, source)
    assert changed["media_names_sizes_sha256"] != first["media_names_sizes_sha256"]
    assert changed["annotations_sha256"] == first["annotations_sha256"]
    ann = Path(cfg.data.root) / cfg.data.annotations
    ann.write_text(ann.read_text() + "\n")
    assert data_fingerprint(cfg.data, annotations, source)["annotations_sha256"] != first["annotations_sha256"]


def test_saved_model_reloads_without_the_config(tmp_path):
    """The file holds the trained (EMA) weights: the reloaded model equals the EMA state the loop
    kept in train_state.pt, tensor for tensor, and computes with them."""
    config = tiny_config(tmp_path, epochs=1)
    cfg = load_config(ExperimentConfig, config)
    train_experiment(cfg, progress=False)
    model, builder = load_detector(tmp_path / "run" / "model.safetensors")
    assert builder["classes"] == ["c0", "c1", "c2"] and model.backbone.depth == 2
    state = torch.load(tmp_path / "run" / "train_state.pt", map_location="cpu", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    trained = {k: v for k, v in model.state_dict().items()}
    assert trained.keys() == ema.keys()
    for key, value in trained.items():  # one epoch: the best epoch is the last, whose EMA was saved
        assert torch.equal(value, ema[key]), key
    fresh = build_detector(cfg, 3, 3)  # the same architecture untrained differs: the file is not a fresh model
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())


def test_detector_training_is_deterministic(tmp_path):
    states = []
    for name in ("a", "b"):
        config = tiny_config(tmp_path, epochs=1)
        cfg = load_config(ExperimentConfig, config, [f"output={tmp_path / name}"])
        train_experiment(cfg, progress=False)
        model, _ = load_detector(tmp_path / name / "model.safetensors")
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_bad_config_and_override_errors_name_the_key(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["train", str(config), "--set", "train.epochz=3"]) == 2
    assert "unknown key 'epochz' in section 'train'" in capsys.readouterr().err
    assert main(["train", "no_such_config"]) == 2
    assert "not a shipped config" in capsys.readouterr().err


def test_validation_can_be_held_out_of_training(tmp_path):
    config = tiny_config(tmp_path)
    cfg = load_config(ExperimentConfig, config, ["data.val_subset=null", "data.val_fraction=0.4"])
    annotations = load_annotations(Path(cfg.data.root) / "annotations.json")
    parts = split_annotations(cfg.data, annotations, seed=0)
    assert len(parts["val"].videos) == 2 and len(parts["train"].videos) == 3
    assert not set(parts["val"].videos) & set(parts["train"].videos)
    assert set(parts["val"].videos) | set(parts["train"].videos) == set(annotations.subset("train").videos)
    again = split_annotations(cfg.data, annotations, seed=0)
    assert set(again["val"].videos) == set(parts["val"].videos)


def test_train_under_torchrun_with_two_gloo_processes(tmp_path):
    """The real command under PyTorch's launcher: 2 CPU processes, DDP over gloo, one run folder
    written by rank 0, and a model that the single-process `eval` loads."""
    config = tiny_config(tmp_path, threads=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "blockdrop", "train", str(config), "--quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["blocks"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # one writer: rank 0
    assert main(["eval", str(config), "--checkpoint", str(out / "model.safetensors"),
                 "--json", str(tmp_path / "m.json")]) == 0
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["average_mAP"] <= 100


def test_missing_data_names_how_to_obtain_it_and_touches_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "synthetic", "--set", f"data.root={tmp_path / 'absent'}", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent/annotations.json" in err[0]
    assert "to obtain it: blockdrop data synthetic --out data/synthetic480 --videos 480" in err[0]
    assert not out.exists()  # a failed start leaves nothing that blocks the next try
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"earlier run")
    assert main(["train", "synthetic", "--set", f"data.root={tmp_path / 'absent'}", "--out", str(out),
                 "--overwrite", "--quiet"]) == 2
    assert (out / "model.safetensors").read_bytes() == b"earlier run"  # --overwrite did not wipe it
