import copy
import json

import pytest

from blockdrop.data import annotations as annotations_module
from blockdrop.data.annotations import (
    THUMOS14_CLASSES,
    Annotations,
    Segment,
    Trimmed,
    VideoInfo,
    load_annotations,
    save_annotations,
)
from blockdrop.core.errors import AnnotationError


def _database():
    return {
        "database": {
            "v1": {"subset": "train", "duration": 10.0, "fps": 25,
                   "annotations": [{"segment": [1.0, 3.0], "label": "jump"},
                                   {"segment": [4.0, 6.5], "label": "run"}]},
            "v2": {"subset": "val", "duration": 8.0,
                   "annotations": [{"segment": [0.0, 2.0], "label": "jump"}]},
        }
    }


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_basic_sorted_classes_and_segments(tmp_path):
    ann = load_annotations(_write(tmp_path, _database()))
    assert ann.classes == ("jump", "run")
    expected = VideoInfo("v1", "train", 10.0, (Segment(1.0, 3.0, "jump"), Segment(4.0, 6.5, "run")), 25.0)
    assert ann.videos["v1"] == expected
    assert ann.videos["v2"].fps is None
    assert ann.source == str(tmp_path / "ann.json")
    assert ann.class_index("run") == 1
    assert ann.notes == ()


def test_loading_never_mutates_the_input_dict():
    data = _database()
    data["database"]["v1"]["annotations"][1]["segment"] = [4.0, 12.0]  # will be clipped
    before = copy.deepcopy(data)
    ann = load_annotations(data)
    assert data == before
    assert ann.videos["v1"].segments[1].end == 12.0  # as written: the evaluators score it so
    trained = ann.for_training()
    assert trained.videos["v1"].segments[1].end == 10.0 and data == before and ann.videos["v1"].segments[1].end == 12.0
    assert ann.source is None
    # the result shares no mutable object with the input
    data["database"]["v1"]["annotations"].clear()
    assert len(ann.videos["v1"].segments) == 2


def test_subset_keeps_classes_and_rejects_unknown_names():
    ann = load_annotations(_database())
    val = ann.subset("val")
    assert list(val.videos) == ["v2"]
    assert val.classes == ann.classes  # label indices stay stable across splits
    assert set(ann.subset("train", "val").videos) == {"v1", "v2"}
    with pytest.raises(AnnotationError, match="nope"):
        ann.subset("nope")


def test_file_classes_order_is_kept_and_unused_classes_allowed():
    data = _database()
    data["classes"] = ["run", "sit", "jump"]
    ann = load_annotations(data)
    assert ann.classes == ("run", "sit", "jump")
    assert ann.class_index("jump") == 2


def test_taxonomy_leaves_are_the_classes():
    data = _database()
    data["taxonomy"] = [
        {"nodeId": 0, "nodeName": "Root", "parentId": None},
        {"nodeId": 1, "nodeName": "Sport", "parentId": 0},
        {"nodeId": 2, "nodeName": "run", "parentId": 1},
        {"nodeId": 3, "nodeName": "jump", "parentId": 1},
        {"nodeId": 4, "nodeName": "swim", "parentId": 1},
    ]
    assert load_annotations(data).classes == ("jump", "run", "swim")


def test_round_trip_through_save(tmp_path):
    data = _database()
    data["classes"] = ["run", "jump"]
    ann = load_annotations(data)
    path = save_annotations(ann, tmp_path / "out" / "ann.json")
    again = load_annotations(path)
    assert again.videos == ann.videos
    assert again.classes == ann.classes
    assert [p.name for p in path.parent.iterdir()] == ["ann.json"]


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = _write(tmp_path, {"old": True})
    ann = load_annotations(_database())

    def broken_dump(obj, f, **kwargs):
        f.write('{"database": {')  # half a file, then a crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(annotations_module.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        save_annotations(ann, path)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["ann.json"]  # no temp file left behind


