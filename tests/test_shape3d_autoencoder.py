"""Triplane autoencoder: plane projection against brute force, shapes, learning a closed-form
occupancy (spheres), normalisation statistics and save/load."""

import pytest
import torch
from ditx.modalities.shape3d.autoencoder import TriplaneAutoencoder, sample_planes, scatter_mean_to_planes


def test_scatter_mean_matches_a_loop_and_reads_back_at_cell_centres():
    g = torch.Generator().manual_seed(0)
    r, d = 4, 2
    points = torch.rand(1, 50, 3, generator=g) - 0.5
    feats = torch.randn(1, 50, d, generator=g)
    planes = scatter_mean_to_planes(feats, points, r)  # (1, 3, d, r, r)
    for k, (a, b) in enumerate([(0, 1), (0, 2), (1, 2)]):
        col = ((points[0, :, a] + 0.5) * r).floor().long().clamp(0, r - 1)
        row = ((points[0, :, b] + 0.5) * r).floor().long().clamp(0, r - 1)
        for i in range(r):
            for j in range(r):
                hit = (row == i) & (col == j)
                expected = feats[0, hit].mean(0) if hit.any() else torch.zeros(d)
                torch.testing.assert_close(planes[0, k, :, i, j], expected)
    # a bilinear read at a cell centre returns that cell's value on each plane (summed over planes)
    centre = torch.tensor([[[(1 + 0.5) / r - 0.5, (2 + 0.5) / r - 0.5, (3 + 0.5) / r - 0.5]]])  # x, y, z cells 1, 2, 3
    read = sample_planes(planes, centre)[0, 0]
    expected = planes[0, 0, :, 2, 1] + planes[0, 1, :, 3, 1] + planes[0, 2, :, 3, 2]
    torch.testing.assert_close(read, expected)


def test_shapes_and_errors():
    ae = TriplaneAutoencoder(resolution=8, latent_channels=4, width=16, decoder_width=16, decode_resolution=6)
    x = torch.rand(2, 100, 3) - 0.5
    z = ae.encode(x)
    assert z.shape == (2, *ae.latent_shape((100, 3))) == (2, 4, 3, 8, 8)
    vol = ae.decode(z)
    assert vol.shape == (2, 1, 6, 6, 6) and ((vol >= 0) & (vol <= 1)).all()
    ae.chunk_size = 7  # chunking does not change the grid
    torch.testing.assert_close(ae.decode(z), vol)
    with pytest.raises(ValueError, match=r"point clouds of shape \(N, 3\), got data shape \(3, 16, 16\)"):
        ae.latent_shape((3, 16, 16))
    with pytest.raises(ValueError, match="needs query points and occupancy labels"):
        ae.training_loss(x)


def spheres(batch, n_surface=512, n_query=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    radius = 0.15 + 0.25 * torch.rand(batch, 1, 1, generator=g)
    d = torch.randn(batch, n_surface, 3, generator=g)
    surface = d / d.norm(dim=-1, keepdim=True) * radius
    query = torch.rand(batch, n_query, 3, generator=g) - 0.5
    occupancy = (query.norm(dim=-1) < radius[..., 0]).float()
    return surface, query, occupancy, radius


@pytest.mark.parametrize("variational", [False, True])
def test_learns_sphere_occupancy_and_stores_latent_statistics(tmp_path, variational):
    torch.manual_seed(0)
    ae = TriplaneAutoencoder(resolution=8, latent_channels=4, width=32, decoder_width=32,
                             variational=variational, decode_resolution=16).trainable()  # fmt: skip
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for step in range(120):
        surface, query, occ, _ = spheres(8, seed=step)
        terms = ae.training_loss(surface, kl_weight=1e-4, points=query, occupancy=occ)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert set(terms) >= {"loss", "bce", "tv", "l2", "iou"} and (("kl" in terms) == variational)
    ae.freeze()
    surface, query, occ, radius = spheres(16, seed=999)  # held out
    with torch.no_grad():
        logits = ae.occupancy_logits(ae.encode_unnormalized(surface), query)
    pred, truth = logits > 0, occ > 0.5
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > 0.8
    # normalisation: per-channel statistics make the encoded latents zero-mean, unit-std
    ae.fit_latent_statistics(ae.encode_unnormalized(surface))
    z = ae.encode(surface)
    torch.testing.assert_close(z.transpose(0, 1).flatten(1).mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.transpose(0, 1).flatten(1).std(1), torch.ones(4), atol=1e-4, rtol=0)
    # decode(encode(x)) undoes the normalisation: the grid equals the occupancy of the raw latents
    # queried at the cell centres of [-0.5, 0.5]^3
    g = 12
    vol = ae.decode(z[:2], resolution=g)
    axis = (torch.arange(g) + 0.5) / g - 0.5
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3).expand(2, -1, -1)
    with torch.no_grad():
        direct = torch.sigmoid(ae.occupancy_logits(ae.encode_unnormalized(surface[:2]), centres))
    torch.testing.assert_close(vol.reshape(2, -1), direct, atol=1e-4, rtol=1e-4)
    # and it is the sphere: the occupied fraction of the grid is near 4/3 pi r^3 (coarse model)
    volume = ae.decode(z[:2], resolution=24)[:, 0].gt(0.5).float().mean(dim=(1, 2, 3))
    expected = 4 / 3 * torch.pi * radius[:2, 0, 0] ** 3
    assert ((volume - expected).abs() / expected).max() < 0.6
    # save/load: identical latents and decodes, statistics kept
    ae.save_pretrained(tmp_path / "ae")
    again = TriplaneAutoencoder(pretrained=tmp_path / "ae", decode_resolution=16)
    assert again.variational == variational and not again.training
    torch.testing.assert_close(again.encode(surface), z)
    torch.testing.assert_close(again.latent_std, ae.latent_std)
