"""3D datasets: folders of meshes (``shape-folder``) and the tiny recipe's procedural primitives."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ditx.modalities.shape3d.mesh import (
    MESH_EXTENSIONS,
    SampleSettings,
    _read_samples,
    preprocess_folder,
)
from ditx.modalities.shape3d.primitives import write_primitives
from torch import Tensor

from ditx.data import (
    MANIFEST_SUFFIXES,
    Dataset,
    PackedStrings,
    all_or_no_captions,
    captions_fingerprint,
    files_under,
    has_extension,
    is_manifest,
    read_manifest,
    sidecar_captions,
)
from ditx.files import ditx_cache_dir, files_fingerprint

__all__ = ["ShapeFolderDataset", "PrimitivesDataset", "held_out"]

logger = logging.getLogger("ditx.shape3d")


def held_out(relative_path: str, test_fraction: float) -> bool:
    """Whether a file is in the test split: a hash of its path relative to the dataset root,
    so the split never changes with the file order, the machine or the seed."""
    digest = hashlib.sha256(Path(relative_path).as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction


class ShapeFolderDataset(Dataset):
    """A folder (or a manifest) of mesh files (OBJ, PLY, STL, OFF, GLB, GLTF), sampled once into the cache.

    Sources (``root``):

    - **class folders** (ShapeNet style) ``root/<category>/**/*.obj``: labels are the
      sorted category names (``classes``, ``class_to_idx``), items have ``"y"``.
    - **flat** ``root/**/*.ply``: unconditional (``num_classes == 0``, no ``"y"``).
    - either of the above inside ``root/train`` and ``root/test`` (what ``write_primitives``
      writes): then ``split`` picks the sub-folder and classes come from both.
    - a **manifest** ``.csv`` (header ``path,label[,caption]``) or ``.jsonl``
      (``{"path": ..., "label": ..., "caption": ...}`` per line): paths relative to the
      manifest's folder or absolute; labels are class names (mapped through their sorted
      set) or integer class indices, or absent in every row (unconditional); ``split`` is
      the held-out partition below, by each path relative to the manifest's folder.

    ``class_folders=None`` picks class folders when a folder holds no mesh itself and at
    least two sub-folders do. Without ``train``/``test`` sub-folders, ``split``
    (``"train"``, ``"test"`` or ``"all"``) is a fixed held-out partition by a hash of each
    file's path relative to ``root`` (``held_out``): about ``test_fraction`` of the files
    are test, train and test never overlap, and a file is in the same split on every
    machine and run.

    Captions: a manifest's ``caption`` column (or key), or in a folder a sidecar text file
    next to each mesh with its name (``chair.obj`` -> ``chair.txt``, UTF-8). Every item has a
    non-empty caption, or none does; some without is a ValueError naming the first (see
    ``ditx.data.all_or_no_captions``). ``captions`` lists them in item order.

    Every file is sampled at construction by ``preprocess_folder`` (``num_workers``
    processes, ``SampleSettings`` from the keyword arguments, cached in ``cache_dir``).
    Files that fail to load are logged with their path and left out: ``failures`` lists
    ``(path, reason)`` and ``stats`` counts ``files``, ``failed``, ``computed`` and ``items``.

    Items are float32 tensors ``x`` = ``surface`` (n_surface, 3), ``normals`` (n_surface, 3),
    ``points`` (n_query, 3) and ``occupancy`` (n_query,) in {0, 1} (the volume points, then
    the near-surface points: ``n_query = n_volume + n_near``), plus ``y`` with classes and
    ``caption`` (a str) with captions.
    ``query_size`` instead draws that many query points per item without replacement, fixed
    by ``(seed, epoch, index)`` (``set_epoch``), the same in every worker and resumed run.
    ``volume_points`` (uniform_points, 3) and ``volume_occupancy`` are a fixed uniform subset
    of the volume points, for volumetric IoU (0 leaves them out).
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        test_fraction: float = 0.2,
        n_surface: int = 2048,
        n_volume: int = 16384,
        n_near: int = 16384,
        sigma: float = 0.01,
        margin: float = 0.05,
        normalize: bool = True,
        method: str = "winding",
        query_size: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        class_folders: bool | None = None,
        extensions: Sequence[str] = MESH_EXTENSIONS,
        uniform_points: int = 4096,
        augment: bool = True,
    ):
        if split not in ("train", "test", "all"):
            raise ValueError(f"shape-folder split must be 'train', 'test' or 'all', got {split!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"shape-folder test_fraction must be in (0, 1), got {test_fraction!r}")
        if isinstance(extensions, str):
            extensions = [extensions]
        exts = tuple(dict.fromkeys(str(e).lower().lstrip(".") for e in extensions))
        bad = [e for e in exts if e not in MESH_EXTENSIONS]
        if bad or not exts:
            raise ValueError(f"shape-folder extensions must be some of {MESH_EXTENSIONS}, got {list(extensions)!r}")
        self.settings = SampleSettings(
            n_surface=n_surface, n_volume=n_volume, n_near=n_near, sigma=sigma, margin=margin,
            normalize=normalize, method=method, seed=seed,
        )  # fmt: skip
        n_query = n_volume + n_near
        if query_size is not None and not 1 <= query_size <= n_query:
            raise ValueError(f"shape-folder query_size must be in [1, n_volume + n_near = {n_query}], got {query_size}")
        self.root = Path(root).expanduser().absolute()
        manifest = is_manifest(self.root)
        if not manifest and not self.root.is_dir():
            missing = "" if self.root.exists() else " (it does not exist)"
            raise FileNotFoundError(
                f"shape-folder root {str(self.root)!r} is not a directory or a manifest "
                f"({', '.join(MANIFEST_SUFFIXES)}){missing}; set data.root=... to a folder of meshes or a manifest"
            )
        self.folder = self.root.parent if manifest else self.root  # what ``files`` are relative to
        self.split, self.test_fraction, self.extensions = split, test_fraction, exts
        self.query_size, self.seed, self.epoch = query_size, seed, 0
        self.uniform_points = uniform_points
        self.cache_dir = Path(cache_dir) if cache_dir is not None else ditx_cache_dir("shape3d-samples")

        if manifest:
            files, labels, self.classes, captions = self._read_manifest()
        else:
            files, labels, self.classes = self._scan(class_folders)
            captions = sidecar_captions(self.root / f for f in files)
            captions = all_or_no_captions(self.root, files, captions, "shape-folder", "meshes")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        report = preprocess_folder([self.folder / f for f in files], self.settings, self.cache_dir, num_workers)
        self.failures = report.failures
        good = [i for i, f in enumerate(files) if str(self.folder / f) in report.cache_files]
        self.files = [files[i] for i in good]  # relative to folder (absolute where a manifest says so)
        self._labels = np.array([labels[i] for i in good], dtype=np.int64)
        self._captions = PackedStrings(captions[i] for i in good) if captions is not None else None
        self._cache_files = [report.cache_files[str(self.folder / files[i])] for i in good]
        self.stats = {"files": len(files), "failed": len(report.failures), "computed": report.computed,
                      "items": len(good)}  # fmt: skip
        if not good:
            raise ValueError(
                f"shape-folder {str(self.root)!r} split {split!r}: none of its {len(files)} mesh files could be "
                f"loaded; first failure: {report.failures[0][0]}: {report.failures[0][1]}"
            )
        self.data_shape = (n_surface, 3)
        logger.info(
            "shape-folder %s (%s): %d shapes%s, %d failed, %d sampled now", self.root, split, len(good),
            f" in {self.num_classes} classes" if self.num_classes else " (unconditional)",
            len(report.failures), report.computed,
        )  # fmt: skip

    # ---- finding the files ------------------------------------------------------------

    def _is_mesh(self, name: str) -> bool:
        return has_extension(name, self.extensions)

    def _meshes_under(self, folder: Path) -> list[str]:
        """Paths relative to ``folder`` of the mesh files under it (recursively), sorted."""
        return files_under(folder, self.extensions)

    def _class_layout(self, folder: Path, class_folders: bool | None) -> dict[str, list[str]] | None:
        """{class: files relative to folder} for a class-folder layout, None for a flat one."""
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        top = [e.name for e in entries if e.is_file() and self._is_mesh(e.name)]
        if class_folders is False or (class_folders is None and top):
            return None
        per_class = {e.name: self._meshes_under(Path(e.path)) for e in entries if e.is_dir()}
        per_class = {name: files for name, files in per_class.items() if files}
        if class_folders is None and len(per_class) < 2:
            return None
        if top:
            raise ValueError(
                f"shape-folder {str(folder)!r}: class_folders is true but the folder itself holds meshes "
                f"(e.g. {top[0]!r}); move them into a class folder or set class_folders: false"
            )
        return {name: [f"{name}/{f}" for f in files] for name, files in per_class.items()}

    def _scan(self, class_folders: bool | None) -> tuple[list[str], list[int], list[str]]:
        """(paths relative to root, labels (-1 when flat), class names) of this split."""
        split_dirs = {s: self.root / s for s in ("train", "test")}
        if all(d.is_dir() for d in split_dirs.values()):
            # explicit split folders: classes from both, so train and test labels agree
            layouts = {s: self._class_layout(d, class_folders) for s, d in split_dirs.items()}
            if (layouts["train"] is None) != (layouts["test"] is None):
                raise ValueError(
                    f"shape-folder {str(self.root)!r}: train/ and test/ have different layouts (one has class "
                    "folders, the other not); set class_folders explicitly"
                )
            chosen = ("train", "test") if self.split == "all" else (self.split,)
            if layouts["train"] is None:
                classes = []
                files = [f"{s}/{f}" for s in chosen for f in self._meshes_under(split_dirs[s])]
                labels = [-1] * len(files)
            else:
                classes = sorted(set(layouts["train"]) | set(layouts["test"]))
                pairs = [(f"{s}/{f}", i) for s in chosen for i, c in enumerate(classes) for f in layouts[s].get(c, [])]
                files, labels = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            layout = self._class_layout(self.root, class_folders)
            if layout is None:
                classes, files = [], self._meshes_under(self.root)
                labels = [-1] * len(files)
            else:
                classes = sorted(layout)
                files = [f for c in classes for f in layout[c]]
                labels = [i for i, c in enumerate(classes) for _ in layout[c]]
            if self.split != "all":
                keep = [held_out(f, self.test_fraction) == (self.split == "test") for f in files]
                files = [f for f, k in zip(files, keep) if k]
                labels = [y for y, k in zip(labels, keep) if k]
        if not files:
            raise FileNotFoundError(
                f"shape-folder {str(self.root)!r} holds no mesh files with extensions {', '.join(self.extensions)} "
                f"in split {self.split!r}; point data.root at a folder of meshes"
            )
        return files, labels, classes

    def _read_manifest(self) -> tuple[list[str], list[int], list[str], list[str] | None]:
        """(paths relative to the manifest's folder or absolute, labels (-1 when unlabelled), class names,
        captions or None) of this split of a manifest."""
        paths, labels, classes, captions = read_manifest(self.root, "shape-folder", "meshes")
        files = [Path(p).relative_to(self.folder).as_posix() if Path(p).is_relative_to(self.folder) else p
                 for p in paths]  # fmt: skip
        if self.split != "all":
            keep = [held_out(f, self.test_fraction) == (self.split == "test") for f in files]
            files = [f for f, k in zip(files, keep) if k]
            labels = [y for y, k in zip(labels, keep) if k]
            captions = [c for c, k in zip(captions, keep) if k] if captions is not None else None
        if not files:
            raise FileNotFoundError(
                f"shape-folder manifest {str(self.root)!r} lists no meshes in split {self.split!r} "
                f"(test_fraction {self.test_fraction}); list more meshes or use split 'all'"
            )
        return files, labels, classes, captions

    # ---- items --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.files)

    @property
    def captions(self) -> list[str] | None:
        """Every item's caption in item order, or None when the meshes have none."""
        return None if self._captions is None else list(self._captions)

    def path(self, index: int) -> Path:
        """The mesh file of item ``index``."""
        return self.folder / self.files[index]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def samples(self, index: int) -> dict[str, np.ndarray]:
        """The cached arrays of item ``index`` (``sample_points``' keys plus ``center``, ``scale``)."""
        try:
            return _read_samples(self._cache_files[index], self.settings)
        except Exception as e:
            raise OSError(f"cannot read the samples of {self.path(index)} ({self._cache_files[index]}): {e}") from e

    def __getitem__(self, index: int) -> dict[str, Tensor | int | str]:
        arrays = self.samples(index)
        points = np.concatenate([arrays["volume_points"], arrays["near_points"]])  # (n_query, 3)
        occ = np.concatenate([arrays["volume_occupancy"], arrays["near_occupancy"]]).astype(np.float32)
        if self.query_size is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            pick = rng.choice(len(points), size=self.query_size, replace=False)
            points, occ = points[pick], occ[pick]
        item: dict[str, Tensor | int | str] = {
            "x": torch.from_numpy(arrays["surface"]),  # what an autoencoder encodes (data_shape)
            "surface": torch.from_numpy(arrays["surface"]),
            "normals": torch.from_numpy(arrays["normals"]),
            "points": torch.from_numpy(np.ascontiguousarray(points)),
            "occupancy": torch.from_numpy(occ),
        }
        if self.uniform_points:  # a fixed uniform subset for volumetric IoU
            n = min(self.uniform_points, len(arrays["volume_points"]))
            item["volume_points"] = torch.from_numpy(np.ascontiguousarray(arrays["volume_points"][:n]))
            item["volume_occupancy"] = torch.from_numpy(arrays["volume_occupancy"][:n].astype(np.float32))
        if self.num_classes:
            item["y"] = int(self._labels[index])
        if self._captions is not None:
            item["caption"] = self._captions[index]
        return item

    def cache_key(self) -> dict:
        key = {"root": str(self.root.resolve()), "split": self.split, "num_files": len(self),
               "num_classes": self.num_classes, "samples": self.settings.to_dict(),
               "files": files_fingerprint(self.folder, self.files)}  # fmt: skip
        if self._captions is not None:
            key["captions"] = captions_fingerprint(self._captions)
        return key

    def __repr__(self) -> str:
        kind = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        return f"ShapeFolderDataset({str(self.root)!r}, split={self.split!r}, {len(self)} shapes, {kind})"


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
