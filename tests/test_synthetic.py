"""The synthetic benchmark renders real, deterministic mp4 videos whose annotations match the motion."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from blockdrop.data.synthetic import CLASSES, SyntheticSpec, render_synthetic
from blockdrop.data.video import decode_video
from blockdrop.core.errors import ConfigError, DataError

# No distractors, no noise and short ramps: outside actions only the background and idle actors
# change slowly, so the motion an annotation promises is measurable from the decoded pixels.
TINY = SyntheticSpec(seed=3, num_videos=5, size=48, fps=10.0, durations=(6.0, 8.0), action_lengths=(1.5, 2.5),
                     distractors=(0, 0), transients_per_minute=0.0, bursts_per_minute=0.0, noise=0.0,
                     fade=(0.2, 0.2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "synthetic"
    render_synthetic(out, TINY)
    return out, json.loads((out / "annotations.json").read_text())


def _decode_all(out: Path, database: dict) -> dict[str, np.ndarray]:
    return {vid: decode_video(out / "videos" / f"{vid}.mp4", fps=database[vid]["fps"]) for vid in database}


def test_layout_and_annotation_convention(tiny):
    out, payload = tiny
    database = payload["database"]
    assert payload["classes"] == list(CLASSES)
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"{vid}.mp4" for vid in sorted(database)]
    assert sorted(v["subset"] for v in database.values()) == ["test", "train", "train", "train", "val"]
    for info in database.values():
        assert info["fps"] == 10.0 and 6.0 <= info["duration"] <= 8.0
        assert info["annotations"], "every tiny video has room for at least one action"
        for action in info["annotations"]:
            start, end = action["segment"]
            assert 0 < start < end < info["duration"] and action["label"] in CLASSES
            assert 1.5 - 1e-3 <= end - start <= 2.5 + 1e-3


def test_videos_decode_with_the_annotated_length(tiny):
    out, payload = tiny
    for vid, frames in _decode_all(out, payload["database"]).items():
        assert frames.shape == (round(payload["database"][vid]["duration"] * 10), 48, 48, 3)


def _moving_pixels(frames: np.ndarray) -> np.ndarray:
    """Per mille of pixels changing by more than 30 grey levels between frames i and i + 1, (T - 1,).

    Counting large local changes separates an object's motion from the slow, frame-wide drift of
    the background and from codec noise, which a frame-mean difference would mix together.
    """
    change = np.abs(np.diff(frames.astype(np.int16), axis=0)).max(axis=3)  # (T - 1, H, W)
    return 1000 * (change > 30).mean(axis=(1, 2))


def test_annotated_intervals_show_motion_and_the_rest_is_calm(tiny):
    out, payload = tiny
    for vid, frames in _decode_all(out, payload["database"]).items():
        moving = _moving_pixels(frames)
        time = (np.arange(len(moving)) + 0.5) / 10  # between frames i and i + 1
        near_action = np.zeros(len(moving), bool)
        for action in payload["database"][vid]["annotations"]:
            near_action |= (time > action["segment"][0] - 0.5) & (time < action["segment"][1] + 0.5)
        calm = moving[~near_action].mean()
        for action in payload["database"][vid]["annotations"]:
            start, end = action["segment"]
            middle = (time > start + (end - start) / 3) & (time < end - (end - start) / 3)
            assert moving[middle].mean() > 2 * calm + 2, (vid, action)


def test_same_seed_same_dataset_other_seed_differs(tiny, tmp_path):
    out, payload = tiny
    again = tmp_path / "again"
    render_synthetic(again, TINY)
    assert json.loads((again / "annotations.json").read_text()) == payload
    first, second = _decode_all(out, payload["database"]), _decode_all(again, payload["database"])
    for vid in first:
        np.testing.assert_array_equal(first[vid], second[vid])
    other = tmp_path / "other"
    render_synthetic(other, replace(TINY, seed=4))
    assert json.loads((other / "annotations.json").read_text()) != payload


def test_refuses_to_overwrite_unless_asked(tmp_path):
    spec = replace(TINY, num_videos=1)
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=str(out)):
        render_synthetic(out, spec)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    summary = render_synthetic(out, spec, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "videos"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary or backup folders left
    assert "1 videos" in summary.describe() and str(out) in summary.describe()


def test_spec_none_means_default_and_bad_values_name_the_field():
    assert SyntheticSpec(seed=None, num_videos=None, size=None, fps=None) == SyntheticSpec()
    assert SyntheticSpec(size=None, fps=5.0).fps == 5.0
    with pytest.raises(ConfigError, match="'size'"):
        SyntheticSpec(size=63)
    with pytest.raises(ConfigError, match="'classes'"):
        SyntheticSpec(classes=("slide", "jump"))
    with pytest.raises(ConfigError, match="'object_size'"):
        SyntheticSpec(object_size=(0.2, 0.1))
    with pytest.raises(ConfigError, match="'grain'"):
        SyntheticSpec(grain=-0.1)


def test_object_size_and_grain_change_only_the_pixels(tmp_path):
    """The look knobs keep the same schedule (annotations) and change what is drawn."""
    spec = replace(TINY, num_videos=1)
    plain = render_synthetic(tmp_path / "a", spec).out
    big = render_synthetic(tmp_path / "b", replace(spec, object_size=(0.2, 0.25), grain=0.0)).out
    assert (plain / "annotations.json").read_text() == (big / "annotations.json").read_text()
    a = decode_video(plain / "videos" / "synthetic_0000.mp4")
    b = decode_video(big / "videos" / "synthetic_0000.mp4")
    # bigger objects on a grain-free background: more pixels differ from the frame's median colour
    def busy(frames):
        return float((np.abs(frames.astype(np.int16) - np.median(frames, axis=(1, 2), keepdims=True)) > 40).mean())
    assert a.shape == b.shape and busy(b) > 1.5 * busy(a)
