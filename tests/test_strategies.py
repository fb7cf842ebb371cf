"""compress.strategies: every selection strategy on a tiny model with a planted answer.

The planted answers are built into the models, not computed by the code under test: a
near-identity block (the pre-recovery strategies and block influence must pick it), the last kept
block by original index (truncate-last), and a stub trial alignment that repairs exactly one
candidate, the one with the worst pre-alignment score (recovery-aware must follow it).
"""

import copy
import json

import pytest
import torch

from blockdrop.compress.history import History, SelectionRecord, TrialRecord
from blockdrop.compress.lora import lora_layers
from blockdrop.compress.rules import OneShot, Progressive
from blockdrop.compress.selection import Halving, select_block
from blockdrop.compress.stack import drop_original, kept_blocks
from blockdrop.compress.strategies import (BlockInfluence, PreRecovery, RecoveryAware, SelectionContext, TruncateLast,
                                           align_loss, selection_strategy)
from blockdrop.core.errors import BlockdropError
from blockdrop.core.schema import AlignmentConfig, CompressConfig, SelectionConfig, StoppingConfig, TrainConfig

from test_selection import SequentialTarget, ToyNet, toy_batches

torch.set_num_threads(1)
ALIGNMENT = AlignmentConfig(lora_targets=("fc1",), train=TrainConfig(epochs=1, lr=1e-2, warmup_epochs=0, ema_decay=0.0))


def context(model, batches, **changes) -> SelectionContext:
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    fields = dict(target=SequentialTarget(), data=batches, align_target=SequentialTarget(), train_data=batches,
                  teacher=teacher, alignment=ALIGNMENT)
    return SelectionContext(**{**fields, **changes})


def snapshot(model) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": [m.training for m in model.modules()], "kept": kept_blocks(model),
            "hooks": sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.blocks)}


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert after["grad"] == before["grad"] and after["training"] == before["training"]
    assert after["kept"] == before["kept"] and after["hooks"] == before["hooks"] == 0
    assert not lora_layers(model)


# ---- the pre-recovery strategies: a near-identity block --------------------------------------------

@pytest.mark.parametrize("quiet", [1, 3])
@pytest.mark.parametrize("strategy", [PreRecovery("map", "neg_mse"), PreRecovery("loss"), PreRecovery("feature_mse"),
                                      BlockInfluence()], ids=["map", "loss", "feature_mse", "block-influence"])
def test_the_pre_recovery_strategies_pick_the_near_identity_block(strategy, quiet):
    model = ToyNet(quiet=quiet)
    record = strategy.select(model, context(model, toy_batches(model)))
    assert record.chosen == record.chosen_original == quiet == record.ranking[0]
    assert record.strategy == strategy.name and sorted(record.ranking) == list(range(5)) and record.trial is None
    assert record.evaluator == getattr(strategy, "evaluator", "feature_cosine") and record.block_forwards > 0
    assert Progressive().drop(record) == [quiet]


def test_truncate_last_drops_the_last_kept_block_by_original_index():
    model = ToyNet(depth=6, quiet=1)  # a near-identity block elsewhere changes nothing
    drop_original(model, [5, 2])  # kept originals 0, 1, 3, 4: the last is original 4, at position 3
    before = snapshot(model)
    record = TruncateLast().select(model, context(model, []))  # no data needed
    assert (record.chosen, record.chosen_original) == (3, 4) and record.ranking == [4, 3, 1, 0]
    assert record.block_forwards == 0 and record.batches == 0 and record.strategy == "truncate-last"
    assert OneShot(2).drop(record) == [3, 4]
    assert_unchanged(model, before)
    drop_original(model, [4, 3, 1])
    with pytest.raises(BlockdropError, match="1 block"):
        TruncateLast().select(model, context(model, []))


# ---- recovery-aware ---------------------------------------------------------------------------------

class RepairOne:
    """A stub trial alignment: the candidate without block ``repaired`` comes back as the full
    teacher (a perfect recovery), every other one as it was given. Records what it was handed."""

    def __init__(self, repaired: int):
        self.repaired, self.calls = repaired, []

    def __call__(self, student, teacher, batches, ctx):
        missing = sorted(set(kept_blocks(teacher)) - set(kept_blocks(student)))
        self.calls.append({"student": student, "missing": missing, "batches": [id(b) for b in batches],
                           "draw": float(torch.rand(()))})
        return copy.deepcopy(teacher) if missing == [self.repaired] else student


