"""Moving digits, the tiny video recipe's data: scikit-learn's digits moving in clips
(horizontally, vertically, diagonally or in circles), rendered, written once as MP4 files in
a class-folder tree and read back through decord like any folder of clips."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from ditx.modalities.video.clips import clip_span
from ditx.modalities.video.data import VideoFolderDataset

from ditx.files import atomic_write, ditx_cache_dir

logger = logging.getLogger("ditx.video")


MOTIONS = ("horizontal", "vertical", "diagonal", "circle")
_SPLIT_STREAM = {"train": 0, "test": 1, "all": 2}

# ---------------------------------------------------------------------------------------
# Captions: which digit, and how it moves
# ---------------------------------------------------------------------------------------

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SUBJECTS = ("a {digit}", "the digit {digit}", "a {word}")
MOTION_PHRASES = {
    "horizontal": ("moving left and right", "sliding from side to side"),
    "vertical": ("moving up and down", "bouncing up and down"),
    "diagonal": ("moving diagonally", "sliding along a diagonal"),
    "circle": ("going round in a circle", "circling around"),
}
# (digit, motion) pairs the text recipe never trains on: every digit and motion is still seen
HELD_OUT_PAIRS = ("0 circle", "2 horizontal", "4 diagonal", "6 vertical", "8 circle", "9 horizontal")
CAPTION_WORDS = sorted(
    {w for s in SUBJECTS for w in s.split() if "{" not in w}
    | {w for phrases in MOTION_PHRASES.values() for p in phrases for w in p.split()}
    | set(NUMBER_WORDS) | {str(d) for d in range(10)}
)  # fmt: skip


def caption_for(digit: int, motion: str, rng: np.random.Generator) -> str:
    """A caption saying which digit moves and how: ``"a 7 moving left and right"``, ``"the
    digit 2 circling around"``, ``"a seven sliding from side to side"``, ... (phrasing drawn by ``rng``)."""
    subject = SUBJECTS[int(rng.integers(len(SUBJECTS)))].format(digit=digit, word=NUMBER_WORDS[digit])
    phrases = MOTION_PHRASES[motion]
    return f"{subject} {phrases[int(rng.integers(len(phrases)))]}"


def parse_caption(caption: str) -> tuple[int | None, str | None]:
    """(digit, motion) a caption asks for, or None for a part it does not name (the inverse of ``caption_for``)."""
    words = caption.lower().replace(",", " ").split()
    digits = {int(w) for w in words if w.isdigit() and len(w) == 1} | {NUMBER_WORDS.index(w) for w in words
                                                                        if w in NUMBER_WORDS}  # fmt: skip
    text = " ".join(words)
    motions = {m for m, phrases in MOTION_PHRASES.items() if any(p in text for p in phrases)}
    return (digits.pop() if len(digits) == 1 else None), (motions.pop() if len(motions) == 1 else None)


def parse_pairs(pairs: list[str] | tuple[str, ...]) -> set[tuple[int, str]]:
    """``["0 circle", ...]`` -> ``{(0, "circle"), ...}``, with an error naming a malformed entry."""
    out = set()
    for entry in pairs:
        parts = str(entry).split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) > 9 or parts[1] not in MOTIONS:
            raise ValueError(f"held-out pair {entry!r} must be '<digit 0-9> <motion>' with a motion of {MOTIONS}")
        out.add((int(parts[0]), parts[1]))
    return out


def _bounce(rng: np.random.Generator, num_frames: int, room: float) -> np.ndarray:
    """(T,) positions in [0, room] moving at constant speed and bouncing off the walls.

    The motion heads for the farther wall and travels 0.4 to 0.8 of ``room``, so the
    first-to-last displacement is at least 0.2 of ``room`` (at most one bounce).
    """
    start = rng.uniform(0, room)
    direction = 1.0 if start < room / 2 else -1.0
    travel = rng.uniform(0.4, 0.8) * room
    unfolded = start + direction * travel * np.linspace(0, 1, num_frames)
    folded = np.mod(unfolded, 2 * room)  # a triangle wave: reflect off 0 and room
    return np.where(folded > room, 2 * room - folded, folded)


