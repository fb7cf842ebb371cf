"""The start-up media check: every bad file named at once, before anything is written.

The corrupt fixtures are made here from a real rendered mp4: cut in half (truncated), bytes
flipped in the file's index (the moov atom at the end of a file our writer makes), empty, and a
text file named .mp4. A bit flip inside frame data that the decoder conceals is not detectable
without a checksum (data/check.py says so); it is not a case here.
"""

import json
import shutil
from pathlib import Path

import pytest

import blockdrop.data.check as check
from blockdrop.cli import main
from blockdrop.data.check import check_media, check_video
from blockdrop.data.synthetic import SyntheticSpec, render_synthetic
from blockdrop.data.video import VideoSource

SPEC = SyntheticSpec(seed=5, num_videos=6, size=32, fps=8.0, durations=(6.0, 7.0), action_lengths=(1.0, 2.0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("media") / "data"
    render_synthetic(root, SPEC)
    return root


def corrupt(root: Path) -> dict[str, str]:
    """Damage four of the six videos in four ways; returns {video id: how}."""
    videos = sorted(p.stem for p in (root / "videos").glob("*.mp4"))
    paths = {v: root / "videos" / f"{v}.mp4" for v in videos}
    data = paths[videos[0]].read_bytes()
    paths[videos[0]].write_bytes(data[: len(data) // 2])
    data = bytearray(paths[videos[1]].read_bytes())
    moov = data.rfind(b"moov")
    data[moov + 200: moov + 260] = bytes(b ^ 0xFF for b in data[moov + 200: moov + 260])
    paths[videos[1]].write_bytes(bytes(data))
    paths[videos[2]].write_bytes(b"")
    paths[videos[3]].write_text("not a video\n")
    return dict(zip(videos[:4], ("truncated", "index bit-flipped", "empty", "not a video")))


@pytest.fixture
def damaged(dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    return root, corrupt(root)


def config(tmp_path: Path, root: Path) -> Path:
    text = (Path(__file__).parents[1] / "src" / "blockdrop" / "configs" / "synthetic.yaml").read_text()
    path = tmp_path / "syn.yaml"
    path.write_text(text)
    return path


SETS = ["--set", "backbone.depth=3", "--set", "backbone.width=32", "--set", "backbone.heads=2",
        "--set", "head.embed_dim=32", "--set", "head.fpn_dim=32", "--set", "head.head_dim=32",
        "--set", "data.window=32", "--set", "data.test_stride=16", "--set", "data.frame_size=32", "--set", "data.rate=8",
        "--set", "train.epochs=1", "--set", "train.warmup_epochs=0", "--set", "train.ema_decay=0",
        "--set", "train.batch_size=2", "--set", "data.cache_dir=null", "--set", "train.threads=1"]


def test_every_kind_of_damage_is_found(damaged):
    root, how = damaged
    source = VideoSource(root / "videos", fps=8.0, size=32, crop=32)
    ids = sorted(p.stem for p in (root / "videos").glob("*.mp4"))
    problems = check_media(source, ids, video=True)
    assert set(problems) == set(how), problems
    good = [v for v in ids if v not in how]
    assert all(check_video(source.path(v)) is None for v in good)


def test_data_check_and_train_name_all_bad_files_and_write_nothing(damaged, tmp_path, capsys):
    root, how = damaged
    cfg = config(tmp_path, root)
    sets = SETS + ["--set", f"data.root={root}"]
    assert main(["data", "check", str(cfg), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blockdrop: error: 4 bad media files:")
    for video in how:
        assert f"{video}.mp4" in err[0]
    out = tmp_path / "run"
    assert main(["train", str(cfg), *sets, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 bad media files" in err[0] and "--skip-bad-media" in err[0]
    assert all(f"{v}.mp4" in err[0] for v in how)
    assert not out.exists()


def test_skip_bad_media_leaves_them_out_and_records_it(dataset, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    database = json.loads((root / "annotations.json").read_text())["database"]
    train = sorted(v for v, info in database.items() if info["subset"] == "train")
    assert len(train) >= 3  # two are damaged, the rest still trains
    bad = train[:2]
    (root / "videos" / f"{bad[0]}.mp4").write_bytes(b"")
    (root / "videos" / f"{bad[1]}.mp4").write_text("not a video\n")
    out = tmp_path / "run"
    assert main(["train", str(config(tmp_path, root)), *SETS, "--set", f"data.root={root}", "--out", str(out),
                 "--skip-bad-media", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: leaving out 2 bad media files" in err and all(f"{v}.mp4" in err for v in bad)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["skipped_media"]) == bad and summary["data"]["media_files"] == len(database) - 2


def test_a_second_check_does_not_decode_again(dataset, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    source = VideoSource(root / "videos", fps=8.0, size=32, crop=32)
    ids = sorted(p.stem for p in (root / "videos").glob("*.mp4"))
    assert check_media(source, ids, video=True, cache_dir=str(tmp_path / "cache")) == {}
    calls = []
    monkeypatch.setattr(check, "check_video", lambda path: calls.append(path) or None)
    assert check_media(source, ids, video=True, cache_dir=str(tmp_path / "cache")) == {}
    assert calls == []
    (root / "videos" / f"{ids[0]}.mp4").write_bytes(b"changed")  # a changed file is checked again
    assert check_media(source, ids, video=True, cache_dir=str(tmp_path / "cache")) == {}
    assert calls == [root / "videos" / f"{ids[0]}.mp4"]
