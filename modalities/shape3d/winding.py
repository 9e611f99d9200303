"""Occupancy of points in a mesh by generalised winding numbers (exact, and the fast hierarchical sum).

- **Occupancy.** 1 inside, 0 outside. Computed with the *generalised winding number*
  (Jacobson et al. 2013): ``w(q) = Σ_triangles Ω_t(q) / 4π`` (Ω the signed solid angle),
  inside where ``|w| > 0.5``. For a closed, outward-oriented mesh ``w`` is exactly 1
  inside and 0 outside; for a mesh with holes it degrades gracefully (a point deep inside
  a sphere with a missing cap still has ``w`` near 1), which a ray-parity test does not.
  Taking ``|w|`` makes the test indifferent to a globally flipped orientation; meshes
  whose faces are *inconsistently* oriented are made consistent first
  (``trimesh.repair.fix_winding``). Winding numbers are used for every mesh, watertight
  or not, so labels do not depend on which optional ray-tracing package is installed;
  ``occupancy(..., method="ray")`` (trimesh's ``contains``, for watertight meshes, needs
  ``embreex`` or ``rtree``) exists for comparison.
- **Fast winding numbers.** ``winding_number`` evaluates the sum hierarchically (Barill et
  al. 2018, first order): triangles are grouped in a bounding-volume tree and a cluster
  far from the query (distance > ``beta`` · its radius) is replaced by its area-weighted
  normal dipole; near clusters are summed exactly. With ``beta=2`` the error in ``w`` is
  a few hundredths (0.5 is the decision threshold), and a 20k-face mesh takes under a
  second for 20k queries on one CPU core; ``beta=None`` gives the exact O(points ×
  faces) sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

OCCUPANCY_METHODS = ("winding", "ray")


# ---------------------------------------------------------------------------------------
# Generalised winding numbers (occupancy)
# ---------------------------------------------------------------------------------------


def _solid_angles(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Signed solid angles ``(...)`` of triangles seen from the origin; ``a, b, c`` (..., 3) are
    the corners relative to the query point (Van Oosterom & Strackee 1983).

    Positive when the query is on the side opposite the normal ``(b - a) × (c - a)``, so a
    closed outward mesh sums to 4π inside. A query on a corner gives 0, never NaN.
    """
    la, lb, lc = (np.sqrt(np.einsum("...i,...i->...", v, v)) for v in (a, b, c))
    det = np.einsum("...i,...i->...", a, np.cross(b, c))
    ab, bc, ca = (np.einsum("...i,...i->...", u, v) for u, v in ((a, b), (b, c), (c, a)))
    return 2.0 * np.arctan2(det, la * lb * lc + ab * lc + bc * la + ca * lb)


