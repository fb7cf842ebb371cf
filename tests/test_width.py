"""Width pruning (compress.width) and the `bench` command, on tiny ViTs.

The reference for a pruned model is the ORIGINAL model with the removed heads' columns of
`attn.proj` and the removed hidden channels' columns of `mlp.fc2` set to zero: removing a head
or a channel must compute exactly that. Expected MACs are written out as arithmetic.
"""

import argparse
import importlib.util
import sys

import pytest
import torch
from torch import nn

from blockdrop.core.errors import BlockdropError
from blockdrop.core.measure import count_macs
from blockdrop.models.vit import Attention, ClipVideoBackbone, videomae_vit

needs_tp = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                              reason="torch-pruning not installed (pip install 'blockdrop[prune]')")

WIDTH, HEADS, HIDDEN, TOKENS = 64, 4, 256, 8  # clip (1, 3, 4, 32, 32) -> 2 * 2 * 2 tokens


@pytest.fixture(scope="module", autouse=True)
def counter_imported():
    """FlopCounterMode imports torch._dynamo on first use (~4 s, once per process): pay it here."""
    count_macs(nn.Linear(2, 2), torch.zeros(1, 2))


def tiny_backbone(depth=2, seed=0) -> ClipVideoBackbone:
    torch.manual_seed(seed)
    vit = videomae_vit("S", num_frames=4, pos_img_size=32, depth=depth, width=WIDTH, heads=HEADS)
    for block in vit.blocks:  # VideoMAE initialises them to zero: make a misplaced bias visible
        nn.init.normal_(block.attn.q_bias)
        nn.init.normal_(block.attn.v_bias)
        nn.init.normal_(block.mlp.fc1.bias)
    return ClipVideoBackbone(vit, clip_len=4).eval()


def clip():
    return torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))


def block_macs(tokens, width, heads, head_dim, hidden) -> int:
    inner = heads * head_dim
    return (tokens * width * 3 * inner + tokens * inner * width  # qkv, proj
            + 2 * tokens * width * hidden + 2 * tokens * tokens * inner)  # MLP, attention matmuls


