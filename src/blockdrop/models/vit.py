"""One Vision Transformer for video, frames and 1D sequences.

    x -> tokenizer -> blocks[0..depth) -> final norm -> pool -> (B, C, T_feat)

The backbone contract (docs/architecture.md): `embed(x) -> (tokens, ctx)`, the blocks in one
`self.blocks` ModuleList, `pool(tokens, ctx) -> (B, C, T_feat)`, so that
`pool(blocks(embed(x))) == forward(x)` and block drop can remove any element of `blocks`.

The block is the pre-norm ViT block shared by VideoMAE and DINOv2: fused `attn.qkv`, optional
q/v-only biases (VideoMAE), optional LayerScale (DINOv2), GELU MLP, stochastic depth whose
rate lives on the block so it survives the removal of its neighbours.

`ClipVideoBackbone` cuts a long window into 16-frame clips, runs the ViT on every clip and
concatenates the per-clip features in time, as OpenTAD/AdaTAD do for VideoMAE.

AdaTAD adapters (models/adapters.py, `adapter_blocks=`) sit inside their blocks (`blocks[i].adapter`,
so dropping a block drops its adapter) and convolve over the whole window, across clips: an
adapted block is called `block(tokens, layout)` with the `WindowLayout` that `embed` puts in its ctx
(`ctx.layout`, for `VisionTransformer` and `ClipVideoBackbone` alike, so any caller that runs the
blocks one by one, such as the compression engine's targets, passes it the same way); blocks without
an adapter ignore it and stay clip by clip.
"""

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blockdrop.core.errors import BlockdropError, ConfigError
from blockdrop.models.adapters import TemporalAdapter, WindowLayout, adapter_block_set
from blockdrop.models.tokenizers import FramePatchEmbed, SequencePatchEmbed, TubeletEmbed

# depth, width, heads
vit_sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "H": (32, 1280, 16),
             "g": (40, 1408, 16)}

# VideoMAE pixel statistics (ImageNet's, on the 0..255 scale; DINOv2 uses the same numbers)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch for whole samples, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Attention(nn.Module):
    """Multi-head self-attention with one fused `qkv` Linear (the layer LoRA wraps).

    qkv_bias: "all" (DINOv2: one bias for q, k and v), "qv" (VideoMAE: learned q and v biases,
    k's fixed at zero; kept outside `qkv` so a wrapped `qkv` still sees them), or "none".
    """

    def __init__(self, width: int, heads: int, qkv_bias: str = "qv", attn_drop: float = 0.0):
        super().__init__()
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        if qkv_bias not in ("all", "qv", "none"):
            raise ConfigError(f"qkv_bias must be 'all', 'qv' or 'none', got {qkv_bias!r}")
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias == "all")
        qv = qkv_bias == "qv"
        self.q_bias = nn.Parameter(torch.zeros(width)) if qv else None
        self.v_bias = nn.Parameter(torch.zeros(width)) if qv else None
        self.proj = nn.Linear(width, width)

    @property
    def head_dim(self) -> int:
        # read from qkv, not the residual width: width pruning removes whole heads (compress/width.py)
        return self.qkv.out_features // (3 * self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x)  # (B, N, 3 * heads * head_dim)
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
            qkv = qkv + bias.to(qkv.dtype)  # stay in the autocast dtype
        q, k, v = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).flatten(2))  # (B, N, heads * head_dim)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (DINOv2's layer_scale lambda)."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), then the optional adapter.

    `body` (attention and MLP) sees each sequence (clip) on its own; the adapter, when there is one,
    needs the window layout and mixes the clips of a window in time.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: str = "qv",
                 layer_scale: float | None = None, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 adapter: TemporalAdapter | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, qkv_bias)
        self.ls1 = LayerScale(width, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.ls2 = LayerScale(width, layer_scale) if layer_scale is not None else nn.Identity()
        self.adapter = adapter  # None registers nothing: an unadapted block's state dict is unchanged
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = False

    def body(self, x: torch.Tensor) -> torch.Tensor:  # (B', N, C) -> (B', N, C), sequence by sequence
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)

    def _forward(self, x: torch.Tensor, layout: WindowLayout | None) -> torch.Tensor:
        x = self.body(x)
        return x if self.adapter is None else self.adapter(x, layout)

    def forward(self, x: torch.Tensor, layout: WindowLayout | None = None) -> torch.Tensor:  # (B', N, C)
        if self.adapter is not None and layout is None:
            raise BlockdropError("this block has a temporal adapter: call it as block(tokens, layout) with the "
                                 "WindowLayout the backbone's embed returns in its ctx (ctx.layout)")
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, layout, use_reentrant=False)
        return self._forward(x, layout)


