"""Video datasets: folders or manifests of clips decoded with decord (moving digits: ``moving_digits.py``).

Every clip goes through one pipeline (``clips.py``): pick ``num_frames`` frame indices
(``sample_clip_indices``), decode just those frames, resize the short side to ``size``
(antialiased bilinear) and cut the centre square. Moving digits are written as real MP4
files first, so the tiny recipe exercises exactly the path that UCF-101 takes.
"""

from __future__ import annotations

import hashlib
import logging
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
    resize_cover_crop,
    sample_clip_indices,
)
from torch import Tensor

from ditx.data import (
    MANIFEST_SUFFIXES,
    Bucket,
    Dataset,
    PackedStrings,
    all_or_no_captions,
    assign_buckets,
    captions_fingerprint,
    data_extensions,
    deterministic_choice,
    has_extension,
    is_manifest,
    parse_buckets,
    read_manifest,
    scan_class_folders,
    sidecar_captions,
)
from ditx.files import ditx_cache_dir, files_fingerprint

logger = logging.getLogger("ditx.video")

VIDEO_EXTENSIONS = ("avi", "mp4", "mkv", "webm", "mov")
SPLITS = ("train", "test", "eval")


# --------------------------------------------------------------------------------------
# Folders and manifests of videos
# --------------------------------------------------------------------------------------


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

    Captions: a manifest's ``caption`` column (or key), or in a folder a sidecar text file
    next to each video with its name (``clip_001.mp4`` -> ``clip_001.txt``, UTF-8). Every
    video has a non-empty caption, or none does; some without is a ValueError naming the
    first (see ``ditx.data.all_or_no_captions``). ``captions`` lists them in item order.

    ``class_folders=None`` picks the folder layout as ``ImageFolderDataset`` does (class
    folders when ``root`` holds no videos itself and at least two sub-folders do). Hidden
    files and folders are ignored; files are sorted.

    Items are ``{"x": (3, num_frames, size, size) float in [-1, 1], "y": label}`` (and
    ``"caption"``: a str, when the videos have captions). A clip is every ``frame_stride``-th
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

    ``buckets`` (the recipe's ``data.buckets``: ``[{size: [frames, height, width],
    batch_size: B, probability: p}, ...]``) trains on clips of many aspect ratios and
    lengths instead of one square: each video goes to a bucket by ``ditx.data.assign_buckets``
    (the nearest aspect ratio among the buckets it is long enough for, the longest first),
    its clips have that bucket's frames and are resized to cover its height×width with
    the aspect ratio kept and the centre cut out (the minimal crop; ``resize_cover_crop``).
    ``num_frames`` and ``size`` are then unused; ``data_shape`` is the first bucket's,
    ``item_buckets`` says each item's bucket, and ``stats["buckets"]`` counts them.

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
        buckets: list[dict[str, Any]] | None = None,
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
        exts = data_extensions(extensions, name)
        self.root = Path(root).expanduser().absolute()  # absolute paths in errors, whatever the cwd
        self.num_frames, self.frame_stride, self.size = num_frames, frame_stride, size
        self.flip = flip and augment  # the metrics' reference (augment=False) is never flipped
        self.short_policy, self.split, self.seed, self.extensions = short_policy, split, seed, exts
        self.decode_size = decode_size
        if isinstance(image_frames, bool) or not isinstance(image_frames, int) or image_frames < 0:
            raise ValueError(f"video-folder image_frames must be an integer >= 0, got {image_frames!r}")
        self.image_frames = image_frames
        self.epoch = 0
        self.buckets: list[Bucket] | None = None
        if buckets is not None:
            self.buckets = parse_buckets(buckets, ("frames", "height", "width"), f"{name} buckets")
            if image_frames:
                raise ValueError(f"{name}: buckets and image_frames={image_frames} do not go together (the extra "
                                 f"image frames have one size); set data.image_frames=0")  # fmt: skip

        if is_manifest(self.root):
            paths, labels, self.classes, captions = read_manifest(self.root, name, "videos")
        elif self.root.is_dir():
            paths, labels, self.classes = self._scan(class_folders)
            captions = all_or_no_captions(self.root, paths, sidecar_captions(paths), name, "videos")
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
        bucket_of = self._assign_buckets(infos)
        keep, unreadable, short, skipped, unbucketed = [], [], 0, 0, 0
        for i, (path, info) in enumerate(zip(paths, infos)):
            if "error" in info:
                logger.warning("%s: leaving out an unreadable video: %s", name, info["error"])
                unreadable.append(path)
                continue
            if bucket_of is not None:
                if bucket_of[i] < 0:
                    unbucketed += 1  # every bucket's keep draw refused it
                    continue
                span = clip_span(self.buckets[bucket_of[i]].size[0], frame_stride)
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
        self._paths = PackedStrings(paths[i] for i in keep)
        self._labels = np.array([labels[i] for i in keep], dtype=np.int64)
        self._frames = np.array([infos[i]["frames"] for i in keep], dtype=np.int64)
        self._hw = np.array([(infos[i]["height"], infos[i]["width"]) for i in keep], dtype=np.int64).reshape(-1, 2)
        self._captions = PackedStrings(captions[i] for i in keep) if captions is not None else None
        self.item_buckets = None if bucket_of is None else bucket_of[keep]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.sample_shape = (3, num_frames, size, size)  # what a trained model generates
        self.data_shape = (3, num_frames + self.image_frames, size, size)  # what training items hold
        self.stats = {"videos": len(keep), "unreadable": unreadable, "short": short, "skipped_short": skipped}
        if self.buckets is not None:
            self.sample_shape = self.data_shape = (3, *self.buckets[0].size)
            counts = np.bincount(self.item_buckets, minlength=len(self.buckets))
            self.stats["buckets"] = {b.name: int(c) for b, c in zip(self.buckets, counts)}
            self.stats["left_out_by_bucket_probability"] = unbucketed
            logger.info("%s %s: videos per bucket %s", name, self.root, self.stats["buckets"])
        done = {"skip": "skipped", "loop": "looped", "pad": "padded"}[short_policy]
        kept_short = f", {short} shorter than {span} frames ({done})" if short else ""
        logger.info(
            "%s %s: %d videos%s%s%s", name, self.root, len(keep),
            f" in {self.num_classes} classes" if self.num_classes else " (unconditional)",
            f", {len(unreadable)} unreadable (left out)" if unreadable else "", kept_short,
        )  # fmt: skip

    def _assign_buckets(self, infos: list[dict[str, Any]]) -> np.ndarray | None:
        """Each video's bucket (-1: left out by the keep draws; unreadable ones get -1 too), or None without buckets."""
        if self.buckets is None:
            return None
        natives = [(i["frames"], i["height"], i["width"]) if "error" not in i else (1, 1, 1) for i in infos]
        stride = self.frame_stride
        return assign_buckets(natives, self.buckets, self.seed, lambda n, t: n >= clip_span(t, stride))

    def clip_size(self, index: int) -> tuple[int, int, int]:
        """(frames, height, width) of item ``index``'s clips: its bucket's, else num_frames x size x size."""
        if self.buckets is None:
            return self.num_frames, self.size, self.size
        return self.buckets[int(self.item_buckets[index])].size

    # ---- finding the files ------------------------------------------------------------

    def _is_video(self, name: str) -> bool:
        return has_extension(name, self.extensions)

    def _scan(self, class_folders: bool | None) -> tuple[list[str], list[int], list[str]]:
        """(absolute paths, labels (-1 when flat), class names) of a folder."""
        files, labels, classes = scan_class_folders(
            self.root, self.extensions, class_folders, self.registered_name, "videos", logger
        )
        return [str(self.root / f) for f in files], labels, classes

    # ---- items --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> str:
        """The file of item ``index``."""
        return self._paths[index]

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` per item (label -1 when unconditional), as torchvision's ``ImageFolder``."""
        return [(self.path(i), int(y)) for i, y in enumerate(self._labels)]

    @property
    def captions(self) -> list[str] | None:
        """Every item's caption in item order, or None when the videos have none."""
        return None if self._captions is None else list(self._captions)

    def num_video_frames(self, index: int) -> int:
        """The length of item ``index``'s video, as read when the dataset was built."""
        return int(self._frames[index])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def clip_indices(self, index: int, start: int | Literal["center"] | None = None) -> list[int]:
        """The frame indices of item ``index``: ``start`` as in ``sample_clip_indices``; ``None`` = this
        split's choice (drawn from ``(seed, epoch, index)`` when training, centred otherwise)."""
        frames, num_frames = self.num_video_frames(index), self.clip_size(index)[0]
        if start is None:
            if self.split == "train":
                n = num_clip_starts(frames, num_frames, self.frame_stride, self.short_policy)
                start = deterministic_choice(self.seed, self.epoch, index, n)
            else:
                start = "center"
        return sample_clip_indices(frames, num_frames, self.frame_stride, start, self.short_policy)

    def _decode_hw(self, index: int) -> tuple[int, int]:
        if self.decode_size is not None and self.buckets is None:
            h, w = (int(v) for v in self._hw[index])
            if min(h, w) > self.decode_size:  # only ever scale down while decoding
                scale = self.decode_size / min(h, w)
                return max(self.decode_size, round(h * scale)), max(self.decode_size, round(w * scale))
        return -1, -1

    def load(self, index: int, start: int | Literal["center"] | None = None) -> Tensor:
        """Item ``index``'s clip ``(3, num_frames, size, size)`` (with buckets, ``(3, *bucket size)``) in [-1, 1],
        resized and cropped, not flipped."""
        index = range(len(self))[index]
        frames = read_frames(self.path(index), self.clip_indices(index, start), *self._decode_hw(index))
        if self.buckets is not None:
            return resize_cover_crop(frames, *self.clip_size(index)[1:])
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
            item["caption"] = self._captions[index]
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
        key = {
            "root": str(self.root.resolve()), "num_files": len(self), "num_classes": self.num_classes,
            "size": self.size, "num_frames": self.num_frames, "frame_stride": self.frame_stride, "flip": self.flip,
            "short_policy": self.short_policy, "decode_size": self.decode_size,
            "crop": "short-side-bilinear-antialias-center", "temporal_crop": "center",
            "files": files_fingerprint(self.root, (self.path(i) for i in range(len(self)))),
        }  # fmt: skip
        if self._captions is not None:
            key["captions"] = captions_fingerprint(self._captions)
        if self.buckets is not None:  # the seed fixes which bucket each video lands in
            key.update(
                buckets=[b.to_dict() for b in self.buckets],
                seed=self.seed,
                crop="cover-bilinear-antialias-center",
                item_buckets=hashlib.sha256(self.item_buckets.astype("<i8").tobytes()).hexdigest(),
            )
        return key

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
