"""compress_model and FeatureTarget: the engine on models that are not our detector.

References: the models' own forward (transformers' BertModel / Dinov2Model, a timm-shaped toy)
for what FeatureTarget runs; blocks planted as near-identities for which block the loop must drop.
"""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from blockdrop.compress import FeatureTarget, History, compress_model
from blockdrop.compress.lora import default_targets, lora_layers
from blockdrop.compress.saving import load_compressed, read_compressed_metadata
from blockdrop.compress.stack import kept_blocks
from blockdrop.compress.target import run_blocks
from blockdrop.core.errors import BlockdropError
from blockdrop.core.schema import TrainConfig

from conftest import import_transformers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "compression.md"
ONE_EPOCH = TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, ema_decay=0.0)


def tiny_bert(layers: int = 4, init: float = 0.2):
    transformers = import_transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, initializer_range=init)
    return transformers.BertModel(config).eval()


def sentences(seed: int, n: int = 6, pad_from: int = 9) -> dict:
    ids = torch.randint(1, 100, (n, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---- FeatureTarget runs what the model runs --------------------------------------------------------

def test_feature_target_equals_the_transformers_forward_with_padding():
    model, batch = tiny_bert(), sentences(1)
    target = FeatureTarget(model)
    assert target.stack_path == "encoder.layer" and target.trainable == ()
    with torch.no_grad():
        ours = run_blocks(model, target, batch)
        theirs = model(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=0, atol=1e-6)
    assert default_targets(model.encoder.layer[0]) == (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def test_feature_target_equals_dinov2s_forward():
    transformers = import_transformers()
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, patch_size=4,
        image_size=16)).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = run_blocks(model, FeatureTarget(model), pixels)
        theirs = model(pixel_values=pixels).last_hidden_state  # after its final layernorm
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


class TimmShaped(nn.Module):
    """The attribute names timm's VisionTransformer.forward_features uses, around our own blocks."""

    def __init__(self, depth: int = 3, width: int = 16):
        super().__init__()
        from blockdrop.models.vit import Block

        torch.manual_seed(0)
        self.patch_embed = nn.Linear(12, width)  # (B, N, 12) "patches" -> tokens
        self.pos_embed = nn.Parameter(torch.randn(1, 5, width) * 0.1)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*(Block(width, 2, qkv_bias="all") for _ in range(depth)))
        self.norm = nn.LayerNorm(width)

    def _pos_embed(self, x):
        return x + self.pos_embed

    def forward_features(self, x):
        return self.norm(self.blocks(self.norm_pre(self._pos_embed(self.patch_embed(x)))))


