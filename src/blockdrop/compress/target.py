"""How the compression engine sees a model: the target protocol, and a target for any feature model.

The target is the engine's only door into a model. Selection, alignment and the loop call its
methods and nothing else of the model, so a new model family means a new target, never a change
to `compress/`. Every method takes the model explicitly: one target serves the teacher, the
student and every candidate sub-network.

Required of every target (`CompressionTarget`):

    stack_path                      dotted path of the block stack ("blocks", "encoder.layer")
    trainable                       regexes of parameters trained in full beside LoRA by default
    distill_terms                   names of the output-alignment terms `distill` computes
    embed(model, batch)             -> (tokens, ctx): everything before the first block
    call_block(block, tokens, ctx)  -> tokens: one block (a transformers layer also needs the mask)
    finish(model, tokens, ctx, batch) -> output: everything after the last block
    distill(student, s_out, teacher, t_out, batch, weights) -> {term: scalar}, the weighted terms

Optional, by capability (checked before a run starts, with the setting that needs it named):

    `Supervised`: task_loss(model, output, batch) -> {"total", ...}   (the "loss" evaluator, gt term)
    `Scored`:     predict(model, output, batch) -> list; score(predictions) -> {metric: value}
                  (the "score" evaluator, e.g. detection mAP)

`FeatureTarget` implements the protocol for a model without a task head: it aligns the features
of every kept block to the teacher's block of the same original index, plus the final output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop.compress.stack import find_block_stack
from blockdrop.core.errors import BlockdropError
from blockdrop.core.torchutil import eval_mode, model_device, to_device


@runtime_checkable
class CompressionTarget(Protocol):
    stack_path: str
    trainable: tuple[str, ...]
    distill_terms: tuple[str, ...]

    def embed(self, model: nn.Module, batch) -> tuple[torch.Tensor, Any]: ...

    def call_block(self, block: nn.Module, tokens: torch.Tensor, ctx: Any) -> torch.Tensor: ...

    def finish(self, model: nn.Module, tokens: torch.Tensor, ctx: Any, batch) -> Any: ...

    def distill(self, student: nn.Module, s_out: Any, teacher: nn.Module, t_out: Any, batch,
                weights: Mapping[str, float]) -> dict: ...


@runtime_checkable
class Supervised(Protocol):
    def task_loss(self, model: nn.Module, output: Any, batch) -> dict: ...


@runtime_checkable
class Scored(Protocol):
    def predict(self, model: nn.Module, output: Any, batch) -> list: ...

    def score(self, predictions: list) -> dict: ...


def blocks_of(model: nn.Module, target: CompressionTarget) -> nn.ModuleList:
    return find_block_stack(model, target.stack_path).modules


def run_blocks(model: nn.Module, target: CompressionTarget, batch, *, skip: int | None = None,
               return_blocks: bool = False):
    """The model's forward through the target: embed -> blocks (without current block ``skip``) -> finish.

    Returns (output, block outputs) with ``return_blocks``: one tensor per block that ran.
    """
    tokens, ctx = target.embed(model, batch)
    outputs = []
    for i, block in enumerate(blocks_of(model, target)):
        if i == skip:
            continue
        tokens = target.call_block(block, tokens, ctx)
        if return_blocks:
            outputs.append(tokens)
    output = target.finish(model, tokens, ctx, batch)
    return (output, outputs) if return_blocks else output


class _Shared:
    """Held by reference through deepcopy: a target is configuration (and may hold a dataset), not state."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class TargetForward(nn.Module):
    """``run_blocks`` as one module's forward: for DistributedDataParallel (which must see the
    forward to synchronise gradients), the EMA copy of a student, and MAC counting and timing."""

    def __init__(self, model: nn.Module, target: CompressionTarget):
        super().__init__()
        self.model = model
        self._target = _Shared(target)

    @property
    def target(self) -> CompressionTarget:
        return self._target.value

    def forward(self, batch, return_blocks: bool = False):
        if return_blocks:
            return run_blocks(self.model, self.target, batch, return_blocks=True)
        return run_blocks(self.model, self.target, batch)


# ---- a target for feature models ----------------------------------------------------------------

def _transformers_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype):
    """(B, L) 1/0 padding mask -> the additive (B, 1, 1, L) mask transformers' layers accept."""
    if attention_mask is None:
        return None
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def _style(model: nn.Module, stack_path: str) -> str:
    if stack_path.endswith("encoder.layer") and hasattr(model, "embeddings"):
        return "transformers"
    if callable(getattr(model, "embed", None)) and callable(getattr(model, "pool", None)):
        return "blockdrop"
    if all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "norm")):
        return "timm"
    return "custom"


def _embed_default(style: str):
    def blockdrop_embed(model, batch):
        return model.embed(batch)

    def timm_embed(model, batch):  # timm VisionTransformer.forward_features up to the blocks
        x = model._pos_embed(model.patch_embed(batch))
        for name in ("patch_drop", "norm_pre"):
            layer = getattr(model, name, None)
            x = layer(x) if layer is not None else x
        return x, None

    def transformers_embed(model, batch):
        inputs = dict(batch) if isinstance(batch, Mapping) else {"pixel_values": batch}
        mask = inputs.pop("attention_mask", None)
        tokens = model.embeddings(**inputs)
        return tokens, {"attention_mask": _transformers_mask(mask, tokens.dtype), "padding": mask}

    return {"blockdrop": blockdrop_embed, "timm": timm_embed, "transformers": transformers_embed}.get(style)


