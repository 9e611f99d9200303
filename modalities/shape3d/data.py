"""3D datasets: folders of meshes (``shape-folder``) and the tiny recipe's procedural primitives."""

from __future__ import annotations

import os
from pathlib import Path

from ditx.files import ditx_cache_dir
from modalities.shape3d.mesh import ShapeFolderDataset, write_primitives

__all__ = ["ShapeFolderDataset", "PrimitivesDataset"]


class PrimitivesDataset(ShapeFolderDataset):
    """Procedural trimesh primitives (box, sphere, cylinder, capsule, cone, torus) with random
    proportions and rotations, written once as OBJ/PLY/STL/OFF/GLB files under ``root``
    (``<cache>/primitives`` by default) and read back through the mesh pipeline like any
    folder of meshes. Classes are the primitive kinds; ``split`` is ``train`` or ``test``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        num_train: int = 48,
        num_test: int = 12,
        data_seed: int = 0,
        **kwargs,
    ):
        root = Path(root).expanduser() if root is not None else ditx_cache_dir("primitives")
        write_primitives(root, num_train=num_train, num_test=num_test, seed=data_seed)
        super().__init__(str(root), split=split, **kwargs)
