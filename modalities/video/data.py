"""Video datasets: folders or manifests of clips decoded with decord (moving digits: ``moving_digits.py``).

Every clip goes through one pipeline: pick ``num_frames`` frame indices
(``sample_clip_indices``), decode just those frames, resize the short side to ``size``
(antialiased bilinear) and cut the centre square. Moving digits are written as real MP4
files first, so the tiny recipe exercises exactly the path that UCF-101 takes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ditx.data import Dataset, deterministic_choice, has_extension, scan_class_folders
from ditx.files import atomic_write, ditx_cache_dir, files_fingerprint

logger = logging.getLogger("ditx.video")

VIDEO_EXTENSIONS = ("avi", "mp4", "mkv", "webm", "mov")
SHORT_POLICIES = ("skip", "loop", "pad")
SPLITS = ("train", "test", "eval")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
INDEX_FORMAT = "ditx-video-index"


# --------------------------------------------------------------------------------------
# Which frames make a clip
# --------------------------------------------------------------------------------------


def _check_clip_args(num_video_frames: int, num_frames: int, stride: int, policy: str) -> None:
    for name, value in (("num_video_frames", num_video_frames), ("num_frames", num_frames), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if policy not in SHORT_POLICIES:
        raise ValueError(f"short_policy must be one of {', '.join(SHORT_POLICIES)}, got {policy!r}")


def clip_span(num_frames: int, stride: int = 1) -> int:
    """Frames a clip covers in the video: ``(num_frames - 1) * stride + 1``."""
    return (num_frames - 1) * stride + 1


def num_clip_starts(num_video_frames: int, num_frames: int, stride: int = 1, policy: str = "loop") -> int:
    """How many clips a video of ``num_video_frames`` frames offers: one per start frame.

    A video at least one span long offers ``num_video_frames - span + 1`` starts. A
    shorter one offers a single clip from frame 0 under ``loop`` and ``pad``, and none
    under ``skip`` (0: the video is excluded).
    """
    _check_clip_args(num_video_frames, num_frames, stride, policy)
    spare = num_video_frames - clip_span(num_frames, stride)
    if spare >= 0:
        return spare + 1
    return 0 if policy == "skip" else 1


def sample_clip_indices(
    num_video_frames: int,
    num_frames: int,
    stride: int = 1,
    start: int | Literal["center"] = "center",
    policy: str = "loop",
) -> list[int]:
    """The ``num_frames`` frame indices of one clip, every ``stride``-th frame from a start.

    ``start`` is either an index into the ``num_clip_starts(...)`` possible starts
    (training draws it with ``deterministic_choice``) or ``"center"``: the clip in the
    middle of the video (evaluation; an odd leftover frame goes after the clip).

    A video shorter than the span ``(num_frames - 1) * stride + 1`` gives, by ``policy``:

    - ``loop``: the indices wrap around, ``(k * stride) % num_video_frames``;
    - ``pad``: the last frame repeats, ``min(k * stride, num_video_frames - 1)``;
    - ``skip``: no clip, a ``ValueError`` (datasets exclude such videos when scanning).
    """
    n = num_clip_starts(num_video_frames, num_frames, stride, policy)
    if n == 0:
        raise ValueError(
            f"a video of {num_video_frames} frames is shorter than a clip of {num_frames} frames every "
            f"{stride} ({clip_span(num_frames, stride)} frames) and short_policy is 'skip'; "
            f"use short_policy 'loop' or 'pad' to keep short videos"
        )
    if start == "center":
        first = (n - 1) // 2
    elif isinstance(start, (int, np.integer)) and not isinstance(start, bool) and 0 <= start < n:
        first = int(start)
    else:
        raise ValueError(f"start must be 'center' or an integer in [0, {n}) for this video, got {start!r}")
    steps = [first + k * stride for k in range(num_frames)]
    if steps[-1] < num_video_frames:
        return steps
    if policy == "loop":
        return [s % num_video_frames for s in steps]
    return [min(s, num_video_frames - 1) for s in steps]  # pad


# --------------------------------------------------------------------------------------
# Reading videos
# --------------------------------------------------------------------------------------


def _decord():
    try:
        import decord
    except ImportError as e:
        raise ImportError("video datasets decode with decord: pip install decord") from e
    return decord


def _reason(error: Exception) -> str:
    """The first line of a decord error, without its ``[time] /source/file.cc:61:`` prefix."""
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else repr(error)


def _unpad_rows(frames: np.ndarray) -> np.ndarray:
    """decord frames ``(..., H, W, C')`` -> ``(..., H, W, 3)``.

    For some widths decord 0.6 pads each RGB row (e.g. a 48-pixel row of 144 bytes to
    192) and reports the padded buffer as ``C' = 192 / 48 = 4`` channels; the first
    ``W * 3`` bytes of each row are the pixels.
    """
    if frames.shape[-1] == 3:
        return frames
    *lead, height, width, _ = frames.shape
    return np.ascontiguousarray(frames.reshape(*lead, height, -1)[..., : width * 3].reshape(*lead, height, width, 3))


def probe_video(path: str) -> dict[str, int]:
    """``{"frames", "height", "width"}`` of a video, opening it with decord and decoding its first frame.

    Raises ``OSError`` naming ``path`` when the file cannot be opened or decoded, or has no frames.
    """
    decord = _decord()
    reader = None
    try:
        reader = decord.VideoReader(path, num_threads=1)
        frames = len(reader)
        if frames < 1:
            raise ValueError("no frames")
        height, width = reader[0].shape[:2]  # decoding one frame also catches files that open but don't decode
    except Exception as e:  # decord raises DECORDError (a RuntimeError) and others
        raise OSError(f"cannot read video {path}: {_reason(e)}") from e
    finally:
        del reader  # decord frees the file and its decoder when the reader goes
    return {"frames": int(frames), "height": int(height), "width": int(width)}


def read_frames(path: str, indices: list[int], height: int = -1, width: int = -1) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of a video as uint8 ``(len(indices), H, W, 3)`` RGB.

    The reader is opened here and released before returning: decord's long-lived
    readers hold memory, and a reader must not cross a DataLoader fork. ``height`` and
    ``width`` (both or neither) make decord scale while decoding. Any failure is an
    ``OSError`` naming ``path``.
    """
    decord = _decord()
    wanted = sorted(set(indices))  # decode each frame once, in file order (no backward seeks)
    reader = None
    try:
        reader = decord.VideoReader(path, width=width, height=height, num_threads=1)
        try:
            decoded = _unpad_rows(reader.get_batch(wanted).asnumpy())  # (len(wanted), H, W, 3)
        except Exception:
            # decord 0.6's get_batch fails on some widths (8, 16, 24, 48, 72, ...) whose rows it pads;
            # frame by frame works there (see _unpad_rows)
            decoded = np.stack([_unpad_rows(reader[i].asnumpy()) for i in wanted])
    except Exception as e:
        raise OSError(f"cannot read video {path}: {_reason(e)}") from e
    finally:
        del reader
    position = {frame: i for i, frame in enumerate(wanted)}
    return decoded[[position[i] for i in indices]]


def resize_center_crop(frames: np.ndarray, size: int) -> Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(3, T, size, size)`` in [-1, 1].

    The short side is resized to ``size`` (bilinear with antialiasing, so downscaling
    does not alias; the long side rounded to the nearest pixel), then the centre
    ``size``×``size`` square is cut out. Frames already ``size`` on the short side are not resampled.
    The resize runs on the uint8 frames (torch's vectorised channels-last kernel: 19x faster
    than in float32 for 16 frames of 320×240 -> 256², and the same values to within one grey
    level, the precision of the frames themselves).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8, channels-last
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new = (size, max(size, round(w * scale))) if h <= w else (max(size, round(h * scale)), size)
        x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
        h, w = new
    top, left = (h - size) // 2, (w - size) // 2
    x = x[:, :, top : top + size, left : left + size]  # (T, 3, S, S)
    return (x.permute(1, 0, 2, 3).float() / 127.5 - 1.0).contiguous()  # (3, T, S, S) in [-1, 1]


# --------------------------------------------------------------------------------------
# The index of video lengths (read once, cached on disk)
# --------------------------------------------------------------------------------------


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _index_file(cache_dir: Path, source: Path) -> Path:
    digest = hashlib.blake2b(str(source).encode(), digest_size=8).hexdigest()
    return cache_dir / "video-index" / f"{source.name or 'root'}-{digest}.json"


def probe_videos(paths: list[str], cache_dir: Path | None, source: Path) -> list[dict[str, Any]]:
    """``probe_video`` of each path (``{"error": ...}`` instead for an unreadable one), through an on-disk cache.

    The cache ``<cache_dir>/video-index/<source>-<hash>.json`` maps each path to its
    facts, valid while the file's size and mtime are unchanged, so only new or changed
    files are opened. Opening runs in a thread pool when there are many files. A
    cache that cannot be read or written is ignored (with a warning).
    """
    index_path = _index_file(cache_dir, source) if cache_dir is not None else None
    cached: dict[str, Any] = {}
    if index_path is not None and index_path.is_file():
        try:
            data = json.loads(index_path.read_text())
            if data.get("format") == INDEX_FORMAT:
                cached = data["videos"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("video index %s is unreadable (%s); reading the videos again", index_path, e)
    stats = [_stat_key(p) for p in paths]
    results: list[dict[str, Any] | None] = []
    todo = []
    for i, (path, stat) in enumerate(zip(paths, stats)):
        entry = cached.get(path)
        if stat is None:
            results.append({"error": f"cannot read video {path}: no such file"})
        elif isinstance(entry, dict) and isinstance(entry.get("info"), dict) and [
            entry.get("bytes"), entry.get("mtime_ns")] == list(stat):  # fmt: skip
            results.append(entry["info"])
        else:
            results.append(None)
            todo.append(i)

    def probe(path: str) -> dict[str, Any]:
        try:
            return probe_video(path)
        except OSError as e:
            return {"error": str(e)}

    if todo:
        tic = time.perf_counter()
        if len(todo) >= 16:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                found = list(pool.map(probe, [paths[i] for i in todo]))
        else:
            found = [probe(paths[i]) for i in todo]
        for i, info in zip(todo, found):
            results[i] = info
        logger.info("read the length of %d videos in %.1f s", len(todo), time.perf_counter() - tic)
        if index_path is not None:
            videos = {p: {"bytes": s[0], "mtime_ns": s[1], "info": r} for p, s, r in zip(paths, stats, results) if s}
            try:
                with atomic_write(index_path) as tmp:
                    tmp.write_text(json.dumps({"format": INDEX_FORMAT, "source": str(source), "videos": videos}))
            except OSError as e:
                logger.warning("cannot write the video index %s (%s); lengths are read again next time", index_path, e)
    return results  # type: ignore[return-value]


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
