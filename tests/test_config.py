import dataclasses
import re

import pytest

from blockdrop.core.config import apply_overrides, from_dict, load_config, save_config, to_dict
from blockdrop.core.errors import ConfigError
from blockdrop.core.schema import BackboneConfig, ExperimentConfig

MINIMAL = {
    "data": {"kind": "sequence", "root": "data/hapt", "window": 256},
    "backbone": {"kind": "sequence", "depth": 3, "width": 32, "heads": 2},
}


def test_minimal_config_fills_defaults():
    cfg = from_dict(ExperimentConfig, MINIMAL)
    assert cfg.data.window == 256 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.eval.tiou_thresholds == (0.3, 0.4, 0.5, 0.6, 0.7)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"trian": {}}, "unknown key 'trian' in the top level"),
        ({"train": {"learning_rate": 1}}, "unknown key 'learning_rate' in section 'train'"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
        ({"train": {"epochs": 0}}, "'epochs' must be positive"),
        ({"data": {"kind": "audio", "root": "x", "window": 8}}, "data.kind must be one of"),
        ({"backbone": {"kind": "sequence"}}, "give 'size' or all of"),
        ({"eval": {"tiou_thresholds": [0.5, 1.5]}}, "'tiou_thresholds'"),
        ({"data": {"kind": "video", "root": "x", "window": 8, "augment": ["blur"]}}, r"'augment': unknown \['blur'\]"),
    ],
)
def test_bad_values_name_the_key(patch, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ExperimentConfig, {**MINIMAL, **patch}, source="cfg.yaml")


def test_missing_section_is_named():
    with pytest.raises(ConfigError, match="missing required key 'backbone'"):
        from_dict(ExperimentConfig, {"data": MINIMAL["data"]})


def test_overrides_are_validated_and_do_not_mutate(tmp_path):
    original = {"train": {"lr": 1.0}, **MINIMAL}
    data = apply_overrides(original, ["train.lr=3e-4", "backbone.depth=5"])
    assert original["train"]["lr"] == 1.0 and original["backbone"]["depth"] == 3
    cfg = from_dict(ExperimentConfig, data)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.backbone.depth == 5
    with pytest.raises(ConfigError, match="--set 'oops'"):
        apply_overrides(original, ["oops"])


def test_yaml_round_trip_and_file_errors(tmp_path):
    cfg = from_dict(ExperimentConfig, MINIMAL)
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    assert load_config(ExperimentConfig, path) == cfg
    assert to_dict(cfg)["eval"]["tiou_thresholds"] == [0.3, 0.4, 0.5, 0.6, 0.7]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line"):
        load_config(ExperimentConfig, bad)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(ExperimentConfig, tmp_path / "missing.yaml")


def test_configs_are_frozen():
    cfg = from_dict(ExperimentConfig, MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_video_input_options_per_backbone_kind():
    base = {"kind": "videomae", "depth": 2, "width": 32, "heads": 2}
    assert BackboneConfig(**base, input="rgb_diff", spatial_pool="max").spatial_pool == "max"
    assert BackboneConfig(kind="dinov2", size="S", input="rgb_diff").input == "rgb_diff"
    with pytest.raises(ValueError, match="'input'"):
        BackboneConfig(kind="sequence", depth=2, width=32, heads=2, input="rgb_diff")
    with pytest.raises(ValueError, match="'spatial_pool'"):
        BackboneConfig(kind="dinov2", size="S", spatial_pool="max")


# ---- the compress sections, checked at load time -------------------------------------------------

def test_a_partial_section_keeps_that_sections_defaults():
    cfg = from_dict(ExperimentConfig, {**MINIMAL, "compress": {"alignment": {"train": {"epochs": 2}}}})
    train = cfg.compress.alignment.train
    assert (train.epochs, train.lr, train.warmup_epochs) == (2, 1e-4, 1)  # the alignment's defaults, not TrainConfig's
    assert cfg.compress.stopping.max_blocks == 1 and cfg.compress.selection.evaluator == "map"
    weights = from_dict(ExperimentConfig, {**MINIMAL, "compress": {"alignment": {"weights": {"gt": 0}}}})
    assert weights.compress.alignment.weights == {"gt": 0.0}  # the other terms keep 1.0 (align.resolve_weights)


@pytest.mark.parametrize("patch, message", [
    ({"compress": {"selection_metric": "mAP@0.5"}},
     "key 'selection_metric' in section 'compress' has moved to 'compress.selection.block_metric'"),
    ({"compress": {"train": {"epochs": 2}}}, "has moved to 'compress.alignment.train'"),
    ({"eval": {"select_metric": "average_mAP"}}, "has moved to 'eval.best_epoch_metric'"),
    ({"eval": {"best_epoch_metric": "avg_mAP"}},
     r"'best_epoch_metric' 'avg_mAP' is not a metric the evaluator reports \(average_mAP, mAP@0.3,"),
    ({"compress": {"selection": {"block_metric": "mAP@0.55"}}},
     r"compress.selection.block_metric 'mAP@0.55' is not a metric the evaluator reports"),
    ({"compress": {"selection": {"videos": -1}}}, r"compress.selection: 'videos' must be positive, got -1"),
    ({"compress": {"latency_threads": 0}}, r"compress: 'latency_threads' must be positive, got 0"),
    ({"compress": {"alignment": {"lora_rank": 0}}}, r"compress.alignment: 'lora_rank' must be positive"),
    ({"compress": {"alignment": {"weights": {"gt": -1}}}}, r"'weights' must be numbers >= 0"),
    ({"compress": {"stopping": {"max_blocks": None}}}, "give 'max_blocks' or 'target_macs_reduction'"),
    ({"compress": {"strategy": "one_shot", "stopping": {"max_blocks": None, "target_macs_reduction": 0.2}}},
     "strategy 'one_shot' needs 'stopping.max_blocks'"),
    ({"train": {"threads": -1}}, r"train: 'threads' must be positive, got -1"),
    ({"train": {"epochs": 3, "warmup_epochs": 3}}, r"'warmup_epochs' 3 must be below 'epochs' 3"),
    ({"data": {**MINIMAL["data"], "num_workers": -2}}, r"'num_workers' must be >= 0, got -2"),
])
def test_compress_and_run_settings_are_checked_at_load(patch, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ExperimentConfig, {**MINIMAL, **patch}, source="cfg.yaml")


@pytest.mark.parametrize("override, message", [
    ("compress.alignment.lora_targets=[attn.qkvv]",
     r"compress.alignment.lora_targets \['attn.qkvv'\]: backbone.blocks.0.attn.qkvv does not exist; the Linear "
     r"modules of a block in 'backbone.blocks' are attn.qkv, attn.proj, mlp.fc1, mlp.fc2"),
    ("compress.alignment.trainable=[nrom]", r"compress.alignment.trainable: patterns \['nrom'\] match no parameter"),
    ("compress.stopping.max_blocks=2", r"compress.stopping.max_blocks 2 must be below the backbone's 2 blocks"),
    ("compress.alignment.weights.feat=1", r"compress.alignment.weights: unknown loss terms \['feat'\]"),
    ("compress.alignment.weights={feature: 0, cls_kd: 0, reg_kd: 0, gt: 0}", "not all 0"),
])
def test_what_only_the_model_can_check_is_checked_before_anything_runs(tmp_path, capsys, override, message):
    from blockdrop.cli import main
    from conftest import tiny_config

    config = tiny_config(tmp_path)
    assert main(["train", str(config), "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert str(config) in err[0] and not (tmp_path / "run").exists()
