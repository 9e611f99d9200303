"""Image metrics: digits FID/KID/accuracy judged by a small CNN, and FID/IS/KID by the standard Inception-v3.

Inception-v3 features mean little on 16×16 grey digits, so ``DigitsMetric`` uses the
penultimate layer (64-d) of ``DigitsClassifier``, a small CNN trained once on the digits
*train* split and cached (safetensors, keyed by a hash of its settings) in
``$DITX_CACHE`` or ``~/.cache/ditx``. The reference set is held-out data (e.g. digits
``split="test"``), never the classifier's training data.

Implementation choice: the Fréchet distance and KID are torchmetrics'
``FrechetInceptionDistance`` and ``KernelInceptionDistance`` (tested with torchmetrics
1.9), given a pass-through ``feature=`` module over features this module computes. Both
run on torch alone with a custom feature module: no torchvision, no torch-fidelity.
torchmetrics is imported on first use, so registering the image plugin stays cheap.
Both metrics are ``FeatureDistanceMetric`` subclasses: the batched embedding of the reference
and the samples, FID/KID and the common part of ``protocol()`` are written once; each
metric supplies its network and its extras.

- ``fid``: ‖μ_r − μ_s‖² + Tr(Σ_r + Σ_s − 2(Σ_r Σ_s)^½), float64, unbiased covariances.
- ``kid`` / ``kid_std``: mean and (population) std over ``kid_subsets`` random subsets of
  the unbiased MMD² with the polynomial kernel k(a, b) = (aᵀb / d + 1)³; the subsets are
  drawn from a seeded generator, so the numbers are reproducible and the global RNG is
  left alone.
- ``class_accuracy``: fraction of samples generated for class c that the classifier
  calls c (only when labels are given).
- ``classifier_test_accuracy``: the classifier on the reference set, a sanity number for
  the judge itself.

Inception metric (``InceptionMetric``, registered as ``inception``)
------------------------------------------------------------------
For natural images (ImageNet, ...): ``fid`` (2048-d pool features), ``inception_score`` /
``inception_score_std`` (1008-way ``logits_unbiased``, 10 splits, as the original IS code)
and ``kid`` / ``kid_std``, computed by torchmetrics' ``FrechetInceptionDistance``,
``InceptionScore`` and ``KernelInceptionDistance`` over features of torch-fidelity's
``FeatureExtractorInceptionV3`` (the port of the TF Inception graph that TF-FID, ADM's
evaluator, pytorch-fid and torch-fidelity share). One network and one forward pass give
all three: torchmetrics' built-in networks would run Inception once per metric, its
``InceptionScore`` takes no weights file, and its resize defaults to antialiased bilinear,
which is not the standard FID resize. Pixels: samples in [-1, 1] become uint8
round((x + 1) · 127.5) (``io.images_to_uint8``, the conversion ``write_adm_npz`` saves;
grey is repeated to RGB), and the network resizes them to 299×299 with torch-fidelity's
TensorFlow-1.x-exact bilinear (no antialias), as TF-FID and ADM's evaluator do.

Dependency decision, torch-fidelity vs torchvision (checked with torch-fidelity 0.4.0,
torch 2.13.0+cpu, torchmetrics 1.9.0): the Inception extractor module needs only torch,
but torch-fidelity's package ``__init__`` imports its CLIP, DINOv2 and VGG16 extractors,
which import torchvision; PyPI's torchvision does not load beside a CPU torch ("operator
torchvision::nms does not exist"), and a plain ``pip install torch-fidelity`` even swaps
torch for a CUDA build. So torch-fidelity is not in the ``image`` extra; install it by hand
with ``pip install --no-deps "torch-fidelity==0.4.0"`` (its other requirements, numpy,
pillow, tqdm and torch, are ditx's own). Installed that way without a working torchvision,
``import torch_fidelity`` fails, and so does ``import torchmetrics`` (it imports
torch-fidelity whenever it is installed). ``_torch_fidelity_without_torchvision`` handles
exactly that case (on importing this module when torchvision is absent, and before
torchmetrics or the extractor are imported): it registers the ``torch_fidelity`` package
object with its real ``__path__`` but without running its ``__init__``, so its torch-only
submodules, and torchmetrics, import normally; only torch-fidelity's top-level API (e.g.
``torch_fidelity.calculate_metrics``) stays unavailable. Where torchvision works, nothing
is changed. No code is copied from torch-fidelity: its network class is used as shipped.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity
ships the same file as ``weights-inception-2015-12-05-6726825d.pth``: both names carry
the SHA-256 prefix torch.hub checks). Looked up in ``weights_path``, then
``$DITX_INCEPTION_WEIGHTS``, then torch.hub's ``checkpoints/`` directory (either name);
downloaded only with ``download=True``. Otherwise ``prepare`` raises an error saying where
to get the file and how to pass it. The file is first read with ``weights_only=True``, so
a file that unpickles code is refused before torch-fidelity loads it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ditx.files import atomic_write, ditx_cache_dir, file_sha256
from ditx.registry import package_version

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


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
    from modalities.image.data import DigitsDataset

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
    from modalities.image.data import DigitsDataset

    test = DigitsDataset(size=settings["size"], channels=settings["channels"], split="test")
    return _accuracy(model, test.images, test.labels)


def classifier_cache_path(settings: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else ditx_cache_dir()
    return cache / f"digits-classifier-{settings_hash(settings)}.safetensors"


def _load_classifier(path: Path, settings: dict[str, Any]) -> tuple[DigitsClassifier, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    stored = json.loads(metadata.get("settings", "null"))
    if stored != settings:
        raise ValueError(f"settings stored in {path} ({stored}) differ from the requested ones ({settings})")
    model = DigitsClassifier(settings["channels"], feature_dim=settings["feature_dim"])
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False), metadata


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
        classifier_cache_path(settings, cache_dir), settings, _load_classifier, train_and_score,
        what="digits classifier", min_accuracy=0.95, device=device,
    )  # fmt: skip


def cached_classifier(
    path: Path, settings: dict[str, Any], load, train_and_score, what: str, min_accuracy: float, device
) -> nn.Module:
    """A judge network trained at most once: ``load(path, settings) -> (model, metadata)`` when
    the cache file exists and loads (else a warning says why), otherwise
    ``train_and_score() -> (model, test accuracy)`` and an atomic write of the weights with
    the settings and accuracy. The model gets ``settings``, ``settings_hash``,
    ``weights_sha256`` and ``test_accuracy`` attributes and is moved to ``device``."""
    model = None
    if path.exists():
        try:
            model, metadata = load(path, settings)
            test_accuracy = float(metadata["test_accuracy"])
        except Exception as e:  # any unreadable cache entry is rebuilt, never trusted
            warnings.warn(
                f"{what} cache {path} could not be loaded ({type(e).__name__}: {e}); retraining it",
                RuntimeWarning,
                stacklevel=3,
            )
            model = None
    if model is None:
        model, test_accuracy = train_and_score()
        if test_accuracy < min_accuracy:
            warnings.warn(
                f"{what} reached only {test_accuracy:.3f} test accuracy; the metrics it judges will be less meaningful",
                RuntimeWarning,
                stacklevel=3,
            )
        from safetensors.torch import save_file

        metadata = {"settings": json.dumps(settings, sort_keys=True), "test_accuracy": repr(test_accuracy)}
        with atomic_write(path) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    model.settings = settings
    model.settings_hash = settings_hash(settings)
    model.weights_sha256 = file_sha256(path)
    model.test_accuracy = test_accuracy
    return model.to(device)


# ---------------------------------------------------------------------------------------
# Distances between feature sets (torchmetrics underneath)
# ---------------------------------------------------------------------------------------


class _GivenFeatures(nn.Module):
    """torchmetrics' ``feature=`` module for inputs that already are features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image

    def forward(self, x: Tensor) -> Tensor:
        return x