def test_feature_target_follows_timm_forward_features():
    model, x = TimmShaped().eval(), torch.randn(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(run_blocks(model, FeatureTarget(model), x), model.forward_features(x),
                                   rtol=0, atol=0)
    assert default_targets(model.blocks[0]) == ("attn.qkv", "attn.proj")


def test_a_model_of_no_known_family_needs_embed_and_finish():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(BlockdropError, match="pass embed= and finish="):
        FeatureTarget(Plain())


# ---- the documented example -----------------------------------------------------------------------

def test_the_documented_example_runs(capsys):
    import_transformers()
    text = DOCS.read_text()
    code = re.search(r"<!-- example: compress_model -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102  (our own documentation)
    history, student = namespace["history"], namespace["student"]
    step = history.steps[0]
    assert len(history.steps) == 1 and len(kept_blocks(student)) == 3 and not lora_layers(student)
    assert step.val["cosine"] >= step.align.val_before["cosine"]  # never worse than unaligned
    assert step.cost.gmacs < history.teacher.cost.gmacs
    assert f"dropped {step.dropped_original}" in capsys.readouterr().out


# ---- the loop through compress_model ---------------------------------------------------------------

class PlantedResidual(nn.Module):
    """(B, T, C) -> (B, T, C): x + scale * mlp(x); a tiny scale makes a near-identity block."""

    def __init__(self, width: int, scale: float):
        super().__init__()
        self.fc1, self.fc2, self.scale = nn.Linear(width, width), nn.Linear(width, width), scale

    def forward(self, x):
        return x + self.scale * self.fc2(torch.tanh(self.fc1(x)))


class Planted(nn.Module):
    def __init__(self, quiet: dict, depth: int = 5, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(PlantedResidual(width, quiet.get(i, 2.0)) for i in range(depth))
        self.head = nn.Linear(width, 1)


def planted_target(model: Planted) -> FeatureTarget:
    """Scored: the negative output MSE to the full model's, so 'score' ranks sub-networks."""
    def score(outputs, batches):
        error = sum(float((o - b["y"]).pow(2).sum()) for o, b in zip(outputs, batches))
        return {"neg_mse": -error / sum(o.numel() for o in outputs)}

    return FeatureTarget(stack_path="blocks", embed=lambda m, b: (m.embed(b["x"]), None),
                         finish=lambda m, t, ctx, b: m.head(t).squeeze(-1), score=score)


def planted_batches(model: Planted, n: int = 3) -> list[dict]:
    target = planted_target(model)
    batches = []
    for seed in range(n):
        x = torch.randn(4, 6, 4, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            batches.append({"x": x, "y": run_blocks(model, target, {"x": x})})
    return batches


def test_the_loop_drops_the_planted_near_identity_blocks_by_original_index():
    """Originals 1 (quietest) and 3 are near-identities. Step 1 must drop original 1; step 2 must
    drop original 3, which then sits at position 2: reading a position as an original index would
    drop original 2 instead."""
    model = Planted({1: 1e-4, 3: 1e-2})
    batches = planted_batches(model)
    student, history = compress_model(model, target=planted_target(model), train_data=batches,
                                      selection_data=batches, evaluator="score", block_metric="neg_mse",
                                      max_blocks=2, train=ONE_EPOCH, lora_targets=["fc1"], latency=False)
    assert [s.dropped_original for s in history.steps] == [[1], [3]]
    assert [s.selection.chosen for s in history.steps] == [1, 2]  # positions: 3 became 2
    assert kept_blocks(student) == history.kept_blocks == [0, 2, 4]
    assert kept_blocks(model) == [0, 1, 2, 3, 4]  # the user's model is the untouched teacher


def test_compress_model_saves_a_standalone_model_and_resumes(tmp_path):
    transformers = import_transformers()
    model = tiny_bert()
    builder = {"kind": "transformers.BertModel", "config": model.config.to_dict()}  # before any drop
    train, held = [sentences(s) for s in range(3)], [sentences(s) for s in (50, 51)]
    kwargs = dict(train_data=train, selection_data=held, train=ONE_EPOCH, builder=builder, latency=False)
    first, history = compress_model(model, max_blocks=1, out=tmp_path / "run", **kwargs)
    path = tmp_path / "run" / "model.safetensors"
    meta = read_compressed_metadata(path)
    assert meta.kept_blocks == history.kept_blocks and meta.builder == json.loads(json.dumps(builder))
    rebuilt = load_compressed(path, lambda b: transformers.BertModel(transformers.BertConfig.from_dict(b["config"])))
    batch = held[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch).last_hidden_state, first(**batch).last_hidden_state,
                                   rtol=0, atol=0)
    assert rebuilt.config.num_hidden_layers == 3
    # resuming with a further stopping point keeps step 1 and adds step 2
    second, resumed = compress_model(model, max_blocks=2, out=tmp_path / "run", resume=True, **kwargs)
    assert [s.dropped_original for s in resumed.steps[:1]] == [s.dropped_original for s in history.steps]
    assert len(resumed.steps) == 2 and len(second.encoder.layer) == 2
    assert History.load(tmp_path / "run" / "history.json").to_json() == resumed.to_json()


@pytest.mark.parametrize("kwargs,message", [
    ({"lora_targets": ["attention.self.querry"]}, r"lora_targets \['attention.self.querry'\]"),
    ({"evaluator": "loss"}, r"evaluator: 'loss' needs the target's task_loss"),
    ({"evaluator": "score"}, r"evaluator: 'score' scores sub-networks with the target's predict/score"),
    ({"max_blocks": 4}, r"max_blocks 4 must be below the model's 4 blocks"),
    ({"weights": {"cls_kd": 1.0}}, r"weights: unknown loss terms \['cls_kd'\]; FeatureTarget has \['feature', 'output'\]"),
    ({"trainable": ["no_such"]}, r"trainable: patterns \['no_such'\] match no parameter"),
    ({"max_blocks": None}, r"give 'max_blocks' or 'target_macs_reduction'"),
    ({"train": TrainConfig(epochs=1, warmup_epochs=0, ema_decay=0.999)}, r"ema_decay 0.999 .* use at most"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, message):
    model = tiny_bert()
    data = [sentences(0)]
    settings = {"max_blocks": 1, "train": ONE_EPOCH, "latency": False, **kwargs}
    calls = []
    with pytest.raises(BlockdropError, match=message):
        compress_model(model, train_data=data, selection_data=data, log=calls.append, **settings)
    assert not any("step 1" in c for c in calls)  # no selection ran
    assert not lora_layers(model) and len(model.encoder.layer) == 4


def test_a_step_that_training_makes_worse_keeps_the_unaligned_student():
    """Validation that falls after training: the step keeps epoch 0, the unaligned student (the
    default FeatureTarget validation on the same data computes it; a counter makes epoch 1 worse)."""
    model = tiny_bert(init=0.3)
    data = [sentences(s) for s in range(2)]
    scores = iter([0.9, 0.8, 0.5, 0.8])  # teacher, epoch 0, epoch 1, the kept model (epoch 0 again)

    def validate(m):
        return {"score": next(scores)}

    student, history = compress_model(model, train_data=data, selection_data=data, max_blocks=1, train=ONE_EPOCH,
                                      validate=validate, metric="score", latency=False)
    step = history.steps[0]
    assert step.align.best_epoch == 0 and step.align.val_before == {"score": 0.8} and step.val == {"score": 0.8}
    unaligned = copy.deepcopy(model)
    from blockdrop.compress.stack import drop_original

    drop_original(unaligned, step.dropped_original)
    with torch.no_grad():  # LoRA B = 0 at epoch 0: the merged student is the unaligned one
        torch.testing.assert_close(student(**data[0]).last_hidden_state, unaligned(**data[0]).last_hidden_state,
                                   rtol=0, atol=1e-6)


def test_drop_only_removes_the_selected_blocks_and_trains_nothing():
    """align=False (compress.alignment.enabled false): each step is the teacher minus the chosen
    blocks, weight for weight, with no alignment epochs recorded; selection is the same as with
    alignment for the first step (it runs on the teacher either way)."""
    model = Planted({1: 1e-4, 3: 1e-2})
    batches = planted_batches(model)
    kwargs = dict(target=planted_target(model), train_data=batches, selection_data=batches, evaluator="score",
                  block_metric="neg_mse", max_blocks=2, train=ONE_EPOCH, lora_targets=["fc1"], latency=False)
    student, history = compress_model(model, align=False, **kwargs)
    assert [s.dropped_original for s in history.steps] == [[1], [3]]
    assert all(s.align.best_epoch is None and s.align.epochs == [] for s in history.steps)
    assert not lora_layers(student)
    reference = copy.deepcopy(model)
    from blockdrop.compress.stack import drop_original

    drop_original(reference, [1, 3])
    for (name, mine), (_, theirs) in zip(student.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(mine, theirs), name
    aligned, aligned_history = compress_model(model, **kwargs)
    assert aligned_history.steps[0].dropped_original == [1] and aligned_history.steps[0].align.epochs


def test_the_default_validation_cosine_of_a_blockdrop_vit_runs_over_channels():
    """A blockdrop ViT pools to (B, C, T): its cosine must compare channel vectors, per step."""
    from blockdrop.compress.target import output_cosine
    from blockdrop.models.vit import dinov2_vit

    torch.manual_seed(0)
    teacher = dinov2_vit("S", 14, img_size=28, depth=2).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images = [torch.randn(4, 3, 28, 28)]
    target = FeatureTarget(teacher)
    measured = output_cosine(target, teacher, images)(student)["cosine"]
    with torch.no_grad():
        a, b = teacher(images[0])[..., 0], student(images[0])[..., 0]  # (B, C): one frame each
    assert measured == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()), abs=1e-6)
    assert output_cosine(target, teacher, images)(teacher)["cosine"] == pytest.approx(1.0)


def test_compress_model_takes_a_selection_strategy():
    """selection= names a strategy (or is a SelectionConfig): truncate-last drops the last blocks by
    original index, block influence the planted near-identities, recovery-aware records its trials."""
    from blockdrop.core.schema import SelectionConfig

    model = Planted({1: 1e-4, 3: 1e-2})
    batches = planted_batches(model)
    kwargs = dict(target=planted_target(model), train_data=batches, selection_data=batches, max_blocks=2,
                  train=ONE_EPOCH, lora_targets=["fc1"], latency=False)
    _, last = compress_model(model, selection="truncate-last", **kwargs)
    assert [s.dropped_original for s in last.steps] == [[4], [3]]
    assert {s.selection.strategy for s in last.steps} == {"truncate-last"}
    _, influence = compress_model(model, selection="block-influence", evaluator="score", block_metric="neg_mse", **kwargs)
    assert [s.dropped_original for s in influence.steps] == [[1], [3]]
    assert influence.steps[0].selection.evaluator == "feature_cosine"
    aware = SelectionConfig(strategy="recovery-aware", evaluator="score", block_metric="neg_mse", shortlist=2,
                            trial_batches=2)
    _, history = compress_model(model, selection=aware, **{**kwargs, "max_blocks": 1})
    selection = history.steps[0].selection
    assert selection.strategy == "recovery-aware" and history.steps[0].dropped_original == [1]
    assert selection.trial.shortlist == selection.ranking[:2] and selection.trial.batches == 2
    assert sorted(selection.trial.ranking) == sorted(selection.trial.shortlist) and selection.trial.block_forwards > 0
    assert kept_blocks(model) == [0, 1, 2, 3, 4]
    with pytest.raises(BlockdropError, match="selection: unknown strategy 'recovery_aware'"):
        compress_model(model, selection="recovery_aware", **kwargs)
    with pytest.raises(BlockdropError, match="carries its own evaluator"):
        compress_model(model, selection=aware, evaluator="score", **kwargs)
    with pytest.raises(BlockdropError, match="selection: recovery-aware .* align=False"):
        compress_model(model, selection="recovery-aware", align=False, **kwargs)
