"""Measurements: MACs against hand arithmetic and an independent hook count, params, latency, memory.

Expected MAC numbers are written out as arithmetic here (an independent reference), not taken
from `analytic_vit_macs`, which is itself checked against the same arithmetic.
"""

import math
import os
import resource
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockdrop.core.measure import (UncountedOperatorError, analytic_vit_macs, count_macs, count_params, macs_per_block,
                               measure_latency, peak_memory)
from blockdrop.models.vit import videomae_vit

from conftest import import_transformers


@pytest.fixture(scope="module", autouse=True)
def counter_imported():
    """FlopCounterMode imports torch._dynamo on first use (~4 s, once per process): pay it here."""
    count_macs(nn.Linear(2, 2), torch.zeros(1, 2))


def tiny_vit(depth=3, width=64, heads=4):
    torch.manual_seed(0)
    return videomae_vit("S", num_frames=8, depth=depth, width=width, heads=heads)


TINY_CLIP = (1, 3, 8, 64, 64)  # -> (8/2) * (64/16) * (64/16) = 64 tokens
TINY_TOKENS = 64


def linear_macs_by_hooks(model, *inputs) -> int:
    """Independent reference: every nn.Linear costs in_features * out_features per token."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        total += module.in_features * module.out_features * output[..., 0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


# ---- MACs -------------------------------------------------------------------------------------

def test_analytic_formula_is_the_textbook_arithmetic():
    n, d = 800, 384
    result = analytic_vit_macs(n, d, depth=12)
    assert result["linear_per_block"] == 800 * 12 * 384**2 == 1_415_577_600
    assert result["attention"] == 2 * 800**2 * 384 == 491_520_000
    assert result["macs"] == 12 * (1_415_577_600 + 491_520_000)
    assert analytic_vit_macs(n, d, include_attention=False)["per_block"] == 1_415_577_600


def test_counted_vit_block_matches_arithmetic_total_and_linear_only():
    model, x = tiny_vit(), torch.randn(TINY_CLIP)
    n, d = TINY_TOKENS, 64
    per_block = macs_per_block(model, "blocks", x)
    linear, attention = n * 12 * d * d, 2 * n * n * d
    assert per_block["linear_macs"] == [linear] * 3
    assert per_block["macs"] == [linear + attention] * 3  # attention (SDPA) is counted
    embed = n * d * (3 * 2 * 16 * 16)  # Conv3d tubelet embedding
    total = count_macs(model, x)
    assert total["macs"] == 3 * (linear + attention) + embed
    assert total["flops"] == 2 * total["macs"]


def test_linear_only_count_equals_forward_hook_reference():
    model, x = tiny_vit(), torch.randn(TINY_CLIP)
    counted = count_macs(model, x)
    assert counted["linear_macs"] == linear_macs_by_hooks(model, x) == 3 * TINY_TOKENS * 12 * 64**2
    assert counted["modules"]["blocks.1.attn.qkv"] == TINY_TOKENS * 64 * 3 * 64


def test_cpu_scaled_dot_product_attention_is_counted():
    """torch's registry lacks the CPU fused kernel (pytorch#195460): it must not count as 0."""
    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    b, h, n, d = 2, 3, 50, 16
    q = torch.randn(b, h, n, d)
    assert count_macs(Sdpa(), q, q, q)["macs"] == 2 * b * h * n * n * d


def test_operator_without_formula_is_an_error_not_a_silent_zero():
    class MatVec(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 7))

        def forward(self, v):
            return self.weight @ v  # 1-D right operand: aten.mv, which torch's counter has no formula for

    with pytest.raises(UncountedOperatorError, match=r"MatVec: operators with no FLOP formula ran \(aten.mv\)"):
        count_macs(MatVec(), torch.randn(7))


def test_videomae_s_clip_linear_macs_per_block_match_analytic():
    """Acceptance: VideoMAE-S, one 16x160x160 clip -> 800 tokens; per-block linear MACs within 0.1%."""
    torch.manual_seed(0)
    model = videomae_vit("S", num_frames=16, depth=1)  # one block of our backbone
    clip = torch.randn(1, 3, 16, 160, 160)
    counted = macs_per_block(model, "blocks", clip)
    expected_linear = 800 * 12 * 384**2  # qkv 3ND^2 + proj ND^2 + MLP 8ND^2 = 1.4156 G
    expected_total = expected_linear + 2 * 800**2 * 384  # + attention 0.4915 G = 1.9071 G
    assert math.isclose(counted["linear_macs"][0], expected_linear, rel_tol=1e-3)
    assert math.isclose(counted["macs"][0], expected_total, rel_tol=1e-3)