def _import_torchmetrics():
    _torch_fidelity_without_torchvision()  # else torchmetrics' import fails where torch-fidelity lacks torchvision
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as e:
        raise ImportError(
            "the digits FID/KID metrics need torchmetrics: pip install torchmetrics "
            "(torchvision and torch-fidelity are not needed)"
        ) from e
    return FrechetInceptionDistance, KernelInceptionDistance


def _check_features(name: str, features: Tensor) -> Tensor:
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"{name} must be (N >= 2, D) features, got shape {tuple(features.shape)}")
    return features.detach().double().cpu()


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)`` (float64)."""
    fid_cls, _ = _import_torchmetrics()
    a, b = _check_features("features_a", features_a), _check_features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    fid = fid_cls(feature=_GivenFeatures(a.shape[1]))
    fid.update(a, real=True)
    fid.update(b, real=False)
    return float(fid.compute())


def kernel_distance(
    features_a: Tensor,
    features_b: Tensor,
    subsets: int = 100,
    subset_size: int = 100,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets of the unbiased polynomial-kernel MMD².

    ``subset_size`` is capped at the smaller set's size. Subsets come from a generator
    seeded with ``seed``; the global RNG is unchanged.
    """
    _, kid_cls = _import_torchmetrics()
    a, b = _check_features("features_a", features_a), _check_features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(subset_size, len(a), len(b))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")  # they are given, and small
        kid = kid_cls(feature=_GivenFeatures(a.shape[1]), subsets=subsets, subset_size=size, degree=degree)
    kid.update(a, real=True)
    kid.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchmetrics draws the subsets with the global torch.randperm
        mean, std = kid.compute()
    return float(mean), float(std)


