"""A saved (compressed) detector exports to a self-contained graph that matches the eager model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat

import pytest
import torch

from blockdrop.recipes.build import build_detector, detector_builder
from blockdrop.cli import main
from blockdrop.recipes.build import resolve_config_path
from blockdrop.compress.saving import save_compressed
from blockdrop.compress.stack import drop_blocks
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes import export
from blockdrop.recipes.export import export_detector
from blockdrop.recipes.build import load_detector

from conftest import tiny_config

TINY_VIDEO = ["backbone.depth=3", "backbone.width=32", "backbone.heads=2", "head.embed_dim=32", "head.fpn_dim=32",
              "head.head_dim=32", "data.window=64", "data.test_stride=32", "data.frame_size=32"]


def _saved(tmp_path, cfg, channels: int, classes=("a", "b", "c"), drop=(1,)):
    torch.manual_seed(0)
    model = build_detector(cfg, len(classes), channels).eval()
    if drop:
        drop_blocks(model, list(drop))
    path = tmp_path / "model.safetensors"
    save_compressed(model, path, builder=detector_builder(cfg, classes, channels))
    return path


@pytest.fixture
def video_checkpoint(tmp_path):
    cfg = load_config(ExperimentConfig, resolve_config_path("synthetic"), TINY_VIDEO)
    return _saved(tmp_path, cfg, 3)


def test_pt2_export_of_a_compressed_video_detector_matches_eager(video_checkpoint, tmp_path):
    out = tmp_path / "deploy" / "detector.pt2"
    result = export_detector(video_checkpoint, out)
    assert result.max_abs_diff <= 1e-4
    meta = json.loads(result.sidecar.read_text())
    assert meta["blocks"] == 2 and meta["classes"] == ["a", "b", "c"] and meta["feature_stride"] == 2.0
    assert meta["inputs"] == {"shape": [1, 64, 32, 32, 3], "dtype": "uint8"}
    # what a deployment does: load the graph alone and run real-looking input with a padded tail
    program = torch.export.load(out).module()
    frames = torch.randint(0, 256, (1, 64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    mask = torch.arange(64)[None] < 40
    cls_logits, offsets, valid, points = program(frames, mask)
    model, _ = load_detector(video_checkpoint)
    with torch.no_grad():
        head = model.eval()(frames, mask).head
    torch.testing.assert_close(cls_logits, head.cls_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(offsets, head.offsets, rtol=1e-4, atol=1e-5)
    assert torch.equal(valid, head.valid) and torch.equal(points, head.points)
    assert valid.sum() < valid.numel()  # the padded tail is masked in the exported graph too


def test_export_cli_for_a_sequence_detector_with_batch(tmp_path, capsys):
    cfg = load_config(ExperimentConfig, tiny_config(tmp_path))
    checkpoint = _saved(tmp_path, cfg, 6, drop=())
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "seq.pt2"), "--batch", "2"]) == 0
    printed = capsys.readouterr().out
    assert "max |exported - eager|" in printed and f"wrote {tmp_path / 'seq.pt2'}, {tmp_path / 'seq.pt2.json'} (" in printed
    meta = json.loads((tmp_path / "seq.pt2.json").read_text())
    assert meta["inputs"]["shape"][0] == 2 and meta["inputs"]["dtype"] == "float32" and meta["blocks"] == 2


def test_export_errors_name_the_flag_and_keep_existing_files(video_checkpoint, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.pt2")]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "not found" in err
    out = tmp_path / "keep.pt2"
    out.write_bytes(b"previous export")  # an earlier export: its sidecar lists it (else it is refused)
    (tmp_path / "keep.pt2.json").write_text(json.dumps({"format": "pt2", "files": ["keep.pt2"]}))
    assert main(["export", str(video_checkpoint), "--out", str(out), "--tolerance", "-1"]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt2", "keep.pt2.json", "model.safetensors"]
    assert main(["export", str(video_checkpoint), "--out", str(out), "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="needs the export-onnx extra (onnxscript, onnxruntime); CI installs it")


def _run_shipped_copy(result, tmp_path, video_checkpoint):
    """Copy only the files the export names into an empty folder and run the graph from there."""
    import onnxruntime

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in result.files:
        shutil.copy(path, shipped / path.name)
    session = onnxruntime.InferenceSession(str(shipped / result.path.name), providers=["CPUExecutionProvider"])
    frames = torch.randint(0, 256, (1, 64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    mask = torch.arange(64)[None] < 40
    cls_logits, offsets, valid, points = session.run(None, {"inputs": frames.numpy(), "mask": mask.numpy()})
    model, _ = load_detector(video_checkpoint)
    with torch.no_grad():
        head = model.eval()(frames, mask).head
    torch.testing.assert_close(torch.from_numpy(cls_logits), head.cls_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(offsets), head.offsets, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.from_numpy(valid), head.valid) and torch.equal(torch.from_numpy(points), head.points)


@needs_onnx
def test_onnx_export_stands_alone_and_matches_eager(video_checkpoint, tmp_path):
    out = tmp_path / "deploy" / "det.onnx"
    result = export_detector(video_checkpoint, out, fmt="onnx")
    # the weights are inside the graph: the graph and its sidecar are all there is, and all that is named
    assert sorted(p.name for p in out.parent.iterdir()) == ["det.onnx", "det.onnx.json"]
    assert result.files == (out, out.with_name("det.onnx.json")) and result.max_abs_diff <= 1e-4
    assert json.loads(result.sidecar.read_text())["files"] == ["det.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in result.files)  # not a private 0600
    _run_shipped_copy(result, tmp_path, video_checkpoint)


@needs_onnx
def test_onnx_weights_too_large_to_embed_go_to_a_data_file_under_its_final_name(video_checkpoint, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(export, "EMBED_LIMIT", 0)  # as a model over protobuf's 2 GB would be
    out = tmp_path / "deploy" / "det.onnx"
    result = export_detector(video_checkpoint, out, fmt="onnx")
    data = out.with_name("det.onnx.data")
    assert result.files == (data, out, out.with_name("det.onnx.json")) and data.stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["det.onnx", "det.onnx.data", "det.onnx.json"]
    assert json.loads(result.sidecar.read_text())["files"] == ["det.onnx.data", "det.onnx"]
    _run_shipped_copy(result, tmp_path, video_checkpoint)
