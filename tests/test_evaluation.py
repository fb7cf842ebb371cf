"""Detection mAP: hand-computed golden cases, the options, input validation, and the ActionFormer oracle."""

import json

import numpy as np
import pytest

from blockdrop.core.errors import AnnotationError, BlockdropError
from blockdrop.tad.evaluation import ACTIVITYNET_TIOU, THUMOS_TIOU, detection_map, format_map_table, parse_tiou

from conftest import actionformer_metrics


def gt_doc(videos, subset="test"):
    """{video: [(start, end, label), ...]} -> an OpenTAD/ActivityNet annotation dict."""
    return {"database": {v: {"subset": subset, "duration": 100.0,
                             "annotations": [{"segment": [s, e], "label": c} for s, e, c in anns]}
                         for v, anns in videos.items()}}


def pred_doc(videos):
    """{video: [(start, end, label, score), ...]} -> a results dict."""
    return {"results": {v: [{"segment": [s, e], "label": c, "score": p} for s, e, c, p in dets]
                        for v, dets in videos.items()}}


# ------------------------------------------------------------------ golden cases, worked by hand


def test_one_perfect_prediction_is_100():
    r = detection_map(gt_doc({"v": [(2, 8, "a")]}), pred_doc({"v": [(2, 8, "a", 0.3)]}), ACTIVITYNET_TIOU)
    assert r["average_mAP"] == pytest.approx(100.0)
    assert all(r[f"mAP@{t:g}"] == pytest.approx(100.0) for t in ACTIVITYNET_TIOU)


def test_known_precision_recall_curve():
    # 3 GT; predictions in score order: TP, FP, TP, FP.
    # precision 1, 1/2, 2/3, 2/4; recall 1/3, 1/3, 2/3, 2/3.
    # envelope (max precision from here on): 1, 2/3, 2/3, 1/2.
    # AP = 1/3 * 1 + 0 * 2/3 + 1/3 * 2/3 + 0 * 1/2 = 5/9.
    gt = gt_doc({"v": [(0, 10, "a"), (20, 30, "a"), (40, 50, "a")]})
    pred = pred_doc({"v": [(60, 70, "a", 0.8), (0, 10, "a", 0.9), (80, 90, "a", 0.6), (20, 30, "a", 0.7)]})
    r = detection_map(gt, pred, (0.5,))
    assert r["mAP@0.5"] == pytest.approx(100 * 5 / 9)


def test_threshold_is_inclusive():
    # tIoU([0, 5], [0, 10]) = 0.5 exactly: TP at 0.3..0.5, FP above.
    r = detection_map(gt_doc({"v": [(0, 10, "a")]}), pred_doc({"v": [(0, 5, "a", 1.0)]}), THUMOS_TIOU)
    assert [r[f"mAP@{t:g}"] for t in THUMOS_TIOU] == pytest.approx([100, 100, 100, 0, 0])
    assert r["average_mAP"] == pytest.approx(60.0)


def test_match_goes_to_highest_tiou_not_first_eligible():
    # p1 [5, 15]: tIoU 1/3 with g1 [0, 10], 1.0 with g2 [5, 15] -> takes g2.
    # p2 [0, 8]: tIoU 0.8 with g1, 0.2 with g2 -> takes g1. Both TP at 0.3: AP 100.
    # (Taking the first eligible instance would give p1 g1 and leave p2 a FP.)
    gt = gt_doc({"v": [(0, 10, "a"), (5, 15, "a")]})
    pred = pred_doc({"v": [(5, 15, "a", 0.9), (0, 8, "a", 0.8)]})
    assert detection_map(gt, pred, (0.3,))["mAP@0.3"] == pytest.approx(100.0)


def test_class_without_predictions_counts_as_zero():
    gt = gt_doc({"v": [(0, 10, "a"), (20, 30, "b")]})
    r = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9)]}), (0.5,))
    assert r["per_class"] == {"a": {0.5: pytest.approx(100.0)}, "b": {0.5: 0.0}}
    assert r["mAP@0.5"] == pytest.approx(50.0)