def frechet_distance_to_stats(mu: Tensor, sigma: Tensor, features: Tensor) -> float:
    """Fréchet distance between the Gaussian ``(mu (D,), sigma (D, D))`` and features ``(N, D)`` (float64).

    ``mu``/``sigma`` are precomputed reference statistics (e.g. an ADM reference batch).
    torchmetrics' ``FrechetInceptionDistance`` keeps the sufficient statistics (Σf, Σffᵀ,
    n) as its state; the reference side is set from ``mu``/``sigma`` (any n ≥ 2 gives
    back the same mean and unbiased covariance), the sample side is updated as usual.
    """
    fid_cls, _ = _import_torchmetrics()
    b = _check_features("features", features)
    mu, sigma = torch.as_tensor(mu).double().cpu(), torch.as_tensor(sigma).double().cpu()
    d = b.shape[1]
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(
            f"reference statistics must be mu ({d},) and sigma ({d}, {d}) for {d}-d features, "
            f"got mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)}"
        )
    fid = fid_cls(feature=_GivenFeatures(d))
    n = 2
    fid.real_features_sum = mu * n
    fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    fid.real_features_num_samples = torch.tensor(n)
    fid.update(b, real=False)
    return float(fid.compute())


# ---------------------------------------------------------------------------------------
# The metrics the evaluate job calls: what they share, and the digits metric
# ---------------------------------------------------------------------------------------


def _dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor | None]:
    """(images (N, C, H, W), labels (N,) or None) of a dataset, using its ``images``/``labels`` if present."""
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, Tensor):
        return images, labels if isinstance(labels, Tensor) else None
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([torch.as_tensor(item["x"]) for item in items])
    has_labels = all("y" in item for item in items)
    return images, torch.tensor([int(item["y"]) for item in items]) if has_labels else None


