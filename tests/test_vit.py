"""VisionTransformer: equal to transformers' VideoMAE / DINOv2, and the backbone contract."""


import pytest
import torch

from blockdrop.core.errors import ConfigError
from blockdrop.models.checkpoints import load_hf_dinov2, load_hf_videomae
from blockdrop.models.vit import (ClipVideoBackbone, VisionTransformer, dinov2_vit, sequence_vit,
                                  videomae_vit, vit_sizes)

from conftest import import_transformers

TINY = dict(depth=3, width=96, heads=4)




def randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, so that zero-initialised biases and scales are checked too."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_scale = p.ndim == 1 and ("norm" in name or "lambda" in name)
            p.copy_(1 + 0.1 * noise if is_scale else 0.1 * noise)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tokens_after_blocks(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    tokens, _ = vit.embed(x)
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens) if vit.norm is not None else tokens


@pytest.mark.parametrize("use_mean_pooling", [False, True])
def test_videomae_matches_transformers(use_mean_pooling):
    tf = import_transformers()
    config = tf.VideoMAEConfig(image_size=(48, 64), patch_size=16, num_frames=6, tubelet_size=2,
                               hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=384, layer_norm_eps=1e-6, attn_implementation="eager",
                               use_mean_pooling=use_mean_pooling)
    ref = tf.VideoMAEModel(config).eval()
    randomize(ref)
    vit = videomae_vit(num_frames=6, pos_img_size=(48, 64),
                       final_norm="none" if use_mean_pooling else "tokens", **TINY).eval()
    load_hf_videomae(vit, ref)
    x = torch.randn(2, 6, 3, 48, 64)  # transformers takes (B, T, 3, H, W)
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state  # (B, 3*3*4, C)
        tokens = tokens_after_blocks(vit, x.transpose(1, 2))
        feats = vit(x.transpose(1, 2))
    assert rel_err(tokens, expected) < 1e-5
    pooled = expected.unflatten(1, (3, 12)).mean(2).transpose(1, 2)  # mean over space per tubelet step
    assert feats.shape == (2, 96, 3) and rel_err(feats, pooled) < 1e-5


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_dinov2_matches_transformers(pool):
    tf = import_transformers()
    config = tf.Dinov2Config(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                             image_size=56, layerscale_value=0.5, attn_implementation="eager")
    ref = tf.Dinov2Model(config).eval()
    randomize(ref)
    vit = dinov2_vit(patch=14, img_size=56, pool=pool, **TINY).eval()
    load_hf_dinov2(vit, ref)
    x = torch.randn(2, 3, 42, 70)  # non-square: positions resized from 4x4 to 3x5
    with torch.no_grad():
        out = ref(pixel_values=x)
        tokens = tokens_after_blocks(vit, x)
        feats = vit(x)  # (B, C, 1): an image is a one-frame video
    assert rel_err(tokens, out.last_hidden_state) < 1e-5
    expected = out.pooler_output if pool == "cls" else out.last_hidden_state[:, 1:].mean(1)
    assert feats.shape == (2, 96, 1) and rel_err(feats[..., 0], expected) < 1e-5


def test_videomae_positions_follow_opentad_for_160px():
    import_transformers()
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    vit = videomae_vit(num_frames=4, **TINY)  # table made for 224 px (14x14)
    table = vit.tokenizer.position_table(2, 10, 10)
    reference = get_sinusoid_encoding_table(2 * 14 * 14, 96)  # (1, 392, C), numpy reference
    reference = reference.reshape(2, 14, 14, 96).permute(0, 3, 1, 2)
    reference = torch.nn.functional.interpolate(reference, size=(10, 10), mode="bicubic", align_corners=False)
    assert torch.allclose(table, reference.permute(0, 2, 3, 1).reshape(1, -1, 96), atol=1e-6)
    assert torch.allclose(vit.tokenizer.position_table(2, 14, 14), get_sinusoid_encoding_table(392, 96), atol=1e-6)


