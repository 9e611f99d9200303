"""Image metrics: ``digits`` (FID/KID/class accuracy judged by the digits CNN) and ``inception``
(FID, Inception Score and KID with the FID-standard Inception-v3).

``DigitsMetric`` judges with ``DigitsClassifier`` (``digits_classifier.py``) and
``InceptionMetric`` with torch-fidelity's Inception (``inception.py``); both are
``ditx.metrics.FeatureDistanceMetric``s (FID/KID through torchmetrics, see ``ditx/metrics.py``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ditx.modalities.image.digits_classifier import (
    CLASSIFIER_INPUT_SIZE,
    FEATURE_DIM,
    DigitsClassifier,
    load_or_train_digits_classifier,
)
from ditx.modalities.image.inception import (
    INCEPTION_CLASSES,
    INCEPTION_FEATURES,
    INCEPTION_INPUT_SIZE,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_SHA256_PREFIX,
    check_images,
    find_inception_weights,
    inception_score,
    iter_dataset_images,
    load_inception_extractor,
    load_reference_stats,
)
from torch import Tensor, nn

from ditx.data import Dataset
from ditx.files import atomic_write, file_sha256
from ditx.metrics import FeatureDistanceMetric, dataset_tensors
from ditx.registry import package_version

logger = logging.getLogger(__name__)


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
        images, labels = dataset_tensors(reference)
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

    def compute(
        self, samples: Tensor, labels: Tensor | None = None, captions: list[str] | None = None
    ) -> dict[str, float]:
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
        for images in iter_dataset_images(reference, self.batch_size):
            check_images("reference images", images)
            shape = list(images.shape[1:])
            features.append(self._embed(images)[0])
        self._set_reference(reference, features, shape)

    def _network(self) -> nn.Module | None:
        return self.network

    def _embed_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) in [-1, 1] -> pool features (B, feature) and logits (B, 1008)."""
        from ditx.modalities.image.io import images_to_uint8

        x = images_to_uint8(images)  # (B, C, H, W) uint8
        return self.network(x.expand(-1, 3, -1, -1))  # grey -> RGB; resized to 299x299 inside

    def _check_samples(self, samples: Tensor, labels: Tensor | None) -> None:
        check_images("samples", samples)
        super()._check_samples(samples, labels)

    def compute(
        self, samples: Tensor, labels: Tensor | None = None, captions: list[str] | None = None
    ) -> dict[str, float]:
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
