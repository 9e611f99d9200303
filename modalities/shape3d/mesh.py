"""3D shapes as meshes: loading, normalisation, point and occupancy sampling, a preprocessing cache
(occupancy by winding numbers in ``winding.py``, the folder dataset in ``data.py``, the primitive
shapes in ``primitives.py``).

Conventions used by the whole shape3d modality
---------------------------------------------

- **Space.** Shapes live in the unit cube ``[-0.5, 0.5]^3`` (``UNIT_CUBE``).
  ``normalize_mesh`` centres a mesh on its bounding-box centre and scales it uniformly so
  its longest side is ``1 - 2 * margin``: with the default ``margin=0.05`` the shape fills
  ``[-0.45, 0.45]`` along its longest axis and leaves a 0.05 gap to each face of the cube,
  where near-surface samples and the marching-cubes grid still have room.
- **Occupancy** and **fast winding numbers**: ``winding.py``.
- **Samples** (``sample_points``): ``surface`` points and their face ``normals``
  (area-weighted, orientation made outward), ``volume_points`` uniform in the unit cube
  and ``near_points`` (surface + N(0, sigma²) per coordinate), each with a boolean
  ``*_occupancy``.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
from ditx.modalities.shape3d.winding import OCCUPANCY_METHODS, occupancy

from ditx.files import atomic_write, ditx_cache_dir, file_sha256

logger = logging.getLogger("ditx.shape3d")

MESH_EXTENSIONS = ("obj", "ply", "stl", "off", "glb", "gltf")
UNIT_CUBE = (-0.5, 0.5)
# bump when sampling changes in a way that changes the arrays: it is part of the cache key
SAMPLES_FORMAT_VERSION = 1


class MeshError(OSError, ValueError):
    """A mesh file that cannot be used; the message starts with its path and says why.

    Both an ``OSError`` (like an unreadable image, which the trainer logs and skips) and a
    ``ValueError`` (bad content), so either ``except`` catches it.
    """


# ---------------------------------------------------------------------------------------
# Loading and normalising
# ---------------------------------------------------------------------------------------


def _merge_scene(scene: trimesh.Scene) -> trimesh.Trimesh | None:
    """All triangle meshes of a scene in world coordinates (each node's transform applied), or None."""
    # Scene.dump() returns one transformed copy per node instance; paths and point clouds are skipped
    meshes = [g for g in scene.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    if not meshes:
        return None
    return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)


def load_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Read a triangle mesh (OBJ, PLY, STL, OFF, GLB/GLTF) as one ``trimesh.Trimesh``, geometry only.

    A file holding a scene (GLB/GLTF, an OBJ with several objects) is merged into one mesh
    with every node's transform applied. Vertices are merged by position (an STL's
    triangle soup or an OBJ with split normals/UVs becomes a connected mesh, so
    ``is_watertight`` means what it should), degenerate faces and unreferenced vertices are
    dropped; colours, textures and materials are not kept.

    Raises ``MeshError`` (``"<path>: <reason>"``) for an unsupported suffix, a missing or
    unreadable file, non-finite vertex coordinates, or a file with no faces (e.g. a point
    cloud).
    """
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in MESH_EXTENSIONS:
        raise MeshError(
            f"{path}: unsupported mesh file type {path.suffix or '(no suffix)'!r}; "
            f"supported: {', '.join('.' + e for e in MESH_EXTENSIONS)}"
        )
    if not path.is_file():
        raise MeshError(f"{path}: no such file")
    try:
        loaded = trimesh.load(str(path), file_type=ext, process=False)
    except Exception as e:  # parsers raise KeyError, ValueError, NotImplementedError, struct.error, ...
        raise MeshError(f"{path}: cannot be read as {ext.upper()} ({type(e).__name__}: {e})") from e
    if isinstance(loaded, trimesh.Scene):
        loaded = _merge_scene(loaded)
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        kind = "nothing" if loaded is None else f"a {type(loaded).__name__}"
        raise MeshError(f"{path}: has no triangle faces (found {kind}); a shape needs a surface mesh")
    vertices = np.asarray(loaded.vertices, dtype=np.float64)
    if not np.isfinite(vertices).all():
        raise MeshError(f"{path}: {int((~np.isfinite(vertices)).any(1).sum())} vertices have NaN/inf coordinates")
    mesh = trimesh.Trimesh(vertices=vertices, faces=np.asarray(loaded.faces, dtype=np.int64), process=True)
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) == 0:
        raise MeshError(f"{path}: all {len(loaded.faces)} faces are degenerate (zero area)")
    return mesh


def normalize_mesh(mesh: trimesh.Trimesh, margin: float = 0.05) -> tuple[trimesh.Trimesh, np.ndarray, float]:
    """Fit ``mesh`` into the unit cube ``[-0.5, 0.5]^3`` leaving ``margin`` to each face.

    Returns ``(normalized copy, center (3,), scale)`` with
    ``normalized.vertices = (mesh.vertices - center) * scale``: ``center`` is the
    bounding-box centre and ``scale = (1 - 2 * margin) / longest side``, so proportions are
    kept and the longest side spans ``[-0.5 + margin, 0.5 - margin]``. The input is not
    modified; ``vertices / scale + center`` maps back.
    """
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5) (the gap to each face of the unit cube), got {margin}")
    lo, hi = mesh.bounds
    extent = float((hi - lo).max())
    if not extent > 0 or not math.isfinite(extent):
        raise ValueError(f"cannot normalize a mesh whose bounding box is {mesh.bounds.tolist()} (no extent)")
    center = (lo + hi) / 2.0
    scale = (1.0 - 2.0 * margin) / extent
    out = mesh.copy()
    out.vertices = (np.asarray(mesh.vertices) - center) * scale
    return out, center, scale


def orient_outward(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of ``mesh`` with consistently wound faces whose normals point outward.

    Winding is made consistent per connected piece (``trimesh.repair.fix_winding``), then
    the whole mesh is inverted if its signed volume about the bounding-box centre is
    negative. For a closed mesh that volume is the true one; for a mesh with small holes it
    still has the sign of the enclosed volume.
    """
    out = mesh.copy()
    if not out.is_winding_consistent:
        trimesh.repair.fix_winding(out)
    tri = np.asarray(out.triangles) - out.bounds.mean(0)  # (F, 3, 3) about the box centre
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    if signed_volume < 0:
        out.invert()
    return out


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def sample_points(
    mesh: trimesh.Trimesh,
    n_surface: int,
    n_volume: int,
    n_near: int,
    sigma: float = 0.01,
    seed: int | np.random.Generator | np.random.SeedSequence = 0,
    method: str = "winding",
) -> dict[str, np.ndarray]:
    """Points on, in and around ``mesh`` (already in the unit cube, see ``normalize_mesh``).

    Returns float32 / bool arrays:

    - ``surface`` (n_surface, 3), ``normals`` (n_surface, 3): uniform on the surface
      (faces chosen with probability ∝ area), each with its face's outward unit normal;
    - ``volume_points`` (n_volume, 3) uniform in ``[-0.5, 0.5]^3``, ``volume_occupancy`` (n_volume,);
    - ``near_points`` (n_near, 3): fresh surface samples plus N(0, sigma²) noise per
      coordinate (not clipped to the cube), ``near_occupancy`` (n_near,).

    Occupancy comes from ``occupancy(mesh, ..., method)``. Everything is drawn from one
    generator made from ``seed``, so equal inputs give equal arrays.
    """
    for name, n in (("n_surface", n_surface), ("n_volume", n_volume), ("n_near", n_near)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    if not sigma > 0:
        raise ValueError(f"sigma (std of the near-surface offsets) must be positive, got {sigma}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mesh = orient_outward(mesh)
    surface, face = trimesh.sample.sample_surface(mesh, n_surface, seed=rng) if n_surface else (np.zeros((0, 3)), [])
    normals = np.asarray(mesh.face_normals)[face] if n_surface else np.zeros((0, 3))
    volume = rng.uniform(*UNIT_CUBE, size=(n_volume, 3))
    near = trimesh.sample.sample_surface(mesh, n_near, seed=rng)[0] if n_near else np.zeros((0, 3))
    near = near + rng.normal(0.0, sigma, size=near.shape)
    labels = occupancy(mesh, np.concatenate([volume, near]), method=method)
    return {
        "surface": np.asarray(surface, dtype=np.float32),
        "normals": np.asarray(normals, dtype=np.float32),
        "volume_points": volume.astype(np.float32),
        "volume_occupancy": labels[:n_volume],
        "near_points": near.astype(np.float32),
        "near_occupancy": labels[n_volume:],
    }


# ---------------------------------------------------------------------------------------
# Preprocessing cache
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSettings:
    """What ``preprocess_mesh`` does to a mesh file; every field is part of the cache key.

    ``normalize`` fits the mesh into the unit cube with ``margin`` (``normalize_mesh``);
    without it the file's coordinates must already be in the unit cube. ``seed`` is mixed
    with the file's hash, so every shape gets its own (reproducible) random samples.
    """

    n_surface: int = 2048
    n_volume: int = 16384
    n_near: int = 16384
    sigma: float = 0.01
    margin: float = 0.05
    normalize: bool = True
    method: str = "winding"
    seed: int = 0

    def __post_init__(self):
        for name in ("n_surface", "n_volume", "n_near", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"sample setting {name} must be a non-negative integer, got {value!r}")
        if not (isinstance(self.sigma, (int, float)) and self.sigma > 0):
            raise ValueError(f"sample setting sigma must be a positive number, got {self.sigma!r}")
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"sample setting margin must be in [0, 0.5), got {self.margin!r}")
        if self.method not in OCCUPANCY_METHODS:
            raise ValueError(f"sample setting method must be one of {OCCUPANCY_METHODS}, got {self.method!r}")

    @classmethod
    def coerce(cls, settings: SampleSettings | dict[str, Any] | None) -> SampleSettings:
        """``settings`` as a ``SampleSettings`` (a dict names fields; None gives the defaults)."""
        if settings is None or isinstance(settings, SampleSettings):
            return settings or cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown sample settings {unknown}; known: {sorted(known)}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": SAMPLES_FORMAT_VERSION, **dataclasses.asdict(self)}

    def key(self) -> str:
        """16 hex digits identifying these settings."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


SAMPLE_ARRAYS = ("surface", "normals", "volume_points", "volume_occupancy", "near_points", "near_occupancy")


def mesh_file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a mesh file; for ``.gltf`` also of the local files its buffers and images name."""
    path = Path(path)
    digest = file_sha256(path)
    if path.suffix.lower() != ".gltf":
        return digest
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        uris = [item.get("uri", "") for key in ("buffers", "images") for item in doc.get(key, [])]
    except (ValueError, OSError, AttributeError):
        return digest  # not our job to diagnose: load_mesh will say what is wrong
    h = hashlib.sha256(digest.encode())
    for uri in uris:
        if uri and not uri.startswith("data:") and (path.parent / uri).is_file():
            h.update(file_sha256(path.parent / uri).encode())
    return h.hexdigest()


def _cache_file(cache_dir: Path, digest: str, settings: SampleSettings) -> Path:
    return cache_dir / f"{digest[:32]}-{settings.key()}.npz"


def _read_samples(path: Path, settings: SampleSettings) -> dict[str, np.ndarray]:
    """The arrays of a cache file; raises if it is unreadable or made with other settings."""
    with np.load(path) as data:  # allow_pickle=False: arrays only
        stored = json.loads(str(data["settings"]))
        if stored != settings.to_dict():
            raise ValueError(f"settings {stored} differ from {settings.to_dict()}")
        return {k: data[k] for k in (*SAMPLE_ARRAYS, "center", "scale")}


def _compute_samples(path: Path, settings: SampleSettings, digest: str) -> dict[str, np.ndarray]:
    mesh = load_mesh(path)
    center, scale = np.zeros(3), 1.0
    if settings.normalize:
        mesh, center, scale = normalize_mesh(mesh, settings.margin)
    # one stream per (seed, file content): identical files get identical samples
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, int(digest[:16], 16)]))
    arrays = sample_points(
        mesh, settings.n_surface, settings.n_volume, settings.n_near, settings.sigma, rng, settings.method
    )
    return {**arrays, "center": np.asarray(center, dtype=np.float64), "scale": np.asarray(scale, dtype=np.float64)}


