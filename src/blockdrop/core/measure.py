"""Measurements: MACs, parameters, latency, peak memory. Each is a small function returning a dict.

MACs are counted at the operator level with `torch.utils.flop_counter.FlopCounterMode` (one
forward, eval, no_grad): every matmul, convolution and attention kernel the model really runs,
not only the layers a hook can see. MACs = FLOPs / 2 (the counter's FLOPs count 2 per
multiply-add). `linear_macs` is the part spent inside `nn.Linear` modules, the convention of
per-block figures in papers. `analytic_vit_macs` is the closed form for a plain ViT block, so
tests and docs can check the counter against arithmetic. See docs/measurement.md.

Known hole, plugged here: torch's registry has no formula for CPU's fused attention kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`, pytorch/pytorch#195460), so on CPU every
`F.scaled_dot_product_attention` would silently count 0. We register torch's own SDPA formula
for it. Any matmul/conv/attention-like operator the counter still has no formula for is an error
(`UncountedOperatorError`, naming the operators), so a new hole stops the count instead of
silently lowering it.
"""

import contextlib
import resource
import sys

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from blockdrop.core.errors import BlockdropError
from blockdrop.core.torchutil import eval_mode

_aten = torch.ops.aten
# fused attention kernels with q, k, v as their first three arguments, missing from older registries
_EXTRA_SDPA_OPS = tuple(getattr(_aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
) if hasattr(_aten, name))
# operator-name words that mean "this op does multiply-adds worth counting"
_HEAVY_WORDS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "einsum", "mv", "addmv",
                "conv", "convolution", "conv1d", "conv2d", "conv3d", "attention", "attn"}


# ---- MACs --------------------------------------------------------------------------------------

class UncountedOperatorError(BlockdropError):
    """A multiply-accumulate operator ran that torch's FLOP counter has no formula for."""


class _OpSpy(TorchDispatchMode):
    """Records every operator that actually executes (entered *below* the flop counter)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


def _sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    """torch's own SDPA formula (q k^T and attn v), for fused kernels it has no entry for."""
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


_sdpa_flops._get_raw = True  # FlopCounterMode passes tensors, not shapes, to "raw" formulas


def _extra_formulas() -> dict:
    return {op: _sdpa_flops for op in _EXTRA_SDPA_OPS if op not in flop_counter.flop_registry}


def _is_heavy(op) -> bool:
    words = set(str(op).split(".")[-1].strip("_").split("_"))
    return bool(words & _HEAVY_WORDS)


def _run_counted(model: nn.Module, inputs, kwargs):
    """One eval/no_grad forward under the flop counter -> flop counts per module."""
    mapping = _extra_formulas()
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
    with eval_mode(model), torch.no_grad(), _OpSpy() as spy, counter:  # spy below the counter sees executed ops
        model(*inputs, **kwargs)
    known = set(flop_counter.flop_registry) | set(mapping)
    uncounted = sorted(str(op) for op in spy.ops if _is_heavy(op) and op not in known)
    if uncounted:
        raise UncountedOperatorError(f"MAC count of {type(model).__name__}: operators with no FLOP formula ran "
                                     f"({', '.join(uncounted)}); the count would be too low")
    return counter.get_flop_counts()


def _module_names(model: nn.Module) -> dict:
    """FlopCounterMode's module keys ("ClassName.a.b") -> our names ("a.b", root "")."""
    root = type(model).__name__
    return {(f"{root}.{name}" if name else root): name for name, _ in model.named_modules()}


def _macs_by_module(model: nn.Module, counts: dict) -> dict:
    names = _module_names(model)
    per_module = {}
    for key, ops in counts.items():
        if key == "Global":
            continue
        # a module run by the forward but not registered under the model keeps the counter's key
        per_module[names.get(key, key)] = sum(ops.values()) // 2
    return per_module


def _linear_macs(model: nn.Module, per_module: dict, prefix: str = "") -> int:
    """MACs inside nn.Linear modules whose name starts with `prefix` ("" = the whole model)."""
    start = prefix + "." if prefix else ""
    return sum(per_module.get(name, 0) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.startswith(start))


