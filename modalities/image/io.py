"""Writing image samples: a PNG grid and one PNG per sample for people, an ``.npz`` for the ADM evaluator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ditx.files import atomic_write
from ditx.writers import sample_stem


def images_to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, C, H, W) uint8 in [0, 255]: round((x + 1) * 127.5), clamped first.

    The one conversion every writer and the Inception metric use, so a saved file and an
    in-process metric see the same pixels.
    """
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 (C = 1 or 3)."""
    return images_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    b, h, w, c = images.shape
    cols = math.ceil(b / rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


def _save_png(array: np.ndarray, path: Path, upscale: int = 1) -> None:
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def write_image_samples(
    samples: Tensor,
    out_dir: str | Path,
    labels: Tensor | None = None,
    captions: list[str] | None = None,
    individual: bool = True,
) -> list[Path]:
    """Write ``grid.png`` (one row per class when labels are given, sorted by class) and
    ``{index:05d}[_class{y}][_{prompt slug}].png``. Small images are upscaled in the grid for viewing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = to_uint8(samples)
    written = []
    if labels is not None:
        order = torch.argsort(labels.cpu(), stable=True)
        classes = labels.unique()
        per_row = max(int((labels == c).sum()) for c in classes)
        rows_imgs = []
        for c in classes:  # pad each class row to the same length
            idx = order[labels.cpu()[order] == c].tolist()
            row = [arrays[i] for i in idx] + [np.full_like(arrays[0], 255)] * (per_row - len(idx))
            rows_imgs.extend(row)
        grid = make_grid(np.stack(rows_imgs), rows=len(classes))
    else:
        grid = make_grid(arrays, rows=max(1, int(math.sqrt(len(arrays)))))
    upscale = max(1, 256 // max(grid.shape[:2]))
    _save_png(grid, out / "grid.png", upscale=upscale)
    written.append(out / "grid.png")
    if individual:
        for i, img in enumerate(arrays):
            name = sample_stem(i, labels, captions, prefix="") + ".png"
            _save_png(img, out / name)
            written.append(out / name)
    return written


def write_adm_npz(samples: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
    """Write samples as the ADM evaluation suite reads them (openai/guided-diffusion ``evaluations/evaluator.py``).

    ``arr_0``: uint8 ``(N, H, W, 3)``, converted from ``samples`` ``(N, C, H, W)`` in [-1, 1]
    by ``images_to_uint8`` (grey images, C = 1, are repeated to RGB: the evaluator's
    Inception network takes 3 channels); ``arr_1``: int64 ``(N,)`` class labels, only when
    ``labels`` is given (the layout of ADM's own ``image_sample.py``). The file is written
    atomically: an interrupted write leaves any earlier ``path`` as it was. Returns ``path``.
    """
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"write_adm_npz expects samples (N, 1 or 3, H, W) in [-1, 1], got {tuple(samples.shape)}")
    arrays = {"arr_0": to_uint8(samples.expand(-1, 3, -1, -1) if samples.shape[1] == 1 else samples)}  # (N, H, W, 3)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (len(samples),):
            raise ValueError(f"labels must be ({len(samples)},) class indices, got shape {tuple(labels.shape)}")
        arrays["arr_1"] = labels.detach().cpu().numpy().astype(np.int64)
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    return path


def write_npz_samples(samples: Tensor, out_dir: str | Path, labels: Tensor | None = None) -> list[Path]:
    """Writer ``image-npz``: ``out_dir/samples.npz`` in the ADM evaluation-suite layout."""
    return [write_adm_npz(samples, Path(out_dir) / "samples.npz", labels)]