def test_recovery_aware_follows_the_post_alignment_scores():
    """The candidate with the WORST pre-alignment score is the best after its trial: it is chosen,
    and both rankings are recorded."""
    model = ToyNet(quiet=2)
    batches = toy_batches(model, sizes=(3, 3, 2, 2))
    ctx = context(model, batches)
    pre = select_block(model, SequentialTarget(), batches, evaluator="feature_cosine").ranking  # the cheap ranking
    worst = pre[-1]
    stub = RepairOne(worst)
    record = RecoveryAware(shortlist=5, batches=3, evaluator="loss", shortlist_by="feature_cosine",
                           trial=stub).select(model, ctx)
    assert worst != 2 and record.ranking == pre and record.ranking[0] == 2  # block influence: 2 first, worst last
    assert record.chosen_original == worst == record.trial.ranking[0] == Progressive().drop(record)[0]
    assert record.chosen == worst  # nothing dropped yet: position == original index
    assert record.trial.scores[worst] == pytest.approx(0.0, abs=1e-12)  # the teacher itself: no loss
    assert all(record.trial.scores[k] > 0 for k in record.trial.scores if k != worst)
    assert record.trial.shortlist == pre and record.trial.batches == 3 and record.trial.evaluator == "loss"
    assert record.strategy == "recovery-aware" and record.order[0] == worst
    # every candidate got the same batches and the same random state: only the candidate differs
    assert [c["missing"] for c in stub.calls] == [[k] for k in pre]
    assert len({tuple(c["batches"]) for c in stub.calls}) == 1 and len(stub.calls[0]["batches"]) == 3
    assert len({c["draw"] for c in stub.calls}) == 1
    assert record.wall_time_s >= record.trial.wall_time_s > 0 and record.block_forwards > record.trial.block_forwards > 0


def test_recovery_aware_shortlists_by_the_cheap_score_and_trains_only_the_shortlist():
    model = ToyNet(quiet=4)
    batches = toy_batches(model)
    stub = RepairOne(repaired=0)  # outside the shortlist: never trained, so it cannot win
    record = RecoveryAware(shortlist=2, batches=1, evaluator="map", metric="neg_mse", trial=stub).select(
        model, context(model, batches))
    assert record.trial.shortlist == record.ranking[:2] and 0 not in record.trial.shortlist
    assert [c["missing"][0] for c in stub.calls] == record.trial.shortlist
    assert record.chosen_original in record.trial.shortlist and record.trial.higher_is_better


def test_recovery_aware_trials_run_on_copies_and_leave_the_student_untouched():
    """The real trial (LoRA through `align`, merged): the student, its flags and modes, and the
    teacher come back as they were; every trial got its own copy."""
    model = ToyNet(quiet=3)
    model.train()
    batches = toy_batches(model)
    ctx = context(model, batches)
    before, teacher_before = snapshot(model), snapshot(ctx.teacher)
    seen = []

    class Spy(RepairOne):
        def __call__(self, student, teacher, batches, ctx):
            seen.append(student)
            return RecoveryAware().trial(student, teacher, batches, ctx)  # the default LoraTrial

    record = RecoveryAware(shortlist=3, batches=2, evaluator="loss", trial=Spy(-1)).select(model, ctx)
    assert_unchanged(model, before)
    assert_unchanged(ctx.teacher, teacher_before)
    assert len(seen) == 3 and all(s is not model for s in seen) and len({id(s) for s in seen}) == 3
    assert record.chosen_original == 3  # the near-identity block still recovers best
    assert record.trial.block_forwards > 0


def test_recovery_aware_without_a_model_score_ranks_trials_by_the_alignment_loss():
    model = ToyNet(quiet=1)
    batches = toy_batches(model)
    ctx = context(model, batches)
    record = RecoveryAware(shortlist=2, batches=1, evaluator="feature_cosine").select(model, ctx)
    assert record.trial.evaluator == "align_loss" and not record.trial.higher_is_better
    aligned = copy.deepcopy(model)
    drop_original(aligned, [record.trial.shortlist[0]])
    unaligned_loss, _ = align_loss(aligned, ctx.teacher, ctx.target, batches)
    assert unaligned_loss > 0 and record.chosen_original == 1


