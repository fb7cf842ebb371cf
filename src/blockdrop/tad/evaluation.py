"""Temporal action detection mAP, computed the way OpenTAD and ActionFormer compute it.

The paper's numbers, OpenTAD's model zoo and ActionFormer's all come from one algorithm
(OpenTAD ``opentad/evaluations/mAP.py``, after ActionFormer ``libs/utils/metrics.py``, itself
adapted from ActivityNet's ``eval_detection.py``). By default ``detection_map`` reproduces it,
ties included:

1. Ground truth: the videos of the subset. Within a video, an instance shorter than 1 ms, or
   one whose label matches and whose start and end lie within 1 ms of an instance kept before
   it (file order), is removed (ActionFormer's ``remove_duplicate_annotations``).
2. Classes: the labels of the remaining instances. Predictions with another label are ignored.
3. Per class, predictions (file order) are ranked by ``np.argsort(scores)[::-1]``, numpy's
   default, unstable sort reversed: equal scores come out in whatever order it gives.
4. In that order, a prediction takes the first not yet matched instance of its video and class
   in ``np.argsort(tious)[::-1]`` order (highest tIoU first, ties as that sort gives) whose
   tIoU >= the threshold; otherwise, or when its video has no instance of the class (a video
   without annotations, of another subset, or not in the file), it is a false positive.
5. AP is the VOC-style integral of the monotone precision envelope over the recall changes;
   mAP averages AP over the classes (a class without predictions has AP 0), then over the
   thresholds. Values are returned in percent.

Options keep the earlier behaviour: ``keep_duplicates`` skips step 1's removal and
``ignore_unknown_videos`` leaves out predictions for videos outside the evaluated ground truth.
See docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from blockdrop.core.errors import AnnotationError, BlockdropError, DataError
from blockdrop.tad.segments import tiou

THUMOS_TIOU = (0.3, 0.4, 0.5, 0.6, 0.7)
ACTIVITYNET_TIOU = tuple(round(0.5 + 0.05 * i, 10) for i in range(10))
DUPLICATE_TOLERANCE = 1e-3  # seconds: ActionFormer's remove_duplicate_annotations(tol=1e-3)


def detection_map(
    ground_truth: Mapping | str | os.PathLike,
    predictions: Mapping | str | os.PathLike,
    tiou_thresholds: Sequence[float] = THUMOS_TIOU,
    *,
    subset: str | None = None,
    keep_duplicates: bool = False,
    ignore_unknown_videos: bool = False,
) -> dict:
    """mAP of ``predictions`` against ``ground_truth`` (dicts or JSON paths), in percent.

    Returns ``{"mAP@<t>": ..., "average_mAP": ..., "per_class": {label: {t: ap}},
    "tiou_thresholds": [...], "num_videos", "num_classes", "num_ground_truth" (evaluated),
    "removed_duplicates", "removed_short", "num_predictions" (scored), "outside_predictions",
    "ignored_predictions": {"unknown_video": n, "unknown_label": m}}`` (docs/evaluation.md).
    """
    thresholds = _check_thresholds(tiou_thresholds)
    gt_name, gt_doc = _read_json(ground_truth, "ground truth", AnnotationError)
    videos, gt = _parse_ground_truth(gt_doc, gt_name, subset)
    pred_name, pred_doc = _read_json(predictions, "predictions", DataError)
    preds = _parse_predictions(pred_doc, pred_name)

    # Integer codes: videos outside the ground truth get codes >= len(videos).
    video_index = {v: i for i, v in enumerate(videos)}
    preds["code"] = np.array([video_index.setdefault(v, len(video_index)) for v in preds["video"]], np.int64)
    gt["code"] = np.array([video_index[v] for v in gt["video"]], dtype=np.int64)
    short, duplicate = np.zeros((2, len(gt["code"])), dtype=bool)
    if not keep_duplicates:
        short, duplicate = reference_removals(gt["code"], np.asarray(gt["label"]), gt["segment"])
        gt = _kept_ground_truth(gt, ~(short | duplicate), gt_name, subset)
    classes = sorted(set(gt["label"]))
    class_index = {c: i for i, c in enumerate(classes)}
    gt["class"] = np.array([class_index[c] for c in gt["label"]], dtype=np.int64)
    preds["class"] = np.array([class_index.get(c, -1) for c in preds["label"]], dtype=np.int64)  # -1: unknown

    outside = preds["code"] >= len(videos)
    skipped = outside & ignore_unknown_videos
    scored = (preds["class"] >= 0) & ~skipped
    result = _mean_over_classes(_per_class_ap(classes, gt, preds, scored, thresholds), thresholds)
    result.update(
        num_videos=len(videos),
        num_classes=len(classes),
        num_ground_truth=len(gt["class"]),
        removed_duplicates=int(duplicate.sum()),
        removed_short=int(short.sum()),
        num_predictions=int(scored.sum()),
        outside_predictions=int(outside.sum()),
        ignored_predictions={
            "unknown_video": int(skipped.sum()),
            "unknown_label": int((~skipped & (preds["class"] < 0)).sum()),
        },
    )
    return result


def _per_class_ap(classes: list[str], gt: dict, preds: dict, scored: np.ndarray, thresholds) -> dict:
    """{label: {threshold: AP in percent}} from the coded columns; only ``scored`` predictions count."""
    per_class = {}
    for k, label in enumerate(classes):
        g, p = gt["class"] == k, scored & (preds["class"] == k)  # both keep file order
        ap = class_average_precision(
            gt["code"][g], gt["segment"][g], preds["code"][p], preds["segment"][p], preds["score"][p], thresholds
        )  # (T,)
        per_class[label] = {t: 100.0 * float(a) for t, a in zip(thresholds, ap)}
    return per_class


def _mean_over_classes(per_class: dict, thresholds: tuple[float, ...]) -> dict:
    result = {f"mAP@{t:g}": float(np.mean([ap[t] for ap in per_class.values()])) for t in thresholds}
    result["average_mAP"] = float(np.mean([result[f"mAP@{t:g}"] for t in thresholds]))
    result.update(per_class=per_class, tiou_thresholds=list(thresholds))
    return result


# ---------------------------------------------------------------- duplicate ground truth


def reference_removals(video, label, segments, tol: float = DUPLICATE_TOLERANCE):
    """The instances ActionFormer's ``remove_duplicate_annotations`` drops: (short (G,), duplicate (G,)).

    short: end - start < tol. duplicate: not short, and an earlier instance (file order) of the same
    video and label that was kept has start and end within tol of its own. video (G,) int codes,
    label (G,), segments (G, 2).
    """
    segments = np.asarray(segments, dtype=np.float64)
    short = segments[:, 1] - segments[:, 0] < tol
    duplicate = np.zeros(len(short), dtype=bool)
    _, label_code = np.unique(label, return_inverse=True)
    group = np.asarray(video, dtype=np.int64) * (int(label_code.max(initial=0)) + 1) + label_code
    order = np.lexsort((segments[:, 0], group))  # by group, then start
    g, start = group[order], segments[order, 0]
    # Two starts within tol imply two neighbours (in this order) within tol: only those groups can
    # hold a duplicate, and only they need the pairwise, in-order rule.
    near = (g[1:] == g[:-1]) & (start[1:] - start[:-1] <= tol)
    bounds = np.flatnonzero(g[1:] != g[:-1]) + 1  # where each group after the first begins
    begin, end = np.r_[0, bounds], np.r_[bounds, len(g)]
    for j in np.unique(np.searchsorted(bounds, np.flatnonzero(near), side="right")):
        rows = np.sort(order[begin[j] : end[j]])  # the group in file order
        duplicate[rows] = _in_order_duplicates(segments[rows], short[rows], tol)
    return short, duplicate


def _in_order_duplicates(segments: np.ndarray, short: np.ndarray, tol: float) -> np.ndarray:
    """One video and label, in file order: (n,) bool, a duplicate of an instance kept before it."""
    close = (np.abs(segments[:, None, 0] - segments[None, :, 0]) <= tol) & (
        np.abs(segments[:, None, 1] - segments[None, :, 1]) <= tol
    )  # (n, n)
    kept = np.zeros(len(short), dtype=bool)
    for i in range(len(short)):
        kept[i] = not short[i] and not (close[i, :i] & kept[:i]).any()
    return ~kept & ~short


def _kept_ground_truth(gt: dict, keep: np.ndarray, name: str, subset: str | None) -> dict:
    """The ground-truth columns of the kept instances; an error if none is left."""
    if not keep.any():
        scope = f"subset {subset!r}" if subset is not None else "the file"
        raise AnnotationError(
            f"{name}: all {len(keep)} ground-truth instances in {scope} are duplicates or shorter than "
            f"{DUPLICATE_TOLERANCE:g} s (keep_duplicates=True / --keep-duplicates keeps them)"
        )
    rows = np.flatnonzero(keep)
    return {key: column[keep] if isinstance(column, np.ndarray) else [column[i] for i in rows]
            for key, column in gt.items()}


# ---------------------------------------------------------------- matching and AP


def class_average_precision(gt_video, gt_segments, pred_video, pred_segments, pred_scores, thresholds):
    """AP of one class at each threshold, as fractions: array (T,).

    gt_video (G,) int, gt_segments (G, 2); pred_video (P,) int, pred_segments (P, 2), pred_scores (P,).
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    num_gt, num_pred = len(gt_video), len(pred_video)
    if num_gt == 0 or num_pred == 0:
        return np.zeros(len(thresholds))
    order = descending(np.asarray(pred_scores, dtype=np.float64))  # ties: as OpenTAD/ActionFormer
    pred_video, pred_segments = np.asarray(pred_video)[order], np.asarray(pred_segments, np.float64)[order]
    gt_segments = np.asarray(gt_segments, dtype=np.float64)

    gt_rows = _rows_by_video(np.asarray(gt_video))  # GT rows in file order
    pred_rows = np.flatnonzero(np.isin(pred_video, list(gt_rows)))  # others: false positives
    is_tp = np.zeros((len(thresholds), num_pred), dtype=bool)  # columns in score order
    for video, rows in _rows_by_video(pred_video[pred_rows]).items():
        p_rows = pred_rows[rows]  # in score order
        overlap = tiou(pred_segments[p_rows], gt_segments[gt_rows[video]])  # (P_v, G_v)
        is_tp[:, p_rows] = greedy_match(overlap, thresholds)
    tp = np.cumsum(is_tp, axis=1)
    precision = tp / np.arange(1, num_pred + 1)
    recall = tp / num_gt
    return interpolated_ap(precision, recall)


