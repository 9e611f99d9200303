"""The digits judge: a small CNN trained once on the digits *train* split and cached.

Inception-v3 features mean little on 16×16 grey digits, so ``DigitsMetric`` uses the
penultimate layer (64-d) of ``DigitsClassifier``, a small CNN trained once on the digits
*train* split and cached (safetensors, keyed by a hash of its settings) in
``$DITX_CACHE`` or ``~/.cache/ditx``. The reference set is held-out data (e.g. digits
``split="test"``), never the classifier's training data.

- ``class_accuracy``: fraction of samples generated for class c that the classifier
  calls c (only when labels are given).
- ``classifier_test_accuracy``: the classifier on the reference set, a sanity number for
  the judge itself.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditx.metrics import cached_classifier, judge_cache_path, settings_hash

logger = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "ditx-digits-classifier"
# bump when the architecture or the training procedure changes: it is part of the cache key
CLASSIFIER_VERSION = 1
CLASSIFIER_INPUT_SIZE = 16
FEATURE_DIM = 64


# ---------------------------------------------------------------------------------------
# The judge: a small digits CNN
# ---------------------------------------------------------------------------------------


class DigitsClassifier(nn.Module):
    """Small CNN for 10-class digits, 1 or 3 channels, any size ≥ 8 (resized to 16×16 inside).

    Input is in data space, ``(B, C, H, W)`` in [-1, 1]. ``features`` is the penultimate
    layer (``(B, 64)``, after ReLU) used for FID/KID; ``forward`` returns logits ``(B, 10)``.
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"DigitsClassifier takes 1 or 3 channels, got {channels}")
        self.channels = channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def resize(x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 16, 16) float, the resolution the network sees."""
        x = x.float()
        if tuple(x.shape[-2:]) == (CLASSIFIER_INPUT_SIZE, CLASSIFIER_INPUT_SIZE):
            return x
        # antialias: downsampling a 64x64 sample must not alias strokes away
        return F.interpolate(x, size=(CLASSIFIER_INPUT_SIZE,) * 2, mode="bilinear", align_corners=False, antialias=True)

    def _hidden(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate activations, unscaled."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"DigitsClassifier expects (B, {self.channels}, H, W) images, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 8:
            raise ValueError(f"DigitsClassifier needs images of at least 8x8, got {tuple(x.shape[-2:])}")
        h = self.conv(self.resize(x))  # (B, 64, 4, 4)
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate features for FID/KID.

        Scaled by ``feature_scale`` (fixed after training: 1 / RMS on the train split) so a
        feature is O(1), the range KID's polynomial kernel (a·b/d + 1)³ is designed for.
        """
        return self._hidden(x) * self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self._hidden(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features(x), forward(x))`` from one pass."""
        h = self._hidden(x)
        return h * self.feature_scale, self.head(h)


def classifier_settings(size: int, channels: int, seed: int = 0, epochs: int = 12) -> dict[str, Any]:
    """Everything that determines the trained classifier; its hash keys the cache file."""
    return {
        "format": CLASSIFIER_FORMAT,
        "version": CLASSIFIER_VERSION,
        "data": "digits",
        "split": "train",
        "size": int(size),
        "channels": int(channels),
        "feature_dim": FEATURE_DIM,
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": 64,
        "lr": 2e-3,
        "augment": "shift1px@16",
    }


def _shift_1px(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by a random (dy, dx) in {-1, 0, 1}², filling with background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, C, H+2, W+2)
    offsets = torch.randint(0, 3, (b, 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
            if len(rows):
                out[rows] = padded[rows, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def _accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(images[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / max(len(labels), 1)


def train_digits_classifier(settings: dict[str, Any], device: str | torch.device = "cpu") -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on the digits train split as ``settings`` says (deterministic)."""
    from ditx.modalities.image.data import DigitsDataset

    start = time.perf_counter()
    data = DigitsDataset(size=settings["size"], channels=settings["channels"], split="train")
    # shifts are applied at the network's 16x16 resolution, so every size gets the same augmentation
    images, labels = DigitsClassifier.resize(data.images), data.labels  # (N, C, 16, 16) in [-1, 1], (N,)
    generator = torch.Generator().manual_seed(settings["seed"])
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(settings["seed"])
        model = DigitsClassifier(settings["channels"], feature_dim=settings["feature_dim"])
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    steps_per_epoch = -(-len(labels) // settings["batch_size"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["lr"], total_steps=settings["epochs"] * steps_per_epoch
    )
    for _epoch in range(settings["epochs"]):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(labels), settings["batch_size"]):
            idx = order[i : i + settings["batch_size"]]
            x = _shift_1px(images[idx], generator).to(device)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        hidden = torch.cat([model._hidden(images[i : i + 512].to(device)) for i in range(0, len(labels), 512)])
        model.feature_scale.fill_(1.0 / hidden.pow(2).mean().sqrt().clamp_min(1e-6).item())
    logger.info("trained digits classifier %s in %.1f s", settings_hash(settings), time.perf_counter() - start)
    return model


def _test_accuracy(model: DigitsClassifier, settings: dict[str, Any]) -> float:
    from ditx.modalities.image.data import DigitsDataset

    test = DigitsDataset(size=settings["size"], channels=settings["channels"], split="test")
    return _accuracy(model, test.images, test.labels)


def classifier_cache_path(settings: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    return judge_cache_path("digits-classifier", settings, cache_dir)


def _build_classifier(settings: dict[str, Any]) -> DigitsClassifier:
    return DigitsClassifier(settings["channels"], feature_dim=settings["feature_dim"])


def load_or_train_digits_classifier(
    size: int = 16,
    channels: int = 1,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    epochs: int = 12,
) -> DigitsClassifier:
    """The digits classifier for ``size``×``size`` images with ``channels`` channels, trained at most once.

    Looks for ``digits-classifier-<settings hash>.safetensors`` in ``cache_dir`` (default:
    ``$DITX_CACHE`` or ``~/.cache/ditx``); if it is missing, or fails to load (a warning
    says why), trains one on the digits train split (a few seconds on a CPU) and writes it
    atomically. The returned model is in eval mode, frozen, on ``device``, and carries
    ``settings``, ``settings_hash``, ``weights_sha256`` and ``test_accuracy`` attributes.
    """
    settings = classifier_settings(size, channels, seed=seed, epochs=epochs)

    def train_and_score():
        model = train_digits_classifier(settings, device=device).cpu()
        return model, _test_accuracy(model, settings)

    return cached_classifier(
        classifier_cache_path(settings, cache_dir), settings, _build_classifier, train_and_score,
        what="digits classifier", min_accuracy=0.95, device=device,
    )  # fmt: skip
