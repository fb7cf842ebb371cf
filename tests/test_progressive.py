"""The Progressive Block Drop loop end to end on a tiny detector and generated data."""

import json
import os
import subprocess
import sys

import pytest
import torch

import blockdrop.compress.progressive as progressive
import blockdrop.recipes.experiments as recipes
from blockdrop.compress.stack import kept_blocks
from blockdrop.core.config import load_config
from blockdrop.core.errors import ConfigError
from blockdrop.core.schema import ExperimentConfig
from blockdrop.cli import main
from blockdrop.recipes.experiments import compress_experiment, load_detector, train_experiment

from conftest import free_port, tiny_config

COMPRESS = ["backbone.depth=4", "compress.max_blocks=2", "compress.selection_metric=average_mAP",
            "compress.train.epochs=2", "compress.train.batch_size=2", "compress.train.eval_every=1",
            "compress.train.ema_decay=0.5", "compress.latency_threads=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("teacher")
    config = tiny_config(tmp, epochs=1)
    cfg = load_config(ExperimentConfig, config, ["backbone.depth=4"])
    train_experiment(cfg, out=tmp / "teacher", progress=False)
    return config, tmp / "teacher" / "model.safetensors"


def _cfg(config, *extra):
    return load_config(ExperimentConfig, config, COMPRESS + list(extra))


def test_two_steps_drop_two_blocks_and_lower_the_cost(teacher, tmp_path):
    config, teacher_path = teacher
    history = compress_experiment(_cfg(config), teacher=teacher_path, out=tmp_path / "c", progress=False)
    steps = history["steps"]
    assert [s["blocks_dropped"] for s in steps] == [1, 2]
    assert history["teacher"]["kept_blocks"] == [0, 1, 2, 3]
    assert len(steps[-1]["kept_blocks"]) == 2
    gmacs = [history["teacher"]["gmacs"]] + [s["gmacs"] for s in steps]
    params = [history["teacher"]["params"]] + [s["params"] for s in steps]
    assert gmacs[0] > gmacs[1] > gmacs[2] and params[0] > params[1] > params[2]
    # every candidate's score is recorded, keyed by original index
    assert set(steps[0]["selection"]["scores"]) == {"0", "1", "2", "3"}
    assert len(steps[1]["selection"]["scores"]) == 3
    model, _ = load_detector(tmp_path / "c" / "model.safetensors")  # loads without the original
    assert kept_blocks(model, stack="backbone.blocks") == steps[-1]["kept_blocks"]
    on_disk = json.loads((tmp_path / "c" / "history.json").read_text())
    assert on_disk["stopped"] == "dropped max_blocks=2"
    # the run ends with a readable report of the same figures
    report = (tmp_path / "c" / "report.md").read_text()
    dropped = [s["dropped_original"][0] for s in steps]
    assert f"2 of 4 blocks dropped (50%; original indices {sorted(dropped)})" in report
    assert f"chose original block {dropped[0]}" in report and f"chose original block {dropped[1]}" in report
    assert f"| step 2 | {dropped[1]} | 2 | {steps[1]['gmacs']:.3f} |" in report


def test_resume_after_interruptions_gives_the_same_kept_blocks(teacher, tmp_path, monkeypatch):
    config, teacher_path = teacher
    reference = compress_experiment(_cfg(config), teacher=teacher_path, out=tmp_path / "ref", progress=False)

    calls = {"n": 0}
    real_evaluate = recipes.evaluate

    def flaky_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (3, 7):  # inside step 1's alignment (epoch 2), then inside step 2
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(recipes, "evaluate", flaky_evaluate)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        compress_experiment(_cfg(config), teacher=teacher_path, out=out, progress=False)
    assert (out / "step_01" / "selection.json").exists() and not (out / "step_01" / "model.safetensors").exists()
    with pytest.raises(KeyboardInterrupt):
        compress_experiment(_cfg(config), teacher=teacher_path, out=out, resume=True, progress=False)
    assert json.loads((out / "history.json").read_text())["steps"][0]["step"] == 1
    resumed = compress_experiment(_cfg(config), teacher=teacher_path, out=out, resume=True, progress=False)
    assert resumed["steps"][-1]["kept_blocks"] == reference["steps"][-1]["kept_blocks"]
    assert [s["dropped_original"] for s in resumed["steps"]] == [s["dropped_original"] for s in reference["steps"]]


def test_a_step_that_loses_too_much_accuracy_is_rolled_back(teacher, tmp_path, monkeypatch):
    config, teacher_path = teacher
    scores = iter([60.0] + [10.0] * 50)  # the teacher scores 60 on validation, every student 10
    monkeypatch.setattr(recipes, "evaluate", lambda *a, **k: {"average_mAP": next(scores), "predictions": {}})
    with pytest.raises(ConfigError, match="no step was kept"):
        compress_experiment(_cfg(config, "compress.max_accuracy_drop=5"), teacher=teacher_path,
                            out=tmp_path / "rb", progress=False)
    history = json.loads((tmp_path / "rb" / "history.json").read_text())
    assert history["steps"] == [] and history["rejected"]["status"] == "rolled_back"
    assert "rolled back" in history["stopped"] and "max_accuracy_drop=5" in history["stopped"]
    # `blockdrop report` still explains the run that kept nothing
    assert main(["report", str(tmp_path / "rb"), "--no-plot"]) == 0
    report = (tmp_path / "rb" / "report.md").read_text()
    assert "No block was dropped from the 4-block teacher" in report
    assert "(rolled back)" in report and "## Rolled back" in report and "max_accuracy_drop=5" in report
    assert not (tmp_path / "rb" / "report.png").exists()


def test_target_macs_and_one_shot_stopping(teacher, tmp_path):
    config, teacher_path = teacher
    history = compress_experiment(_cfg(config, "compress.target_macs_reduction=0.01", "compress.max_blocks=3"),
                                  teacher=teacher_path, out=tmp_path / "macs", progress=False)
    assert len(history["steps"]) == 1 and history["stopped"].startswith("MACs reduced by")
    one = compress_experiment(_cfg(config, "compress.one_shot=true"), teacher=teacher_path,
                              out=tmp_path / "one", progress=False)
    assert len(one["steps"]) == 1 and len(one["steps"][0]["dropped_original"]) == 2
    assert one["steps"][0]["blocks_dropped"] == 2


def test_stop_reason_rules():
    class Cfg:
        max_blocks, target_macs_reduction = 2, None

    history = {"teacher": {"gmacs": 10.0, "kept_blocks": [0, 1, 2]}, "steps": [], "stopped": None}
    assert progressive.stop_reason(Cfg, history) is None
    history["steps"].append({"blocks_dropped": 2, "gmacs": 6.0, "kept_blocks": [0]})
    assert progressive.stop_reason(Cfg, history) == "dropped max_blocks=2"


def test_missing_teacher_is_a_clear_error(tmp_path):
    config = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="--teacher .*no such file"):
        compress_experiment(_cfg(config), teacher=tmp_path / "nope.safetensors", out=tmp_path / "x")