class FeatureDistanceMetric(ABC):
    """What ``DigitsMetric`` and ``InceptionMetric`` share: FID and KID between features of a reference and samples.

    A metric (the evaluate job's protocol: ``prepare(reference, device)``,
    ``compute(samples, labels) -> dict``, ``protocol() -> dict``) embeds images with one
    network into features (for FID/KID) and logits (for its own extras). This class holds
    the batched embedding, the reference (features, or ``mu``/``sigma`` statistics, which
    give FID but no KID), FID/KID of sample features against it, the checks shared by all
    metrics and the common part of ``protocol()``. A subclass supplies ``prepare``,
    ``compute``, its network (``_network``, ``_embed_batch``, ``_describe_network``), its
    sample checks (``_check_samples``) and its extras.
    """

    name: str  # the registry name, recorded as the protocol's "metric"

    def __init__(self, kid_subsets: int, kid_subset_size: int, kid_degree: int, seed: int, batch_size: int):
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.kid_degree = kid_degree
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.reference_features: Tensor | None = None  # (N, D), with a reference dataset
        self.reference_mu: Tensor | None = None  # (D,) and (D, D), with reference statistics
        self.reference_sigma: Tensor | None = None
        self.reference_size: int | None = None
        self.reference_description: dict[str, Any] = {}

    @abstractmethod
    def _network(self) -> nn.Module | None:
        """The feature network, None before ``prepare``."""

    @abstractmethod
    def _embed_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) in [-1, 1] on ``self.device`` -> features (B, D) and logits (B, K)."""

    @abstractmethod
    def _describe_network(self) -> dict[str, Any]:
        """The protocol's ``feature_extractor`` entry: which network, which weights, which layer."""

    @torch.no_grad()
    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) in [-1, 1] -> features (N, D) and logits (N, K), float32 on the CPU; ``batch_size`` per pass."""
        assert self._network() is not None
        features, logits = [], []
        for i in range(0, len(images), self.batch_size):
            f, logit = self._embed_batch(images[i : i + self.batch_size].to(self.device))
            features.append(f.float().cpu())
            logits.append(logit.float().cpu())
        return torch.cat(features), torch.cat(logits)

    def _set_reference(self, reference: Dataset, features: Sequence[Tensor], shape: list[int] | None) -> None:
        """Keep the reference set's features (a list of ``(B, D)`` batches) and describe the set."""
        if sum(len(f) for f in features) < 2:
            raise ValueError(f"the {self.name} metric's reference set needs at least 2 images")
        self.reference_features = torch.cat(features)
        self.reference_mu = self.reference_sigma = None
        self.reference_size = len(self.reference_features)
        self.reference_description = {
            "dataset": type(reference).__name__,
            "split": getattr(reference, "split", None),
            "size": self.reference_size,
            "shape": shape,
        }

    def _check_samples(self, samples: Tensor, labels: Tensor | None) -> None:
        """Raise ValueError for samples the metric cannot judge; subclasses check the image shape first."""
        if len(samples) < 2:
            raise ValueError(f"FID/KID need at least 2 samples, got {len(samples)}")

    def _embed_samples(self, samples: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """Features (N, D) and logits (N, K) of checked ``samples``, once ``prepare`` has run."""
        if self._network() is None or (self.reference_features is None and self.reference_mu is None):
            raise RuntimeError(f"{type(self).__name__}.compute called before prepare(reference, device)")
        self._check_samples(samples, labels)
        return self._embed(samples)

    def _fid_kid(self, features: Tensor) -> dict[str, float]:
        """``fid`` of sample features (N, D) against the reference and, with reference features, ``kid``/``kid_std``."""
        if self.reference_features is None:
            return {"fid": frechet_distance_to_stats(self.reference_mu, self.reference_sigma, features)}
        kid, kid_std = kernel_distance(
            self.reference_features,
            features,
            subsets=self.kid_subsets,
            subset_size=self.kid_subset_size,
            degree=self.kid_degree,
            seed=self.seed,
        )
        return {"fid": frechet_distance(self.reference_features, features), "kid": kid, "kid_std": kid_std}

    def _kid_protocol(self) -> dict[str, Any] | None:
        return {
            "implementation": "torchmetrics.KernelInceptionDistance",
            "kernel": "polynomial (a.b / dim + 1) ** degree",
            "degree": self.kid_degree,
            "subsets": self.kid_subsets,
            "subset_size": self.kid_subset_size,
            "subset_size_capped_at": "min(reference size, sample count)",
            "seed": self.seed,
        }

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of how ``compute``'s numbers are made (call after ``prepare``/``compute``)."""
        return {
            "metric": self.name,
            "feature_extractor": self._describe_network(),
            "reference": self.reference_description,
            "reference_size": self.reference_size,
            "fid": {"implementation": "torchmetrics.FrechetInceptionDistance", "dtype": "float64"},
            "kid": self._kid_protocol(),
            "torchmetrics_version": package_version("torchmetrics"),
        }


class DigitsMetric(FeatureDistanceMetric):
    """FID, KID and class accuracy of digit samples, judged by ``DigitsClassifier`` (see the module doc).

    ::

        metric = DigitsMetric()
        metric.prepare(DigitsDataset(size=16, split="test"), device="cpu")
        metric.compute(samples, labels)   # {"fid", "kid", "kid_std", "class_accuracy", "classifier_test_accuracy"}
        metric.protocol()                 # how the numbers were made, for the results file

    Samples are ``(N, C, H, W)`` in [-1, 1] (clamped to it), with the reference's channel
    count and any size ≥ 8.
    """

    name = "digits"

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 100,
        kid_degree: int = 3,
        seed: int = 0,
        classifier_seed: int = 0,
        classifier_epochs: int = 12,
        batch_size: int = 256,
    ):
        super().__init__(kid_subsets, kid_subset_size, kid_degree, seed, batch_size)
        self.cache_dir = cache_dir
        self.classifier_seed = classifier_seed
        self.classifier_epochs = classifier_epochs
        self.classifier: DigitsClassifier | None = None
        self.reference_accuracy: float | None = None
        self.reference_size = 0

    def prepare(self, reference: Dataset, device: str | torch.device = "cpu") -> None:
        """Load (or train once) the classifier matching the reference's shape and embed the reference set."""
        images, labels = _dataset_tensors(reference)
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[-1] < 8 or images.shape[-2] < 8:
            raise ValueError(
                f"digits metric reference must hold (N, 1 or 3, H>=8, W>=8) images, got shape {tuple(images.shape)}"
            )
        self.device = torch.device(device)
        self.classifier = load_or_train_digits_classifier(
            size=images.shape[-1],
            channels=images.shape[1],
            cache_dir=self.cache_dir,
            device=self.device,
            seed=self.classifier_seed,
            epochs=self.classifier_epochs,
        )
        features, logits = self._embed(images)
        self._set_reference(reference, [features], list(images.shape[1:]))
        self.reference_accuracy = None if labels is None else float((logits.argmax(1) == labels.cpu()).double().mean())

    def _network(self) -> nn.Module | None:
        return self.classifier

    def _embed_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> features (B, 64) and logits (B, 10), of the images clamped to [-1, 1]."""
        return self.classifier.features_and_logits(images.clamp(-1, 1))

    def _check_samples(self, samples: Tensor, labels: Tensor | None) -> None:
        channels = self.classifier.channels
        if samples.ndim != 4 or samples.shape[1] != channels or min(samples.shape[-2:]) < 8:
            raise ValueError(
                f"digits metric samples must be (N, {channels}, H>=8, W>=8) like the reference, "
                f"got shape {tuple(samples.shape)}"
            )
        super()._check_samples(samples, labels)
        if labels is not None and (labels.ndim != 1 or len(labels) != len(samples)):
            raise ValueError(f"labels must be (N,) = ({len(samples)},) class indices, got shape {tuple(labels.shape)}")

    def compute(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Metrics of ``samples`` (N, C, H, W) in [-1, 1] generated for ``labels`` (N,) (None: unconditional).

        Returns ``fid``, ``kid``, ``kid_std``, ``classifier_test_accuracy`` (if the reference
        had labels) and ``class_accuracy`` (if ``labels`` is given).
        """
        features, logits = self._embed_samples(samples, labels)
        result = self._fid_kid(features)
        if labels is not None:
            result["class_accuracy"] = float((logits.argmax(1) == labels.cpu().long()).double().mean())
        if self.reference_accuracy is not None:
            result["classifier_test_accuracy"] = self.reference_accuracy
        return result

    def _describe_network(self) -> dict[str, Any]:
        classifier = self.classifier
        return {
            "name": "DigitsClassifier.features",
            "dim": FEATURE_DIM,
            "input_size": CLASSIFIER_INPUT_SIZE,
            "settings": None if classifier is None else classifier.settings,
            "settings_hash": None if classifier is None else classifier.settings_hash,
            "weights_sha256": None if classifier is None else classifier.weights_sha256,
            "test_accuracy_at_training": None if classifier is None else classifier.test_accuracy,
        }

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of how ``compute``'s numbers are made (call after ``prepare``)."""
        return {**super().protocol(), "samples": "clamped to [-1, 1]"}


