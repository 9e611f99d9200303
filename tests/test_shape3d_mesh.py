"""shape3d meshes: loading, normalisation, occupancy, sampling, the preprocessing cache, datasets, primitives."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import trimesh
from ditx.modalities.shape3d import mesh as shape_mesh
from ditx.modalities.shape3d.data import ShapeFolderDataset, held_out
from ditx.modalities.shape3d.mesh import (
    MESH_EXTENSIONS,
    MeshError,
    SampleSettings,
    load_mesh,
    normalize_mesh,
    occupancy,
    preprocess_folder,
    preprocess_mesh,
    sample_points,
)
from ditx.modalities.shape3d.primitives import PRIMITIVE_FORMATS, PRIMITIVE_KINDS, write_primitives
from ditx.modalities.shape3d.winding import winding_number

SMALL = {"n_surface": 64, "n_volume": 128, "n_near": 128}


def _write(mesh: trimesh.Trimesh, path) -> str:
    data = mesh.export(file_type=path.suffix[1:])
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _sphere(radius=0.4, subdivisions=4) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


def _box(extents=(0.8, 0.5, 0.3)) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=extents)


def _without_faces(mesh: trimesh.Trimesh, drop: np.ndarray) -> trimesh.Trimesh:
    out = mesh.copy()
    out.update_faces(~drop)
    out.remove_unreferenced_vertices()
    return out


def _uniform(n=4000, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, size=(n, 3))


def _inside_box(points, extents=(0.8, 0.5, 0.3)) -> np.ndarray:
    return (np.abs(points) < np.array(extents) / 2).all(1)


# ---- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["obj", "ply", "stl", "off", "glb"])
def test_load_mesh_reads_every_format_as_a_watertight_mesh(tmp_path, ext):
    source = trimesh.creation.cylinder(radius=0.3, height=0.8, sections=24)
    mesh = load_mesh(_write(source, tmp_path / f"cyl.{ext}"))
    assert isinstance(mesh, trimesh.Trimesh)
    assert mesh.is_watertight  # an STL triangle soup gets its vertices merged
    assert mesh.volume == pytest.approx(source.volume, rel=1e-5)


def test_gltf_with_external_buffers_loads_and_its_hash_covers_the_buffers(tmp_path):
    for name, data in _box().export(file_type="gltf").items():
        (tmp_path / name).write_bytes(data)
    path = tmp_path / "model.gltf"
    assert load_mesh(path).volume == pytest.approx(_box().volume)
    before = shape_mesh.mesh_file_sha256(path)
    buffer = tmp_path / "gltf_buffer_0.bin"
    buffer.write_bytes(buffer.read_bytes()[::-1])  # new geometry, same .gltf text
    assert shape_mesh.mesh_file_sha256(path) != before


def test_load_mesh_merges_a_scene_with_each_node_transform(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(_box((1, 1, 1)), node_name="a", transform=trimesh.transformations.translation_matrix([2, 0, 0]))
    scene.add_geometry(_box((1, 1, 1)), node_name="b", transform=trimesh.transformations.translation_matrix([-2, 0, 0]))
    path = tmp_path / "two.glb"
    scene.export(str(path))
    mesh = load_mesh(path)
    assert len(mesh.faces) == 24
    np.testing.assert_allclose(mesh.bounds, [[-2.5, -0.5, -0.5], [2.5, 0.5, 0.5]], atol=1e-6)


def test_load_mesh_errors_name_the_file_and_the_reason(tmp_path):
    with pytest.raises(MeshError, match=r"shape\.xyz.*unsupported.*\.obj, \.ply, \.stl, \.off, \.glb"):
        load_mesh(tmp_path / "shape.xyz")
    with pytest.raises(MeshError, match=r"missing\.obj: no such file"):
        load_mesh(tmp_path / "missing.obj")
    (tmp_path / "junk.off").write_text("hello")
    with pytest.raises(MeshError, match=r"junk\.off: cannot be read as OFF"):
        load_mesh(tmp_path / "junk.off")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(MeshError, match=r"points\.obj: has no triangle faces"):
        load_mesh(tmp_path / "points.obj")
    (tmp_path / "nan.obj").write_text("v 0 0 nan\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(MeshError, match=r"nan\.obj: 1 vertices have NaN"):
        load_mesh(tmp_path / "nan.obj")
    error = MeshError("x: y")
    assert isinstance(error, OSError) and isinstance(error, ValueError)


def test_normalize_mesh_fits_the_unit_cube_with_the_margin_and_keeps_proportions():
    source = _box((4.0, 2.0, 1.0))
    source.apply_translation([10.0, -3.0, 7.0])
    before = source.vertices.copy()
    mesh, center, scale = normalize_mesh(source, margin=0.1)
    np.testing.assert_allclose(mesh.bounds, [[-0.4, -0.2, -0.1], [0.4, 0.2, 0.1]], atol=1e-12)
    np.testing.assert_allclose(center, [10.0, -3.0, 7.0])
    np.testing.assert_allclose(mesh.vertices / scale + center, before, atol=1e-12)
    np.testing.assert_array_equal(source.vertices, before)  # the input is untouched
    with pytest.raises(ValueError, match="margin must be in"):
        normalize_mesh(source, margin=0.5)


# ---- occupancy ------------------------------------------------------------------------------


def test_occupancy_matches_analytic_inside_tests_for_watertight_meshes():
    points = _uniform()
    sphere = occupancy(_sphere(0.4), points)
    assert (sphere == (np.linalg.norm(points, axis=1) < 0.4)).mean() > 0.99
    box = occupancy(_box(), points)
    assert (box == _inside_box(points)).mean() > 0.999


def test_occupancy_is_robust_to_holes():
    points = _uniform(seed=1)
    sphere = _sphere(0.4)
    holed = _without_faces(sphere, sphere.triangles_center[:, 2] > 0.36)  # a cap cut off
    box = _box()
    holed_box = _without_faces(box, box.triangles_center[:, 0] > 0.39)  # the +x face removed
    assert not holed.is_watertight and not holed_box.is_watertight
    centre_and_far = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -0.3], [0.49, 0.49, 0.49], [-0.45, 0.0, 0.0]])
    np.testing.assert_array_equal(occupancy(holed, centre_and_far), [True, True, False, False])
    np.testing.assert_array_equal(occupancy(holed_box, centre_and_far), [True, False, False, False])
    assert (occupancy(holed, points) == (np.linalg.norm(points, axis=1) < 0.4)).mean() > 0.99
    assert (occupancy(holed_box, points) == _inside_box(points)).mean() > 0.99


def test_occupancy_ignores_face_orientation():
    points = _uniform(2000, seed=2)
    reference = occupancy(_sphere(0.4, 3), points)
    flipped = _sphere(0.4, 3)
    flipped.invert()
    mixed = _sphere(0.4, 3)
    faces = mixed.faces.copy()
    faces[::3] = faces[::3, ::-1]  # every third face wound the other way
    mixed.faces = faces
    assert not mixed.is_winding_consistent
    assert winding_number(flipped, [[0.0, 0.0, 0.0]])[0] == pytest.approx(-1.0, abs=0.05)
    np.testing.assert_array_equal(occupancy(flipped, points), reference)
    np.testing.assert_array_equal(occupancy(mixed, points), reference)


def test_fast_winding_number_agrees_with_the_exact_sum():
    sphere = _sphere(0.4, 3)
    rng = np.random.default_rng(3)
    points = np.concatenate([_uniform(600, seed=3), sphere.sample(600, seed=rng) + rng.normal(0, 0.01, (600, 3))])
    fast = winding_number(sphere, points, beta=2.0)
    exact = winding_number(sphere, points, beta=None)
    assert np.abs(fast - exact).max() < 0.06
    np.testing.assert_array_equal(np.abs(fast) > 0.5, np.abs(exact) > 0.5)
    # chunking only bounds memory
    np.testing.assert_allclose(winding_number(sphere, points, chunk_size=97), fast, atol=1e-12)


def test_occupancy_ray_method_needs_a_watertight_mesh():
    sphere = _sphere(0.4, 2)
    holed = _without_faces(sphere, sphere.triangles_center[:, 2] > 0.35)
    with pytest.raises(ValueError, match="needs a watertight mesh"):
        occupancy(holed, [[0, 0, 0]], method="ray")
    with pytest.raises(ValueError, match="unknown occupancy method 'parity'"):
        occupancy(sphere, [[0, 0, 0]], method="parity")


# ---- sampling -------------------------------------------------------------------------------


def test_sample_points_shapes_normals_noise_and_labels():
    sphere = _sphere(0.4)
    flipped = sphere.copy()
    flipped.invert()
    out = sample_points(flipped, n_surface=500, n_volume=4000, n_near=2000, sigma=0.01, seed=0)
    assert out["surface"].shape == out["normals"].shape == (500, 3)
    assert out["volume_points"].shape == (4000, 3)
    assert out["near_points"].shape == (2000, 3) and out["near_occupancy"].shape == (2000,)
    assert out["surface"].dtype == np.float32 and out["volume_occupancy"].dtype == bool
    np.testing.assert_allclose(np.linalg.norm(out["surface"], axis=1), 0.4, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=1), 1.0, atol=1e-5)
    assert (np.einsum("ij,ij->i", out["normals"], out["surface"]) > 0).all()  # outward despite the flip
    assert np.abs(out["volume_points"]).max() <= 0.5
    offsets = np.linalg.norm(out["near_points"], axis=1) - 0.4
    assert np.std(offsets) == pytest.approx(0.01, rel=0.15)  # N(0, sigma^2) along the normal direction
    assert out["volume_occupancy"].mean() == pytest.approx(4 / 3 * np.pi * 0.4**3, abs=0.03)
    assert (out["near_occupancy"] == (offsets < 0)).mean() > 0.97  # the mesh is a faceted sphere
    again = sample_points(flipped, n_surface=500, n_volume=4000, n_near=2000, sigma=0.01, seed=0)
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])


# ---- the preprocessing cache -------------------------------------------------------------------


def test_preprocess_mesh_caches_by_file_content_and_settings(tmp_path, monkeypatch):
    path = _write(_box(), tmp_path / "box.ply")
    cache = tmp_path / "cache"
    first = preprocess_mesh(path, SMALL, cache)
    assert first["surface"].shape == (64, 3) and first["scale"] > 0
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(shape_mesh, "_compute_samples", fail)
        cached = preprocess_mesh(path, SMALL, cache)
    for key in first:
        np.testing.assert_array_equal(first[key], cached[key])
    preprocess_mesh(path, {**SMALL, "sigma": 0.02}, cache)  # new settings: a new entry
    _write(_box((0.5, 0.5, 0.5)), tmp_path / "box.ply")  # new content: a new entry
    edited = preprocess_mesh(path, SMALL, cache)
    assert len(list(cache.iterdir())) == 3
    assert not np.array_equal(edited["surface"], first["surface"])
    files[0].write_bytes(b"not an npz")  # a corrupt entry is recomputed, not trusted
    _write(_box(), tmp_path / "box.ply")
    rebuilt = preprocess_mesh(path, SMALL, cache)
    np.testing.assert_array_equal(rebuilt["near_points"], first["near_points"])
    assert not [f for f in os.listdir(cache) if f.startswith(".")]  # no temporary files left
    with pytest.raises(ValueError, match=r"unknown sample settings \['n_points'\]"):
        preprocess_mesh(path, {"n_points": 3}, cache)


def test_preprocess_folder_reports_broken_files_and_keeps_going(tmp_path):
    good = [_write(_sphere(0.4, 2), tmp_path / "a.obj"), _write(_box(), tmp_path / "b.stl")]
    (tmp_path / "broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nend_header\n1 2")
    paths = [good[0], str(tmp_path / "broken.ply"), good[1]]
    report = preprocess_folder(paths, SMALL, tmp_path / "cache", num_workers=2)  # spawned workers
    assert list(report.cache_files) == good
    assert report.computed == 2
    assert [p for p, _ in report.failures] == [str(tmp_path / "broken.ply")]
    assert "cannot be read as PLY" in report.failures[0][1]
    again = preprocess_folder(paths, SMALL, tmp_path / "cache", num_workers=0)
    assert again.computed == 0 and again.cache_files == report.cache_files


# ---- datasets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def primitives(tmp_path_factory):
    return write_primitives(tmp_path_factory.mktemp("prims"), num_train=2, num_test=1, seed=0)


def test_write_primitives_layout_formats_and_resume(primitives, tmp_path):
    files = sorted(p.relative_to(primitives).as_posix() for p in primitives.rglob("shape_*"))
    assert len(files) == len(PRIMITIVE_KINDS) * 3
    assert {f.split("/")[1] for f in files} == set(PRIMITIVE_KINDS)
    assert {f.rsplit(".", 1)[1] for f in files} == set(PRIMITIVE_FORMATS)  # every loader is used
    for f in files:
        mesh = load_mesh(primitives / f)
        assert mesh.is_watertight and mesh.volume > 0, f
        assert mesh.bounds.min() >= -0.45 - 1e-6 and mesh.bounds.max() <= 0.45 + 1e-6
        assert (mesh.bounds[1] - mesh.bounds[0]).max() == pytest.approx(0.9, abs=1e-4)
    assert json.loads((primitives / ".complete").read_text())["seed"] == 0

    # resumable: an interrupted run (no marker, a file missing) is completed with the same files
    root = write_primitives(tmp_path / "p", num_train=1, num_test=1, seed=5, kinds=["torus", "cone"])
    victim = root / "train" / "torus" / "shape_0001.obj"
    original = victim.read_bytes()
    victim.unlink()
    (root / ".complete").unlink()
    write_primitives(root, num_train=1, num_test=1, seed=5, kinds=["torus", "cone"])
    assert victim.read_bytes() == original and (root / ".complete").is_file()
    with pytest.raises(ValueError, match="already holds primitives made with"):
        write_primitives(root, num_train=1, num_test=1, seed=6, kinds=["torus", "cone"])


def test_shape_folder_dataset_items_classes_and_split_folders(primitives, tmp_path):
    train = ShapeFolderDataset(str(primitives), split="train", cache_dir=str(tmp_path / "c"), **SMALL)
    test = ShapeFolderDataset(str(primitives), split="test", cache_dir=str(tmp_path / "c"), **SMALL)
    assert train.classes == test.classes == sorted(PRIMITIVE_KINDS)
    assert (len(train), len(test)) == (12, 6)
    assert not set(train.files) & set(test.files)
    item = train[0]
    assert item["surface"].shape == item["normals"].shape == (64, 3)
    assert item["points"].shape == (256, 3) and item["occupancy"].shape == (256,)
    assert all(item[k].dtype == torch.float32 for k in ("surface", "normals", "points", "occupancy"))
    assert set(item["occupancy"].unique().tolist()) <= {0.0, 1.0}
    assert train.classes[item["y"]] == train.files[0].split("/")[1]
    assert train.stats == {"files": 12, "failed": 0, "computed": 12, "items": 12}

    subsampled = ShapeFolderDataset(
        str(primitives), split="test", cache_dir=str(tmp_path / "c"), query_size=32, **SMALL
    )
    assert subsampled.stats["computed"] == 0  # sampled once, cached
    first, again = subsampled[1]["points"], subsampled[1]["points"]
    subsampled.set_epoch(1)
    assert first.shape == (32, 3) and torch.equal(first, again) and not torch.equal(first, subsampled[1]["points"])


def test_shape_folder_dataset_hash_split_and_broken_files(tmp_path):
    root = tmp_path / "flat"
    (root / "deep").mkdir(parents=True)
    for i in range(12):
        _write(_box((0.2 + 0.05 * i, 0.3, 0.4)), root / ("deep" if i % 2 else "") / f"s{i}.off")
    (root / "deep" / "broken.obj").write_text("v 0 0 0\n")
    cache = str(tmp_path / "c")
    parts = {s: ShapeFolderDataset(str(root), split=s, test_fraction=0.3, cache_dir=cache, **SMALL)
             for s in ("train", "test", "all")}  # fmt: skip
    assert parts["all"].num_classes == 0 and "y" not in parts["all"][0]
    assert not set(parts["train"].files) & set(parts["test"].files)
    assert set(parts["train"].files) | set(parts["test"].files) == set(parts["all"].files)
    assert len(parts["all"]) == 12 and parts["all"].stats["failed"] == 1
    assert parts["all"].failures[0][0].endswith("broken.obj")
    assert all(held_out(f, 0.3) for f in parts["test"].files)
    with pytest.raises(FileNotFoundError, match="holds no mesh files"):
        ShapeFolderDataset(str(tmp_path / "c"), cache_dir=cache)
    with pytest.raises(ValueError, match="split must be"):
        ShapeFolderDataset(str(root), split="val", cache_dir=cache)


def test_sample_settings_validate():
    with pytest.raises(ValueError, match="method must be one of"):
        SampleSettings(method="sdf")
    with pytest.raises(ValueError, match="n_near must be a non-negative integer"):
        SampleSettings(n_near=-1)
    assert SampleSettings().key() == SampleSettings.coerce({}).key() != SampleSettings(seed=1).key()
    assert set(MESH_EXTENSIONS) >= set(PRIMITIVE_FORMATS)