class ViTContext(NamedTuple):
    """`VisionTransformer.embed`'s ctx: the tokenizer's own (what `pool` needs) and the adapters' layout."""

    inner: Any  # the tokenizer's ctx, e.g. (t, h, w) for TubeletEmbed
    layout: WindowLayout | None  # every clip a window of one clip; None for tokenizers that take no adapters


class VisionTransformer(nn.Module):
    """tokenizer + `blocks` + final norm + pooling; see the module docstring.

    final_norm: "tokens" (LayerNorm `norm` on every token before pooling: DINOv2, HF VideoMAE
    without mean pooling), "pooled" (LayerNorm `fc_norm` on the pooled features: VideoMAE's
    fc_norm), or "none" (OpenTAD's VideoMAE feature map path, which applies neither).
    The per-block outputs of `forward(x, return_blocks=True)` are the raw tokens (B', N, C).
    adapter_blocks: None, "all" or block indices that get an AdaTAD adapter (video tokenizer only;
    C * adapter_ratio channels, temporal kernel adapter_kernel). Run alone, the ViT treats each
    input clip as a window of one clip; `ClipVideoBackbone` gives the adapters the whole window.
    """

    def __init__(self, tokenizer: nn.Module, *, depth: int, width: int, heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: str = "qv", layer_scale: float | None = None,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, final_norm: str = "tokens",
                 adapter_blocks=None, adapter_ratio: float = 0.25, adapter_kernel: int = 3):
        super().__init__()
        if final_norm not in ("tokens", "pooled", "none"):
            raise ConfigError(f"final_norm must be 'tokens', 'pooled' or 'none', got {final_norm!r}")
        if adapter_blocks is not None and not isinstance(tokenizer, TubeletEmbed):
            raise ConfigError(f"adapter_blocks: AdaTAD adapters need a video (tubelet) tokenizer, not "
                              f"{type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        adapted = adapter_block_set(adapter_blocks, depth)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # deeper blocks drop more often
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, qkv_bias, layer_scale, rate, norm_eps,
                  TemporalAdapter(width, adapter_ratio, adapter_kernel) if i in adapted else None)
            for i, rate in enumerate(rates))
        self.norm = nn.LayerNorm(width, eps=norm_eps) if final_norm == "tokens" else None
        self.fc_norm = nn.LayerNorm(width, eps=norm_eps) if final_norm == "pooled" else None
        self.width = width
        self.apply(_init_linear)
        for block in self.blocks:  # _init_linear drew up_proj too: a fresh adapter must stay the identity
            if block.adapter is not None:
                block.adapter.reset_parameters()

    @property
    def out_channels(self) -> int:
        return self.width

    @property
    def feature_stride(self) -> int:
        return self.tokenizer.feature_stride

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for block in self.blocks:
            block.grad_checkpointing = enable

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, ViTContext]:
        tokens, inner = self.tokenizer(x)  # (B', N, C)
        # alone, a video ViT's every input clip is its own window (ClipVideoBackbone passes whole windows)
        layout = WindowLayout(tokens.shape[0], 1, *inner) if isinstance(self.tokenizer, TubeletEmbed) else None
        return tokens, ViTContext(inner, layout)

    def pool(self, tokens: torch.Tensor, ctx: ViTContext) -> torch.Tensor:
        if self.norm is not None:
            tokens = self.norm(tokens)
        feats = self.tokenizer.pool(tokens, ctx.inner)  # (B, C, T)
        if self.fc_norm is not None:
            feats = self.fc_norm(feats.transpose(1, 2)).transpose(1, 2)
        return feats

    def forward(self, x: torch.Tensor, return_blocks: bool = False):
        tokens, ctx = self.embed(x)
        outputs = []
        for block in self.blocks:
            tokens = block(tokens, ctx.layout)
            if return_blocks:
                outputs.append(tokens)
        feats = self.pool(tokens, ctx)
        return (feats, outputs) if return_blocks else feats


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ClipContext(NamedTuple):
    """What `ClipVideoBackbone.pool` needs to undo the clip folding, and the adapters' window layout."""

    batch: int
    n_clips: int
    frames: int
    inner: ViTContext  # the ViT's own ctx, per clip
    layout: WindowLayout | None  # the whole window; None for a frame ViT (DINOv2), which takes no adapters


