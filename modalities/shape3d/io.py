"""Writing 3D samples: meshes (OBJ and GLB) extracted from occupancy volumes, and a PNG preview.

Samples of the 3D recipes are occupancy volumes (B, 1, G, G, G) of probabilities on the
cell centres of [-0.5, 0.5]³ (what ``triplane-ae``'s ``decode`` returns). Meshes come from
marching cubes at 0.5 (``extract.mesh_from_grid``); the preview is a small software
render (orthographic, z-buffered splats of surface samples, Lambert shading) so it needs
no OpenGL or matplotlib.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import trimesh
from ditx.modalities.image.io import make_grid
from ditx.modalities.shape3d.extract import EmptySurfaceError, export_mesh, mesh_from_grid
from PIL import Image
from torch import Tensor

from ditx.files import atomic_write
from ditx.writers import sample_stem


def volume_bounds(resolution: int) -> tuple[float, float]:
    """The first and last cell centre of a ``resolution``³ grid over [-0.5, 0.5]³."""
    half = 0.5 / resolution
    return (-0.5 + half, 0.5 - half)


def volumes_to_meshes(samples: Tensor, level: float = 0.5) -> list[trimesh.Trimesh | None]:
    """(B, 1, G, G, G) occupancy probabilities -> one mesh per sample (None where no surface)."""
    if samples.ndim != 5 or samples.shape[1] != 1 or len(set(samples.shape[2:])) != 1:
        raise ValueError(f"3D samples must be occupancy volumes (B, 1, G, G, G), got shape {tuple(samples.shape)}")
    bounds = volume_bounds(samples.shape[-1])
    meshes: list[trimesh.Trimesh | None] = []
    for volume in samples[:, 0].float().cpu().numpy():
        try:
            meshes.append(mesh_from_grid(volume, level=level, bounds=bounds))
        except EmptySurfaceError:
            meshes.append(None)
    return meshes


# a fixed view: azimuth 35°, elevation 25°, light from the upper left of the camera
def _view_rotation(azimuth: float = 35.0, elevation: float = 25.0) -> np.ndarray:
    a, e = math.radians(azimuth), math.radians(elevation)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
    # world z is up; camera looks along -y' after the rotation, image up = z'
    return rx @ rz


def render_mesh(mesh: trimesh.Trimesh | None, size: int = 128, points: int = 40000, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 grey-shaded render of ``mesh`` in [-0.5, 0.5]³ (white if None)."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    if mesh is None or len(mesh.faces) == 0:
        return image
    pts, face = trimesh.sample.sample_surface(mesh, points, seed=seed)
    normals = mesh.face_normals[face]
    rot = _view_rotation()
    p, n = pts @ rot.T, normals @ rot.T
    # orthographic projection: x' right, z' up, y' depth (smaller = closer to the camera)
    u = np.clip(((p[:, 0] + 0.75) / 1.5 * size).astype(int), 0, size - 1)
    v = np.clip(((0.75 - p[:, 2]) / 1.5 * size).astype(int), 0, size - 1)
    depth = p[:, 1]
    light = np.array([-0.4, -0.6, 0.7])
    light /= np.linalg.norm(light)
    shade = 0.25 + 0.75 * np.clip(n @ light, 0, 1)  # facing away from the light: ambient only
    order = np.argsort(-depth)  # far to near: nearer splats overwrite
    zbuf = np.full((size, size), np.inf)
    for du, dv in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2×2 splats close the gaps between samples
        uu, vv = np.clip(u[order] + du, 0, size - 1), np.clip(v[order] + dv, 0, size - 1)
        d = depth[order]
        closer = d <= zbuf[vv, uu]
        zbuf[vv[closer], uu[closer]] = d[closer]
        image[vv[closer], uu[closer]] = (shade[order][closer, None] * np.array([150, 170, 210])).astype(np.uint8)
    return image


def write_shape_samples(
    samples: Tensor, out_dir: str | Path, labels: Tensor | None = None, captions: list[str] | None = None
) -> list[Path]:
    """Occupancy volumes (B, 1, G, G, G) -> ``sample_00000[_class3][_{prompt slug}].obj``/``.glb`` and
    ``preview.png``.

    The preview holds one render per sample (one row per class for conditional samples);
    samples without a surface get no mesh files and a blank tile. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meshes = volumes_to_meshes(samples)
    written: list[Path] = []
    for i, mesh in enumerate(meshes):
        if mesh is None:
            continue
        stem = sample_stem(i, labels, captions)
        written += [export_mesh(mesh, out / f"{stem}.obj"), export_mesh(mesh, out / f"{stem}.glb")]
    tiles = np.stack([render_mesh(m, seed=i) for i, m in enumerate(meshes)])
    if labels is not None:  # one row per class, like the image grid
        classes = sorted(set(int(c) for c in labels))
        per_row = max(int((labels == c).sum()) for c in classes)
        blank = np.full_like(tiles[0], 255)
        rows = [[tiles[i] for i in range(len(tiles)) if int(labels[i]) == c] for c in classes]
        tiles = np.stack([t for row in rows for t in row + [blank] * (per_row - len(row))])
        grid = make_grid(tiles, rows=len(classes))
    else:
        grid = make_grid(tiles, rows=max(1, int(math.sqrt(len(tiles)))))
    with atomic_write(out / "preview.png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    written.append(out / "preview.png")
    return written
