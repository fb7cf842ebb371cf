"""ActivityNet mAP: hand-computed golden cases, input validation, and the ActionFormer oracle."""

import importlib.util
import json

import numpy as np
import pytest

from blockdrop.core.errors import AnnotationError, BlockdropError
from blockdrop.tad.evaluation import ACTIVITYNET_TIOU, THUMOS_TIOU, detection_map, format_map_table, parse_tiou


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


def test_unknown_videos_and_labels_are_ignored_and_counted():
    gt = gt_doc({"v": [(0, 10, "a")], "w": []})
    base = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.5)], "w": [(0, 3, "a", 0.1)]}), (0.5,))
    extra = pred_doc({"v": [(0, 10, "a", 0.5), (50, 60, "zebra", 0.99)], "w": [(0, 3, "a", 0.1)],
                      "ghost": [(0, 10, "a", 0.99)]})
    r = detection_map(gt, extra, (0.5,))
    assert r["mAP@0.5"] == base["mAP@0.5"] == pytest.approx(100.0)  # w's FP ranks below the TP
    assert r["ignored_predictions"] == {"unknown_video": 1, "unknown_label": 1}
    assert r["num_predictions"] == 2 and r["num_videos"] == 2


def test_duplicate_ground_truth_instances_are_separate():
    gt = gt_doc({"v": [(0, 10, "a"), (0, 10, "a")]})
    one = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9)]}), (0.5,))
    two = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.9), (0, 10, "a", 0.8)]}), (0.5,))
    assert one["mAP@0.5"] == pytest.approx(50.0)  # recall 1/2 at precision 1
    assert two["mAP@0.5"] == pytest.approx(100.0)


def test_tied_scores_keep_input_order():
    # Equal scores: the FP listed first is ranked first -> precision 0 then 1/2 at recall 1: AP 50.
    gt = gt_doc({"v": [(0, 10, "a")]})
    fp_first = detection_map(gt, pred_doc({"v": [(50, 60, "a", 0.5), (0, 10, "a", 0.5)]}), (0.5,))
    tp_first = detection_map(gt, pred_doc({"v": [(0, 10, "a", 0.5), (50, 60, "a", 0.5)]}), (0.5,))
    assert fp_first["mAP@0.5"] == pytest.approx(50.0)
    assert tp_first["mAP@0.5"] == pytest.approx(100.0)


