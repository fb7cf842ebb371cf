"""LoRA on the remaining blocks' attention projections, through peft; and merging it back.

Alignment fine-tuning (docs/compression.md, "Cross-depth alignment") trains a low-rank update of
each remaining block's attention projections (`attn.qkv` and `attn.proj` in our ViT; found by name
in any block, see `default_targets`), plus the groups the target names as `trainable` (for the
detector: all LayerNorms, the tokenizer, the detection head; none for a feature model) and the
blocks' own adapters (a submodule named `adapter`, e.g. AdaTAD's temporal adapters), which train in
full; every other weight is frozen. `trained_in_full` resolves that set; `lora=False` trains it
alone, with nothing to merge (`train_in_full` / `release`).

peft does the LoRA: `inject_adapter_in_model` wraps each target nn.Linear in place in a
`peft.tuners.lora.Linear` (B initialised to zero, so the adapted model starts equal to the
original). Injection keeps the model's class, attributes and block-stack container, so
`kept_blocks` and the `CompressionTarget` callables work unchanged on the adapted model.
`merge_lora` folds the update into the base weights with peft's own layer merge (the step
`merge_and_unload` runs, which injected models lack as a method), checks the outputs, and puts
the plain nn.Linear back: no peft module is left and the state-dict keys are the original ones.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch
from torch import nn

from blockdrop.compress.stack import BlockStack, find_block_stack
from blockdrop.core.errors import BlockdropError
from blockdrop.core.torchutil import eval_mode

_ATTENTION_WORDS = ("attn", "attention")  # a Linear whose name has one of these projects attention
ADAPTER = "adapter"  # a block's adapter submodule (AdaTAD / OpenTAD, blockdrop's ViT): trained in full, never LoRA'd
_GRAD_FLAGS = "_blockdrop_requires_grad"  # on the model: requires_grad of every parameter before add_lora


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft tuner layer in ``model`` (none inside another)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]


def _names(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


# ---- adding --------------------------------------------------------------------------------------

def default_targets(block: nn.Module) -> tuple[str, ...]:
    """The attention projections of a block: its nn.Linear modules with "attn" or "attention" in
    their name. Our ViT and timm: ("attn.qkv", "attn.proj"); transformers BERT / ViT / DINOv2:
    the query, key, value and output dense layers of `attention`. Linears inside an adapter
    (a name part containing "adapter") never are: adapters train in full (`trained_in_full`)."""
    def wanted(name: str) -> bool:
        parts = name.split(".")
        return (any(word in part for part in parts for word in _ATTENTION_WORDS)
                and not any(ADAPTER in part for part in parts))

    return tuple(name for name, m in block.named_modules() if isinstance(m, nn.Linear) and wanted(name))


def adapter_regex(stack: BlockStack) -> str:
    """The parameters of the blocks' adapters: anything under a submodule named `adapter` of a block."""
    return rf"^{re.escape(stack.path)}\.\d+\.(?:[^.]+\.)*{ADAPTER}\."


def adapter_parameters(model: nn.Module, stack: BlockStack) -> list[str]:
    """Names of the parameters of the adapters in the current blocks (empty for a model without any)."""
    pattern = re.compile(adapter_regex(stack))
    return [name for name, _ in model.named_parameters() if pattern.search(name)]


def trained_in_full(model: nn.Module, stack_path: str, trainable=(), adapters: bool | None = None, *,
                    where: str = "") -> tuple[str, ...]:
    """The regexes of the parameters alignment trains in full: ``trainable`` plus the blocks' adapters.

    ``adapters``: None trains the adapters when the blocks have any (a model without adapters is
    unaffected); True the same, but a model without adapters is an error; False freezes them, and
    then no ``trainable`` pattern may reach them. ``where`` prefixes setting names in errors.
    """
    stack = find_block_stack(model, stack_path)
    patterns = _names(trainable)
    found = adapter_parameters(model, stack)
    if adapters and not found:
        raise BlockdropError(f"{where}adapters is true, but no block of {stack.path!r} has an adapter (a submodule "
                             f"named {ADAPTER!r}); leave it out, or give the model adapters")
    if adapters is False:
        for compiled in compile_trainable(patterns, model, where=f"{where}trainable"):
            reached = [name for name in found if compiled.search(name)]
            if reached:
                raise BlockdropError(f"{where}adapters is false, but {where}trainable pattern {compiled.pattern!r} "
                                     f"trains adapter parameters ({reached[0]}, ...); drop the pattern or the flag")
        return patterns
    return patterns + ((adapter_regex(stack),) if found else ())


def _target_names(model: nn.Module, stack: BlockStack, targets, where: str = "LoRA targets") -> list[str]:
    """Full names of the Linear modules to wrap: every target in every current block."""
    if not targets:
        raise BlockdropError(f"{where} must be a non-empty list of module names inside a block, got {targets!r}")
    modules = dict(model.named_modules())
    names = [f"{stack.path}.{i}.{t}" for i in range(stack.depth) for t in targets]
    missing = [n for n in names if n not in modules]
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names
             if n in modules and not isinstance(modules[n], nn.Linear)]
    if missing or wrong:
        linears = [n for n, m in stack.modules[0].named_modules() if isinstance(m, nn.Linear)]
        problem = f"{missing[0]} does not exist" if missing else f"{wrong[0]} is not an nn.Linear"
        raise BlockdropError(f"{where} {list(targets)}: {problem}; the Linear modules of a block in "
                             f"{stack.path!r} are {', '.join(linears) or 'none'}")
    return names


