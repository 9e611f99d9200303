"""``tubelet``: exact inversion, Latte and CogVideoX patchings, clear errors, codes for any clip length."""

import ditx.modalities.video  # noqa: F401  (registers the video components)
import numpy as np
import pytest
import torch
from test_dit import randomize
from test_tokenizer import identity_projection

from ditx.dit import build_dit
from ditx.positions import sincos_nd
from ditx.registry import tokenizers


@pytest.mark.parametrize("patch,size", [((1, 2, 2), (16, 8, 8)), ((2, 2, 2), (8, 8, 12)), ((1, 4, 2), (3, 8, 6))])
def test_tubelet_untokenize_inverts_tokenize_exactly(patch, size):
    c = 4
    tok = tokenizers.build("tubelet", patch_size=list(patch), in_channels=c, hidden_size=c * int(np.prod(patch)))
    identity_projection(tok)
    x = torch.randn(2, c, *size)
    tokens, grid = tok.tokenize(x)
    assert tok.axes == ("time", "height", "width")
    assert grid == tuple(s // p for s, p in zip(size, patch))
    assert tokens.shape == (2, int(np.prod(grid)), tok.hidden_size)
    assert torch.equal(tok.untokenize(tokens, grid), x)


def test_int_patch_size_is_latte_per_frame_patching():
    tok = tokenizers.build("tubelet", patch_size=2, in_channels=4, hidden_size=32)
    assert tok.patch_size == (1, 2, 2)


def test_tubelet_token_order_is_time_major():
    tok = tokenizers.build("tubelet", patch_size=[1, 2, 2], in_channels=1, hidden_size=4)
    identity_projection(tok)
    x = torch.zeros(1, 1, 3, 4, 4)
    x[0, 0, 2, 0:2, 2:4] = 1.0  # frame 2, patch row 0, column 1
    tokens, grid = tok.tokenize(x)
    hot = tokens[0].abs().sum(-1).nonzero().flatten().tolist()
    assert hot == [2 * grid[1] * grid[2] + 0 * grid[2] + 1]


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 4, 15, 8, 8), r"time size 15 is not divisible by the patch size 2"),
        ((1, 4, 8, 8, 10), r"width size 10 is not divisible by the patch size 4"),
    ],
)
def test_clip_not_divisible_is_a_clear_error(shape, message):
    tok = tokenizers.build("tubelet", patch_size=[2, 4, 4], in_channels=4, hidden_size=32)
    with pytest.raises(ValueError, match=message):
        tok.tokenize(torch.randn(*shape))


def test_bad_patch_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"tubelet patch_size must be \(t, p, p\)"):
        tokenizers.build("tubelet", patch_size=[2, 2], in_channels=4, hidden_size=32)


@pytest.mark.parametrize("frames", [8, 16, 24])
def test_position_codes_are_three_axis_sincos_for_any_clip_length(frames):
    tok = tokenizers.build("tubelet", patch_size=[1, 2, 2], in_channels=4, hidden_size=48)
    grid = (frames, 4, 4)
    codes = tok.position_codes(grid)
    assert codes.shape == (frames * 16, 48)
    np.testing.assert_allclose(codes.numpy(), sincos_nd(48, grid), atol=1e-6)
    # the codes of the first 8 frames do not depend on how many frames follow
    short = tok.position_codes((8, 4, 4))
    torch.testing.assert_close(codes[: 8 * 16], short)


@pytest.mark.parametrize("layout", ["joint", "spatial-temporal", "spatial-then-temporal"])
def test_model_built_for_16_frames_samples_8_and_24(layout):
    model = randomize(
        build_dit(tokenizer={"name": "tubelet", "patch_size": [1, 2, 2]}, in_channels=4, depth=4,
                  hidden_size=48, num_heads=4, num_classes=3, layout=layout)  # fmt: skip
    ).eval()
    y = torch.tensor([0, 2])
    t = torch.tensor([10.0, 900.0])
    for frames in (8, 16, 24):
        out = model(torch.randn(2, 4, frames, 8, 8), t, y)
        assert out.shape == (2, 8, frames, 8, 8)
        assert torch.isfinite(out).all()


def test_spatial_temporal_layout_is_latte_variant_one():
    model = build_dit(
        tokenizer="tubelet", in_channels=4, depth=4, hidden_size=48, num_heads=4, layout="spatial-temporal"
    )
    assert model.layout == [("height", "width"), ("time",)] * 2
    assert [b.attend for b in model.blocks] == [(1, 2), (0,)] * 2  # indices into ("time", "height", "width")