def _ensure_cached(path: Path, settings: SampleSettings, cache_dir: Path) -> tuple[Path, bool]:
    """(cache file of ``path``'s samples, whether it had to be computed)."""
    digest = mesh_file_sha256(path)
    target = _cache_file(cache_dir, digest, settings)
    if target.is_file():
        try:
            _read_samples(target, settings)
            return target, False
        except Exception as e:  # an unreadable entry is rebuilt, never trusted
            logger.warning("shape3d sample cache %s is unreadable (%s: %s); recomputing", target, type(e).__name__, e)
    arrays = _compute_samples(path, settings, digest)
    meta = {"settings": np.array(json.dumps(settings.to_dict(), sort_keys=True)), "source": np.array(str(path))}
    with atomic_write(target) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, **arrays, **meta)
    return target, True


def preprocess_mesh(
    path: str | os.PathLike,
    settings: SampleSettings | dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Sample a mesh file as ``settings`` say, through a cache; returns ``sample_points``' arrays
    plus ``center`` (3,) and ``scale`` () of the normalisation.

    The cache file is ``<cache_dir>/<sha256 of the file>-<settings hash>.npz`` (default
    ``cache_dir``: ``ditx.files.cache_dir("shape3d-samples")``), written atomically; editing the file or changing
    a setting gives a new entry, and an unreadable entry is recomputed. Raises
    ``MeshError`` for a file that cannot be loaded.
    """
    settings = SampleSettings.coerce(settings)
    cache = Path(cache_dir) if cache_dir is not None else ditx_cache_dir("shape3d-samples")
    target, _ = _ensure_cached(Path(path), settings, cache)
    return _read_samples(target, settings)


@dataclass
class PreprocessReport:
    """What ``preprocess_folder`` did: the cache file of every good input, and the failures."""

    cache_files: dict[str, Path] = field(default_factory=dict)  # input path -> .npz, in input order
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input path, reason)
    computed: int = 0  # entries sampled now (the rest were already cached)


def _preprocess_job(path: str, settings: dict[str, Any], cache_dir: str) -> tuple[str | None, bool, str | None]:
    """Worker entry (module level, so spawned processes can import it): (cache file, computed, error)."""
    try:
        target, computed = _ensure_cached(Path(path), SampleSettings.coerce(settings), Path(cache_dir))
        return str(target), computed, None
    except Exception as e:  # reported by path, never stops the batch
        message = str(e)
        prefix = f"{path}: "
        return None, False, f"{type(e).__name__}: {message[len(prefix) :] if message.startswith(prefix) else message}"


def preprocess_folder(
    paths: Iterable[str | os.PathLike],
    settings: SampleSettings | dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessReport:
    """``preprocess_mesh`` for many files; a file that fails is logged and reported, not fatal.

    ``num_workers > 0`` runs that many worker processes (``spawn``: safe beside torch and
    on every OS; each worker imports this module, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard); 0 works in this process. ``progress`` is called
    with ``(done, total)`` after each file. Returns a ``PreprocessReport``; the cache files
    of good inputs keep the input order. If a worker dies (e.g. out of memory), the files
    it left unfinished are reported as failures; finished ones are cached, so a rerun only
    retries those.
    """
    settings = SampleSettings.coerce(settings)
    cache = Path(cache_dir) if cache_dir is not None else ditx_cache_dir("shape3d-samples")
    paths = [str(p) for p in paths]
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0: in this process), got {num_workers}")
    results: dict[str, tuple[str | None, bool, str | None]] = {}
    args = (dataclasses.asdict(settings), str(cache))  # plain values: pickled to the workers

    def record(path: str, result: tuple[str | None, bool, str | None]) -> None:
        results[path] = result
        if result[2] is not None:
            logger.warning("shape3d: skipping %s: %s", path, result[2])
        if progress is not None:
            progress(len(results), len(paths))

    if num_workers == 0 or len(paths) <= 1:
        for path in paths:
            record(path, _preprocess_job(path, *args))
    else:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=min(num_workers, len(paths)), mp_context=context) as pool:
            pending = {pool.submit(_preprocess_job, path, *args): path for path in dict.fromkeys(paths)}
            for done in futures.as_completed(pending):
                try:
                    result = done.result()
                except Exception as e:  # BrokenProcessPool: a worker died (e.g. out of memory)
                    result = (None, False, f"worker process failed ({type(e).__name__}: {e}); rerun to retry")
                record(pending[done], result)
    report = PreprocessReport()
    for path in paths:
        target, computed, error = results[path]
        if error is None:
            report.cache_files[path] = Path(target)
            report.computed += int(computed)
        else:
            report.failures.append((path, error))
    return report


__all__ = [
    "MESH_EXTENSIONS", "UNIT_CUBE", "MeshError", "load_mesh", "normalize_mesh", "orient_outward",
    "occupancy", "sample_points", "SampleSettings",
    "mesh_file_sha256", "preprocess_mesh", "PreprocessReport", "preprocess_folder",
]  # fmt: skip