def test_our_block_costs_what_transformers_videomae_layer_costs():
    transformers = import_transformers()
    config = transformers.VideoMAEConfig(image_size=64, num_frames=8, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=256)
    reference = transformers.VideoMAEModel(config)
    x = torch.randn(TINY_CLIP)
    theirs = macs_per_block(reference, "encoder.layer", x.transpose(1, 2))  # HF takes (B, T, C, H, W)
    ours = macs_per_block(tiny_vit(depth=2), "blocks", x)
    assert theirs["macs"] == ours["macs"]
    assert theirs["linear_macs"] == ours["linear_macs"]


def test_dropping_a_block_lowers_macs_by_exactly_that_block():
    model, x = tiny_vit(), torch.randn(TINY_CLIP)
    before = macs_per_block(model, model.blocks, x)
    del model.blocks[1]
    after = count_macs(model, x)
    assert before["total_macs"] - after["macs"] == before["macs"][1] > 0
    assert set(after["modules"]) >= {"blocks.0", "blocks.1"} and "blocks.2" not in after["modules"]


def test_macs_per_block_rejects_blocks_of_another_model():
    model, other = tiny_vit(depth=1), tiny_vit(depth=1)
    with pytest.raises(ValueError, match="not submodules"):
        macs_per_block(model, other.blocks, torch.randn(TINY_CLIP))


def test_count_macs_restores_training_mode():
    model = tiny_vit(depth=1).train()
    count_macs(model, torch.randn(TINY_CLIP))
    assert model.training


# ---- parameters -------------------------------------------------------------------------------

def test_count_params_counts_total_trainable_and_children():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5, bias=False))
    model[1].weight.requires_grad_(False)
    counted = count_params(model)
    assert counted == {"total": 12 + 4 + 20, "trainable": 16, "own": 0, "children": {"0": 16, "1": 20}}


def test_count_params_counts_a_shared_tensor_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    assert count_params(model)["total"] == 20


# ---- latency and memory -----------------------------------------------------------------------

def test_measure_latency_reports_positive_finite_times_with_requested_threads():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).train()
    threads_before = torch.get_num_threads()
    result = measure_latency(model, torch.randn(8, 32), threads=1, warmup=2, min_run_time=0.05)
    for key in ("median_ms", "mean_ms"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert math.isfinite(result["iqr_ms"]) and result["iqr_ms"] >= 0
    assert result["threads"] == 1 and result["device"] == "cpu" and result["runs"] >= result["blocks"] >= 1
    assert torch.get_num_threads() == threads_before and model.training


def test_measure_latency_times_a_plain_function():
    result = measure_latency(lambda a, b: a @ b, torch.randn(16, 16), torch.randn(16, 16), min_run_time=0.02)
    assert result["median_ms"] > 0 and result["threads"] == torch.get_num_threads()


def test_peak_memory_on_cpu_says_what_it_measures():
    model = nn.Linear(10, 20)
    model.register_buffer("running", torch.zeros(5, dtype=torch.float64))
    result = peak_memory(model, torch.randn(2, 10))
    assert result["kind"] == "cpu_static+rss_highwater"
    assert result["params_buffers_bytes"] == (200 + 20) * 4 + 5 * 8


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc (Linux)")
def test_peak_memory_on_cpu_sees_a_forward_that_raises_the_peak():
    """The high-water mark rises by what a forward holds beyond the process's earlier peak: a
    forward that holds (earlier peak - resident now) + 256 MiB raises it by about 256 MiB."""
    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    headroom = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident()
    floats = (max(headroom, 0) + 256 * 2**20) // 4

    class Big(nn.Module):
        def forward(self, x):
            return torch.ones(floats).sum()  # every page written: resident at once

    increase = peak_memory(Big(), torch.ones(1))["rss_highwater_increase_bytes"]
    assert 200 * 2**20 <= increase <= 400 * 2**20, (increase, headroom)