# ---------------------------------------------------------------------------------------
# Inception metrics: FID, Inception Score and KID with the FID-standard Inception-v3
# ---------------------------------------------------------------------------------------

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity's name for the same file
INCEPTION_WEIGHTS_FILE_TORCH_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_URL_TORCH_FIDELITY = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash torch.hub checks, from the file name
INCEPTION_WEIGHTS_ENV = "DITX_INCEPTION_WEIGHTS"
INCEPTION_FEATURES = (64, 192, 768, 2048)  # pool sizes torchmetrics' FID accepts as ``feature=``
INCEPTION_INPUT_SIZE = 299
INCEPTION_CLASSES = 1008
TORCH_FIDELITY_INSTALL = 'pip install --no-deps "torch-fidelity==0.4.0"'


def _is_torchvision_failure(error: BaseException | None) -> bool:
    """Whether an import failed because torchvision is missing or does not load beside this torch."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "torchvision":
            return True
        if "torchvision" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _torch_fidelity_stub_getattr(name: str):
    raise AttributeError(
        f"torch_fidelity.{name} is unavailable: torch-fidelity's package __init__ needs torchvision, which does not "
        "import here, so only its torch-only submodules are loaded (import them by full name, e.g. "
        "torch_fidelity.feature_extractor_inceptionv3); see modalities.image.metrics"
    )


def _torch_fidelity_without_torchvision(try_import: bool = True) -> None:
    """Make torch-fidelity's torch-only submodules importable where torchvision is missing or broken.

    Does nothing where torch-fidelity is not installed, is already imported, or imports
    fine. Otherwise registers the ``torch_fidelity`` package (its real ``__path__``)
    without running its ``__init__`` (see the module doc). ``try_import=False`` only
    checks whether torchvision is installed at all: cheap enough for module import time.
    """
    if "torch_fidelity" in sys.modules:
        return
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        return
    if importlib.util.find_spec("torchvision") is not None:
        if not try_import:
            return
        try:
            importlib.import_module("torch_fidelity")
            return
        except Exception as e:  # ImportError, or RuntimeError from a torchvision built for another torch
            if not _is_torchvision_failure(e):
                raise
            for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
                del sys.modules[name]  # half-imported leftovers; reimported below without __init__
    package = importlib.util.module_from_spec(spec)  # a package object with __path__; __init__ is not run
    package.__getattr__ = _torch_fidelity_stub_getattr
    sys.modules["torch_fidelity"] = package
    logger.debug("torch_fidelity registered without its __init__ (torchvision unavailable)")


# Before anyone imports torchmetrics (the digits tests do, right after importing this module).
_torch_fidelity_without_torchvision(try_import=False)


def inception_extractor_class() -> type[nn.Module]:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` class, or an ImportError saying how to install it."""
    _torch_fidelity_without_torchvision()
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torch_fidelity":
            raise
        raise ImportError(
            f"the inception metric needs torch-fidelity's Inception-v3 port: {TORCH_FIDELITY_INSTALL} "
            "(--no-deps: its declared requirements pull a torchvision, and possibly a torch, that do not load beside "
            "a CPU torch; the Inception extractor itself needs only torch)"
        ) from e
    return FeatureExtractorInceptionV3


