import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from blockdrop.data.annotations import load_annotations
from blockdrop.data.dataset import TADDataset, collate_windows
from blockdrop.data.sequences import SequenceSource
from blockdrop.data.windows import random_truncation
from blockdrop.core.errors import DataError

RATE = 10.0  # input steps per second


def _annotations():
    return load_annotations({"database": {
        "a": {"subset": "train", "duration": 50.0,
              "annotations": [{"segment": [5.0, 8.0], "label": "jump"}, {"segment": [30.0, 33.5], "label": "run"}]},
        "b": {"subset": "train", "duration": 6.0, "annotations": [{"segment": [1.0, 2.5], "label": "run"}]},
    }})


@pytest.fixture
def source(tmp_path):
    # value at step t is t in every channel, so a window's content tells where it came from
    np.save(tmp_path / "a.npy", np.repeat(np.arange(500, dtype=np.float64)[:, None], 3, axis=1))
    np.save(tmp_path / "b.npy", np.repeat(np.arange(60, dtype=np.float32)[:, None], 3, axis=1))
    return SequenceSource(tmp_path, rate=RATE)


class _VideoSource:
    """An in-memory (T, H, W, 3) uint8 source, the shape a decoded video has."""

    rate = 5.0

    def load(self, video_id):
        return np.full((23, 4, 6, 3), 7, dtype=np.uint8)


def _original_steps(ann, video_id):
    return np.array([[s.start * RATE, s.end * RATE] for s in ann.videos[video_id].segments])


def test_test_mode_items_are_sliding_windows(source):
    ann = _annotations()
    ds = TADDataset(ann, source, window=100, train=False)  # stride 50
    plan = [(ds[i]["video_id"], ds[i]["window_start"]) for i in range(len(ds))]
    assert plan == [("a", s) for s in range(0, 401, 50)] + [("b", 0)]
    item = ds[0]
    assert item["inputs"].shape == (100, 3) and item["inputs"].dtype == torch.float32
    assert item["mask"].dtype == torch.bool and item["mask"].all()
    np.testing.assert_array_equal(item["inputs"][:, 0].numpy(), np.arange(100))
    assert item["rate"] == RATE
    np.testing.assert_allclose(item["segments"].numpy(), [[50.0, 80.0]])
    assert item["labels"].tolist() == [0] and item["labels"].dtype == torch.int64
    item = ds[6]  # window [300, 400] holds the run in steps [300, 335]
    assert item["window_start"] == 300
    np.testing.assert_allclose(item["segments"].numpy(), [[0.0, 35.0]])
    assert item["labels"].tolist() == [1]
    assert ds[4]["segments"].shape == (0, 2) and ds[4]["labels"].shape == (0,)


def test_short_video_is_padded_and_masked(source):
    ds = TADDataset(_annotations(), source, window=100, train=False)
    item = ds[len(ds) - 1]
    assert item["video_id"] == "b" and item["window_start"] == 0
    assert item["mask"].sum() == 60 and not item["mask"][60:].any()
    assert (item["inputs"][60:] == 0).all()
    np.testing.assert_allclose(item["segments"].numpy(), [[10.0, 25.0]])


def test_train_mode_crops_keep_segment_semantics(source):
    ann = _annotations()
    ds = TADDataset(ann, source, window=100, train=True, seed=3)
    assert len(ds) == 2
    for epoch in range(5):
        ds.set_epoch(epoch)
        item = ds[0]
        start = item["window_start"]
        assert 0 <= start <= 400
        np.testing.assert_array_equal(item["inputs"][:, 0].numpy(), np.arange(start, start + 100))
        assert len(item["labels"]) >= 1  # a crop with an action was found
        originals = _original_steps(ann, "a")[item["labels"].numpy()]  # labels 0, 1 match segment order
        expected = np.clip(originals, start, start + 100) - start
        np.testing.assert_allclose(item["segments"].numpy(), expected, rtol=0, atol=1e-4)
    short = ds[1]  # 60 steps < window: not cropped, padded
    assert short["window_start"] == 0 and short["mask"].sum() == 60
    np.testing.assert_allclose(short["segments"].numpy(), [[10.0, 25.0]])


def test_train_randomness_depends_on_seed_epoch_index_only(source):
    ds = TADDataset(_annotations(), source, window=100, train=True, seed=1)
    ds.set_epoch(2)
    first = ds[0]["window_start"]
    ds[1]  # asking for other items in between changes nothing
    assert ds[0]["window_start"] == first
    again = TADDataset(_annotations(), source, window=100, train=True, seed=1)
    again.set_epoch(2)
    assert again[0]["window_start"] == first
    starts = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        starts.add(ds[0]["window_start"])
    assert len(starts) > 1


def test_train_crop_is_drawn_from_seed_epoch_index(source):
    ann = _annotations()
    ann = type(ann)({"b": ann.videos["b"], "a": ann.videos["a"]}, ann.classes)  # long video "a" is item 1
    ds = TADDataset(ann, source, window=100, train=True, seed=2, min_keep=0.5)
    ds.set_epoch(3)
    rng = np.random.default_rng((2, 3, 1))  # the documented stream of item 1 in epoch 3
    expected_start, _, _ = random_truncation(500, _original_steps(ann, "a"), 100, rng, min_keep=0.5)
    assert ds[1]["window_start"] == expected_start


