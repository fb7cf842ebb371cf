"""blockdrop against numbers and layouts that OpenTAD's own code produced (tests/data/opentad, with
how they were made in its README): the AdaTAD backbone's forward, its temporal resampling, the
tail padding of windows, and the checkpoint layout of tools/train.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blockdrop.data.dataset import _window_input
from blockdrop.data.windows import random_truncation, sliding_windows
from blockdrop.models import vit
from blockdrop.models.checkpoints import export_mmaction_videomae, load_mmaction_videomae

from opentad_helpers import OPENTAD_PREFIX as PREFIX, fabricate_opentad_checkpoint, opentad_layout

DATA = Path(__file__).parent / "data" / "opentad"


@pytest.fixture(scope="module")
def forward_fixture():
    tensors = load_file(str(DATA / "adatad_tiny16_forward.safetensors"))
    meta = json.loads((DATA / "adatad_tiny16_forward.json").read_text())
    return tensors, meta


def opentad_tiny16(feature_stride=None) -> vit.ClipVideoBackbone:
    args = json.loads((DATA / "adatad_tiny16_forward.json").read_text())["vision_transformer_adapter_args"]
    model = vit.videomae_vit("S", depth=args["depth"], width=args["embed_dims"], heads=args["num_heads"],
                             pos_img_size=args["img_size"], num_frames=args["num_frames"],
                             adapter_blocks=args["adapter_index"])
    return vit.ClipVideoBackbone(model, clip_len=args["num_frames"], feature_stride=feature_stride).eval()


@pytest.mark.parametrize("feature_stride,expected", [(None, "fixture.features_before_interpolate"),
                                                     (1, "fixture.features")])
def test_adatad_backbone_matches_opentads_forward(forward_fixture, feature_stride, expected):
    """OpenTAD's BackboneWrapper (preprocessing, VisionTransformerAdapter with its 224 px table resized to
    32 px frames, adapters across the window's clips, mean over space, Interpolate to the window) and
    ours, on the same weights as OpenTAD saves them and the same frames."""
    tensors, _ = forward_fixture
    model = opentad_tiny16(feature_stride)
    state = {k: v for k, v in tensors.items() if not k.startswith("fixture.")}
    report = load_mmaction_videomae(model.vit, {"state_dict": state})  # strict, adapters included
    assert report["loaded"] > 0 and not report.get("fresh")
    frames = tensors["fixture.frames_uint8"][:, 0].permute(0, 2, 3, 4, 1).contiguous()  # (B, T, H, W, 3)
    with torch.no_grad():
        ours = model(frames)
    reference = tensors[expected]
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_resampling_is_opentads_interpolate():
    case = json.loads((DATA / "loadframes_cases.json").read_text())["interpolate"]
    x = torch.tensor(case["input"], dtype=torch.float32)
    torch.testing.assert_close(vit.resample_time(x, 32),  # Interpolate(size=32)
                               torch.tensor(case["output"], dtype=torch.float32), rtol=0, atol=1e-6)


def _frames(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)


def _sliding_cases(stride_frames: int):
    cases = json.loads((DATA / "loadframes_cases.json").read_text())["sliding_window"]
    return [c for c in cases if c["snippet_stride"] == stride_frames]


@pytest.mark.parametrize("case", _sliding_cases(1), ids=lambda c: f"overlap{c['window_overlap_ratio']}")
def test_tail_padding_repeats_the_last_frame_as_loadframes(case):
    """Every window of OpenTAD's sliding dataset, its frames and mask, as `data.tail_pad: repeat` gives them."""
    window = case["window_size"]
    by_video = {}
    for w in case["windows"]:
        by_video.setdefault((w["video_name"], w["total_frames"]), []).append(w)
    for (name, total), theirs in by_video.items():
        frames = _frames(total)
        starts = sliding_windows(total, window, case["window_stride"])
        # ours cover the whole video, ending flush with it; OpenTAD's 0.25-overlap windows leave its tail unseen
        assert {w["window_start_frame"] for w in theirs} <= set(starts)
        assert starts[-1] + window >= total
        for w in theirs:
            inputs, mask = _window_input(frames, w["window_start_frame"], window, "repeat")
            assert inputs[:, 0, 0, 0].tolist() == w["frame_inds"], name
            assert mask.tolist() == w["masks"], name
            zeros, zmask = _window_input(frames, w["window_start_frame"], window, "zeros")
            assert zmask.tolist() == w["masks"]  # the same mask; zeros past the end instead of the last frame
            valid = int(sum(w["masks"]))
            assert torch.equal(zeros[:valid], inputs[:valid]) and not zeros[valid:].any()