def _inception_weights_help(problem: str) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"{problem}. The inception metric needs the FID-standard TF-Inception weights {INCEPTION_WEIGHTS_FILE} "
        f"(torch-fidelity calls the same file {INCEPTION_WEIGHTS_FILE_TORCH_FIDELITY}). On a machine with internet "
        f"access download {INCEPTION_WEIGHTS_URL} (or {INCEPTION_WEIGHTS_URL_TORCH_FIDELITY}), copy it here, then "
        f"pass weights_path=/path/to/{INCEPTION_WEIGHTS_FILE} (in a recipe: eval.metrics: "
        f"[{{name: inception, weights_path: /path/to/{INCEPTION_WEIGHTS_FILE}}}]), or set the environment variable "
        f"{INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILE}, or put it in {hub}/. "
        "With internet access here, download=True fetches it into that directory"
    )


def find_inception_weights(weights_path: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The Inception weights file: ``weights_path``, else ``$DITX_INCEPTION_WEIGHTS``, else torch.hub's checkpoints.

    A path that is given but missing is an error (never silently replaced by another
    file). With nothing found, ``download=True`` fetches pytorch-fid's release into
    torch.hub's ``checkpoints/`` (SHA-256 prefix checked); otherwise, or if that fails,
    ``FileNotFoundError`` says where to get the file and how to pass it.
    """
    for source, value in (
        ("weights_path", weights_path),
        (INCEPTION_WEIGHTS_ENV, os.environ.get(INCEPTION_WEIGHTS_ENV)),
    ):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(_inception_weights_help(f"{source}={str(value)!r} is not a file"))
            return path
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_FILE_TORCH_FIDELITY):
        if (hub / name).is_file():
            return hub / name
    problem = f"no Inception weights: weights_path is not set, {INCEPTION_WEIGHTS_ENV} is not set, none in {hub}"
    if not download:
        raise FileNotFoundError(_inception_weights_help(problem))
    target = hub / INCEPTION_WEIGHTS_FILE
    try:
        hub.mkdir(parents=True, exist_ok=True)
        # writes a temporary file and renames it: an interrupted download leaves nothing behind
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(target), hash_prefix=INCEPTION_WEIGHTS_SHA256_PREFIX)
    except Exception as e:
        raise FileNotFoundError(
            _inception_weights_help(f"{problem}, and downloading it failed ({type(e).__name__}: {e})")
        ) from e
    return target


def load_inception_extractor(
    weights_path: str | os.PathLike,
    features: Sequence[str] = ("2048", "logits_unbiased"),
    device: str | torch.device = "cpu",
) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with the weights in ``weights_path``, frozen, on ``device``.

    Its forward takes uint8 ``(B, 3, H, W)`` images, resizes them to 299×299 (TF-1.x-exact
    bilinear) and returns a tuple with one ``(B, dim)`` float32 tensor per name in
    ``features`` (``"64"``, ``"192"``, ``"768"``, ``"2048"``, ``"logits_unbiased"``, ``"logits"``).
    """
    extractor = inception_extractor_class()
    path = Path(weights_path)
    try:  # refuses pickled code; torch-fidelity then loads the same file with weights_only=False
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            _inception_weights_help(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e})")
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(_inception_weights_help(f"{path} holds a {type(state).__name__}, not a state dict of tensors"))
    del state
    try:
        network = extractor("inception-v3-compat", list(features), feature_extractor_weights_path=str(path))
    except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
        raise ValueError(
            _inception_weights_help(f"{path} does not hold the weights of torch-fidelity's FeatureExtractorInceptionV3")
            + f" ({e})"
        ) from e
    return network.to(device).eval().requires_grad_(False)


def _import_inception_score():
    _torch_fidelity_without_torchvision()
    try:
        from torchmetrics.image.inception import InceptionScore
    except ImportError as e:
        raise ImportError("the Inception Score needs torchmetrics: pip install torchmetrics") from e
    return InceptionScore


