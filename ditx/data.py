"""The dataset contract, and data plumbing shared by every modality: deterministic global
batches, bad-sample tolerance, augmentation choices that depend only on (seed, epoch, index),
and the folders, manifests and captions of file datasets."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
    present in every item when ``num_classes > 0``, absent otherwise), ``"caption"`` (a
    str, present in every item when the dataset has captions, absent otherwise; a batch
    of them collates to a list of str), and any other tensors the autoencoder's
    ``training_loss`` reads (e.g. an occupancy autoencoder's query points). What the core
    reads and calls:

    - ``data_shape``: the shape of every item's ``"x"`` (channels first), set in ``__init__``;
    - ``num_classes``: the number of classes, 0 for unconditional data;
    - ``split``: the split the dataset was built for (recorded in evaluation protocols);
    - ``sample_shape``: what a trained model generates, when items hold more than one
      sample (e.g. a clip and extra image frames for joint training); None means ``data_shape``;
    - ``captions``: every item's caption in item order (``captions[i] == self[i]["caption"]``),
      or None when items carry none; a dataset with captions also puts a fingerprint of
      them in ``cache_key()`` (see :func:`captions_fingerprint`);
    - ``set_epoch(epoch)``: called before each epoch, for per-epoch augmentation;
    - ``cache_key()``: a JSON-able description of what the items depend on beyond the
      recipe's arguments (for folders: each file's path, size and time), part of a latent
      cache's identity;
    - ``cache_variants(index)``: the items a latent cache stores for ``index``, e.g. an
      image and its mirror when random flips are on (training then picks one per epoch);
    - ``buckets`` and ``item_buckets``: for data of many sizes (the recipe's ``data.buckets``,
      parsed by :func:`parse_buckets`), the list of :class:`Bucket` and each item's bucket
      (an index into it, see :func:`assign_buckets`); item ``i``'s ``"x"`` then has the shape
      ``(C, *buckets[item_buckets[i]].size)`` and ``data_shape`` is the first bucket's. None
      for data of one size: training batches them with :class:`BucketBatchSampler`, one
      bucket per optimizer step.

    The defaults below suit a dataset without classes, augmentation or files.
    """

    data_shape: tuple[int, ...]
    num_classes: int = 0
    split: str = "train"
    sample_shape: tuple[int, ...] | None = None
    captions: list[str] | None = None  # a class attribute here; file datasets make it a property
    buckets: list[Bucket] | None = None  # data of many sizes: the buckets, and each item's
    item_buckets: Sequence[int] | None = None

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

CAPTION_SUFFIX = ".txt"  # a data file's caption: name.txt next to name.png (never a data file itself)


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


def data_extensions(extensions: Iterable[str] | str, dataset: str) -> tuple[str, ...]:
    """``extensions`` as lower-case names without dots, duplicates dropped; never ``txt``, the caption sidecars'."""
    if isinstance(extensions, str):
        extensions = [extensions]
    exts = tuple(dict.fromkeys(str(e).lower().lstrip(".") for e in extensions if str(e).strip(".")))
    if not exts:
        raise ValueError(f"{dataset} extensions must name at least one file type, got {extensions!r}")
    if CAPTION_SUFFIX.lstrip(".") in exts:
        raise ValueError(
            f"{dataset} extensions must not include {CAPTION_SUFFIX.lstrip('.')!r}: {CAPTION_SUFFIX} files next to "
            f"data files are their captions, never data; got {list(extensions)!r}"
        )
    return exts


class PackedStrings(Sequence):
    """Strings as one byte buffer and end offsets, read as a sequence of str.

    DataLoader workers read it without the copy-on-write growth that a list of millions
    of Python strings causes (touching a str touches its reference count, which copies
    the page), and without fixed-width padding. File names that are not UTF-8 round-trip
    (``surrogateescape``, as ``os.fsencode``).
    """

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self))[index]  # negative indices; IndexError past the end
        start = self._ends[index - 1] if index > 0 else 0
        return self._bytes[start : self._ends[index]].tobytes().decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------
