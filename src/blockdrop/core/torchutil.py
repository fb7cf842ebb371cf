"""Small torch helpers every layer uses: module modes, moving batches, a model's device.

One implementation each, so that "run in eval mode and put things back" and "move this batch"
mean the same thing in training, selection, measurement and inference.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def preserve_modes(model: nn.Module):
    """Restore every submodule's own training flag on exit (not one flag for the whole tree:
    a frozen teacher inside a training student stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block; every submodule's mode is restored afterwards."""
    with preserve_modes(model):
        model.eval()
        yield model


def to_device(batch, device: torch.device):
    """Move tensors, also inside dicts, lists and tuples, to ``device``; leave everything else.

    Non-blocking for host-to-accelerator copies (the batch is used right after, on the same stream).
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
