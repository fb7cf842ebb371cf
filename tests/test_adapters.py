"""AdaTAD temporal adapters: OpenTAD checkpoint import/export, forward, block drop, config errors.

The reference is written here from the description of OpenTAD's `VisionTransformerAdapter`
(opentad/models/backbones/vit_adapter.py): its key names and shapes, and a functional forward of
the whole backbone with plain tensor operations (explicit softmax attention, the temporal
convolution as shifted sums), so it shares no code with blockdrop's ViT.
"""

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blockdrop.compress.lora import check_lora, trained_in_full
from blockdrop.compress.saving import save_compressed
from blockdrop.compress.stack import drop_blocks
from blockdrop.core.config import load_config
from blockdrop.core.errors import BlockdropError, CheckpointError, ConfigError
from blockdrop.core.schema import EvalConfig, ExperimentConfig
from blockdrop.models import vit
from blockdrop.models.checkpoints import (AdaptersInCheckpoint, NoAdaptersInCheckpoint, export_mmaction_videomae,
                                          load_mmaction_videomae, opentad_backbone_args)
from blockdrop.recipes.build import (build_detector, detector_builder, load_detector, load_experiment,
                                     resolve_config_path)
from blockdrop.tad.target import DetectorTarget

PREFIX = "backbone.model.backbone."  # OpenTAD: detector.backbone (BackboneWrapper).model (Recognizer3D).backbone
S = {"depth": 12, "width": 384, "heads": 6}


# ---- OpenTAD's checkpoint and forward, independently ------------------------------------------------

