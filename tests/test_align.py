"""compress.align: the alignment losses, the TargetForward under DDP, and align() end to end.

References are independent of the code under test: torch.distributions' KL divergences for the
class distillation, a DIoU worked out by hand, and models whose blocks are exact identities so
that the right original-index pairing gives exactly zero while a positional one does not.
"""

import copy
import json

import peft  # noqa: F401  (imported at collection: add_lora imports it lazily, which is slow once)
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, kl_divergence
from torch.nn.parallel import DistributedDataParallel

from blockdrop.compress.align import AlignLoss, align, feature_loss
from blockdrop.compress.lora import add_lora, lora_layers
from blockdrop.compress.stack import drop_blocks, drop_original, kept_blocks
from blockdrop.compress.target import TargetForward, run_blocks
from blockdrop.tad.target import DetectorTarget, class_kd, segment_kd
from blockdrop.core.errors import BlockdropError
from blockdrop.core.schema import TrainConfig
from blockdrop.models import vit
from blockdrop.models.actionformer import ActionFormerHead
from blockdrop.models.detector import Detector
from blockdrop.core.training import make_loader

from conftest import make_sequence_dataset

torch.set_num_threads(1)
FEATURE_ONLY = {"feature": 1.0, "gt": 0.0}  # VitTarget's terms: the engine's feature term and its task loss
DETECTOR_FEATURE_ONLY = {"feature": 1.0, "cls_kd": 0.0, "reg_kd": 0.0, "gt": 0.0}
NO_HEAD = {"feature": 1.0, "gt": 1.0}


# ---- a plain ViT with its own minimal target -----------------------------------------------------

class VitTarget:
    """CompressionTarget for a bare sequence ViT regressing y from its pooled features."""

    stack_path = "blocks"
    trainable = ()
    distill_terms = ()  # no output term: only the engine's feature term and the task loss

    def embed(self, model, batch):
        return model.embed(batch["x"])

    def call_block(self, block, tokens, ctx):
        return block(tokens)

    def finish(self, model, tokens, ctx, batch):
        return model.pool(tokens, ctx).mean(-1)  # (B, C)

    def distill(self, student, s_out, teacher, t_out, batch, weights):
        return {}

    def task_loss(self, model, output, batch):
        return {"total": (output - batch["y"]).pow(2).mean()}


def tiny_vit(depth: int = 5, identity=()) -> vit.VisionTransformer:
    """Random weights large enough that every block visibly moves the tokens; `identity` blocks return x."""
    torch.manual_seed(0)
    model = vit.sequence_vit(3, 2, depth=depth, width=16, heads=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
        for i in identity:  # x + attn(...) * 0 + mlp(...) * 0 == x
            for linear in (model.blocks[i].attn.proj, model.blocks[i].mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return model


def vit_batch(n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 16, 3, generator=g), "y": torch.randn(n, 16, generator=g)}


def positional_feature_loss(student, teacher, target, batch) -> float:
    """What a loss pairing blocks by CURRENT position would give (the wrong pairing)."""
    with torch.no_grad():
        _, s = run_blocks(student, target, batch, return_blocks=True)
        _, t = run_blocks(teacher, target, batch, return_blocks=True)
    return float(sum((a - b).pow(2).mean() for a, b in zip(s, t)) / len(s))


# ---- feature alignment ---------------------------------------------------------------------------

def test_feature_term_pairs_blocks_by_original_index():
    teacher, target, batch = tiny_vit(identity=[1]), VitTarget(), vit_batch()
    student = copy.deepcopy(teacher)
    drop_blocks(student, [1])  # the hole is an identity: kept blocks compute exactly the teacher's
    with torch.no_grad():
        losses = AlignLoss(teacher, target, weights=FEATURE_ONLY)(student, batch)
    assert set(losses) == {"feature", "total"}
    assert float(losses["feature"]) == 0.0 and float(losses["total"]) == 0.0
    assert positional_feature_loss(student, teacher, target, batch) > 1e-2


def test_previous_step_teacher_is_mapped_through_its_own_kept_blocks():
    full = tiny_vit(identity=[1, 3])
    previous = copy.deepcopy(full)
    drop_original(previous, [1])  # the previous step's model: originals [0, 2, 3, 4]
    student = copy.deepcopy(previous)
    drop_original(student, [3])  # originals [0, 2, 4]
    target, batch = VitTarget(), vit_batch()
    with torch.no_grad():
        assert float(AlignLoss(previous, target, weights=FEATURE_ONLY)(student, batch)["feature"]) == 0.0
    assert positional_feature_loss(student, previous, target, batch) > 1e-2
    orphan = copy.deepcopy(full)
    drop_original(orphan, [2])  # keeps original 1, which `previous` no longer has
    with pytest.raises(BlockdropError, match=r"original index \[1\] are not in the teacher"):
        AlignLoss(previous, target, weights=FEATURE_ONLY)(orphan, batch)


def test_feature_loss_is_the_mean_of_per_block_mse():
    s = [torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]
    t = [torch.full((1, 2, 2), 3.0), torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0)]
    # student originals [0, 2] <-> teacher positions 0 and 2: (9 + 1) / 2
    assert float(feature_loss(s, t, [0, 2], [0, 1, 2])) == pytest.approx(5.0)