def _finish_default(style: str):
    def blockdrop_finish(model, tokens, ctx, batch):
        return model.pool(tokens, ctx)

    def norm_finish(model, tokens, ctx, batch):  # timm's `norm`, DINOv2/VideoMAE's `layernorm`
        for name in ("norm", "layernorm"):
            layer = getattr(model, name, None)
            if isinstance(layer, nn.Module):
                return layer(tokens)
        return tokens

    return {"blockdrop": blockdrop_finish, "timm": norm_finish, "transformers": norm_finish}.get(style)


class FeatureTarget:
    """The target of a model with no task head: compress it by cross-depth feature alignment alone.

    Alignment pairs every kept student block with the teacher's block of the same original index
    (the engine's `feature` term) and matches the final output (`output`: mean squared error
    between student and teacher outputs). Defaults fit three families; pass ``embed`` /
    ``finish`` / ``call_block`` for anything else:

    - blockdrop ViTs (`embed` / `pool` methods): output = the pooled features, compared as (B, T, C);
      blocks get the ctx's window layout when it has one (AdaTAD adapters, models/adapters.py);
    - timm-style ViTs (`patch_embed`, `_pos_embed`, `blocks`, `norm`): output = `forward_features`;
    - transformers encoders (`embeddings`, `encoder.layer`): a batch is the model's keyword inputs
      (e.g. `input_ids` + `attention_mask`, or `pixel_values`); the padding mask reaches every
      layer; output = the last hidden state after `layernorm` when the model has one.

    ``finish`` returning something other than a tensor needs ``output`` (what to align, a tensor).
    With ``score`` (a function of the outputs of every batch, and the batches, -> metrics) the
    target is `Scored` and the "score" selection evaluator works; it has no task loss.
    """

    distill_terms = ("output",)
    trainable: tuple[str, ...] = ()  # LoRA only: a short alignment of a pretrained model keeps its norms

    def __init__(self, model: nn.Module | None = None, *, stack_path: str | None = None,
                 embed: Callable | None = None, finish: Callable | None = None,
                 call_block: Callable | None = None, output: Callable | None = None,
                 score: Callable[[list, list], dict] | None = None):
        if stack_path is None:
            if model is None:
                raise BlockdropError("FeatureTarget: pass the model (to find its block stack) or stack_path=")
            stack_path = find_block_stack(model).path
        self.stack_path = stack_path
        style = _style(model, stack_path) if model is not None else "custom"
        self._embed = embed or _embed_default(style)
        self._finish = finish or _finish_default(style)
        if self._embed is None or self._finish is None:
            raise BlockdropError(f"FeatureTarget: {type(model).__name__ if model is not None else 'the model'} "
                                 f"is not a blockdrop, timm-style or transformers-style model; pass embed= "
                                 f"and finish= (what runs before the first block and after the last)")
        self._call_block = call_block or (_transformers_block if style == "transformers" else None)
        # what the output term and the validation cosine compare, channels last: a blockdrop ViT
        # pools to (B, C, T), whose cosine must run over C, not over time
        self._output = output or ((lambda out: out.transpose(1, 2)) if style == "blockdrop" else (lambda out: out))
        self._score = score
        if score is not None:  # only then is the target Scored
            self.predict, self.score = self._predict, self._score_all

    def embed(self, model, batch):
        return self._embed(model, batch)

    def call_block(self, block, tokens, ctx):
        if self._call_block is not None:
            return self._call_block(block, tokens, ctx)
        layout = getattr(ctx, "layout", None)  # a blockdrop video ViT's window layout, for its AdaTAD adapters
        out = block(tokens) if layout is None else block(tokens, layout)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, model, tokens, ctx, batch):
        return self._finish(model, tokens, ctx, batch)

    def features(self, output) -> torch.Tensor:
        """What the `output` term compares: a tensor."""
        features = self._output(output)
        if not isinstance(features, torch.Tensor):
            raise BlockdropError(f"FeatureTarget: the output is a {type(features).__name__}, not a tensor; "
                                 f"pass output= (a function of finish's result returning the tensor to align)")
        return features

    def distill(self, student, s_out, teacher, t_out, batch, weights) -> dict:
        if not weights.get("output"):
            return {}
        return {"output": F.mse_loss(self.features(s_out).float(), self.features(t_out).float())}

    @torch.no_grad()
    def _predict(self, model, output, batch) -> list:
        return [(self.features(output).detach().cpu(), batch)]

    def _score_all(self, predictions: list) -> dict:
        return self._score([p[0] for p in predictions], [p[1] for p in predictions])


def _transformers_block(block, tokens, ctx):
    out = block(tokens, attention_mask=ctx["attention_mask"])
    return out[0] if isinstance(out, tuple) else out


def output_cosine(target: FeatureTarget, teacher: nn.Module, data) -> Callable[[nn.Module], dict]:
    """A validation function: mean cosine similarity (over the channels: the last dim of
    ``target.features``, per token or per sample)
    of a model's output to the teacher's on ``data`` (batches). The teacher's outputs are computed
    once, on first use."""
    cache: list = []

    @torch.no_grad()
    def validate(model: nn.Module) -> dict:
        device = model_device(model)
        if not cache:
            with eval_mode(teacher):
                cache.extend(target.features(run_blocks(teacher, target, to_device(b, model_device(teacher))))
                             .float().cpu() for b in data)
        total, count = 0.0, 0
        with eval_mode(model):
            for batch, reference in zip(data, cache):
                features = target.features(run_blocks(model, target, to_device(batch, device))).float().cpu()
                cosine = F.cosine_similarity(features, reference, dim=-1)
                total, count = total + float(cosine.sum()), count + cosine.numel()
        return {"cosine": total / max(count, 1)}

    return validate
