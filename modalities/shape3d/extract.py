"""Meshes from occupancy functions: marching cubes on a chunked grid, and atomic mesh export.

``extract_mesh`` is how a generated shape (a decoder's occupancy field) becomes a mesh,
for metrics and for writing OBJ/PLY/GLB samples. Conventions:

- The grid has ``resolution`` points per axis on ``[lo, hi]`` *including both ends*
  (spacing ``(hi - lo) / (resolution - 1)``); a value is "inside" when it is above
  ``level`` (0.5 for probabilities, 0 for logits or a negative signed distance).
- ``occupancy_fn`` sees at most ``chunk_size`` points per call, so a 256³ grid (16.7M
  points) needs only the grid of float32 values (64 MiB) plus one chunk at a time. The
  default, 16,384 points, is also the fastest on CPU: a width-128 decoder's activations
  stay at 8 MB, which the allocator reuses, where 262,144-point chunks (134 MB per
  activation, fresh pages for every op) made 256³ extraction 2.4x slower
  (``benchmarks/bench_shape3d.py``).
- With ``pad=True`` (default) the grid is surrounded by one layer of "outside", so a shape
  that touches the bounds still gives a closed, watertight surface (capped just outside
  the bounds) instead of an open one.
- The mesh is oriented outward (positive volume); if the grid holds no surface (all
  values on one side of ``level``) ``EmptySurfaceError`` is raised, or an empty mesh is
  returned with ``allow_empty=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import trimesh
from torch import Tensor

from ditx.files import atomic_write

EXPORT_FORMATS = ("obj", "ply", "glb", "stl", "off")
DEFAULT_CHUNK = 16384  # query points per occupancy_fn call (see the module doc)


class EmptySurfaceError(ValueError):
    """The occupancy grid is entirely inside or entirely outside: there is no surface to extract."""


@torch.no_grad()
def evaluate_grid(
    occupancy_fn: Callable[[Tensor], Tensor | np.ndarray],
    resolution: int = 128,
    bounds: tuple[float, float] = (-0.5, 0.5),
    chunk_size: int = DEFAULT_CHUNK,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``occupancy_fn`` on a ``resolution``³ grid over ``bounds``³: float32 ``(R, R, R)``,
    indexed ``[i, j, k]`` for the point ``(x_i, y_j, z_k)``.

    ``occupancy_fn`` takes float32 points ``(n, 3)`` on ``device`` with ``n <= chunk_size``
    and returns ``n`` values (a tensor or array of shape ``(n,)`` or ``(n, 1)``). The grid
    coordinates are made chunk by chunk, never all at once.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2 (points per axis), got {resolution!r}")
    lo, hi = (float(b) for b in bounds)
    if not hi > lo:
        raise ValueError(f"bounds must be (lo, hi) with hi > lo, got {bounds!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    r = resolution
    step = (hi - lo) / (r - 1)
    values = np.empty(r**3, dtype=np.float32)
    for start in range(0, r**3, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, r**3), device=device)
        ijk = torch.stack([flat // (r * r), (flat // r) % r, flat % r], dim=1)  # (n, 3) grid indices
        points = ijk.to(torch.float32) * step + lo  # (n, 3)
        out = occupancy_fn(points)
        out = out.detach().float().cpu().numpy() if isinstance(out, Tensor) else np.asarray(out, dtype=np.float32)
        if out.size != len(flat):
            raise ValueError(
                f"occupancy_fn returned {out.size} values ({out.shape}) for {len(flat)} points; "
                "it must return one value per point, shape (n,) or (n, 1)"
            )
        values[start : start + len(flat)] = out.reshape(-1)
    return values.reshape(r, r, r)


def mesh_from_grid(
    values: np.ndarray,
    level: float = 0.5,
    bounds: tuple[float, float] = (-0.5, 0.5),
    pad: bool = True,
    allow_empty: bool = False,
) -> trimesh.Trimesh:
    """Marching cubes (scikit-image, Lewiner) on a grid from ``evaluate_grid``; see the module doc."""
    from skimage.measure import marching_cubes

    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 3 or min(values.shape) < 2:
        raise ValueError(f"values must be a 3D grid with at least 2 points per axis, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"the occupancy grid holds {int((~np.isfinite(values)).sum())} NaN/inf values")
    lo, hi = (float(b) for b in bounds)
    steps = (hi - lo) / (np.array(values.shape) - 1)
    vmin, vmax = float(values.min()), float(values.max())
    if not vmin < level < vmax:
        if allow_empty:
            return trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=np.int64))
        where = "outside" if vmax <= level else "inside"
        raise EmptySurfaceError(
            f"no surface at level {level}: every grid value is {where} (min {vmin:.4g}, max {vmax:.4g}); "
            "check the level (0.5 for probabilities, 0 for logits) or pass allow_empty=True"
        )
    offset = np.full(3, lo)
    if pad:
        # one layer of clearly-outside values closes surfaces that touch the bounds
        values = np.pad(values, 1, mode="constant", constant_values=min(vmin, level) - 1.0)
        offset = offset - steps
    verts, faces, _normals, _values = marching_cubes(values, level=level, spacing=tuple(steps))
    mesh = trimesh.Trimesh(vertices=verts + offset, faces=faces, process=True)  # merges duplicate vertices
    # grid values exactly at the level give zero-area triangles, which would break watertightness
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    # marching cubes' winding depends on the gradient direction: make the signed volume (about
    # the box centre, so an open surface from pad=False gets a sign too) positive
    tri = np.asarray(mesh.triangles) - mesh.bounds.mean(0)
    if np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() < 0:
        mesh.invert()
    return mesh


def extract_mesh(
    occupancy_fn: Callable[[Tensor], Tensor | np.ndarray],
    resolution: int = 128,
    level: float = 0.5,
    bounds: tuple[float, float] = (-0.5, 0.5),
    chunk_size: int = DEFAULT_CHUNK,
    device: str | torch.device = "cpu",
    pad: bool = True,
    allow_empty: bool = False,
) -> trimesh.Trimesh:
    """The surface ``{occupancy_fn = level}`` as an outward-oriented ``trimesh.Trimesh`` in world coordinates.

    ``occupancy_fn``: float32 points ``(n <= chunk_size, 3)`` on ``device`` -> ``(n,)``
    values, inside above ``level`` (0.5 for probabilities, 0 for logits). Evaluated on a
    ``resolution``³ grid spanning ``bounds`` on every axis (``evaluate_grid``), then
    marching cubes (``mesh_from_grid``). Raises ``EmptySurfaceError`` when the grid holds no
    surface, unless ``allow_empty=True`` (then the mesh has no faces).
    """
    values = evaluate_grid(occupancy_fn, resolution, bounds, chunk_size, device)
    return mesh_from_grid(values, level=level, bounds=bounds, pad=pad, allow_empty=allow_empty)


def export_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` to ``path`` (.obj, .ply, .glb, .stl or .off, from the suffix) atomically.

    The file appears complete or not at all (temporary file, then rename). Returns the path.
    """
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in EXPORT_FORMATS:
        raise ValueError(
            f"cannot export a mesh to {str(path)!r}: the suffix must be one of "
            f"{', '.join('.' + e for e in EXPORT_FORMATS)}"
        )
    data = mesh.export(file_type=ext)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


__all__ = ["EXPORT_FORMATS", "EmptySurfaceError", "evaluate_grid", "mesh_from_grid", "extract_mesh", "export_mesh"]