def test_predictions_for_unknown_videos_are_false_positives():
    # "ghost" is not in the ground truth: its 0.99 prediction of class a ranks first and is a FP
    # (precision 0, then 1/2 at recall 1: AP 50). The unknown label "zebra" is ignored.
    gt = gt_doc({"v": [(0, 10, "a")], "w": []})
    pred = pred_doc({"v": [(0, 10, "a", 0.5), (50, 60, "zebra", 0.99)], "w": [(0, 3, "a", 0.1)],
                     "ghost": [(0, 10, "a", 0.99)]})
    r = detection_map(gt, pred, (0.5,))
    assert r["mAP@0.5"] == pytest.approx(50.0)
    assert r["outside_predictions"] == 1
    assert r["ignored_predictions"] == {"unknown_video": 0, "unknown_label": 1}
    assert r["num_predictions"] == 3 and r["num_videos"] == 2


def test_ignore_unknown_videos_option_leaves_them_out():
    # The earlier behaviour: the ghost prediction is not scored; w's FP ranks below the TP.
    gt = gt_doc({"v": [(0, 10, "a")], "w": []})
    pred = pred_doc({"v": [(0, 10, "a", 0.5), (50, 60, "zebra", 0.99)], "w": [(0, 3, "a", 0.1)],
                     "ghost": [(0, 10, "a", 0.99), (0, 10, "zebra", 0.2)]})
    r = detection_map(gt, pred, (0.5,), ignore_unknown_videos=True)
    assert r["mAP@0.5"] == pytest.approx(100.0)
    assert r["outside_predictions"] == 2
    assert r["ignored_predictions"] == {"unknown_video": 2, "unknown_label": 1}
    assert r["num_predictions"] == 2


def test_prediction_on_video_without_that_class_is_false_positive():
    gt = gt_doc({"v": [(0, 10, "a")], "w": [(0, 10, "b")]})
    r = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.5)], "w": [(0, 10, "a", 0.9)]}), (0.5,))
    assert r["per_class"]["a"][0.5] == pytest.approx(50.0)


def test_duplicate_ground_truth_is_removed_by_default():
    # Same label, start and end within 1 ms of a kept instance: removed. 2 ms away, or another
    # label: kept. Shorter than 1 ms: removed.
    gt = gt_doc({"v": [(0, 10, "a"), (0, 10, "a"), (0.0004, 9.9997, "a"), (0.002, 10, "a"), (0, 10, "b"),
                       (20, 20, "a"), (30, 30.0005, "b")]})
    one = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9), (0.002, 10, "a", 0.8), (0, 10, "b", 0.7)]}), (0.5,))
    assert one["mAP@0.5"] == pytest.approx(100.0)
    assert (one["removed_duplicates"], one["removed_short"], one["num_ground_truth"]) == (2, 2, 3)
    table = format_map_table(one)
    assert "removed ground truth: 2 duplicates, 2 shorter than 0.001 s" in table


def test_duplicates_are_judged_against_kept_instances_only():
    # b is within 1 ms of a (removed); c is within 1 ms of b but not of a, and b was not kept: c stays.
    gt = gt_doc({"v": [(0, 10, "a"), (0.0008, 10, "a"), (0.0016, 10, "a")]})
    r = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9)]}), (0.5,))
    assert (r["removed_duplicates"], r["num_ground_truth"]) == (1, 2)
    assert r["mAP@0.5"] == pytest.approx(50.0)


def test_keep_duplicates_option_counts_them_separately():
    # The earlier behaviour: two identical instances need two predictions for full recall.
    gt = gt_doc({"v": [(0, 10, "a"), (0, 10, "a")]})
    one = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9)]}), (0.5,), keep_duplicates=True)
    two = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9), (0, 10, "a", 0.8)]}), (0.5,), keep_duplicates=True)
    assert one["mAP@0.5"] == pytest.approx(50.0)  # recall 1/2 at precision 1
    assert two["mAP@0.5"] == pytest.approx(100.0)
    assert one["removed_duplicates"] == one["removed_short"] == 0 and one["num_ground_truth"] == 2
    assert detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9)]}), (0.5,))["mAP@0.5"] == pytest.approx(100.0)


