"""Post-processing: NMS by hand, soft-NMS against a textbook loop and ActionFormer's batched_nms."""

import json
import math

import numpy as np
import pytest
import torch

from blockdrop.tad.evaluation import detection_map
from blockdrop.tad.postprocess import (
    PostprocessConfig,
    detections_to_results,
    input_steps_to_seconds,
    merge_windows,
    nms,
    postprocess_video,
    save_results,
    soft_nms,
)

from conftest import actionformer_module


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------ hard NMS, by hand


def test_nms_hand_cases():
    segs = t([[1, 11], [0, 10], [20, 30], [0, 5]])
    scores, labels = t([0.8, 0.9, 0.7, 0.6]), t([0, 0, 0, 0], torch.long)
    # [1, 11] vs [0, 10]: IoU 9/11 > 0.5 -> dropped; [0, 5] vs [0, 10]: IoU exactly 0.5 -> kept.
    kept, kept_scores, _ = nms(segs, scores, labels, 0.5)
    assert kept.tolist() == [[0, 10], [20, 30], [0, 5]]
    assert kept_scores.tolist() == [0.9, 0.7, 0.6]
    # A different class is never suppressed, unless class-agnostic.
    labels = t([1, 0, 0, 0], torch.long)
    assert nms(segs, scores, labels, 0.5)[0].tolist() == [[0, 10], [1, 11], [20, 30], [0, 5]]
    assert nms(segs, scores, labels, 0.5, class_agnostic=True)[0].tolist() == [[0, 10], [20, 30], [0, 5]]
    assert nms(segs, scores, labels, 0.5, max_segments=2)[0].tolist() == [[0, 10], [1, 11]]


def test_nms_and_soft_nms_empty_inputs():
    empty = (torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert nms(*empty, 0.5)[0].shape == (0, 2)
    assert soft_nms(*empty)[0].shape == (0, 2)
    below = soft_nms(t([[0, 1]]), t([0.0005]), t([0], torch.long))  # under min_score
    assert below[0].shape == (0, 2)


# ------------------------------------------------------------------ soft-NMS vs a textbook loop


def textbook_soft_nms(segs, scores, labels, sigma, min_score, max_segments, voting):
    """Plain-Python Gaussian soft-NMS per class with score voting, written independently."""
    def iou(a, b):
        inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        union = (a[1] - a[0]) + (b[1] - b[0]) - inter
        return inter / union if union > 0 else 0.0

    live = {i: s for i, s in enumerate(scores) if s > min_score}
    candidates = list(live)
    out = []
    while live and len(out) < max_segments:
        best = max(live, key=lambda i: (live[i], -i))
        out.append((best, live.pop(best)))
        for j in list(live):
            if labels[j] == labels[best]:
                live[j] *= math.exp(-iou(segs[best], segs[j]) ** 2 / sigma)
                if live[j] <= min_score:
                    del live[j]
    result = []
    for i, score in out:
        seg = segs[i]
        if voting > 0:
            votes = [(scores[j] * iou(segs[i], segs[j]), segs[j]) for j in candidates
                     if labels[j] == labels[i] and iou(segs[i], segs[j]) >= voting]
            total = sum(w for w, _ in votes)
            seg = [sum(w * s[0] for w, s in votes) / total, sum(w * s[1] for w, s in votes) / total]
        result.append((seg, score, labels[i]))
    return result


def random_detections(seed, n=60, classes=3):
    rng = np.random.default_rng(seed)
    centers = rng.choice(rng.uniform(0, 100, 8), n) + rng.normal(0, 2, n)  # clusters of overlaps
    lengths = rng.uniform(2, 12, n)
    segs = np.stack([centers - lengths / 2, centers + lengths / 2], axis=1)
    return segs, rng.uniform(0.0005, 1.0, n), rng.integers(0, classes, n)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("voting", [0.0, 0.75])
def test_soft_nms_matches_textbook_loop(seed, voting):
    segs, scores, labels = random_detections(seed)
    ref = textbook_soft_nms(segs.tolist(), scores.tolist(), labels.tolist(), 0.7, 0.001, 25, voting)
    out_segs, out_scores, out_labels = soft_nms(t(segs), t(scores), torch.tensor(labels), sigma=0.7,
                                                min_score=0.001, max_segments=25, voting_threshold=voting)
    assert out_labels.tolist() == [lab for _, _, lab in ref]
    np.testing.assert_allclose(out_scores.numpy(), [s for _, s, _ in ref], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out_segs.numpy(), [s for s, _, _ in ref], rtol=0, atol=1e-9)
    assert torch.all(out_scores[1:] <= out_scores[:-1])


@pytest.fixture(scope="module")
def actionformer_nms():
    return actionformer_module("utils/nms.py")


@pytest.mark.parametrize("seed", range(5))
def test_soft_nms_matches_actionformer_batched_nms(actionformer_nms, seed):
    segs, scores, labels = random_detections(seed, n=80)
    keep = scores > 0.001  # ActionFormer votes with every input; we vote with the candidates above min_score
    # float32: ActionFormer's compiled nms_1d_cpu kernel (when it loads) only takes float.
    segs, scores = t(segs[keep], torch.float32), t(scores[keep], torch.float32)
    labels = torch.tensor(labels[keep])
    # multiclass=True: per-class soft-NMS (ActionFormer skips voting on this path).
    ref = actionformer_nms.batched_nms(segs, scores, labels, 0.1, 0.001, 30, use_soft_nms=True,
                                       multiclass=True, sigma=0.7, voting_thresh=0.75)
    ours = soft_nms(segs, scores, labels, sigma=0.7, min_score=0.001, max_segments=30, voting_threshold=0)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=3e-5)  # a few float32 ulps at t ~ 100
    # multiclass=False: class-agnostic soft-NMS followed by score voting.
    ref = actionformer_nms.batched_nms(segs, scores, labels, 0.1, 0.001, 30, use_soft_nms=True,
                                       multiclass=False, sigma=0.7, voting_thresh=0.75)
    ours = soft_nms(segs, scores, labels, sigma=0.7, min_score=0.001, max_segments=30,
                    voting_threshold=0.75, class_agnostic=True)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=3e-5)  # a few float32 ulps at t ~ 100


