"""3D shape metrics: Chamfer, EMD, F-score, volume IoU, and the generative MMD / COV / 1-NNA of PointFlow.

Conventions (those of PointFlow, Yang et al. 2019, and ShapeGF, Cai et al. 2020, so
numbers are comparable with their tables when the point clouds are prepared the same
way: same number of points, same normalisation):

- ``chamfer_distance`` ("CD"): ``mean_a min_b ‖a − b‖² + mean_b min_a ‖a − b‖²``, the
  *sum* of both directions of *squared* distances (no ½). ``squared=False`` averages
  plain Euclidean distances instead (also summed, not halved; Occupancy Networks'
  "Chamfer-L1" is half of that).
- ``emd`` ("EMD"): the exact optimal one-to-one matching between two equal-size sets
  (``scipy.optimize.linear_sum_assignment``) and the *mean* matched *Euclidean* (not
  squared) distance. PointFlow computes an approximate matching with the same cost; the
  exact one is never larger. O(N³): use a few hundred to a couple of thousand points.
- ``f_score`` (Tatarchenko et al. 2019): precision = fraction of ``a`` within ``tau`` (plain
  distance, strictly less) of ``b``, recall = the same from ``b`` to ``a``, F = 2PR/(P+R).
- ``volume_iou``: |pred ∧ true| / |pred ∨ true| over query points (1 when both are empty).
- Sets of shapes (``mmd_cov``, ``one_nna``): with ``D[i, j]`` the distance between
  sample ``i`` and reference ``j``, **MMD** = mean over references of the distance to
  the nearest sample; **COV** = fraction of references that are the nearest reference of
  at least one sample; **1-NNA** = leave-one-out accuracy of the 1-nearest-neighbour
  classifier on samples ∪ references (labels "sample"/"reference"): 0.5 means the sets
  are indistinguishable, 1.0 fully separated. Ties go to the lower index.

Point sets are compared as given: normalise samples and references the same way first
(e.g. both from ``ShapeFolderDataset``/``normalize_mesh``, i.e. the unit cube).
PointFlow's tables report MMD-CD × 10³ and MMD-EMD × 10²; these functions return raw values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ditx.data import Dataset
from ditx.metrics import Metric

logger = logging.getLogger(__name__)

SET_METRICS = ("cd", "emd")
# (rows of a) × (points of b) × batch held at once when searching nearest neighbours
_NN_BLOCK = 1 << 22


def _check_points(name: str, x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 3 or x.shape[-1] != 3 or x.shape[1] == 0:
        raise ValueError(f"{name} must be batched point clouds (B, N >= 1, 3), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    return x


def _check_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = _check_points("a", a), _check_points("b", b)
    if len(a) != len(b):
        raise ValueError(f"a and b must hold the same number of clouds, got {len(a)} and {len(b)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _nearest_blocked(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``nearest_sq_distances`` by brute force on any device (the GPU path): the matrix-product
    expansion ‖a‖² + ‖b‖² − 2a·b in blocks of rows (at most ``_NN_BLOCK`` entries, 16 MiB in
    float32) finds the neighbours, then each distance is recomputed from the coordinates, so
    identical points give exactly 0."""
    bsz, n, m = a.shape[0], a.shape[1], b.shape[1]
    rows = max(1, _NN_BLOCK // max(1, bsz * m))
    b_sq = b.square().sum(-1)  # (B, M)
    idx_ab = torch.empty(bsz, n, dtype=torch.long, device=a.device)
    best_ba = torch.full((bsz, m), float("inf"), dtype=a.dtype, device=a.device)
    idx_ba = torch.zeros(bsz, m, dtype=torch.long, device=a.device)
    for s in range(0, n, rows):
        block = a[:, s : s + rows]  # (B, r, 3)
        d2 = torch.baddbmm(block.square().sum(-1, keepdim=True) + b_sq[:, None], block, b.transpose(1, 2), alpha=-2)
        idx_ab[:, s : s + rows] = d2.argmin(2)  # (B, r)
        value, arg = d2.min(1)  # (B, M): the best row of this block for each point of b
        better = value < best_ba
        best_ba = torch.where(better, value, best_ba)
        idx_ba = torch.where(better, arg + s, idx_ba)
    d_ab = (a - torch.gather(b, 1, idx_ab[..., None].expand(-1, -1, 3))).square().sum(-1)
    d_ba = (b - torch.gather(a, 1, idx_ba[..., None].expand(-1, -1, 3))).square().sum(-1)
    return d_ab, d_ba


def _kd_trees(clouds: np.ndarray) -> list:
    from scipy.spatial import cKDTree

    return [cKDTree(c) for c in clouds]


def _nearest_kdtree(a: np.ndarray, b: np.ndarray, tree_a=None, tree_b=None) -> tuple[np.ndarray, np.ndarray]:
    """Squared nearest distances ``(N,)``, ``(M,)`` of two float64 clouds with k-d trees (exact; the CPU path)."""
    tree_a = tree_a if tree_a is not None else _kd_trees(a[None])[0]
    tree_b = tree_b if tree_b is not None else _kd_trees(b[None])[0]
    return tree_b.query(a, k=1)[0] ** 2, tree_a.query(b, k=1)[0] ** 2


def nearest_sq_distances(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distance from each point to its nearest neighbour in the other cloud.

    ``a`` (B, N, 3), ``b`` (B, M, 3) -> ``(d_ab (B, N), d_ba (B, M))`` in ``a``'s dtype and
    device. Exact on every device: on the CPU with scipy's k-d trees in float64 (about 20×
    faster there than brute force), elsewhere by blocked brute force (see
    ``_nearest_blocked``). Identical points give exactly 0.
    """
    a, b = _check_pair(a, b)
    if a.device.type != "cpu":
        return _nearest_blocked(a, b)
    a64, b64 = a.detach().double().numpy(), b.detach().double().numpy()
    pairs = [_nearest_kdtree(x, y) for x, y in zip(a64, b64)]
    d_ab = torch.from_numpy(np.stack([p[0] for p in pairs])).to(a.dtype)
    d_ba = torch.from_numpy(np.stack([p[1] for p in pairs])).to(a.dtype)
    return d_ab, d_ba


def chamfer_distance(a: Tensor, b: Tensor, squared: bool = True) -> Tensor:
    """Chamfer distance ``(B,)`` between clouds ``a`` (B, N, 3) and ``b`` (B, M, 3) (module doc).

    ``squared=True``: mean over ``a`` of the squared nearest distance plus the same from
    ``b`` (PointFlow's CD). ``squared=False``: the same with plain distances. Scaling both
    clouds by ``s`` scales the squared CD by ``s²``.
    """
    d_ab, d_ba = nearest_sq_distances(a, b)
    if not squared:
        d_ab, d_ba = d_ab.sqrt(), d_ba.sqrt()
    return d_ab.mean(1) + d_ba.mean(1)


def f_score(a: Tensor, b: Tensor, tau: float = 0.01, return_precision_recall: bool = False):
    """F-score ``(B,)`` at distance threshold ``tau`` of predicted clouds ``a`` (B, N, 3) against ``b`` (B, M, 3).

    Precision: fraction of ``a`` with a point of ``b`` closer than ``tau`` (plain, not
    squared distance); recall: the same from ``b`` to ``a``; F = 2PR / (P + R), 0 when both
    are 0. With ``return_precision_recall`` returns ``(f, precision, recall)``.
    """
    if not tau > 0:
        raise ValueError(f"tau (a distance threshold) must be positive, got {tau}")
    d_ab, d_ba = nearest_sq_distances(a, b)
    precision = (d_ab < tau * tau).to(d_ab.dtype).mean(1)
    recall = (d_ba < tau * tau).to(d_ba.dtype).mean(1)
    total = precision + recall
    f = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-30), torch.zeros_like(total))
    return (f, precision, recall) if return_precision_recall else f


def volume_iou(occ_pred: Tensor, occ_true: Tensor, threshold: float = 0.5) -> Tensor:
    """Volumetric IoU of occupancies at the same query points: ``(B, P)`` -> ``(B,)``, ``(P,)`` -> ``()``.

    Booleans are used as they are; numbers are occupied at ``>= threshold`` (use 0 for
    logits). IoU = |pred ∧ true| / |pred ∨ true|, and 1 where both are empty.
    """
    pred, true = torch.as_tensor(occ_pred), torch.as_tensor(occ_true)
    if pred.shape != true.shape or pred.ndim not in (1, 2):
        raise ValueError(
            f"occ_pred and occ_true must have the same shape, (P,) or (B, P), got {tuple(pred.shape)} "
            f"and {tuple(true.shape)}"
        )
    pred = pred if pred.dtype == torch.bool else pred >= threshold
    true = true if true.dtype == torch.bool else true >= threshold
    inter = (pred & true).sum(-1).double()
    union = (pred | true).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def emd(a: Tensor, b: Tensor, squared: bool = False) -> Tensor:
    """Earth mover's distance ``(B,)`` between equal-size clouds ``a``, ``b`` (B, N, 3): exact.

    The minimum over one-to-one matchings of the *mean* matched Euclidean distance
    (``squared=True``: mean squared distance, matched to minimise that), by
    ``scipy.optimize.linear_sum_assignment`` in float64 on the CPU. O(N³) per pair.
    """
    from scipy.optimize import linear_sum_assignment

    a, b = _check_pair(a, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"EMD needs equal-size clouds (a one-to-one matching), got {a.shape[1]} and {b.shape[1]} points; "
            "sample the same number of points from both"
        )
    out = torch.empty(len(a), dtype=torch.float64)
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    for i in range(len(a)):
        cost = torch.cdist(a64[i], b64[i], compute_mode="donot_use_mm_for_euclid_dist")
        cost = cost.square() if squared else cost
        rows, cols = linear_sum_assignment(cost.numpy())
        out[i] = float(cost.numpy()[rows, cols].mean())
    return out.to(a.dtype)


# ---------------------------------------------------------------------------------------
# Sets of shapes: MMD, COV, 1-NNA
# ---------------------------------------------------------------------------------------


def pairwise_distance_matrix(
    set_a: Tensor,
    set_b: Tensor | None = None,
    metric: str = "cd",
    batch_size: int = 32,
) -> Tensor:
    """Distances ``(Na, Nb)`` float64 between every cloud of ``set_a`` (Na, N, 3) and of ``set_b`` (Nb, M, 3).

    ``metric``: ``"cd"`` (``chamfer_distance``, squared) or ``"emd"`` (``emd``; equal point
    counts). ``set_b=None`` compares ``set_a`` with itself: the matrix is symmetric and
    each unordered pair is computed once (the diagonal is 0). On the CPU, CD builds one
    k-d tree per cloud and reuses it for every pair (32 × 32 clouds of 2048 points: a few
    seconds); on a GPU, ``batch_size`` pairs are compared per call, which bounds memory.
    EMD runs on the CPU, one pair at a time (about 0.1 s per pair of 512 points).
    """
    if metric not in SET_METRICS:
        raise ValueError(f"metric must be one of {SET_METRICS}, got {metric!r}")
    set_a = _check_points("set_a", set_a)
    symmetric = set_b is None
    set_b = set_a if symmetric else _check_points("set_b", set_b)
    if set_a.device != set_b.device:
        raise ValueError(f"set_a is on {set_a.device} but set_b on {set_b.device}")
    na, nb = len(set_a), len(set_b)
    if symmetric:
        pairs = torch.triu_indices(na, na, offset=1).T  # (na (na - 1) / 2, 2)
    else:
        pairs = torch.cartesian_prod(torch.arange(na), torch.arange(nb)).reshape(-1, 2)
    out = torch.zeros(na, nb, dtype=torch.float64)
    if metric == "cd" and set_a.device.type == "cpu":
        # one k-d tree per cloud, reused by every pair it is in
        a64 = set_a.detach().double().numpy()
        b64 = a64 if symmetric else set_b.detach().double().numpy()
        trees_a = _kd_trees(a64)
        trees_b = trees_a if symmetric else _kd_trees(b64)
        for i, j in pairs.tolist():
            d_ab, d_ba = _nearest_kdtree(a64[i], b64[j], trees_a[i], trees_b[j])
            out[i, j] = d_ab.mean() + d_ba.mean()
        return out + out.T if symmetric else out
    distance = chamfer_distance if metric == "cd" else emd
    for s in range(0, len(pairs), batch_size):
        i, j = pairs[s : s + batch_size].unbind(1)
        out[i, j] = distance(set_a[i.to(set_a.device)], set_b[j.to(set_b.device)]).double().cpu()
    if symmetric:
        out = out + out.T
    return out


def mmd_cov_from_matrix(distances: Tensor) -> dict[str, float]:
    """MMD and COV (module doc) from a ``(n_sample, n_ref)`` distance matrix."""
    d = torch.as_tensor(distances)
    if d.ndim != 2 or 0 in d.shape:
        raise ValueError(f"distances must be a non-empty (n_sample, n_ref) matrix, got shape {tuple(d.shape)}")
    mmd = d.min(0).values.double().mean()  # each reference's nearest sample
    covered = d.argmin(1).unique()  # each sample's nearest reference
    return {"mmd": float(mmd), "cov": len(covered) / d.shape[1]}


def mmd_cov(sample: Tensor, ref: Tensor, metric: str = "cd", batch_size: int = 32) -> dict[str, float]:
    """``{"mmd", "cov"}`` of sample clouds (Ns, N, 3) against reference clouds (Nr, M, 3) under ``metric``.

    A set against itself gives MMD 0 and COV 1.
    """
    return mmd_cov_from_matrix(pairwise_distance_matrix(sample, ref, metric, batch_size))


def one_nna_from_matrices(m_ss: Tensor, m_sr: Tensor, m_rr: Tensor) -> float:
    """1-NN leave-one-out accuracy from the blocks of the joint distance matrix.

    ``m_ss`` (Ns, Ns) samples×samples, ``m_sr`` (Ns, Nr), ``m_rr`` (Nr, Nr). Each shape
    is classified by the set of its nearest *other* shape.
    """
    ns, nr = m_sr.shape
    if m_ss.shape != (ns, ns) or m_rr.shape != (nr, nr):
        raise ValueError(f"blocks do not fit: m_ss {tuple(m_ss.shape)}, m_sr {(ns, nr)}, m_rr {tuple(m_rr.shape)}")
    if ns < 1 or nr < 1 or ns + nr < 3:
        raise ValueError(f"1-NNA needs at least one sample and one reference and 3 shapes, got {ns} and {nr}")
    joint = torch.cat([torch.cat([m_ss, m_sr], 1), torch.cat([m_sr.T, m_rr], 1)], 0).double()  # (Ns+Nr, Ns+Nr)
    joint.fill_diagonal_(float("inf"))  # leave one out
    is_sample = torch.cat([torch.ones(ns, dtype=torch.bool), torch.zeros(nr, dtype=torch.bool)])
    predicted = is_sample[joint.argmin(1)]
    return float((predicted == is_sample).double().mean())


def one_nna(sample: Tensor, ref: Tensor, metric: str = "cd", batch_size: int = 32) -> float:
    """1-NNA (module doc) of sample clouds (Ns, N, 3) against reference clouds (Nr, M, 3): 0.5 is ideal."""
    return one_nna_from_matrices(
        pairwise_distance_matrix(sample, None, metric, batch_size),
        pairwise_distance_matrix(sample, ref, metric, batch_size),
        pairwise_distance_matrix(ref, None, metric, batch_size),
    )


def shape_set_metrics(
    sample: Tensor, ref: Tensor, metrics: Sequence[str] = SET_METRICS, batch_size: int = 32
) -> dict[str, float]:
    """``mmd-<m>``, ``cov-<m>`` and ``1-nna-<m>`` for each ``m`` in ``metrics`` ("cd", "emd").

    Each distance matrix is computed once and shared by the three numbers.
    """
    out = {}
    for metric in metrics:
        m_sr = pairwise_distance_matrix(sample, ref, metric, batch_size)
        m_ss = pairwise_distance_matrix(sample, None, metric, batch_size)
        m_rr = pairwise_distance_matrix(ref, None, metric, batch_size)
        mc = mmd_cov_from_matrix(m_sr)
        out[f"mmd-{metric}"], out[f"cov-{metric}"] = mc["mmd"], mc["cov"]
        out[f"1-nna-{metric}"] = one_nna_from_matrices(m_ss, m_sr, m_rr)
    return out


def sample_mesh_surfaces(meshes: Sequence[Any], n_points: int, seed: int = 0) -> Tensor:
    """``(len(meshes), n_points, 3)`` float32 area-weighted surface samples; mesh ``i`` uses seed ``(seed, i)``."""
    import trimesh

    clouds = []
    for i, mesh in enumerate(meshes):
        if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
            raise ValueError(f"mesh {i} has no faces (or is a {type(mesh).__name__}); cannot sample its surface")
        points, _ = trimesh.sample.sample_surface(mesh, n_points, seed=np.random.default_rng([seed, i]))
        clouds.append(torch.from_numpy(np.asarray(points, dtype=np.float32)))
    return torch.stack(clouds)


def shape_metrics_from_meshes(
    sample_meshes: Sequence[Any],
    ref_meshes: Sequence[Any],
    n_cd: int = 2048,
    n_emd: int = 512,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """MMD/COV/1-NNA under CD (``n_cd`` surface points per shape) and EMD (``n_emd`` points).

    Returns ``mmd-cd``, ``cov-cd``, ``1-nna-cd``, ``mmd-emd``, ``cov-emd``, ``1-nna-emd``.
    Meshes are compared in their own coordinates (normalise both sets alike first).
    """
    out = {}
    for metric, n in (("cd", n_cd), ("emd", n_emd)):
        sample = sample_mesh_surfaces(sample_meshes, n, seed)
        ref = sample_mesh_surfaces(ref_meshes, n, seed + 1)  # independent of the samples' draws
        out.update(shape_set_metrics(sample, ref, (metric,), batch_size))
    return out


# ---------------------------------------------------------------------------------------
# The metric the evaluate job calls
# ---------------------------------------------------------------------------------------


class PointCloudSetMetric(Metric):
    """MMD / COV / 1-NNA of generated shapes against a reference split, under CD and EMD (module doc).

    ::

        metric = PointCloudSetMetric(n_points=2048, emd_points=512)
        metric.prepare(ShapeFolderDataset(root, split="test"), device="cpu")
        metric.compute(samples)   # {"mmd-cd", "cov-cd", "1-nna-cd", "mmd-emd", "cov-emd", "1-nna-emd"}

    The reference clouds are the dataset items' ``surface`` points (at least ``n_points``
    of them; a seeded subset is taken). Samples are point clouds ``(N, P >= n_points, 3)``
    or a list of meshes (surface-sampled with ``seed``). ``emd_points`` of each cloud (a
    seeded subset) are used for EMD; ``emd_points=0`` skips EMD (it is O(n³) per pair).
    Labels are ignored.
    """

    name = "pointcloud-set"

    def __init__(
        self,
        n_points: int = 2048,
        emd_points: int = 512,
        seed: int = 0,
        batch_size: int = 32,
        max_reference: int | None = None,
    ):
        if n_points < 1 or emd_points < 0 or emd_points > n_points:
            raise ValueError(f"need n_points >= 1 and 0 <= emd_points <= n_points, got {n_points}, {emd_points}")
        self.n_points, self.emd_points, self.seed = n_points, emd_points, seed
        self.batch_size, self.max_reference = batch_size, max_reference
        self.device = torch.device("cpu")
        self.reference: Tensor | None = None
        self.reference_description: dict[str, Any] = {}
        self.num_samples: int | None = None

    def _subset(self, clouds: Sequence[Tensor], n: int, stream: int) -> Tensor:
        """``(len(clouds), n, 3)``: ``n`` points of every cloud, a seeded choice without replacement per cloud."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return torch.stack(
            [c if len(c) == n else c[torch.randperm(len(c), generator=g)[:n].to(c.device)] for c in clouds]
        )

    def prepare(self, reference: Dataset, device: str | torch.device = "cpu") -> None:
        """Collect the reference split's surface clouds (``n_points`` each)."""
        self.device = torch.device(device)
        count = len(reference) if self.max_reference is None else min(len(reference), self.max_reference)
        if count < 2:
            raise ValueError(f"the {self.name} metric needs at least 2 reference shapes, got {count}")
        clouds = [torch.as_tensor(reference[i]["surface"], dtype=torch.float32) for i in range(count)]
        if min(len(c) for c in clouds) < self.n_points:
            raise ValueError(
                f"reference shapes have {min(len(c) for c in clouds)} surface points, fewer than "
                f"n_points={self.n_points}; lower n_points or raise the dataset's n_surface"
            )
        self.reference = self._subset(clouds, self.n_points, 0)
        self.reference_description = {
            "dataset": type(reference).__name__, "split": reference.split, "size": count,
        }  # fmt: skip

    def compute(
        self, samples: Tensor | Sequence[Any], labels: Tensor | None = None, captions: list[str] | None = None
    ) -> dict[str, float]:
        """MMD/COV/1-NNA of ``samples`` (clouds ``(N, P, 3)`` or meshes) against the reference."""
        if self.reference is None:
            raise RuntimeError(f"{type(self).__name__}.compute called before prepare(reference, device)")
        if isinstance(samples, Tensor):
            clouds = _check_points("samples", samples)
            if clouds.shape[1] < self.n_points:
                raise ValueError(f"sample clouds have {clouds.shape[1]} points, fewer than n_points={self.n_points}")
            clouds = self._subset(clouds.float().cpu(), self.n_points, 1)
        else:
            clouds = sample_mesh_surfaces(list(samples), self.n_points, self.seed)
        if len(clouds) < 2:
            raise ValueError(f"the {self.name} metric needs at least 2 samples, got {len(clouds)}")
        self.num_samples = len(clouds)
        sample, ref = clouds.to(self.device), self.reference.to(self.device)
        out = shape_set_metrics(sample, ref, ("cd",), self.batch_size)
        if self.emd_points:
            out.update(
                shape_set_metrics(
                    self._subset(sample, self.emd_points, 2), self._subset(ref, self.emd_points, 3), ("emd",)
                )
            )
        return out

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of how ``compute``'s numbers are made."""
        return {
            "metric": self.name,
            "reference": self.reference_description,
            "num_samples": self.num_samples,
            "points_per_shape": {"cd": self.n_points, "emd": self.emd_points},
            "cd": "mean_a min_b |a-b|^2 + mean_b min_a |a-b|^2 (PointFlow)",
            "emd": "exact matching (scipy linear_sum_assignment), mean matched Euclidean distance",
            "mmd": "mean over reference of the distance to the nearest sample (raw, not x10^3 / x10^2)",
            "cov": "fraction of references that are the nearest reference of some sample",
            "1-nna": "leave-one-out 1-NN accuracy on samples + references (0.5 ideal)",
            "seed": self.seed,
        }


