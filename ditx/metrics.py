"""The metric contract, and the feature distances (FID, KID) that metrics of every modality share.

Implementation choice: the Fréchet distance and KID are torchmetrics'
``FrechetInceptionDistance`` and ``KernelInceptionDistance`` (tested with torchmetrics
1.9), given a pass-through ``feature=`` module over features the metric's own network computes. Both
run on torch alone with a custom feature module: no torchvision, no torch-fidelity.
torchmetrics is imported on first use, so registering a plugin stays cheap.
``FeatureDistanceMetric`` holds what every such metric shares (image digits and Inception,
video FVD, frame FID, moving digits): the batched embedding of the reference and the
samples, FID/KID and the common part of ``protocol()``; each metric supplies its network
and its extras.

- ``fid``: ‖μ_r − μ_s‖² + Tr(Σ_r + Σ_s − 2(Σ_r Σ_s)^½), float64, unbiased covariances.
- ``kid`` / ``kid_std``: mean and (population) std over ``kid_subsets`` random subsets of
  the unbiased MMD² with the polynomial kernel k(a, b) = (aᵀb / d + 1)³; the subsets are
  drawn from a seeded generator, so the numbers are reproducible and the global RNG is
  left alone.

Where torch-fidelity is installed without a working torchvision (``pip install --no-deps``,
the way ditx installs it beside a CPU torch), ``import torchmetrics`` fails, because
torchmetrics imports torch-fidelity, whose package ``__init__`` imports torchvision.
``torch_fidelity_without_torchvision`` (run when this module is imported, and again before
torchmetrics or torch-fidelity's Inception are imported) registers the ``torch_fidelity``
package with its real ``__path__`` but without running its ``__init__``: its torch-only
submodules, and torchmetrics, then import normally. Where torchvision works, nothing is
changed (see ``modalities/image/inception.py`` for the decision).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditx.data import Dataset
from ditx.files import atomic_write, ditx_cache_dir, file_sha256
from ditx.registry import package_version

logger = logging.getLogger(__name__)


class Metric(ABC):
    """The metric contract: what ``ditx eval`` calls of a registered metric, and nothing more.

    ``ditx.registry.metrics`` builds it from a recipe's ``eval.metrics`` entry (a name, or
    ``{name: ..., **args}``). Then, once per evaluation:

    1. ``prepare(reference, device)``: ``reference`` is the recipe's dataset built for
       ``split="test"`` (a :class:`ditx.data.Dataset`); load or train the judging network
       on ``device`` and embed the reference.
    2. ``compute(samples, labels, captions) -> {name: float}``: ``samples`` are decoded samples
       ``(N, *data_shape)`` on the CPU in the data's range (what the modality's writer
       takes), ``labels`` ``(N,)`` the classes they were generated for, or None when the
       model is unconditional (for a text recipe: the test items' classes, when the data
       has any, whether or not the model takes them). Every key goes into ``metrics.json``;
       the keys of all the recipe's metrics must differ. ``captions``: a text recipe's
       prompts (drawn from the test split's captions), one per sample, else None; a
       metric that does not judge text ignores them.
    3. ``protocol() -> dict``: a JSON-able description of how the numbers were made
       (network and weights checksum, reference size and split, settings), stored beside
       them in ``metrics.json``.
    """

    name: str  # the registry name, recorded as the protocol's "metric"

    @abstractmethod
    def prepare(self, reference: Dataset, device: str | torch.device = "cpu") -> None:
        """Get ready to judge samples against ``reference`` on ``device``."""

    @abstractmethod
    def compute(
        self, samples: Tensor, labels: Tensor | None = None, captions: list[str] | None = None
    ) -> dict[str, float]:
        """The numbers for ``samples`` generated for ``labels``."""

    @abstractmethod
    def protocol(self) -> dict[str, Any]:
        """How ``compute``'s numbers were made (JSON-able)."""


# ---------------------------------------------------------------------------------------
# Judge networks trained once and cached
# ---------------------------------------------------------------------------------------


def settings_hash(settings: dict[str, Any]) -> str:
    """A short hash of a judge network's settings: its cache key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]



def judge_cache_path(name: str, settings: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/<name>-<settings hash>.safetensors``; ``cache_dir`` defaults to ditx's cache folder."""
    cache = Path(cache_dir) if cache_dir is not None else ditx_cache_dir()
    return cache / f"{name}-{settings_hash(settings)}.safetensors"


def _load_judge(path: Path, settings: dict[str, Any], build) -> tuple[nn.Module, dict[str, str]]:
    """(``build(settings)`` with the weights of ``path``, frozen; the file's metadata), after
    checking that the file was written for these ``settings``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    stored = json.loads(metadata.get("settings", "null"))
    if stored != settings:
        raise ValueError(f"settings stored in {path} ({stored}) differ from the requested ones ({settings})")
    model = build(settings)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False), metadata


def cached_classifier(
    path: Path, settings: dict[str, Any], build, train_and_score, what: str, min_accuracy: float, device
) -> nn.Module:
    """A judge network trained at most once: ``build(settings)`` given the weights of ``path``
    when the cache file exists, was written for ``settings`` and loads (else a warning says
    why), otherwise ``train_and_score() -> (model, test accuracy)`` and an atomic write of
    the weights with the settings and accuracy. The model gets ``settings``,
    ``settings_hash``, ``weights_sha256`` and ``test_accuracy`` attributes and is moved to
    ``device``."""
    model = None
    if path.exists():
        try:
            model, metadata = _load_judge(path, settings, build)
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
        "torch_fidelity.feature_extractor_inceptionv3); see ditx.metrics"
    )


def torch_fidelity_without_torchvision(try_import: bool = True) -> None:
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


# Before anyone imports torchmetrics (tests do, right after importing a metric module).
torch_fidelity_without_torchvision(try_import=False)


# ---------------------------------------------------------------------------------------
# Distances between feature sets (torchmetrics underneath)
# ---------------------------------------------------------------------------------------


class GivenFeatures(nn.Module):
    """torchmetrics' ``feature=`` module for inputs that already are features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image

    def forward(self, x: Tensor) -> Tensor:
        return x


def import_torchmetrics():
    torch_fidelity_without_torchvision()  # else torchmetrics' import fails where torch-fidelity lacks torchvision
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as e:
        raise ImportError(
            "FID/KID need torchmetrics: pip install torchmetrics "
            "(torchvision and torch-fidelity are not needed)"
        ) from e
    return FrechetInceptionDistance, KernelInceptionDistance


def _check_features(name: str, features: Tensor) -> Tensor:
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"{name} must be (N >= 2, D) features, got shape {tuple(features.shape)}")
    bad = int((~torch.isfinite(features)).any(1).sum())
    if bad:  # else the eigenvalues below abort the process inside MKL (seen on an Intel CPU)
        raise ValueError(f"{name}: {bad} of {len(features)} rows are not finite (NaN or inf): the samples or "
                         f"reference they were computed from hold NaN or inf")  # fmt: skip
    return features.detach().double().cpu()


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)`` (float64)."""
    fid_cls, _ = import_torchmetrics()
    a, b = _check_features("features_a", features_a), _check_features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    fid = fid_cls(feature=GivenFeatures(a.shape[1]))
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
    _, kid_cls = import_torchmetrics()
    a, b = _check_features("features_a", features_a), _check_features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(subset_size, len(a), len(b))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")  # they are given, and small
        kid = kid_cls(feature=GivenFeatures(a.shape[1]), subsets=subsets, subset_size=size, degree=degree)
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
    fid_cls, _ = import_torchmetrics()
    b = _check_features("features", features)
    mu, sigma = torch.as_tensor(mu).double().cpu(), torch.as_tensor(sigma).double().cpu()
    d = b.shape[1]
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(
            f"reference statistics must be mu ({d},) and sigma ({d}, {d}) for {d}-d features, "
            f"got mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)}"
        )
    fid = fid_cls(feature=GivenFeatures(d))
    n = 2
    fid.real_features_sum = mu * n
    fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    fid.real_features_num_samples = torch.tensor(n)
    fid.update(b, real=False)
    return float(fid.compute())


# ---------------------------------------------------------------------------------------
# What the feature-distance metrics share
# ---------------------------------------------------------------------------------------


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor | None]:
    """(every item's ``x`` stacked (N, *shape), labels (N,) or None when some item has no ``y``)."""
    items = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([torch.as_tensor(item["x"]) for item in items])
    has_labels = all("y" in item for item in items)
    return x, torch.tensor([int(item["y"]) for item in items]) if has_labels else None


class FeatureDistanceMetric(Metric):
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
            "split": reference.split,
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
