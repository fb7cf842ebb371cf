"""The Progressive Block Drop loop end to end on a tiny detector and generated data."""

import json
import os
import subprocess
import sys

import pytest
import torch

import blockdrop.recipes.compress as recipes
from blockdrop.compress.history import AlignRecord, Cost, History, SelectionRecord, StepRecord, TeacherRecord
from blockdrop.compress.rules import OneShot, Progressive, stopping_rules
from blockdrop.compress.stack import kept_blocks
from blockdrop.core.config import load_config
from blockdrop.core.errors import BlockdropError, ConfigError
from blockdrop.core.schema import ExperimentConfig
from blockdrop.cli import main
from blockdrop.recipes.build import load_detector
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.train import train_experiment

from conftest import free_port, tiny_config

COMPRESS = ["backbone.depth=4", "compress.stopping.max_blocks=2", "compress.selection.block_metric=average_mAP",
            "compress.alignment.train.epochs=2", "compress.alignment.train.batch_size=2",
            "compress.alignment.train.eval_every=1", "compress.alignment.train.ema_decay=0.5",
            "compress.latency_threads=1"]


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
    steps = history.steps
    assert [s.blocks_dropped for s in steps] == [1, 2]
    assert history.teacher.kept_blocks == [0, 1, 2, 3]
    assert len(steps[-1].kept_blocks) == 2
    gmacs = [history.teacher.cost.gmacs] + [s.cost.gmacs for s in steps]
    params = [history.teacher.cost.params] + [s.cost.params for s in steps]
    assert gmacs[0] > gmacs[1] > gmacs[2] and params[0] > params[1] > params[2]
    # every candidate's score is recorded, keyed by original index, and the dropped block is the one
    # the selection chose (by original index, which a position mix-up would get wrong in step 2)
    assert set(steps[0].selection.scores) == {0, 1, 2, 3} and len(steps[1].selection.scores) == 3
    for s in steps:
        best = max(s.selection.scores, key=lambda k: (s.selection.scores[k], -k))
        assert s.dropped_original == [s.selection.chosen_original] == [best]
    assert steps[1].kept_blocks == sorted(set(range(4)) - {steps[0].dropped_original[0], steps[1].dropped_original[0]})
    # the record holds validation before and after each alignment (epoch 0 = the unaligned student)
    for s in steps:
        assert set(s.align.val_before) >= {"average_mAP", "mAP@0.5"} and s.align.epochs[0]["epoch"] == 1
        assert s.val["average_mAP"] >= s.align.val_before["average_mAP"] - 1e-9
        assert set(s.timings) == {"selection_s", "align_s", "validate_s", "measure_s"}
    model, _ = load_detector(tmp_path / "c" / "model.safetensors")  # loads without the original
    assert kept_blocks(model, stack="backbone.blocks") == steps[-1].kept_blocks
    on_disk = History.load(tmp_path / "c" / "history.json")
    assert on_disk.stopped == "dropped max_blocks=2" and on_disk.to_json() == history.to_json()
    # the run ends with a readable report of the same figures
    report = (tmp_path / "c" / "report.md").read_text()
    dropped = [s.dropped_original[0] for s in steps]
    assert f"2 of 4 blocks dropped (50%; original indices {sorted(dropped)})" in report
    assert f"chose original block {dropped[0]}" in report and f"chose original block {dropped[1]}" in report
    assert f"| step 2 | {dropped[1]} | 2 | {steps[1].cost.gmacs:.3f} |" in report


def test_resume_after_interruptions_gives_the_same_kept_blocks(teacher, tmp_path, monkeypatch):
    config, teacher_path = teacher
    reference = compress_experiment(_cfg(config), teacher=teacher_path, out=tmp_path / "ref", progress=False)

    calls = {"n": 0}
    real_evaluate = recipes.evaluate

    def flaky_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (4, 9):  # inside step 1's alignment (epoch 2), then inside step 2
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
    assert resumed.steps[-1].kept_blocks == reference.steps[-1].kept_blocks
    assert [s.dropped_original for s in resumed.steps] == [s.dropped_original for s in reference.steps]


def test_a_step_that_loses_too_much_accuracy_is_rolled_back(teacher, tmp_path, monkeypatch):
    config, teacher_path = teacher
    scores = iter([60.0] + [10.0] * 50)  # the teacher scores 60 on validation, every student 10
    monkeypatch.setattr(recipes, "evaluate", lambda *a, **k: {"average_mAP": next(scores), "predictions": {}})
    with pytest.raises(BlockdropError, match="no step was kept"):
        compress_experiment(_cfg(config, "compress.stopping.max_accuracy_drop=5"), teacher=teacher_path,
                            out=tmp_path / "rb", progress=False)
    history = History.load(tmp_path / "rb" / "history.json")
    assert history.steps == [] and history.rejected.status == "rolled_back"
    assert "rolled back" in history.stopped and "max_accuracy_drop=5" in history.stopped
    # `blockdrop report` still explains the run that kept nothing
    assert main(["report", str(tmp_path / "rb"), "--no-plot"]) == 0
    report = (tmp_path / "rb" / "report.md").read_text()
    assert "No block was dropped from the 4-block teacher" in report
    assert "(rolled back)" in report and "## Rolled back" in report and "max_accuracy_drop=5" in report
    assert not (tmp_path / "rb" / "report.png").exists()


