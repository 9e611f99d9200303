"""Rotary positions over named axes: the channel split, offsets-only scores, agreement with a
direct complex-number reference in every layout and backend, and the model's configuration."""

import math

import pytest
import torch

from ditx.attention import math_attention
from ditx.dit import Attention, DiT, build_dit
from ditx.positions import RotaryPositions, apply_rotary, rope_dims, rope_frequencies
from ditx.tokenizer import PatchTokenizer

VIDEO = ("time", "height", "width")


def test_channel_split_over_axes():
    assert rope_dims(VIDEO, 32) == (12, 10, 10)  # Wan's split of a 32-wide head
    assert rope_dims(VIDEO, 64) == (22, 22, 20)
    assert rope_dims(("height", "width"), 64) == (32, 32)
    assert rope_dims(("plane", "height", "width"), 72) == (0, 36, 36)  # a discrete plane: no channels
    assert rope_dims(VIDEO, 32, {"time": 2, "height": 1, "width": 1}) == (16, 8, 8)
    assert rope_dims(VIDEO, 32, [0, 1, 1]) == (0, 16, 16)
    assert rope_dims(VIDEO, 32, {"time": 1}) == (32, 0, 0)


@pytest.mark.parametrize(
    "shares, match",
    [
        ({"depth": 1}, r"names axes \['depth'\] the tokenizer does not have; its axes are \('time', 'height'"),
        ([1, 1], r"one weight per axis \('time', 'height', 'width'\), got \[1, 1\]"),
        ([0, 0, 0], r"non-negative weights, not all 0"),
        ({"time": -1, "height": 1}, r"non-negative weights"),
    ],
)
def test_bad_shares_are_named(shares, match):
    with pytest.raises(ValueError, match=match):
        rope_dims(VIDEO, 32, shares)


def complex_reference(x, positions, dims, theta=10000.0):
    """RoPE written as complex multiplication: pair (2j, 2j+1) of axis a's channel chunk times
    exp(i * p_a * theta^(-2j/d_a)); channels past sum(dims) unchanged. x (..., n, d), positions (n, A)."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # (..., n, d/2)
    factors, start = torch.ones(z.shape[-2:], dtype=torch.complex128), 0
    for a, d in enumerate(dims):
        omega = torch.tensor([theta ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
        factors[:, start : start + d // 2] = torch.polar(torch.ones(len(omega)).double(), positions[:, a, None] * omega)
        start += d // 2
    return torch.view_as_real(z * factors).flatten(-2).to(x.dtype)


def test_rotation_agrees_with_complex_multiplication():
    torch.manual_seed(0)
    rope = RotaryPositions(VIDEO, 32, (12, 10, 8))  # 2 channels left unrotated
    grid = (3, 4, 5)
    cos, sin = rope.tables(grid)
    x = torch.randn(2, 4, 60, 32)
    positions = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    ref = complex_reference(x, positions.double(), (12, 10, 8))
    torch.testing.assert_close(apply_rotary(x, cos, sin), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rotary(x, cos, sin)[..., -2:], x[..., -2:])
    assert rope_frequencies(4).tolist() == [1.0, 0.01]


def test_scores_depend_only_on_position_offsets():
    """q·k after rotation is unchanged when every position moves by the same offset, and
    changes when one token moves alone."""
    torch.manual_seed(0)
    rope = RotaryPositions(VIDEO, 32, rope_dims(VIDEO, 32))
    q, k = torch.randn(20, 32), torch.randn(20, 32)
    positions = torch.randint(0, 16, (20, 3)).double()

    def scores(pos):
        angles = rope.angles(pos)
        cos, sin = angles.cos().float(), angles.sin().float()
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).T

    base = scores(positions)
    for shift in ([5, 0, 0], [0, -3, 7], [11, 2, 40]):
        torch.testing.assert_close(scores(positions + torch.tensor(shift).double()), base, atol=2e-4, rtol=1e-4)
    moved = positions.clone()
    moved[0, 2] += 1
    assert (scores(moved) - base)[0].abs().max() > 1e-2


def reference_attention(attn, x, grid, attend, dims):
    """Direct reference of one self-attention block with rotary positions: all tokens at once
    with their full grid positions (complex form), a mask keeping each token to the tokens
    that share its coordinates on the axes the block does not span, math attention."""
    b, n, d = x.shape
    qkv = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    positions = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))
    q, k = complex_reference(q, positions.double(), dims), complex_reference(k, positions.double(), dims)
    spanned = range(len(grid)) if attend is None else attend
    others = [a for a in range(len(grid)) if a not in spanned]
    mask = torch.ones(n, n, dtype=torch.bool)
    for a in others:
        mask &= positions[:, None, a] == positions[None, :, a]
    out = math_attention(q, k, v, mask)
    return attn.proj(out.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("backend", ["math", "eager", "sdpa"])
@pytest.mark.parametrize("attend", [None, (1, 2), (0,), (0, 2)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_every_layout_and_backend_agree_with_the_direct_reference(backend, attend, qk_norm):
    torch.manual_seed(0)
    attn = Attention(64, 2, backend=backend, qk_norm=qk_norm)
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    dims = rope_dims(VIDEO, 32)
    rope = RotaryPositions(VIDEO, 32, dims)
    grid = (3, 4, 5)
    x = torch.randn(2, 60, 64)
    out = attn(x, grid, attend, None, rope.tables(grid, attend))
    torch.testing.assert_close(out, reference_attention(attn, x, grid, attend, dims), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers and flash attention need CUDA")
@pytest.mark.parametrize("backend", ["xformers", "sdpa"])
def test_cuda_backends_agree_with_the_direct_reference(backend):
    from ditx.attention import xformers_unavailable_reason

    if backend == "xformers" and xformers_unavailable_reason(torch.zeros(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("xformers cannot run here")
    torch.manual_seed(0)
    attn = Attention(64, 2, backend=backend).cuda()
    dims = rope_dims(VIDEO, 32)
    rope = RotaryPositions(VIDEO, 32, dims)
    grid, x = (3, 4, 5), torch.randn(2, 60, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(x, grid, (0,), None, rope.tables(grid, (0,), x.device))
    ref = reference_attention(attn.cpu(), x.cpu(), grid, (0,), dims)
    torch.testing.assert_close(out.float().cpu(), ref, atol=3e-2, rtol=3e-2)


def rope_video_dit(**kw):
    tok = PatchTokenizer(VIDEO, (1, 2, 2), in_channels=3, hidden_size=64)
    return DiT(tok, depth=2, num_heads=2, position="rope", **kw)


def test_positions_reach_the_model_only_the_chosen_way(monkeypatch):
    """A constant clip with one odd token: without positions every other token's output is the
    same (attention cannot tell them apart); sin-cos codes and rotary positions (through the
    offset to the odd token) each make them depend on position; a rotary model never adds the
    tokenizer's codes."""
    from test_dit import randomize

    x, t = torch.full((1, 3, 4, 4, 4), 0.3), torch.tensor([300.0])
    x[:, :, 1, 2:4, 0:2] = -0.5  # token (1, 1, 0)
    spreads = {}
    for position in ("none", "sincos", "rope"):
        tok = PatchTokenizer(VIDEO, (1, 2, 2), in_channels=3, hidden_size=64)
        model = randomize(DiT(tok, depth=2, num_heads=2, position=position), seed=1).eval()
        if position != "sincos":
            monkeypatch.setattr(tok, "position_codes", lambda *a, **k: pytest.fail("codes added"))
        with torch.no_grad():
            out = model(x, t)
        same_place = out[:, :, :, 0::2, 0::2].flatten(2)  # the same pixel of every token's 2x2 patch
        same_place = same_place[:, :, torch.arange(16) != 1 * 4 + 1 * 2 + 0]  # all tokens but the odd one
        spreads[position] = float((same_place - same_place.mean(dim=2, keepdim=True)).abs().max())
    assert spreads["none"] < 1e-5
    assert spreads["sincos"] > 1e-2 and spreads["rope"] > 1e-2


