"""compress.selection: every evaluator, shared-prefix == naive, and the counted block forwards.

References are independent of the code under test: the toy model's feature scores are computed
by hand from its blocks, and the shared-prefix pass is checked against running every candidate
from scratch through ``run_blocks(skip=k)``.
"""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from blockdrop.compress.selection import Halving, select_block
from blockdrop.compress.stack import drop_blocks
from blockdrop.core.errors import BlockdropError

from conftest import make_sequence_dataset

torch.set_num_threads(1)
EVALUATORS = ("map", "loss", "feature_mse", "feature_cosine")


# ---- a minimal target for a toy residual model ---------------------------------------------------

class ResidualMLP(nn.Module):
    def __init__(self, width: int, scale: float = 1.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        with torch.no_grad():
            self.fc2.weight.mul_(scale)
            self.fc2.bias.mul_(scale)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return x + self.fc2(torch.relu(self.fc1(x)))


class ToyNet(nn.Module):
    """(B, T, 6) -> (B, 3): linear embed, residual MLP blocks, mean over T, linear head."""

    def __init__(self, depth: int = 5, width: int = 6, quiet: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(ResidualMLP(width, 1e-4 if i == quiet else 3.0) for i in range(depth))
        self.head = nn.Linear(width, 3)


class SequentialTarget:
    """CompressionTarget for ToyNet: predict returns outputs, score is the negative MSE."""

    stack_path = "blocks"
    trainable = ()
    distill_terms = ()

    def embed(self, model, batch):
        return model.embed(batch["x"]), None

    def call_block(self, block, tokens, ctx):
        return block(tokens)

    def distill(self, student, s_out, teacher, t_out, batch, weights):
        return {}

    def finish(self, model, tokens, ctx, batch):
        return model.head(tokens.mean(dim=1))  # (B, 3)

    def task_loss(self, model, output, batch):
        return {"total": (output - batch["y"]).pow(2).mean()}

    def predict(self, model, output, batch):
        return list(zip(output, batch["y"]))

    def score(self, predictions):
        outputs, targets = torch.stack([p for p, _ in predictions]), torch.stack([t for _, t in predictions])
        return {"neg_mse": -float((outputs - targets).pow(2).mean())}


def full_forward(model, x):
    h = model.embed(x)
    for block in model.blocks:
        h = block(h)
    return model.head(h.mean(dim=1))


def toy_batches(model, sizes=(3, 3, 2), tokens: int = 4):
    """Targets are the full model's outputs: removing a near-identity block changes them least."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for size in sizes:
        x = torch.randn(size, tokens, 6, generator=generator)
        with torch.no_grad():
            batches.append({"x": x, "y": full_forward(model, x)})
    return batches


def toy_select(model, batches, evaluator, **kwargs):
    metric = "neg_mse" if evaluator == "map" else "unused"
    return select_block(model, SequentialTarget(), batches, evaluator=evaluator, metric=metric, **kwargs)


# ---- the toy model -------------------------------------------------------------------------------

@pytest.mark.parametrize("quiet", [1, 3])
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_every_evaluator_picks_the_near_identity_block(evaluator, quiet):
    model = ToyNet(quiet=quiet)
    result = toy_select(model, toy_batches(model), evaluator)
    assert result.chosen == result.chosen_original == quiet
    assert result.higher_is_better is (evaluator == "map")
    assert sorted(result.scores) == list(range(5))


@pytest.mark.parametrize("evaluator", ["map", "loss"])
def test_shared_prefix_equals_naive_on_the_toy_model(evaluator):
    model = ToyNet(depth=6, quiet=4)
    batches = toy_batches(model)
    cached, naive = toy_select(model, batches, evaluator), toy_select(model, batches, evaluator, naive=True)
    assert cached.chosen == naive.chosen == 4 and not cached.naive and naive.naive
    assert cached.scores.keys() == naive.scores.keys()
    for k in cached.scores:
        assert cached.scores[k] == pytest.approx(naive.scores[k], abs=1e-6, rel=0)
    n, b = 6, len(batches)
    assert cached.block_forwards == b * ((n - 1) + n * (n - 1) // 2)
    assert naive.block_forwards == naive.naive_block_forwards == cached.naive_block_forwards == b * n * (n - 1)


def _by_hand(model, batches):
    """Block influence computed from the blocks' inputs and outputs over all tokens of all batches."""
    inputs, outputs = [[] for _ in model.blocks], [[] for _ in model.blocks]
    with torch.no_grad():
        for batch in batches:
            h = model.embed(batch["x"])
            for k, block in enumerate(model.blocks):
                inputs[k].append(h.reshape(-1, h.shape[-1]))
                h = block(h)
                outputs[k].append(h.reshape(-1, h.shape[-1]))
    mse, cosine = {}, {}
    for k in range(len(model.blocks)):
        x, y = torch.cat(inputs[k]).double(), torch.cat(outputs[k]).double()  # (tokens, C)
        mse[k] = float(((y - x) ** 2).mean())
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        cosine[k] = float((1 - cos).mean())
    return {"feature_mse": mse, "feature_cosine": cosine}


@pytest.mark.parametrize("evaluator", ["feature_mse", "feature_cosine"])
def test_feature_scores_equal_a_hand_computation(evaluator):
    model = ToyNet(quiet=2)
    batches = toy_batches(model, sizes=(3, 1, 2))  # unequal batches: weights are per token
    result = toy_select(model, batches, evaluator, naive=True)  # no naive variant: same single forward
    expected = _by_hand(model, batches)[evaluator]
    for k, value in expected.items():
        assert result.scores[k] == pytest.approx(value, rel=1e-9)
    assert result.chosen == min(expected, key=expected.get) == 2
    assert result.block_forwards == result.naive_block_forwards == 3 * 5 and not result.naive


def test_scores_use_original_indices_after_a_drop():
    model = ToyNet(depth=6, quiet=4)
    drop_blocks(model, [1])  # originals now 0, 2, 3, 4, 5
    batches = toy_batches(model)
    for evaluator in EVALUATORS:
        result = toy_select(model, batches, evaluator)
        assert sorted(result.scores) == [0, 2, 3, 4, 5]
        assert (result.chosen, result.chosen_original) == (3, 4), evaluator
    record = result.to_dict()
    assert json.loads(json.dumps(record)) == record and set(record["scores"]) == {"0", "2", "3", "4", "5"}


def test_candidates_restrict_the_choice_and_the_work():
    model = ToyNet(depth=5, quiet=3)
    batches = toy_batches(model)
    result = toy_select(model, batches, "loss", candidates=[0, 1])
    assert sorted(result.scores) == [0, 1] and result.chosen in (0, 1)
    full = toy_select(model, batches, "loss")
    assert result.scores == {k: full.scores[k] for k in (0, 1)}
    assert result.block_forwards == 3 * (1 + 4 + 3)  # prefix to block 1, then branches of 4 and 3
    with pytest.raises(BlockdropError, match="candidates"):
        toy_select(model, batches, "loss", candidates=[5])


def test_ties_go_to_the_lowest_position_and_the_model_is_left_as_it_was():
    model = ToyNet(depth=4)
    with torch.no_grad():
        for block in model.blocks:
            block.fc2.weight.zero_()
            block.fc2.bias.zero_()  # every block is the identity: all candidates tie
    model.train()
    batches = toy_batches(model)
    for evaluator in EVALUATORS:
        result = toy_select(model, batches, evaluator)
        assert result.chosen == 0, evaluator
    assert all(m.training for m in model.modules())
    assert all(not b._forward_pre_hooks for b in model.blocks)


def test_refusals_name_the_problem():
    model = ToyNet(depth=2)
    batches = toy_batches(model)
    with pytest.raises(BlockdropError, match="evaluator 'mAP'"):
        toy_select(model, batches, "mAP")
    with pytest.raises(BlockdropError, match="needs metric="):
        select_block(model, SequentialTarget(), batches, evaluator="map")
    with pytest.raises(BlockdropError, match="metric 'average_mAP' is not among the target's scores"):
        select_block(model, SequentialTarget(), batches, evaluator="map", metric="average_mAP")
    with pytest.raises(BlockdropError, match="no batches"):
        toy_select(model, [], "loss")
    drop_blocks(model, [0])
    with pytest.raises(BlockdropError, match="1 block"):
        toy_select(model, batches, "loss")


# ---- a tiny Detector -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector_setup(tmp_path_factory):
    from blockdrop.recipes.build import build_detector, load_experiment_annotations, make_dataset, make_source
    from blockdrop.tad.target import DetectorTarget
    from blockdrop.core.config import from_dict
    from blockdrop.data.dataset import collate_windows
    from blockdrop.core.schema import ExperimentConfig

    root = tmp_path_factory.mktemp("selection") / "data"
    make_sequence_dataset(root, videos=3, length=160, starts=(20, 100), durations=(20, 40), subsets=["train"] * 3)
    cfg = from_dict(ExperimentConfig, {
        "data": {"kind": "sequence", "root": str(root), "window": 64, "test_stride": 48},
        "backbone": {"kind": "sequence", "depth": 4, "width": 32, "heads": 2, "patch": 4, "drop_path": 0.0},
        "head": {"embed_dim": 32, "fpn_dim": 32, "head_dim": 32, "attn_window": 5}})
    annotations = load_experiment_annotations(cfg.data).subset("train")
    source = make_source(cfg.data, annotations)
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3, in_channels=3)
    dataset = make_dataset(cfg, annotations, source, train=False, feature_stride=model.feature_stride)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collate_windows)
    return model, DetectorTarget(dataset, cfg.eval), loader