def test_report_errors_name_the_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "history.json" in capsys.readouterr().err
    (tmp_path / "history.json").write_text('{"steps": []}')
    assert main(["report", str(tmp_path)]) == 2
    assert "'teacher'" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_compress_under_torchrun_with_two_gloo_processes(teacher, tmp_path):
    """`blockdrop compress` under PyTorch's launcher: the ranks form one process group (the
    alignment trains with DDP), agree on every dropped block, and leave one run folder written by
    rank 0 whose model loads in a single process."""
    config, teacher_path = teacher
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    sets = [arg for item in COMPRESS for arg in ("--set", item)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "blockdrop", "compress", str(config),
                          "--teacher", str(teacher_path), "--out", str(tmp_path / "ddp"), "--quiet", *sets],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("stopped: dropped max_blocks=2") == 1  # one table: rank 0 prints
    history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert history["world_size"] == 2 and history["stopped"] == "dropped max_blocks=2"
    steps = history["steps"]
    assert [s["blocks_dropped"] for s in steps] == [1, 2]
    for s in steps:  # one writer of the alignment's per-epoch metrics
        lines = (tmp_path / "ddp" / f"step_{s['step']:02d}" / "align" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    model, _ = load_detector(tmp_path / "ddp" / "model.safetensors")
    assert kept_blocks(model, stack="backbone.blocks") == steps[-1]["kept_blocks"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compress_runs_on_the_gpu_when_there_is_one(teacher, tmp_path):
    config, teacher_path = teacher
    history = compress_experiment(_cfg(config, "compress.max_blocks=1"), teacher=teacher_path,
                                  out=tmp_path / "gpu", progress=False)
    assert history["teacher"]["latency_device"].startswith("cuda")
    assert history["steps"][0]["latency_device"].startswith("cuda")