# ---- head distillation ---------------------------------------------------------------------------

def random_logits(classes: int):
    g = torch.Generator().manual_seed(classes)
    zs, zt = torch.randn(2, 6, classes, generator=g) * 3, torch.randn(2, 6, classes, generator=g) * 3
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    return zs, zt, valid


@pytest.mark.parametrize("classes", [1, 4])
def test_class_kd_matches_torch_distributions(classes):
    zs, zt, valid = random_logits(classes)
    T = 3.5
    softmax = kl_divergence(Categorical(logits=zt[valid] / T), Categorical(logits=zs[valid] / T)).mean() * T ** 2
    sigmoid = kl_divergence(Bernoulli(logits=zt[valid] / T), Bernoulli(logits=zs[valid] / T)).sum(-1).mean() * T ** 2
    assert float(class_kd(zs, zt, valid, T, "softmax")) == pytest.approx(float(softmax), rel=1e-5)
    assert float(class_kd(zs, zt, valid, T, "sigmoid")) == pytest.approx(float(sigmoid), rel=1e-5)
    auto = float(class_kd(zs, zt, valid, T))
    assert auto == pytest.approx(float(softmax if classes > 1 else sigmoid), rel=1e-5)
    if classes == 1:  # the softmax of one class says nothing; auto still distils
        assert float(softmax) == pytest.approx(0.0, abs=1e-7) and auto > 0.1


def test_class_kd_ignores_invalid_points_and_is_zero_for_equal_logits():
    zs, zt, valid = random_logits(3)
    changed = zs.clone()
    changed[~valid] += 100.0
    assert float(class_kd(changed, zt, valid)) == float(class_kd(zs, zt, valid))
    for mode in ("softmax", "sigmoid"):
        assert float(class_kd(zt, zt, valid, mode=mode)) == 0.0
    assert float(class_kd(zs, zt, torch.zeros_like(valid))) == 0.0


def test_segment_kd_by_hand():
    student = torch.tensor([[[0.0, 2.0], [5.0, 5.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 3.0], [5.0, 5.0], [7.0, 9.0]]])
    positive = torch.tensor([[True, True, False]])
    # [0, 2] vs [1, 3]: IoU 1/3, centre distance 1 over enclosing 3 -> 1 - 1/3 + 1/9 = 7/9;
    # two identical zero-length segments -> 0; the third point is not positive
    assert float(segment_kd(student, teacher, positive)) == pytest.approx((7 / 9 + 0) / 2)
    assert float(segment_kd(student, teacher, torch.zeros_like(positive))) == 0.0


# ---- on a detector -------------------------------------------------------------------------------

def tiny_detector(num_classes: int = 3, depth: int = 3) -> Detector:
    torch.manual_seed(0)
    backbone = vit.sequence_vit(3, 4, depth=depth, width=16, heads=2)
    head = ActionFormerHead(16, num_classes, max_seq_len=16, embed_dim=16, fpn_dim=16, head_dim=16,
                            num_levels=3, attn_window=5, drop_path=0.0)
    return Detector(backbone, head)


def detector_batch(num_classes: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 48:] = False
    return {"inputs": torch.randn(2, 64, 3, generator=g), "mask": mask,
            "segments": [torch.tensor([[4.0, 20.0], [30.0, 50.0]]), torch.tensor([[8.0, 24.0]])],
            "labels": [torch.tensor([0, num_classes - 1]), torch.tensor([num_classes - 1])]}


@pytest.mark.parametrize("num_classes,cls_kd", [(3, "auto"), (1, "auto"), (3, "sigmoid")])
def test_every_alignment_term_is_zero_when_the_student_is_the_teacher(num_classes, cls_kd):
    teacher, batch = tiny_detector(num_classes), detector_batch(num_classes)
    target = DetectorTarget(None, None, cls_kd=cls_kd)
    student = copy.deepcopy(teacher).eval()
    with torch.no_grad():
        losses = AlignLoss(teacher, target)(student, batch)
    assert set(losses) == {"feature", "cls_kd", "reg_kd", "gt", "total"}
    for term in ("feature", "cls_kd", "reg_kd"):
        assert float(losses[term]) == 0.0, term
    aligned = target.head_outputs(student, run_blocks(student, target, batch), batch)
    assert aligned["positive"].sum() > 0 and not aligned["valid"].all()  # the terms were not vacuous
    assert float(losses["gt"]) == pytest.approx(float(teacher.losses(batch)["total"]), rel=1e-6)
    assert float(losses["total"]) == pytest.approx(float(losses["gt"]), rel=1e-6)