def descending(values: np.ndarray) -> np.ndarray:
    """Indices that sort the last axis from high to low exactly as OpenTAD and ActionFormer do:
    ``argsort()[::-1]``, numpy's default (unstable) sort reversed, so ties take its order."""
    return np.argsort(values, axis=-1)[..., ::-1]


def _rows_by_video(video: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices of each video id, each list in ascending row order."""
    order = np.argsort(video, kind="stable")
    ids, starts = np.unique(video[order], return_index=True)
    return dict(zip(ids.tolist(), np.split(order, starts[1:])))


def greedy_match(tiou: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """ActivityNet matching in one video: (P, G) tIoU, rows in score order -> (T, P) bool TP.

    Each prediction takes the first unmatched instance with tIoU >= threshold in its
    ``descending(tiou)`` order: the highest tIoU, equal tIoU in the order that sort gives (as
    OpenTAD and ActionFormer). The thresholds are matched independently.
    """
    eligible = tiou[None] >= thresholds[:, None, None]  # (T, P, G)
    preference = descending(tiou)  # (P, G): each prediction's instances, best first
    matched = np.zeros((len(thresholds), tiou.shape[1]), dtype=bool)  # (T, G)
    is_tp = np.zeros((len(thresholds), tiou.shape[0]), dtype=bool)  # (T, P)
    rows = np.arange(len(thresholds))
    for p in np.flatnonzero(eligible.any(axis=(0, 2))):  # the others are FP at every threshold
        free = (eligible[:, p] & ~matched)[:, preference[p]]  # (T, G), columns best first
        first = free.argmax(axis=1)  # (T,)
        hit = free[rows, first]
        is_tp[hit, p] = True
        matched[rows[hit], preference[p][first[hit]]] = True
    return is_tp


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """VOC-style AP for each row of (T, P) precision/recall curves: (T,).

    The precision envelope is max precision at this or any later point; AP sums the envelope
    times each recall increase (recall starts at 0; points without a recall change add 0).
    """
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    recall_step = np.diff(recall, axis=1, prepend=0.0)
    return np.sum(recall_step * envelope, axis=1)


def parse_tiou(text: str, flag: str = "--tiou") -> tuple[float, ...]:
    """``"0.3:0.7:0.1"`` (inclusive stop) or ``"0.5,0.75,0.95"`` -> thresholds, rounded to 10 places."""
    text = str(text).strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1  # inclusive, robust to rounding
            values = tuple(round(start + i * step, 10) for i in range(count))
        else:
            values = tuple(round(float(x), 10) for x in text.split(","))
    except ValueError:
        raise BlockdropError(
            f"{flag}: expected START:STOP:STEP (inclusive, STEP > 0) or comma-separated values, got {text!r}"
        ) from None
    return _check_thresholds(values, flag)


def format_map_table(result: Mapping) -> str:
    """A small text table of a ``detection_map`` result, with what was removed, ignored or outside."""
    lines = ["tIoU    mAP (%)"]
    lines += [f"{t:<7.2f} {result[f'mAP@{t:g}']:7.2f}" for t in result["tiou_thresholds"]]
    lines.append(f"{'average':<7} {result['average_mAP']:7.2f}")
    lines.append(
        f"{result['num_videos']} videos, {result['num_classes']} classes, "
        f"{result['num_ground_truth']} ground-truth instances, {result['num_predictions']} predictions scored"
    )
    duplicates, short = result.get("removed_duplicates", 0), result.get("removed_short", 0)
    if duplicates or short:
        lines.append(f"removed ground truth: {duplicates} duplicates, {short} shorter than {DUPLICATE_TOLERANCE:g} s")
    ignored = result["ignored_predictions"]
    outside = result.get("outside_predictions", ignored["unknown_video"])
    if outside:
        fate = "ignored" if ignored["unknown_video"] else "scored as false positives"
        lines.append(f"{outside} predictions for videos not in the evaluated ground truth: {fate}")
    if ignored["unknown_label"]:
        lines.append(f"{ignored['unknown_label']} predictions with labels not in the ground truth: ignored")
    return "\n".join(lines)


# ---------------------------------------------------------------- reading and validation


def _check_thresholds(values, flag: str = "tiou_thresholds") -> tuple[float, ...]:
    values = tuple(float(t) for t in values)
    if not values or any(not 0 < t <= 1 for t in values):
        raise BlockdropError(f"{flag}: tIoU thresholds must be in (0, 1], got {list(values)}")
    if len({f"{t:g}" for t in values}) != len(values):
        raise BlockdropError(f"{flag}: repeated tIoU threshold in {list(values)}")
    return values


def _read_json(source, what: str, error: type[BlockdropError]) -> tuple[str, Mapping]:
    if isinstance(source, Mapping):
        return f"<{what} dict>", source
    if not isinstance(source, (str, os.PathLike)):
        raise error(f"{what}: expected a dict or a JSON file path, got {type(source).__name__}")
    path = Path(source)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as err:
        raise error(f"{path}: cannot read {what} file ({err.strerror or err})") from None
    except ValueError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, Mapping):
        raise error(f"{path}: expected a JSON object at the top level")
    return str(path), doc


def _segment(value, where: str, error: type[BlockdropError]) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and _is_number(value[0]) and _is_number(value[1])
    if not ok or not value[0] <= value[1]:
        raise error(f"{where}.segment: expected [start, end] with finite numbers and start <= end, got {value!r}")
    return float(value[0]), float(value[1])


def _is_number(x) -> bool:
    """A finite int or float (numpy scalars included), not a bool or a numeric string."""
    if type(x) is float or type(x) is int:  # the JSON fast path
        return math.isfinite(x)
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_ground_truth(doc: Mapping, name: str, subset: str | None) -> tuple[list[str], dict]:
    """-> (video ids in the subset, columns {"video", "segment" (G, 2), "label"})."""
    database = doc.get("database")
    if not isinstance(database, Mapping):
        raise AnnotationError(f"{name}: missing 'database' object (video id -> {{subset, annotations}})")
    videos, columns = [], {"video": [], "segment": [], "label": []}
    for vid, info in database.items():
        where = f"{name}: database[{vid!r}]"
        if not isinstance(info, Mapping):
            raise AnnotationError(f"{where}: expected an object")
        if subset is not None and str(info.get("subset", "")).casefold() != subset.casefold():
            continue
        annotations = info.get("annotations", [])
        if not isinstance(annotations, list):
            raise AnnotationError(f"{where}.annotations: expected a list")
        videos.append(vid)
        for i, ann in enumerate(annotations):
            if not isinstance(ann, Mapping) or not isinstance(ann.get("label"), str):
                raise AnnotationError(f"{where}.annotations[{i}].label: expected a string label")
            columns["video"].append(vid)
            columns["segment"].append(_segment(ann.get("segment"), f"{where}.annotations[{i}]", AnnotationError))
            columns["label"].append(ann["label"])
    if not columns["label"]:
        found = sorted({str(v.get("subset")) for v in database.values() if isinstance(v, Mapping)})
        scope = f"subset {subset!r} (subsets present: {found})" if subset is not None else "the file"
        raise AnnotationError(f"{name}: no ground-truth instances in {scope}")
    columns["segment"] = np.asarray(columns["segment"], dtype=np.float64).reshape(-1, 2)
    return videos, columns


def _parse_predictions(doc: Mapping, name: str) -> dict:
    """-> columns {"video", "segment" (P, 2), "label", "score" (P,)}, every entry validated."""
    results = doc.get("results")
    if not isinstance(results, Mapping):
        raise DataError(f"{name}: missing 'results' object (video id -> list of detections)")
    columns = {"video": [], "segment": [], "label": [], "score": []}
    for vid, detections in results.items():
        where = f"{name}: results[{vid!r}]"
        if not isinstance(detections, list):
            raise DataError(f"{where}: expected a list of detections")
        for i, det in enumerate(detections):
            if not isinstance(det, Mapping):
                raise DataError(f"{where}[{i}]: expected an object with segment, label, score")
            if not isinstance(det.get("label"), str):
                raise DataError(f"{where}[{i}].label: expected a class name string, got {det.get('label')!r}")
            if not _is_number(det.get("score")):
                raise DataError(f"{where}[{i}].score: expected a finite number, got {det.get('score')!r}")
            columns["video"].append(vid)
            columns["segment"].append(_segment(det.get("segment"), f"{where}[{i}]", DataError))
            columns["label"].append(det["label"])
            columns["score"].append(float(det["score"]))
    columns["segment"] = np.asarray(columns["segment"], dtype=np.float64).reshape(-1, 2)
    columns["score"] = np.asarray(columns["score"], dtype=np.float64)
    return columns
