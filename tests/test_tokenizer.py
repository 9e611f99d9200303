"""The tokenizer contract: exact inversion, any divisible size, clear errors, DiT's sin-cos codes."""

import numpy as np
import pytest
import torch

from ditx.positions import sincos_nd
from ditx.registry import tokenizers
from ditx.tokenizer import PatchTokenizer


def identity_projection(tok: PatchTokenizer) -> None:
    """Set the patch embedding to copy each patch's values into its token, in untokenize's
    (*patch, channel) order, so tokenize/untokenize must be exact inverses."""
    c, patch = tok.in_channels, tok.patch_size
    weight = torch.zeros_like(tok.proj.weight)  # (hidden, C, *patch)
    for j, index in enumerate(np.ndindex(*patch, c)):
        *offset, channel = index
        weight[(j, channel, *offset)] = 1.0
    with torch.no_grad():
        tok.proj.weight.copy_(weight)
        tok.proj.bias.zero_()


@pytest.mark.parametrize("p,size", [(2, (32, 32)), (2, (12, 20)), (4, (8, 28)), ((2, 4), (6, 16))])
def test_patch2d_untokenize_inverts_tokenize_exactly(p, size):
    pp = (p, p) if isinstance(p, int) else p
    c = 3
    tok = tokenizers.build("patch2d", patch_size=p, in_channels=c, hidden_size=c * pp[0] * pp[1])
    identity_projection(tok)
    x = torch.randn(2, c, *size)
    tokens, grid = tok.tokenize(x)
    assert grid == (size[0] // pp[0], size[1] // pp[1])
    assert tokens.shape == (2, grid[0] * grid[1], tok.hidden_size)
    assert torch.equal(tok.untokenize(tokens, grid), x)


def test_patch_tokenizer_is_generic_over_dimensions():
    tok = PatchTokenizer(("time", "height", "width"), (2, 2, 4), in_channels=2, hidden_size=32)
    identity_projection(tok)
    x = torch.randn(1, 2, 6, 4, 8)
    tokens, grid = tok.tokenize(x)
    assert grid == (3, 2, 2)
    assert torch.equal(tok.untokenize(tokens, grid), x)


@pytest.mark.parametrize(
    "patch,channels,size",
    [((1, 16), 1, (16, 16)), ((1, 16), 4, (16, 16)), ((1, 16), 8, (16, 16)), ((2, 2), 4, (32, 32)),
     ((1, 2, 2), 4, (8, 8, 12)), ((2, 2, 2), 4, (8, 8, 12)), ((4,), 4, (64,))],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embedding_is_the_strided_convolution_in_every_precision(patch, channels, size, dtype):
    """tokenize = the float64 convolution with the kernel = stride = patch (DiT's x_embedder),
    also under bf16 autocast on CPU, call after call with changing batch sizes: there oneDNN's
    bf16 convolution itself gave wrong numbers (errors of ~100%, inf, NaN) for the (1, 16)
    kernel over 16 columns (the example row-band tokenizer's), on an Intel Xeon with AMX."""
    torch.manual_seed(0)
    tok = PatchTokenizer(tuple("abc"[: len(patch)]), patch, in_channels=channels, hidden_size=128)
    conv = getattr(torch.nn.functional, f"conv{len(patch)}d")
    for batch in (8, 32, 8, 32, 16):
        x = torch.randn(batch, channels, *size)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            tokens, grid = tok.tokenize(x)
        assert tokens.dtype == dtype and grid == tuple(s // p for s, p in zip(size, patch))
        ref = conv(x.double(), tok.proj.weight.double(), tok.proj.bias.double(), stride=patch)
        ref = ref.flatten(2).transpose(1, 2)  # (B, N, hidden)
        error = float((tokens.double() - ref).abs().max() / ref.abs().max())
        assert error < (1e-2 if dtype == torch.bfloat16 else 1e-5), (batch, error)


def test_token_order_is_row_major_over_the_grid():
    tok = tokenizers.build("patch2d", patch_size=2, in_channels=1, hidden_size=4)
    identity_projection(tok)
    x = torch.zeros(1, 1, 4, 6)
    x[0, 0, 2:4, 4:6] = 1.0  # the patch at grid row 1, column 2
    tokens, grid = tok.tokenize(x)
    hot = tokens[0].abs().sum(-1).nonzero().flatten().tolist()
    assert hot == [1 * grid[1] + 2]


def test_size_not_divisible_is_a_clear_error():
    tok = tokenizers.build("patch2d", patch_size=4, in_channels=4, hidden_size=32)
    with pytest.raises(ValueError, match=r"width size 30 is not divisible by the patch size 4"):
        tok.tokenize(torch.randn(1, 4, 32, 30))
    with pytest.raises(ValueError, match=r"expects 4 channels, got 3"):
        tok.tokenize(torch.randn(1, 3, 32, 32))


def mae_2d_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed, written from its published formula (the DiT reference)."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first, as in MAE
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,size", [(384, 16), (1152, 32), (64, 5)])
def test_sincos_codes_match_dit_for_square_grids(dim, size):
    np.testing.assert_allclose(sincos_nd(dim, (size, size)), mae_2d_sincos(dim, size), atol=1e-12)


def test_nd_codes_each_chunk_depends_on_one_axis_and_odd_splits_work():
    codes = sincos_nd(1024, (3, 4, 5)).reshape(3, 4, 5, 1024)  # 1024 doesn't split in 3 evenly
    sizes = [342, 342, 340]  # leading chunks take the extra channels; the last axis comes first
    starts = np.cumsum([0] + sizes)
    for chunk, axis in zip(range(3), (2, 1, 0)):
        part = codes[..., starts[chunk] : starts[chunk + 1]]
        # varies along its own axis only
        for other in {0, 1, 2} - {axis}:
            assert np.allclose(np.diff(part, axis=other), 0)
        assert not np.allclose(np.diff(part, axis=axis), 0)
    with pytest.raises(ValueError, match="must be even"):
        sincos_nd(63, (4, 4))


def test_position_codes_any_grid_and_cached():
    tok = tokenizers.build("patch2d", patch_size=2, in_channels=4, hidden_size=64)
    a = tok.position_codes((4, 6))
    assert a.shape == (24, 64)
    assert tok.position_codes((4, 6)) is a  # cached per grid
    assert tok.position_codes((6, 4)).shape == (24, 64)
    assert not torch.equal(tok.position_codes((6, 4)), a)
