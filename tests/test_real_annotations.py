"""The field's real annotation files (excerpts in tests/data/real_annotations, sources in its README)
load through their presets, and score as ActionFormer's ANETdetection scores them.

ActionFormer's `thumos14.json` has 30 segments in 5 videos that lie past their video's duration;
its evaluator (and OpenTAD's) counts them as ground truth, so `blockdrop eval` (which scores
against the preset-loaded annotations) and `blockdrop map` (the file as written) must too.
Training cannot see them: the training split drops them, and the run record says how many.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from blockdrop.cli import main
from blockdrop.data.annotations import THUMOS14_CLASSES, Trimmed, load_annotations
from blockdrop.tad.evaluation import ACTIVITYNET_TIOU, THUMOS_TIOU, detection_map

from conftest import actionformer_metrics

DATA = Path(__file__).parent / "data" / "real_annotations"
ACTIONFORMER = DATA / "thumos14_actionformer_excerpt.json"
OPENTAD = DATA / "thumos_14_anno_opentad_excerpt.json"
ACTIVITYNET = DATA / "activity_net_v1-3_excerpt.json"
# the segments of ActionFormer's thumos14.json past their video's duration, as its maintainers' file has them
PAST = {"video_test_0000270": 22, "video_test_0000814": 3, "video_test_0001081": 1,
        "video_validation_0000364": 2, "video_validation_0000856": 2}


@pytest.fixture(scope="module")
def oracle():
    return actionformer_metrics()


def raw(path: Path) -> dict:
    return json.loads(path.read_text())


def test_actionformer_thumos14_loads_with_every_segment_as_written():
    ann = load_annotations(ACTIONFORMER, preset="thumos14")
    file = raw(ACTIONFORMER)["database"]
    assert set(ann.videos) == set(file)  # no video left out
    for vid, info in ann.videos.items():  # every segment, in file order, as written
        assert [(s.start, s.end, s.label) for s in info.segments] == \
               [(a["segment"][0], a["segment"][1], a["label"]) for a in file[vid]["annotations"]]
    past = ann.past_duration()
    assert {vid: sum(v == vid for v, _, _ in past) for vid in PAST} == PAST and len(past) == 30
    assert sum("kept for evaluation" in n for n in ann.notes) == 30
    assert {v.subset for v in ann.videos.values()} == {"validation", "test"}  # Validation / Test, by video id


def test_training_drops_what_lies_past_the_media_and_counts_it():
    ann = load_annotations(ACTIONFORMER, preset="thumos14")
    trained = ann.for_training()
    # every one of the 30 starts at or after the duration (none straddles it): all dropped
    assert trained.trimmed == Trimmed(dropped=30, clipped=0)
    assert len(trained.videos["video_test_0000270"].segments) == len(ann.videos["video_test_0000270"].segments) - 22
    assert all(s.end <= v.duration for v in trained.videos.values() for s in v.segments)


def test_opentad_thumos_file_loads_and_maps_to_the_same_splits():
    ann = load_annotations(OPENTAD, preset="thumos14")
    action = load_annotations(ACTIONFORMER, preset="thumos14")
    assert set(ann.videos) == set(action.videos) - {"video_test_0000270"}  # OpenTAD's maintainers removed it
    assert all(ann.videos[v].subset == action.videos[v].subset for v in ann.videos)  # training -> validation, ...
    assert ann.past_duration() == []  # they removed the segments past the duration too


def test_activitynet_file_loads_through_its_preset():
    ann = load_annotations(ACTIVITYNET, preset="activitynet13")
    assert len(ann.classes) == 200 and ann.classes == tuple(sorted(ann.classes))
    assert {v.subset for v in ann.videos.values()} == {"training", "validation", "testing"}
    assert all(not v.segments for v in ann.videos.values() if v.subset == "testing")
    assert ann.videos["JDg--pjY5gg"].segments[0].label in ann.classes


# ---------------------------------------------------------------- scoring, against ActionFormer's evaluator


def predictions(annotations_file: Path, seed: int, label_ids: dict) -> dict:
    """Hits, near misses and false positives around every ground-truth segment of the file (those
    past the duration included), with tied scores."""
    rng = np.random.default_rng(seed)
    results = {}
    for vid, info in raw(annotations_file)["database"].items():
        dets = []
        for a in info["annotations"]:
            for _ in range(int(rng.integers(0, 3))):
                s, e = np.asarray(a["segment"], dtype=float) + rng.normal(0, 1.0, 2)
                label = a["label"] if rng.random() < 0.8 else str(rng.choice(sorted(label_ids)))
                dets.append({"segment": [float(s), float(max(s + 0.1, e))], "label": label})
        for _ in range(int(rng.integers(0, 4))):
            s = float(rng.uniform(0, info["duration"]))
            dets.append({"segment": [s, s + float(rng.uniform(0.5, 10))], "label": str(rng.choice(sorted(label_ids)))})
        for d in dets:
            d["score"] = float(rng.integers(1, 5)) / 8 if rng.random() < 0.5 else float(rng.random())
        results[vid] = dets
    return {"results": results}


def oracle_map(oracle, gt_file: Path, preds: dict, split: str, thresholds, label_ids: dict, tmp_path) -> np.ndarray:
    """ANETdetection on the file itself, segments untouched. Label ids are 100 + the class index:
    ANETdetection re-indexes the ground truth's ids to 0..K-1 and leaves the ids of predictions of
    other classes as they are, so small ids could collide in an excerpt that lacks some classes."""
    import pandas as pd

    doc = raw(gt_file)
    label_ids = {c: 100 + i for c, i in label_ids.items()}
    for info in doc["database"].values():
        for a in info["annotations"]:
            a["label_id"] = label_ids[a["label"]]
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    rows = [(v, d["segment"][0], d["segment"][1], label_ids[d["label"]], d["score"])
            for v, dets in preds["results"].items() for d in dets]
    frame = pd.DataFrame(rows, columns=["video-id", "t-start", "t-end", "label", "score"])
    anet = oracle.ANETdetection(str(tmp_path / "gt.json"), split=split, tiou_thresholds=np.asarray(thresholds),
                                num_workers=1)
    mean_ap, _, _ = anet.evaluate(frame, verbose=False)
    return 100 * np.asarray(mean_ap)


CASES = [  # file, preset, the oracle's split word, the preset's subset, thresholds
    (ACTIONFORMER, "thumos14", "test", "test", THUMOS_TIOU),
    (ACTIONFORMER, "thumos14", "validation", "validation", THUMOS_TIOU),
    (OPENTAD, "thumos14", "validation", "test", THUMOS_TIOU),
    (ACTIVITYNET, "activitynet13", "training", "training", ACTIVITYNET_TIOU),
]


@pytest.mark.parametrize("gt_file,preset,split,subset,thresholds", CASES,
                         ids=["actionformer-test", "actionformer-validation", "opentad-test", "activitynet-training"])
@pytest.mark.parametrize("seed", [0, 1])
def test_eval_and_map_score_the_real_files_as_actionformer_does(oracle, tmp_path, gt_file, preset, split, subset,
                                                                thresholds, seed):
    ann = load_annotations(gt_file, preset=preset)
    classes = THUMOS14_CLASSES if preset == "thumos14" else ann.classes
    label_ids = {c: i for i, c in enumerate(classes)}
    preds = predictions(gt_file, seed, label_ids)
    expected = oracle_map(oracle, gt_file, preds, split, thresholds, label_ids, tmp_path)

    # `blockdrop eval`: the preset-loaded annotations of the subset, as inference.score_windows passes them
    part = ann.subset(subset)
    evaluated = detection_map(part.to_json(), preds, thresholds)
    got = np.array([evaluated[f"mAP@{t:g}"] for t in thresholds])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    past = sum(1 for vid, _, _ in ann.past_duration() if ann.videos[vid].subset == subset)
    written = sum(len(v["annotations"]) for k, v in raw(gt_file)["database"].items() if k in part.videos)
    assert evaluated["num_ground_truth"] == written - evaluated["removed_duplicates"] - evaluated["removed_short"]
    if gt_file == ACTIONFORMER:
        assert past == (26 if subset == "test" else 4)  # they count

    # `blockdrop map`: the file as written (the subset word is matched without case)
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    as_written = detection_map(gt_file, tmp_path / "preds.json", thresholds, subset=split)
    np.testing.assert_allclose([as_written[f"mAP@{t:g}"] for t in thresholds], expected, rtol=0, atol=1e-9)


def test_map_command_counts_the_segments_past_the_duration(tmp_path, capsys, oracle):
    label_ids = {c: i for i, c in enumerate(THUMOS14_CLASSES)}
    preds = predictions(ACTIONFORMER, 3, label_ids)
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    assert main(["map", str(ACTIONFORMER), str(tmp_path / "preds.json"), "--subset", "Test",
                 "--tiou", "0.3:0.7:0.1"]) == 0
    out = capsys.readouterr().out
    expected = oracle_map(oracle, ACTIONFORMER, preds, "test", THUMOS_TIOU, label_ids, tmp_path)
    average = next(line for line in out.splitlines() if line.startswith("average"))
    assert float(average.split()[1]) == pytest.approx(round(expected.mean(), 2), abs=1e-9)
    written = sum(len(v["annotations"]) for v in raw(ACTIONFORMER)["database"].values() if v["subset"] == "Test")
    assert f"{written} ground-truth instances" in out  # the 26 test segments past the duration among them