def test_segments_past_the_duration_are_kept_noted_and_trimmed_for_training(tmp_path):
    data = _database()
    data["database"]["v2"]["annotations"][0]["segment"] = [6.0, 9.5]  # ends past the 8 s duration
    data["database"]["v2"]["annotations"].append({"segment": [8.5, 9.0], "label": "run"})  # starts past it
    path = _write(tmp_path, data)
    ann = load_annotations(path)
    assert ann.videos["v2"].segments == (Segment(6.0, 9.5, "jump"), Segment(8.5, 9.0, "run"))  # as written
    assert len(ann.notes) == 2 and all("v2" in n and "kept for evaluation" in n for n in ann.notes)
    assert [(v, i) for v, i, _ in ann.past_duration()] == [("v2", 0), ("v2", 1)]
    assert ann.trimmed is None
    trained = ann.for_training()
    assert trained.videos["v2"].segments == (Segment(6.0, 8.0, "jump"),)
    assert trained.trimmed == Trimmed(dropped=1, clipped=1) and "1 that end after it clipped" in trained.notes[-1]
    assert trained.videos["v1"] == ann.videos["v1"]  # inside the duration: untouched
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, overflow="reject")
    _assert_names(err, path, "v2", "annotations[0].segment")


def test_tiny_overshoot_is_float_noise():
    data = _database()
    data["database"]["v2"]["annotations"][0]["segment"] = [6.0, 8.0005]
    ann = load_annotations(data, overflow="reject")
    assert ann.videos["v2"].segments[0].end == 8.0005 and ann.notes == () and ann.past_duration() == []
    trained = ann.for_training()
    assert trained.videos["v2"].segments[0].end == 8.0 and trained.trimmed == Trimmed(0, 0)


def test_duplicates_are_kept_and_noted():
    data = _database()
    data["database"]["v1"]["annotations"].append({"segment": [1.0, 3.0], "label": "jump"})
    ann = load_annotations(data)
    assert len(ann.videos["v1"].segments) == 3
    assert any("duplicates annotations[0]" in n for n in ann.notes)


def _assert_names(err, where, video_id, field):
    message = str(err.value)
    assert "\n" not in message
    assert str(where) in message
    assert f"field {field!r}" in message
    if video_id is not None:
        assert repr(video_id) in message


def _set(path):
    """An edit that sets data[path...] = value (or deletes the key when value is _DELETE)."""
    def edit(data, value):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


_DELETE = object()
_V1 = ["database", "v1"]
_A1 = _V1 + ["annotations", 1]

BAD_CASES = [
    # (edit path, value, video id named, field named)
    (["database"], _DELETE, None, "database"),
    (["database"], [1, 2], None, "database"),
    (_V1 + ["subset"], _DELETE, "v1", "subset"),
    (_V1 + ["duration"], _DELETE, "v1", "duration"),
    (_V1 + ["annotations"], _DELETE, "v1", "annotations"),
    (_V1 + ["duration"], "ten", "v1", "duration"),
    (_V1 + ["duration"], True, "v1", "duration"),
    (_V1 + ["duration"], float("nan"), "v1", "duration"),
    (_V1 + ["duration"], -1.0, "v1", "duration"),
    (_V1 + ["fps"], "fast", "v1", "fps"),
    (_V1 + ["annotations"], {"a": 1}, "v1", "annotations"),
    (_A1 + ["segment"], _DELETE, "v1", "annotations[1].segment"),
    (_A1 + ["label"], _DELETE, "v1", "annotations[1].label"),
    (_A1 + ["label"], 3, "v1", "annotations[1].label"),
    (_A1 + ["label_id"], "x", "v1", "annotations[1].label_id"),
    (_A1 + ["segment"], [4.0], "v1", "annotations[1].segment"),
    (_A1 + ["segment"], ["4", 5.0], "v1", "annotations[1].segment"),
    (_A1 + ["segment"], [5.0, 5.0], "v1", "annotations[1].segment"),
    (_A1 + ["segment"], [6.0, 5.0], "v1", "annotations[1].segment"),
    (_A1 + ["segment"], [-1.0, 5.0], "v1", "annotations[1].segment"),
    (["classes"], ["jump"], "v1", "annotations[1].label"),
    (["classes"], "jump", None, "classes"),
    (["classes"], [], None, "classes"),
]


@pytest.mark.parametrize("edit_path, value, video_id, field", BAD_CASES)
def test_bad_annotations_name_file_video_and_field(tmp_path, edit_path, value, video_id, field):
    data = _database()
    _set(edit_path)(data, value)
    path = _write(tmp_path, data)
    with pytest.raises(AnnotationError) as err:
        load_annotations(path)
    _assert_names(err, path, video_id, field)