def test_weights_scale_and_skip_terms_and_only_the_student_gets_gradients():
    teacher, batch, target = tiny_detector(), detector_batch(), DetectorTarget(None, None)
    student = copy.deepcopy(teacher)
    drop_blocks(student, [1], stack="backbone.blocks")
    add_lora(student, target)
    losses = AlignLoss(teacher, target, weights={"feature": 2.0, "cls_kd": 0.5, "reg_kd": 0})(student, batch)
    assert set(losses) == {"feature", "cls_kd", "gt", "total"}
    value = {k: v.item() for k, v in losses.items()}
    assert all(value[k] > 0 for k in ("feature", "cls_kd", "gt"))
    expected = 2 * value["feature"] + 0.5 * value["cls_kd"] + value["gt"]
    assert value["total"] == pytest.approx(expected, rel=1e-6)
    losses["total"].backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert all(p.grad is not None for n, p in student.named_parameters() if "lora_A" in n)
    assert all(p.grad is None for n, p in student.backbone.named_parameters() if "mlp" in n or "base_layer" in n)


def test_bad_settings_name_the_setting():
    teacher, target = tiny_vit(depth=2), VitTarget()
    with pytest.raises(BlockdropError, match=r"unknown loss terms \['cls_kd', 'featur'\]; VitTarget has \['feature', 'gt'\]"):
        AlignLoss(teacher, target, weights={"featur": 1.0, "cls_kd": 1.0})
    with pytest.raises(BlockdropError, match="not all 0"):
        AlignLoss(teacher, target, weights={k: 0 for k in FEATURE_ONLY})
    with pytest.raises(BlockdropError, match="temperature"):
        DetectorTarget(None, None, temperature=0)
    with pytest.raises(BlockdropError, match="cls_kd"):
        DetectorTarget(None, None, cls_kd="kl")


def test_the_target_forward_trains_through_ddp(tmp_path):
    teacher, target, batch = tiny_vit(depth=3), VitTarget(), vit_batch()
    student = copy.deepcopy(teacher)
    drop_blocks(student, [1])
    add_lora(student, target)
    loss_fn = AlignLoss(teacher, target, weights=NO_HEAD)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(TargetForward(student, target), find_unused_parameters=True)
        calls = []  # DDP synchronises gradients only for what runs through its own forward
        ddp.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
        for _ in range(2):
            ddp.zero_grad()
            loss_fn(ddp, batch)["total"].backward()
        assert calls == [2, 2]  # (batch, return_blocks)
        assert all(p.grad is not None for n, p in student.named_parameters() if "lora_A" in n)
        with pytest.raises(BlockdropError, match="TargetForward"):
            loss_fn(DistributedDataParallel(copy.deepcopy(student)), batch)
    finally:
        torch.distributed.destroy_process_group()


# ---- align() -------------------------------------------------------------------------------------

