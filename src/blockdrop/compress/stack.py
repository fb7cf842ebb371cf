"""The stack of residual blocks: find it and drop blocks physically (saving: compress/saving.py).

A *block stack* is the nn.ModuleList (or nn.Sequential) holding a model's residual blocks:
`blocks` in our ViT and timm, `encoder.layer` in transformers' BERT / ViT / VideoMAE / DINOv2,
`model.layers` in decoder LLMs, `transformer.h` in GPT-2. Nothing here knows a model class.

Two kinds of index (see docs/compression.md, "Block stacks"):
- *current position*: 0..depth-1 in the stack as it is now. `drop_blocks` takes these.
- *original index*: the block's position in the uncompressed model. `kept_blocks`,
  `drop_original` and the checkpoint metadata speak these.

Dropping builds a new container without the dropped blocks, so their parameters leave the model,
and records the original index of every remaining block as a plain attribute on that container.
The map thus travels with the stack through deepcopy, pickling and peft wrapping, and
`blockdrop.compress.saving` writes it into the safetensors metadata so a compressed model can be
rebuilt from the uncompressed architecture without the original model object.
"""

import operator
from dataclasses import dataclass

from torch import nn

from blockdrop.core.errors import BlockdropError, listing

# Paths tried by auto-detection: a ModuleList/Sequential whose dotted path is one of these or ends
# with "." + one of these. Every match is a candidate; more than one is an error, never a guess.
STACK_PATTERNS = ("blocks", "encoder.layer", "model.layers", "layers", "transformer.h")
_KEPT = "_blockdrop_kept"  # on the container: tuple of original indices, one per current block
_ORIGINAL_DEPTH = "_blockdrop_original_depth"  # on the container: depth of the uncompressed stack
_DEPTH_ATTRS = ("depth", "num_layers")  # plain int attributes of the stack's ancestors (timm style)


@dataclass(frozen=True)
class BlockStack:
    """Where a model's blocks live. A snapshot: a drop replaces `modules`, so find it again after one."""

    path: str  # dotted path of the container as registered, e.g. "backbone.vit.blocks"
    parent: nn.Module
    attr: str  # parent.<attr> is the container
    modules: nn.Module  # nn.ModuleList or nn.Sequential
    original_indices: list[int]  # original index of each current block
    original_depth: int  # number of blocks before any drop

    @property
    def depth(self) -> int:
        return len(self.modules)


@dataclass(frozen=True)
class DropResult:
    """What one `drop_blocks` call changed."""

    path: str
    removed_positions: list[int]  # current positions before the drop, ascending
    removed_original: list[int]  # their original indices
    kept_original: list[int]  # original indices of the blocks that remain
    depth_before: int
    depth_after: int
    params_before: int
    params_after: int
    updated: list[str]  # recorded depth / config / layer_idx fields that were rewritten

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after


# ---- finding the stack ---------------------------------------------------------------------------

def _containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if name and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]


def _detect_path(model: nn.Module) -> str:
    containers = _containers(model)
    found = [name for name, _ in containers
             if any(name == p or name.endswith("." + p) for p in STACK_PATTERNS)]
    # lists inside a candidate's blocks (an FFN's `layers`) are parts of blocks, not stacks
    found = [name for name in found if not any(name.startswith(other + ".") for other in found)]
    if len(found) == 1:
        return found[0]
    model_name = type(model).__name__
    if found:
        raise BlockdropError(f"several block stacks found in {model_name}: {listing(found)}; "
                             f"pass the one to compress as path=...")
    lists = [f"{name} ({len(m)})" for name, m in containers if len(m) > 1]
    raise BlockdropError(f"no block stack found in {model_name} (looked for {', '.join(STACK_PATTERNS)}); "
                         f"its module lists: {listing(lists) or 'none'}; pass one as path=...")