# ------------------------------------------------------------------ windows, units, results files


def test_windows_merge_then_convert_to_seconds():
    # stride 4 input steps per feature step, 10 input steps per second, windows at 0 and 32.
    w0 = (t([[1, 3], [0, 1]]), t([0.9, 0.0001]), t([0, 1], torch.long), 0)
    w1 = (t([[0, 2], [5, 9]]), t([0.8, 0.7]), t([1, 0], torch.long), 32)
    windows = [(s * 4, p, l, start) for s, p, l, start in (w0, w1)]
    segs, scores, labels = merge_windows(windows, min_score=0.001, top_k=1)
    assert segs.tolist() == [[4, 12], [32, 40]] and labels.tolist() == [0, 1]  # floor and top-1 per window
    assert input_steps_to_seconds(segs, 10.0, duration=3.5).tolist() == [[0.4, 1.2], [3.2, 3.5]]
    assert input_steps_to_seconds(t([[-5, 5]]), 10.0).tolist() == [[0.0, 0.5]]


def test_postprocess_video_and_results_round_trip(tmp_path):
    # Two windows see the same action (frames 40..80 at 10 fps -> 4..8 s); soft-NMS keeps one on top.
    w0 = (t([[40, 80], [42, 80]]), t([0.9, 0.5]), t([0, 0], torch.long), 0)
    w1 = (t([[0, 40], [120, 160]]), t([0.8, 0.3]), t([0, 1], torch.long), 40)
    segs, scores, labels = postprocess_video([w0, w1], rate=10.0, duration=20.0,
                                             config=PostprocessConfig(voting_threshold=0.0))
    assert segs[0].tolist() == [4.0, 8.0] and scores[0].item() == pytest.approx(0.9)
    assert segs.max() <= 20.0 and len(segs) == 4
    results = detections_to_results({"vid": (segs, scores, labels)}, ["jump", "run"])
    path = save_results(results, tmp_path / "out" / "preds.json")
    assert json.loads(path.read_text()) == results and not list(path.parent.glob(".*tmp"))
    gt = {"database": {"vid": {"subset": "test", "duration": 20.0,
                               "annotations": [{"segment": [4.0, 8.0], "label": "jump"}]}}}
    assert detection_map(gt, path, (0.5,))["mAP@0.5"] == pytest.approx(100.0)


