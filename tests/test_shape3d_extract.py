"""shape3d mesh extraction: marching cubes on chunked occupancy grids, and atomic export."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import trimesh
from ditx.modalities.shape3d.extract import EmptySurfaceError, evaluate_grid, export_mesh, extract_mesh
from ditx.modalities.shape3d.mesh import load_mesh, occupancy

RADIUS = 0.3


def sphere_probability(points: torch.Tensor) -> torch.Tensor:
    """A smooth occupancy probability of a sphere of radius 0.3: 0.5 on the surface."""
    return torch.sigmoid((RADIUS - points.norm(dim=1)) * 200)


def box_logits(half=(0.3, 0.2, 0.1)):
    return lambda p: (torch.tensor(half) - p.abs()).min(dim=1).values  # > 0 inside


def _outward_fraction(mesh: trimesh.Trimesh, center=(0.0, 0.0, 0.0)) -> float:
    return float((np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - center) > 0).mean())


def test_sphere_gives_a_closed_outward_mesh_of_the_right_volume():
    mesh = extract_mesh(sphere_probability, resolution=48, level=0.5)
    assert mesh.is_watertight
    assert mesh.volume > 0
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * RADIUS**3, rel=0.02)
    assert _outward_fraction(mesh) == 1.0
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), RADIUS, atol=0.005)


def test_logits_with_level_zero_give_the_same_surface():
    probability = extract_mesh(sphere_probability, resolution=32, level=0.5)
    logits = extract_mesh(lambda p: (RADIUS - p.norm(dim=1)) * 200, resolution=32, level=0.0)
    assert logits.volume == pytest.approx(probability.volume, rel=1e-3)


def test_chunk_size_bounds_the_queries_and_does_not_change_the_mesh():
    seen = []

    def fn(points):
        seen.append(len(points))
        return sphere_probability(points)

    small = extract_mesh(fn, resolution=24, chunk_size=1000)
    assert max(seen) == 1000 and sum(seen) == 24**3
    large = extract_mesh(sphere_probability, resolution=24, chunk_size=10**6)
    np.testing.assert_array_equal(small.vertices, large.vertices)
    np.testing.assert_array_equal(small.faces, large.faces)


def test_grid_is_indexed_x_y_z_and_spans_the_bounds_inclusively():
    values = evaluate_grid(lambda p: p[:, 0] + 10 * p[:, 1] + 100 * p[:, 2], resolution=3, bounds=(-1.0, 1.0))
    assert values.shape == (3, 3, 3) and values.dtype == np.float32
    assert values[2, 0, 0] == pytest.approx(1 - 10 - 100) and values[0, 2, 1] == pytest.approx(-1 + 10)


def test_box_volume_and_extents():
    # at resolution 41 the faces lie exactly on grid planes: values equal to the level must not break the mesh
    mesh = extract_mesh(box_logits(), resolution=41, level=0.0)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(0.6 * 0.4 * 0.2, rel=0.02)
    np.testing.assert_allclose(mesh.extents, [0.6, 0.4, 0.2], atol=1e-4)
    assert _outward_fraction(mesh) > 0.99


def test_padding_closes_shapes_that_leave_the_bounds():
    bar = box_logits((0.8, 0.2, 0.2))  # longer than the cube along x
    closed = extract_mesh(bar, resolution=24, level=0.0)
    assert closed.is_watertight and closed.volume > 0
    assert closed.bounds[0, 0] < -0.5 < 0.5 < closed.bounds[1, 0] < 0.6  # capped just outside
    opened = extract_mesh(bar, resolution=24, level=0.0, pad=False)
    assert not opened.is_watertight
    assert _outward_fraction(opened) == 1.0


def test_empty_and_full_grids():
    with pytest.raises(EmptySurfaceError, match=r"no surface at level 0.5: every grid value is outside"):
        extract_mesh(lambda p: torch.zeros(len(p)), resolution=8)
    with pytest.raises(EmptySurfaceError, match="every grid value is inside"):
        extract_mesh(lambda p: torch.ones(len(p)), resolution=8)
    empty = extract_mesh(lambda p: torch.zeros(len(p)), resolution=8, allow_empty=True)
    assert len(empty.faces) == 0


def test_bad_occupancy_functions_and_arguments():
    with pytest.raises(ValueError, match=r"returned 2 values .* for 512 points"):
        extract_mesh(lambda p: torch.zeros(2), resolution=8)
    with pytest.raises(ValueError, match="NaN/inf"):
        extract_mesh(lambda p: torch.full((len(p),), float("nan")), resolution=8)
    with pytest.raises(ValueError, match="resolution must be an integer >= 2"):
        extract_mesh(sphere_probability, resolution=1)
    # numpy results and (n, 1) columns are accepted
    mesh = extract_mesh(lambda p: sphere_probability(p).numpy()[:, None], resolution=16)
    assert mesh.is_watertight


def test_extracting_a_mesh_occupancy_recovers_the_mesh():
    torus = trimesh.creation.torus(major_radius=0.3, minor_radius=0.1, major_sections=48, minor_sections=24)
    mesh = extract_mesh(lambda p: torch.from_numpy(occupancy(torus, p.numpy())).float(), resolution=40)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(torus.volume, rel=0.05)
    assert mesh.euler_number == 0  # still a torus: one hole


@pytest.mark.parametrize("ext", ["obj", "ply", "glb"])
def test_export_mesh_round_trips(tmp_path, ext):
    mesh = extract_mesh(sphere_probability, resolution=20)
    path = export_mesh(mesh, tmp_path / "out" / f"sphere.{ext}")
    loaded = load_mesh(path)
    assert loaded.volume == pytest.approx(mesh.volume, rel=1e-5)
    assert os.listdir(tmp_path / "out") == [f"sphere.{ext}"]  # no temporary files left


def test_export_mesh_rejects_unknown_suffixes_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    mesh = extract_mesh(sphere_probability, resolution=12)
    with pytest.raises(ValueError, match=r"suffix must be one of \.obj, \.ply, \.glb"):
        export_mesh(mesh, tmp_path / "sphere.usd")
    target = tmp_path / "sphere.obj"
    target.write_text("previous")

    def broken_write(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(type(target), "write_bytes", broken_write)
    with pytest.raises(OSError, match="disk full"):
        export_mesh(mesh, target)
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["sphere.obj"]
