"""The dataset contract, and data plumbing shared by every modality: deterministic global
batches, bad-sample tolerance, and augmentation choices that depend only on (seed, epoch, index)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler, default_collate

SPLITS = ("train", "test")


class Dataset(TorchDataset):
    """The dataset contract: what the core asks of a recipe's data, and nothing more.

    A dataset registered in ``ditx.registry.datasets`` is a subclass of this class. Its
    factory is called with the recipe's ``data`` arguments and three more, always:

    - ``split``: the recipe's ``data.split``, default ``"train"``; ``"test"`` for the
      metrics' reference: held-out items when the dataset has them, else its items. A
      dataset may accept more splits (e.g. ``"all"``).
    - ``seed``: the recipe's ``train.seed``, for augmentation drawn from
      ``(seed, epoch, index)`` (see :func:`deterministic_choice`), unless the recipe's
      ``data`` section sets its own.
    - ``augment``: False for the metrics' reference, whose items must not change at
      random (no flips); True otherwise, where the recipe's settings decide.

    Items are dicts: ``"x"`` (a tensor of ``data_shape``), ``"y"`` (an int class label,
    present in every item when ``num_classes > 0``, absent otherwise), and any other
    tensors the autoencoder's ``training_loss`` reads (e.g. an occupancy autoencoder's
    query points). What the core reads and calls:

    - ``data_shape``: the shape of every item's ``"x"`` (channels first), set in ``__init__``;
    - ``num_classes``: the number of classes, 0 for unconditional data;
    - ``split``: the split the dataset was built for (recorded in evaluation protocols);
    - ``sample_shape``: what a trained model generates, when items hold more than one
      sample (e.g. a clip and extra image frames for joint training); None means ``data_shape``;
    - ``set_epoch(epoch)``: called before each epoch, for per-epoch augmentation;
    - ``cache_key()``: a JSON-able description of what the items depend on beyond the
      recipe's arguments (for folders: each file's path, size and time), part of a latent
      cache's identity;
    - ``cache_variants(index)``: the items a latent cache stores for ``index``, e.g. an
      image and its mirror when random flips are on (training then picks one per epoch).

    The defaults below suit a dataset without classes, augmentation or files.
    """

    data_shape: tuple[int, ...]
    num_classes: int = 0
    split: str = "train"
    sample_shape: tuple[int, ...] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch; nothing to do without per-epoch augmentation."""

    def cache_key(self) -> dict[str, Any]:
        """What the items depend on beyond the recipe's data arguments (JSON-able)."""
        return {}

    def cache_variants(self, index: int) -> list[dict[str, Any]]:
        """The items a latent cache stores for ``index``; training picks one per epoch."""
        return [self[index]]

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define __len__")


def deterministic_choice(seed: int, epoch: int, index: int, n: int = 2) -> int:
    """A choice in ``range(n)`` fixed by (seed, epoch, index): the same in every worker,
    process and resumed run, so augmentation (e.g. a flip) never depends on RNG state."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's slice of each global micro-batch of one seeded epoch permutation.

    Global micro-batch ``k`` is ``perm[k*G:(k+1)*G]`` with ``G = local * world``;
    process ``r`` takes ``[r*local:(r+1)*local]`` of it. Incomplete batches are dropped.
    ``start`` skips micro-batches already trained on (resume).
    """

    def __init__(self, n: int, local_batch: int, rank: int, world: int, seed: int, epoch: int, start: int = 0):
        self.n, self.local, self.rank, self.world = n, local_batch, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def batches_per_epoch(self) -> int:
        return self.n // (self.local * self.world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        size = self.local * self.world
        for k in range(self.start, self.batches_per_epoch()):
            first = k * size + self.rank * self.local
            yield perm[first : first + self.local]


class SkipBadSamples(TorchDataset):
    """Wraps a dataset so that an item that raises becomes an error record (path and reason)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except Exception as e:  # reported by the trainer against the budget
            return {"__error__": f"item {index}: {e}"}


def collate_skipping_errors(items: list[dict]) -> dict[str, Any]:
    good = [it for it in items if "__error__" not in it]
    batch = default_collate(good) if good else {}
    batch["errors"] = [it["__error__"] for it in items if "__error__" in it]
    return batch


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one optimizer step's noise, timesteps and label dropout (global batch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 17) % (2**63))


# --------------------------------------------------------------------------------------
# Folders of data files (images, clips, meshes): one way to find them and their classes
# --------------------------------------------------------------------------------------


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    """A visible file name ending in one of ``extensions`` (lower case, without dots)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower().lstrip(".") in extensions


def files_under(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Paths relative to ``folder`` of the files under it with ``extensions`` (recursively,
    following links once, hidden files and folders skipped), sorted."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / f).as_posix() for f in filenames if has_extension(f, extensions)]
    return sorted(found)


def scan_class_folders(
    root: Path, extensions: tuple[str, ...], class_folders: bool | None, dataset: str, noun: str, logger=None
) -> tuple[list[str], list[int], list[str]]:
    """(paths relative to ``root``, labels (-1 when flat), class names) of a data folder.

    Class folders (``root/<class>/**/file``, labels by sorted folder name) when
    ``class_folders`` is true, or when it is None, ``root`` holds no data files itself and
    at least two sub-folders do; a flat, unlabelled folder otherwise. ``dataset`` and
    ``noun`` (e.g. "image-folder", "images") name things in the errors.
    """
    with os.scandir(root) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    top = [e.name for e in entries if e.is_file() and has_extension(e.name, extensions)]
    subdirs = [Path(e.path) for e in entries if e.is_dir()]
    if class_folders is None and top:
        class_folders = False
    per_class = {d.name: files_under(d, extensions) for d in subdirs} if class_folders is not False else {}
    per_class = {name: files for name, files in per_class.items() if files}
    if class_folders is None:
        class_folders = len(per_class) >= 2
    if class_folders:
        if top:
            raise ValueError(
                f"{dataset} {str(root)!r}: class_folders is true but the root itself holds {noun} "
                f"(e.g. {top[0]!r}); move them into a class folder or set class_folders: false"
            )
        empty = [d.name for d in subdirs if d.name not in per_class]
        if empty and logger is not None:
            logger.warning("%s %s: sub-folders without %s are not classes: %s", dataset, root, noun, empty)
        classes = sorted(per_class)
        files = [f"{c}/{f}" for c in classes for f in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
    else:
        classes, files = [], files_under(root, extensions)
        labels = [-1] * len(files)
    if not files:
        raise FileNotFoundError(
            f"{dataset} {str(root)!r} holds no {noun} with extensions {', '.join(extensions)} "
            f"(searched recursively{'' if class_folders is not True else ' in its class folders'}); "
            f"point data.root at a folder of {noun} or set data.extensions"
        )
    return files, labels, classes
