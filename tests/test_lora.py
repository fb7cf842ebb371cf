"""compress.lora: peft LoRA on the remaining blocks only, freezing by pattern, merge and unload.

The reference for the merge is peft's own pattern: adapted == merged (peft's layer merge, still
wrapped) == merged-and-unloaded outputs; the reference for "no change at init" is the original model.
"""

import copy

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from blockdrop.compress.lora import add_lora, lora_layers, merge_lora
from blockdrop.compress.saving import load_compressed, save_compressed
from blockdrop.compress.stack import drop_blocks, kept_blocks
from blockdrop.compress.target import run_blocks
from blockdrop.tad.target import DetectorTarget
from blockdrop.core.errors import BlockdropError
from blockdrop.models import vit
from blockdrop.models.actionformer import ActionFormerHead
from blockdrop.models.detector import Detector

torch.set_num_threads(1)
TARGET = DetectorTarget(dataset=None, eval_cfg=None)  # only stack_path / embed / finish are used here


def video_detector(depth: int = 3) -> Detector:
    """ClipVideoBackbone: the target's "backbone.blocks" is registered as backbone.vit.blocks."""
    torch.manual_seed(0)
    inner = vit.videomae_vit("S", num_frames=4, patch=16, tubelet=2, pos_img_size=32,
                             depth=depth, width=16, heads=2)
    head = ActionFormerHead(16, 2, max_seq_len=4, embed_dim=16, fpn_dim=16, head_dim=16, num_levels=2,
                            attn_window=3, drop_path=0.0)
    return Detector(vit.ClipVideoBackbone(inner, clip_len=4), head)


def video_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"inputs": torch.randint(0, 255, (2, 8, 32, 32, 3), dtype=torch.uint8, generator=g),
            "mask": torch.ones(2, 8, dtype=torch.bool)}


def tiny_vit(depth: int = 4) -> vit.VisionTransformer:
    torch.manual_seed(0)
    return vit.sequence_vit(3, 2, depth=depth, width=16, heads=2)


def names_with_lora(model) -> set:
    return {name for name, _ in lora_layers(model)}


def train_lora(model, forward, steps: int = 3) -> None:
    """A few Adam steps on a random objective so that B (and the norms/head) move away from init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        loss = forward(model).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---- adding --------------------------------------------------------------------------------------

def test_lora_wraps_only_the_remaining_blocks_attention_of_the_real_stack():
    model = video_detector(depth=3)
    drop_blocks(model, [1], stack="backbone.blocks")
    add_lora(model, TARGET)
    assert names_with_lora(model) == {f"backbone.vit.blocks.{i}.attn.{t}" for i in (0, 1) for t in ("qkv", "proj")}
    assert kept_blocks(model, stack="backbone.blocks") == [0, 2]
    qkv = model.backbone.vit.blocks[0].attn.qkv
    assert qkv.lora_A["default"].weight.shape == (16 // 4, 16)  # rank = width // 4
    assert torch.count_nonzero(qkv.lora_B["default"].weight) == 0  # B starts at zero (peft default)
    assert qkv.scaling["default"] == 1.0  # alpha = rank


def test_base_weights_frozen_and_recipe_groups_trainable():
    model = video_detector()
    add_lora(model, TARGET)
    block = model.backbone.vit.blocks[0]
    frozen = [block.attn.qkv.base_layer.weight, block.attn.proj.base_layer.weight, block.attn.q_bias,
              block.mlp.fc1.weight, block.mlp.fc2.bias]
    trainable = [block.norm1.weight, block.norm2.bias, block.attn.qkv.lora_A["default"].weight,
                 block.attn.proj.lora_B["default"].weight, model.backbone.vit.tokenizer.proj.weight]
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in trainable)
    assert all(p.requires_grad for p in model.head.parameters())  # the whole detection head


def test_trainable_groups_are_configurable_by_pattern():
    model = video_detector()
    add_lora(model, TARGET, trainable=[r"^backbone\..*\.norm1\."])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    norm1 = {f"backbone.vit.blocks.{i}.norm1.{w}" for i in range(3) for w in ("weight", "bias")}
    assert trained == norm1 | {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert not any(p.requires_grad for p in model.head.parameters())
    with pytest.raises(BlockdropError, match=r"\['no_such_part'\] match no parameter"):
        add_lora(video_detector(), TARGET, trainable=("norm", "no_such_part"))


def test_adapted_model_equals_the_original_at_init():
    model, batch = video_detector(), video_batch()
    model.eval()
    with torch.no_grad():
        before = model(batch["inputs"], batch["mask"])
        add_lora(model, TARGET)
        after = model(batch["inputs"], batch["mask"])
    torch.testing.assert_close(after.head.cls_logits, before.head.cls_logits, rtol=0, atol=0)
    torch.testing.assert_close(after.head.offsets, before.head.offsets, rtol=0, atol=0)


def test_generic_model_and_bad_targets():
    model = tiny_vit(depth=4)
    drop_blocks(model, [0, 2])
    add_lora(model, "blocks", targets=["mlp.fc1"], rank=3, alpha=6, trainable=())
    assert names_with_lora(model) == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    assert model.blocks[1].mlp.fc1.scaling["default"] == 2.0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}
    assert kept_blocks(model) == [1, 3]
    with pytest.raises(BlockdropError, match="already has LoRA"):
        add_lora(model, "blocks")
    with pytest.raises(BlockdropError, match=r"blocks\.0\.attn\.qkvv does not exist.*attn\.qkv"):
        add_lora(tiny_vit(), "blocks", targets=("attn.qkvv",))
    with pytest.raises(BlockdropError, match=r"blocks\.0\.norm1 \(LayerNorm\) is not an nn.Linear"):
        add_lora(tiny_vit(), "blocks", targets=("norm1",))


# ---- merging -------------------------------------------------------------------------------------

def test_adapted_equals_merged_equals_unloaded_and_keys_are_the_originals():
    model = tiny_vit()
    drop_blocks(model, [2])
    original_keys = set(model.state_dict())
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        original = model(x)
    add_lora(model, "blocks")
    train_lora(model, lambda m: m(x))
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merged_copy = copy.deepcopy(model)
        for _, layer in lora_layers(merged_copy):
            layer.merge()  # peft's merge, layers still wrapped
        merged = merged_copy(x)
    merge_lora(model, lambda m: m(x))
    with torch.no_grad():
        unloaded = model(x)
    assert not torch.allclose(adapted, original, atol=1e-3)  # training changed something
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unloaded, merged, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert type(model.blocks[0].attn.qkv) is nn.Linear and not hasattr(model, "peft_config")
    assert set(model.state_dict()) == original_keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert kept_blocks(model) == [0, 1, 3]


def test_an_ema_copy_merges_on_its_own():
    """fit's AveragedModel deep-copies the adapted model: its copy must merge, leaving the live one."""
    model = tiny_vit(depth=2)
    add_lora(model, "blocks")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    x = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(3))
    train_lora(model, lambda m: m(x), steps=2)
    ema.update_parameters(model)
    ema_model = ema.module.eval()
    with torch.no_grad():
        adapted = ema_model(x)
    merged = merge_lora(ema_model, lambda m: m(x))
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)
    assert len(lora_layers(model)) == 4 and not lora_layers(merged)