def test_target_macs_and_one_shot_stopping(teacher, tmp_path):
    config, teacher_path = teacher
    history = compress_experiment(_cfg(config, "compress.stopping.target_macs_reduction=0.01",
                                       "compress.stopping.max_blocks=3"),
                                  teacher=teacher_path, out=tmp_path / "macs", progress=False)
    assert len(history.steps) == 1 and history.stopped.startswith("MACs reduced by")
    one = compress_experiment(_cfg(config, "compress.strategy=one_shot"), teacher=teacher_path,
                              out=tmp_path / "one", progress=False)
    step = one.steps[0]
    assert len(one.steps) == 1 and step.blocks_dropped == 2 and one.stopped == "one-shot drop of 2 blocks"
    # the one-shot choice: the two best candidates of the first selection, by original index
    scores = step.selection.scores
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    assert step.dropped_original == sorted(ranked[:2]) == step.selection.drop
    assert step.kept_blocks == sorted(ranked[2:])
    assert len(step.align.epochs) == 4  # the budget of two progressive steps in one alignment


def test_selection_strategies_from_the_config(teacher, tmp_path):
    """compress.selection.strategy through `blockdrop compress`: truncate-last drops the last kept
    blocks by original index; recovery-aware records its trials in selection.json and the history."""
    config, teacher_path = teacher
    last = compress_experiment(_cfg(config, "compress.selection.strategy=truncate-last"), teacher=teacher_path,
                               out=tmp_path / "last", progress=False)
    assert [s.dropped_original for s in last.steps] == [[3], [2]]
    assert all(s.selection.strategy == "truncate-last" and s.selection.block_forwards == 0 for s in last.steps)
    aware = compress_experiment(_cfg(config, "compress.selection.strategy=recovery-aware", "compress.selection.shortlist=2",
                                     "compress.selection.trial_batches=1", "compress.stopping.max_blocks=1"),
                                teacher=teacher_path, out=tmp_path / "aware", progress=False)
    selection = aware.steps[0].selection
    assert selection.strategy == "recovery-aware" and selection.evaluator == "map"  # shortlisted by the paper's score
    assert selection.trial.evaluator == "map" and selection.trial.metric == "average_mAP"
    assert selection.trial.shortlist == selection.ranking[:2] and selection.trial.batches == 1
    assert aware.steps[0].dropped_original == [selection.trial.ranking[0]] == [selection.chosen_original]
    on_disk = History.selection_from_json(json.loads((tmp_path / "aware" / "step_01" / "selection.json").read_text()),
                                          "selection.json")
    assert on_disk == selection
    report = (tmp_path / "aware" / "report.md").read_text()
    assert f"chose original block {selection.chosen_original}" in report
    assert f"Recovery-aware: the 2 best ({selection.trial.shortlist}) each aligned for 1 batches" in report


def test_drop_only_and_an_alignment_subset_of_videos(teacher, tmp_path, monkeypatch):
    """compress.alignment.videos fine-tunes on a seeded subset of the training videos;
    compress.alignment.enabled=false drops with no recovery: the saved model is the teacher minus
    the chosen blocks, weight for weight, and the first choice equals the aligned run's."""
    config, teacher_path = teacher
    seen, real = [], recipes.make_loader
    monkeypatch.setattr(recipes, "make_loader", lambda ds, *a, **k: seen.append(sorted(ds.annotations.videos))
                        or real(ds, *a, **k))
    aligned = compress_experiment(_cfg(config, "compress.alignment.videos=2"), teacher=teacher_path,
                                  out=tmp_path / "sub", progress=False)
    cfg = _cfg(config)
    train_ids = set(recipes.split_annotations(cfg.data, recipes.load_experiment_annotations(cfg.data),
                                              cfg.train.seed)["train"].videos)
    assert len(seen[0]) == 2 and set(seen[0]) < train_ids
    drop = compress_experiment(_cfg(config, "compress.alignment.enabled=false"), teacher=teacher_path,
                               out=tmp_path / "drop", progress=False)
    assert drop.steps[0].dropped_original == aligned.steps[0].dropped_original
    assert all(s.align.best_epoch is None and s.align.epochs == [] for s in drop.steps)
    assert "none (drop-only)" in (tmp_path / "drop" / "report.html").read_text()
    reference, _ = load_detector(teacher_path)
    from blockdrop.compress.stack import drop_original

    drop_original(reference, drop.dropped_original, stack="backbone.blocks")
    student, _ = load_detector(tmp_path / "drop" / "model.safetensors")
    mine, theirs = student.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_previous_step_teacher_runs_through_the_loop(teacher, tmp_path, monkeypatch):
    """teacher_mode previous: each step aligns to the model it started from (step 2's teacher is
    step 1's merged model, without the block step 1 dropped), and the loop runs through."""
    import blockdrop.compress.progressive as progressive

    config, teacher_path = teacher
    teachers = []
    real_align = progressive.align

    def recording_align(student, teacher_model, *args, **kwargs):
        teachers.append(kept_blocks(teacher_model, stack="backbone.blocks"))
        return real_align(student, teacher_model, *args, **kwargs)

    monkeypatch.setattr(progressive, "align", recording_align)
    history = compress_experiment(_cfg(config, "compress.teacher_mode=previous"), teacher=teacher_path,
                                  out=tmp_path / "prev", progress=False)
    assert [s.blocks_dropped for s in history.steps] == [1, 2]
    assert teachers == [[0, 1, 2, 3], history.steps[0].kept_blocks]
    assert all("loss/feature" in e for s in history.steps for e in s.align.epochs)


