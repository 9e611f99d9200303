"""Writing video samples: an MP4 (H.264) and a looping GIF per sample and for a grid of all of them;
reading the frames a user gives to condition on (an image or the start of a clip)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from ditx.modalities.image.io import images_to_uint8, make_grid
from PIL import Image
from torch import Tensor

from ditx.files import atomic_write
from ditx.writers import sample_stem

VIDEO_SUFFIXES = (".mp4", ".gif")


def _as_rgb_frames(frames: np.ndarray | Tensor) -> np.ndarray:
    """(T, H, W, 3), (T, H, W, 1) or (T, H, W) uint8 -> (T, H, W, 3) uint8, C-contiguous."""
    if isinstance(frames, Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(
            f"write_video expects uint8 frames in [0, 255], got dtype {frames.dtype}; "
            f"convert samples in [-1, 1] with videos_to_uint8 first"
        )
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or 0 in frames.shape:
        raise ValueError(
            f"write_video expects frames (T, H, W, 3), (T, H, W, 1) or (T, H, W) with T, H, W > 0, "
            f"got shape {frames.shape}"
        )
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames)


def _write_mp4(frames: np.ndarray, path: Path, fps: float, crf: int) -> None:
    try:
        import av
    except ImportError as e:
        raise ImportError("writing MP4 needs PyAV: pip install av (or write a .gif)") from e
    # yuv420p stores colour at half resolution, so H.264 needs even sizes: repeat the last row/column
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    _, h, w, _ = frames.shape
    # the temporary file has no .mp4 suffix, so name the container format explicitly
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    # GIF delays are in 1/100 s; PIL merges consecutive identical frames into one longer frame
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=max(10, round(1000 / fps)), loop=0
    )


def write_video(frames: np.ndarray | Tensor, path: str | Path, fps: float = 8, *, crf: int = 18) -> Path:
    """Write ``frames`` as a video file chosen by the suffix of ``path``; returns ``path``.

    ``frames``: uint8 ``(T, H, W, 3)`` RGB, or grey ``(T, H, W, 1)`` / ``(T, H, W)``
    (written as RGB). ``.mp4``: H.264 (``libx264``, ``yuv420p``, constant quality
    ``crf``: 0 lossless in luma, 18 visually lossless, 23 x264's default), played
    everywhere; an odd height or width is padded to even by repeating the last
    row/column, because yuv420p needs even sizes. ``.gif``: 256-colour frames that loop
    forever, ``1000 / fps`` ms each (GIF rounds to 10 ms; identical consecutive frames
    are merged into one longer frame).

    The file is written atomically (a temporary file in the same folder, renamed onto
    ``path``): a failure leaves no partial file and any earlier ``path`` as it was.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"write_video: unknown video type {path.suffix!r} of {str(path)!r}; use one of {', '.join(VIDEO_SUFFIXES)}"
        )
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"write_video: fps must be a positive number, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"write_video: crf must be an integer in [0, 51] (lower is better), got {crf!r}")
    frames = _as_rgb_frames(frames)
    with atomic_write(path) as tmp:
        if suffix == ".mp4":
            _write_mp4(frames, tmp, fps, crf)
        else:
            _write_gif(frames, tmp, fps)
    return path


def videos_to_uint8(videos: Tensor) -> np.ndarray:
    """(B, C, T, H, W) in [-1, 1] -> (B, T, H, W, C) uint8, rounded as ``images_to_uint8`` (C = 1 or 3)."""
    if videos.ndim != 5:
        raise ValueError(f"videos_to_uint8 expects videos (B, C, T, H, W) in [-1, 1], got shape {tuple(videos.shape)}")
    return images_to_uint8(videos).permute(0, 2, 3, 4, 1).cpu().numpy()


