"""``triplane``: exact inversion in both layouts, plane embedding, 2D codes per plane, layouts."""

import numpy as np
import pytest
import torch
from ditx.modalities.shape3d.tokenizer import TriplaneTokenizer
from test_dit import randomize
from test_tokenizer import identity_projection

from ditx.dit import build_dit
from ditx.positions import sincos_nd


def plain(tok):
    identity_projection(tok)
    with torch.no_grad():
        tok.plane_embed.zero_()
    return tok


@pytest.mark.parametrize("p,r", [(2, 8), (4, 16), (1, 4)])
def test_untokenize_inverts_tokenize_exactly(p, r):
    c = 3
    tok = plain(TriplaneTokenizer(patch_size=p, in_channels=c, hidden_size=c * p * p))
    x = torch.randn(2, c, 3, r, r)
    tokens, grid = tok.tokenize(x)
    assert grid == (3, r // p, r // p) and tok.axes == ("plane", "height", "width")
    assert tokens.shape == (2, 3 * (r // p) ** 2, c * p * p)
    assert torch.equal(tok.untokenize(tokens, grid), x)


def test_rolled_layout_is_the_planes_side_by_side():
    c, r = 2, 8
    x = torch.randn(1, c, 3, r, r)
    rolled = TriplaneTokenizer.roll(x)
    assert rolled.shape == (1, c, r, 3 * r)
    for k in range(3):
        assert torch.equal(rolled[..., k * r : (k + 1) * r], x[:, :, k])
    assert torch.equal(TriplaneTokenizer.unroll(rolled), x)
    tok = plain(TriplaneTokenizer(patch_size=2, in_channels=c, hidden_size=c * 4, layout="rolled"))
    planes = plain(TriplaneTokenizer(patch_size=2, in_channels=c, hidden_size=c * 4))
    tokens, grid = tok.tokenize(rolled)
    assert torch.equal(tokens, planes.tokenize(x)[0])  # same tokens whichever layout comes in
    assert torch.equal(tok.untokenize(tokens, grid), rolled)
    with pytest.raises(ValueError, match=r"got width 20 for R = 8 \(expected 24\)"):
        tok.tokenize(torch.randn(1, c, 8, 20))


def test_planes_share_the_patch_embedding_and_differ_by_the_plane_embedding():
    tok = TriplaneTokenizer(patch_size=2, in_channels=4, hidden_size=16)
    plane = torch.randn(1, 4, 1, 6, 6)
    x = plane.expand(1, 4, 3, 6, 6).contiguous()  # the same content on all three planes
    tokens, _ = tok.tokenize(x)
    per_plane = tokens[0].reshape(3, 9, 16)
    for k in range(3):  # identical content -> identical tokens up to the plane's own embedding
        torch.testing.assert_close(per_plane[k] - tok.plane_embed[k], per_plane[0] - tok.plane_embed[0])
    assert not torch.allclose(tok.plane_embed[0], tok.plane_embed[1])  # N(0, 0.02), distinct


def test_position_codes_are_2d_sincos_repeated_per_plane():
    tok = TriplaneTokenizer(patch_size=2, in_channels=4, hidden_size=32)
    codes = tok.position_codes((3, 4, 4))
    ref = sincos_nd(32, (4, 4))
    for k in range(3):
        np.testing.assert_allclose(codes[k * 16 : (k + 1) * 16].numpy(), ref, atol=1e-6)


def test_errors_name_the_shapes():
    tok = TriplaneTokenizer(patch_size=4, in_channels=4, hidden_size=32)
    with pytest.raises(ValueError, match=r"expects \(B, C, 3, R, R\).*got shape \(1, 3, 4, 8, 8\)"):
        tok.tokenize(torch.randn(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"height size 10 is not divisible by the patch size 4"):
        tok.tokenize(torch.randn(1, 4, 3, 10, 10))


@pytest.mark.parametrize("layout", ["joint", "plane-cross-plane"])
def test_dit_on_triplanes(layout):
    model = randomize(
        build_dit(tokenizer={"name": "triplane", "patch_size": 2}, in_channels=4, depth=4, hidden_size=32,
                  num_heads=4, num_classes=0, layout=layout, learn_sigma=False)  # fmt: skip
    ).eval()
    x = torch.randn(2, 4, 3, 8, 8)
    out = model(x, torch.tensor([3.0, 700.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    if layout == "plane-cross-plane":
        assert model.layout[0] == ("height", "width") and model.layout[1] is None