def _trajectory(motion: str, rng: np.random.Generator, num_frames: int, room: tuple[float, float]) -> np.ndarray:
    """(T, 2) top-left corners (y, x) in [0, room_y] x [0, room_x] of a digit following ``motion``."""
    ry, rx = room
    if motion == "horizontal":
        return np.stack([np.full(num_frames, rng.uniform(0, ry)), _bounce(rng, num_frames, rx)], axis=1)
    if motion == "vertical":
        return np.stack([_bounce(rng, num_frames, ry), np.full(num_frames, rng.uniform(0, rx))], axis=1)
    if motion == "diagonal":
        return np.stack([_bounce(rng, num_frames, ry), _bounce(rng, num_frames, rx)], axis=1)
    # circle around the centre; a quarter to half a turn: the chord is at least 0.35 of the shorter room
    radius = rng.uniform(0.25, 0.45) * min(ry, rx)
    angle = rng.uniform(0, 2 * np.pi) + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * np.pi * np.linspace(
        0, 1, num_frames
    )
    return np.array([ry / 2, rx / 2]) + radius * np.stack([np.sin(angle), np.cos(angle)], axis=1)


def render_moving_digits(
    num_clips: int,
    num_frames: int = 8,
    size: int | tuple[int, int] = 32,
    digit_size: int = 14,
    split: str = "train",
    seed: int = 0,
    exclude: set[tuple[int, str]] | None = None,
    stream: int = 0,
    first_label: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Clips of one handwritten digit moving on a black canvas.

    Returns ``(clips, labels, motions)``: uint8 ``(N, T, H, W)`` grey clips (``size`` is
    ``H = W`` or ``(H, W)``), int64
    ``(N,)`` labels (the digit, 0-9, balanced to within one clip per class) and each
    clip's motion (``MOTIONS``: a horizontal, vertical or diagonal bounce, or an arc of a
    circle), drawn at random. The digits are scikit-learn's, from ``DigitsDataset``'s
    fixed stratified 80/20 ``split`` (so test clips show digits never seen in training),
    resized to ``digit_size``. Each clip moves its digit by at least 0.2 of the free room
    ``min(H, W) - digit_size`` between the first and last frame (3.6 pixels at the defaults;
    about 9 on average). The same arguments always give the same clips. ``exclude``:
    (digit, motion) pairs never drawn (a digit's motion is then drawn among the others).
    ``stream`` > 0 draws another set of clips from the same seed (a group of clips of
    another shape, see ``write_moving_digits``'s ``clip_shapes``); ``first_label`` starts the
    balanced cycle of labels at that digit (so small groups together still hold every digit).
    """
    from ditx.modalities.image.data import DigitsDataset
    from ditx.modalities.image.io import images_to_uint8

    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
        raise ValueError(f"moving-digits num_clips must be a positive integer, got {num_clips!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"moving-digits num_frames must be an integer >= 2 (a clip must move), got {num_frames!r}")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if not isinstance(digit_size, int) or digit_size < 8 or min(height, width) - digit_size < 10:
        raise ValueError(
            f"moving-digits needs digit_size >= 8 and at least 10 pixels of room (min(height, width) - digit_size "
            f">= 10), got size {size!r} and digit_size {digit_size!r}"
        )
    if split not in _SPLIT_STREAM:
        raise ValueError(f"moving-digits split must be one of {', '.join(_SPLIT_STREAM)}, got {split!r}")
    digits = DigitsDataset(size=digit_size, channels=1, split=split)
    pool = images_to_uint8(digits.images)[:, 0].numpy()  # (M, d, d) uint8, digit white on black
    pool_labels = digits.labels.numpy()
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]] + ([stream] if stream else []))
    labels = rng.permutation((np.arange(num_clips) + first_label) % 10).astype(np.int64)
    order = {c: rng.permutation(np.flatnonzero(pool_labels == c)) for c in range(10)}  # each class's images, cycled
    used = dict.fromkeys(range(10), 0)
    room = (height - digit_size, width - digit_size)
    clips = np.zeros((num_clips, num_frames, height, width), dtype=np.uint8)
    motions = []
    for i, label in enumerate(labels.tolist()):
        digit = pool[order[label][used[label] % len(order[label])]]
        used[label] += 1
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        if exclude and (label, motion) in exclude:  # redrawn among this digit's allowed motions
            allowed = [m for m in MOTIONS if (label, m) not in exclude]
            if not allowed:
                raise ValueError(f"moving-digits: every motion of digit {label} is excluded")
            motion = allowed[int(rng.integers(len(allowed)))]
        corners = np.clip(np.rint(_trajectory(motion, rng, num_frames, room)), 0, room).astype(int)  # (T, 2) y, x
        for t, (y, x) in enumerate(corners):
            clips[i, t, y : y + digit_size, x : x + digit_size] = digit
        motions.append(motion)
    return clips, labels, motions


def _settings_differ(marker: Path, settings: dict) -> str | None:
    """A sentence naming the settings in ``marker`` that differ from ``settings``, or None."""
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return f"its marker {marker.name} is unreadable ({e})"
    if found == settings:
        return None
    keys = sorted(set(found) | set(settings)) if isinstance(found, dict) else sorted(settings)
    diff = [f"{k}: {found.get(k) if isinstance(found, dict) else found!r} (asked {settings.get(k)!r})"
            for k in keys if not isinstance(found, dict) or found.get(k) != settings.get(k)]  # fmt: skip
    return "it was generated with " + "; ".join(diff)


def _check_clip_shapes(clip_shapes) -> list[tuple[int, int, int]] | None:
    if clip_shapes is None:
        return None
    ok = isinstance(clip_shapes, (list, tuple)) and len(clip_shapes) > 0
    shapes = []
    for shape in clip_shapes if ok else ():
        if (not isinstance(shape, (list, tuple)) or len(shape) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape)):  # fmt: skip
            ok = False
            break
        shapes.append(tuple(shape))
    if not ok or any(s[0] < 2 for s in shapes):
        raise ValueError(f"moving-digits clip_shapes must be a non-empty list of [frames >= 2, height, width], "
                         f"got {clip_shapes!r}")  # fmt: skip
    return shapes


def _render_split(n, num_frames, size, digit_size, split, seed, exclude, shapes):
    """A split's clips (a list when of many shapes), labels and motions; see ``write_moving_digits``."""
    if shapes is None:
        return render_moving_digits(n, num_frames, size, digit_size, split, seed, exclude=exclude)
    clips: list[np.ndarray] = [None] * n  # type: ignore[list-item]
    labels, motions = np.zeros(n, dtype=np.int64), [""] * n
    done = 0  # clips of the earlier groups: each group's labels continue the cycle, so all of them hold every digit
    for g, (frames, height, width) in enumerate(shapes):
        members = list(range(g, n, len(shapes)))
        if not members:
            continue
        group = render_moving_digits(len(members), frames, (height, width), digit_size, split, seed,
                                     exclude=exclude, stream=g + 1, first_label=done % 10)  # fmt: skip
        done += len(members)
        for k, i in enumerate(members):
            clips[i], labels[i], motions[i] = group[0][k], group[1][k], group[2][k]
    return clips, labels, motions


def write_moving_digits(
    root: str | Path,
    num_clips_per_split: dict[str, int] | None = None,
    num_frames: int = 8,
    size: int = 32,
    fps: float = 8,
    seed: int = 0,
    digit_size: int | None = None,
    captions: bool = False,
    held_out: list[str] | tuple[str, ...] = (),
    clip_shapes: list[list[int]] | None = None,
) -> Path:
    """Write moving digits as MP4 files, ``root/<split>/<digit>/clip_<index:05d>.mp4``; returns ``root``.

    ``num_clips_per_split`` defaults to ``{"train": 1500, "test": 300}``; ``digit_size``
    to 7/16 of ``size`` (14 at 32). Clips come from ``render_moving_digits``. Files that
    already exist are kept, and ``root/.complete`` (the settings, JSON) is written last:
    an interrupted run resumes where it stopped, a finished one returns at once. A
    folder made with other settings is a ``ValueError`` naming it (delete it or choose
    another ``root``).

    With ``captions``, each clip gets a caption beside it (``clip_<index>.txt``, see
    ``caption_for``), and the train split leaves out the ``held_out`` (digit, motion) pairs
    (``"0 circle"``, ...); the test split has every pair.

    ``clip_shapes`` (``[[frames, height, width], ...]``) writes clips of many shapes, as a
    folder of real videos has: clip ``i`` of a split has shape ``clip_shapes[i % n]``, and
    each shape's group is drawn apart (``render_moving_digits``'s ``stream``), its digits
    balanced; ``num_frames`` and ``size`` are then unused and ``digit_size`` defaults to
    7/16 of the smallest side.
    """
    from ditx.modalities.video.io import write_video

    counts = dict(num_clips_per_split or {"train": 1500, "test": 300})
    shapes = _check_clip_shapes(clip_shapes)
    if digit_size is None:
        digit_size = (size if shapes is None else min(min(s[1:]) for s in shapes)) * 7 // 16
    settings = {
        "format": "ditx-moving-digits", "version": 1, "num_clips_per_split": dict(sorted(counts.items())),
        "num_frames": num_frames, "size": size, "digit_size": digit_size, "fps": fps, "seed": seed,
    }  # fmt: skip
    if captions:  # only then, so folders written without captions keep their settings
        settings.update(captions=True, held_out=sorted(f"{d} {m}" for d, m in parse_pairs(held_out)))
    if shapes is not None:  # only then, so folders of one shape keep their settings
        settings["clip_shapes"] = [list(s) for s in shapes]
    exclude = parse_pairs(held_out) if captions else set()
    root = Path(root).expanduser().absolute()
    complete, started = root / ".complete", root / ".generating"
    for marker in (complete, started):
        if marker.is_file():
            differs = _settings_differ(marker, settings)
            if differs is not None:
                raise ValueError(
                    f"moving-digits folder {str(root)!r} does not match the asked settings: {differs}; "
                    f"delete the folder or choose another root"
                )
            if marker is complete:
                return root
    with atomic_write(started) as tmp:  # so a resumed run with other settings is refused
        tmp.write_text(json.dumps(settings, indent=1))
    tic, written = time.perf_counter(), 0
    for split, n in sorted(counts.items()):
        clips, labels, motions = _render_split(n, num_frames, size, digit_size, split, seed,
                                               exclude if split == "train" else None, shapes)  # fmt: skip
        paths = [root / split / str(int(y)) / f"clip_{i:05d}.mp4" for i, y in enumerate(labels)]
        if captions:  # written before the clips: a clip on disk always has its caption
            rng = np.random.default_rng([seed, _SPLIT_STREAM[split], 7])
            for path, y, motion in zip(paths, labels.tolist(), motions):
                caption = caption_for(int(y), motion, rng)
                if not path.with_suffix(".txt").is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_write(path.with_suffix(".txt")) as tmp:
                        tmp.write_text(caption + "\n", encoding="utf-8")
        todo = [(path, clip) for path, clip in zip(paths, clips) if not path.exists()]
        if todo:
            logger.info("moving-digits: writing %d %s clips to %s", len(todo), split, root / split)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # x264 runs outside the GIL
            list(pool.map(lambda job: write_video(job[1], job[0], fps), todo))
        written += len(todo)
    with atomic_write(complete) as tmp:
        tmp.write_text(json.dumps(settings, indent=1))
    started.unlink(missing_ok=True)
    if written:
        logger.info("moving-digits: wrote %d clips in %.1f s", written, time.perf_counter() - tic)
    return root


class MovingDigitsDataset(VideoFolderDataset):
    """Moving handwritten digits (tiny video recipe): MP4 clips read through the video-folder pipeline.

    On first use the clips are rendered (``render_moving_digits``) and written to
    ``root`` (default ``$DITX_CACHE/moving-digits`` or ``~/.cache/ditx/moving-digits``)
    by ``write_moving_digits``: ``num_clips_train`` and ``num_clips_test`` clips of
    ``(num_frames - 1) * frame_stride + 1`` frames at ``size``×``size``, drawn with
    ``data_seed``. Then it is a ``VideoFolderDataset`` over ``root/<split>`` (10 classes:
    the digit). ``seed`` is the augmentation seed (flips, temporal crops; the recipe's
    ``train.seed``), apart from ``data_seed`` so the data on disk does not change with it.

    ``clip_shapes`` (``[[frames, height, width], ...]``) writes clips of those shapes in
    turn (``write_moving_digits``; default root ``moving-digits-mixed-<hash of the
    shapes>``), and ``buckets`` (``data.buckets``, see ``VideoFolderDataset``) trains on
    them at their own aspect ratios and lengths: the tiny bucketed recipe's data.
    """

    registered_name = "moving-digits"
    held_out_pairs: set[tuple[int, str]] = set()  # (digit, motion) pairs the train split never shows (text subclass)

    def __init__(
        self,
        root: str | None = None,
        split: Literal["train", "test"] = "train",
        num_frames: int = 8,
        size: int = 32,
        frame_stride: int = 1,
        flip: bool = False,
        seed: int = 0,
        num_clips_train: int = 1500,
        num_clips_test: int = 300,
        data_seed: int = 0,
        cache_dir: str | None = None,
        image_frames: int = 0,
        augment: bool = True,
        clip_shapes: list[list[int]] | None = None,
        buckets: list[dict] | None = None,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"moving-digits split must be 'train' or 'test', got {split!r}")
        for arg, value in (("num_clips_train", num_clips_train), ("num_clips_test", num_clips_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 10:
                raise ValueError(f"moving-digits {arg} must be an integer >= 10 (one clip per digit), got {value!r}")
        for arg, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"moving-digits {arg} must be a positive integer, got {value!r}")
        name = self.registered_name
        if clip_shapes is not None:  # its own folder: a folder of one shape stays as it is
            shapes = json.dumps([list(s) for s in clip_shapes])
            name = f"{name}-mixed-{hashlib.sha256(shapes.encode()).hexdigest()[:8]}"
        folder = Path(root).expanduser() if root is not None else ditx_cache_dir(name)
        self.data_settings = {
            "num_clips_per_split": {"train": num_clips_train, "test": num_clips_test},
            "num_frames": max(2, clip_span(num_frames, frame_stride)), "size": size, "seed": data_seed,
        }  # fmt: skip
        if clip_shapes is not None:
            self.data_settings["clip_shapes"] = clip_shapes
        self.data_settings.update(self._caption_settings())
        write_moving_digits(folder, **self.data_settings)
        super().__init__(
            str(folder / split), num_frames=num_frames, frame_stride=frame_stride, size=size, flip=flip,
            short_policy="loop", split=split, seed=seed, class_folders=True, extensions=("mp4",), cache_dir=cache_dir,
            image_frames=image_frames, augment=augment, buckets=buckets,
        )  # fmt: skip
        if self.classes != [str(d) for d in range(10)]:
            raise ValueError(
                f"moving-digits folder {str(self.root)!r} should hold the class folders 0 to 9, found {self.classes}; "
                f"delete {str(folder)!r} to write it again"
            )

    def _caption_settings(self) -> dict:
        """What ``write_moving_digits`` is given beyond the clips' settings (captions: the subclass)."""
        return {}

    def cache_key(self) -> dict:
        return {**super().cache_key(), "moving_digits": self.data_settings}


class MovingDigitsTextDataset(MovingDigitsDataset):
    """Moving digits with captions (the tiny text-to-video recipe's data).

    Every clip has a caption saying which digit moves and how (``caption_for``: three ways
    to name the digit, two phrasings per motion), in a ``.txt`` beside it, so items carry
    ``"caption"`` as any captioned folder's do. The train split never shows the
    ``held_out`` (digit, motion) pairs; the test split shows every pair, so evaluation
    can compare prompts seen in training with held-out ones (``held_out_pairs``).
    Written to ``root`` (default ``$DITX_CACHE/moving-digits-text``).
    """

    registered_name = "moving-digits-text"

    def __init__(
        self,
        root: str | None = None,
        split: Literal["train", "test"] = "train",
        num_frames: int = 8,
        size: int = 32,
        frame_stride: int = 1,
        flip: bool = False,
        seed: int = 0,
        num_clips_train: int = 1500,
        num_clips_test: int = 300,
        data_seed: int = 0,
        cache_dir: str | None = None,
        augment: bool = True,
        held_out: list[str] = list(HELD_OUT_PAIRS),  # noqa: B006 (never mutated; shown by `ditx recipes show`)
    ):
        self.held_out_pairs = parse_pairs(held_out)
        super().__init__(root, split, num_frames, size, frame_stride, flip, seed, num_clips_train, num_clips_test,
                         data_seed, cache_dir, 0, augment)  # fmt: skip

    def _caption_settings(self) -> dict:
        return {"captions": True, "held_out": sorted(f"{d} {m}" for d, m in self.held_out_pairs)}