def opentad_sinusoid(n_position: int, dim: int) -> torch.Tensor:
    """mmaction's get_sinusoid_encoding: (1, n, dim), sin on even channels, cos on odd ones."""
    position = np.arange(n_position)[:, None]
    table = position / np.power(10000, 2 * (np.arange(dim) // 2) / dim)
    table[:, 0::2], table[:, 1::2] = np.sin(table[:, 0::2]), np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)[None]


def opentad_state(depth, width, adapter_index, *, seed=0, mlp_ratio=4, img_size=224, num_frames=16) -> dict:
    """A VisionTransformerAdapter state dict (OpenTAD names and shapes) with random weights.

    The shapes do not depend on `temporal_size` (total_frames // tubelet, e.g. 768 // 2 = 384):
    the adapter's convolutions are defined per channel, whatever the window length.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02, mean=0.0):
        return mean + std * torch.randn(shape, generator=gen)

    hidden, mlp, grid = width // 4, width * mlp_ratio, img_size // 16
    state = {"patch_embed.projection.weight": rand(width, 3, 2, 16, 16), "patch_embed.projection.bias": rand(width),
             "pos_embed": opentad_sinusoid(grid * grid * num_frames // 2, width),
             "fc_norm.weight": rand(width, mean=1.0), "fc_norm.bias": rand(width)}
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": rand(width, std=0.1, mean=1.0), p + "norm1.bias": rand(width),
            p + "attn.q_bias": rand(width), p + "attn.v_bias": rand(width),
            p + "attn.qkv.weight": rand(3 * width, width), p + "attn.proj.weight": rand(width, width),
            p + "attn.proj.bias": rand(width),
            p + "norm2.weight": rand(width, std=0.1, mean=1.0), p + "norm2.bias": rand(width),
            p + "mlp.layers.0.0.weight": rand(mlp, width), p + "mlp.layers.0.0.bias": rand(mlp),
            p + "mlp.layers.1.weight": rand(width, mlp), p + "mlp.layers.1.bias": rand(width)})
        if i in adapter_index:
            a = p + "adapter."
            state.update({  # up_proj and gamma away from their init, so the adapter does something
                a + "down_proj.weight": rand(hidden, width), a + "down_proj.bias": rand(hidden),
                a + "dwconv.weight": rand(hidden, 1, 3, std=math.sqrt(2 / 3)), a + "dwconv.bias": rand(hidden),
                a + "conv.weight": rand(hidden, hidden, 1, std=math.sqrt(2 / hidden)), a + "conv.bias": rand(hidden),
                a + "up_proj.weight": rand(width, hidden, std=0.05), a + "up_proj.bias": rand(width),
                a + "gamma": rand(1, std=0.2, mean=1.0)})
    return state


def reference_adapter(x, s, p, windows, steps):
    """The adapter from its description, for tokens (windows * clips, t*h*w, C) of `steps` per window."""
    y = F.gelu(x @ s[p + "down_proj.weight"].T + s[p + "down_proj.bias"])  # (B*n, t*h*w, c)
    c = y.shape[-1]
    z = y.reshape(windows, steps, -1, c)  # the clips of a window are consecutive rows: time in order
    kernel = s[p + "dwconv.weight"].shape[-1]
    padded = F.pad(z, (0, 0, 0, 0, kernel // 2, kernel // 2))  # zeros before and after the window
    dw = sum(padded[:, j:j + steps] * s[p + "dwconv.weight"][:, 0, j] for j in range(kernel)) + s[p + "dwconv.bias"]
    pw = dw @ s[p + "conv.weight"][:, :, 0].T + s[p + "conv.bias"]  # the 1x1 conv
    y = y + pw.reshape_as(y)
    return x + s[p + "gamma"] * (y @ s[p + "up_proj.weight"].T + s[p + "up_proj.bias"])


def reference_block(x, s, p, heads):
    C = x.shape[-1]
    y = F.layer_norm(x, (C,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
    bias = torch.cat([s[p + "attn.q_bias"], torch.zeros(C), s[p + "attn.v_bias"]])
    q, k, v = (y @ s[p + "attn.qkv.weight"].T + bias).unflatten(-1, (3, heads, C // heads)).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(C // heads)).softmax(-1)
    y = (attn @ v).transpose(1, 2).flatten(2) @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
    x = x + y
    y = F.layer_norm(x, (C,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
    y = F.gelu(y @ s[p + "mlp.layers.0.0.weight"].T + s[p + "mlp.layers.0.0.bias"])
    return x + y @ s[p + "mlp.layers.1.weight"].T + s[p + "mlp.layers.1.bias"]


def reference_backbone(s, frames, depth, heads, adapter_index, clip_len=16, grid=14):
    """OpenTAD's AdaTAD feature path: (B, 3, T, H, W) normalised -> (B, C, T / 2)."""
    b, _, T, H, W = frames.shape
    n = T // clip_len
    clips = frames.unflatten(2, (n, clip_len)).transpose(1, 2).flatten(0, 1)  # "b c (t1 t) h w -> (b t1) c t h w"
    x = F.conv3d(clips, s["patch_embed.projection.weight"], s["patch_embed.projection.bias"], stride=(2, 16, 16))
    t, h, w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)  # (B*n, t*h*w, C)
    C = x.shape[-1]
    pos = s["pos_embed"].reshape(-1, grid, grid, C).permute(0, 3, 1, 2)  # bicubic per time slice
    pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = x + pos.reshape(1, -1, C)
    for i in range(depth):
        x = reference_block(x, s, f"blocks.{i}.", heads)
        if i in adapter_index:
            x = reference_adapter(x, s, f"blocks.{i}.adapter.", b, n * t)
    feats = x.reshape(b * n, t, h * w, C).mean(2)  # "b n c t h w -> b c t", mean over space
    return feats.reshape(b, n * t, C).transpose(1, 2)


def adatad_s(adapter_blocks="all", **kw):
    return vit.videomae_vit("S", pos_img_size=224, adapter_blocks=adapter_blocks, **kw)


# ---- import and export --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adatad_s_checkpoint():
    """VideoMAE-S with adapters in all 12 blocks (768 frames at 160 px: temporal_size 384), as OpenTAD saves it."""
    state = opentad_state(12, 384, adapter_index=list(range(12)))
    return {"state_dict": {PREFIX + k: v for k, v in state.items()}, "meta": {"epoch": 60}}