def inception_score(logits: Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score of class logits ``(N, K)``: mean and std over splits of exp(E_x KL(p(y|x) ‖ p(y))).

    torchmetrics' ``InceptionScore`` on given logits (softmax inside, float64): rows are
    shuffled by a permutation drawn with ``seed`` (the global RNG is left as it was), cut
    into ``splits`` parts by ``torch.chunk`` and p(y) is each part's mean prediction; the
    std is the unbiased one over parts (0 for one part). For probabilities ``p`` pass
    ``p.log()`` (exact zeros are fine). With the 1008 ``logits_unbiased`` of the FID
    Inception and 10 splits this is the standard IS.
    """
    if logits.ndim != 2 or len(logits) < 1:
        raise ValueError(f"logits must be (N >= 1, K) class scores, got shape {tuple(logits.shape)}")
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits must be between 1 and the number of predictions ({len(logits)}), got {splits}")
    score_cls = _import_inception_score()
    # log(0) = -inf would make 0 * (-inf) = nan inside; the most negative double gives the same probabilities
    x = logits.detach().double().cpu().nan_to_num(neginf=torch.finfo(torch.float64).min)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")  # given, and small
        warnings.filterwarnings("ignore", message=".*degrees of freedom")  # the std of one split; reported as 0
        metric = score_cls(feature=_GivenFeatures(x.shape[1]), splits=splits)
        metric.update(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # torchmetrics shuffles with the global torch.randperm
            mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def load_reference_stats(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """``(mu (D,), sigma (D, D))`` float64 from an ``.npz`` with ``mu`` and ``sigma`` (as ADM reference batches)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference_stats={str(path)!r} is not a file (an .npz holding 'mu' and 'sigma')")
    with np.load(path) as data:  # allow_pickle=False: arrays only
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(
                f"{path} lacks {missing}: reference statistics are an .npz with 'mu' (D,) and 'sigma' (D, D), "
                f"as ADM's reference batches or InceptionMetric.write_reference_stats write; it holds {data.files}"
            )
        mu, sigma = torch.from_numpy(data["mu"].astype(np.float64)), torch.from_numpy(data["sigma"].astype(np.float64))
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    return mu, sigma


def _iter_dataset_images(dataset: Dataset, batch_size: int):
    """Batches ``(B, C, H, W)`` of a dataset's images, without holding the whole set in memory."""
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    for i in range(0, len(dataset), batch_size):
        yield torch.stack([torch.as_tensor(dataset[j]["x"]) for j in range(i, min(i + batch_size, len(dataset)))])


def _check_images(name: str, images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"the inception metric's {name} must be images (N, 3 or 1, H, W) in [-1, 1], got shape "
            f"{tuple(images.shape)}; for latents, decode them first or give reference_stats="
        )


class InceptionMetric(FeatureDistanceMetric):
    """FID, Inception Score and KID with the FID-standard Inception-v3 (see the module doc).

    ::

        metric = InceptionMetric(weights_path="pt_inception-2015-12-05-6726825d.pth")
        metric.prepare(reference_dataset, device="cuda")   # or InceptionMetric(reference_stats="ref.npz")
        metric.compute(samples, labels)   # {"fid", "inception_score", "inception_score_std", "kid", "kid_std"}
        metric.protocol()                 # how the numbers were made, for the results file

    Samples and reference images are ``(N, 3 or 1, H, W)`` in [-1, 1], any size (resized to
    299×299). ``feature`` picks the pool layer for FID and KID (2048 is the standard one;
    the smaller ones exist for quick checks). ``reference_stats`` (an ``.npz`` with ``mu``
    and ``sigma`` of the same layer) replaces the reference dataset; KID needs reference
    features, so it is reported only with a dataset. Labels are not used. The number of IS
    splits is capped at the sample count. The 2048-d FID's matrix square root takes about
    a minute on a small CPU.
    """

    name = "inception"

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        reference_stats: str | os.PathLike | None = None,
        feature: int = 2048,
        is_splits: int = 10,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_degree: int = 3,
        seed: int = 0,
        batch_size: int = 50,
        download: bool = False,
    ):
        if feature not in INCEPTION_FEATURES:
            raise ValueError(f"feature must be one of {INCEPTION_FEATURES} (2048 is standard FID), got {feature!r}")
        if is_splits < 1:
            raise ValueError(f"is_splits must be >= 1, got {is_splits}")
        super().__init__(kid_subsets, kid_subset_size, kid_degree, seed, batch_size)
        self.weights_path = weights_path
        self.reference_stats = reference_stats
        self.feature = feature
        self.is_splits = is_splits
        self.download = download
        self.network: nn.Module | None = None
        self.weights_file: Path | None = None
        self.weights_sha256: str | None = None
        self.num_samples: int | None = None
        self.sample_shape: list[int] | None = None
        self.is_splits_used: int | None = None

    def prepare(self, reference: Dataset | None = None, device: str | torch.device = "cpu") -> None:
        """Load the network and embed the reference set (or read ``reference_stats``, which then wins)."""
        if self.reference_stats is None and reference is None:
            raise ValueError("the inception metric needs a reference dataset or reference_stats= (.npz with mu, sigma)")
        self.device = torch.device(device)
        self.weights_file = find_inception_weights(self.weights_path, self.download)
        self.network = load_inception_extractor(self.weights_file, (str(self.feature), "logits_unbiased"), self.device)
        self.weights_sha256 = file_sha256(self.weights_file)
        if not self.weights_sha256.startswith(INCEPTION_WEIGHTS_SHA256_PREFIX):
            warnings.warn(
                f"{self.weights_file} (sha256 {self.weights_sha256[:12]}...) is not the official "
                f"{INCEPTION_WEIGHTS_FILE} (sha256 {INCEPTION_WEIGHTS_SHA256_PREFIX}...): FID/IS/KID will not be "
                "comparable with published numbers",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.reference_stats is not None:
            path = Path(self.reference_stats)
            self.reference_mu, self.reference_sigma = load_reference_stats(path)
            if len(self.reference_mu) != self.feature:
                raise ValueError(
                    f"{path} holds {len(self.reference_mu)}-d statistics but feature={self.feature}; "
                    f"use feature={len(self.reference_mu)} if that is the layer they were computed on"
                )
            self.reference_features = self.reference_size = None
            self.reference_description = {
                "stats_file": str(path),
                "stats_sha256": file_sha256(path),
                "dim": len(self.reference_mu),
            }
            return
        features = []
        shape = None
        for images in _iter_dataset_images(reference, self.batch_size):
            _check_images("reference images", images)
            shape = list(images.shape[1:])
            features.append(self._embed(images)[0])
        self._set_reference(reference, features, shape)

    def _network(self) -> nn.Module | None:
        return self.network

    def _embed_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) in [-1, 1] -> pool features (B, feature) and logits (B, 1008)."""
        from modalities.image.io import images_to_uint8

        x = images_to_uint8(images)  # (B, C, H, W) uint8
        return self.network(x.expand(-1, 3, -1, -1))  # grey -> RGB; resized to 299x299 inside

    def _check_samples(self, samples: Tensor, labels: Tensor | None) -> None:
        _check_images("samples", samples)
        super()._check_samples(samples, labels)

    def compute(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Metrics of ``samples`` (N, 3 or 1, H, W) in [-1, 1]; ``labels`` are accepted and unused.

        Returns ``fid``, ``inception_score``, ``inception_score_std`` and, with a reference
        dataset, ``kid`` and ``kid_std``.
        """
        features, logits = self._embed_samples(samples, labels)
        splits = min(self.is_splits, len(samples))
        if splits < self.is_splits:
            logger.warning(
                "Inception Score: %d samples, so %d splits instead of %d", len(samples), splits, self.is_splits
            )
        score, score_std = inception_score(logits, splits=splits, seed=self.seed)
        self.num_samples, self.sample_shape, self.is_splits_used = len(samples), list(samples.shape[1:]), splits
        distances = self._fid_kid(features)  # fid, and kid/kid_std with reference features
        return {"fid": distances.pop("fid"), "inception_score": score, "inception_score_std": score_std, **distances}

    def write_reference_stats(self, path: str | os.PathLike) -> Path:
        """Write the prepared reference set's ``mu`` (D,) and ``sigma`` (D, D) (float64) as an ``.npz``, atomically.

        The file is what ``reference_stats=`` reads, so a large reference set is embedded once.
        """
        if self.reference_features is None:
            raise RuntimeError("write_reference_stats needs prepare() with a reference dataset first")
        features = self.reference_features.double()
        mu, sigma = features.mean(0), torch.cov(features.T)  # unbiased, like torchmetrics' FID
        path = Path(path)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
            np.savez(f, mu=mu.numpy(), sigma=sigma.numpy())
        return path

    def _describe_network(self) -> dict[str, Any]:
        return {
            "name": "torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3",
            "torch_fidelity_version": package_version("torch-fidelity"),
            "weights_file": None if self.weights_file is None else self.weights_file.name,
            "weights_sha256": self.weights_sha256,
            "weights_official": None
            if self.weights_sha256 is None
            else self.weights_sha256.startswith(INCEPTION_WEIGHTS_SHA256_PREFIX),
            "fid_kid_features": f"{self.feature}-d pool",
            "is_logits": f"logits_unbiased ({INCEPTION_CLASSES}-way, no bias)",
            "dtype": "float32",
        }

    def _kid_protocol(self) -> dict[str, Any] | None:
        return None if self.reference_features is None else super()._kid_protocol()  # no KID from statistics

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of how ``compute``'s numbers are made (call after ``prepare``/``compute``)."""
        return {
            **super().protocol(),
            "num_samples": self.num_samples,
            "sample_shape": self.sample_shape,
            "preprocessing": {
                "to_uint8": "round((clamp(x, -1, 1) + 1) * 127.5); grey repeated to RGB",
                "resize": f"to {INCEPTION_INPUT_SIZE}x{INCEPTION_INPUT_SIZE}, bilinear, TensorFlow-1.x-exact "
                "(torch_fidelity interpolate_bilinear_2d_like_tensorflow1x), no antialias",
            },
            "inception_score": {
                "implementation": "torchmetrics.InceptionScore",
                "splits": self.is_splits,
                "splits_used": self.is_splits_used,
                "shuffle_seed": self.seed,
                "std": "unbiased, over splits",
            },
        }
