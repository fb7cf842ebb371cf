"""Compressing AdaTAD detectors: adapted blocks through selection, drop, alignment, merge, save.

The detector is `thumos14_adatad_s` shrunk to 3 blocks of width 32 (test_adapters.tiny_adatad_config)
with random adapters (up_proj away from its zero init, so each adapter does something), run by the
real engine (`compress_model` -> progressive_block_drop -> align) on in-memory window batches. What
alignment trains is `compress.alignment.lora` (LoRA on the attention projections) and
`compress.alignment.adapters` (the adapters in full; by default whenever the model has them).
Expected MACs are counted by hand from the adapter's layer shapes.
"""

import copy

import pytest
import torch
from torch import nn

from blockdrop.compress import FeatureTarget, compress_model
from blockdrop.compress.lora import add_lora, check_lora, default_targets, lora_layers, trained_in_full
from blockdrop.compress.saving import save_compressed
from blockdrop.compress.stack import drop_blocks, kept_blocks
from blockdrop.compress.target import run_blocks
from blockdrop.core.errors import BlockdropError, ConfigError
from blockdrop.core.measure import count_macs
from blockdrop.core.schema import EvalConfig, TrainConfig
from blockdrop.models import vit
from blockdrop.recipes.build import build_detector, check_experiment, detector_builder, load_detector
from blockdrop.tad.target import DETECTOR_TRAINABLE, DetectorTarget

from test_adapters import randomize_adapters, tiny_adatad_config

