"""The measuring pieces of benchmarks/: FLOP counts, the GEMM-only ceiling, the sampling extrapolation.

Checked against closed forms: 2·m·k·n FLOPs per product, 4·B·H·N²·d for attention, and a
call whose cost is exactly ``fixed + steps × per_step``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

common = pytest.importorskip("common")


def test_count_flops_includes_cpu_sdpa():
    b, h, n, d = 2, 3, 64, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    # torch's own counter leaves the CPU flash kernel at 0; ours adds the two products
    assert common.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * b * h * n * n * d


def test_gemm_ceiling_replays_every_product_in_the_dtype_it_ran():
    a, w, bias = torch.randn(64, 32), torch.randn(48, 32), torch.randn(48)
    x, y = torch.randn(4, 8, 16), torch.randn(4, 16, 8)

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(a, w, bias)  # addmm, with a transposed weight
            x @ y  # bmm
            a @ a.T  # mm

    recorder = common._RecordGemms()
    with recorder:
        fn()
    assert [str(op).split(".")[1] for op, _, _ in recorder.calls] == ["addmm", "bmm", "mm"]
    assert all(spec[2] == torch.bfloat16 for _, args, _ in recorder.calls for spec in args if isinstance(spec, tuple))
    transposed = recorder.calls[0][1][2]  # the weight's layout is kept: (32, 48) with strides (1, 32)
    assert transposed[0] == (32, 48) and transposed[1] == (1, 32)

    result = common.gemm_ceiling(fn, repeats=1)
    expected = 2 * 64 * 32 * 48 + 2 * 4 * 8 * 16 * 8 + 2 * 64 * 32 * 64
    assert result["calls"] == 3
    assert result["gflop"] == pytest.approx(expected / 1e9)
    assert result["seconds"] > 0


def test_sampling_extrapolation_is_exact_for_a_linear_cost():
    sampling = pytest.importorskip("bench_sampling")
    fixed, per_step = 3.0, 0.7
    cost = lambda k: fixed + k * per_step  # noqa: E731
    assert sampling.extrapolate(cost(10), cost(1), 10, 50) == pytest.approx(cost(50))
    assert sampling.extrapolate(cost(4), cost(1), 4, 4) == pytest.approx(cost(4))
