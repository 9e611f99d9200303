"""Attention backends against the math reference."""

import pytest
import torch

from ditx.attention import EAGER_MAX_TOKENS, _xformers_ops, attention, math_attention, resolve_backend

SHAPES = [  # (B, heads, Nq, Nk, head_dim)
    (2, 6, 64, 64, 64),
    (1, 3, 37, 37, 32),  # odd lengths
    (3, 2, 10, 77, 16),  # cross-attention: Nq != Nk
    (1, 1, 1, 5, 8),
]


def qkv(b, h, nq, nk, d, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(b * 1000 + nq + nk)
    make = lambda n: torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)
    return make(nq), make(nk), make(nk)


def random_bool_mask(b, nq, nk):
    mask = torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[..., 0] = True  # no fully masked row (softmax of nothing is undefined)
    return mask


def test_math_reference_closed_forms():
    q, k, v = qkv(1, 1, 4, 1, 8)
    assert torch.allclose(math_attention(q, k, v), v.expand(1, 1, 4, 8))  # one key: output is its value
    q = torch.zeros(1, 1, 3, 8)
    _, k, v = qkv(1, 1, 3, 6, 8)
    assert torch.allclose(math_attention(q, k, v), v.mean(2, keepdim=True).expand(1, 1, 3, 8), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [None, "bool", "float"])
def test_sdpa_equals_math(shape, masked):
    b, h, nq, nk, d = shape
    q, k, v = qkv(*shape)
    mask = None
    if masked == "bool":
        mask = random_bool_mask(b, nq, nk)
    elif masked == "float":
        mask = torch.randn(b, h, nq, nk, generator=torch.Generator().manual_seed(1))
    ref = math_attention(q, k, v, mask)
    out = attention(q, k, v, mask=mask, backend="sdpa")
    assert out.shape == (b, h, nq, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [None, "bool"])
def test_eager_equals_math(shape, masked):
    b, h, nq, nk, d = shape
    q, k, v = qkv(*shape)
    mask = random_bool_mask(b, nq, nk) if masked else None
    torch.testing.assert_close(attention(q, k, v, mask=mask, backend="eager"), math_attention(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out = attention(qb, kb, vb, mask=mask, backend="eager")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), math_attention(qb, kb, vb, mask).float(), atol=3e-2, rtol=3e-2)


def test_auto_on_cpu_uses_eager_only_for_short_low_precision_sequences_in_training():
    if torch.cuda.is_available():
        pytest.skip("CPU policy")
    short = torch.zeros(1, 1, 64, 8, requires_grad=True)
    long = torch.zeros(1, 1, EAGER_MAX_TOKENS + 1, 8, requires_grad=True)
    assert resolve_backend("auto", short) == "sdpa"  # float32: the fused kernel is faster
    assert resolve_backend("auto", short.bfloat16()) == "eager"
    assert resolve_backend("auto", short.bfloat16(), long.bfloat16()) == "sdpa"
    # no gradients (sampling): the fused forward is faster
    assert resolve_backend("auto", short.detach().bfloat16()) == "sdpa"
    with torch.no_grad():
        assert resolve_backend("auto", short.bfloat16()) == "sdpa"


def test_bool_mask_blocks_masked_keys():
    q, k, v = qkv(1, 2, 5, 6, 8)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    mask[..., 3:] = False
    out = attention(q, k, v, mask=mask, backend="sdpa")
    torch.testing.assert_close(out, math_attention(q, k[:, :, :3], v[:, :, :3]), atol=1e-5, rtol=1e-5)


def test_auto_and_errors_on_cpu():
    q, _, _ = qkv(1, 1, 4, 4, 8)
    if not torch.cuda.is_available():
        assert resolve_backend("auto", q) == "sdpa"
        with pytest.raises(RuntimeError, match="'xformers' cannot run: .*(not installed|CUDA)"):
            attention(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match="backend 'flash'; allowed: auto, xformers, sdpa, eager, math"):
        attention(q, q, q, backend="flash")


def test_broken_xformers_build_is_probed_once_and_reported():
    """A wheel built for another torch imports but its kernels raise: auto must not pick it."""
    import ditx.attention as attn

    calls = []

    class BrokenOps:
        def memory_efficient_attention(self, q, k, v):
            calls.append(q.shape)
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    ops = BrokenOps()
    reason = attn.xformers_kernel_problem(torch.device("cpu"), ops)
    assert "installed but its kernels do not run here (NotImplementedError: No operator found" in reason
    assert f"for torch {torch.__version__}" in reason
    assert attn.xformers_kernel_problem(torch.device("cpu"), ops) == reason and len(calls) == 1  # cached


def test_xformers_reasons_name_what_is_missing(monkeypatch):
    import ditx.attention as attn

    monkeypatch.setattr(attn, "_xformers_ops", lambda: object())  # pretend it is installed
    monkeypatch.setattr(attn, "xformers_kernel_problem", lambda device, ops=None: None)  # ... and works
    q = torch.zeros(1, 1, 4, 8)
    assert "need CUDA tensors, got device 'cpu'" in attn.xformers_unavailable_reason(q)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    assert "float16/bfloat16 only, got torch.float32" in attn.xformers_unavailable_reason(q)
    assert attn.xformers_unavailable_reason(q.half()) is None


def _xformers_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "xformers kernels need a CUDA device"
    if _xformers_ops() is None:
        return "xformers is not installed (pip install 'ditx[xformers]')"
    from ditx.attention import xformers_kernel_problem

    return xformers_kernel_problem(torch.device("cuda"))


@pytest.mark.skipif(_xformers_skip_reason() is not None, reason=str(_xformers_skip_reason()))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_xformers_equals_math_on_cuda(shape, masked):
    b, h, nq, nk, d = shape
    q, k, v = qkv(*shape, dtype=torch.float16, device="cuda")
    mask = random_bool_mask(b, nq, nk).cuda() if masked else None
    assert resolve_backend("auto", q) == "xformers"
    out = attention(q, k, v, mask=mask, backend="xformers")
    torch.testing.assert_close(out.float(), math_attention(q, k, v, mask).float(), atol=2e-3, rtol=2e-3)
