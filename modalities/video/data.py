"""Video datasets: folders or manifests of clips decoded with decord (moving digits: ``moving_digits.py``).

Every clip goes through one pipeline (``clips.py``): pick ``num_frames`` frame indices
(``sample_clip_indices``), decode just those frames, resize the short side to ``size``
(antialiased bilinear) and cut the centre square. Moving digits are written as real MP4
files first, so the tiny recipe exercises exactly the path that UCF-101 takes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from ditx.modalities.video.clips import (
    SHORT_POLICIES,
    clip_span,
    num_clip_starts,
    probe_videos,
    read_frames,
    resize_center_crop,
    sample_clip_indices,
)
from torch import Tensor

from ditx.data import Dataset, deterministic_choice, has_extension, scan_class_folders
from ditx.files import ditx_cache_dir, files_fingerprint

logger = logging.getLogger("ditx.video")

VIDEO_EXTENSIONS = ("avi", "mp4", "mkv", "webm", "mov")
SPLITS = ("train", "test", "eval")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


# --------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------


def _manifest_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a ``.csv`` (header ``path,label[,caption]``) or ``.jsonl`` manifest."""
    rows = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [(name or "").strip() for name in reader.fieldnames or []]
            if "path" not in fields:
                raise ValueError(
                    f"video manifest {str(path)!r} needs a header row with a 'path' column (path,label[,caption]), "
                    f"got columns {fields}"
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
                    raise ValueError(f"video manifest {str(path)!r} line {line_num} is not JSON: {e}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"video manifest {str(path)!r} line {line_num} must be a JSON object, got {row!r}")
                rows.append((line_num, row))
    for line_num, row in rows:
        if not isinstance(row.get("path"), str) or not row["path"]:
            raise ValueError(f"video manifest {str(path)!r} line {line_num} has no 'path': {row!r}")
    return rows


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _manifest_labels(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> tuple[list[int], list[str]]:
    """Labels (-1 each when no row has one) and class names.

    Integer labels (JSON ints, or digit strings in every row) are class indices, with
    classes ``"0" .. str(max)``; names are mapped through their sorted unique set.
    """
    raw = [row.get("label") for _, row in rows]
    if all(_missing(v) for v in raw):
        return [-1] * len(rows), []
    for (line_num, _), v in zip(rows, raw):
        if _missing(v):
            raise ValueError(
                f"video manifest {str(path)!r} line {line_num} has no label while other lines do; "
                f"label every video or none (unconditional)"
            )
    if all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and re.fullmatch(r"-?\d+", v)
           for v in raw):  # fmt: skip
        labels = [int(v) for v in raw]
        bad = [(line_num, y) for (line_num, _), y in zip(rows, labels) if y < 0]
        if bad:
            raise ValueError(f"video manifest {str(path)!r} line {bad[0][0]}: label {bad[0][1]} is negative")
        return labels, [str(i) for i in range(max(labels) + 1)]
    not_names = [(line_num, v) for (line_num, _), v in zip(rows, raw) if not isinstance(v, str)]
    if not_names:
        raise ValueError(
            f"video manifest {str(path)!r} line {not_names[0][0]}: label {not_names[0][1]!r} is not a name while "
            f"other labels are; use class names everywhere or integer class indices everywhere"
        )
    classes = sorted(set(raw))
    to_idx = {c: i for i, c in enumerate(classes)}
    return [to_idx[v] for v in raw], classes


# --------------------------------------------------------------------------------------
# Folders and manifests of videos
# --------------------------------------------------------------------------------------


def _pack(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one byte buffer and end offsets: read by DataLoader workers without copy-on-write growth."""
    encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), np.cumsum([len(e) for e in encoded], dtype=np.int64)


def _unpack(buffer: np.ndarray, ends: np.ndarray, index: int) -> str:
    start = ends[index - 1] if index > 0 else 0
    return buffer[start : ends[index]].tobytes().decode("utf-8", "surrogateescape")


class VideoFolderDataset(Dataset):
    """Clips of ``num_frames`` frames from a folder or a manifest of videos, decoded with decord.

    Sources (``root``):

    - **class folders** (UCF-101 layout) ``root/<class>/**/*.avi``: labels are the sorted
      class-folder names (``classes``, ``class_to_idx``);
    - **flat** ``root/**/*.mp4``: unconditional (no ``"y"``, ``num_classes == 0``);
    - a **manifest** ``.csv`` (header ``path,label[,caption]``) or ``.jsonl``
      (``{"path": ..., "label": ..., "caption": ...}`` per line): paths relative to the
      manifest's folder or absolute; labels are class names (mapped through their sorted
      set) or integer class indices, or absent in every row (unconditional).

    ``class_folders=None`` picks the folder layout as ``ImageFolderDataset`` does (class
    folders when ``root`` holds no videos itself and at least two sub-folders do). Hidden
    files and folders are ignored; files are sorted.

    Items are ``{"x": (3, num_frames, size, size) float in [-1, 1], "y": label}`` (and
    ``"caption"`` when every manifest row has one). A clip is every ``frame_stride``-th
    frame from a start frame; ``split="train"`` draws the start with
    ``deterministic_choice(seed, epoch, index, n)``, the same in every worker, process
    and resumed run; ``"test"``/``"eval"`` take the centred clip. ``augment=False`` (the
    metrics' reference) turns ``flip`` off. Frames are resized so
    the short side is ``size`` (antialiased bilinear) and centre-cropped; with ``flip``
    the clip is mirrored when ``deterministic_choice(seed, epoch, ~index)`` says so
    (another key than the start's, so the two are independent). ``decode_size`` makes
    decord scale while decoding, to that short side, before the resize: faster on large
    videos.

    Videos shorter than the span ``(num_frames - 1) * frame_stride + 1`` follow
    ``short_policy`` (see ``sample_clip_indices``): ``loop`` or ``pad`` keeps them,
    ``skip`` leaves them out. Every video's length is read once at construction and
    cached under ``<cache_dir>/video-index`` (default ``$DITX_CACHE`` or
    ``~/.cache/ditx``) by path, size and mtime, so constructing again is instant. A file
    that cannot be opened then is logged and left out. ``stats`` counts all of it.

    ``image_frames: k`` is Latte's joint image-video training: each item gets ``k`` more
    frames, each a single frame of another video (video and frame fixed by (seed, epoch,
    index, k)), appended along time, so ``x`` is ``(3, num_frames + k, size, size)`` and
    ``item["num_images"] = k``; the backbone keeps them out of temporal attention (see
    ``DiT.forward``'s ``num_images``). Latent caches hold clips only.

    Readers are opened in ``__getitem__`` and released after each item (DataLoader
    workers work; decord's long-lived readers leak memory). A file that fails then
    raises ``OSError("cannot read video <path>: ...")``, which the trainer logs and
    skips within ``train.max_bad_samples``.
    """

    registered_name = "video-folder"  # in errors and logs

    def __init__(
        self,
        root: str,
        num_frames: int = 16,
        frame_stride: int = 1,
        size: int = 256,
        flip: bool = False,
        short_policy: Literal["skip", "loop", "pad"] = "loop",
        split: Literal["train", "test", "eval"] = "train",
        seed: int = 0,
        class_folders: bool | None = None,
        extensions: list[str] | tuple[str, ...] = VIDEO_EXTENSIONS,
        decode_size: int | None = None,
        cache_dir: str | None = None,
        image_frames: int = 0,
        augment: bool = True,
    ):
        name = self.registered_name
        for arg, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {arg} must be a positive integer, got {value!r}")
        if short_policy not in SHORT_POLICIES:
            raise ValueError(f"{name} short_policy must be one of {', '.join(SHORT_POLICIES)}, got {short_policy!r}")
        if split not in SPLITS:
            raise ValueError(f"{name} split must be one of {', '.join(SPLITS)}, got {split!r}")
        if decode_size is not None and (isinstance(decode_size, bool) or not isinstance(decode_size, int)
                                        or decode_size < size):  # fmt: skip
            raise ValueError(f"{name} decode_size must be null or an integer >= size ({size}), got {decode_size!r}")
        if isinstance(extensions, str):
            extensions = [extensions]
        exts = tuple(dict.fromkeys(str(e).lower().lstrip(".") for e in extensions if str(e).strip(".")))
        if not exts:
            raise ValueError(f"{name} extensions must name at least one file type, got {extensions!r}")
        self.root = Path(root).expanduser().absolute()  # absolute paths in errors, whatever the cwd
        self.num_frames, self.frame_stride, self.size = num_frames, frame_stride, size
        self.flip = flip and augment  # the metrics' reference (augment=False) is never flipped
        self.short_policy, self.split, self.seed, self.extensions = short_policy, split, seed, exts
        self.decode_size = decode_size
        if isinstance(image_frames, bool) or not isinstance(image_frames, int) or image_frames < 0:
            raise ValueError(f"video-folder image_frames must be an integer >= 0, got {image_frames!r}")
        self.image_frames = image_frames
        self.epoch = 0

        if self.root.is_file() and self.root.suffix.lower() in MANIFEST_SUFFIXES:
            paths, labels, self.classes, captions = self._read_manifest()
        elif self.root.is_dir():
            paths, labels, self.classes = self._scan(class_folders)
            captions = None
        else:
            kind = "a file that is not a manifest" if self.root.exists() else "missing"
            raise FileNotFoundError(
                f"{name} root {str(self.root)!r} is {kind}; set data.root to a folder of videos "
                f"or a manifest ({', '.join(MANIFEST_SUFFIXES)})"
            )

        # how long is each video: read once, through the on-disk index
        cache = Path(cache_dir).expanduser() if cache_dir is not None else ditx_cache_dir()
        infos = probe_videos(paths, cache, self.root)
        span = clip_span(num_frames, frame_stride)
        keep, unreadable, short, skipped = [], [], 0, 0
        for i, (path, info) in enumerate(zip(paths, infos)):
            if "error" in info:
                logger.warning("%s: leaving out an unreadable video: %s", name, info["error"])
                unreadable.append(path)
                continue
            if info["frames"] < span:
                short += 1
                if short_policy == "skip":
                    skipped += 1
                    continue
            keep.append(i)
        if not keep:
            raise ValueError(
                f"{self.registered_name} {str(self.root)!r}: none of its {len(paths)} videos is usable "
                f"({len(unreadable)} unreadable, {skipped} shorter than {span} frames with short_policy 'skip'); "
                f"check the files, or lower num_frames/frame_stride, or use short_policy 'loop'"
            )
        self._path_bytes, self._path_ends = _pack([paths[i] for i in keep])
        self._labels = np.array([labels[i] for i in keep], dtype=np.int64)
        self._frames = np.array([infos[i]["frames"] for i in keep], dtype=np.int64)
        self._hw = np.array([(infos[i]["height"], infos[i]["width"]) for i in keep], dtype=np.int64).reshape(-1, 2)
        self._captions = _pack([captions[i] for i in keep]) if captions is not None else None
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.sample_shape = (3, num_frames, size, size)  # what a trained model generates
        self.data_shape = (3, num_frames + self.image_frames, size, size)  # what training items hold
        self.stats = {"videos": len(keep), "unreadable": unreadable, "short": short, "skipped_short": skipped}
        done = {"skip": "skipped", "loop": "looped", "pad": "padded"}[short_policy]
        kept_short = f", {short} shorter than {span} frames ({done})" if short else ""
        logger.info(
            "%s %s: %d videos%s%s%s", name, self.root, len(keep),
            f" in {self.num_classes} classes" if self.num_classes else " (unconditional)",
            f", {len(unreadable)} unreadable (left out)" if unreadable else "", kept_short,
        )  # fmt: skip

    # ---- finding the files ------------------------------------------------------------

    def _is_video(self, name: str) -> bool:
        return has_extension(name, self.extensions)

    def _scan(self, class_folders: bool | None) -> tuple[list[str], list[int], list[str]]:
        """(absolute paths, labels (-1 when flat), class names) of a folder."""
        files, labels, classes = scan_class_folders(
            self.root, self.extensions, class_folders, self.registered_name, "videos", logger
        )
        return [str(self.root / f) for f in files], labels, classes

    def _read_manifest(self) -> tuple[list[str], list[int], list[str], list[str] | None]:
        """(absolute paths, labels (-1 when unlabelled), class names, captions or None) of a manifest."""
        rows = _manifest_rows(self.root)
        if not rows:
            raise FileNotFoundError(f"video manifest {str(self.root)!r} lists no videos")
        base = self.root.parent
        paths = [str(base / os.path.expanduser(row["path"])) for _, row in rows]  # an absolute path replaces base
        labels, classes = _manifest_labels(self.root, rows)
        raw = [row.get("caption") for _, row in rows]
        captions = None
        if all(isinstance(c, str) and c.strip() for c in raw):
            captions = [c.strip() for c in raw]
        elif any(not _missing(c) for c in raw):
            logger.warning("video manifest %s: some rows have no caption, so items carry none", self.root)
        return paths, labels, classes, captions

    # ---- items --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> str:
        """The file of item ``index``."""
        return _unpack(self._path_bytes, self._path_ends, range(len(self))[index])

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` per item (label -1 when unconditional), as torchvision's ``ImageFolder``."""
        return [(self.path(i), int(y)) for i, y in enumerate(self._labels)]

    def num_video_frames(self, index: int) -> int:
        """The length of item ``index``'s video, as read when the dataset was built."""
        return int(self._frames[index])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def clip_indices(self, index: int, start: int | Literal["center"] | None = None) -> list[int]:
        """The frame indices of item ``index``: ``start`` as in ``sample_clip_indices``; ``None`` = this
        split's choice (drawn from ``(seed, epoch, index)`` when training, centred otherwise)."""
        frames = self.num_video_frames(index)
        if start is None:
            if self.split == "train":
                n = num_clip_starts(frames, self.num_frames, self.frame_stride, self.short_policy)
                start = deterministic_choice(self.seed, self.epoch, index, n)
            else:
                start = "center"
        return sample_clip_indices(frames, self.num_frames, self.frame_stride, start, self.short_policy)

    def _decode_hw(self, index: int) -> tuple[int, int]:
        if self.decode_size is not None:
            h, w = (int(v) for v in self._hw[index])
            if min(h, w) > self.decode_size:  # only ever scale down while decoding
                scale = self.decode_size / min(h, w)
                return max(self.decode_size, round(h * scale)), max(self.decode_size, round(w * scale))
        return -1, -1

    def load(self, index: int, start: int | Literal["center"] | None = None) -> Tensor:
        """Item ``index``'s clip ``(3, num_frames, size, size)`` in [-1, 1], resized and cropped, not flipped."""
        index = range(len(self))[index]
        frames = read_frames(self.path(index), self.clip_indices(index, start), *self._decode_hw(index))
        return resize_center_crop(frames, self.size)

    def image_frames_for(self, index: int) -> list[tuple[int, int]]:
        """(video, frame) of each of item ``index``'s ``image_frames`` extra frames this epoch."""
        picks = []
        for k in range(self.image_frames):
            other = deterministic_choice(self.seed + 7919 * (k + 1), self.epoch, index, len(self))
            frame = deterministic_choice(self.seed + 104729 * (k + 1), self.epoch, index,
                                         max(1, self.num_video_frames(other)))  # fmt: skip
            picks.append((other, frame))
        return picks

    def load_images(self, index: int) -> Tensor:
        """(3, image_frames, size, size): single frames of other videos, processed like clips."""
        frames = [
            resize_center_crop(read_frames(self.path(j), [f], *self._decode_hw(j)), self.size)
            for j, f in self.image_frames_for(index)
        ]
        return torch.cat(frames, dim=1)

    def _item(self, index: int, x: Tensor, flip: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"x": x.flip(-1) if flip else x}
        if self.num_classes:
            item["y"] = int(self._labels[index])
        if self._captions is not None:
            item["caption"] = _unpack(*self._captions, index)
        return item

    def cache_variants(self, index: int) -> list[dict[str, Any]]:
        """What a latent cache stores per item: the centred clip, and its mirror when flipping is on.

        The temporal crop is frozen to the centre in a cache (only flips stay random), so
        training from a cache sees one clip per video.
        """
        if self.image_frames:
            raise ValueError(
                f"{type(self).__name__}: latent caches hold clips only; train joint image-video "
                f"(image_frames={self.image_frames}) from the videos, or set data.image_frames=0"
            )
        x = self.load(index, "center")
        variants = [self._item(index, x, False)]
        return variants + [self._item(index, x, True)] if self.flip else variants

    def cache_key(self) -> dict:
        # no split: a cache holds centred clips whatever the split (the crop it trains with is not cached)
        return {
            "root": str(self.root.resolve()), "num_files": len(self), "num_classes": self.num_classes,
            "size": self.size, "num_frames": self.num_frames, "frame_stride": self.frame_stride, "flip": self.flip,
            "short_policy": self.short_policy, "decode_size": self.decode_size,
            "crop": "short-side-bilinear-antialias-center", "temporal_crop": "center",
            "files": files_fingerprint(self.root, (self.path(i) for i in range(len(self)))),
        }  # fmt: skip

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]
        flip = self.flip and deterministic_choice(self.seed, self.epoch, ~index) == 1
        item = self._item(index, self.load(index), flip)
        if self.image_frames:
            item["x"] = torch.cat([item["x"], self.load_images(index)], dim=1)
            item["num_images"] = self.image_frames
        return item

    def __repr__(self) -> str:
        kind = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        return (
            f"{type(self).__name__}({str(self.root)!r}, {len(self)} videos, {kind}, num_frames={self.num_frames}, "
            f"frame_stride={self.frame_stride}, size={self.size}, flip={self.flip}, split={self.split!r})"
        )
