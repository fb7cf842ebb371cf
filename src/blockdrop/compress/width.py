"""Width (channel) pruning of our ViT, the baseline that block drop is compared against.

Two kinds of width, pruned uniformly in every block (torch-pruning does the dependency
bookkeeping and the importance ranking):
- MLP hidden channels: rows of `mlp.fc1` (and its bias) and the matching columns of `mlp.fc2`.
- attention heads: whole heads, i.e. the head's slice of q, k and v in `attn.qkv` and its columns
  of `attn.proj`. Heads keep their head_dim (64 in VideoMAE), so attention kernels stay standard.
The residual width (patch embedding, norms, block outputs) is never pruned.

VideoMAE's q/v biases live outside `qkv` (see models/vit.py), added after a cat with zeros for k.
torch-pruning's graph tracer maps that cat onto qkv's output wrongly (its zero part carries no
gradient), so we fold the biases into `qkv.bias` for the pruning, let torch-pruning prune a
standard Linear, and unfold them afterwards; k's part of the bias stays zero throughout.

Our Attention reads its head size from `qkv` (not from the residual width), so a pruned block is
still a plain `Attention` with fewer heads. The engine does not import the model: an attention is
any module with nn.Linear `qkv` and `proj` and an int `heads` (optional `q_bias` / `v_bias`), an
MLP any module with nn.Linear `fc1` and `fc2`: blockdrop's ViT blocks (models/vit.py).

`prune_to_macs` finds the uniform pruning that costs a given number of MACs (the MACs of a
block-drop point), so depth and width can be timed at equal MACs: docs/measurement.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from blockdrop.compress.stack import find_block_stack
from blockdrop.core.errors import BlockdropError
from blockdrop.core.measure import count_macs
from blockdrop.core.torchutil import preserve_modes

IMPORTANCES = ("l2", "l1", "random")
MAX_RATIO = 0.9  # never remove more than 90% of a block's MLP channels or heads


@dataclass(frozen=True)
class WidthResult:
    """What one width pruning changed (per block lists are in block order)."""

    heads_before: list[int]
    heads_after: list[int]
    hidden_before: list[int]  # MLP hidden channels
    hidden_after: list[int]
    params_before: int
    params_after: int
    mlp_ratio: float  # fraction of MLP hidden channels asked to be removed
    head_ratio: float  # fraction of heads asked to be removed (whole heads, rounded)
    target_macs: int | None = None  # prune_to_macs only: the MACs asked for
    macs: int | None = None  # prune_to_macs only: the MACs of the pruned model at example_input

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise BlockdropError("width pruning needs torch-pruning: pip install 'blockdrop[prune]'") from None
    return torch_pruning


def _importance(tp, name: str):
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "random":
        return tp.importance.RandomImportance()
    raise BlockdropError(f"importance must be one of {', '.join(IMPORTANCES)}, got {name!r}")


def _is_attention(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None), nn.Linear)
            and isinstance(getattr(module, "heads", None), int))


def _is_mlp(module: nn.Module) -> bool:
    return isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(getattr(module, "fc2", None), nn.Linear)


def _parts(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    attns = [m for m in backbone.modules() if _is_attention(m)]
    mlps = [m for m in backbone.modules() if _is_mlp(m)]
    if not attns or not mlps:
        raise BlockdropError(f"{type(backbone).__name__} has no blockdrop ViT blocks (Attention and Mlp "
                             f"modules) to prune; prune_width works on models built by blockdrop.models.vit")
    return attns, mlps


def _check_ratio(name: str, value: float) -> float:
    if not 0.0 <= value <= MAX_RATIO:
        raise BlockdropError(f"{name} must be in [0, {MAX_RATIO}] (fraction removed), got {value}")
    return float(value)


def _fold_qv_bias(attn: nn.Module) -> bool:
    """Move q/v biases into qkv.bias (k part zero) so torch-pruning sees one standard Linear."""
    if getattr(attn, "q_bias", None) is None:
        return False
    if attn.qkv.bias is not None:
        raise BlockdropError("attention has both a qkv bias and separate q/v biases; cannot prune it")
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias)).detach()
    attn.qkv.bias = nn.Parameter(bias, requires_grad=attn.q_bias.requires_grad)
    attn.q_bias = attn.v_bias = None  # registered parameters set to None: forward skips the add
    return True


def _unfold_qv_bias(attn: nn.Module) -> None:
    bias = attn.qkv.bias.detach()
    inner = bias.numel() // 3
    assert torch.all(bias[inner:2 * inner] == 0), "k bias must stay zero through pruning"
    grad = attn.qkv.bias.requires_grad
    attn.q_bias = nn.Parameter(bias[:inner].clone(), requires_grad=grad)
    attn.v_bias = nn.Parameter(bias[2 * inner:].clone(), requires_grad=grad)
    attn.qkv.bias = None


def _removed_heads(heads: int, head_ratio: float) -> int:
    return min(round(head_ratio * heads), heads - 1)


def _run_pruner(tp, backbone, attns, mlps, example_input, mlp_ratio, head_ratio, importance, round_to):
    """One torch-pruning pass; returns the head count it left in each attention (by qkv)."""
    num_heads = {a.qkv: a.heads for a in attns}
    ratios = {m.fc1: mlp_ratio for m in mlps if mlp_ratio > 0}
    removed = {a.qkv: _removed_heads(a.heads, head_ratio) for a in attns}
    # torch-pruning removes ceil(ratio * heads) heads: ask for just under removed / heads. The
    # attention group only enters its pruning loop with a positive channel ratio; with
    # prune_head_dims=False that ratio selects nothing beyond the whole heads.
    head_ratios = {a.qkv: (removed[a.qkv] - 0.5) / a.heads for a in attns if removed[a.qkv] > 0}
    ratios.update({qkv: 0.5 for qkv in head_ratios})
    pruner = tp.pruner.MetaPruner(
        backbone, example_input, importance=_importance(tp, importance),
        pruning_ratio=0.0,  # everything not listed (the residual width) keeps its channels
        pruning_ratio_dict=ratios, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio_dict=head_ratios, round_to=round_to)
    for group in pruner.step(interactive=True):
        group.prune()
    return {qkv: pruner.num_heads[qkv] for qkv in num_heads}


def prune_width(backbone: nn.Module, *, mlp_ratio: float = 0.0, head_ratio: float = 0.0,
                example_input, importance: str = "l2", round_to: int | None = None) -> WidthResult:
    """Remove MLP hidden channels and attention heads from every block of `backbone`, in place.

    mlp_ratio: fraction of each block's MLP hidden channels removed (`round_to`: keep a multiple
    of it). head_ratio: fraction of each block's heads removed, rounded to whole heads (at least
    one head stays). importance: "l2" or "l1" weight magnitude of the whole coupled group (fc1
    row + fc2 column; a head's q, k, v rows + proj columns), or "random". example_input: one
    input on the model's device, used once to trace the graph (a single clip is enough).
    """
    tp = _torch_pruning()
    mlp_ratio, head_ratio = _check_ratio("mlp_ratio", mlp_ratio), _check_ratio("head_ratio", head_ratio)
    if importance not in IMPORTANCES:
        raise BlockdropError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    attns, mlps = _parts(backbone)
    heads_before, hidden_before = [a.heads for a in attns], [m.fc1.out_features for m in mlps]
    params_before = sum(p.numel() for p in backbone.parameters())
    folded = [_fold_qv_bias(a) for a in attns]
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    try:
        for p in frozen:  # the tracer follows grad_fn: every weight must take part in autograd
            p.requires_grad_(True)
        with torch.enable_grad(), preserve_modes(backbone):
            heads = _run_pruner(tp, backbone, attns, mlps, example_input, mlp_ratio, head_ratio,
                                importance, round_to)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for attn, was_folded in zip(attns, folded):
            if was_folded:
                _unfold_qv_bias(attn)
    for attn in attns:
        attn.heads = heads[attn.qkv]
    return WidthResult(heads_before, [a.heads for a in attns], hidden_before,
                       [m.fc1.out_features for m in mlps], params_before,
                       sum(p.numel() for p in backbone.parameters()), mlp_ratio, head_ratio)


# ---- matching a MACs target ----------------------------------------------------------------------

def _meta_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Operator-level MACs from shapes only: the model and input on the meta device."""
    meta = copy.deepcopy(model).to("meta")
    return count_macs(meta, example_input.to("meta"))["macs"]


def _probe(backbone, example_input, mlp_ratio, head_ratio, importance, round_to) -> int:
    trial = copy.deepcopy(backbone)
    prune_width(trial, mlp_ratio=mlp_ratio, head_ratio=head_ratio, example_input=example_input,
                importance=importance, round_to=round_to)
    return _meta_macs(trial, example_input)


def prune_to_macs(backbone: nn.Module, target_macs: int, example_input, *, importance: str = "l2",
                  round_to: int | None = 8, tolerance: float = 0.01) -> WidthResult:
    """Width-prune `backbone` in place, uniformly over blocks, until it costs ~`target_macs`.

    MACs are operator-level (`blockdrop.core.measure.count_macs`) at `example_input`. Every block loses
    the same number of whole heads and the same number of MLP channels. A block's MACs are affine
    in its head count and, separately, in its MLP width, so two probe prunings (one head off; 50%
    of the MLP off) give the whole cost surface. We take the head count that keeps the head
    fraction closest to the MLP fraction the target then needs (as uniform as whole heads allow),
    solve the MLP fraction, prune, and check the count. Raises BlockdropError when no pruning
    within `MAX_RATIO` reaches the target within `tolerance` (relative).
    """
    original = _meta_macs(backbone, example_input)
    if not 0 < target_macs <= original:
        raise BlockdropError(f"target_macs {target_macs:,} must be positive and at most the model's "
                             f"{original:,} MACs")
    heads = max(a.heads for a in _parts(backbone)[0])
    per_head = original - _probe(backbone, example_input, 0.0, 1 / heads, importance, None)
    per_mlp = (original - _probe(backbone, example_input, 0.5, 0.0, importance, None)) / 0.5
    plans = []
    for removed in range(heads):
        mlp = (original - target_macs - removed * per_head) / per_mlp
        if 0.0 <= mlp <= MAX_RATIO:
            plans.append((abs(mlp - removed / heads), removed, mlp))
    if not plans:
        raise BlockdropError(f"target_macs {target_macs:,} is out of reach of width pruning "
                             f"(at most {MAX_RATIO:.0%} of MLP channels and {heads - 1} of {heads} heads)")
    _, removed, mlp = min(plans)
    head_ratio = removed / heads
    result = prune_width(backbone, mlp_ratio=mlp, head_ratio=head_ratio, example_input=example_input,
                         importance=importance, round_to=round_to)
    macs = _meta_macs(backbone, example_input)
    if abs(macs - target_macs) > tolerance * target_macs:
        raise BlockdropError(f"width pruning reached {macs:,} MACs for a target of {target_macs:,} "
                             f"(more than {tolerance:.1%} off); try a smaller round_to")
    return replace(result, target_macs=int(target_macs), macs=macs)



# ---- saving and loading width-pruned models -------------------------------------------------------

def block_widths(model: nn.Module, stack: str | None = None) -> dict:
    """Heads and MLP hidden channels of every current block, keyed by ORIGINAL block index (str,
    as JSON keys are): {"heads": {"0": 3, ...}, "mlp_hidden": {"0": 192, ...}}."""
    found = find_block_stack(model, stack)
    heads, hidden = {}, {}
    for original, block in zip(found.original_indices, found.modules):
        if not (_is_attention(getattr(block, "attn", nn.Identity())) and _is_mlp(getattr(block, "mlp", nn.Identity()))):
            raise BlockdropError(f"block {original} at {found.path!r} is not a blockdrop ViT block (attn + mlp)")
        heads[str(original)], hidden[str(original)] = block.attn.heads, block.mlp.fc1.out_features
    return {"heads": heads, "mlp_hidden": hidden}


def with_widths(builder: dict, model: nn.Module, stack: str | None = None) -> dict:
    """``builder`` plus ``model``'s per-block widths, for `save_compressed` of a width-pruned model:
    the loader builds the full architecture, `apply_widths` narrows it, then the weights load strictly."""
    return {**builder, "widths": block_widths(model, stack)}


def _narrow_block(block: nn.Module, heads: int, hidden: int) -> None:
    attn, mlp = block.attn, block.mlp
    width = attn.qkv.in_features
    if heads != attn.heads:
        inner = heads * attn.head_dim  # heads keep their size: whole heads were removed
        attn.qkv = nn.Linear(width, 3 * inner, bias=attn.qkv.bias is not None)
        attn.proj = nn.Linear(inner, width, bias=attn.proj.bias is not None)
        if getattr(attn, "q_bias", None) is not None:
            attn.q_bias, attn.v_bias = nn.Parameter(torch.zeros(inner)), nn.Parameter(torch.zeros(inner))
        attn.heads = heads
    if hidden != mlp.fc1.out_features:
        mlp.fc1 = nn.Linear(width, hidden, bias=mlp.fc1.bias is not None)
        mlp.fc2 = nn.Linear(hidden, width, bias=mlp.fc2.bias is not None)


def apply_widths(model: nn.Module, widths: dict, stack: str | None = None) -> None:
    """Give the blocks of a freshly built (unpruned, full-depth) model the widths recorded by
    `block_widths`; the new layers are placeholders until the checkpoint's weights load."""
    found = find_block_stack(model, stack)
    by_original = dict(zip(found.original_indices, found.modules))
    heads_of, hidden_of = widths.get("heads", {}), widths.get("mlp_hidden", {})
    for key in sorted(set(heads_of) | set(hidden_of), key=int):
        index = int(key)
        if index not in by_original:
            raise BlockdropError(f"widths name block {index}, but the model has blocks {sorted(by_original)}")
        block = by_original[index]
        heads = int(heads_of.get(key, block.attn.heads))
        if not 1 <= heads <= block.attn.heads:
            raise BlockdropError(f"widths: block {index} has {heads} heads recorded, the architecture {block.attn.heads}")
        hidden = int(hidden_of.get(key, block.mlp.fc1.out_features))
        if not 1 <= hidden <= block.mlp.fc1.out_features:
            raise BlockdropError(f"widths: block {index} has {hidden} MLP channels recorded, "
                                 f"the architecture {block.mlp.fc1.out_features}")
        _narrow_block(block, heads, hidden)