def make_video_grid(videos: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """(B, T, H, W, C) uint8 -> (T, H', W', C): frame ``t`` is ``make_grid`` of every clip's frame ``t``.

    Clip ``i`` sits at row ``i // cols``, column ``i % cols`` with ``cols = ceil(B / rows)``,
    on a white background with ``pad`` pixels between clips.
    """
    if videos.ndim != 5:
        raise ValueError(f"make_video_grid expects clips (B, T, H, W, C), got shape {videos.shape}")
    return np.stack([make_grid(videos[:, t], rows=rows, pad=pad) for t in range(videos.shape[1])])


def _upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """(T, H, W, C) -> (T, H * factor, W * factor, C), nearest neighbour."""
    return frames if factor <= 1 else frames.repeat(factor, axis=1).repeat(factor, axis=2)


def _auto_upscale(frames: np.ndarray, upscale: int | None, target: int = 256) -> int:
    return max(1, target // max(frames.shape[1:3])) if upscale is None else max(1, int(upscale))


def write_video_samples(
    samples: Tensor,
    out_dir: str | Path,
    labels: Tensor | None = None,
    captions: list[str] | None = None,
    individual: bool = True,
    fps: float = 8,
    upscale: int | None = None,
) -> list[Path]:
    """Write samples ``(B, C, T, H, W)`` in [-1, 1] for people; returns the paths written.

    - ``grid.mp4`` and ``grid.gif``: every clip tiled per frame, one row per class when
      ``labels`` are given (sorted by class; short rows padded with white), else about
      square.
    - with ``individual``: ``sample_{index:05d}[_class{y}][_{prompt slug}].mp4`` at the
      samples' own resolution, and the same name ``.gif``.

    The grid and the GIFs are upscaled by nearest neighbour (``upscale``; default: to
    about 256 pixels on the long side) so that tiny clips (e.g. 32×32) can be seen.
    """
    if samples.ndim != 5 or samples.shape[1] not in (1, 3) or len(samples) == 0:
        raise ValueError(
            f"write_video_samples expects samples (B >= 1, C = 1 or 3, T, H, W) in [-1, 1], got {tuple(samples.shape)}"
        )
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != (len(samples),):
            raise ValueError(f"labels must be ({len(samples)},) class indices, got shape {tuple(labels.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips = videos_to_uint8(samples)  # (B, T, H, W, C)
    if labels is not None:
        classes = labels.unique()  # sorted
        per_row = max(int((labels == c).sum()) for c in classes)
        blank = np.full_like(clips[0], 255)
        tiles = []
        for c in classes:  # pad each class row to the same length
            idx = torch.nonzero(labels == c).flatten().tolist()  # in sample order
            tiles += [clips[i] for i in idx] + [blank] * (per_row - len(idx))
        grid = make_video_grid(np.stack(tiles), rows=len(classes))
    else:
        grid = make_video_grid(clips, rows=max(1, int(math.sqrt(len(clips)))))
    grid = _upscale(grid, _auto_upscale(grid, upscale))
    written = [write_video(grid, out / "grid.mp4", fps), write_video(grid, out / "grid.gif", fps)]
    if individual:
        for i, clip in enumerate(clips):
            name = sample_stem(i, labels, captions)
            written.append(write_video(clip, out / f"{name}.mp4", fps))
            written.append(write_video(_upscale(clip, _auto_upscale(clip, upscale)), out / f"{name}.gif", fps))
    return written


# --------------------------------------------------------------------------------------
# Given frames (image-to-video, extension, interpolation)
# --------------------------------------------------------------------------------------


def read_given_frames(path: str | Path, num_frames: int, size: int | tuple[int, int]) -> Tensor:
    """(3, num_frames, height, width) in [-1, 1]: an image (one frame) or a clip's first ``num_frames``
    frames (decord), resized to cover ``size`` (an int: a square; else (height, width)) with the
    aspect ratio kept and centre-cropped, as training clips are."""
    from ditx.modalities.image.data import IMAGE_EXTENSIONS
    from ditx.modalities.video.clips import probe_video, read_frames, resize_cover_crop

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"given frames: {str(path)!r} is not a file (an image or a video)")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"the number of given frames must be a positive integer, got {num_frames!r}")
    if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
        if num_frames != 1:
            raise ValueError(f"{path} is an image: it gives 1 frame, {num_frames} were asked for")
        try:
            with Image.open(path) as image:
                frames = np.asarray(image.convert("RGB"))[None]  # (1, H, W, 3)
        except OSError as e:
            raise OSError(f"cannot read image {path}: {e}") from e
    else:
        length = probe_video(str(path))["frames"]
        if length < num_frames:
            raise ValueError(f"{path} has {length} frames, fewer than the {num_frames} to keep")
        frames = read_frames(str(path), list(range(num_frames)))
    height, width = (size, size) if isinstance(size, int) else size
    return resize_cover_crop(frames, height, width)