def test_training_crop_of_a_short_video_pads_as_random_trunc():
    case = next(c for c in json.loads((DATA / "loadframes_cases.json").read_text())["random_trunc"]
                if c["crop_ratio"] is None)
    total, window = case["total_frames"], case["trunc_len"]
    segments = np.asarray(case["gt_segments_in"], dtype=np.float64)
    start, kept, indices = random_truncation(total, segments, window, np.random.default_rng(0), case["trunc_thresh"])
    inputs, mask = _window_input(_frames(total), start, window, "repeat")
    assert inputs[:, 0, 0, 0].tolist() == case["frame_inds"] and mask.tolist() == case["masks"]
    assert kept.tolist() == case["gt_segments_out"] and indices.tolist() == [0, 1]


# ---------------------------------------------------------------- OpenTAD's checkpoint layout


def test_an_opentad_checkpoint_imports_strictly_and_exports_back_to_its_key_set(tmp_path):
    layout = opentad_layout()
    path = tmp_path / "epoch_1.pth"
    saved = fabricate_opentad_checkpoint(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)  # no code runs: weights only
    args = layout["vision_transformer_adapter_args"]
    model = vit.videomae_vit("S", depth=args["depth"], width=args["embed_dims"], heads=args["num_heads"],
                             pos_img_size=args["img_size"], adapter_blocks=args["adapter_index"])
    report = load_mmaction_videomae(model, loaded)  # the EMA copy, under the detector's prefix, strictly
    assert report["loaded"] > 0
    ema_qkv = saved["state_dict_ema"][PREFIX + "blocks.0.attn.qkv.weight"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema_qkv)

    exported = export_mmaction_videomae(model, prefix=PREFIX, identity_fc_norm=True)
    theirs = {key: shape for key, shape, _ in layout["state_dict"] if key.startswith(PREFIX)}
    assert {k: list(v.shape) for k, v in exported.items()} == theirs  # OpenTAD's backbone key set and shapes


OPENTAD_CONFIGS = {"thumos14_videomae_s": 1, "thumos14_videomae_l": 1, "thumos14_adatad_s": 1, "thumos14_adatad_l": 1,
                   "activitynet13_videomae_s": 4}  # frames per feature step after OpenTAD's Interpolate


@pytest.mark.parametrize("name,stride", OPENTAD_CONFIGS.items())
def test_shipped_opentad_configs_resample_and_pad_as_opentad(name, stride):
    """The THUMOS14 / ActivityNet configs default to OpenTAD's pipeline: the backbone's tubelet steps
    interpolated to one step per `stride` frames, windows past a video's end padded with its last frame."""
    from blockdrop.core.config import load_config
    from blockdrop.core.schema import ExperimentConfig
    from blockdrop.recipes.build import SHIPPED, build_detector

    cfg = load_config(ExperimentConfig, SHIPPED / f"{name}.yaml", [
        "backbone.checkpoint=null", "backbone.checkpoint_format=null", "backbone.depth=1", "data.frame_size=32",
        "data.window=32", "data.test_stride=16", "head.embed_dim=16", "head.fpn_dim=16", "head.head_dim=16"])
    assert cfg.data.tail_pad == "repeat" and cfg.backbone.feature_stride == stride
    model = build_detector(cfg, 3, 3).eval()
    frames = torch.randint(0, 256, (1, 32, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(frames, torch.ones(1, 32, dtype=torch.bool))
        pooled = vit.ClipVideoBackbone(model.backbone.vit, clip_len=16)(frames)  # one step per tubelet
    assert out.features.shape[-1] == 32 // stride and model.feature_stride == stride
    torch.testing.assert_close(out.features, vit.resample_time(pooled, 32 // stride), rtol=0, atol=0)