class VitData(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        self.batch = vit_batch(n, seed=5)

    def __len__(self):
        return len(self.batch["x"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_align_merges_the_weights_selected_on_validation_with_ema(tmp_path):
    teacher, target, batch = tiny_vit(depth=4), VitTarget(), vit_batch()
    loader = make_loader(VitData(), 4, shuffle=True)
    cfg = TrainConfig(epochs=3, lr=3e-2, warmup_epochs=0, ema_decay=0.5)
    seen = {}

    def evaluate(model):  # epoch 2 scores best; remember what the evaluated (EMA) model computes
        epoch = len(seen) + 1
        with torch.no_grad():
            seen[epoch] = model.eval()(batch["x"])
        return {"score": -abs(epoch - 2)}

    student = copy.deepcopy(teacher)
    drop_blocks(student, [2])
    merged, result = align(student, teacher, target, loader, cfg, weights=NO_HEAD, evaluate_fn=evaluate,
                           metric="score", score_unaligned=False, out_dir=tmp_path, progress=False)
    assert merged is student and not lora_layers(merged) and result.best_epoch == 2
    with torch.no_grad():
        out = merged.eval()(batch["x"])
    torch.testing.assert_close(out, seen[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, seen[3], atol=1e-4)  # not the last epoch's weights
    # resuming a finished run rebuilds the same merged model from the saved state
    again = copy.deepcopy(teacher)
    drop_blocks(again, [2])
    merged_again, _ = align(again, teacher, target, loader, cfg, weights=NO_HEAD, evaluate_fn=evaluate,
                            metric="score", score_unaligned=False, out_dir=tmp_path, resume=True, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(merged_again.eval()(batch["x"]), out, atol=1e-6, rtol=1e-6)


def test_a_step_never_returns_a_model_worse_than_the_unaligned_student(tmp_path):
    """With the unaligned student scored as epoch 0, training that only makes validation worse
    hands back the unaligned student (LoRA B = 0 merges to no change), and says so."""
    teacher, target, batch = tiny_vit(depth=4), VitTarget(), vit_batch()
    student = copy.deepcopy(teacher)
    drop_blocks(student, [2])
    with torch.no_grad():
        unaligned = copy.deepcopy(student).eval()(batch["x"])
    calls = []

    def evaluate(model):  # every trained epoch scores below the untrained student
        calls.append(1)
        return {"score": 0.0 if len(calls) == 1 else -1.0}

    cfg = TrainConfig(epochs=2, lr=3e-2, warmup_epochs=0, ema_decay=0.0)
    merged, result = align(student, teacher, target, make_loader(VitData(), 4, shuffle=True), cfg, weights=NO_HEAD,
                           evaluate_fn=evaluate, metric="score", out_dir=tmp_path, progress=False)
    assert len(calls) == 3 and result.best_epoch == 0 and result.initial == {"score": 0.0}
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(batch["x"]), unaligned, atol=1e-6, rtol=1e-6)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_align_trains_on_a_plain_list_of_batches():
    teacher, target = tiny_vit(depth=3), VitTarget()
    student = copy.deepcopy(teacher)
    drop_blocks(student, [1])
    batches = [vit_batch(4, seed=s) for s in range(3)]  # no DataLoader: no sampler, no dataset
    merged, result = align(student, teacher, target, batches, TrainConfig(epochs=1, warmup_epochs=0, ema_decay=0.0),
                           weights=NO_HEAD, progress=False)
    assert result.epochs_run == 1 and len(result.history) == 1 and not lora_layers(merged)


def test_align_refuses_a_student_sharing_weights_with_the_teacher():
    teacher = tiny_vit(depth=2)
    with pytest.raises(BlockdropError, match="shares parameters with the teacher"):
        align(teacher, teacher, VitTarget(), [], TrainConfig(epochs=1, warmup_epochs=0))
    assert not lora_layers(teacher)


def test_align_a_detector_end_to_end(tmp_path):
    from blockdrop.recipes import build
    from blockdrop.core.config import from_dict
    from blockdrop.data.dataset import collate_windows
    from blockdrop.core.schema import ExperimentConfig

    make_sequence_dataset(tmp_path / "data", videos=6, length=128, starts=(10, 70), durations=(15, 40),
                          subsets=["train"] * 4 + ["val"] * 2)
    cfg = from_dict(ExperimentConfig, {
        "data": {"kind": "sequence", "root": str(tmp_path / "data"), "window": 64, "train_repeats": 2},
        "backbone": {"kind": "sequence", "depth": 3, "width": 16, "heads": 2, "patch": 4, "drop_path": 0.0},
        "head": {"embed_dim": 16, "fpn_dim": 16, "head_dim": 16, "attn_window": 5, "num_levels": 3}})
    annotations = build.load_experiment_annotations(cfg.data)
    source = build.make_source(cfg.data, annotations)
    teacher = build.build_detector(cfg, 3, build.input_channels(cfg.data, annotations, source))
    with torch.no_grad():  # blocks that matter, as in a trained model: dropping one moves the features
        for p in teacher.backbone.blocks.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    train_ds = build.make_dataset(cfg, annotations.subset("train"), source, train=True,
                                  feature_stride=teacher.feature_stride)
    loader = make_loader(train_ds, 2, shuffle=True, collate_fn=collate_windows)
    target = DetectorTarget(train_ds, cfg.eval)
    probe = next(iter(make_loader(train_ds, 8, shuffle=False, collate_fn=collate_windows)))
    feature = AlignLoss(teacher, target, weights=DETECTOR_FEATURE_ONLY)

    student = copy.deepcopy(teacher)
    drop_blocks(student, [1], stack=target.stack_path)
    before = float(feature(student.eval(), probe)["feature"])
    train_cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, warmup_epochs=0, ema_decay=0.0)
    merged, result = align(student, teacher, target, loader, train_cfg, progress=False)
    after = float(feature(merged.eval(), probe)["feature"])
    assert result.epochs_run == 2 and set(result.history[0]) >= {"loss/feature", "loss/cls_kd", "loss/gt"}
    assert after < 0.9 * before, (before, after)
    assert not lora_layers(merged) and kept_blocks(merged, stack=target.stack_path) == [0, 2]
    output = merged(probe["inputs"], probe["mask"])
    assert torch.isfinite(output.head.cls_logits).all()
