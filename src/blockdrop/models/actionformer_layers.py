"""Layers of the ActionFormer head, all on (B, C, T) sequences with a (B, T) bool mask.

Convention: every layer returns features that are exactly zero at padded steps, so
what the backbone wrote at padded steps never reaches a valid step (tested). The
original zeroes conv outputs but lets LayerNorm biases leak into padded steps;
here those are zeroed too, which only changes values next to the padding edge.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def mask_steps(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padded steps: (B, C, T) * (B, T) -> (B, C, T)."""
    return x * mask.unsqueeze(1).to(x.dtype)


def downsample_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, T) -> (B, ceil(T / stride)): output step i sits on input step i * stride."""
    return mask[:, ::stride]


class MaskedConv1d(nn.Conv1d):
    """'Same'-padded Conv1d (odd kernel) that zeroes padded steps of its output.

    With stride s, output step i is centred on input step i * s and the mask is
    downsampled the same way. Biases start at zero, as in ActionFormer.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, *, stride=1, groups=1, bias=True):
        if kernel_size % 2 != 1:
            raise ValueError(f"MaskedConv1d needs an odd kernel_size, got {kernel_size}")
        super().__init__(
            in_channels, out_channels, kernel_size,
            stride=stride, padding=kernel_size // 2, groups=groups, bias=bias,
        )
        if bias:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_mask = downsample_mask(mask, self.stride[0])  # (B, T')
        return mask_steps(super().forward(x), out_mask), out_mask  # (B, C_out, T'), (B, T')


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per pyramid level on the regression output)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class ScaledDropPath(nn.Module):
    """Residual-branch stochastic depth with a per-channel learnable scale (init 1e-4).

    ActionFormer uses this pair (its "AffineDropPath") whenever drop path is on.
    """

    def __init__(self, channels: int, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale = nn.Parameter(torch.full((1, channels, 1), 1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        alive = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)  # one coin per sample
        return x * alive / keep


class ConvAttention(nn.Module):
    """Multi-head self-attention whose q, k, v first pass a depthwise conv + LayerNorm.

    This is ActionFormer's "MHCA": the depthwise convs add local context and, with
    stride 2, downsample the sequence. ``window`` limits each query to keys at most
    ``window // 2`` steps away (ActionFormer's local attention); it is done here by
    masking a full T x T score matrix, which gives the same result with O(T^2)
    memory instead of the original's banded kernels. ``window=None`` attends to all.
    """

    def __init__(self, dim: int, num_heads: int, *, stride: int = 1, window: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.window = num_heads, window
        depthwise = dict(kernel_size=3, stride=stride, groups=dim, bias=False)
        self.q_conv = MaskedConv1d(dim, dim, **depthwise)
        self.k_conv = MaskedConv1d(dim, dim, **depthwise)
        self.v_conv = MaskedConv1d(dim, dim, **depthwise)
        self.q_norm, self.k_norm, self.v_norm = (ChannelLayerNorm(dim) for _ in range(3))
        self.q_proj, self.k_proj, self.v_proj = (nn.Conv1d(dim, dim, 1) for _ in range(3))
        self.out_proj = nn.Conv1d(dim, dim, 1)
        self.out_drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape  # (B, C, T) -> (B, heads, T, C / heads)
        return x.view(b, self.num_heads, c // self.num_heads, t).transpose(2, 3)

    def _allowed(self, kv_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) key mask -> (B, 1, T, T) bool: which keys each query may attend to."""
        allowed = kv_mask[:, None, None, :]
        if self.window is not None and self.window > 1:
            idx = torch.arange(kv_mask.shape[1], device=kv_mask.device)
            band = (idx[:, None] - idx[None, :]).abs() <= self.window // 2  # (T, T)
            allowed = allowed & band
        return allowed

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, q_mask = self.q_conv(x, mask)  # (B, C, T'), (B, T')
        k, kv_mask = self.k_conv(x, mask)
        v, _ = self.v_conv(x, mask)
        q = self._heads(self.q_proj(self.q_norm(q)))  # (B, h, T', d)
        k = self._heads(self.k_proj(self.k_norm(k)))
        v = self._heads(self.v_proj(self.v_norm(v)))
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, T', T')
        # masked_fill with the dtype's minimum (not -inf): a query with no allowed key
        # (a padded one) gets a harmless uniform row instead of NaN; it is zeroed below.
        scores = scores.masked_fill(~self._allowed(kv_mask), torch.finfo(scores.dtype).min)
        out = scores.softmax(dim=-1) @ v  # (B, h, T', d)
        out = out.transpose(2, 3).reshape(x.shape[0], -1, q.shape[2])  # (B, C, T')
        return mask_steps(self.out_drop(self.out_proj(out)), q_mask), q_mask


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, C, T); stride 2 halves T (a pyramid level).

    The skip path is a max-pool (kernel 3, stride 2) when downsampling, as in ActionFormer.
    """

    def __init__(self, dim: int, num_heads: int, *, stride: int = 1, window: int | None = None,
                 dropout: float = 0.0, drop_path: float = 0.0, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, stride=stride, window=window, dropout=dropout)
        self.skip = nn.MaxPool1d(3, stride=stride, padding=1) if stride > 1 else nn.Identity()
        self.norm2 = ChannelLayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Conv1d(dim, mlp_ratio * dim, 1), nn.GELU(), nn.Dropout(dropout),
            nn.Conv1d(mlp_ratio * dim, dim, 1), nn.Dropout(dropout),
        )
        self.path_attn = ScaledDropPath(dim, drop_path) if drop_path > 0 else nn.Identity()
        self.path_mlp = ScaledDropPath(dim, drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_mask = self.attn(mask_steps(self.norm1(x), mask), mask)  # (B, C, T'), (B, T')
        # padded steps of x are zero, so the max-pool never picks up backbone padding
        x = mask_steps(self.skip(x), out_mask) + self.path_attn(out)
        x = x + self.path_mlp(mask_steps(self.mlp(self.norm2(x)), out_mask))
        return x, out_mask


def zero_biases(module: nn.Module) -> None:
    """ActionFormer's init for its projection/pyramid: every Conv1d/Linear bias = 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def sinusoid_embedding(length: int, dim: int) -> torch.Tensor:
    """Fixed sinusoidal position embedding, (1, dim, length), scaled by 1/sqrt(dim)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (T, 1)
    freq = 10000.0 ** (-(torch.arange(dim) // 2 * 2).double() / dim)  # (dim,)
    angle = pos * freq  # (T, dim)
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return (table.T[None] / dim**0.5).float()


def resize_embedding(table: torch.Tensor, length: int) -> torch.Tensor:
    """(1, C, L) -> (1, C, length): crop, or linearly stretch when the input is longer."""
    if length <= table.shape[-1]:
        return table[..., :length]
    return F.interpolate(table, size=length, mode="linear", align_corners=False)