def _target_regex(stack: BlockStack, targets) -> str:
    """peft's target_modules as one regex (peft full-matches it against module names)."""
    positions = "|".join(str(i) for i in range(stack.depth))
    suffixes = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(stack.path)}\.({positions})\.({suffixes})"


def compile_trainable(patterns, model: nn.Module, where: str = "trainable") -> list[re.Pattern]:
    """The trainable patterns as regexes; each must match a parameter name (a typo would silently
    freeze a group)."""
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise BlockdropError(f"{where}: pattern {err.pattern!r} is not a regular expression: {err}") from None
    names = [name for name, _ in model.named_parameters()]
    unused = [c.pattern for c in compiled if not any(c.search(n) for n in names)]
    if unused:
        raise BlockdropError(f"{where}: patterns {unused} match no parameter of {type(model).__name__}")
    return compiled


def check_lora(model: nn.Module, stack_path: str, *, targets=None, trainable=(), rank: int | None = None,
               lora: bool = True, adapters: bool | None = None, where: str = "") -> tuple[str, ...]:
    """Check what alignment would train against a model without changing it; returns the LoRA
    targets to use (none when ``lora`` is off).

    ``trainable`` and ``adapters`` as in `trained_in_full`; ``where`` prefixes the setting names in
    errors (``"compress.alignment."`` for a config).
    """
    stack = find_block_stack(model, stack_path)
    full = trained_in_full(model, stack_path, trainable, adapters, where=where)
    compiled = compile_trainable(full, model, where=f"{where}trainable")
    if not lora:
        if targets is not None or rank is not None:
            given = [name for name, value in (("lora_targets", targets), ("lora_rank", rank)) if value is not None]
            raise BlockdropError(f"{where}lora is false, so {' and '.join(where + g for g in given)} set nothing; "
                                 f"leave them out or set {where}lora: true")
        if not full:
            raise BlockdropError(f"{where}lora is false and nothing else trains: {where}trainable is empty and the "
                                 f"blocks of {stack.path!r} have no adapters (or {where}adapters is false)")
        return ()
    targets = _names(targets) if targets is not None else default_targets(stack.modules[0])
    if not targets:
        raise BlockdropError(f"{where}lora_targets: a block of {stack.path!r} has no Linear named like an attention "
                             f"projection ('attn', 'attention'); name the Linears to adapt")
    names = _target_names(model, stack, targets, where=f"{where}lora_targets")
    for name in names:  # LoRA on a Linear that trains anyway would be an ambiguous double update
        pattern = next((c.pattern for c in compiled if c.search(f"{name}.weight")), None)
        if pattern is not None:
            what = (f"{where}adapters (adapters train in full unless it is false)" if pattern == adapter_regex(stack)
                    else f"{where}trainable pattern {pattern!r}")
            raise BlockdropError(f"{where}lora_targets: {name} is also trained in full, by {what}; "
                                 f"LoRA-wrap it or train it in full, not both")
    if rank is not None and rank <= 0:
        raise BlockdropError(f"{where}lora_rank must be positive, got {rank}")
    return targets