def test_opentad_adatad_s_loads_strictly_and_matches_the_reference_forward(adatad_s_checkpoint):
    state = adatad_s_checkpoint["state_dict"]
    assert len([k for k in state if ".adapter." in k]) == 12 * 9
    assert state[PREFIX + "blocks.11.adapter.dwconv.weight"].shape == (96, 1, 3)
    assert state[PREFIX + "blocks.0.adapter.up_proj.weight"].shape == (384, 96)
    model = adatad_s()
    report = load_mmaction_videomae(model, adatad_s_checkpoint, prefer_ema=False)
    assert report["ignored"] == ["fc_norm.weight", "fc_norm.bias", "pos_embed"] and report["fresh"] == []
    assert report["loaded"] == len(state) - 3
    torch.testing.assert_close(model.blocks[7].adapter.gamma, state[PREFIX + "blocks.7.adapter.gamma"], rtol=0, atol=0)
    # the full 12 blocks on a short, small window: 2 clips of 16 frames at 32 px (2x2 patches)
    frames = torch.randn(2, 3, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = {k[len(PREFIX):]: v for k, v in state.items()}
    with torch.no_grad():
        ours = vit.ClipVideoBackbone(model.eval())(frames)
        expected = reference_backbone(plain, frames, 12, 6, range(12))
    assert ours.shape == expected.shape == (2, 384, 16)
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_export_gives_back_opentad_keys(adatad_s_checkpoint):
    model = adatad_s()
    load_mmaction_videomae(model, adatad_s_checkpoint)
    exported = export_mmaction_videomae(model, prefix=PREFIX, identity_fc_norm=True)
    original = adatad_s_checkpoint["state_dict"]
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        if "fc_norm" not in key:  # unused by the feature path: exported as an identity
            torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-6, msg=key)
    assert opentad_backbone_args(model) == {"embed_dims": 384, "depth": 12, "num_heads": 6, "img_size": 224,
                                            "adapter_index": list(range(12))}


def small_adapted(adapter_blocks=(0, 2), seed=0, **kw):
    """Three blocks of width 64, VideoMAE layout, 32 px positions: fast, with an unadapted block between."""
    model = vit.videomae_vit("S", depth=3, width=64, heads=4, pos_img_size=32, adapter_blocks=adapter_blocks, **kw)
    state = opentad_state(3, 64, adapter_index=adapter_blocks or (), seed=seed, img_size=32)
    load_mmaction_videomae(model, state)
    return model.eval(), state


def test_adapted_blocks_mix_clips_and_match_the_reference():
    model, state = small_adapted()
    backbone = vit.ClipVideoBackbone(model)
    frames = torch.randn(2, 3, 48, 32, 32, generator=torch.Generator().manual_seed(2))  # 3 clips a window
    with torch.no_grad():
        ours = backbone(frames)
        expected = reference_backbone(state, frames, 3, 4, (0, 2), grid=2)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        # an adapter looks across clips: changing clip 0 changes clip 1's features (and not the other window's)
        changed = frames.clone()
        changed[0, :, :16] += 1.0
        moved = backbone(changed)
    steps = slice(8, 16)  # clip 1 of 8 tubelet steps each
    assert (moved[0, :, steps] - ours[0, :, steps]).abs().max() > 1e-3
    torch.testing.assert_close(moved[1], ours[1], rtol=0, atol=0)


