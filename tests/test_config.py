import dataclasses

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


def test_video_input_options_are_videomae_only():
    base = {"kind": "videomae", "depth": 2, "width": 32, "heads": 2}
    assert BackboneConfig(**base, input="rgb_diff", spatial_pool="max").spatial_pool == "max"
    with pytest.raises(ValueError, match="'input'"):
        BackboneConfig(kind="sequence", depth=2, width=32, heads=2, input="rgb_diff")
    with pytest.raises(ValueError, match="'spatial_pool'"):
        BackboneConfig(kind="dinov2", size="S", spatial_pool="max")