class ClipVideoBackbone(nn.Module):
    """Run a video ViT clip by clip over a long window and join the features in time.

    Input: (B, T, H, W, 3) uint8 frames as decoded (normalised here with the VideoMAE pixel
    mean/std) or (B, 3, T, H, W) float, already normalised. T must be a multiple of `clip_len`.
    `input_mode` "rgb_diff" feeds the ViT the difference of consecutive normalised frames instead
    (TSN's RGB difference), taken over the whole window before it is cut into clips; the
    window's first frame gets a zero difference.
    The T / clip_len clips are folded into the batch, so `embed`, `blocks` and `pool` keep the
    backbone contract. Output (B, C, T / vit.feature_stride), or resampled linearly to one step
    per `feature_stride` input frames when that is given (OpenTAD: 768 frames -> 768 steps).
    `chunk_clips` bounds memory without gradients by running each block on that many clips at a time;
    an adapted block runs its attention and MLP so, then its adapter on the whole window at once.
    `embed`'s ctx is a `ClipContext`; adapted blocks take its `layout` (`block(tokens, ctx.layout)`).
    """

    def __init__(self, vit: VisionTransformer, clip_len: int = 16, feature_stride: float | None = None,
                 chunk_clips: int | None = None, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
                 input_mode: str = "rgb"):
        super().__init__()
        if input_mode not in ("rgb", "rgb_diff"):
            raise ConfigError(f"input_mode must be 'rgb' or 'rgb_diff', got {input_mode!r}")
        self.input_mode = input_mode
        self.vit, self.clip_len, self.chunk_clips = vit, clip_len, chunk_clips
        self._feature_stride = feature_stride
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1, 1), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @blocks.setter
    def blocks(self, blocks: nn.ModuleList) -> None:
        self.vit.blocks = blocks

    @property
    def out_channels(self) -> int:
        return self.vit.out_channels

    @property
    def feature_stride(self) -> float:
        return self._feature_stride or self.vit.feature_stride

    @property
    def depth(self) -> int:
        return self.vit.depth

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x  # (B, 3, T, H, W), already normalised
        x = x.permute(0, 4, 1, 2, 3).float()  # (B, T, H, W, 3) -> (B, 3, T, H, W)
        return (x - self.pixel_mean) / self.pixel_std

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the ViT sees of a window (B, T, H, W, 3) uint8 or (B, 3, T, H, W): the normalised
        frames, or for `input_mode` "rgb_diff" their consecutive differences (the first frame zeros)."""
        x = self.normalize(x)
        if self.input_mode == "rgb_diff":
            x = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
        return x

    def embed(self, x: torch.Tensor):
        x = self.model_input(x)
        batch, frames = x.shape[0], x.shape[2]
        if frames % self.clip_len:
            raise ValueError(f"window of {frames} frames is not a multiple of clip_len {self.clip_len}")
        n_clips = frames // self.clip_len
        clips = x.unflatten(2, (n_clips, self.clip_len)).transpose(1, 2).flatten(0, 1)  # (B*n, 3, L, H, W)
        tokens, inner = self.vit.embed(clips)  # (B*n, N, C); inner.layout has one clip per window
        layout = WindowLayout(batch, n_clips, *inner.inner) if inner.layout is not None else None
        return tokens, ClipContext(batch, n_clips, frames, inner, layout)

    def pool(self, tokens: torch.Tensor, ctx: ClipContext) -> torch.Tensor:
        batch, n_clips, frames, inner, _ = ctx
        feats = self.vit.pool(tokens, inner)  # (B*n, C, t)
        feats = feats.unflatten(0, (batch, n_clips)).permute(0, 2, 1, 3).flatten(2)  # (B, C, n*t)
        if self._feature_stride:
            feats = resample_time(feats, round(frames / self._feature_stride))
        return feats

    @staticmethod
    def _run_block(block: nn.Module, tokens: torch.Tensor, layout, chunk: int) -> torch.Tensor:
        if chunk >= tokens.shape[0]:
            return block(tokens, layout)
        adapter = getattr(block, "adapter", None)
        body = block if adapter is None else block.body  # the clip-local part runs chunk by chunk
        out = torch.empty_like(tokens)  # filled in place: no list of parts beside a concatenated copy
        for start in range(0, tokens.shape[0], chunk):  # chunk: whole clips
            out[start:start + chunk] = body(tokens[start:start + chunk])
        return out if adapter is None else adapter(out, layout)  # (B*n, N, C): all of a window's clips

    def forward(self, x: torch.Tensor, return_blocks: bool = False):
        tokens, ctx = self.embed(x)
        chunk = tokens.shape[0]
        if self.chunk_clips and not torch.is_grad_enabled():
            per_clip = tokens.shape[0] // (ctx.batch * ctx.n_clips)  # sequences per clip (frames for a frame ViT)
            chunk = self.chunk_clips * per_clip
        outputs = []
        for block in self.vit.blocks:
            tokens = self._run_block(block, tokens, ctx.layout, chunk)
            if return_blocks:
                outputs.append(tokens)
        feats = self.pool(tokens, ctx)
        return (feats, outputs) if return_blocks else feats


def resample_time(feats: torch.Tensor, length: int) -> torch.Tensor:
    """(B, C, T) -> (B, C, length), linear with align_corners=False: OpenTAD's Interpolate transform
    after the backbone (THUMOS14: 384 tubelet steps -> 768). Same length: unchanged."""
    if length == feats.shape[-1]:
        return feats
    return F.interpolate(feats, size=length, mode="linear", align_corners=False)


def _size(size: str, overrides: dict) -> tuple[int, int, int]:
    if size not in vit_sizes:
        raise ConfigError(f"unknown ViT size {size!r}; choose one of {', '.join(vit_sizes)}")
    depth, width, heads = vit_sizes[size]
    if size == "g":
        overrides.setdefault("mlp_ratio", 48 / 11)  # ViT-g's MLP is 6144 wide, not 4x
    return overrides.pop("depth", depth), overrides.pop("width", width), overrides.pop("heads", heads)


def _hw(img_size) -> tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def _grid(img_size, patch: int) -> tuple[int, int]:
    h, w = _hw(img_size)
    return h // patch, w // patch


def videomae_vit(size: str = "S", num_frames: int = 16, *, patch: int = 16,
                 tubelet: int = 2, pos_img_size=224, final_norm: str = "none", spatial_pool: str = "mean",
                 **overrides) -> VisionTransformer:
    """VideoMAE ViT: q/v biases, LayerNorm eps 1e-6, sin-cos positions defined at `pos_img_size`.

    The positions adapt to any input size (interpolated from the table at `pos_img_size` and
    `num_frames`); final_norm "none" matches OpenTAD's feature path.
    """
    depth, width, heads = _size(size, overrides)
    tokenizer = TubeletEmbed(width, patch, tubelet, _grid(pos_img_size, patch), num_frames, pool=spatial_pool)
    return VisionTransformer(tokenizer, depth=depth, width=width, heads=heads, qkv_bias="qv",
                             final_norm=final_norm, **overrides)


def dinov2_vit(size: str = "S", patch: int = 14, *, img_size=518, pool: str = "cls",
               layer_scale: float = 1.0, **overrides) -> VisionTransformer:
    """DINOv2 ViT run per frame: qkv biases, LayerScale, learned positions on img_size // patch."""
    depth, width, heads = _size(size, overrides)
    tokenizer = FramePatchEmbed(width, patch, _grid(img_size, patch), pool=pool)
    return VisionTransformer(tokenizer, depth=depth, width=width, heads=heads, qkv_bias="all",
                             layer_scale=layer_scale, final_norm="tokens", **overrides)


def sequence_vit(in_channels: int, patch: int, depth: int = 6, width: int = 192, heads: int = 3, *,
                 pos: str = "sinusoid", max_len: int | None = None, **overrides) -> VisionTransformer:
    """ViT over (B, T, C) sequences: one token per `patch` steps, output (B, width, T // patch)."""
    tokenizer = SequencePatchEmbed(in_channels, width, patch, pos, max_len)
    overrides.setdefault("qkv_bias", "all")
    return VisionTransformer(tokenizer, depth=depth, width=width, heads=heads, **overrides)
