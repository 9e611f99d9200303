"""Image metrics: FID, KID and class accuracy for the digits recipes, judged by a small digits CNN.

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

- ``fid``: ‖μ_r − μ_s‖² + Tr(Σ_r + Σ_s − 2(Σ_r Σ_s)^½), float64, unbiased covariances.
- ``kid`` / ``kid_std``: mean and (population) std over ``kid_subsets`` random subsets of
  the unbiased MMD² with the polynomial kernel k(a, b) = (aᵀb / d + 1)³; the subsets are
  drawn from a seeded generator, so the numbers are reproducible and the global RNG is
  left alone.
- ``class_accuracy``: fraction of samples generated for class c that the classifier
  calls c (only when labels are given).
- ``classifier_test_accuracy``: the classifier on the reference set, a sanity number for
  the judge itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ditx.checkpoint import atomic_write

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


def default_cache_dir() -> Path:
    """``$DITX_CACHE`` if set, else ``~/.cache/ditx``."""
    return Path(os.environ.get("DITX_CACHE") or Path.home() / ".cache" / "ditx")


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def classifier_cache_path(settings: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
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
    path = classifier_cache_path(settings, cache_dir)
    model = None
    if path.exists():
        try:
            model, metadata = _load_classifier(path, settings)
            test_accuracy = float(metadata["test_accuracy"])
        except Exception as e:  # any unreadable cache entry is rebuilt, never trusted
            warnings.warn(
                f"digits classifier cache {path} could not be loaded ({type(e).__name__}: {e}); retraining it",
                RuntimeWarning,
                stacklevel=2,
            )
            model = None
    if model is None:
        model = train_digits_classifier(settings, device=device).cpu()
        test_accuracy = _test_accuracy(model, settings)
        if test_accuracy < 0.95:
            warnings.warn(
                f"digits classifier reached only {test_accuracy:.3f} test accuracy; FID/KID will be less meaningful",
                RuntimeWarning,
                stacklevel=2,
            )
        from safetensors.torch import save_file

        metadata = {"settings": json.dumps(settings, sort_keys=True), "test_accuracy": repr(test_accuracy)}
        with atomic_write(path) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    model.settings = settings
    model.settings_hash = settings_hash(settings)
    model.weights_sha256 = _file_sha256(path)
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


# ---------------------------------------------------------------------------------------
# The metric the evaluate job calls
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


class DigitsMetric:
    """FID, KID and class accuracy of digit samples, judged by ``DigitsClassifier`` (see the module doc).

    ::

        metric = DigitsMetric()
        metric.prepare(DigitsDataset(size=16, split="test"), device="cpu")
        metric.compute(samples, labels)   # {"fid", "kid", "kid_std", "class_accuracy", "classifier_test_accuracy"}
        metric.protocol()                 # how the numbers were made, for the results file

    Samples are ``(N, C, H, W)`` in [-1, 1] (clamped to it), with the reference's channel
    count and any size ≥ 8.
    """

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
        self.cache_dir = cache_dir
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.kid_degree = kid_degree
        self.seed = seed
        self.classifier_seed = classifier_seed
        self.classifier_epochs = classifier_epochs
        self.batch_size = batch_size
        self.classifier: DigitsClassifier | None = None
        self.device = torch.device("cpu")
        self.reference_features: Tensor | None = None
        self.reference_accuracy: float | None = None
        self.reference_size = 0
        self.reference_description: dict[str, Any] = {}

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
        self.reference_features, logits = self._embed(images)
        self.reference_size = len(images)
        self.reference_accuracy = None if labels is None else float((logits.argmax(1) == labels.cpu()).double().mean())
        self.reference_description = {
            "dataset": type(reference).__name__,
            "split": getattr(reference, "split", None),
            "size": self.reference_size,
            "shape": list(images.shape[1:]),
        }

    @torch.no_grad()
    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> features (N, D) and logits (N, 10), on the CPU."""
        assert self.classifier is not None
        features, logits = [], []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].to(self.device).clamp(-1, 1)
            f, logit = self.classifier.features_and_logits(x)
            features.append(f.cpu())
            logits.append(logit.cpu())
        return torch.cat(features), torch.cat(logits)

    def compute(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Metrics of ``samples`` (N, C, H, W) in [-1, 1] generated for ``labels`` (N,) (None: unconditional).

        Returns ``fid``, ``kid``, ``kid_std``, ``classifier_test_accuracy`` (if the reference
        had labels) and ``class_accuracy`` (if ``labels`` is given).
        """
        if self.classifier is None or self.reference_features is None:
            raise RuntimeError("DigitsMetric.compute called before prepare(reference, device)")
        channels = self.classifier.channels
        if samples.ndim != 4 or samples.shape[1] != channels or min(samples.shape[-2:]) < 8:
            raise ValueError(
                f"digits metric samples must be (N, {channels}, H>=8, W>=8) like the reference, "
                f"got shape {tuple(samples.shape)}"
            )
        if len(samples) < 2:
            raise ValueError(f"FID/KID need at least 2 samples, got {len(samples)}")
        if labels is not None and (labels.ndim != 1 or len(labels) != len(samples)):
            raise ValueError(f"labels must be (N,) = ({len(samples)},) class indices, got shape {tuple(labels.shape)}")
        features, logits = self._embed(samples)
        kid, kid_std = kernel_distance(
            self.reference_features,
            features,
            subsets=self.kid_subsets,
            subset_size=self.kid_subset_size,
            degree=self.kid_degree,
            seed=self.seed,
        )
        result = {"fid": frechet_distance(self.reference_features, features), "kid": kid, "kid_std": kid_std}
        if labels is not None:
            result["class_accuracy"] = float((logits.argmax(1) == labels.cpu().long()).double().mean())
        if self.reference_accuracy is not None:
            result["classifier_test_accuracy"] = self.reference_accuracy
        return result

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of how ``compute``'s numbers are made (call after ``prepare``)."""
        try:
            from importlib.metadata import version

            torchmetrics_version = version("torchmetrics")
        except Exception:
            torchmetrics_version = None
        classifier = self.classifier
        return {
            "metric": "digits",
            "feature_extractor": {
                "name": "DigitsClassifier.features",
                "dim": FEATURE_DIM,
                "input_size": CLASSIFIER_INPUT_SIZE,
                "settings": None if classifier is None else classifier.settings,
                "settings_hash": None if classifier is None else classifier.settings_hash,
                "weights_sha256": None if classifier is None else classifier.weights_sha256,
                "test_accuracy_at_training": None if classifier is None else classifier.test_accuracy,
            },
            "reference": self.reference_description,
            "reference_size": self.reference_size,
            "fid": {"implementation": "torchmetrics.FrechetInceptionDistance", "dtype": "float64"},
            "kid": {
                "implementation": "torchmetrics.KernelInceptionDistance",
                "kernel": "polynomial (a.b / dim + 1) ** degree",
                "degree": self.kid_degree,
                "subsets": self.kid_subsets,
                "subset_size": self.kid_subset_size,
                "subset_size_capped_at": "min(reference size, sample count)",
                "seed": self.seed,
            },
            "torchmetrics_version": torchmetrics_version,
            "samples": "clamped to [-1, 1]",
        }
