"""The FID-standard Inception-v3 (torch-fidelity's port of the TF graph): finding its weights,
loading it, the Inception Score, reference statistics.

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

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ditx.data import Dataset
from ditx.metrics import GivenFeatures, torch_fidelity_without_torchvision

logger = logging.getLogger(__name__)

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


def inception_extractor_class() -> type[nn.Module]:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` class, or an ImportError saying how to install it."""
    torch_fidelity_without_torchvision()
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
    torch_fidelity_without_torchvision()
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
        metric = score_cls(feature=GivenFeatures(x.shape[1]), splits=splits)
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


def iter_dataset_images(dataset: Dataset, batch_size: int):
    """Batches ``(B, C, H, W)`` of a dataset's images, without holding the whole set in memory."""
    for i in range(0, len(dataset), batch_size):
        yield torch.stack([torch.as_tensor(dataset[j]["x"]) for j in range(i, min(i + batch_size, len(dataset)))])


def check_images(name: str, images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"the inception metric's {name} must be images (N, 3 or 1, H, W) in [-1, 1], got shape "
            f"{tuple(images.shape)}; for latents, decode them first or give reference_stats="
        )