STACK = DetectorTarget.stack_path
ONE_EPOCH = TrainConfig(epochs=1, lr=5e-3, warmup_epochs=0, ema_decay=0.0, weight_decay=0.0)
UNADAPTED = ("backbone.adapter_blocks=null", "backbone.train_only_adapters=false")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models gain nothing from intra-op threads (conftest.one_thread)."""


def adapted_detector(*overrides, seed=0):
    cfg = tiny_adatad_config(*overrides)
    torch.manual_seed(seed)
    model = build_detector(cfg, 3, 3).eval()
    randomize_adapters(model, seed)
    return cfg, model


def windows(seed: int, n: int = 2) -> dict:
    """A batch as the dataset gives it: 2 windows of 32 frames (2 clips) at 32 px, one action each."""
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(0, 256, (n, 32, 32, 32, 3), dtype=torch.uint8, generator=g),
            "mask": torch.ones(n, 32, dtype=torch.bool),
            "segments": [torch.tensor([[4.0 + 2 * i, 20.0 + 2 * i]]) for i in range(n)],
            "labels": [torch.tensor([i % 3]) for i in range(n)]}


def compress(model, **kwargs):
    batches = [windows(seed) for seed in range(3)]
    kwargs.setdefault("max_blocks", 1)
    return compress_model(model, target=DetectorTarget(None, EvalConfig()), train_data=batches,
                          selection_data=batches[:2], evaluator="loss", train=ONE_EPOCH, latency=False, **kwargs)


def block_params(model, original: int, part: str) -> dict:
    """{name inside the block: tensor} of the block of that ORIGINAL index, for names containing ``part``."""
    position = kept_blocks(model, stack=STACK).index(original)
    block = model.backbone.blocks[position]
    return {n: p.detach().clone() for n, p in block.named_parameters() if part in n}


def changed(before: dict, after: dict) -> bool:
    assert before.keys() == after.keys() and before
    return any(not torch.equal(before[k], after[k]) for k in before)


# ---- what alignment trains: settled before anything runs -----------------------------------------

def test_lora_never_wraps_an_adapter_linear_unless_asked():
    _, model = adapted_detector()
    block = model.backbone.blocks[0]
    assert default_targets(block) == ("attn.qkv", "attn.proj")  # adapter.down_proj / up_proj are Linears too
    add_lora(model, STACK, trainable=trained_in_full(model, STACK, DETECTOR_TRAINABLE))
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)} == {"attn.qkv",
                                                                                                 "attn.proj"}
    assert type(block.adapter.down_proj) is nn.Linear and type(block.adapter.up_proj) is nn.Linear
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(f"blocks.{i}.adapter.{m}" in n for n in trains) for i in range(3)
               for m in ("down_proj.weight", "dwconv.weight", "conv.bias", "up_proj.bias", "gamma"))
    assert not any(n.startswith("backbone.") and (".mlp." in n or "base_layer" in n) for n in trains)
    # chosen by name, an adapter Linear can carry LoRA, once the adapters no longer train in full
    _, model = adapted_detector()
    targets = ("attn.qkv", "adapter.down_proj")
    assert check_lora(model, STACK, targets=targets, trainable=DETECTOR_TRAINABLE, adapters=False) == targets
    with pytest.raises(BlockdropError, match=r"lora_targets: backbone\.vit\.blocks\.0\.adapter\.down_proj is also "
                                             r"trained in full, by adapters"):
        check_lora(model, STACK, targets=targets, trainable=DETECTOR_TRAINABLE)


def test_the_trained_set_follows_the_adapters_option():
    _, adapted = adapted_detector()
    _, plain = adapted_detector(*UNADAPTED)
    regex = r"^backbone\.vit\.blocks\.\d+\.(?:[^.]+\.)*adapter\."
    assert trained_in_full(adapted, STACK, DETECTOR_TRAINABLE) == (*DETECTOR_TRAINABLE, regex)
    assert trained_in_full(adapted, STACK, DETECTOR_TRAINABLE, adapters=True) == (*DETECTOR_TRAINABLE, regex)
    assert trained_in_full(adapted, STACK, DETECTOR_TRAINABLE, adapters=False) == DETECTOR_TRAINABLE
    assert trained_in_full(plain, STACK, DETECTOR_TRAINABLE) == DETECTOR_TRAINABLE  # nothing changes without adapters
    with pytest.raises(BlockdropError, match="adapters is true, but no block of 'backbone.vit.blocks' has an adapter"):
        trained_in_full(plain, STACK, (), adapters=True)
    with pytest.raises(BlockdropError, match=r"adapters is false, but trainable pattern 'adapter' trains adapter"):
        trained_in_full(adapted, STACK, ("norm", "adapter"), adapters=False)


@pytest.mark.parametrize("overrides, message", [
    ((*UNADAPTED, "compress.alignment.adapters=true"),
     r"compress\.alignment\.adapters is true, but no block of 'backbone\.vit\.blocks' has an adapter"),
    (("compress.alignment.lora=false", "compress.alignment.lora_rank=null", "compress.alignment.trainable=[]",
      "compress.alignment.adapters=false"),
     r"compress\.alignment\.lora is false and nothing else trains"),
    (("compress.alignment.lora_targets=[attn.qkv, adapter.up_proj]",),
     r"compress\.alignment\.lora_targets: backbone\.vit\.blocks\.0\.adapter\.up_proj is also trained in full, "
     r"by compress\.alignment\.adapters"),
    (("compress.alignment.adapters=false", "compress.alignment.trainable=[head, adapter]"),
     r"compress\.alignment\.adapters is false, but compress\.alignment\.trainable pattern 'adapter'"),
])
def test_bad_alignment_settings_name_the_flag(overrides, message):
    cfg = tiny_adatad_config(*overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_experiment(cfg)
    assert "\n" not in str(err.value)


def test_lora_false_refuses_lora_settings_at_load():
    with pytest.raises(ConfigError, match=r"compress\.alignment.*'lora_rank' and 'lora_targets'.*'lora: false'"):
        tiny_adatad_config("compress.alignment.lora=false")  # the shipped config sets lora_rank: 96
    # adapters (+ norms, tokenizer, head) alone: fine
    check_experiment(tiny_adatad_config("compress.alignment.lora=false", "compress.alignment.lora_rank=null",
                                        "compress.stopping.max_blocks=2"))


# ---- the engine on an adapted detector ----------------------------------------------------------

@pytest.mark.parametrize("lora, adapters", [(True, None), (False, None), (True, False)])
def test_compression_drops_adapters_with_their_blocks_and_trains_as_configured(lora, adapters, tmp_path):
    cfg, model = adapted_detector()
    teacher = copy.deepcopy(model)
    student, history = compress(model, max_blocks=2, lora=lora, adapters=adapters)
    step1, step2 = history.steps
    dropped = step1.dropped_original + step2.dropped_original
    kept = kept_blocks(student, stack=STACK)
    assert len(kept) == 1 and sorted(kept + dropped) == [0, 1, 2]
    # the dropped blocks took their adapters: the student holds exactly one adapter, the kept block's
    owners = {n.split(".adapter.")[0] for n, _ in student.named_parameters() if ".adapter." in n}
    assert owners == {"backbone.vit.blocks.0"}
    assert sum(p.numel() for n, p in student.named_parameters() if ".adapter." in n) == \
        sum(p.numel() for n, p in teacher.backbone.blocks[kept[0]].adapter.named_parameters())
    assert history.teacher.cost.params - step2.cost.params == \
        sum(p.numel() for i in dropped for p in teacher.backbone.blocks[i].parameters())
    # what trained: adapters in full unless adapters=False; attention through LoRA (merged) when lora
    original = kept[0]
    assert changed(block_params(teacher, original, "adapter."), block_params(student, original, "adapter.")) \
        == (adapters is not False)
    assert changed(block_params(teacher, original, "attn.qkv"), block_params(student, original, "attn.qkv")) == lora
    assert not changed(block_params(teacher, original, "mlp."), block_params(student, original, "mlp."))
    assert not lora_layers(student)
    # saved with the uncompressed architecture's builder, the student reloads alone, same outputs
    save_compressed(student, tmp_path / "student.safetensors", builder=detector_builder(cfg, ("a", "b", "c"), 3))
    loaded, _ = load_detector(tmp_path / "student.safetensors")
    batch = windows(7)
    with torch.no_grad():
        ours = student.eval()(batch["inputs"], batch["mask"])
        theirs = loaded.eval()(batch["inputs"], batch["mask"])
    torch.testing.assert_close(theirs.head.cls_logits, ours.head.cls_logits, rtol=0, atol=0)
    torch.testing.assert_close(theirs.features, ours.features, rtol=0, atol=0)
    assert kept_blocks(loaded, stack=STACK) == kept


def test_selection_sees_the_adapters():
    """Block scores change when only the adapters change: selection runs the adapted blocks."""
    _, model = adapted_detector()
    _, history = compress(copy.deepcopy(model))
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.adapter.gamma.mul_(5.0)
    _, other = compress(model)
    assert history.steps[0].selection.scores != other.steps[0].selection.scores


def test_feature_target_compresses_an_adapted_vit_alone():
    """compress_model's default target on a bare adapted ViT: its blocks get their window layout."""
    torch.manual_seed(0)
    model = vit.videomae_vit("S", depth=3, width=32, heads=2, pos_img_size=32, adapter_blocks="all").eval()
    randomize_adapters(model)
    clips = [torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    teacher = copy.deepcopy(model)
    student, history = compress_model(model, train_data=clips, selection_data=clips[:2], max_blocks=1,
                                      train=ONE_EPOCH, latency=False)
    (kept_original,) = [o for o in kept_blocks(student) if o not in history.steps[0].dropped_original][:1]
    position = kept_blocks(student).index(kept_original)
    assert not torch.equal(student.blocks[position].adapter.up_proj.weight,
                           teacher.blocks[kept_original].adapter.up_proj.weight)  # adapters trained by default
    # in a clip backbone the target hands the blocks the whole window's layout: the backbone's own forward
    backbone = vit.ClipVideoBackbone(teacher).eval()
    frames = torch.randn(2, 3, 48, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(run_blocks(backbone, FeatureTarget(backbone), frames), backbone(frames),
                                   rtol=0, atol=0)


# ---- cost ---------------------------------------------------------------------------------------

def adapter_macs(tokens: int, width: int, hidden: int, kernel: int) -> int:
    """By hand, per adapter: down_proj C*c and up_proj c*C per token, the depth-wise temporal conv
    c*k and the 1x1 conv c*c at every (time, position), i.e. per token. GELU, the residual adds and
    gamma are not multiply-accumulates; biases are not counted (as for every Linear)."""
    return tokens * (width * hidden + hidden * width + hidden * kernel + hidden * hidden)


@pytest.mark.parametrize("ratio, kernel", [(0.25, 3), (0.5, 5)])
def test_adapters_add_exactly_their_macs(ratio, kernel):
    extra = (f"backbone.adapter_ratio={ratio}", f"backbone.adapter_kernel={kernel}", "backbone.adapter_blocks=[0, 2]")
    _, adapted = adapted_detector(*extra)
    _, plain = adapted_detector(*UNADAPTED)
    plain.load_state_dict({k: v for k, v in adapted.state_dict().items() if ".adapter." not in k})
    batch = windows(3, n=1)
    tokens = 1 * 2 * 8 * 2 * 2  # 1 window of 2 clips, 8 tubelet steps each, 2 x 2 patches
    one = adapter_macs(tokens, 32, int(32 * ratio), kernel)
    macs = {name: count_macs(m, batch["inputs"], batch["mask"])["macs"] for name, m in
            (("adapted", adapted), ("plain", plain))}
    assert macs["adapted"] - macs["plain"] == 2 * one
    backbone = {name: count_macs(m.backbone, batch["inputs"])["macs"] for name, m in
                (("adapted", adapted), ("plain", plain))}
    assert backbone["adapted"] - backbone["plain"] == 2 * one
    # dropping an adapted block removes its adapter's MACs with the block's own
    drop_blocks(adapted, [2], stack=STACK)
    drop_blocks(plain, [2], stack=STACK)
    after = {name: count_macs(m, batch["inputs"], batch["mask"])["macs"] for name, m in
             (("adapted", adapted), ("plain", plain))}
    assert after["adapted"] - after["plain"] == one
