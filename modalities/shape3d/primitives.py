"""Procedural primitives, the tiny recipe's data: boxes, spheres, cylinders, capsules, cones and
tori with random proportions and rotations, written once as OBJ/PLY/STL/OFF/GLB files and read
back through the mesh pipeline like any folder of meshes."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import trimesh
from ditx.modalities.shape3d.mesh import MESH_EXTENSIONS, normalize_mesh

from ditx.files import atomic_write

PRIMITIVE_KINDS = ("box", "sphere", "cylinder", "capsule", "cone", "torus")
PRIMITIVE_FORMATS = ("obj", "ply", "stl", "off", "glb")
PRIMITIVES_FORMAT = "ditx-primitives"
PRIMITIVES_VERSION = 1
_SETTINGS_NAME = ".settings.json"
_COMPLETE_NAME = ".complete"


def make_primitive(kind: str, rng: np.random.Generator, margin: float = 0.05) -> trimesh.Trimesh:
    """One watertight primitive of ``kind`` with random proportions and rotation, in the unit cube."""
    c = trimesh.creation
    if kind == "box":
        mesh = c.box(extents=rng.uniform(0.3, 1.0, size=3))
    elif kind == "sphere":
        mesh = c.icosphere(subdivisions=3, radius=1.0)
    elif kind == "cylinder":
        mesh = c.cylinder(radius=rng.uniform(0.2, 0.6), height=rng.uniform(0.5, 1.5), sections=32)
    elif kind == "capsule":
        mesh = c.capsule(height=rng.uniform(0.3, 1.2), radius=rng.uniform(0.2, 0.5), count=[16, 16])
    elif kind == "cone":
        mesh = c.cone(radius=rng.uniform(0.3, 0.7), height=rng.uniform(0.5, 1.5), sections=32)
    elif kind == "torus":
        mesh = c.torus(major_radius=1.0, minor_radius=rng.uniform(0.15, 0.45), major_sections=32, minor_sections=16)
    else:
        raise ValueError(f"unknown primitive {kind!r}; choose from {PRIMITIVE_KINDS}")
    mesh.apply_transform(trimesh.transformations.random_rotation_matrix(rand=rng.random(3)))
    return normalize_mesh(mesh, margin)[0]


def write_primitives(
    root: str | os.PathLike,
    num_train: int = 32,
    num_test: int = 8,
    seed: int = 0,
    kinds: Sequence[str] = PRIMITIVE_KINDS,
    formats: Sequence[str] = PRIMITIVE_FORMATS,
    margin: float = 0.05,
) -> Path:
    """Write procedurally generated primitives as ``root/{train,test}/<kind>/shape_0001.<ext>``.

    ``num_train`` and ``num_test`` shapes *per kind*; the file formats cycle through
    ``formats`` (shifted by one for each kind) so every loader is exercised. Shape ``i`` of
    a split and kind depends only on ``(seed, split, kind, i)``. Resumable: each file is
    written atomically and existing files are kept; the settings go to
    ``root/.settings.json`` first and to ``root/.complete`` last, and a root made with other
    settings is refused (a clear ``ValueError``) instead of being mixed. Returns ``root``.
    """
    root = Path(root)
    kinds, formats = list(kinds), [f.lower().lstrip(".") for f in formats]
    bad = [k for k in kinds if k not in PRIMITIVE_KINDS] + [f for f in formats if f not in MESH_EXTENSIONS]
    if bad or not kinds or not formats:
        raise ValueError(
            f"write_primitives: unknown kinds/formats {bad or '(none given)'}; kinds: {PRIMITIVE_KINDS}, "
            f"formats: {PRIMITIVE_FORMATS}"
        )
    if min(num_train, num_test) < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train} and {num_test}")
    settings = {"format": PRIMITIVES_FORMAT, "version": PRIMITIVES_VERSION, "num_train": num_train,
                "num_test": num_test, "seed": seed, "kinds": kinds, "formats": formats, "margin": margin}  # fmt: skip
    for name in (_COMPLETE_NAME, _SETTINGS_NAME):
        marker = root / name
        if marker.is_file():
            stored = json.loads(marker.read_text())
            if stored != settings:
                raise ValueError(
                    f"{root} already holds primitives made with {stored}, not {settings}; use another root or delete it"
                )
            if name == _COMPLETE_NAME:
                return root
    with atomic_write(root / _SETTINGS_NAME) as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
    for split_id, (split, count) in enumerate((("train", num_train), ("test", num_test))):
        for position, kind in enumerate(kinds):
            kind_id = PRIMITIVE_KINDS.index(kind)
            for i in range(count):
                # formats rotate with the shape and the kind, so even a few shapes use every loader
                ext = formats[(position + i + split_id * num_train) % len(formats)]
                path = root / split / kind / f"shape_{i + 1:04d}.{ext}"
                if path.is_file():
                    continue
                mesh = make_primitive(kind, np.random.default_rng([seed, split_id, kind_id, i]), margin)
                data = mesh.export(file_type=ext)
                with atomic_write(path) as tmp:
                    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    with atomic_write(root / _COMPLETE_NAME) as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
    return root
