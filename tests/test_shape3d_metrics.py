"""shape3d metrics: defining properties of CD, EMD, F-score, IoU, MMD, COV and 1-NNA."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import trimesh
from ditx.modalities.shape3d.metrics import (
    PointCloudSetMetric,
    _nearest_blocked,
    chamfer_distance,
    emd,
    f_score,
    mmd_cov,
    nearest_sq_distances,
    one_nna,
    pairwise_distance_matrix,
    shape_metrics_from_meshes,
    shape_set_metrics,
    volume_iou,
)

from ditx.data import Dataset


def spheres(n: int, points: int, generator: torch.Generator) -> torch.Tensor:
    """(n, points, 3) uniform samples of spheres with radii uniform in [0.3, 0.5]."""
    radius = torch.rand(n, 1, 1, generator=generator) * 0.2 + 0.3
    x = torch.randn(n, points, 3, generator=generator)
    return x / x.norm(dim=-1, keepdim=True) * radius


def boxes(n: int, points: int, generator: torch.Generator) -> torch.Tensor:
    """(n, points, 3) uniform surface samples of boxes with half-extents uniform in [0.2, 0.4]."""
    half = torch.rand(n, 1, 3, generator=generator) * 0.2 + 0.2
    h = half[:, 0]
    area = torch.stack([h[:, 1] * h[:, 2], h[:, 0] * h[:, 2], h[:, 0] * h[:, 1]], dim=1)  # (n, 3) per face pair
    axis = torch.multinomial(area, points, replacement=True, generator=generator)  # (n, points)
    sign = torch.randint(0, 2, (n, points), generator=generator).float() * 2 - 1
    u = torch.rand(n, points, 3, generator=generator) * 2 - 1
    u.scatter_(2, axis[..., None], sign[..., None])  # one coordinate on a face
    return u * half


def brute_force_emd(a: np.ndarray, b: np.ndarray, squared: bool = False) -> float:
    cost = np.linalg.norm(a[:, None] - b[None], axis=-1)
    cost = cost**2 if squared else cost
    return min(cost[np.arange(len(a)), list(p)].mean() for p in itertools.permutations(range(len(b))))


def test_chamfer_by_hand_and_properties():
    a = torch.tensor([[[0.0, 0, 0], [1, 0, 0]]])
    b = torch.tensor([[[0.0, 0, 0], [0, 2, 0], [0, 0, 3]]])
    # a -> b: 0 and 1; b -> a: 0, 4, 9 (squared)
    assert chamfer_distance(a, b).item() == pytest.approx((0 + 1) / 2 + (0 + 4 + 9) / 3)
    assert chamfer_distance(a, b, squared=False).item() == pytest.approx((0 + 1) / 2 + (0 + 2 + 3) / 3)
    g = torch.Generator().manual_seed(0)
    x, y = spheres(3, 300, g), boxes(3, 200, g)
    assert torch.equal(chamfer_distance(x, x), torch.zeros(3))
    torch.testing.assert_close(chamfer_distance(x, y), chamfer_distance(y, x))
    torch.testing.assert_close(chamfer_distance(2.5 * x, 2.5 * y), 2.5**2 * chamfer_distance(x, y))
    torch.testing.assert_close(chamfer_distance(x, y)[1:2], chamfer_distance(x[1:2], y[1:2]))
    with pytest.raises(ValueError, match=r"\(B, N >= 1, 3\)"):
        chamfer_distance(x[0], y[0])


def test_nearest_neighbours_agree_between_the_kdtree_and_brute_force_paths():
    g = torch.Generator().manual_seed(1)
    x, y = spheres(2, 500, g), boxes(2, 700, g)
    d_ab, d_ba = nearest_sq_distances(x, y)
    b_ab, b_ba = _nearest_blocked(x, y)  # the path used on GPUs
    torch.testing.assert_close(d_ab, b_ab, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d_ba, b_ba, atol=1e-6, rtol=1e-5)


def test_f_score():
    g = torch.Generator().manual_seed(2)
    x = spheres(2, 200, g)
    assert torch.equal(f_score(x, x, tau=0.01), torch.ones(2))
    assert torch.equal(f_score(x, x + 10.0, tau=0.01), torch.zeros(2))
    a = torch.tensor([[[0.0, 0, 0], [1, 0, 0]]])
    b = torch.tensor([[[0.0, 0, 0.005], [0, 5, 0], [0, 0, 5], [5, 0, 0]]])
    f, precision, recall = f_score(a, b, tau=0.01, return_precision_recall=True)
    assert (precision.item(), recall.item()) == (0.5, 0.25)
    assert f.item() == pytest.approx(2 * 0.5 * 0.25 / 0.75)


def test_volume_iou():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    true = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(volume_iou(pred, true), torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    probabilities = torch.tensor([0.9, 0.5, 0.2, 0.0])
    assert volume_iou(probabilities, true[0].float()).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same shape"):
        volume_iou(pred, true[:, :3])


def test_emd_is_the_best_matching():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 6, 3)), rng.normal(size=(3, 6, 3))
    for squared in (False, True):
        got = emd(torch.from_numpy(a), torch.from_numpy(b), squared=squared)
        expected = [brute_force_emd(a[i], b[i], squared) for i in range(3)]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    x = torch.from_numpy(a)
    assert torch.equal(emd(x, x[:, torch.randperm(6)]), torch.zeros(3, dtype=torch.float64))  # order-free
    with pytest.raises(ValueError, match="equal-size clouds"):
        emd(x, x[:, :5])


def test_pairwise_matrix_symmetry_and_consistency():
    g = torch.Generator().manual_seed(3)
    clouds = torch.cat([spheres(3, 128, g), boxes(3, 128, g)])
    within = pairwise_distance_matrix(clouds, metric="cd")
    cross = pairwise_distance_matrix(clouds, clouds, metric="cd", batch_size=4)
    torch.testing.assert_close(within, cross)
    torch.testing.assert_close(within, within.T)
    assert torch.equal(within.diagonal(), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(cross[1, 4], chamfer_distance(clouds[1:2], clouds[4:5])[0].double())
    emds = pairwise_distance_matrix(clouds[:4, :32], metric="emd")
    torch.testing.assert_close(emds[0, 3], emd(clouds[0:1, :32], clouds[3:4, :32])[0].double())
    with pytest.raises(ValueError, match=r"metric must be one of \('cd', 'emd'\)"):
        pairwise_distance_matrix(clouds, metric="hausdorff")


def test_mmd_and_cov_of_a_set_against_itself():
    g = torch.Generator().manual_seed(4)
    clouds = torch.cat([spheres(5, 256, g), boxes(5, 256, g)])
    assert mmd_cov(clouds, clouds, "cd") == {"mmd": 0.0, "cov": 1.0}
    assert mmd_cov(clouds[:, :64], clouds[:, :64], "emd") == {"mmd": 0.0, "cov": 1.0}
    # samples that all collapse onto one reference cover only it
    collapsed = mmd_cov(clouds[:1].expand(4, -1, -1), clouds, "cd")
    assert collapsed["cov"] == pytest.approx(1 / 10) and collapsed["mmd"] > 0


def test_one_nna_is_near_half_for_one_distribution_and_near_one_for_two():
    g = torch.Generator().manual_seed(0)
    a, b, c = spheres(32, 512, g), spheres(32, 512, g), boxes(32, 512, g)
    assert 0.35 <= one_nna(a, b, "cd") <= 0.65
    assert one_nna(a, c, "cd") >= 0.95
    assert one_nna(a, a, "cd") == 0.0  # every shape's nearest other is its copy in the other set


class _Items(Dataset):
    """A reference dataset of given items (the metric contract takes a ditx Dataset)."""

    split = "test"

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_shape_metrics_from_meshes_and_the_metric_class():
    rng = np.random.default_rng(0)
    balls = [trimesh.creation.icosphere(2, radius=r) for r in (0.2, 0.3, 0.4, 0.5)]
    cubes = [trimesh.creation.box(extents=e) for e in rng.uniform([0.8, 0.8, 0.05], [1.0, 1.0, 0.1], (4, 3))]  # slabs
    out = shape_metrics_from_meshes(balls, cubes, n_cd=256, n_emd=64, seed=0)
    assert set(out) == {"mmd-cd", "cov-cd", "1-nna-cd", "mmd-emd", "cov-emd", "1-nna-emd"}
    assert out["1-nna-cd"] == out["1-nna-emd"] == 1.0
    same = shape_metrics_from_meshes(balls, balls, n_cd=256, n_emd=64, seed=0)
    assert same["cov-cd"] == 1.0 and same["mmd-cd"] < out["mmd-cd"]

    g = torch.Generator().manual_seed(5)
    reference = _Items([{"surface": s} for s in spheres(6, 300, g)])
    metric = PointCloudSetMetric(n_points=256, emd_points=32)
    metric.prepare(reference)
    result = metric.compute(spheres(6, 300, g))
    assert set(result) == set(out) and all(np.isfinite(v) for v in result.values())
    assert metric.compute(boxes(6, 300, g))["1-nna-cd"] > 0.8
    assert metric.compute(cubes)["1-nna-emd"] >= 0.9  # meshes are surface-sampled
    assert json.loads(json.dumps(metric.protocol()))["points_per_shape"] == {"cd": 256, "emd": 32}
    with pytest.raises(ValueError, match="fewer than n_points=256"):
        metric.compute(spheres(6, 100, g))
    assert shape_set_metrics(spheres(3, 64, g), spheres(3, 64, g), ("cd",)).keys() == {"mmd-cd", "cov-cd", "1-nna-cd"}