def test_stopping_rules():
    history = History(teacher=TeacherRecord(kept_blocks=[0, 1, 2], val={"m": 50.0}, cost=Cost(gmacs=10.0, params=3)),
                      metric="m")
    rules = stopping_rules(max_blocks=2, target_macs_reduction=0.3, max_accuracy_drop=1.0, metric="m")
    assert [r.before(history) for r in rules] == [None, None, None, None]
    step = StepRecord(step=1, dropped_original=[1], kept_blocks=[0, 2], blocks_dropped=1,
                      selection=SelectionRecord("score", "m", True, {0: 1.0, 1: 2.0, 2: 0.5}, 1, 1, [1]),
                      align=AlignRecord(best_epoch=1), val={"m": 48.5}, cost=Cost(gmacs=6.5, params=2))
    assert [r.reject(history, step) for r in rules][2].startswith("step 1 lost 1.50 validation m points")
    step.val["m"] = 49.5
    assert not any(r.reject(history, step) for r in rules)
    history.steps.append(step)
    assert [r.before(history) for r in rules] == [None, "MACs reduced by 35.0% >= target 30%", None, None]
    assert OneShot(2).drop(step.selection) == [0, 1] and Progressive().drop(step.selection) == [1]


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


def _torchrun_compress(teacher, out, settings: list[str]) -> subprocess.CompletedProcess:
    """`blockdrop compress` under torchrun, 2 gloo processes, one thread each."""
    config, teacher_path = teacher
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    sets = [arg for item in settings for arg in ("--set", item)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "blockdrop", "compress", str(config),
                          "--teacher", str(teacher_path), "--out", str(out), "--quiet", *sets],
                         cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_compress_under_torchrun_with_two_gloo_processes(teacher, tmp_path):
    """`blockdrop compress` under PyTorch's launcher: the ranks form one process group (the
    alignment trains with DDP), agree on every dropped block, and leave one run folder written by
    rank 0 whose model loads in a single process."""
    run = _torchrun_compress(teacher, tmp_path / "ddp", COMPRESS)
    assert run.stdout.count("stopped: dropped max_blocks=2") == 1  # one table: rank 0 prints
    history = History.load(tmp_path / "ddp" / "history.json")
    assert history.world_size == 2 and history.stopped == "dropped max_blocks=2"
    steps = history.steps
    assert [s.blocks_dropped for s in steps] == [1, 2]
    for s in steps:  # one writer of the alignment's per-epoch metrics (epoch 0: the unaligned student)
        lines = (tmp_path / "ddp" / f"step_{s.step:02d}" / "align" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    model, _ = load_detector(tmp_path / "ddp" / "model.safetensors")
    assert kept_blocks(model, stack="backbone.blocks") == steps[-1].kept_blocks


def test_recovery_aware_under_torchrun_trains_its_trials_on_every_rank(teacher, tmp_path):
    """recovery-aware's trial alignments train with DDP on both ranks (their selection would hang
    otherwise), rank 0 scores them, and both ranks drop the block it chose."""
    _torchrun_compress(teacher, tmp_path / "ddp", COMPRESS + [
        "compress.stopping.max_blocks=1", "compress.selection.strategy=recovery-aware", "compress.selection.shortlist=2",
        "compress.selection.trial_batches=2"])
    history = History.load(tmp_path / "ddp" / "history.json")
    selection = history.steps[0].selection
    assert history.world_size == 2 and selection.trial.batches == 2 and len(selection.trial.shortlist) == 2
    assert history.steps[0].dropped_original == [selection.trial.ranking[0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compress_runs_on_the_gpu_when_there_is_one(teacher, tmp_path):
    config, teacher_path = teacher
    history = compress_experiment(_cfg(config, "compress.stopping.max_blocks=1"), teacher=teacher_path,
                                  out=tmp_path / "gpu", progress=False)
    assert history.teacher.cost.latency_device.startswith("cuda")
    assert history.steps[0].cost.latency_device.startswith("cuda")