def test_rope_models_save_and_load_with_their_settings(tmp_path):
    from test_dit import randomize

    from ditx.checkpoint import load_model, save_model

    model = randomize(build_dit(tokenizer={"name": "patch2d", "patch_size": 2}, in_channels=4, depth=2, hidden_size=64,
                                num_heads=2, position="rope", rope_shares={"height": 1, "width": 3}, rope_theta=100.0,
                                qk_norm=True)).eval()  # fmt: skip
    assert model.config["position"] == "rope" and model.config["qk_norm"] is True
    assert model.rope.dims == (8, 24)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.rope.dims == (8, 24) and loaded.rope.theta == 100.0
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([10.0, 700.0])
    torch.testing.assert_close(loaded(x, t), model(x, t))
    # defaults are not recorded: configs of sin-cos models stay as they were
    plain = build_dit(tokenizer="patch2d", in_channels=4, depth=1, hidden_size=64, num_heads=2, patch_size=2)
    assert not {"position", "rope_shares", "rope_theta", "qk_norm"} & set(plain.config)


def test_bad_position_settings_are_named():
    with pytest.raises(ValueError, match=r"unknown model.position 'alibi'; allowed: sincos, rope, none"):
        rope_video_dit(layout="joint").__class__(
            PatchTokenizer(VIDEO, (1, 2, 2), 3, 64), depth=1, num_heads=2, position="alibi")  # fmt: skip
    with pytest.raises(ValueError, match=r"model.rope_shares is for rotary positions, but model.position is 'sincos'"):
        DiT(PatchTokenizer(VIDEO, (1, 2, 2), 3, 64), depth=1, num_heads=2, rope_shares={"time": 1})
    with pytest.raises(ValueError, match=r"model.rope_theta must be > 1"):
        rope_video_dit(rope_theta=1.0)


def test_rope_generalises_the_grid_a_model_never_saw():
    """Any grid runs (tables per grid): 8 frames and 12, square and wide, in one model."""
    model = rope_video_dit(layout="spatial-temporal").eval()
    for shape in ((8, 8, 8), (12, 8, 8), (8, 8, 16)):
        x = torch.randn(1, 3, *shape)
        assert model(x, torch.tensor([1.0])).shape == (1, 3, *shape)
    assert len(model.rope._cache) == 6  # 3 grids x 2 layouts
    assert math.isclose(model.rope.theta, 10000.0)