def _contract_cases():
    return [
        (videomae_vit(num_frames=4, pos_img_size=48, final_norm="pooled", **TINY),
         torch.randn(2, 3, 4, 32, 32), (2, 96, 2)),
        (dinov2_vit(patch=8, img_size=32, pool="mean", **TINY), torch.randn(2, 3, 5, 24, 32), (2, 96, 5)),
        (sequence_vit(6, patch=4, **TINY), torch.randn(2, 40, 6), (2, 96, 10)),
        (sequence_vit(6, patch=4, pos="learned", max_len=8, **TINY), torch.randn(2, 40, 6), (2, 96, 10)),
    ]


@pytest.mark.parametrize("vit,x,shape", _contract_cases())
def test_pool_blocks_embed_equals_forward(vit, x, shape):
    vit.eval()
    with torch.no_grad():
        tokens, ctx = vit.embed(x)
        per_block = []
        for block in vit.blocks:
            tokens = block(tokens)
            per_block.append(tokens)
        stepwise = vit.pool(tokens, ctx)
        feats, outputs = vit(x, return_blocks=True)
    assert feats.shape == shape and vit.out_channels == 96
    assert torch.equal(stepwise, feats) and torch.equal(feats, vit(x))
    assert len(outputs) == vit.depth == 3
    assert all(torch.equal(a, b) for a, b in zip(outputs, per_block))


def test_feature_strides():
    assert videomae_vit(**TINY).feature_stride == 2
    assert dinov2_vit(**TINY).feature_stride == 1
    assert sequence_vit(6, patch=5, **TINY).feature_stride == 5


def test_clip_backbone_equals_vit_per_clip():
    vit = videomae_vit(num_frames=4, pos_img_size=32, **TINY).eval()
    backbone = ClipVideoBackbone(vit, clip_len=4).eval()
    frames = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8)  # a 2-clip window, as decoded
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1, 1)
    x = (frames.permute(0, 4, 1, 2, 3).float() - mean) / std  # (B, 3, T, H, W)
    with torch.no_grad():
        expected = torch.cat([vit(x[:, :, :4]), vit(x[:, :, 4:])], dim=2)  # (B, C, 2 + 2)
        feats, outputs = backbone(frames, return_blocks=True)
        tokens, ctx = backbone.embed(frames)
        for block in backbone.blocks:
            tokens = block(tokens)
        stepwise = backbone.pool(tokens, ctx)
        chunked = ClipVideoBackbone(vit, clip_len=4, chunk_clips=1)(frames)
    assert feats.shape == (2, 96, 4) and backbone.feature_stride == 2
    assert torch.allclose(feats, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(stepwise, feats) and len(outputs) == backbone.depth
    assert torch.allclose(chunked, feats, atol=1e-6)


def test_clip_backbone_resamples_to_feature_stride():
    vit = dinov2_vit(patch=8, img_size=16, **TINY)
    backbone = ClipVideoBackbone(vit, clip_len=4, feature_stride=2).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 12, 16, 16))  # 12 frames -> 3 clips -> 12 steps -> 6
    assert feats.shape == (1, 96, 6) and backbone.feature_stride == 2
    with pytest.raises(ValueError, match="clip_len"):
        backbone(torch.randn(1, 3, 10, 16, 16))


def test_removing_a_block_keeps_the_model_runnable():
    vit = videomae_vit(num_frames=4, drop_path_rate=0.2, **TINY)
    backbone = ClipVideoBackbone(vit, clip_len=4)
    rates = [b.drop_path_rate for b in vit.blocks]
    del backbone.blocks[1]
    assert vit.depth == backbone.depth == 2
    assert [b.drop_path_rate for b in vit.blocks] == [rates[0], rates[2]]
    feats, outputs = backbone(torch.randn(1, 3, 8, 32, 32), return_blocks=True)
    assert feats.shape == (1, 96, 4) and len(outputs) == 2


def test_grad_checkpointing_gives_same_gradients():
    vit = sequence_vit(6, patch=4, **TINY).train()
    x = torch.randn(2, 16, 6)
    vit(x).sum().backward()
    plain = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    vit(x).sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, vit.parameters()))