@dataclass
class WindingTree:
    """A bounding-volume tree over triangles for fast winding numbers (arrays, no Python objects).

    Nodes are numbered with the root at 0; node ``n`` owns triangles
    ``triangles[start[n]:end[n]]`` (the triangles are reordered so every node is a
    contiguous range). ``left``/``right`` are -1 at leaves. ``center`` is the node's
    area-weighted centroid, ``radius`` the largest distance from it to a corner, ``dipole``
    the sum of its triangles' area vectors (½ (b − a) × (c − a)).
    """

    triangles: np.ndarray  # (F, 3, 3) float64, tree order
    start: np.ndarray  # (nodes,) int64
    end: np.ndarray
    left: np.ndarray
    right: np.ndarray
    center: np.ndarray  # (nodes, 3)
    radius: np.ndarray  # (nodes,)
    dipole: np.ndarray  # (nodes, 3)

    @classmethod
    def build(cls, triangles: np.ndarray, leaf_size: int = 8) -> WindingTree:
        """Median splits along the longest axis of the centroids' box, down to ``leaf_size`` triangles."""
        tri = np.asarray(triangles, dtype=np.float64)
        if tri.ndim != 3 or tri.shape[1:] != (3, 3) or len(tri) == 0:
            raise ValueError(f"triangles must be (F >= 1, 3, 3), got shape {tri.shape}")
        centroid = tri.mean(1)
        area_vec = 0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3)
        area = np.linalg.norm(area_vec, axis=1)
        order = np.arange(len(tri))
        start, end, left, right = [0], [len(tri)], [-1], [-1]
        todo = [0]
        while todo:
            n = todo.pop()
            s, e = start[n], end[n]
            if e - s <= leaf_size:
                continue
            idx = order[s:e]
            c = centroid[idx]
            axis = int((c.max(0) - c.min(0)).argmax())
            mid = (e - s) // 2
            order[s:e] = idx[np.argpartition(c[:, axis], mid)]
            for lo, hi in ((s, s + mid), (s + mid, e)):
                start.append(lo), end.append(hi), left.append(-1), right.append(-1)
                todo.append(len(start) - 1)
            left[n], right[n] = len(start) - 2, len(start) - 1
        start, end = np.array(start), np.array(end)

        # per-node sums as differences of prefix sums over the tree order
        def node_sum(values: np.ndarray) -> np.ndarray:
            prefix = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(values[order], axis=0)])
            return prefix[end] - prefix[start]

        node_area = node_sum(area)
        mean_centroid = node_sum(centroid) / (end - start)[:, None]
        weighted = node_sum(area[:, None] * centroid) / np.maximum(node_area, 1e-300)[:, None]
        center = np.where(node_area[:, None] > 0, weighted, mean_centroid)
        tri = tri[order]
        corner_max = np.empty(len(start))
        for n in range(len(start)):  # ~F / 4 nodes; each a vectorised max
            d = tri[start[n] : end[n]].reshape(-1, 3) - center[n]
            corner_max[n] = np.einsum("ij,ij->i", d, d).max()
        return cls(tri, start, end, np.array(left), np.array(right), center, np.sqrt(corner_max), node_sum(area_vec))


