"""AdaTAD's temporal adapter (Liu et al., CVPR 2024; OpenTAD `vit_adapter.py`, class `Adapter`).

An adapted ViT block ends with `x = adapter(x, layout)` after its attention and MLP residuals:

    y = GELU(down_proj(x))                       # C -> C * ratio (C/4 by default)
    y = y + conv(dwconv(y))                      # over the window's tubelet steps, per spatial position
    out = x + gamma * up_proj(y)                 # C * ratio -> C; up_proj starts at zero

`dwconv` is a depth-wise temporal Conv1d (kernel 3, "same" padding), `conv` a 1x1 Conv1d, `gamma`
one learned scalar (starts at 1). Because up_proj starts at zero a fresh adapter is the identity,
so adding adapters to a pretrained ViT does not change its output before training.

The temporal convolution runs over the WHOLE window, across clip boundaries, so the block needs
to know how the window was folded into the batch: a `WindowLayout`, which the backbone's `embed`
puts into its ctx (models/vit.py). The tokens of one window are (clips * steps * height * width)
in that order, clips folded into the batch window-major: token row `b * clips + clip`.
"""

import math
from typing import NamedTuple

import torch
from torch import nn

from blockdrop.core.errors import ConfigError


class WindowLayout(NamedTuple):
    """How windows sit in clip-folded tokens (B*n, t*h*w, C): B windows of n clips of t steps on h x w."""

    batch: int
    clips: int
    steps: int  # tubelet steps per clip
    height: int
    width: int

    @property
    def sequences(self) -> int:
        return self.batch * self.clips

    @property
    def tokens(self) -> int:
        return self.steps * self.height * self.width


def adapter_block_set(adapter_blocks, depth: int) -> set[int]:
    """Which of `depth` blocks get an adapter: None (none), "all", or a list of block indices."""
    if adapter_blocks is None:
        return set()
    if adapter_blocks == "all":
        return set(range(depth))
    if isinstance(adapter_blocks, str):
        raise ConfigError(f"adapter_blocks must be 'all' or a list of block indices, got {adapter_blocks!r}")
    indices = list(adapter_blocks)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad or len(set(indices)) != len(indices):
        raise ConfigError(f"adapter_blocks {indices}: indices must be distinct integers within 0..{depth - 1} "
                          f"(the ViT has {depth} blocks)")
    return set(indices)


class TemporalAdapter(nn.Module):
    """The AdaTAD adapter; parameter names are OpenTAD's (`down_proj`, `dwconv`, `conv`, `up_proj`, `gamma`)."""

    def __init__(self, width: int, ratio: float = 0.25, kernel: int = 3):
        super().__init__()
        hidden = int(width * ratio)
        if hidden < 1:
            raise ConfigError(f"adapter_ratio {ratio} leaves no adapter channels of width {width}")
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"adapter_kernel must be a positive odd number (the time axis keeps its "
                              f"length), got {kernel}")
        self.hidden, self.kernel = hidden, kernel
        self.down_proj = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.dwconv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.conv = nn.Conv1d(hidden, hidden, 1)
        self.up_proj = nn.Linear(hidden, width)
        self.gamma = nn.Parameter(torch.ones(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenTAD's init: He-normal convs, truncated-normal down_proj, zero up_proj (identity), gamma 1."""
        nn.init.normal_(self.dwconv.weight, std=math.sqrt(2.0 / self.kernel))
        nn.init.zeros_(self.dwconv.bias)
        nn.init.normal_(self.conv.weight, std=math.sqrt(2.0 / self.hidden))
        nn.init.zeros_(self.conv.bias)
        nn.init.trunc_normal_(self.down_proj.weight, std=0.02)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)
        nn.init.ones_(self.gamma)

    def forward(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:  # (B*n, t*h*w, C) -> same
        if x.shape[:2] != (layout.sequences, layout.tokens):
            raise ValueError(f"adapter: tokens {tuple(x.shape)} do not fit the window layout {layout} "
                             f"(expected ({layout.sequences}, {layout.tokens}, C))")
        b, n, t, h, w = layout
        y = self.act(self.down_proj(x))  # (B*n, t*h*w, c)
        c = y.shape[-1]
        # clips are consecutive rows of one window, so (B*n, t, hw) reads as (B, n*t, hw) in time order
        seq = y.reshape(b, n * t, h * w, c).permute(0, 2, 3, 1).reshape(b * h * w, c, n * t)
        seq = self.conv(self.dwconv(seq))  # (B*h*w, c, n*t)
        seq = seq.reshape(b, h * w, c, n * t).permute(0, 3, 1, 2).reshape_as(y)  # back to (B*n, t*h*w, c)
        return x + self.gamma * self.up_proj(y + seq)