def _resolve_path(model: nn.Module, path: str) -> str:
    """A user's dotted path (properties allowed) -> the container's registered path."""
    target = model
    for name in path.split("."):
        if not hasattr(target, name):
            raise BlockdropError(f"block stack path {path!r}: {type(target).__name__} has no attribute {name!r}")
        target = getattr(target, name)
    if not isinstance(target, (nn.ModuleList, nn.Sequential)):
        raise BlockdropError(f"block stack path {path!r} is a {type(target).__name__}, "
                             f"not an nn.ModuleList or nn.Sequential")
    for name, module in model.named_modules():
        if module is target and name:
            return name
    raise BlockdropError(f"block stack path {path!r} is not a registered submodule of {type(model).__name__}")


def _origin(modules: nn.Module, path: str) -> tuple[list[int], int]:
    kept = getattr(modules, _KEPT, None)
    if kept is None:
        return list(range(len(modules))), len(modules)
    if len(kept) != len(modules):
        raise BlockdropError(f"block stack {path!r} has {len(modules)} blocks but its recorded original "
                             f"indices {list(kept)} name {len(kept)}: it was changed outside blockdrop")
    return list(kept), getattr(modules, _ORIGINAL_DEPTH)


def find_block_stack(model: nn.Module, path: str | None = None) -> BlockStack:
    """Locate the blocks: at `path` (dotted, e.g. "backbone.blocks"), else by auto-detection.

    Auto-detection considers every non-empty ModuleList/Sequential whose path matches
    STACK_PATTERNS; exactly one must match, otherwise the error lists what was found.
    """
    path = _resolve_path(model, path) if path else _detect_path(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    modules = getattr(parent, attr)
    original, original_depth = _origin(modules, path)
    return BlockStack(path, parent, attr, modules, original, original_depth)


def current_stack(model: nn.Module, stack: "BlockStack | str | None") -> BlockStack:
    """The stack as it is now: a BlockStack snapshot or a path is looked up again, None detected."""
    if isinstance(stack, BlockStack):
        stack = stack.path  # re-resolve: a snapshot taken before an earlier drop would be stale
    return find_block_stack(model, stack)


def kept_blocks(model: nn.Module, *, stack: "BlockStack | str | None" = None) -> list[int]:
    """Original indices of the current blocks (0..depth-1 if nothing was ever dropped)."""
    return current_stack(model, stack).original_indices


# ---- dropping ------------------------------------------------------------------------------------

def _indices(indices, what: str) -> list[int]:
    values = list(indices)
    bad = [repr(i) for i in values if isinstance(i, bool) or not hasattr(i, "__index__")]
    if bad:
        raise BlockdropError(f"{what} must be integers, got {', '.join(bad)}")
    values = [operator.index(i) for i in values]
    if not values:
        raise BlockdropError(f"no {what} given: nothing to drop")
    duplicates = sorted({i for i in values if values.count(i) > 1})
    if duplicates:
        raise BlockdropError(f"duplicate {what}: {duplicates}")
    return values


def _check_positions(indices, stack: BlockStack) -> list[int]:
    positions = _indices(indices, "current block positions")
    outside = [i for i in positions if not 0 <= i < stack.depth]
    if outside:
        raise BlockdropError(f"current block positions {outside} are out of range for block stack "
                             f"{stack.path!r} of depth {stack.depth} (valid: 0..{stack.depth - 1})")
    if len(positions) == stack.depth:
        raise BlockdropError(f"cannot drop all {stack.depth} blocks of block stack {stack.path!r}; "
                             f"at least one must stay")
    return sorted(positions)


def _rebuild(stack: BlockStack, keep: list[int]) -> nn.Module:
    old = stack.modules
    if type(old) not in (nn.ModuleList, nn.Sequential):
        raise BlockdropError(f"block stack {stack.path!r} is a {type(old).__name__}; blockdrop rebuilds "
                             f"plain nn.ModuleList or nn.Sequential containers only")
    blocks = [old[i] for i in keep]
    return nn.Sequential(*blocks) if type(old) is nn.Sequential else nn.ModuleList(blocks)


def _ancestors(model: nn.Module, stack: BlockStack) -> list[nn.Module]:
    names = stack.path.split(".")[:-1]
    return [model] + [model.get_submodule(".".join(names[:i + 1])) for i in range(len(names))]


def _update_configs(modules: list[nn.Module], old: int, keep: list[int]) -> list[str]:
    """transformers configs (shared by a model and its submodules: update each object once)."""
    updated, seen = [], set()
    for module in modules:
        config = getattr(module, "config", None)
        if id(config) in seen or getattr(config, "num_hidden_layers", None) != old:
            continue
        seen.add(id(config))
        config.num_hidden_layers = len(keep)
        updated.append(f"{type(config).__name__}.num_hidden_layers: {old} -> {len(keep)}")
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == old:
            config.layer_types = [layer_types[i] for i in keep]
            updated.append(f"{type(config).__name__}.layer_types: kept entries {keep}")
    return updated


def _update_depth_attrs(modules: list[nn.Module], old: int, new: int) -> list[str]:
    """Plain int depth attributes (not properties, which derive from the stack themselves)."""
    updated = []
    for module in modules:
        for attr in _DEPTH_ATTRS:
            value = vars(module).get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(module, attr, new)
                updated.append(f"{type(module).__name__}.{attr}: {old} -> {new}")
    return updated


def _renumber_layer_idx(blocks: nn.Module, keep: list[int]) -> list[str]:
    """transformers' attention layers index the KV cache by `layer_idx` = position in the stack."""
    count = 0
    for new, (old, block) in enumerate(zip(keep, blocks)):
        for module in block.modules():
            value = vars(module).get("layer_idx")
            if isinstance(value, int) and value == old != new:
                module.layer_idx = new
                count += 1
    return [f"layer_idx renumbered in {count} modules"] if count else []


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters count once


def drop_blocks(model: nn.Module, indices, *, stack: "BlockStack | str | None" = None) -> DropResult:
    """Remove the blocks at CURRENT positions `indices` from the model, physically.

    The stack's container is replaced by a new one holding the kept blocks in order (so the
    dropped blocks' parameters leave the model); recorded depths are updated (transformers
    `config.num_hidden_layers` and `layer_types`, plain int `depth`/`num_layers` attributes of the
    stack's ancestors, `layer_idx` inside kept blocks); per-block settings such as drop-path rates
    stay with their blocks. Raises BlockdropError for empty, duplicate or out-of-range indices
    and for dropping every block.
    """
    stack = current_stack(model, stack)
    removed = _check_positions(indices, stack)
    keep = [i for i in range(stack.depth) if i not in set(removed)]
    params_before = _num_params(model)
    new = _rebuild(stack, keep)
    kept_original = [stack.original_indices[i] for i in keep]
    setattr(new, _KEPT, tuple(kept_original))
    setattr(new, _ORIGINAL_DEPTH, stack.original_depth)
    setattr(stack.parent, stack.attr, new)
    ancestors = _ancestors(model, stack)
    updated = (_update_configs(ancestors, stack.depth, keep)
               + _update_depth_attrs(ancestors, stack.depth, len(keep)) + _renumber_layer_idx(new, keep))
    return DropResult(stack.path, removed, [stack.original_indices[i] for i in removed], kept_original,
                      stack.depth, len(keep), params_before, _num_params(model), updated)


def drop_original(model: nn.Module, original_indices, *, stack: "BlockStack | str | None" = None) -> DropResult:
    """Remove the blocks whose ORIGINAL indices are given (each must still be in the model)."""
    stack = current_stack(model, stack)
    originals = _indices(original_indices, "original block indices")
    where = {original: position for position, original in enumerate(stack.original_indices)}
    absent = [i for i in originals if i not in where]
    if absent:
        raise BlockdropError(f"original blocks {absent} are not in block stack {stack.path!r} "
                             f"(its blocks are originals {stack.original_indices})")
    return drop_blocks(model, [where[i] for i in originals], stack=stack)