def _exact_winding(triangles: np.ndarray, points: np.ndarray, pairs: int = 1 << 16) -> np.ndarray:
    """Σ over all triangles of the solid angle / 4π for each point: O(points × faces), chunked."""
    out = np.empty(len(points))
    per_chunk = max(1, pairs // len(triangles))
    for i in range(0, len(points), per_chunk):
        rel = triangles[None] - points[i : i + per_chunk, None, None]  # (P, F, 3, 3)
        out[i : i + per_chunk] = _solid_angles(rel[..., 0, :], rel[..., 1, :], rel[..., 2, :]).sum(1)
    return out / (4.0 * np.pi)


def _tree_winding(tree: WindingTree, points: np.ndarray, beta: float, pairs: int = 1 << 16) -> np.ndarray:
    """Winding numbers of ``points`` (P, 3) with the far-field dipole approximation (see module doc)."""
    out = np.zeros(len(points))  # sum of solid angles
    # a breadth-first frontier of (query, node) pairs; far nodes are summed as dipoles, near
    # leaves exactly, near inner nodes are replaced by their children
    q = np.arange(len(points))
    node = np.zeros(len(points), dtype=np.int64)
    leaf_q, leaf_node = [], []
    while len(q):
        d = tree.center[node] - points[q]  # (K, 3)
        dist = np.sqrt(np.einsum("ij,ij->i", d, d))
        far = dist > beta * tree.radius[node]
        if far.any():
            # solid angle of a far cluster ≈ (its area vector) · (direction to it) / distance²
            omega = np.einsum("ij,ij->i", d[far], tree.dipole[node[far]]) / dist[far] ** 3
            out += np.bincount(q[far], weights=omega, minlength=len(points))
        q, node = q[~far], node[~far]
        is_leaf = tree.left[node] < 0
        leaf_q.append(q[is_leaf]), leaf_node.append(node[is_leaf])
        q, node = q[~is_leaf], node[~is_leaf]
        q, node = np.concatenate([q, q]), np.concatenate([tree.left[node], tree.right[node]])
    q, node = np.concatenate(leaf_q), np.concatenate(leaf_node)
    count = tree.end[node] - tree.start[node]
    q = np.repeat(q, count)  # one entry per (query, triangle) pair
    triangle = np.repeat(tree.start[node] - np.cumsum(count) + count, count) + np.arange(count.sum())
    for i in range(0, len(q), pairs):
        qi, t = q[i : i + pairs], tree.triangles[triangle[i : i + pairs]]
        rel = t - points[qi][:, None]  # (K, 3, 3)
        out += np.bincount(qi, weights=_solid_angles(rel[:, 0], rel[:, 1], rel[:, 2]), minlength=len(points))
    return out / (4.0 * np.pi)


def winding_number(
    mesh: trimesh.Trimesh | np.ndarray,
    points: np.ndarray,
    beta: float | None = 2.0,
    chunk_size: int = 2048,
) -> np.ndarray:
    """Generalised winding number ``(P,)`` float64 of ``points`` (P, 3) w.r.t. a mesh or triangles (F, 3, 3).

    1 inside and 0 outside a closed outward-oriented mesh (−1 inside if it is inverted),
    fractional near holes. ``beta`` is the far-field criterion of the hierarchical
    evaluation (larger: more exact, slower); ``None`` sums every triangle exactly.
    ``chunk_size`` queries are processed at a time, which bounds memory (about
    ``chunk_size`` × (near triangles per query) × 100 bytes with the tree).
    """
    triangles = np.asarray(mesh.triangles if isinstance(mesh, trimesh.Trimesh) else mesh, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (P, 3), got shape {points.shape}")
    if beta is not None and not beta > 0:
        raise ValueError(f"beta must be positive (2 is a good default) or None for the exact sum, got {beta}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(points) == 0:
        return np.zeros(0)
    chunks = [points[i : i + chunk_size] for i in range(0, len(points), chunk_size)]
    if beta is None:
        return np.concatenate([_exact_winding(triangles, chunk) for chunk in chunks])
    tree = WindingTree.build(triangles)
    return np.concatenate([_tree_winding(tree, chunk, beta) for chunk in chunks])


def occupancy(
    mesh: trimesh.Trimesh,
    points: np.ndarray,
    method: str = "winding",
    beta: float | None = 2.0,
    chunk_size: int = 2048,
) -> np.ndarray:
    """Inside/outside labels ``(P,)`` bool of ``points`` (P, 3).

    ``method="winding"`` (default, any mesh): ``|winding number| > 0.5`` after making the
    faces' winding consistent, so holes and flipped normals are tolerated (see the module
    doc). ``method="ray"``: trimesh's ray-parity ``contains``; the mesh must be watertight
    and ``embreex`` (fast) or ``rtree`` must be installed.
    """
    points = np.asarray(points, dtype=np.float64)
    if method == "winding":
        if not mesh.is_winding_consistent:
            mesh = mesh.copy()
            trimesh.repair.fix_winding(mesh)
        return np.abs(winding_number(mesh, points, beta=beta, chunk_size=chunk_size)) > 0.5
    if method == "ray":
        if not mesh.is_watertight:
            raise ValueError(
                "occupancy method 'ray' needs a watertight mesh (ray parity is meaningless with holes); "
                "use method='winding'"
            )
        if not trimesh.ray.has_embree:
            try:
                import rtree  # noqa: F401  (trimesh's pure ray engine needs it)
            except ImportError as e:
                raise ImportError("occupancy method 'ray' needs embreex or rtree: pip install embreex") from e
        return np.asarray(mesh.contains(points), dtype=bool)
    raise ValueError(f"unknown occupancy method {method!r}; choose one of {OCCUPANCY_METHODS}")


__all__ = ["OCCUPANCY_METHODS", "WindingTree", "winding_number", "occupancy"]