# Manifests: a list of files (and their labels and captions) instead of a folder
# --------------------------------------------------------------------------------------

MANIFEST_SUFFIXES = (".csv", ".jsonl")


def is_manifest(path: Path) -> bool:
    """Whether ``path`` is a manifest file (``.csv`` or ``.jsonl``) rather than a folder."""
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def manifest_rows(path: Path, dataset: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a ``.csv`` (header ``path,label[,caption]``) or ``.jsonl`` manifest.

    ``dataset`` (e.g. "video-folder") names the manifest in errors; every row must have a ``path``.
    """
    rows = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [(name or "").strip() for name in reader.fieldnames or []]
            if "path" not in fields:
                raise ValueError(
                    f"{dataset} manifest {str(path)!r} needs a header row with a 'path' column "
                    f"(path,label[,caption]), got columns {fields}"
                )
            reader.fieldnames = fields
            for row in reader:
                rows.append((reader.line_num, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}))
    else:
        with open(path, encoding="utf-8") as f:
            for line_num, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{dataset} manifest {str(path)!r} line {line_num} is not JSON: {e}") from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{dataset} manifest {str(path)!r} line {line_num} must be a JSON object, got {row!r}"
                    )
                rows.append((line_num, row))
    for line_num, row in rows:
        if not isinstance(row.get("path"), str) or not row["path"]:
            raise ValueError(f"{dataset} manifest {str(path)!r} line {line_num} has no 'path': {row!r}")
    return rows


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def manifest_labels(path: Path, rows: list[tuple[int, dict[str, Any]]], dataset: str) -> tuple[list[int], list[str]]:
    """Labels (-1 each when no row has one) and class names of a manifest's rows.

    Integer labels (JSON ints, or digit strings in every row) are class indices, with
    classes ``"0" .. str(max)``; names are mapped through their sorted unique set.
    """
    raw = [row.get("label") for _, row in rows]
    if all(_missing(v) for v in raw):
        return [-1] * len(rows), []
    for (line_num, _), v in zip(rows, raw):
        if _missing(v):
            raise ValueError(
                f"{dataset} manifest {str(path)!r} line {line_num} has no label while other lines do; "
                f"label every item or none (unconditional)"
            )
    if all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and re.fullmatch(r"-?\d+", v)
           for v in raw):  # fmt: skip
        labels = [int(v) for v in raw]
        bad = [(line_num, y) for (line_num, _), y in zip(rows, labels) if y < 0]
        if bad:
            raise ValueError(f"{dataset} manifest {str(path)!r} line {bad[0][0]}: label {bad[0][1]} is negative")
        return labels, [str(i) for i in range(max(labels) + 1)]
    not_names = [(line_num, v) for (line_num, _), v in zip(rows, raw) if not isinstance(v, str)]
    if not_names:
        raise ValueError(
            f"{dataset} manifest {str(path)!r} line {not_names[0][0]}: label {not_names[0][1]!r} is not a name while "
            f"other labels are; use class names everywhere or integer class indices everywhere"
        )
    classes = sorted(set(raw))
    to_idx = {c: i for i, c in enumerate(classes)}
    return [to_idx[v] for v in raw], classes


def read_manifest(path: Path, dataset: str, noun: str) -> tuple[list[str], list[int], list[str], list[str] | None]:
    """(absolute paths, labels (-1 when unlabelled), class names, captions or None) of a manifest.

    Paths are relative to the manifest's folder, or absolute; ``~`` expands. Captions are
    the ``caption`` column (or key), all or none (see :func:`all_or_no_captions`).
    ``dataset`` and ``noun`` (e.g. "video-folder", "videos") name things in the errors.
    """
    rows = manifest_rows(path, dataset)
    if not rows:
        raise FileNotFoundError(f"{dataset} manifest {str(path)!r} lists no {noun}")
    base = path.parent
    paths = [str(base / os.path.expanduser(row["path"])) for _, row in rows]  # an absolute path replaces base
    labels, classes = manifest_labels(path, rows, dataset)
    found = []
    for line_num, row in rows:
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{dataset} manifest {str(path)!r} line {line_num}: caption {caption!r} is not a string")
        found.append(None if _missing(caption) else caption.strip())
    return paths, labels, classes, all_or_no_captions(path, paths, found, dataset, noun)


# --------------------------------------------------------------------------------------
# Captions: a manifest's caption column, or a sidecar name.txt next to each data file
# --------------------------------------------------------------------------------------


def sidecar_captions(paths: Iterable[str | os.PathLike]) -> list[str | None]:
    """Each data file's caption: the text of the file with its stem and ``.txt`` next to it
    (``clip_001.mp4`` -> ``clip_001.txt``), UTF-8, stripped; None when there is none or it is empty.

    Each folder is listed once (no ``stat`` per file), so a folder without captions costs
    one directory listing.
    """
    listings: dict[Path, set[str]] = {}
    captions: list[str | None] = []
    for path in paths:
        path = Path(path)
        folder, name = path.parent, path.stem + CAPTION_SUFFIX
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            captions.append(None)
            continue
        try:
            text = (folder / name).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"caption file {str(folder / name)!r} is not UTF-8 text: {e}") from None
        captions.append(text or None)
    return captions


def all_or_no_captions(
    root: Path, paths: Sequence[str], captions: Sequence[str | None], dataset: str, noun: str
) -> list[str] | None:
    """``captions`` when every item has one, None when none has; a ValueError when some lack one.

    ``root`` is the folder or the manifest the items come from (a manifest's captions are
    its ``caption`` column, a folder's the sidecar ``.txt`` files); ``paths`` the items'
    files, for the error; ``dataset`` and ``noun`` name things in it.
    """
    lacking = [p for p, c in zip(paths, captions) if c is None]
    if not lacking:
        return list(captions)
    if len(lacking) == len(captions):
        return None
    have = len(captions) - len(lacking)
    if root.is_file():  # a manifest
        fix = (
            "fill the 'caption' column (or key) of every row (an empty caption counts as missing), "
            "or remove the captions to train without them"
        )
    else:
        example = Path(lacking[0]).with_suffix(CAPTION_SUFFIX).name
        fix = (
            f"add the missing captions (a non-empty UTF-8 {CAPTION_SUFFIX} file next to each file with the same "
            f"name, e.g. {example!r}), or remove the {CAPTION_SUFFIX} files to train without captions"
        )
    raise ValueError(
        f"{dataset} {str(root)!r}: {have} of {len(captions)} {noun} {'has' if have == 1 else 'have'} a caption, "
        f"{len(lacking)} {'has' if len(lacking) == 1 else 'have'} none (the first without one: {str(lacking[0])!r}); "
        f"every item needs a caption, or none does: {fix}"
    )


def captions_fingerprint(captions: Iterable[str]) -> str:
    """SHA-256 over ``captions`` in order: part of a captioned dataset's ``cache_key()``, so
    changing, adding or reordering a caption makes a latent cache holding them stale."""
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Buckets: batches of one size each, for data of many aspect ratios and lengths
# --------------------------------------------------------------------------------------


class Bucket:
    """One bucket of ``data.buckets``: items resized to ``size`` (the data axes without
    channels: ``[frames, height, width]`` for video, ``[height, width]`` for images), trained
    in global batches of ``batch_size`` (None: ``train.batch_size``); an item whose nearest
    bucket this is lands here with ``probability``, else it tries the next one (Open-Sora's
    keep probability)."""

    __slots__ = ("size", "batch_size", "probability")

    def __init__(self, size: Sequence[int], batch_size: int | None = None, probability: float = 1.0):
        self.size, self.batch_size, self.probability = tuple(int(s) for s in size), batch_size, float(probability)

    @property
    def name(self) -> str:
        """``"8x32x48"``: the bucket in metric keys, logs and file names."""
        return "x".join(map(str, self.size))

    @property
    def aspect(self) -> float:
        """log(width / height) of the last two axes."""
        return float(np.log(self.size[-1] / self.size[-2]))

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "batch_size": self.batch_size, "probability": self.probability}

    def __eq__(self, other) -> bool:
        return isinstance(other, Bucket) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Bucket({self.name}, batch_size={self.batch_size}, probability={self.probability})"


def parse_buckets(spec: Any, axes: Sequence[str], where: str = "data.buckets") -> list[Bucket]:
    """A recipe's ``data.buckets`` as :class:`Bucket` objects, checked.

    ``spec`` is a list of ``{size: [...], batch_size: B, probability: p}`` (``batch_size``
    and ``probability`` optional); ``axes`` names the size entries (e.g. ``("frames",
    "height", "width")``). Errors name the entry and what is allowed.
    """
    if isinstance(spec, Bucket):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"{where} must be a non-empty list of {{size: [{', '.join(axes)}], batch_size: B, "
                         f"probability: p}} entries, got {spec!r}")  # fmt: skip
    buckets = []
    for i, entry in enumerate(spec):
        if isinstance(entry, Bucket):
            entry = entry.to_dict()
        if not isinstance(entry, dict) or "size" not in entry:
            raise ValueError(f"{where}[{i}] must be a mapping with a 'size' of [{', '.join(axes)}], got {entry!r}")
        unknown = sorted(set(entry) - {"size", "batch_size", "probability"})
        if unknown:
            raise ValueError(f"{where}[{i}] has unknown keys {unknown}; allowed: size, batch_size, probability")
        size, batch, p = entry["size"], entry.get("batch_size"), entry.get("probability", 1.0)
        if (not isinstance(size, (list, tuple)) or len(size) != len(axes)
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):  # fmt: skip
            raise ValueError(f"{where}[{i}] size must be {len(axes)} positive integers [{', '.join(axes)}], "
                             f"got {size!r}")  # fmt: skip
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ValueError(f"{where}[{i}] batch_size must be a positive integer (or absent: train.batch_size), "
                             f"got {batch!r}")  # fmt: skip
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"{where}[{i}] probability must be in (0, 1], got {p!r}")
        bucket = Bucket(size, batch, p)
        if bucket.size in [b.size for b in buckets]:
            raise ValueError(f"{where}[{i}] repeats the size {list(size)}; each bucket needs its own size")
        buckets.append(bucket)
    return buckets


def _uniform(seed: int, index: int, bucket: int) -> float:
    """A number in [0, 1) fixed by (seed, index, bucket): the keep draw of an item in a bucket."""
    digest = hashlib.blake2b(f"bucket:{seed}:{index}:{bucket}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def assign_buckets(
    natives: Sequence[Sequence[int]], buckets: Sequence[Bucket], seed: int, length_fits=None
) -> np.ndarray:
    """Each item's bucket (an index into ``buckets``, -1 when none takes it).

    ``natives`` are the items' own sizes on the buckets' axes (e.g. a video's frames,
    height, width). An item goes to the buckets whose aspect ratio (the last two axes) is
    nearest its own; with a length axis first (video), only to those it is long enough for
    (``length_fits(native_length, bucket_length)``; every bucket when none is). Among those,
    the longest, then the largest, comes first, and the item stays in it with its
    ``probability`` (a draw fixed by ``(seed, index, bucket)``), else it tries the next;
    when every draw refuses it, the item is left out. Fixed by ``seed``, not by the epoch,
    so a latent cache holds each item once, in its bucket.
    """
    aspects = np.array([b.aspect for b in buckets])
    out = np.full(len(natives), -1, dtype=np.int64)
    for i, native in enumerate(natives):
        candidates = list(range(len(buckets)))
        if length_fits is not None:
            fitting = [b for b in candidates if length_fits(native[0], buckets[b].size[0])]
            # too short for every bucket: the shortest ones (then the nearest aspect ratio among
            # them), where the dataset's short policy applies
            shortest = min(buckets[b].size[0] for b in candidates)
            candidates = fitting or [b for b in candidates if buckets[b].size[0] == shortest]
        distance = np.abs(aspects[candidates] - np.log(native[-1] / native[-2]))
        nearest = [b for b, d in zip(candidates, distance) if d <= distance.min() + 1e-9]
        nearest.sort(key=lambda b: (-buckets[b].size[0], -int(np.prod(buckets[b].size))))
        for b in nearest:
            if buckets[b].probability >= 1 or _uniform(seed, i, b) < buckets[b].probability:
                out[i] = b
                break
    return out


class BucketBatchSampler(Sampler[list[int]]):
    """This process's slice of each global micro-batch, every optimizer step's batch from one bucket.

    Per epoch (one seeded generator): each bucket's items are permuted and cut into global
    batches of its ``batch_sizes[b]`` (incomplete ones dropped), then all the epoch's batches
    are put in a seeded order. Optimizer step ``k`` of the epoch is ``steps[k]``; its
    micro-batch ``j`` of ``grad_accum`` is the ``j``-th slice of ``batch_size / grad_accum``
    items, and process ``r`` of ``world`` takes its ``r``-th part, as ``GlobalBatchSampler``
    does. ``start`` skips micro-batches already trained on (resume).
    """

    def __init__(self, item_buckets: Sequence[int], batch_sizes: Sequence[int], grad_accum: int, rank: int,
                 world: int, seed: int, epoch: int, start: int = 0):  # fmt: skip
        for b, size in enumerate(batch_sizes):
            if size % (grad_accum * world):
                raise ValueError(f"bucket {b}'s batch_size {size} must be divisible by grad_accum ({grad_accum}) x "
                                 f"processes ({world}); it is the global batch per optimizer step")  # fmt: skip
        self.item_buckets = np.asarray(item_buckets, dtype=np.int64)
        self.batch_sizes, self.grad_accum = list(batch_sizes), grad_accum
        self.rank, self.world, self.seed, self.epoch, self.start = rank, world, seed, epoch, start
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        steps: list[tuple[int, list[int]]] = []
        for b, size in enumerate(self.batch_sizes):
            members = np.flatnonzero(self.item_buckets == b)
            perm = members[torch.randperm(len(members), generator=g).numpy()].tolist()
            steps += [(b, perm[k * size : (k + 1) * size]) for k in range(len(members) // size)]
        order = torch.randperm(len(steps), generator=g).tolist()
        self.steps = [steps[k] for k in order]

    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch (optimizer steps x ``grad_accum``)."""
        return len(self.steps) * self.grad_accum

    def bucket_of(self, micro: int) -> int:
        """The bucket of the epoch's micro-batch ``micro``."""
        return self.steps[micro // self.grad_accum][0]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self):
        for k in range(self.start, self.batches_per_epoch()):
            bucket, items = self.steps[k // self.grad_accum]
            micro = len(items) // self.grad_accum
            local = micro // self.world
            first = (k % self.grad_accum) * micro + self.rank * local
            yield items[first : first + local]


class BucketSubset(Dataset):
    """The items of a bucketed dataset that lie in ``bucket``, a dataset of one shape (e.g. a
    metric's reference per bucket); ``data_shape`` is that bucket's."""

    def __init__(self, dataset: Dataset, bucket: int):
        buckets = getattr(dataset, "buckets", None)
        if not buckets:
            raise ValueError(f"{type(dataset).__name__} has no buckets")
        self.dataset, self.bucket = dataset, bucket
        self.indices = np.flatnonzero(np.asarray(dataset.item_buckets) == bucket)
        self.data_shape = (dataset.data_shape[0], *buckets[bucket].size)
        self.num_classes, self.split = dataset.num_classes, dataset.split
        all_captions = dataset.captions
        self.captions = None if all_captions is None else [all_captions[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[int(self.indices[index])]