def test_one_shot_follows_the_post_alignment_ranking_first():
    trial = TrialRecord(shortlist=[1, 2], batches=4, evaluator="loss", metric=None, higher_is_better=False,
                        scores={1: 0.5, 2: 0.1}, ranking=[2, 1])
    record = SelectionRecord("feature_cosine", None, False, {0: 0.3, 1: 0.1, 2: 0.2, 3: 0.4}, 2, 2, [],
                             strategy="recovery-aware", trial=trial)
    assert record.ranking == [1, 2, 0, 3] and record.order == [2, 1, 0, 3]
    assert OneShot(3).drop(record) == [0, 1, 2]


# ---- from the config ----------------------------------------------------------------------------

def test_the_config_names_the_strategy_and_its_settings():
    def cfg(**selection):
        return CompressConfig(selection=SelectionConfig(**selection), stopping=StoppingConfig(max_blocks=1))

    assert isinstance(selection_strategy(cfg()), PreRecovery)
    assert selection_strategy(cfg(search="halving", halving_first=4)).halving == Halving(4, 0.5, 0.33)
    assert isinstance(selection_strategy(cfg(strategy="block-influence")), BlockInfluence)
    assert isinstance(selection_strategy(cfg(strategy="truncate-last")), TruncateLast)
    aware = selection_strategy(cfg(strategy="recovery-aware", shortlist=4, trial_batches=6, shortlist_by="loss"))
    assert (aware.shortlist, aware.batches, aware.shortlist_by, aware.evaluator) == (4, 6, "loss", "map")
    default = selection_strategy(cfg(strategy="recovery-aware", search="halving"))
    assert (default.shortlist, default.batches, default.ranked_by) == (3, 4, "map")  # the paper's ranking
    assert default.halving == Halving(8, 0.5, 0.33)  # the shortlist's ranking halves as configured
    drop_only = CompressConfig(selection=SelectionConfig(strategy="recovery-aware"), stopping=StoppingConfig(max_blocks=1),
                               alignment=AlignmentConfig(enabled=False))
    with pytest.raises(BlockdropError, match="recovery-aware .* compress.alignment.enabled is false"):
        selection_strategy(drop_only)


@pytest.mark.parametrize("override, message", [
    ("compress.selection.strategy=recovery_aware", r"compress\.selection\.strategy.*recovery-aware"),
    ("compress.selection.shortlist=1", r"compress\.selection: 'shortlist' must be at least 2"),
    ("compress.selection.trial_batches=0", r"compress\.selection: 'trial_batches' must be positive"),
    ("compress.selection.halving_final=1.5", r"compress\.selection: 'halving_final' must be in \[0, 1\]"),
    ("compress.selection.shortlist_by=cosine", r"compress\.selection\.shortlist_by"),
])
def test_bad_selection_settings_are_refused_at_load_naming_the_key(tmp_path, override, message):
    from blockdrop.core.config import load_config
    from blockdrop.core.errors import ConfigError
    from blockdrop.core.schema import ExperimentConfig

    from conftest import tiny_config

    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, tiny_config(tmp_path), [override])


def test_a_target_that_cannot_serve_the_shortlist_score_is_refused_naming_the_key():
    class Unscored(SequentialTarget):
        predict = score = None

    with pytest.raises(BlockdropError, match="compress.selection.evaluator: unknown evaluator"):
        PreRecovery("mAP").check(SequentialTarget())
    with pytest.raises(BlockdropError, match="compress.selection.block_metric"):
        PreRecovery("map", None).check(SequentialTarget())
    from blockdrop.compress.target import FeatureTarget

    feature = FeatureTarget(stack_path="blocks", embed=lambda m, b: (m.embed(b["x"]), None),
                            finish=lambda m, t, c, b: t)
    with pytest.raises(BlockdropError, match="compress.selection.shortlist_by: 'loss' needs the target's task_loss"):
        RecoveryAware(shortlist_by="loss", evaluator="feature_cosine").check(feature)
    RecoveryAware(evaluator="feature_cosine").check(feature)  # scored by the alignment loss: fine


def test_a_recovery_aware_record_survives_its_step_file():
    """What `select` returns is what resume reads back from step_NN/selection.json."""
    model = ToyNet(quiet=2)
    record = RecoveryAware(shortlist=3, batches=1, evaluator="loss", trial=RepairOne(4)).select(
        model, context(model, toy_batches(model)))
    record.drop = Progressive().drop(record)
    again = History.selection_from_json(json.loads(json.dumps(History.selection_to_json(record))), "selection.json")
    assert again == record and again.trial.ranking == record.trial.ranking and again.order == record.order