__all__ = [
    "SET_METRICS", "nearest_sq_distances", "chamfer_distance", "f_score", "volume_iou", "emd",
    "pairwise_distance_matrix", "mmd_cov_from_matrix", "mmd_cov", "one_nna_from_matrices", "one_nna",
    "shape_set_metrics", "sample_mesh_surfaces", "shape_metrics_from_meshes", "PointCloudSetMetric",
]  # fmt: skip


class ShapeGenerationMetric(PointCloudSetMetric):
    """The 3D recipes' evaluation: occupancy-volume samples -> meshes -> MMD/COV/1-NNA.

    Samples are occupancy volumes (N, 1, G, G, G) (``triplane-ae``'s data space); each is
    meshed by marching cubes at 0.5 and its surface sampled. Adds ``watertight`` (fraction
    of samples whose mesh is watertight; a sample with no surface counts as not
    watertight) and ``empty`` (fraction with no surface). Set metrics use the non-empty
    meshes only.
    """

    name = "shape3d"

    def compute(
        self, samples: Tensor | Sequence[Any], labels: Tensor | None = None, captions: list[str] | None = None
    ) -> dict[str, float]:
        from ditx.modalities.shape3d.io import volumes_to_meshes

        if not (isinstance(samples, Tensor) and samples.ndim == 5):
            return super().compute(samples, labels)
        meshes = volumes_to_meshes(samples)
        found = [m for m in meshes if m is not None and len(m.faces)]
        if len(found) >= 2:
            out = super().compute(found, labels)
        else:  # e.g. an untrained model: report what can be measured
            logger.warning("only %d of %d samples have a surface: MMD/COV/1-NNA need 2", len(found), len(meshes))
            out = {}
        out["watertight"] = sum(bool(m.is_watertight) for m in found) / len(meshes)
        out["empty"] = 1.0 - len(found) / len(meshes)
        return out

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "samples": "occupancy volumes meshed by marching cubes at 0.5 (skimage), surfaces sampled area-weighted",
            "watertight": "fraction of all samples whose mesh is watertight (trimesh is_watertight)",
        }