EMBED_MACS = TOKENS * WIDTH * 3 * 2 * 16 * 16  # Conv3d tubelet embedding


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Index in `original` of every row of `pruned` (rows are copied, so they match exactly)."""
    return [int((original == row).all(dim=1).nonzero()[0]) for row in pruned]


def masked_reference(original: ClipVideoBackbone, pruned: ClipVideoBackbone) -> ClipVideoBackbone:
    """The original with the pruned-away heads and MLP channels zeroed at their only exit."""
    head_dim = WIDTH // HEADS
    for old, new in zip(original.blocks, pruned.blocks):
        q_rows = kept_rows(old.attn.qkv.weight[:WIDTH], new.attn.qkv.weight[:new.attn.qkv.out_features // 3])
        kept_heads = sorted({r // head_dim for r in q_rows})
        with torch.no_grad():
            for h in set(range(HEADS)) - set(kept_heads):
                old.attn.proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            hidden = kept_rows(old.mlp.fc1.weight, new.mlp.fc1.weight)
            old.mlp.fc2.weight[:, sorted(set(range(HIDDEN)) - set(hidden))] = 0
    return original


# ---- prune_width ---------------------------------------------------------------------------------

@needs_tp
def test_pruned_model_computes_the_original_minus_removed_heads_and_channels():
    from blockdrop.compress.width import prune_width

    original, x = tiny_backbone(), clip()
    pruned = tiny_backbone()
    result = prune_width(pruned, mlp_ratio=0.25, head_ratio=0.5, example_input=x)
    assert result.heads_before == [4, 4] and result.heads_after == [2, 2]
    assert result.hidden_before == [256, 256] and result.hidden_after == [192, 192]
    with torch.no_grad():
        out = pruned(x)
        reference = masked_reference(original, pruned)(x)
    assert out.shape == reference.shape == (1, WIDTH, 2)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@needs_tp
def test_heads_bookkeeping_and_biases_stay_consistent():
    from blockdrop.compress.width import prune_width

    model = tiny_backbone()
    result = prune_width(model, head_ratio=0.25, example_input=clip())  # 4 heads -> 3
    for block in model.blocks:
        attn = block.attn
        assert isinstance(attn, Attention) and attn.heads == 3 and attn.head_dim == WIDTH // HEADS
        inner = attn.heads * attn.head_dim
        assert attn.qkv.out_features == 3 * inner and attn.qkv.bias is None
        assert attn.q_bias.shape == attn.v_bias.shape == (inner,)
        assert attn.proj.in_features == inner and attn.proj.out_features == WIDTH
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == HIDDEN  # MLP untouched
    assert result.params_removed == sum(p.numel() for p in tiny_backbone().parameters()) - sum(
        p.numel() for p in model.parameters()) > 0


@needs_tp
def test_macs_fall_as_the_arithmetic_says():
    from blockdrop.compress.width import prune_width

    model, x = tiny_backbone(), clip()
    assert count_macs(model, x)["macs"] == EMBED_MACS + 2 * block_macs(TOKENS, WIDTH, 4, 16, 256)
    prune_width(model, mlp_ratio=0.5, head_ratio=0.5, example_input=x)
    counted = count_macs(model, x)
    assert counted["macs"] == EMBED_MACS + 2 * block_macs(TOKENS, WIDTH, 2, 16, 128)


@needs_tp
def test_frozen_weights_and_training_mode_are_restored():
    from blockdrop.compress.width import prune_width

    model = tiny_backbone().train()
    for p in model.vit.tokenizer.parameters():
        p.requires_grad_(False)
    prune_width(model, mlp_ratio=0.25, example_input=clip())
    assert model.training
    assert not any(p.requires_grad for p in model.vit.tokenizer.parameters())
    assert all(p.requires_grad for p in model.blocks.parameters())


@needs_tp
@pytest.mark.parametrize("kwargs, message", [
    ({"mlp_ratio": 0.95}, "mlp_ratio"), ({"head_ratio": -0.1}, "head_ratio"),
    ({"importance": "taylor"}, "importance")])
def test_bad_arguments_name_the_argument(kwargs, message):
    from blockdrop.compress.width import prune_width

    with pytest.raises(BlockdropError, match=message):
        prune_width(tiny_backbone(), example_input=clip(), **kwargs)


def test_missing_torch_pruning_names_the_extra(monkeypatch):
    from blockdrop.compress.width import prune_width

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import raises ImportError
    with pytest.raises(BlockdropError, match=r"blockdrop\[prune\]"):
        prune_width(tiny_backbone(), mlp_ratio=0.25, example_input=clip())


# ---- prune_to_macs -------------------------------------------------------------------------------

@needs_tp
@pytest.mark.parametrize("fraction", [0.9, 0.7])
def test_prune_to_macs_hits_the_target(fraction):
    from blockdrop.compress.width import prune_to_macs

    model, x = tiny_backbone(), clip()
    target = round(count_macs(model, x)["macs"] * fraction)
    result = prune_to_macs(model, target, x, round_to=None)
    counted = count_macs(model, x)["macs"]  # on the real model, not the meta copy prune_to_macs used
    assert counted == result.macs and result.target_macs == target
    assert abs(counted - target) <= 0.02 * target
    assert len(set(result.heads_after)) == 1 and len(set(result.hidden_after)) == 1  # uniform over blocks
    assert model(x).shape == (1, WIDTH, 2)


@needs_tp
def test_prune_to_macs_rejects_unreachable_targets():
    from blockdrop.compress.width import prune_to_macs

    model, x = tiny_backbone(), clip()
    original = count_macs(model, x)["macs"]
    with pytest.raises(BlockdropError, match="out of reach"):
        prune_to_macs(model, original // 20, x)
    with pytest.raises(BlockdropError, match="at most"):
        prune_to_macs(model, original + 1, x)


# ---- blockdrop bench -----------------------------------------------------------------------------

def bench_parser() -> argparse.ArgumentParser:
    from blockdrop.cli import build_parser

    return build_parser()


TINY = ["bench", "synthetic", "--set", "backbone.depth=3", "--set", "data.window=32", "--set", "data.test_stride=16",
        "--threads", "1"]


COLUMNS = ("kind", "blocks", "heads", "mlp", "gmacs", "linear_gmacs", "params_m", "latency_ms", "iqr_ms",
           "speedup", "macs_ratio", "efficiency")


def table_rows(text: str) -> dict:
    """The printed table -> {variant name: {column: text}}; names may contain spaces."""
    rows = {}
    for line in text.strip().splitlines()[2:]:
        parts = line.split()
        rows[" ".join(parts[:-len(COLUMNS)])] = dict(zip(COLUMNS, parts[-len(COLUMNS):]))
    return rows


def test_bench_measures_original_and_dropped_depths(capsys):
    args = bench_parser().parse_args(TINY + ["--drop", "2", "--rounds", "1", "--min-run-time", "0.01", "--warmup", "1"])
    assert args.drop == 2 and args.threads == 1 and args.set == ["backbone.depth=3", "data.window=32",
                                                                 "data.test_stride=16"]
    assert args.func(args) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert "1 CPU threads" in out
    assert list(rows) == ["original", "drop 1", "drop 2"]
    gmacs = [float(row["gmacs"]) for row in rows.values()]
    assert gmacs[0] > gmacs[1] > gmacs[2] > 0
    assert [row["blocks"] for row in rows.values()] == ["3", "2", "1"]
    assert all(float(row["latency_ms"]) > 0 for row in rows.values())


def test_bench_rejects_a_drop_that_removes_every_block():
    args = bench_parser().parse_args(TINY + ["--drop", "3", "--rounds", "0"])
    with pytest.raises(BlockdropError, match="--drop 3"):
        args.func(args)


@needs_tp
def test_bench_width_points_match_the_depth_points(capsys):
    args = bench_parser().parse_args(TINY + ["--drop", "1", "--rounds", "0", "--width"])
    assert args.func(args) == 0
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == ["original", "drop 1", "width @ drop 1"]
    assert rows["width @ drop 1"]["kind"] == "width" and rows["width @ drop 1"]["blocks"] == "3"
    assert rows["width @ drop 1"]["latency_ms"] == "-"  # --rounds 0: cost only
    assert float(rows["width @ drop 1"]["macs_ratio"]) == pytest.approx(float(rows["drop 1"]["macs_ratio"]), rel=0.02)


@needs_tp
def test_width_pruned_and_dropped_detector_saves_and_reloads_without_the_original(tmp_path):
    from blockdrop.recipes.build import build_detector, detector_builder
    from blockdrop.recipes.build import resolve_config_path
    from blockdrop.compress.saving import save_compressed
    from blockdrop.compress.stack import drop_blocks
    from blockdrop.compress.width import prune_width, with_widths
    from blockdrop.core.config import load_config
    from blockdrop.core.errors import CheckpointError
    from blockdrop.core.schema import ExperimentConfig
    from blockdrop.recipes.build import load_detector

    cfg = load_config(ExperimentConfig, resolve_config_path("synthetic"), [
        "backbone.depth=3", "backbone.width=64", "backbone.heads=4", "head.embed_dim=32", "head.fpn_dim=32",
        "head.head_dim=32", "data.window=32", "data.test_stride=16", "data.frame_size=32"])
    torch.manual_seed(0)
    model = build_detector(cfg, 3, 3).eval()
    frames = torch.randint(0, 256, (1, 32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    prune_width(model.backbone, mlp_ratio=0.5, head_ratio=0.5, example_input=frames[:, :16])
    drop_blocks(model, [1])
    builder = detector_builder(cfg, ("a", "b", "c"), 3)
    save_compressed(model, tmp_path / "w.safetensors", builder=with_widths(builder, model, stack="backbone.blocks"))
    loaded, meta = load_detector(tmp_path / "w.safetensors")
    assert meta["widths"]["heads"] == {"0": 2, "2": 2} and meta["widths"]["mlp_hidden"] == {"0": 128, "2": 128}
    assert [b.attn.heads for b in loaded.backbone.blocks] == [2, 2]
    # the shipped synthetic config's input and pooling survive the round trip
    assert loaded.backbone.input_mode == "rgb_diff" and loaded.backbone.vit.tokenizer.pool_kind == "max"
    mask = torch.ones(1, 32, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(frames, mask).head.cls_logits, model(frames, mask).head.cls_logits,
                                   rtol=0, atol=0)
    # without the recorded widths the strict load names the misshaped tensors
    save_compressed(model, tmp_path / "plain.safetensors", builder=builder)
    with pytest.raises(CheckpointError, match="qkv"):
        load_detector(tmp_path / "plain.safetensors")


def test_bench_reads_the_input_channels_from_the_configs_data(tmp_path, capsys):
    """A sequence config whose data exists needs no --in-channels; with the data missing, the error
    names the missing file and the flag."""
    import shutil

    from conftest import tiny_config

    config = str(tiny_config(tmp_path))  # 3-channel sequences in tmp_path/data
    args = bench_parser().parse_args(["bench", config, "--drop", "1", "--rounds", "0"])
    assert args.in_channels is None and args.func(args) == 0
    assert list(table_rows(capsys.readouterr().out)) == ["original", "drop 1"]
    data = tmp_path / "data"
    removals = [(data / "sequences" / "v0.npy", lambda p: p.unlink()),  # the first video's array is read
                (data / "sequences", shutil.rmtree), (data / "annotations.json", lambda p: p.unlink())]
    for path, remove in removals:
        remove(path)
        with pytest.raises(BlockdropError, match="--in-channels") as err:
            args.func(args)
        assert str(path) in str(err.value)
