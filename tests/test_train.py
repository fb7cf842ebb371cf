import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from blockdrop.core.errors import CheckpointError, TrainingError
from blockdrop.core.schema import TrainConfig
from blockdrop.core.training import fit, make_loader, seed_everything, warmup_cosine

from conftest import free_port


def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return x, y


def _loader(x, y, seed=0):
    return make_loader(TensorDataset(x, y), 8, shuffle=True, seed=seed)


def _loss(model, batch):
    x, y = batch
    return {"total": ((model(x).squeeze(-1) - y) ** 2).mean()}


def _run(epochs, out_dir=None, resume=False, seed=0):
    seed_everything(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    x, y = _toy()
    cfg = TrainConfig(epochs=epochs, lr=3e-2, warmup_epochs=1, ema_decay=0.5, seed=seed)
    result = fit(model, _loss, _loader(x, y), cfg, out_dir=out_dir, resume=resume, progress=False)
    return model, result


def test_warmup_cosine_shape():
    factors = [warmup_cosine(s, 100, 10) for s in range(101)]
    assert factors[0] < 0.2 and factors[9] < 1.0 and factors[10] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.0) and all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_training_is_deterministic_and_learns():
    a, ra = _run(20)
    b, rb = _run(20)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    first, last = ra.history[0]["loss/total"], ra.history[-1]["loss/total"]
    assert last < 0.5 * first


def test_resume_continues_to_the_same_weights(tmp_path):
    full, _ = _run(4)
    # a run interrupted after 2 epochs: simulate by running 2 epochs with the 4-epoch schedule
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    x, y = _toy()
    cfg = TrainConfig(epochs=4, lr=3e-2, warmup_epochs=1, ema_decay=0.5)
    loader = _loader(x, y)

    class Stop(Exception):
        pass

    with pytest.raises(Stop):
        _fit_with_stop(model, loader, cfg, tmp_path, Stop)
    seed_everything(0)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    result = fit(fresh, _loss, loader, cfg, out_dir=tmp_path, resume=True, progress=False)
    assert result.epochs_run == 4 and len(result.history) == 4
    for pa, pb in zip(full.parameters(), fresh.parameters()):
        torch.testing.assert_close(pa, pb)


def _fit_with_stop(model, loader, cfg, out_dir, stop):
    calls = {"n": 0}

    def evaluate(m):
        calls["n"] += 1
        if calls["n"] == 3:  # the third epoch's evaluation: epochs 1-2 are saved, epoch 3 is lost
            raise stop
        return {"score": 0.0}

    fit(model, _loss, loader, cfg, out_dir=out_dir, evaluate_fn=evaluate, select_metric="score", progress=False)


def test_selection_follows_the_validation_metric():
    seed_everything(0)
    model = nn.Linear(4, 1)
    x, y = _toy()
    scores = iter([1.0, 5.0, 2.0])
    chosen = []
    result = fit(model, _loss, _loader(x, y), TrainConfig(epochs=3, warmup_epochs=0, ema_decay=0.0),
                 evaluate_fn=lambda m: {"average_mAP": next(scores)},
                 on_best=lambda m, rec: chosen.append(rec["epoch"]), progress=False)
    assert result.best_epoch == 2 and result.best_metric == 5.0 and chosen == [1, 2]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from blockdrop.core import distributed as dist

    torch.set_num_threads(1)
    dist.init_from_env("gloo")
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    x, y = _toy()
    shard = slice(rank * 16, (rank + 1) * 16)  # each rank sees different data
    fit(model, _loss, _loader(x[shard], y[shard]), TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0, ema_decay=0.0),
        progress=False)
    torch.save([p.detach() for p in model.parameters()], f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_on_cpu_with_gloo_keeps_ranks_in_sync(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    p0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b)
    seed_everything(0)
    single = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    assert not torch.allclose(next(single.parameters()), p0[0])  # training changed the weights


def test_a_non_finite_loss_names_epoch_step_and_term_and_restores_the_last_good_state(tmp_path):
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    x, y = _toy()
    calls = []

    def loss(m, batch):  # the 3rd step of epoch 2 goes NaN in its "reg" term
        calls.append(1)
        value = _loss(m, batch)["total"]
        reg = value * (float("nan") if len(calls) == 4 + 3 else 0.0)
        return {"cls": value, "reg": reg, "total": value + reg}

    cfg = TrainConfig(epochs=3, lr=1e-2, warmup_epochs=0, ema_decay=0.0)
    with pytest.raises(TrainingError) as err:
        fit(model, loss, _loader(x, y), cfg, out_dir=tmp_path, progress=False, config_name="compress.alignment.train")
    message = str(err.value)
    assert "'reg' loss term went non-finite at epoch 2, step 3" in message
    assert "the weights of epoch 1 are restored" in message and "compress.alignment.train.lr" in message
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1
    for key, value in model.state_dict().items():  # the model in memory is epoch 1's, not a NaN one
        assert torch.equal(value, state["model"][key]), key


def test_a_resume_after_a_kill_between_log_and_state_logs_each_epoch_once(tmp_path, monkeypatch):
    import blockdrop.core.training as training

    real_save = training._save_state

    def killed_at_epoch_3(path, model, ema, optimizer, scheduler, result, epoch):
        if epoch == 3:
            raise KeyboardInterrupt  # epoch 3 is in metrics.jsonl, its state is not saved
        real_save(path, model, ema, optimizer, scheduler, result, epoch)

    monkeypatch.setattr(training, "_save_state", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _run(4, out_dir=tmp_path)
    monkeypatch.setattr(training, "_save_state", real_save)
    _run(4, out_dir=tmp_path, resume=True)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:100] + b"\0" * 64 + b[164:]])
