"""Image datasets: scikit-learn's digits (tiny recipe) and folders of images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from ditx.data import (
    MANIFEST_SUFFIXES,
    SPLITS,
    Dataset,
    PackedStrings,
    all_or_no_captions,
    captions_fingerprint,
    data_extensions,
    deterministic_choice,
    has_extension,
    is_manifest,
    read_manifest,
    scan_class_folders,
    sidecar_captions,
)
from ditx.files import files_fingerprint

logger = logging.getLogger("ditx.image")


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1,797 8×8 grey images, 10 classes), upsampled.

    Items are ``{"x": (channels, size, size) in [-1, 1], "y": label}``. ``split``
    chooses a fixed, stratified 80/20 partition (``train``/``test``) or ``all``; ``flip``
    (random horizontal flips) applies unless ``augment`` is false (the metrics' reference).
    No download: the data ships inside scikit-learn.
    """

    num_classes = 10

    def __init__(self, size: int = 16, channels: int = 1, split: str = "train", flip: bool = False, seed: int = 0,
                 augment: bool = True):  # fmt: skip
        from sklearn.datasets import load_digits

        if split not in ("train", "test", "all"):
            raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
        if size < 8:
            raise ValueError(f"digits size must be at least 8 (the data is 8x8), got {size}")
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # (N, 8, 8) in [0, 1]
        labels = torch.from_numpy(digits.target.astype(np.int64))
        if split != "all":
            rng = np.random.default_rng(1234)  # fixed partition, independent of the training seed
            test = np.zeros(len(labels), dtype=bool)
            for c in range(10):
                idx = np.flatnonzero(digits.target == c)
                test[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
            keep = torch.from_numpy(test if split == "test" else ~test)
            images, labels = images[keep], labels[keep]
        x = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
        self.images = (x.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous()  # (N, C, S, S)
        self.labels = labels
        self.split = split
        self.flip = flip and augment  # the metrics' reference (augment=False) is never flipped
        self.seed = seed
        self.epoch = 0
        self.data_shape = tuple(self.images.shape[1:])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int, flip: bool = False) -> dict[str, Tensor | int]:
        x = self.images[index]
        return {"x": x.flip(-1) if flip else x, "y": int(self.labels[index])}

    def cache_variants(self, index: int) -> list[dict[str, Tensor | int]]:
        """What a latent cache stores per item: the image, and its mirror when flipping is on."""
        return [self.item(index), self.item(index, flip=True)] if self.flip else [self.item(index)]

    def cache_key(self) -> dict:
        return {"size": self.data_shape[-1], "channels": self.data_shape[0], "flip": self.flip}

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        return self.item(index, self.flip and deterministic_choice(self.seed, self.epoch, index) == 1)


# --------------------------------------------------------------------------------------
# Folders of images
# --------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


def center_crop_image(image: Image.Image, size: int) -> Image.Image:
    """ADM/DiT's center crop: a ``size``×``size`` crop of the centre of ``image``.

    While the short side is at least ``2 * size`` the image is halved with a box filter
    (cheap and alias-free), then resized with bicubic so the short side is exactly
    ``size``, and the centre square is cut out. Works for any aspect ratio; the result
    matches the preprocessing of guided-diffusion and DiT's ``train.py``.
    """
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    # round() so the short side lands on `size` exactly despite float error
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (grey, grey+alpha, RGBA, palette, CMYK, 16-bit grey) -> 8-bit RGB.

    Always returns a new image. Alpha is dropped (the colour under it is kept), as torchvision's ``ImageFolder`` does.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grey (e.g. scientific PNG/TIFF): scale to 8 bits instead of clipping at 255
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL asks for this before dropping a palette's transparency
    return image.convert("RGB")  # a new image (a copy when already RGB): safe after the file closes


class ImageFolderDataset(Dataset):
    """A folder (or a manifest) of images on disk, center-cropped to ``size``×``size`` (DiT/ADM preprocessing).

    Sources (``root``):

    - **class folders** (ImageNet style) ``root/<class>/**/*.jpg``: labels are the sorted
      class-folder names (``classes``, ``class_to_idx``); files are found recursively in
      each class folder.
    - **flat** ``root/**/*.png``: every image under ``root``, unconditional (no ``"y"``,
      ``num_classes == 0``).
    - a **manifest** ``.csv`` (header ``path,label[,caption]``) or ``.jsonl``
      (``{"path": ..., "label": ..., "caption": ...}`` per line): paths relative to the
      manifest's folder or absolute; labels are class names (mapped through their sorted
      set) or integer class indices, or absent in every row (unconditional).

    ``class_folders=None`` picks the folder layout: class folders when ``root`` holds no images
    itself and at least two sub-folders hold images; flat otherwise. Hidden files and
    folders (``.name``) are ignored; files are sorted, so the index of an image depends
    only on the folder's contents.

    Captions: a manifest's ``caption`` column (or key), or in a folder a sidecar text file
    next to each image with its name (``cat.png`` -> ``cat.txt``, UTF-8). Every image has a
    non-empty caption, or none does; some without is a ValueError naming the first (see
    ``ditx.data.all_or_no_captions``). ``captions`` lists them in item order.

    Items are ``{"x": (3, size, size) float in [-1, 1], "y": label}``, and ``"caption"`` (a
    str) when the images have captions. The horizontal
    flip of item ``i`` is decided by ``(seed, epoch, i)`` alone, so it is the same in every
    worker, process and resumed run. Images are opened in ``__getitem__`` (works with
    DataLoader workers); EXIF orientation is applied; grey, RGBA and palette images become
    RGB. A file that cannot be decoded raises ``OSError`` naming its path, which the
    trainer logs and skips within ``train.max_bad_samples``. The folder has no held-out
    part: ``split="test"`` (the metrics' reference) is the same images (never flipped there);
    evaluate against another folder with ``ditx eval RUN data.root=<held-out folder>``.
    """

    def __init__(
        self,
        root: str,
        size: int = 256,
        flip: bool = True,
        seed: int = 0,
        class_folders: bool | None = None,
        extensions: list[str] | tuple[str, ...] = IMAGE_EXTENSIONS,
        split: str = "train",
        augment: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"image-folder split must be one of {', '.join(SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image-folder size must be a positive integer, got {size!r}")
        exts = data_extensions(extensions, "image-folder")
        self.root = Path(root).expanduser().absolute()  # absolute paths in errors, whatever the cwd
        self.size, self.seed, self.extensions, self.split = size, seed, exts, split
        self.flip = flip and augment  # the metrics' reference (augment=False) is never flipped
        self.epoch = 0

        if is_manifest(self.root):
            self._folder = self.root.parent  # what relative paths are relative to
            paths, labels, self.classes, captions = read_manifest(self.root, "image-folder", "images")
            files = [str(Path(p).relative_to(self._folder)) if Path(p).is_relative_to(self._folder) else p
                     for p in paths]  # fmt: skip
        elif self.root.is_dir():
            self._folder = self.root
            files, labels, self.classes = self._scan(class_folders)
            captions = sidecar_captions(self.root / f for f in files)
            captions = all_or_no_captions(self.root, files, captions, "image-folder", "images")
        else:
            missing = "" if self.root.exists() else " (it does not exist)"
            raise FileNotFoundError(
                f"image-folder root {str(self.root)!r} is not a directory or a manifest "
                f"({', '.join(MANIFEST_SUFFIXES)}){missing}; set data.root=... to a folder of images or a manifest"
            )
        # Paths relative to the folder (absolute where a manifest says so) and captions, packed
        # into byte buffers, and labels as an array: DataLoader workers read them without the
        # copy-on-write growth that a list of 1.28M Python strings (ImageNet) causes.
        self._paths = PackedStrings(files)
        self._captions = PackedStrings(captions) if captions is not None else None
        self._labels = np.array(labels, dtype=np.int64)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.data_shape = (3, size, size)
        logger.info(
            "image-folder %s: %d images%s", self.root, len(files),
            f" in {self.num_classes} classes" if self.num_classes else " (unconditional)",
        )  # fmt: skip

    # ---- finding the files ------------------------------------------------------------

    def _is_image(self, name: str) -> bool:
        return has_extension(name, self.extensions)

    def _scan(self, class_folders: bool | None) -> tuple[list[str], list[int], list[str]]:
        """(paths relative to root, labels (-1 when flat), class names)."""
        return scan_class_folders(self.root, self.extensions, class_folders, "image-folder", "images", logger)

    # ---- items --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` per item (label -1 for a flat folder), as torchvision's ``ImageFolder``."""
        return [(self.path(i), int(y)) for i, y in enumerate(self._labels)]

    @property
    def captions(self) -> list[str] | None:
        """Every item's caption in item order, or None when the images have none."""
        return None if self._captions is None else list(self._captions)

    def path(self, index: int) -> str:
        """The file of item ``index``."""
        return str(self._folder / self._paths[index])  # an absolute path replaces the folder

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> np.ndarray:
        """Item ``index`` as a (size, size, 3) uint8 array, center-cropped, not flipped."""
        path = self.path(index)
        try:
            with Image.open(path) as f:
                ImageOps.exif_transpose(f, in_place=True)
                image = _to_rgb(f)  # decodes the file
        except Exception as e:  # decoding errors come as OSError, ValueError, SyntaxError, ...
            raise OSError(f"cannot read image {path}: {e}") from e
        return np.array(center_crop_image(image, self.size))  # (S, S, 3) uint8, writable

    def _item(self, index: int, pixels: np.ndarray, flip: bool) -> dict[str, Tensor | int | str]:
        if flip:
            pixels = pixels[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, S, S)
        item: dict[str, Tensor | int | str] = {"x": x}
        if self.num_classes:
            item["y"] = int(self._labels[index])
        if self._captions is not None:
            item["caption"] = self._captions[index]
        return item

    def cache_variants(self, index: int) -> list[dict[str, Tensor | int | str]]:
        """What a latent cache stores per item: the image, and its mirror when flipping is on."""
        pixels = self.load(index)
        variants = [self._item(index, pixels, False)]
        return variants + [self._item(index, pixels, True)] if self.flip else variants

    def cache_key(self) -> dict:
        key = {
            "root": str(self.root.resolve()), "num_files": len(self), "num_classes": self.num_classes,
            "size": self.size, "flip": self.flip, "crop": "center-adm",
            "files": files_fingerprint(self.root, (self.path(i) for i in range(len(self)))),
        }  # fmt: skip
        if self._captions is not None:
            key["captions"] = captions_fingerprint(self._captions)
        return key

    def __getitem__(self, index: int) -> dict[str, Tensor | int | str]:
        flip = self.flip and deterministic_choice(self.seed, self.epoch, index) == 1
        return self._item(index, self.load(index), flip)

    def __repr__(self) -> str:
        kind = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {kind}, size={self.size}, flip={self.flip})"