def test_empty_class_set_is_an_error(tmp_path):
    data = {"database": {"v1": {"subset": "train", "duration": 3.0, "annotations": []}}}
    path = _write(tmp_path, data)
    with pytest.raises(AnnotationError) as err:
        load_annotations(path)
    _assert_names(err, path, None, "classes")


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"database": {\n  "v1": {"subset": "train",, }\n}}')
    with pytest.raises(AnnotationError, match=r"line 2 column 28") as err:
        load_annotations(path)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "absent.json")
    with pytest.raises(AnnotationError, match="overflow"):
        load_annotations(_database(), overflow="wrap")
    with pytest.raises(AnnotationError, match="preset"):
        load_annotations(_database(), preset="kinetics")


def test_allowed_subsets(tmp_path):
    path = _write(tmp_path, _database())
    assert len(load_annotations(path, subsets=["train", "val"]).videos) == 2
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, subsets=["train"])
    _assert_names(err, path, "v2", "subset")


def _thumos(subset_names=("training", "validation")):
    def video(label, subset):
        return {"subset": subset, "duration": 100.0, "annotations": [{"segment": [1.0, 2.0], "label": label}]}
    train_word, test_word = subset_names
    return {"database": {
        "video_validation_0000051": video("Billiards", train_word),
        "video_test_0000004": {**video("Diving", test_word),
                               "annotations": [{"segment": [1.0, 2.0], "label": "Diving"},
                                               {"segment": [3.0, 4.0], "label": "Ambiguous"}]},
        "video_test_0000270": video("Diving", test_word),
        "video_test_0001496": video("Diving", test_word),
    }}


@pytest.mark.parametrize("words", [("training", "validation"), ("Validation", "Test"), ("validation", "test")])
def test_thumos14_preset_maps_both_subset_conventions(words):
    ann = load_annotations(_thumos(words), preset="thumos14")
    assert ann.classes == THUMOS14_CLASSES and len(ann.classes) == 20
    assert {vid: v.subset for vid, v in ann.videos.items()} == {  # no video left out: the evaluators score all
        "video_validation_0000051": "validation", "video_test_0000004": "test", "video_test_0000270": "test",
        "video_test_0001496": "test"}
    assert [s.label for s in ann.videos["video_test_0000004"].segments] == ["Diving"]
    assert any("Ambiguous" in n for n in ann.notes)
    assert ann.class_index("Billiards") == 2


def test_thumos14_preset_rejects_foreign_labels_and_contradicting_subsets(tmp_path):
    data = _thumos()
    data["database"]["video_validation_0000051"]["annotations"][0]["label"] = "Juggling"
    path = _write(tmp_path, data)
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, preset="thumos14")
    _assert_names(err, path, "video_validation_0000051", "annotations[0].label")
    data = _thumos()
    data["database"]["video_validation_0000051"]["subset"] = "test"
    path = _write(tmp_path, data)
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, preset="thumos14")
    _assert_names(err, path, "video_validation_0000051", "subset")


def _activitynet(num_classes=200, subset="training"):
    taxonomy = [{"nodeId": 0, "nodeName": "Root", "parentId": None}]
    taxonomy += [{"nodeId": i + 1, "nodeName": f"class{i:03d}", "parentId": 0} for i in range(num_classes)]
    video = {"subset": subset, "duration": 30.0, "annotations": [{"segment": [1.0, 5.0], "label": "class007"}]}
    return {"taxonomy": taxonomy, "database": {"abc": video}}


def test_activitynet13_preset(tmp_path):
    ann = load_annotations(_activitynet(), preset="activitynet13")
    assert len(ann.classes) == 200 and ann.classes[7] == "class007"
    path = _write(tmp_path, _activitynet(num_classes=199))
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, preset="activitynet13")
    _assert_names(err, path, None, "classes")
    path = _write(tmp_path, _activitynet(subset="train"))
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, preset="activitynet13")
    _assert_names(err, path, "abc", "subset")
    with pytest.raises(AnnotationError, match="subsets"):
        load_annotations(_activitynet(), preset="activitynet13", subsets=["val"])


def test_annotations_are_frozen():
    ann = load_annotations(_database())
    with pytest.raises(AttributeError):
        ann.classes = ()
    with pytest.raises(AttributeError):
        ann.videos["v1"].segments[0].start = 0.0
    assert isinstance(ann, Annotations)