def test_results_reject_bad_labels_and_values(tmp_path):
    from blockdrop.core.errors import BlockdropError

    with pytest.raises(BlockdropError, match="'v'"):
        detections_to_results({"v": (t([[0, 1]]), t([0.5]), t([3], torch.long))}, ["a"])
    with pytest.raises(BlockdropError, match="non-finite"):
        detections_to_results({"v": (t([[0, 1]]), t([float("nan")]), t([0], torch.long))}, ["a"])
    with pytest.raises(BlockdropError, match="preds.json"):
        save_results({"results": {"v": [{"segment": [0, 1], "label": "a", "score": float("nan")}]}},
                     tmp_path / "preds.json")
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind


# ------------------------------------------------------------------ the batched soft-NMS == one class at a time

def _reference_soft_nms(segments, scores, labels, sigma, min_score, max_segments, threshold):
    """Soft-NMS as first written here: one class at a time, voting against all candidates."""
    seg, sc, lab = segments.numpy(), scores.numpy(), labels.numpy()
    cand = sc > min_score
    picks = []
    for g in np.unique(lab[cand]):
        idx = np.flatnonzero(cand & (lab == g))
        s, e, dec = seg[idx, 0].copy(), seg[idx, 1].copy(), sc[idx].copy()
        alive, out = np.ones(len(idx), bool), []
        while len(out) < max_segments and alive.any():
            b = int(np.argmax(np.where(alive, dec, -np.inf)))
            out.append((float(dec[b]), int(idx[b])))
            alive[b] = False
            inter = np.clip(np.minimum(e, e[b]) - np.maximum(s, s[b]), 0, None)
            union = (e - s) + (e[b] - s[b]) - inter
            dec = dec * np.exp(-np.square(np.where(union > 0, inter / np.where(union > 0, union, 1), 0)) / sigma)
            alive &= dec > min_score
        picks += out
    picks = sorted(picks, key=lambda p: (-p[0], p[1]))[:max_segments]
    keep = torch.tensor([i for _, i in picks], dtype=torch.long)
    kept = segments[keep]
    c = torch.from_numpy(cand)
    inter = (torch.minimum(kept[:, None, 1], segments[c][None, :, 1]) - torch.maximum(kept[:, None, 0], segments[c][None, :, 0])).clamp(min=0)
    union = (kept[:, 1] - kept[:, 0])[:, None] + (segments[c][:, 1] - segments[c][:, 0])[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-38), torch.zeros_like(inter))
    iou = iou * (labels[keep][:, None] == labels[c][None, :])
    weights = ((iou >= threshold) * iou * scores[c][None, :]).double()  # all candidates at once, in float64
    voted = ((weights @ segments[c].double()) / weights.sum(1, keepdim=True)).float()
    return voted, torch.tensor([k for k, _ in picks]), labels[keep], keep


@pytest.mark.parametrize("seed", range(6))
def test_batched_soft_nms_equals_one_class_at_a_time(seed):
    g = torch.Generator().manual_seed(seed)
    n, classes = 400, 1 + seed % 5
    starts = torch.rand(n, generator=g) * 100
    segments = torch.stack([starts, starts + 0.5 + torch.rand(n, generator=g) * 10], dim=1)
    scores = torch.rand(n, generator=g).round(decimals=2)  # ties in score
    labels = torch.randint(0, classes, (n,), generator=g)
    ours = soft_nms(segments, scores, labels, sigma=0.7, min_score=0.001, max_segments=120, voting_threshold=0.75)
    voted, kept_scores, kept_labels, _ = _reference_soft_nms(segments, scores, labels, 0.7, 0.001, 120, 0.75)
    assert torch.equal(ours[1], kept_scores) and torch.equal(ours[2], kept_labels)  # the same picks, exactly
    assert torch.equal(ours[0], voted)  # voting per class in float64 == voting over all at once
    # so the mAP of the faster scoring is bit-identical
    classes = [f"c{k}" for k in range(classes)]
    gt = {"database": {"v": {"subset": "test", "duration": 200.0, "annotations": [
        {"segment": [float(a), float(b)], "label": classes[int(k)]} for (a, b), k in zip(segments[:40].tolist(), labels[:40])]}}}
    fast = detection_map(gt, detections_to_results({"v": ours}, classes), (0.3, 0.5, 0.7))
    slow = detection_map(gt, detections_to_results({"v": (voted, kept_scores, kept_labels)}, classes), (0.3, 0.5, 0.7))
    assert fast["average_mAP"] == slow["average_mAP"] and fast["per_class"] == slow["per_class"]