def test_only_short_ground_truth_is_an_error_naming_the_option():
    gt = gt_doc({"v": [(5, 5, "a")]})
    with pytest.raises(AnnotationError, match="--keep-duplicates"):
        detection_map(gt, pred_doc({}), (0.5,))
    assert detection_map(gt, pred_doc({}), (0.5,), keep_duplicates=True)["mAP@0.5"] == 0.0


@pytest.mark.parametrize("n", [2, 5, 17, 300])
def test_tied_scores_rank_as_numpy_argsort_reversed(n):
    # One TP among n predictions of equal score: AP = 1 / (its rank), the rank being its place in
    # np.argsort(scores)[::-1], numpy's unstable default sort reversed (OpenTAD and ActionFormer).
    gt = gt_doc({"v": [(0, 10, "a")]})
    for tp_index in (0, n // 2, n - 1):
        dets = [(50 + i, 51 + i, "a", 0.5) for i in range(n)]
        dets[tp_index] = (0, 10, "a", 0.5)
        rank = int(np.flatnonzero(np.argsort(np.full(n, 0.5))[::-1] == tp_index)[0]) + 1
        r = detection_map(gt, pred_doc({"v": dets}), (0.5,))
        assert r["mAP@0.5"] == pytest.approx(100.0 / rank)


def test_tied_tiou_takes_the_instance_numpy_argsort_reversed_puts_first():
    # p1 [1, 11] has tIoU 9/11 with both g1 [0, 10] and g2 [2, 12]; p2 [0, 10] reaches 0.7 only
    # with g1. If p1 takes g2, p2 takes g1 (AP 100); if p1 takes g1, p2 is a FP (AP 50).
    gt = gt_doc({"v": [(0, 10, "a"), (2, 12, "a")]})
    r = detection_map(gt, pred_doc({"v": [(1, 11, "a", 0.9), (0, 10, "a", 0.8)]}), (0.7,))
    first = int(np.argsort(np.array([9 / 11, 9 / 11]))[::-1][0])
    assert r["mAP@0.7"] == pytest.approx(100.0 if first == 1 else 50.0)


def test_subset_and_file_paths(tmp_path):
    gt = gt_doc({"v": [(0, 10, "a")]}, subset="Validation")
    gt["database"].update(gt_doc({"t": [(0, 10, "b")], "u": [(0, 10, "a")]}, subset="test")["database"])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    preds = {"v": [(0, 10, "a", 0.5)], "t": [(0, 10, "b", 1.0)], "u": [(0, 10, "a", 0.1)]}
    (tmp_path / "pred.json").write_text(json.dumps(pred_doc(preds)))
    r = detection_map(tmp_path / "gt.json", str(tmp_path / "pred.json"), (0.5,), subset="validation")
    assert r["num_videos"] == 1 and r["num_classes"] == 1 and r["mAP@0.5"] == pytest.approx(100.0)
    assert r["outside_predictions"] == 2 and r["ignored_predictions"] == {"unknown_video": 0, "unknown_label": 1}
    table = format_map_table(r)
    assert "0.50" in table and "100.00" in table
    assert "2 predictions for videos not in the evaluated ground truth: scored as false positives" in table
    assert "1 predictions with labels not in the ground truth: ignored" in table
    r = detection_map(tmp_path / "gt.json", tmp_path / "pred.json", (0.5,), subset="validation",
                      ignore_unknown_videos=True)
    assert "2 predictions for videos not in the evaluated ground truth: ignored" in format_map_table(r)


# ------------------------------------------------------------------ errors name file, video, field


@pytest.mark.parametrize("detection, field", [
    ({"segment": [5, 1], "label": "a", "score": 1.0}, "segment"),
    ({"segment": [0, float("nan")], "label": "a", "score": 1.0}, "segment"),
    ({"segment": [0], "label": "a", "score": 1.0}, "segment"),
    ({"segment": [0, 1], "label": "a", "score": "high"}, "score"),
    ({"segment": [0, 1], "label": "a", "score": float("nan")}, "score"),
    ({"segment": [0, 1], "label": 3, "score": 1.0}, "label"),
])
def test_bad_prediction_fields_are_named(tmp_path, detection, field):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps({"results": {"vid7": [detection]}}))
    with pytest.raises(BlockdropError) as err:
        detection_map(gt_doc({"vid7": [(0, 1, "a")]}), path)
    message = str(err.value)
    assert str(path) in message and "vid7" in message and field in message and "\n" not in message