def test_named_sizes_and_overrides():
    vit = videomae_vit("S", depth=2)
    assert (vit.depth, vit.out_channels, vit.blocks[0].attn.heads) == (2, 384, 6)
    assert vit_sizes["L"] == (24, 1024, 16)
    assert dinov2_vit("B", depth=1).blocks[0].mlp.fc1.out_features == 3072
    with pytest.raises(ConfigError, match="'XL'"):
        videomae_vit("XL")
    with pytest.raises(ConfigError, match="divisible"):
        sequence_vit(6, patch=4, depth=1, width=10, heads=3)


def test_rgb_diff_input_sees_changes_only_and_crosses_clip_boundaries():
    vit = videomae_vit(num_frames=4, pos_img_size=32, **TINY).eval()
    diff = ClipVideoBackbone(vit, clip_len=4, input_mode="rgb_diff").eval()
    rgb = ClipVideoBackbone(vit, clip_len=4).eval()
    frames = torch.randint(20, 230, (1, 8, 32, 32, 3), dtype=torch.uint8)
    brighter = frames + 10  # the same motion on a brighter scene: no difference changes
    later = frames.clone()
    later[:, 3] = 255 - later[:, 3]  # last frame of clip 0 changes
    with torch.no_grad():
        assert torch.allclose(diff(brighter), diff(frames), atol=1e-5)
        assert not torch.allclose(rgb(brighter), rgb(frames), atol=1e-3)
        changed = (diff(later) - diff(frames)).abs().amax(dim=(0, 1))  # per feature step
        changed_rgb = (rgb(later) - rgb(frames)).abs().amax(dim=(0, 1))
        x = (frames.permute(0, 4, 1, 2, 3).float() - rgb.pixel_mean) / rgb.pixel_std
        manual = torch.cat([torch.zeros_like(x[:, :, :1]), x.diff(dim=2)], dim=2)
        expected = torch.cat([vit(manual[:, :, :4]), vit(manual[:, :, 4:])], dim=2)
        assert torch.allclose(diff(frames), expected, atol=1e-5)
    # frame 3 ends clip 0 (steps 0-1); in rgb_diff it also enters frame 4's difference, in clip 1
    assert changed_rgb[:2].min() > 1e-3 and changed_rgb[2:].max() == 0
    assert changed.min() > 1e-3
    with pytest.raises(ConfigError, match="input_mode"):
        ClipVideoBackbone(vit, clip_len=4, input_mode="flow")


def test_a_dinov2_config_with_rgb_diff_feeds_each_frame_its_difference():
    """backbone.kind dinov2 + input rgb_diff: every frame's image is the difference to the previous
    frame of the window (the first a zero image), each run through the per-frame ViT."""
    from blockdrop.core.schema import BackboneConfig, DataConfig
    from blockdrop.recipes.build import build_backbone

    data = DataConfig(kind="video", root=".", window=8, frame_size=28)
    torch.manual_seed(0)
    diff = build_backbone(BackboneConfig(kind="dinov2", size="S", depth=2, clip_len=4, input="rgb_diff",
                                         drop_path=0.0), data, 3).eval()
    assert diff.input_mode == "rgb_diff"
    frames = torch.randint(0, 256, (1, 8, 28, 28, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = diff.normalize(frames)  # (1, 3, 8, 28, 28)
        images = torch.cat([torch.zeros_like(x[:, :, :1]), x.diff(dim=2)], dim=2)
        expected = diff.vit(images)  # (1, C, 8): the frame ViT on each difference image
        torch.testing.assert_close(diff(frames), expected, rtol=0, atol=1e-5)
        still = frames[:, :1].expand(-1, 8, -1, -1, -1)  # no motion: every frame sees a zero image
        out = diff(still)
        torch.testing.assert_close(out, out[..., :1].expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_tubelet_spatial_pool(pool):
    vit = videomae_vit(num_frames=4, pos_img_size=32, spatial_pool=pool, **TINY).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        tokens, ctx = vit.embed(x)
        for block in vit.blocks:
            tokens = block(tokens)
        grid = tokens.unflatten(1, (2, 4))  # (B, t, h*w, C)
        expected = (grid.amax(2) if pool == "max" else grid.mean(2)).transpose(1, 2)
        assert torch.allclose(vit(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="'mean' or 'max'"):
        videomae_vit(num_frames=4, spatial_pool="sum", **TINY)