def test_subset_and_file_paths(tmp_path):
    gt = gt_doc({"v": [(0, 10, "a")]}, subset="Validation")
    gt["database"].update(gt_doc({"t": [(0, 10, "b")]}, subset="test")["database"])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred_doc({"v": [(0, 10, "a", 1.0)], "t": [(0, 10, "b", 1.0)]})))
    r = detection_map(tmp_path / "gt.json", str(tmp_path / "pred.json"), (0.5,), subset="validation")
    assert r["num_videos"] == 1 and r["num_classes"] == 1 and r["mAP@0.5"] == pytest.approx(100.0)
    assert r["ignored_predictions"]["unknown_video"] == 1
    table = format_map_table(r)
    assert "0.50" in table and "100.00" in table and "ignored" in table


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
    """actionformer/utils/metrics.py loaded by path (its package __init__ imports torchvision)."""
    pytest.importorskip("pandas")
    pytest.importorskip("joblib")
    spec = importlib.util.find_spec("actionformer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("actionformer is not installed")
    path = spec.submodule_search_locations[0] + "/utils/metrics.py"
    module_spec = importlib.util.spec_from_file_location("_actionformer_metrics", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def random_case(seed):
    """Ground truth with empty videos, exact duplicates and two subsets; predictions with tied
    scores, jittered true positives, unknown videos and labels, and a class with no predictions."""
    rng = np.random.default_rng(seed)
    database, results = {}, {}
    for i in range(int(rng.integers(3, 9))):
        anns = []
        for _ in range(int(rng.integers(0, 6))):
            s = float(rng.uniform(0, 90))
            anns.append({"segment": [s, s + float(rng.uniform(0.5, 15))], "label": str(rng.choice(list("abcd")))})
        if anns and rng.random() < 0.4:
            anns.append(dict(anns[0]))  # an exact duplicate instance
        database[f"v{i}"] = {"subset": "validation" if rng.random() < 0.7 else "test", "duration": 110.0,
                             "annotations": anns}
        dets = []
        for ann in anns:  # near-misses and hits around the truth
            for _ in range(int(rng.integers(0, 3))):
                s, e = np.asarray(ann["segment"]) + rng.normal(0, 1.5, 2)
                label = ann["label"] if rng.random() < 0.8 else str(rng.choice(list("abcz")))
                dets.append({"segment": [float(s), float(max(s, e))], "label": label})
        for _ in range(int(rng.integers(0, 6))):  # background false positives
            s = float(rng.uniform(0, 100))
            dets.append({"segment": [s, s + float(rng.uniform(0.1, 20))], "label": str(rng.choice(list("abcz")))})
        results[f"v{i}"] = [d for d in dets if d["label"] != "d"]  # class d: ground truth only
    results["ghost"] = [{"segment": [1.0, 5.0], "label": "a"}]  # a video not in the ground truth
    for dets in results.values():
        for d in dets:  # scores on a coarse grid: many ties
            d["score"] = float(rng.integers(1, 8)) / 8 if rng.random() < 0.5 else float(rng.random())
    return {"database": database}, {"results": results}


def run_oracle(oracle, tmp_path, gt, pred, thresholds, subset):
    """Our inputs -> ANETdetection; returns (mAP (T,), per-class AP (T, K), class names)."""
    import pandas as pd

    in_subset = {v for v, info in gt["database"].items() if subset is None or info["subset"] == subset}
    present = sorted({a["label"] for v in in_subset for a in gt["database"][v]["annotations"]})
    # Label ids 0..K-1 for classes present in the evaluated subset, so that ANETdetection's label
    # re-indexing is the identity; other labels get ids it never looks up (its re-indexing leaves an
    # unknown id unchanged, where it could collide with a re-indexed class).
    label_id = {c: i for i, c in enumerate(present)}
    label_id.update({c: 1000 + i for i, c in enumerate("abcdz") if c not in label_id})
    database = {v: {**info, "annotations": [{**a, "label_id": label_id[a["label"]]} for a in info["annotations"]]}
                for v, info in gt["database"].items()}
    (tmp_path / "oracle_gt.json").write_text(json.dumps({"database": database}))

    rows = [(v, d["segment"][0], d["segment"][1], label_id[d["label"]], d["score"])
            for v, dets in pred["results"].items() for d in dets]
    rows = [r for r in rows if r[0] in in_subset]  # ANETdetection counts unknown videos as FPs; we ignore them
    scores = np.array([r[4] for r in rows])
    # Its argsort()[::-1] orders ties unspecifiedly; give it our stable order as distinct scores.
    rank = np.empty(len(rows)); rank[np.argsort(-scores, kind="stable")] = np.arange(len(rows))
    frame = pd.DataFrame({"video-id": [r[0] for r in rows], "t-start": [r[1] for r in rows],
                          "t-end": [r[2] for r in rows], "label": [r[3] for r in rows], "score": -rank})
    frame = frame.astype({"video-id": object, "t-start": float, "t-end": float, "label": int, "score": float})
    anet = oracle.ANETdetection(str(tmp_path / "oracle_gt.json"), split=subset,
                                tiou_thresholds=np.asarray(thresholds), num_workers=1)
    mean_ap, _, _ = anet.evaluate(frame, verbose=False)
    return mean_ap, anet.ap, present


def dedupe_like_actionformer(oracle, gt):
    """ANETdetection drops duplicate (and < 1e-3 s) instances; we keep duplicates, so our side of
    the oracle comparison gets the same instances it keeps, via its own function."""
    database = {}
    for v, info in gt["database"].items():
        tagged = [{**a, "label_id": a["label"]} for a in info["annotations"]]
        kept = oracle.remove_duplicate_annotations(tagged)
        database[v] = {**info, "annotations": [{"segment": a["segment"], "label": a["label"]} for a in kept]}
    return {"database": database}


@pytest.mark.parametrize("seed", range(20))
def test_matches_actionformer_anetdetection(oracle, tmp_path, seed):
    gt, pred = random_case(seed)
    gt = dedupe_like_actionformer(oracle, gt)
    for tiou in ("0.3:0.7:0.1", "0.5:0.95:0.05", "0.1,0.5,0.9"):
        thresholds = parse_tiou(tiou)
        for subset in (None, "validation"):
            in_subset = [v for v, i in gt["database"].items() if subset is None or i["subset"] == subset]
            if not any(gt["database"][v]["annotations"] for v in in_subset):
                continue
            ours = detection_map(gt, pred, thresholds, subset=subset)
            mean_ap, class_ap, present = run_oracle(oracle, tmp_path, gt, pred, thresholds, subset)
            assert list(ours["per_class"]) == present
            ours_map = np.array([ours[f"mAP@{t:g}"] for t in thresholds])
            ours_class = np.array([[ours["per_class"][c][t] for c in present] for t in thresholds])
            np.testing.assert_allclose(ours_map, 100 * mean_ap, rtol=0, atol=1e-6)
            np.testing.assert_allclose(ours_class, 100 * class_ap, rtol=0, atol=1e-6)
            assert ours["average_mAP"] == pytest.approx(100 * mean_ap.mean(), abs=1e-6)


def test_cli_map_prints_table_and_names_bad_flag(tmp_path, capsys):
    from blockdrop.cli import main

    (tmp_path / "gt.json").write_text(json.dumps(gt_doc({"v": [(0, 10, "a")]})))
    (tmp_path / "pred.json").write_text(json.dumps(pred_doc({"v": [(0, 10, "a", 0.9)]})))
    assert main(["map", str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), "--tiou", "0.5:0.95:0.05"]) == 0
    assert "average" in capsys.readouterr().out
    assert main(["map", str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), "--tiou", "0.5:x"]) == 2
    assert "--tiou" in capsys.readouterr().err