def test_merged_detector_round_trips_through_save_and_load_compressed(tmp_path):
    model, batch = video_detector(depth=3), video_batch()
    drop_blocks(model, [1], stack="backbone.blocks")
    add_lora(model, TARGET)
    train_lora(model, lambda m: run_blocks(m, TARGET, batch).head.offsets)
    merge_lora(model, lambda m: run_blocks(m, TARGET, batch))
    path = save_compressed(model, tmp_path / "m.safetensors", builder={"depth": 3})
    again = load_compressed(path, lambda builder: video_detector(depth=builder["depth"]))
    model.eval(), again.eval()
    with torch.no_grad():
        a, b = model(batch["inputs"], batch["mask"]), again(batch["inputs"], batch["mask"])
    torch.testing.assert_close(b.head.cls_logits, a.head.cls_logits, rtol=0, atol=0)
    assert kept_blocks(again, stack="backbone.blocks") == [0, 2]


def test_a_failed_check_leaves_the_model_adapted():
    model = tiny_vit(depth=2)
    add_lora(model, "blocks")
    x = torch.randn(2, 16, 3)
    train_lora(model, lambda m: m(x), steps=1)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
    calls = []

    def drifting(m):  # a check that sees a different output after the merge
        calls.append(1)
        return m(x) + len(calls)

    with pytest.raises(BlockdropError, match="disagrees with the adapted one: output 0 differs by up to 1"):
        merge_lora(model, drifting)
    assert len(lora_layers(model)) == 4 and not any(layer.merged for _, layer in lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    calls.clear()

    def blowing_up(m):  # finite before the merge, not after
        calls.append(1)
        return m(x) * (1.0 if len(calls) == 1 else float("inf"))

    with pytest.raises(BlockdropError, match="not finite after the merge"):
        merge_lora(model, blowing_up)
    assert len(lora_layers(model)) == 4


def test_a_broken_adapter_is_refused_and_nothing_stays_merged():
    model = tiny_vit(depth=2)
    add_lora(model, "blocks")
    with torch.no_grad():
        model.blocks[1].attn.proj.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(BlockdropError, match=r"merge_lora: blocks\.1\.attn\.proj"):
        merge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))
    with pytest.raises(BlockdropError, match="has no LoRA layers"):
        merge_lora(tiny_vit())
