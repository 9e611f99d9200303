"""Image datasets: scikit-learn's digits (tiny recipe) and folders of images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ditx.data import deterministic_choice


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1,797 8×8 grey images, 10 classes), upsampled.

    Items are ``{"x": (channels, size, size) in [-1, 1], "y": label}``. ``split``
    chooses a fixed, stratified 80/20 partition (``train``/``test``) or ``all``.
    No download: the data ships inside scikit-learn.
    """

    num_classes = 10

    def __init__(self, size: int = 16, channels: int = 1, split: str = "train", flip: bool = False, seed: int = 0):
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
        self.flip = flip
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
