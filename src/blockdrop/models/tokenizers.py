"""Tokenizers: the part of a ViT that differs between inputs.

A tokenizer turns the input into a token sequence and, after the transformer blocks,
turns the tokens back into a feature sequence along time. Each one has the same small
interface, which `VisionTransformer` relies on (compose, don't subclass):

    tokens, ctx = tokenizer(x)           # tokens (B', N, C); ctx: what pool needs to undo folding
    feats = tokenizer.pool(tokens, ctx)  # (B, C, T_feat)
    tokenizer.feature_stride             # input steps per feature step

- `TubeletEmbed`: VideoMAE. Conv3d over (tubelet, patch, patch) cubes, fixed sin-cos positions.
- `FramePatchEmbed`: DINOv2 / image ViT run on every frame. Conv2d patches, CLS token,
  learned positions.
- `SequencePatchEmbed`: 1D sensor or feature sequences (B, T, C). Conv1d patches.
"""

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid_table(n_positions: int, dim: int, device=None) -> torch.Tensor:
    """VideoMAE's fixed sin-cos table, (n_positions, dim), angles in float64 like the reference."""
    position = torch.arange(n_positions, dtype=torch.float64, device=device)[:, None]
    channel = torch.arange(dim, device=device)
    angle = position / torch.pow(10000.0, (2 * (channel // 2)).double() / dim)  # (n, dim)
    # even channels carry sin, odd channels cos
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).float()


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class TubeletEmbed(nn.Module):
    """VideoMAE tokenizer: (B, 3, T, H, W) clip -> (B, T/tubelet * H/patch * W/patch, C) tokens.

    The sin-cos table is defined on `pos_grid` (the pretraining resolution, 224 px -> 14x14) and
    flattened over (time, height, width). For another input size each time slice of the table is
    resized bicubically, as OpenTAD/AdaTAD do for 160 px input; the time axis uses the actual count.
    """

    def __init__(self, width: int, patch: int = 16, tubelet: int = 2, pos_grid=(14, 14),
                 num_frames: int = 16, in_channels: int = 3, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"TubeletEmbed pool must be 'mean' or 'max', got {pool!r}")
        self.pool_kind = pool
        self.proj = nn.Conv3d(in_channels, width, kernel_size=(tubelet, patch, patch),
                              stride=(tubelet, patch, patch))
        self.width, self.patch, self.tubelet = width, patch, tubelet
        self.pos_grid = _pair(pos_grid)
        self.num_frames = num_frames  # the clip length the table was made for (checkpoint export)
        self.feature_stride = tubelet

    def position_table(self, t: int, h: int, w: int, device=None) -> torch.Tensor:
        gh, gw = self.pos_grid
        table = sinusoid_table(t * gh * gw, self.width, device)  # (t*gh*gw, C)
        if (h, w) != (gh, gw):
            table = table.reshape(t, gh, gw, self.width).permute(0, 3, 1, 2)  # (t, C, gh, gw)
            table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
            table = table.permute(0, 2, 3, 1)  # (t, h, w, C)
        return table.reshape(1, t * h * w, self.width)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)  # (B, C, t, h, w)
        t, h, w = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, t*h*w, C)
        tokens = tokens + self.position_table(t, h, w, x.device).to(tokens.dtype)
        return tokens, (t, h, w)

    def pool(self, tokens: torch.Tensor, ctx) -> torch.Tensor:
        t, h, w = ctx
        # mean (VideoMAE) or max over space, one feature per tubelet step: (B, N, C) -> (B, C, t)
        grid = tokens.unflatten(1, (t, h * w))
        pooled = grid.amax(2) if self.pool_kind == "max" else grid.mean(2)
        return pooled.transpose(1, 2)


class FramePatchEmbed(nn.Module):
    """Image ViT tokenizer applied to every frame: (B, 3, T, H, W) -> (B*T, 1 + N, C).

    (B, 3, H, W) images count as one-frame videos. Positions are learned on `pos_grid` and resized
    bicubically (in float32) for other input sizes, exactly as transformers' Dinov2Model does.
    `pool` is "cls" (the CLS token) or "mean" (mean of patch tokens) per frame.
    """

    def __init__(self, width: int, patch: int = 14, pos_grid=(37, 37), in_channels: int = 3,
                 pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"FramePatchEmbed pool must be 'cls' or 'mean', got {pool!r}")
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        self.pos_grid = _pair(pos_grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.patch, self.pool_mode = patch, pool
        self.feature_stride = 1

    def position_table(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == self.pos_grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, *self.pos_grid, dim).permute(0, 3, 1, 2)  # (1, C, gh, gw)
        patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(cls_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)  # (1, 1 + h*w, C)

    def forward(self, x: torch.Tensor):
        if x.ndim == 4:
            x = x.unsqueeze(2)  # images: (B, 3, 1, H, W)
        batch, frames = x.shape[0], x.shape[2]
        patches = self.proj(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, h, w)
        h, w = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)  # (B*T, h*w, C)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self.position_table(h, w)
        return tokens, (batch, frames)

    def pool(self, tokens: torch.Tensor, ctx) -> torch.Tensor:
        batch, frames = ctx
        per_frame = tokens[:, 0] if self.pool_mode == "cls" else tokens[:, 1:].mean(1)  # (B*T, C)
        return per_frame.reshape(batch, frames, -1).transpose(1, 2)  # (B, C, T)


class SequencePatchEmbed(nn.Module):
    """1D tokenizer: (B, T, C_in) -> (B, T // patch, C), one token per `patch` input steps.

    A trailing remainder shorter than `patch` is dropped (Conv1d with kernel = stride = patch).
    Positions are the sin-cos table (any length) or learned on `max_len` tokens and resized
    linearly for other lengths.
    """

    def __init__(self, in_channels: int, width: int, patch: int, pos: str = "sinusoid",
                 max_len: int | None = None):
        super().__init__()
        if pos not in ("sinusoid", "learned"):
            raise ValueError(f"SequencePatchEmbed pos must be 'sinusoid' or 'learned', got {pos!r}")
        if pos == "learned" and not max_len:
            raise ValueError("SequencePatchEmbed with learned positions needs max_len (tokens)")
        self.proj = nn.Conv1d(in_channels, width, kernel_size=patch, stride=patch)
        self.width, self.patch = width, patch
        self.pos_embed = None
        if pos == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, max_len, width))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.feature_stride = patch

    def position_table(self, n: int, device=None) -> torch.Tensor:
        if self.pos_embed is None:
            return sinusoid_table(n, self.width, device)[None]  # (1, n, C)
        if n == self.pos_embed.shape[1]:
            return self.pos_embed
        table = F.interpolate(self.pos_embed.transpose(1, 2), size=n, mode="linear", align_corners=False)
        return table.transpose(1, 2)

    def forward(self, x: torch.Tensor):
        tokens = self.proj(x.transpose(1, 2)).transpose(1, 2)  # (B, T', C)
        n = tokens.shape[1]
        return tokens + self.position_table(n, tokens.device).to(tokens.dtype), n

    def pool(self, tokens: torch.Tensor, ctx) -> torch.Tensor:
        return tokens.transpose(1, 2)  # (B, C, T')
