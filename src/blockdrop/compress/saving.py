"""Compressed checkpoints: a block-dropped model saved without the original, and loaded back.

`save_compressed` writes the model's state dict to one safetensors file whose metadata records
the stack's path, the ORIGINAL indices of the kept blocks, the original depth and a JSON
`builder` that describes the uncompressed architecture. `load_compressed` builds that
architecture, drops the blocks not kept (compress/stack.py) and loads the weights strictly: a
missing, unexpected or misshaped key is an error naming it. Tensors that share memory (tied
weights) are saved once and restored under every name.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from blockdrop.compress.stack import BlockStack, current_stack, drop_blocks, find_block_stack
from blockdrop.core.errors import BlockdropError, CheckpointError, listing
from blockdrop.core.fileio import atomic_path

FORMAT_VERSION = "1"
_META = {"format": "blockdrop.format", "path": "blockdrop.stack_path", "kept": "blockdrop.kept_blocks",
         "depth": "blockdrop.original_depth", "builder": "blockdrop.builder", "aliases": "blockdrop.aliases"}


@dataclass(frozen=True)
class CompressedMetadata:
    """The blockdrop metadata of a compressed safetensors checkpoint."""

    stack_path: str
    kept_blocks: list[int]
    original_depth: int
    builder: dict
    aliases: dict  # tied tensor name -> the name it was saved under
    format_version: str


def _plain_tensors(state: dict) -> tuple[dict, dict]:
    """safetensors refuses tensors sharing memory: save tied tensors once, under their first name."""
    tensors, aliases, first, storages = {}, {}, {}, set()
    for key, value in state.items():
        tensor = value.detach()
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        ident = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if storage is not None and ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        tensors[key] = tensor.clone() if storage in storages else tensor.contiguous()
        storages.add(storage)
    return tensors, aliases


def _canonical_header(path: Path) -> None:
    """Rewrite the safetensors header with its keys sorted, in place and at the same length.

    The library writes the header from a hash map, so identical models give files whose bytes
    differ between processes (the metadata order changes); sorted keys make them identical.
    Tensor offsets are relative to the end of the header, so its order does not move any data."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > size:  # cannot happen for the same content; keep the library's bytes then
            return
        f.seek(8)
        f.write(canonical + b" " * (size - len(canonical)))  # the format pads headers with spaces


def _atomic_save(tensors: dict, metadata: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        _canonical_header(tmp)


def save_compressed(model: nn.Module, path, *, builder: dict, stack: "BlockStack | str | None" = None) -> Path:
    """Write model.state_dict() to a safetensors file with the metadata `load_compressed` needs.

    `builder` is a JSON-able dict describing the UNCOMPRESSED architecture (e.g. {"kind":
    "blockdrop.vit", "config": {...}}); the loader's build_fn turns it back into a model.
    """
    stack = current_stack(model, stack)
    try:
        builder_json = json.dumps(builder, sort_keys=True) if isinstance(builder, dict) else None
    except (TypeError, ValueError) as err:
        raise BlockdropError(f"save_compressed: builder is not JSON-serialisable: {err}") from None
    if builder_json is None:
        raise BlockdropError(f"save_compressed: builder must be a dict, got {type(builder).__name__}")
    tensors, aliases = _plain_tensors(model.state_dict())
    metadata = {_META["format"]: FORMAT_VERSION, _META["path"]: stack.path,
                _META["kept"]: json.dumps(stack.original_indices), _META["depth"]: str(stack.original_depth),
                _META["builder"]: builder_json, _META["aliases"]: json.dumps(aliases, sort_keys=True)}
    _atomic_save(tensors, metadata, Path(path))
    return Path(path)


def _field(raw: dict, name: str, path: Path):
    try:
        return json.loads(raw[_META[name]])
    except ValueError as err:
        raise CheckpointError(f"{path}: metadata field {_META[name]} is not valid JSON ({err})") from None


def read_compressed_metadata(path) -> CompressedMetadata:
    """The blockdrop metadata of a checkpoint written by `save_compressed`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read as safetensors ({err})") from None
    missing = [key for key in _META.values() if key not in raw]
    if missing:
        raise CheckpointError(f"{path} is not a blockdrop compressed checkpoint: metadata lacks {', '.join(missing)}")
    if raw[_META["format"]] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: {_META['format']} {raw[_META['format']]!r} is not {FORMAT_VERSION!r}")
    kept, depth, builder = _field(raw, "kept", path), _field(raw, "depth", path), _field(raw, "builder", path)
    ints = isinstance(kept, list) and kept and all(type(i) is int for i in kept) and type(depth) is int
    if not (ints and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < depth):
        raise CheckpointError(f"{path}: metadata {_META['kept']}={kept!r} is not an increasing list of "
                              f"block indices below {_META['depth']}={depth!r}")
    return CompressedMetadata(raw[_META["path"]], kept, depth, builder, _field(raw, "aliases", path),
                              raw[_META["format"]])


def _strict_load(model: nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems = [f"{name} ({len(keys)}): {listing(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit the rebuilt model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_compressed(path, build_fn) -> nn.Module:
    """Rebuild a compressed model: build_fn(builder) -> full-depth model, drop, load strictly.

    Any missing, unexpected or misshaped key raises CheckpointError naming it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_compressed_metadata(path)
    model = build_fn(meta.builder)
    stack = find_block_stack(model, meta.stack_path)
    if stack.depth != meta.original_depth or stack.original_indices != list(range(stack.depth)):
        raise CheckpointError(f"{path}: the builder made {stack.depth} blocks at {meta.stack_path!r} but the "
                              f"checkpoint was cut from {meta.original_depth}; the builder must describe "
                              f"the uncompressed architecture")
    dropped = [i for i in range(stack.depth) if i not in set(meta.kept_blocks)]
    if dropped:
        drop_blocks(model, dropped, stack=stack)
    state = load_file(str(path))
    for alias, name in meta.aliases.items():
        if name in state:
            state[alias] = state[name]
    _strict_load(model, state, path)
    return model