def test_a_damaged_resume_state_is_one_clear_error(tmp_path, damage):
    _run(2, out_dir=tmp_path)
    path = tmp_path / "train_state.pt"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=r"train_state.pt: cannot resume from it .*--overwrite"):
        _run(3, out_dir=tmp_path, resume=True)


def test_patience_stops_after_that_many_epochs_without_a_better_score_and_a_resume_agrees(tmp_path):
    x, y = _toy()
    cfg = TrainConfig(epochs=10, warmup_epochs=0, ema_decay=0.0, patience=2)

    def run(scores, out_dir=None, resume=False):
        seed_everything(0)
        it = iter(scores)
        return fit(nn.Linear(4, 1), _loss, _loader(x, y), cfg, evaluate_fn=lambda m: {"average_mAP": next(it)},
                   out_dir=out_dir, resume=resume, progress=False)

    result = run([1.0, 3.0, 2.0, 2.5, 9.0, 9.0])  # best at epoch 2; epochs 3, 4 are no better: stop
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    assert len(result.history) == 4
    assert not run([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]).stopped_early
    # a resumed run that had reached the plateau stops at once, where the original did
    run([1.0, 3.0, 2.0, 2.5], out_dir=tmp_path)
    resumed = run([], out_dir=tmp_path, resume=True)
    assert resumed.stopped_early and resumed.epochs_run == 4
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)


def test_min_delta_counts_only_gains_larger_than_it():
    x, y = _toy()
    scores = [1.0, 3.0, 3.2, 3.3, 3.35, 9.0]  # after epoch 2 the gains are 0.2, 0.1, 0.05: none above 0.5
    it = iter(scores)
    cfg = TrainConfig(epochs=6, warmup_epochs=0, ema_decay=0.0, patience=3, min_delta=0.5)
    seed_everything(0)
    result = fit(nn.Linear(4, 1), _loss, _loader(x, y), cfg, evaluate_fn=lambda m: {"average_mAP": next(it)},
                 progress=False)
    # stopped 3 epochs after epoch 2, the last real gain; the model kept is still the best scored (epoch 5)
    assert result.stopped_early and result.epochs_run == 5 and result.best_epoch == 5


def test_a_schedule_that_ends_on_a_plateau_is_recorded_as_one():
    x, y = _toy()
    cfg = TrainConfig(epochs=6, warmup_epochs=0, ema_decay=0.0, patience=3, min_delta=0.5)

    def run(scores):
        it = iter(scores)
        seed_everything(0)
        return fit(nn.Linear(4, 1), _loss, _loader(x, y), cfg, evaluate_fn=lambda m: {"average_mAP": next(it)},
                   progress=False)

    flat = run([1.0, 2.0, 4.0, 4.1, 4.2, 4.3])  # last real gain at epoch 3; 3 epochs later the schedule ends
    assert flat.plateaued and not flat.stopped_early and flat.epochs_run == 6
    rising = run([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert not rising.plateaued and not rising.stopped_early