def test_train_items_independent_of_worker_count(source):
    ds = TADDataset(_annotations(), source, window=100, train=True, seed=5)
    ds.set_epoch(1)

    def starts(workers):
        loader = DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate_windows)
        return [int(b["window_start"][0]) for b in loader]

    assert starts(0) == starts(2)


def test_annotations_are_not_mutated(source):
    ann = _annotations()
    before = ann.to_json()
    for train in (True, False):
        ds = TADDataset(ann, source, window=100, train=train)
        for i in range(len(ds)):
            ds[i]["segments"] += 1000.0  # even a caller editing item tensors cannot reach ground truth
    assert ann.to_json() == before
    assert ds[0]["segments"].max() < 1000.0


def test_video_source_stays_uint8():
    ann = load_annotations({"database": {"clip": {
        "subset": "test", "duration": 4.6, "annotations": [{"segment": [1.0, 2.0], "label": "wave"}]}}})
    ds = TADDataset(ann, _VideoSource(), window=16, train=False, stride=8, feature_stride=4)
    assert [ds[i]["window_start"] for i in range(len(ds))] == [0, 7]
    item = ds[1]
    assert item["inputs"].shape == (16, 4, 6, 3) and item["inputs"].dtype == torch.uint8
    np.testing.assert_allclose(item["segments"].numpy(), [[0.0, 3.0]])  # steps [5, 10] from start 7
    assert item["rate"] == 5.0


def test_collate_windows(source):
    ds = TADDataset(_annotations(), source, window=100, train=False, stride=100)
    batch = collate_windows([ds[0], ds[3], ds[len(ds) - 1]])
    assert batch["inputs"].shape == (3, 100, 3) and batch["mask"].shape == (3, 100)
    assert batch["window_start"].tolist() == [0, 300, 0]
    assert batch["rate"].tolist() == [RATE] * 3
    assert batch["video_id"] == ["a", "a", "b"]
    assert [s.shape[0] for s in batch["segments"]] == [1, 1, 1]
    assert [lab.tolist() for lab in batch["labels"]] == [[0], [1], [1]]


def test_bad_arguments(source):
    with pytest.raises(DataError, match="window"):
        TADDataset(_annotations(), source, window=100, train=False, feature_stride=16)
    with pytest.raises(DataError, match="stride"):
        TADDataset(_annotations(), source, window=100, train=False, stride=101)
    bad = load_annotations({"database": {"zzz": {
        "subset": "x", "duration": 1.0, "annotations": [{"segment": [0.0, 1.0], "label": "a"}]}}})
    with pytest.raises(DataError, match="'zzz'"):
        TADDataset(bad, source, window=100, train=False)


class _GradientVideo:
    """(T, H, W, 3) uint8 whose pixel values differ per column, channel and time, so a flip or a
    colour permutation is visible and frames stay comparable one by one."""

    rate = 10.0

    def load(self, video_id):
        t, w, c = np.meshgrid(np.arange(60), np.arange(6), np.arange(3), indexing="ij")
        frame = (w * 40 + c * 10 + t % 10).astype(np.uint8)  # (T, W, 3), all values < 256
        return np.repeat(frame[:, None], 4, axis=1)  # (T, H=4, W=6, 3)


def test_video_augmentation_keeps_time_and_labels_and_is_reproducible():
    from itertools import permutations

    ann = load_annotations({"database": {"v": {"subset": "train", "duration": 6.0,
                                               "annotations": [{"segment": [1.0, 2.0], "label": "wave"}]}}})
    plain = TADDataset(ann, _GradientVideo(), window=20, train=True, seed=3, repeats=16)
    aug = TADDataset(ann, _GradientVideo(), window=20, train=True, seed=3, repeats=16,
                     augment=("hflip", "channel_shuffle"))
    seen = set()
    for i in range(len(plain)):
        p, a = plain[i], aug[i]
        # same crop and ground truth: augmentation draws after the crop, from the same item rng
        assert p["window_start"] == a["window_start"]
        torch.testing.assert_close(p["segments"], a["segments"])
        # exactly one of the 12 whole-window transforms (the same on every frame)
        matches = [(flip, perm) for flip in (False, True) for perm in permutations(range(3))
                   if torch.equal(a["inputs"], (p["inputs"].flip(2) if flip else p["inputs"])[..., list(perm)])]
        assert len(matches) == 1
        seen.add(matches[0])
        assert torch.equal(aug[i]["inputs"], a["inputs"])  # reproducible per (seed, epoch, index)
    assert {flip for flip, _ in seen} == {False, True} and len({perm for _, perm in seen}) > 2
    test = TADDataset(ann, _GradientVideo(), window=20, train=False, augment=("hflip",))
    assert torch.equal(test[0]["inputs"], torch.from_numpy(_GradientVideo().load("v")[:20]))  # never at test time
