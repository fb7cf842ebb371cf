"""Configs -> models -> train/eval recipes, end to end on a tiny generated dataset."""

import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch

from blockdrop.build import build_detector, split_annotations
from blockdrop.cli import main
from blockdrop.config import load_config
from blockdrop.data.annotations import load_annotations
from blockdrop.experiment import ExperimentConfig
from blockdrop.recipes import load_detector, train_experiment

SHIPPED = sorted(Path(str(files("blockdrop") / "configs")).glob("*.yaml"))
TINY_MODEL = ["backbone.depth=2", "backbone.width=32", "backbone.heads=2", "backbone.size=null",
              "head.embed_dim=32", "head.fpn_dim=32", "head.head_dim=32"]


def test_there_are_shipped_configs():
    names = {p.stem for p in SHIPPED}
    assert {"hapt", "synthetic", "thumos14_videomae_s", "thumos14_videomae_l", "activitynet13_videomae_s"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_config(ExperimentConfig, path)  # the file as shipped must validate
    assert cfg.data.window > 0
    tiny = load_config(ExperimentConfig, path, TINY_MODEL + [
        "backbone.checkpoint=null", "backbone.checkpoint_format=null", "backbone.grad_checkpointing=false",
        "data.frame_size=32", "data.window=32"] if cfg.data.kind == "video" else TINY_MODEL)
    model = build_detector(tiny, num_classes=5, in_channels=6)
    channels = 6 if tiny.data.kind == "sequence" else None
    shape = (1, tiny.data.window, channels) if channels else (1, tiny.data.window, 32, 32, 3)
    x = torch.rand(shape) if channels else torch.randint(0, 255, shape, dtype=torch.uint8)
    out = model(x, torch.ones(1, tiny.data.window, dtype=torch.bool))
    assert out.head.cls_logits.shape[-1] == 5
    assert model.backbone.depth == 2


def _make_dataset(root: Path, videos: int = 8, rate: float = 10.0) -> None:
    """Sequences of 3 channels where class k is a step of +(k+1) on channel k over its segment."""
    rng = np.random.default_rng(0)
    (root / "sequences").mkdir(parents=True)
    database = {}
    for i in range(videos):
        length = 200
        x = rng.normal(0, 0.1, size=(length, 3)).astype(np.float32)
        segments = []
        for start in (20, 110):
            k, dur = int(rng.integers(0, 3)), int(rng.integers(20, 50))
            x[start:start + dur, k] += k + 1
            segments.append({"segment": [start / rate, (start + dur) / rate], "label": f"c{k}"})
        np.save(root / "sequences" / f"v{i}.npy", x)
        subset = "train" if i < 5 else ("val" if i < 7 else "test")
        database[f"v{i}"] = {"subset": subset, "duration": length / rate, "fps": rate, "annotations": segments}
    (root / "annotations.json").write_text(json.dumps({"database": database, "classes": ["c0", "c1", "c2"]}))


def _tiny_config(tmp_path: Path, **train) -> Path:
    root = tmp_path / "data"
    if not root.exists():
        _make_dataset(root)
    cfg = {
        "data": {"kind": "sequence", "root": str(root), "window": 128, "test_stride": 64, "train_repeats": 2},
        "backbone": {"kind": "sequence", "depth": 2, "width": 32, "heads": 2, "patch": 4, "drop_path": 0.0},
        "head": {"embed_dim": 32, "fpn_dim": 32, "head_dim": 32, "attn_window": 5},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "warmup_epochs": 1, "ema_decay": 0.9, **train},
        "eval": {"batch_size": 4},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_eval_through_the_cli(tmp_path, capsys):
    config = _tiny_config(tmp_path)
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
    assert "results" in json.loads((tmp_path / "p.json").read_text())
    # the run folder is not silently reused
    assert main(["train", str(config), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_saved_model_reloads_without_the_config(tmp_path):
    config = _tiny_config(tmp_path, epochs=1)
    cfg = load_config(ExperimentConfig, config)
    train_experiment(cfg, progress=False)
    model, builder = load_detector(tmp_path / "run" / "model.safetensors")
    assert builder["classes"] == ["c0", "c1", "c2"] and model.backbone.depth == 2
    model.eval()
    x, mask = torch.randn(1, 128, 3), torch.ones(1, 128, dtype=torch.bool)
    again, _ = load_detector(tmp_path / "run" / "model.safetensors")
    again.eval()
    torch.testing.assert_close(model(x, mask).head.cls_logits, again(x, mask).head.cls_logits, rtol=0, atol=0)


def test_detector_training_is_deterministic(tmp_path):
    states = []
    for name in ("a", "b"):
        config = _tiny_config(tmp_path, epochs=1)
        cfg = load_config(ExperimentConfig, config, [f"output={tmp_path / name}"])
        train_experiment(cfg, progress=False)
        model, _ = load_detector(tmp_path / name / "model.safetensors")
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_bad_config_and_override_errors_name_the_key(tmp_path, capsys):
    config = _tiny_config(tmp_path)
    assert main(["train", str(config), "--set", "train.epochz=3"]) == 2
    assert "unknown key 'epochz' in section 'train'" in capsys.readouterr().err
    assert main(["train", "no_such_config"]) == 2
    assert "not a shipped config" in capsys.readouterr().err


def test_validation_can_be_held_out_of_training(tmp_path):
    config = _tiny_config(tmp_path)
    cfg = load_config(ExperimentConfig, config, ["data.val_subset=null", "data.val_fraction=0.4"])
    annotations = load_annotations(Path(cfg.data.root) / "annotations.json")
    parts = split_annotations(cfg.data, annotations, seed=0)
    assert len(parts["val"].videos) == 2 and len(parts["train"].videos) == 3
    assert not set(parts["val"].videos) & set(parts["train"].videos)
    assert set(parts["val"].videos) | set(parts["train"].videos) == set(annotations.subset("train").videos)
    again = split_annotations(cfg.data, annotations, seed=0)
    assert set(again["val"].videos) == set(parts["val"].videos)