def count_macs(model: nn.Module, *inputs, **kwargs) -> dict:
    """Multiply-accumulates of one forward `model(*inputs, **kwargs)` (eval mode, no grad).

    Returns macs, gmacs, flops (= 2 * macs), linear_macs, linear_gmacs, by_op (MACs per aten
    operator) and modules (MACs per module name, "" = the model; parents include their children).
    Raises UncountedOperatorError when a matmul/conv/attention operator without a formula ran.
    """
    counts = _run_counted(model, inputs, kwargs)
    by_op = {str(op): flops // 2 for op, flops in counts.get("Global", {}).items()}
    flops = sum(counts.get("Global", {}).values())
    per_module = _macs_by_module(model, counts)
    linear = _linear_macs(model, per_module)
    return {"macs": flops // 2, "gmacs": flops / 2e9, "flops": flops, "linear_macs": linear,
            "linear_gmacs": linear / 1e9, "by_op": by_op, "modules": per_module}


def _block_names(model: nn.Module, blocks) -> list:
    if isinstance(blocks, str):
        blocks = model.get_submodule(blocks)
    names = {id(module): name for name, module in model.named_modules()}
    missing = [i for i, block in enumerate(blocks) if id(block) not in names]
    if missing:
        raise ValueError(f"blocks {missing} are not submodules of the measured model")
    return [names[id(block)] for block in blocks]


def macs_per_block(model: nn.Module, blocks, *inputs, **kwargs) -> dict:
    """MACs of each block during one forward of `model`.

    blocks: a dotted path ("blocks", "backbone.vit.blocks") or an iterable of the block modules.
    Returns names, macs and linear_macs (lists in block order), the total model macs and the
    share of it spent inside the blocks.
    """
    names = _block_names(model, blocks)
    counts = _run_counted(model, inputs, kwargs)
    per_module = _macs_by_module(model, counts)
    macs = [per_module.get(name, 0) for name in names]
    total = sum(counts.get("Global", {}).values()) // 2
    return {"names": names, "macs": macs, "linear_macs": [_linear_macs(model, per_module, n) for n in names],
            "total_macs": total, "blocks_share": sum(macs) / total if total else 0.0}


def analytic_vit_macs(tokens: int, width: int, mlp_ratio: float = 4, depth: int = 1,
                      include_attention: bool = True) -> dict:
    """Closed-form MACs of `depth` standard ViT blocks over one sequence of `tokens` tokens.

    Per block: qkv N*3D^2, output proj N*D^2, MLP 2*N*D*(r*D), attention matmuls (q k^T and
    attn v) 2*N^2*D. Norms, softmax, GELU and bias adds are not multiply-accumulates and are left out.
    """
    n, d = tokens, width
    qkv, proj = 3 * n * d * d, n * d * d
    mlp = 2 * n * d * int(mlp_ratio * d)
    attention = 2 * n * n * d if include_attention else 0
    linear = qkv + proj + mlp
    per_block = linear + attention
    return {"qkv": qkv, "proj": proj, "mlp": mlp, "attention": attention, "linear_per_block": linear,
            "per_block": per_block, "macs": depth * per_block, "gmacs": depth * per_block / 1e9}


# ---- parameters --------------------------------------------------------------------------------

def count_params(model: nn.Module) -> dict:
    """Parameter counts: total and trainable (shared tensors once), and per top-level child."""
    params = list(model.parameters())
    children = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "own": sum(p.numel() for p in model.parameters(recurse=False)),
            "children": children}


# ---- latency -----------------------------------------------------------------------------------

def _infer_device(inputs) -> torch.device:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


@contextlib.contextmanager
def _num_threads(threads: int):
    """Fix the intra-op thread pool (for the warm-up; Timer does the same for the timed runs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn, *inputs, device=None, threads: int | None = None, warmup: int = 3,
                    min_run_time: float = 1.0, **kwargs) -> dict:
    """Wall-clock latency of `fn(*inputs, **kwargs)` under torch.inference_mode.

    fn is a callable or an nn.Module (put in eval mode for the measurement, restored after).
    Inputs and model must already be on `device` (default: the first tensor input's device).
    `warmup` untimed calls run first; then torch.utils.benchmark.Timer.blocked_autorange times
    blocks of calls for at least `min_run_time` seconds, synchronising the accelerator around
    each block, with the CPU thread pool fixed to `threads` (default: torch.get_num_threads()).
    Returns median_ms, iqr_ms, mean_ms (per call), blocks, runs (timed calls), threads, device.
    """
    device = torch.device(device) if device is not None else _infer_device(inputs)
    threads = threads or torch.get_num_threads()
    modes = eval_mode(fn) if isinstance(fn, nn.Module) else contextlib.nullcontext()
    timer = benchmark.Timer(stmt="fn(*inputs, **kwargs)", num_threads=threads,
                            globals={"fn": fn, "inputs": inputs, "kwargs": kwargs})
    with modes, torch.inference_mode(), _num_threads(threads):
        for _ in range(warmup):
            fn(*inputs, **kwargs)
        _synchronize(device)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_ms": measurement.median * 1e3, "iqr_ms": measurement.iqr * 1e3,
            "mean_ms": measurement.mean * 1e3, "blocks": len(measurement.raw_times),
            "runs": len(measurement.raw_times) * measurement.number_per_run,
            "threads": threads, "device": str(device)}


# ---- memory ------------------------------------------------------------------------------------

def _tensor_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports kilobytes


def peak_memory(model: nn.Module, *inputs, device=None, **kwargs) -> dict:
    """Peak memory of one `model(*inputs, **kwargs)` under inference_mode.

    kind "cuda_allocator": peak_bytes = torch.cuda.max_memory_allocated over the forward (weights,
    inputs and activations held by PyTorch's allocator), forward_bytes = the part above what was
    allocated before it. kind "cpu_static+rss_highwater": PyTorch does not track CPU allocations,
    so we report the exact size of parameters + buffers, and rss_highwater_increase_bytes, how
    far the process's peak resident set rose during the forward: 0 when the forward stayed under
    an earlier peak of the process, so it is a lower bound on the forward's memory, not a measure.
    """
    device = torch.device(device) if device is not None else _infer_device(inputs)
    static = _tensor_bytes(model)
    with eval_mode(model):
        if device.type == "cuda":
            return _cuda_peak(model, inputs, kwargs, device, static)
        before = _max_rss_bytes()
        with torch.inference_mode():
            model(*inputs, **kwargs)
        return {"kind": "cpu_static+rss_highwater", "device": str(device), "params_buffers_bytes": static,
                "rss_highwater_increase_bytes": _max_rss_bytes() - before}


def _cuda_peak(model, inputs, kwargs, device, static) -> dict:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        model(*inputs, **kwargs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"kind": "cuda_allocator", "device": str(device), "params_buffers_bytes": static,
            "peak_bytes": peak, "forward_bytes": peak - before}