@pytest.mark.parametrize("evaluator", ["map", "loss"])
def test_shared_prefix_equals_naive_on_a_tiny_detector(detector_setup, evaluator):
    model, target, loader = detector_setup
    cached = select_block(model, target, loader, evaluator=evaluator, metric="mAP@0.5")
    naive = select_block(model, target, loader, evaluator=evaluator, metric="mAP@0.5", naive=True)
    assert cached.chosen == naive.chosen and sorted(cached.scores) == [0, 1, 2, 3]
    for k in cached.scores:
        assert math.isfinite(cached.scores[k])
        assert cached.scores[k] == pytest.approx(naive.scores[k], abs=1e-6, rel=0)
    n, b = 4, cached.batches
    assert b == len(loader) > 1
    assert cached.block_forwards == b * ((n - 1) + n * (n - 1) // 2)
    assert naive.block_forwards == cached.naive_block_forwards == b * n * (n - 1)
    if evaluator == "loss":  # untrained detectors may tie at 0 mAP; losses always differ
        assert len(set(cached.scores.values())) == n


# ---- successive halving over the data ------------------------------------------------------------

def shared_prefix_cost(depth: int, alive: list[int]) -> int:
    """Block forwards of one shared-prefix batch for these candidates (the docstring's formula)."""
    return max(alive) + sum(depth - 1 - k for k in alive)


@pytest.mark.parametrize("evaluator", ["map", "loss"])
def test_successive_halving_keeps_the_best_and_spends_less(evaluator):
    model = ToyNet(depth=6, quiet=4)
    batches = toy_batches(model, sizes=(2,) * 8)
    full = toy_select(model, batches, evaluator)
    halved = toy_select(model, batches, evaluator, halving=Halving(first=1, keep=0.5, final=0))
    assert halved.chosen_original == full.chosen_original == 4
    # rounds at 1, 2, 4 batches: 6 -> 3 -> 2 -> 1 candidates, then no more data is read
    assert [r["batches"] for r in halved.rounds] == [1, 2, 4]
    assert [len(r["candidates"]) for r in halved.rounds] == [6, 3, 2]
    assert 4 in halved.rounds[-1]["candidates"] and halved.batches == 4
    survivors = [r["candidates"] for r in halved.rounds]
    expected = (shared_prefix_cost(6, survivors[0]) + shared_prefix_cost(6, survivors[1])
                + 2 * shared_prefix_cost(6, survivors[2]))  # batches 1 | 2 | 3-4: nothing computed twice
    assert halved.block_forwards == expected < full.block_forwards
    assert set(halved.scores) == set(range(6))  # an eliminated candidate keeps its last round's score
    for r in halved.rounds:  # each round's scores are the candidate's scores on the batches seen so far
        partial = toy_select(model, batches[: r["batches"]], evaluator)
        for k, v in r["scores"].items():
            assert v == pytest.approx(partial.scores[int(k)], abs=1e-9)


def test_halving_with_a_first_round_as_large_as_the_data_is_the_exhaustive_choice():
    model = ToyNet(depth=5, quiet=2)
    batches = toy_batches(model)
    full = toy_select(model, batches, "map")
    halved = toy_select(model, batches, "map", halving=Halving(first=len(batches), keep=0.5, final=0))
    assert halved.chosen == full.chosen and halved.scores == pytest.approx(full.scores)
    assert halved.block_forwards == full.block_forwards
    with pytest.raises(BlockdropError, match="successive halving needs"):
        Halving(first=0)


def test_halving_on_a_tiny_detector_scores_partial_data_against_the_videos_seen(detector_setup):
    from blockdrop.tad.inference import score_windows

    model, target, loader = detector_setup
    halved = select_block(model, target, loader, evaluator="loss", halving=Halving(first=1, keep=0.5))
    assert halved.rounds[0]["batches"] == 1 and len(halved.rounds[0]["candidates"]) == 4
    assert halved.chosen_original in halved.rounds[-1]["candidates"]
    # one batch's predictions are scored against the videos they cover: per class, AP over the whole
    # set is the AP over the seen videos scaled by (instances seen / all instances), recall being the
    # only thing that changes
    batch = next(iter(loader))
    with torch.no_grad():
        preds = target.predict(model, model(batch["inputs"], batch["mask"]), batch)
    annotations = target.dataset.annotations
    seen = set(batch["video_id"])
    assert seen < set(annotations.videos)
    restricted = target.score(preds)
    whole = score_windows(preds, annotations, target.dataset.rate, target.eval_cfg)
    part = score_windows(preds, dataclasses.replace(annotations, videos={v: i for v, i in annotations.videos.items()
                                                                           if v in seen}), target.dataset.rate,
                         target.eval_cfg)
    assert restricted["mAP@0.5"] == part["mAP@0.5"]
    def count(label, videos):
        return sum(seg.label == label for v in videos for seg in annotations.videos[v].segments)

    for label, ap in part["per_class"].items():
        scale = count(label, seen) / count(label, annotations.videos)
        assert whole["per_class"][label][0.5] == pytest.approx(ap[0.5] * scale)


def test_halving_finalists_decide_on_all_the_data():
    """final=0.33 of 6 candidates: halving stops at two, which are then scored on every batch, so
    their final scores are the full-data ones and the choice between them is the exhaustive choice."""
    model = ToyNet(depth=6, quiet=4)
    batches = toy_batches(model, sizes=(2,) * 8)
    full = toy_select(model, batches, "map")
    assert [Halving(final=0.33).finalists(n) for n in (5, 6, 9, 10, 11, 12)] == [2, 2, 3, 4, 4, 4]
    assert Halving(final=0).finalists(12) == 1 and Halving(final=0.5).finalists(6) == 3
    halved = toy_select(model, batches, "map", halving=Halving(first=1, keep=0.5, final=0.33))
    assert [r["batches"] for r in halved.rounds] == [1, 2, 8] and halved.batches == 8
    assert [len(r["candidates"]) for r in halved.rounds] == [6, 3, 2]
    finalists = halved.rounds[-1]["candidates"]
    for k in finalists:
        assert halved.scores[k] == pytest.approx(full.scores[k], abs=1e-12)
    assert halved.chosen_original == max(finalists, key=lambda k: full.scores[k]) == full.chosen_original == 4
    assert halved.ranking[:2] == sorted(finalists, key=lambda k: -full.scores[k])  # finalists first
    survivors = [r["candidates"] for r in halved.rounds]
    assert halved.block_forwards == (shared_prefix_cost(6, survivors[0]) + shared_prefix_cost(6, survivors[1])
                                     + 6 * shared_prefix_cost(6, survivors[2]))
    # as many finalists as candidates: no round is cut short, the exhaustive pass
    everyone = toy_select(model, batches, "map", halving=Halving(first=1, keep=0.5, final=1.0))
    assert everyone.block_forwards == full.block_forwards and everyone.scores == pytest.approx(full.scores)