def test_a_fresh_adapter_is_the_identity():
    adapted = vit.ClipVideoBackbone(adatad_s_small := vit.videomae_vit(
        "S", depth=3, width=64, heads=4, pos_img_size=32, adapter_blocks="all")).eval()
    plain = vit.ClipVideoBackbone(vit.videomae_vit("S", depth=3, width=64, heads=4, pos_img_size=32)).eval()
    plain.load_state_dict({k: v for k, v in adapted.state_dict().items() if ".adapter." not in k})
    adapter = adatad_s_small.blocks[1].adapter
    assert adapter.up_proj.weight.abs().max() == 0 and adapter.up_proj.bias.abs().max() == 0
    assert adapter.gamma.item() == 1.0 and adapter.dwconv.weight.std() > 0.1  # OpenTAD's init
    frames = torch.randint(0, 256, (1, 32, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(adapted(frames), plain(frames), rtol=0, atol=0)


def test_plain_videomae_checkpoint_gives_fresh_adapters_and_adatad_keys_are_strict():
    model, _ = small_adapted()
    plain_ckpt = opentad_state(3, 64, adapter_index=(), img_size=32)
    report = load_mmaction_videomae(model, plain_ckpt, adapters="fresh")
    assert len(report["fresh"]) == 2 * 9 and model.blocks[0].adapter.up_proj.weight.abs().max() > 0  # kept
    with pytest.raises(NoAdaptersInCheckpoint, match=r"holds no AdaTAD adapter weights .*18 adapter tensors"):
        load_mmaction_videomae(model, plain_ckpt)  # strict: an AdaTAD model needs its adapters
    with pytest.raises(AdaptersInCheckpoint, match=r"holds AdaTAD adapter weights"):
        load_mmaction_videomae(model, opentad_state(3, 64, (0, 2), img_size=32), adapters="fresh")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(9\).*blocks\.1\.adapter\.gamma"):
        load_mmaction_videomae(model, opentad_state(3, 64, (0, 1, 2), img_size=32))
    with pytest.raises(CheckpointError, match=r"missing keys \(9\).*blocks\.2\.adapter"):
        load_mmaction_videomae(model, opentad_state(3, 64, (0,), img_size=32))


# ---- running the blocks -------------------------------------------------------------------------

def test_chunking_and_checkpointing_keep_the_result():
    model, _ = small_adapted()
    backbone = vit.ClipVideoBackbone(model)
    frames = torch.randn(2, 3, 48, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = backbone(frames)
        backbone.chunk_clips = 2  # attention and MLP two clips at a time, adapters on whole windows
        torch.testing.assert_close(backbone(frames), whole, rtol=1e-6, atol=1e-6)
    backbone.chunk_clips = None
    grads = []
    for enable in (False, True):
        model.train().set_grad_checkpointing(enable)
        model.zero_grad()
        backbone(frames).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_an_adapted_block_needs_the_layout():
    model, _ = small_adapted()
    tokens = torch.zeros(3, 4 * 8, 64)
    model.blocks[1](tokens)  # no adapter: clip by clip as before
    with pytest.raises(BlockdropError, match="temporal adapter"):
        model.blocks[0](tokens)


# ---- the detector: drop, save, reload, and the engine's view ------------------------------------

def tiny_adatad_config(*extra):
    return load_config(ExperimentConfig, resolve_config_path("thumos14_adatad_s"), [
        "backbone.size=null", "backbone.depth=3", "backbone.width=32", "backbone.heads=2",
        "backbone.checkpoint=null", "backbone.checkpoint_format=null", "backbone.grad_checkpointing=false",
        "backbone.drop_path=0.0", "data.window=32", "data.test_stride=16", "data.frame_size=32",
        "head.embed_dim=32", "head.fpn_dim=32", "head.head_dim=32", *extra])


def randomize_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_dropping_an_adapted_block_removes_its_adapter_and_reloads_standalone(tmp_path):
    cfg = tiny_adatad_config()
    torch.manual_seed(0)
    model = build_detector(cfg, 3, 3).eval()
    assert all(p.requires_grad == (".adapter." in n) for n, p in model.backbone.named_parameters())
    randomize_adapters(model)
    dropped = {id(p) for p in model.backbone.blocks[1].adapter.parameters()}
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
    result = drop_blocks(model, [1])
    assert result.kept_original == [0, 2]
    assert not dropped & {id(p) for p in model.parameters()}
    assert sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n) == adapter_params * 2 // 3
    # the compressed model saves and rebuilds from its own metadata, without the original
    save_compressed(model, tmp_path / "adatad.safetensors", builder=detector_builder(cfg, ("a", "b", "c"), 3))
    loaded, _ = load_detector(tmp_path / "adatad.safetensors")
    frames = torch.randint(0, 256, (2, 32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 32, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(frames, mask).head.cls_logits, model(frames, mask).head.cls_logits,
                                   rtol=0, atol=0)
    # exported back to OpenTAD, the kept blocks are renumbered 0..1
    exported = export_mmaction_videomae(model.backbone)
    assert {k.split(".")[2] for k in exported if k.startswith("backbone.blocks.")} == {"0", "1"}
    assert opentad_backbone_args(model.backbone)["adapter_index"] == [0, 1]


def test_the_engine_runs_adapted_blocks_one_by_one():
    cfg = tiny_adatad_config()
    torch.manual_seed(0)
    model = build_detector(cfg, 3, 3).eval()
    randomize_adapters(model)
    target = DetectorTarget(None, EvalConfig())  # embed / call_block need no dataset
    frames = torch.randint(0, 256, (2, 32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens, ctx = target.embed(model, {"inputs": frames})
        assert ctx.layout == (2, 2, 8, 2, 2)  # windows, clips, tubelet steps, patch grid
        for block in model.backbone.blocks:
            tokens = target.call_block(block, tokens, ctx)
        torch.testing.assert_close(model.backbone.pool(tokens, ctx), model.backbone(frames), rtol=0, atol=0)


# ---- settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("backbone.adapter_blocks=some", "adapter_blocks"),
    ("backbone.adapter_blocks=[1, 1]", "adapter_blocks"),
    ("backbone.adapter_blocks=[-1]", "adapter_blocks"),
    ("backbone.adapter_ratio=0", "adapter_ratio"),
    ("backbone.adapter_kernel=2", "adapter_kernel"),
    ("backbone.adapter_blocks=null", "train_only_adapters"),
])
def test_bad_adapter_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"backbone.*'{key}'"):
        tiny_adatad_config(override)


def test_adapter_settings_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"backbone: adapter_blocks \[0, 3\].*within 0\.\.2"):
        build_detector(tiny_adatad_config("backbone.adapter_blocks=[0, 3]"), 3, 3)
    with pytest.raises(ConfigError, match=r"backbone.*'adapter_blocks'.*videomae only"):
        tiny_adatad_config("backbone.kind=dinov2", "backbone.train_only_adapters=false")
    with pytest.raises(ConfigError, match=r"adatad needs 'adapter_blocks'"):
        tiny_adatad_config("backbone.adapter_blocks=null", "backbone.train_only_adapters=false",
                           "backbone.checkpoint_format=adatad")
    with pytest.raises(ConfigError, match="adapter_ratio 0.01 leaves no adapter channels"):
        build_detector(tiny_adatad_config("backbone.adapter_ratio=0.01"), 3, 3)
    cfg = tiny_adatad_config("backbone.adapter_blocks=[2, 0]")
    assert cfg.backbone.adapter_blocks == (2, 0)
    assert opentad_backbone_args(build_detector(cfg, 3, 3).backbone)["adapter_index"] == [0, 2]


@pytest.mark.parametrize("name, depth, width", [("thumos14_adatad_s", 12, 384), ("thumos14_adatad_l", 24, 1024)])
def test_shipped_adatad_configs_build_and_align_lora_and_adapters(name, depth, width):
    """At full size on the meta device (no memory): adapters in every block, and the compress
    section trains LoRA of rank width / 4 on attention plus the adapters in full (the release)."""
    cfg = load_experiment(name)
    a = cfg.compress.alignment
    assert a.lora and a.adapters is True and a.lora_rank == width // 4 and cfg.compress.stopping.max_blocks == depth // 4
    with torch.device("meta"):
        model = build_detector(replace(cfg, backbone=replace(cfg.backbone, checkpoint=None)), 20, 3)
    blocks = model.backbone.blocks
    assert len(blocks) == depth and all(b.adapter is not None and b.adapter.hidden == width // 4 for b in blocks)
    assert check_lora(model, DetectorTarget.stack_path, targets=a.lora_targets, trainable=a.trainable,
                      rank=a.lora_rank, lora=a.lora, adapters=a.adapters) == ("attn.qkv", "attn.proj")
    full = trained_in_full(model, DetectorTarget.stack_path, a.trainable, a.adapters)
    trained = [n for n, _ in model.named_parameters() if any(re.search(p, n) for p in full)]
    assert sum(".adapter." in n for n in trained) == depth * 9  # every adapter tensor of every block
    assert not any(".attn." in n or ".mlp." in n for n in trained if n.startswith("backbone."))
    with pytest.raises(ConfigError, match=r"compress\.alignment\.adapters is true, but no block"):
        load_experiment(name, ["backbone.adapter_blocks=null", "backbone.train_only_adapters=false"])