def test_missing_results_and_unreadable_files(tmp_path):
    with pytest.raises(BlockdropError, match="'results'"):
        detection_map(gt_doc({"v": [(0, 1, "a")]}), {"database": {}})
    with pytest.raises(BlockdropError, match="nope.json"):
        detection_map(gt_doc({"v": [(0, 1, "a")]}), tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.json"):
        detection_map(tmp_path / "bad.json", pred_doc({}))


def test_ground_truth_errors():
    with pytest.raises(AnnotationError, match="'database'"):
        detection_map({"videos": {}}, pred_doc({}))
    with pytest.raises(AnnotationError, match=r"'v'.*annotations\[0\].segment"):
        detection_map(gt_doc({"v": [(3, 1, "a")]}), pred_doc({}))
    with pytest.raises(AnnotationError, match="subset 'train'"):
        detection_map(gt_doc({"v": [(0, 1, "a")]}), pred_doc({}), subset="train")


def test_parse_tiou():
    assert parse_tiou("0.3:0.7:0.1") == (0.3, 0.4, 0.5, 0.6, 0.7)
    assert parse_tiou("0.5:0.95:0.05") == ACTIVITYNET_TIOU and len(ACTIVITYNET_TIOU) == 10
    assert parse_tiou("0.5,0.75,0.95") == (0.5, 0.75, 0.95)
    assert parse_tiou("0.5") == (0.5,)
    for bad in ("0.3:0.7", "a,b", "0.7:0.3:0.1", "0.3:0.7:0", "0,0.5", "1.5", ""):
        with pytest.raises(BlockdropError, match="--tiou"):
            parse_tiou(bad, flag="--tiou")


# ------------------------------------------------------------------ ActionFormer's ANETdetection oracle


@pytest.fixture(scope="module")
def oracle():
    return actionformer_metrics()


LABELS = "abcdz"  # d: ground truth only; z: predictions only (a label no ground truth has)


def random_annotations(rng):
    """One video's instances on a half-second grid, with exact duplicates, duplicates within 1 ms,
    near-duplicates 2 ms away, a chain (b within 1 ms of a, c of b only), same-length twins shifted
    by a grid step (a prediction halfway has exactly equal tIoU with both) and instances < 1 ms."""
    anns = []
    for _ in range(int(rng.integers(0, 6))):
        s, length = float(rng.integers(0, 180)) / 2, float(rng.integers(1, 30)) / 2
        label = str(rng.choice(list("abcd")))
        copies = {0: [(0, 0)], 1: [(4e-4, -3e-4)], 2: [(2e-3, 0)], 3: [(8e-4, 0), (1.6e-3, 0)], 4: [(1, 1)],
                  5: [(0.5, 0.5), (1, 1)]}.get(int(rng.integers(0, 10)), [])
        for ds, de in [(0, 0), *copies]:
            anns.append({"segment": [s + ds, s + length + de], "label": label})
    if rng.random() < 0.3:
        s = float(rng.integers(0, 180)) / 2
        anns.append({"segment": [s, s + float(rng.choice([0.0, 5e-4]))], "label": str(rng.choice(list("abcd")))})
    return [anns[i] for i in rng.permutation(len(anns))]  # copies before or after their original


def random_detections(rng, anns, background, background_labels="aabcz"):
    """Hits and near misses around each instance (half of them on the grid, so tIoU ties), then
    background false positives of any label, some in videos without that class."""
    dets = []
    for ann in anns:
        for _ in range(int(rng.integers(0, 3))):
            if rng.random() < 0.5:
                s, e = np.asarray(ann["segment"]) + rng.integers(-2, 3, 2) / 2
            else:
                s, e = np.asarray(ann["segment"]) + rng.normal(0, 1.5, 2)
            label = ann["label"] if rng.random() < 0.8 else str(rng.choice(list("abcz")))
            dets.append({"segment": [float(s), float(max(s, e))], "label": label})
    for _ in range(background):
        s = float(rng.uniform(0, 100))
        label = str(rng.choice(list(background_labels)))
        dets.append({"segment": [s, s + float(rng.uniform(0.1, 20))], "label": label})
    return [d for d in dets if d["label"] != "d"]


def random_case(seed, large=False):
    """A ground truth with two subsets and videos without annotations, and predictions for every
    video (so for the other subset's too), for one not in the file, with many tied scores. ``large``:
    over 256 predictions of class a (numpy sorts arrays that long another way)."""
    rng = np.random.default_rng(seed)
    background, background_labels = ((80, 120), "aaaabcz") if large else ((0, 6), "aabcz")
    database, results = {}, {}
    for i in range(int(rng.integers(4, 9))):
        anns = random_annotations(rng)
        subset = "validation" if rng.random() < 0.6 else "test"
        database[f"v{i}"] = {"subset": subset, "duration": 110.0, "annotations": anns}
        results[f"v{i}"] = random_detections(rng, anns, int(rng.integers(*background)), background_labels)
    results["ghost"] = [{"segment": [1.0, 5.0], "label": "a"}, {"segment": [0.0, 3.0], "label": "z"}]
    for dets in results.values():
        for d in dets:  # scores on a coarse grid: many ties
            d["score"] = float(rng.integers(1, 6)) / 8 if rng.random() < 0.6 else float(rng.random())
    return {"database": database}, {"results": results}


def run_oracle(oracle, tmp_path, gt, pred, thresholds, subset):
    """The same inputs, none removed -> ANETdetection: (mAP (T,), per-class AP (T, K), class names).

    ANETdetection wants integer label ids and re-indexes those of the ground truth to 0..K-1,
    leaving other ids unchanged; ids from 100 up cannot collide with a re-indexed class.
    """
    import pandas as pd

    label_id = {c: 100 + i for i, c in enumerate(LABELS)}
    database = {v: {**info, "annotations": [{**a, "label_id": label_id[a["label"]]} for a in info["annotations"]]}
                for v, info in gt["database"].items()}
    (tmp_path / "oracle_gt.json").write_text(json.dumps({"database": database}))
    rows = [(v, d["segment"][0], d["segment"][1], label_id[d["label"]], d["score"])
            for v, dets in pred["results"].items() for d in dets]  # every prediction, in file order
    frame = pd.DataFrame(rows, columns=["video-id", "t-start", "t-end", "label", "score"])
    frame = frame.astype({"video-id": object, "t-start": float, "t-end": float, "label": int, "score": float})
    anet = oracle.ANETdetection(str(tmp_path / "oracle_gt.json"), split=subset,
                                tiou_thresholds=np.asarray(thresholds), num_workers=1)
    mean_ap, _, _ = anet.evaluate(frame, verbose=False)
    classes = [LABELS[i - 100] for i in sorted(anet.activity_index)]
    return mean_ap, anet.ap, classes


def oracle_removed(oracle, gt, subset):
    """How many instances of the subset ActionFormer's remove_duplicate_annotations drops."""
    removed = 0
    for info in gt["database"].values():
        if subset is None or info["subset"] == subset:
            tagged = [{**a, "label_id": a["label"]} for a in info["annotations"]]
            removed += len(tagged) - len(oracle.remove_duplicate_annotations(tagged))
    return removed


def compare_with_oracle(oracle, tmp_path, gt, pred, thresholds, subset) -> float:
    """Asserts agreement to 1e-6 (percent) at every threshold, per class and on average; returns the
    largest difference."""
    mean_ap, class_ap, classes = run_oracle(oracle, tmp_path, gt, pred, thresholds, subset)
    ours = detection_map(gt, pred, thresholds, subset=subset)
    assert list(ours["per_class"]) == classes
    assert ours["removed_duplicates"] + ours["removed_short"] == oracle_removed(oracle, gt, subset)
    ours_map = np.array([ours[f"mAP@{t:g}"] for t in thresholds])
    ours_class = np.array([[ours["per_class"][c][t] for c in classes] for t in thresholds])
    np.testing.assert_allclose(ours_map, 100 * mean_ap, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours_class, 100 * class_ap, rtol=0, atol=1e-6)
    assert ours["average_mAP"] == pytest.approx(100 * mean_ap.mean(), abs=1e-6)
    return float(max(np.abs(ours_map - 100 * mean_ap).max(), np.abs(ours_class - 100 * class_ap).max(),
                     abs(ours["average_mAP"] - 100 * mean_ap.mean())))


@pytest.mark.parametrize("seed", range(24))
def test_matches_actionformer_anetdetection(oracle, tmp_path, seed):
    gt, pred = random_case(seed)
    for tiou in ("0.3:0.7:0.1", "0.5:0.95:0.05", "0.1,0.5,0.9"):
        for subset in (None, "validation"):
            in_subset = [info for info in gt["database"].values() if subset is None or info["subset"] == subset]
            if sum(len(info["annotations"]) for info in in_subset) == oracle_removed(oracle, gt, subset):
                with pytest.raises(AnnotationError):  # the oracle has no class to average over
                    detection_map(gt, pred, parse_tiou(tiou), subset=subset)
                continue
            compare_with_oracle(oracle, tmp_path, gt, pred, parse_tiou(tiou), subset)


@pytest.mark.parametrize("seed", range(2))
def test_matches_actionformer_on_hundreds_of_predictions_per_class(oracle, tmp_path, seed):
    gt, pred = random_case(seed, large=True)
    assert sum(d["label"] == "a" for dets in pred["results"].values() for d in dets) > 256
    compare_with_oracle(oracle, tmp_path, gt, pred, THUMOS_TIOU, None)


@pytest.mark.parametrize("seed", range(4))
def test_ignore_unknown_videos_matches_oracle_given_only_subset_predictions(oracle, tmp_path, seed):
    # The option scores exactly what the oracle scores when given only the subset's videos.
    gt, pred = random_case(seed)
    in_subset = {v for v, info in gt["database"].items() if info["subset"] == "validation"}
    only = {"results": {v: dets for v, dets in pred["results"].items() if v in in_subset}}
    ours = detection_map(gt, pred, THUMOS_TIOU, subset="validation", ignore_unknown_videos=True)
    theirs = detection_map(gt, only, THUMOS_TIOU, subset="validation")
    assert ours["average_mAP"] == theirs["average_mAP"] and ours["per_class"] == theirs["per_class"]
    compare_with_oracle(oracle, tmp_path, gt, only, THUMOS_TIOU, "validation")


def test_cli_map_prints_table_and_names_bad_flag(tmp_path, capsys):
    from blockdrop.cli import main

    (tmp_path / "gt.json").write_text(json.dumps(gt_doc({"v": [(0, 10, "a")]})))
    (tmp_path / "pred.json").write_text(json.dumps(pred_doc({"v": [(0, 10, "a", 0.9)]})))
    assert main(["map", str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), "--tiou", "0.5:0.95:0.05"]) == 0
    assert "average" in capsys.readouterr().out
    assert main(["map", str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), "--tiou", "0.5:x"]) == 2
    assert "--tiou" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    ([], "50.00"),  # one instance left; the ghost's FP ranks first
    (["--keep-duplicates"], "25.00"),  # two instances: precision 1/2 at recall 1/2
    (["--ignore-unknown-videos"], "100.00"),
    (["--keep-duplicates", "--ignore-unknown-videos"], "50.00"),
])
def test_cli_map_options(tmp_path, capsys, flags, expected):
    from blockdrop.cli import main

    (tmp_path / "gt.json").write_text(json.dumps(gt_doc({"v": [(0, 10, "a"), (0, 10, "a")]})))
    (tmp_path / "pred.json").write_text(json.dumps(pred_doc({"v": [(0, 10, "a", 0.5)], "ghost": [(0, 10, "a", 0.9)]})))
    assert main(["map", str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), "--tiou", "0.5", *flags]) == 0
    average = [line for line in capsys.readouterr().out.splitlines() if line.startswith("average")]
    assert average[0].split() == ["average", expected]