def _grad_flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _set_trainable(model: nn.Module, compiled: list[re.Pattern], flags: dict[str, bool]) -> None:
    """LoRA parameters and parameters whose name matches a pattern (re.search) train; the rest is
    frozen. ``flags`` (taken before any LoRA layer was added) are kept for `release` / `merge_lora`."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or any(c.search(name) for c in compiled))
    setattr(model, _GRAD_FLAGS, flags)


def train_in_full(model: nn.Module, trainable) -> nn.Module:
    """Alignment without LoRA: only the parameters matching a ``trainable`` regex (each must match
    one) require grad. `release` restores the flags afterwards."""
    if hasattr(model, _GRAD_FLAGS):
        raise BlockdropError(f"{type(model).__name__} is already prepared for alignment; release or merge it first")
    patterns = _names(trainable)
    if not patterns:
        raise BlockdropError("train_in_full: nothing to train (no trainable patterns)")
    _set_trainable(model, compile_trainable(patterns, model), _grad_flags(model))
    return model


def release(model: nn.Module) -> nn.Module:
    """Undo `train_in_full`'s freezing: every parameter's requires_grad as it was before."""
    flags = vars(model).pop(_GRAD_FLAGS, None)
    if flags is None:
        raise BlockdropError(f"release: {type(model).__name__} was not prepared by train_in_full")
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    return model


def add_lora(model: nn.Module, target, *, rank: int | None = None, alpha: float | None = None,
             targets=None, trainable=None, dropout: float = 0.0) -> nn.Module:
    """Wrap ``targets`` (names inside a block) of every block of ``target.stack_path`` in peft LoRA.

    ``target`` is a CompressionTarget or the stack path itself. ``targets`` defaults to the
    block's attention projections (`default_targets`). rank defaults to (smallest in_features of
    the wrapped Linears) // 4, alpha to rank (scale 1). Afterwards only the LoRA A/B matrices and
    the parameters whose names match a ``trainable`` regex (``re.search``) require grad;
    ``trainable=None`` means the target's own `trainable` (nothing when a path is given); every
    pattern must match a parameter. Modifies ``model`` in place and returns it; ``merge_lora``
    undoes the freezing.
    """
    from peft import LoraConfig, inject_adapter_in_model

    path = target if isinstance(target, str) else target.stack_path
    if trainable is None:
        trainable = () if isinstance(target, str) else target.trainable
    patterns = _names(trainable)
    stack = find_block_stack(model, path)
    targets = _names(targets) if targets is not None else default_targets(stack.modules[0])
    if lora_layers(model):
        raise BlockdropError(f"{type(model).__name__} already has LoRA layers; merge_lora it first")
    names = _target_names(model, stack, targets)
    rank = rank if rank is not None else max(1, min(model.get_submodule(n).in_features for n in names) // 4)
    if rank <= 0 or (alpha is not None and alpha <= 0) or not 0.0 <= dropout < 1.0:
        raise BlockdropError(f"LoRA needs rank > 0, alpha > 0 and dropout in [0, 1); got rank={rank}, "
                             f"alpha={alpha}, dropout={dropout}")
    compiled = compile_trainable(patterns, model)
    flags = _grad_flags(model)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=_target_regex(stack, targets), bias="none")
    inject_adapter_in_model(config, model)
    assert sorted(n for n, _ in lora_layers(model)) == sorted(names), "peft wrapped other modules than asked"
    assert find_block_stack(model, path).original_indices == stack.original_indices, "kept_blocks map lost"
    _set_trainable(model, compiled, flags)
    return model


# ---- merging -------------------------------------------------------------------------------------

def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside a (nested) output: tensors, dicts, lists, tuples, dataclasses."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


@torch.no_grad()
def _outputs(model: nn.Module, check_fn) -> list[torch.Tensor]:
    """check_fn(model) in eval mode without grad; every module's training flag is restored."""
    with eval_mode(model):
        return [t.detach().clone() for t in _tensors(check_fn(model))]


def _disagreement(before, after, atol: float, rtol: float) -> str | None:
    if not before or len(before) != len(after):
        return f"check_fn returned {len(before)} tensors before the merge and {len(after)} after"
    for i, (a, b) in enumerate(zip(before, after)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {tuple(a.shape)} {a.dtype} before, {tuple(b.shape)} {b.dtype} after"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} ({a.dtype}) changed"
            continue
        if (torch.isfinite(a) & ~torch.isfinite(b)).any():  # inf in both is fine: a (lo, inf) range
            return f"output {i} is not finite after the merge where it was before"
        if not torch.allclose(b, a, atol=atol, rtol=rtol, equal_nan=True):
            return f"output {i} differs by up to {float((a - b).abs().max()):.3g} (atol={atol}, rtol={rtol})"
    return None


def _merge_layers(layers) -> None:
    """peft's merge of every layer (safe_merge: in a copy, checked finite); all or nothing."""
    done = []
    for name, layer in layers:
        try:
            layer.merge(safe_merge=True)
        except ValueError as err:
            for _, merged in done:
                merged.unmerge()
            raise BlockdropError(f"merge_lora: {name}: {err}") from None
        done.append((name, layer))


def _unload(model: nn.Module, layers) -> None:
    for name, layer in layers:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.get_base_layer())
    vars(model).pop("peft_config", None)  # set by inject_adapter_in_model; peft drops it on unload too
    if hasattr(model, _GRAD_FLAGS):
        release(model)


def merge_lora(model: nn.Module, check_fn: Callable[[nn.Module], object] | None = None, *,
               atol: float = 1e-4, rtol: float = 1e-3) -> nn.Module:
    """Fold every LoRA layer into its base weight and unwrap it; return the plain model.

    With ``check_fn(model) -> output`` (tensors, or dicts / lists / dataclasses of them), it is run
    in eval mode before and after merging: the merged outputs must be finite wherever the adapted
    ones are, and equal them within ``atol`` / ``rtol`` (torch.allclose), else the merge is undone (the model stays
    adapted) and a BlockdropError says which output differs by how much. The parameters' requires_grad
    flags are restored to what they were before ``add_lora``. A ``peft.PeftModel`` is unwrapped first.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    layers = lora_layers(model)
    if not layers:
        raise BlockdropError(f"merge_lora: {type(model).__name__} has no LoRA layers")
    before = _outputs(model, check_fn) if check_fn is not None else None
    _merge_layers(layers)
    if check_fn is not None:
        problem = _disagreement(before, _outputs(model, check_fn), atol, rtol)
        if problem:
            for _, layer in layers:
                layer.unmerge()
            raise BlockdropError(f"merge_lora: the merged model disagrees with the adapted one: {problem}")
    _unload(model, layers)
    return model
