"""Video metrics: FVD with StyleGAN-V's I3D, frame-wise FID/IS/KID with the image Inception metric, and the
moving-digits metrics of the tiny recipe, judged by a small frame classifier.

Samples are clips ``(N, C, T, H, W)`` in [-1, 1]; a reference dataset yields items
``{"x": (C, T, H, W) in [-1, 1], "y": label}`` (no ``"y"`` when unconditional). Every
metric follows the evaluate job's protocol: ``prepare(reference, device)``,
``compute(samples, labels) -> dict[str, float]``, ``protocol() -> dict``. Distances reuse
the image modality's helpers (``frechet_distance``, ``kernel_distance``, the
``FeatureDistanceMetric`` base), so image and video numbers are computed the same way.

FVD (``FVDMetric``, registered as ``fvd``)
------------------------------------------
The Fréchet distance between Gaussians fitted to I3D features of reference and generated
clips, with the detector and call convention of StyleGAN-V's evaluation (Skorokhodov et
al. 2022; ``src/metrics/frechet_video_distance.py`` and ``metric_utils.py`` in
universome/stylegan-v), the FVD implementation many video-generation papers since use:

- network: ``i3d_torchscript.pt``, a TorchScript port of the tf.hub ``i3d-kinetics-400/1``
  module that the original FVD code (google-research ``frechet_video_distance``) uses;
  universome/fvd-comparison shows the port gives the TF FVD to within 1e-6.
- call: ``detector(videos, rescale=True, resize=True, return_features=True)`` with
  ``videos`` uint8 ``(B, 3, T, H, W)`` in [0, 255]. ``rescale=True`` makes the detector map
  [0, 255] to [-1, 1] itself (``x / 255 * 2 - 1``, the range the TF code feeds I3D);
  ``resize=True`` makes it resize frames to the I3D's 224×224 (StyleGAN-V: its FVD
  "matches the original tensorflow implementation up to the upsampling operation").
  Grey clips are repeated to RGB, as StyleGAN-V does. Features are the 400-d Kinetics
  logits before the softmax (the ``RGB/inception_i3d/Mean`` tensor of the TF code).
- pixels: samples become uint8 ``round((x + 1) · 127.5)`` (``io.images_to_uint8``, the
  conversion of the image metrics and every ditx writer); StyleGAN-V's
  ``(x · 127.5 + 128).clamp(0, 255).to(uint8)`` truncates, i.e. rounds half up: the same
  pixels except at exact ties.
- protocol: StyleGAN-V's ``fvd2048_16f`` uses 2048 reference and 2048 generated clips of
  16 consecutive frames; ``max_reference_clips`` (default 2048) keeps the first clips of the
  reference in dataset order, as StyleGAN-V's ``max_real`` does; ``num_frames`` cuts every
  clip to its first frames. ``protocol()`` says whether a run matched ``fvd2048_16f``.
- difference: the covariances are the unbiased ones (torchmetrics, as the image FID);
  StyleGAN-V divides by N. That scales the trace term by N / (N - 1): the two FVDs differ
  by at most 1 / (N - 1), 0.05 % with 2048 clips.
- ``kvd``/``kvd_std``: the kernel distance (KID's estimator) of the same features, for free.

Weights: ``weights=`` or ``$DITX_I3D_WEIGHTS``. Nothing is downloaded; without a file,
``prepare`` raises an error naming the URL StyleGAN-V downloads it from and how to pass it.

Frame-wise FID (``FrameFIDMetric``, registered as ``frame-fid``)
----------------------------------------------------------------
Every frame of every clip is an image, scored by the image modality's ``InceptionMetric``
(held by composition: its weights file, resize and options are that metric's). The
results carry a ``frame_`` prefix: ``frame_fid``, ``frame_inception_score``,
``frame_inception_score_std``, ``frame_kid``, ``frame_kid_std``.

Moving digits (``MovingDigitsMetric``, registered as ``moving-digits``)
---------------------------------------------------------------------
For the tiny recipe (``modalities.video.data.render_moving_digits``: one scikit-learn digit
moving on a black canvas). The judge, ``MovingDigitsClassifier``, is the image modality's
``DigitsClassifier`` applied to a crop centred on each frame's intensity centroid, so it
needs no translation invariance of its own; it is trained once on frames of the rendered
*train* split and cached (safetensors, keyed by a hash of its settings, which include a
SHA-256 of the rendered training clips) next to the image digits classifier, in
``$DITX_CACHE`` or ``~/.cache/ditx``. Definitions (channels are averaged to grey first):

- intensity: ``clamp((x + 1) / 2, 0, 1)``, the brightness in [0, 1] (background 0).
- centroid of a frame: the intensity-weighted mean pixel position ``(y, x)`` in pixels
  (row and column indices, 0 at the top-left pixel's centre); the canvas centre for a
  black frame.
- ``motion_px``: mean over clips of the Euclidean distance between the centroids of the
  first and the last frame; ``reference_motion_px`` the same for the reference clips.
- ``frame_accuracy``: the fraction of all frames the classifier calls the clip's label
  (only when labels are given); ``classifier_reference_accuracy`` the same for the
  reference clips and their labels, a sanity number for the judge itself.
- ``clip_consistency``: mean over clips of the fraction of frames predicted as that
  clip's most frequent prediction (1: the digit never changes identity).
- frame feature (66-d): the classifier's 64-d penultimate features (scaled to unit RMS on
  its training frames) and the centroid normalised to [-1, 1] per axis
  (``2 · c / (size - 1) - 1``).
- clip feature (128 + 2T dims, 144 for 8 frames): the mean over frames of the 64
  classifier features and their (population) standard deviation over frames (what the
  digit looks like, and how much that changes), the first frame's normalised centroid
  and the trajectory, the normalised centroid of every later frame minus the first
  one's (where the digit is, and how it moves).
- ``fvd_digits``: Fréchet distance of clip features; ``frame_fid_digits``: Fréchet distance
  of frame features (all frames of all clips).

The classifier (1500 train clips, one random frame of each per epoch, 8 epochs, 1-pixel
shifts; about 7 s on 2 idle CPU cores) classifies 98.8 % of the frames of 500 rendered
test clips and 98.3 % of the decoded MP4 test split (``MovingDigitsDataset``). For scale,
against 200 rendered test clips (``fvd_digits`` / ``frame_fid_digits``): the clips
themselves 0 / 0, played backwards 0.18 / 0, their first frame frozen 1.9 / 0.01, frames
drawn from random clips 34 / 0.04, uniform noise 48 / 41.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ditx.files import ditx_cache_dir, file_sha256
from modalities.image.metrics import (
    CLASSIFIER_INPUT_SIZE,
    FEATURE_DIM,
    DigitsClassifier,
    FeatureDistanceMetric,
    InceptionMetric,
    _package_version,
    _shift_1px,
    cached_classifier,
    frechet_distance,
    settings_hash,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Clips: checks, frames, reference datasets
# ---------------------------------------------------------------------------------------


def _check_clips(what: str, clips: Tensor, min_frames: int = 1) -> None:
    if not isinstance(clips, Tensor) or clips.ndim != 5 or clips.shape[1] not in (1, 3):
        shape = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
        raise ValueError(
            f"{what} must be clips (N, C, T, H, W) with C = 1 or 3, in [-1, 1], got {shape}; "
            "for latents, decode them first"
        )
    if clips.shape[2] < min_frames:
        raise ValueError(f"{what} need at least {min_frames} frames per clip, got shape {tuple(clips.shape)}")


def clips_to_frames(clips: Tensor) -> Tensor:
    """(N, C, T, H, W) -> (N·T, C, H, W): frame ``t`` of clip ``i`` is row ``i·T + t``."""
    _check_clips("clips", clips)
    return clips.transpose(1, 2).flatten(0, 1)


def _iter_dataset_clips(
    dataset: Dataset, batch_size: int, limit: int | None = None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Batches ``(clips (B, C, T, H, W), labels (B,) or None)`` of a clip dataset's first ``limit`` items."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    shape = None
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        xs = [torch.as_tensor(item["x"]) for item in items]
        for offset, x in enumerate(xs):
            if shape is None:
                shape = tuple(x.shape)
            if x.ndim != 4 or tuple(x.shape) != shape:
                raise ValueError(
                    f"reference item {start + offset} of {type(dataset).__name__} has 'x' of shape "
                    f"{tuple(x.shape)}; every item must be one clip (C, T, H, W) of the same shape as the first, "
                    f"{shape}"
                )
        labels = torch.tensor([int(item["y"]) for item in items]) if all("y" in item for item in items) else None
        yield torch.stack(xs), labels


def _dataset_clips(dataset: Dataset, limit: int | None = None) -> tuple[Tensor, Tensor | None]:
    """All clips ``(N, C, T, H, W)`` and labels ``(N,)`` (None when any item lacks one) of a dataset."""
    clips, labels = [], []
    for x, y in _iter_dataset_clips(dataset, 64, limit):
        clips.append(x)
        labels.append(y)
    if not clips:
        raise ValueError(f"the reference dataset {type(dataset).__name__} is empty")
    return torch.cat(clips), None if any(y is None for y in labels) else torch.cat(labels)


class ClipFrames(Dataset):
    """The frames of a clip dataset as an image dataset: item ``i·T + t`` is ``{"x": frame t of clip i}``.

    Clips are read lazily (the last one is kept, so reading frames in order reads each
    clip once); ``max_clips`` keeps the first clips. ``split`` is the clip dataset's.
    """

    def __init__(self, clips: Dataset, max_clips: int | None = None):
        self.clips = clips
        self.num_clips = len(clips) if max_clips is None else min(max_clips, len(clips))
        if self.num_clips < 1:
            raise ValueError(f"the reference dataset {type(clips).__name__} is empty")
        first = torch.as_tensor(clips[0]["x"])
        if first.ndim != 4:
            raise ValueError(
                f"reference items must hold one clip (C, T, H, W) as 'x', got shape {tuple(first.shape)} "
                f"from {type(clips).__name__}"
            )
        self.clip_shape = tuple(first.shape)
        self.num_frames = first.shape[1]
        self.split = getattr(clips, "split", None)
        self._cached: tuple[int, Tensor] = (0, first)

    def __len__(self) -> int:
        return self.num_clips * self.num_frames

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        clip, t = divmod(range(len(self))[index], self.num_frames)
        if self._cached[0] != clip:
            x = torch.as_tensor(self.clips[clip]["x"])
            if tuple(x.shape) != self.clip_shape:
                raise ValueError(
                    f"reference clip {clip} of {type(self.clips).__name__} has shape {tuple(x.shape)}, "
                    f"the first one {self.clip_shape}; frame metrics need clips of one shape"
                )
            self._cached = (clip, x)
        return {"x": self._cached[1][:, t]}


# ---------------------------------------------------------------------------------------
# FVD: StyleGAN-V's TorchScript I3D
# ---------------------------------------------------------------------------------------

I3D_WEIGHTS_FILE = "i3d_torchscript.pt"
I3D_WEIGHTS_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"  # StyleGAN-V's detector_url
I3D_WEIGHTS_ENV = "DITX_I3D_WEIGHTS"
I3D_DETECTOR_KWARGS = {"rescale": True, "resize": True, "return_features": True}  # StyleGAN-V's compute_fvd
I3D_FEATURE_DIM = 400
I3D_INPUT_SIZE = 224
STYLEGAN_V_FVD_CLIPS = 2048  # fvd2048_16f: max_real = num_gen = 2048
STYLEGAN_V_FVD_FRAMES = 16


def _i3d_weights_help(problem: str) -> str:
    return (
        f"{problem}. The fvd metric needs StyleGAN-V's TorchScript I3D (Kinetics-400), {I3D_WEIGHTS_FILE}. On a "
        f"machine with internet access download {I3D_WEIGHTS_URL} (the file StyleGAN-V's FVD downloads), copy it "
        f"here, then pass weights=/path/to/{I3D_WEIGHTS_FILE} (in a recipe: eval.metrics: "
        f"[{{name: fvd, weights: /path/to/{I3D_WEIGHTS_FILE}}}]) or set the environment variable "
        f"{I3D_WEIGHTS_ENV}=/path/to/{I3D_WEIGHTS_FILE}. ditx never downloads it itself"
    )


def find_i3d_weights(weights: str | os.PathLike | None = None) -> Path:
    """The I3D TorchScript file: ``weights``, else ``$DITX_I3D_WEIGHTS``; ``FileNotFoundError`` with the how-to if none.

    A path that is given but missing is an error, never replaced by another file.
    """
    for source, value in (("weights", weights), (I3D_WEIGHTS_ENV, os.environ.get(I3D_WEIGHTS_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(_i3d_weights_help(f"{source}={str(value)!r} is not a file"))
            return path
    raise FileNotFoundError(_i3d_weights_help(f"no I3D weights: weights is not set and {I3D_WEIGHTS_ENV} is not set"))


def load_i3d_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript I3D in ``path``, in eval mode, on ``device`` (a TorchScript archive runs no pickled code)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript; the I3D ships only as one
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            detector = torch.jit.load(str(path), map_location=torch.device(device))
    except Exception as e:  # not a zip archive, or not a TorchScript one
        raise ValueError(_i3d_weights_help(f"{path} is not a TorchScript module ({type(e).__name__}: {e})")) from e
    return detector.eval()


class FVDMetric(FeatureDistanceMetric):
    """Fréchet Video Distance with StyleGAN-V's TorchScript I3D (see the module doc).

    ::

        metric = FVDMetric(weights="i3d_torchscript.pt", num_frames=16)
        metric.prepare(reference_dataset, device="cuda")
        metric.compute(samples)   # {"fvd", "kvd", "kvd_std"}
        metric.protocol()         # clips, frames, pixels, resize, weights sha256, reference size

    Samples and reference clips are ``(C = 1 or 3, T, H, W)`` in [-1, 1], any frame size
    (the detector resizes to 224×224). ``num_frames`` cuts clips to their first frames
    (None: all of them; reference and samples must then be as long). Labels are unused.
    ``batch_size`` is in clips (StyleGAN-V: 128 frames per batch, 8 clips of 16 frames).
    """

    name = "fvd"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        num_frames: int | None = None,
        max_reference_clips: int | None = STYLEGAN_V_FVD_CLIPS,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_degree: int = 3,
        seed: int = 0,
        batch_size: int = 8,
    ):
        if num_frames is not None and (
            isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1
        ):
            raise ValueError(f"num_frames must be a positive integer or None (all frames), got {num_frames!r}")
        if max_reference_clips is not None and max_reference_clips < 2:
            raise ValueError(f"max_reference_clips must be at least 2 (or None: all), got {max_reference_clips!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 clip, got {batch_size}")
        super().__init__(kid_subsets, kid_subset_size, kid_degree, seed, batch_size)
        self.weights = weights
        self.num_frames = num_frames
        self.max_reference_clips = max_reference_clips
        self.detector: torch.jit.ScriptModule | None = None
        self.weights_file: Path | None = None
        self.weights_sha256: str | None = None
        self.reference_clip_shape: list[int] | None = None  # (C, T, H, W) after cutting to num_frames
        self.num_samples: int | None = None
        self.sample_shape: list[int] | None = None

    def _cut(self, what: str, clips: Tensor) -> Tensor:
        """Check ``clips`` (N, C, T, H, W) and keep their first ``num_frames`` frames."""
        _check_clips(f"the fvd metric's {what}", clips, min_frames=self.num_frames or 1)
        return clips if self.num_frames is None else clips[:, :, : self.num_frames]

    def prepare(self, reference: Dataset, device: str | torch.device = "cpu") -> None:
        """Load the I3D and embed the first ``max_reference_clips`` reference clips."""
        if reference is None:
            raise ValueError("the fvd metric needs a reference dataset of clips")
        self.device = torch.device(device)
        self.weights_file = find_i3d_weights(self.weights)
        self.detector = load_i3d_detector(self.weights_file, self.device)
        self.weights_sha256 = file_sha256(self.weights_file)
        features, shape = [], None
        for clips, _ in _iter_dataset_clips(reference, self.batch_size, self.max_reference_clips):
            clips = self._cut("reference clips", clips)
            shape = list(clips.shape[1:])
            features.append(self._embed(clips)[0])
        if sum(len(f) for f in features) < 2:
            raise ValueError(f"FVD needs at least 2 reference clips, {type(reference).__name__} has {len(reference)}")
        self.reference_clip_shape = shape
        self._set_reference(reference, features, shape)
        self.reference_description["max_reference_clips"] = self.max_reference_clips

    def _network(self) -> nn.Module | None:
        return self.detector

    def _embed_batch(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, T, H, W) in [-1, 1] -> I3D features (B, 400), and no logits (B, 0)."""
        from modalities.image.io import images_to_uint8

        x = images_to_uint8(clips).expand(-1, 3, -1, -1, -1).contiguous()  # (B, 3, T, H, W) uint8; grey -> RGB
        features = self.detector(x, **I3D_DETECTOR_KWARGS)
        if not isinstance(features, Tensor) or tuple(features.shape) != (len(x), I3D_FEATURE_DIM):
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"{self.weights_file} returned {got} for {len(x)} clips; StyleGAN-V's I3D returns "
                f"({len(x)}, {I3D_FEATURE_DIM}) features with {I3D_DETECTOR_KWARGS}: is it {I3D_WEIGHTS_FILE}?"
            )
        return features, features.new_zeros(len(x), 0)

    def features(self, clips: Tensor) -> Tensor:
        """I3D features ``(N, 400)`` float32 of clips ``(N, C, T, H, W)`` in [-1, 1] (cut to ``num_frames``)."""
        if self.detector is None:
            raise RuntimeError("FVDMetric.features called before prepare(reference, device)")
        return self._embed(self._cut("clips", clips))[0]

    def _check_samples(self, samples: Tensor, labels: Tensor | None) -> None:
        _check_clips("the fvd metric's samples", samples, min_frames=self.num_frames or 1)
        frames = self.reference_clip_shape[1]
        if min(samples.shape[2], self.num_frames or samples.shape[2]) != frames:
            raise ValueError(
                f"the fvd metric's samples have {samples.shape[2]} frames (shape {tuple(samples.shape)}) but the "
                f"reference clips {frames}; FVD compares clips of one length: generate {frames}-frame clips "
                f"or set num_frames"
            )
        if len(samples) < 2:
            raise ValueError(f"FVD needs at least 2 sample clips, got {len(samples)}")
        super()._check_samples(samples, labels)

    def compute(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """``fvd``, ``kvd`` and ``kvd_std`` of ``samples`` (N, C, T, H, W) in [-1, 1]; ``labels`` are unused."""
        if self.detector is None or self.reference_features is None:
            raise RuntimeError("FVDMetric.compute called before prepare(reference, device)")
        self._check_samples(samples, labels)
        clips = self._cut("samples", samples)
        features, _ = self._embed(clips)
        self.num_samples, self.sample_shape = len(clips), list(clips.shape[1:])
        distances = self._fid_kid(features)
        return {"fvd": distances["fid"], "kvd": distances["kid"], "kvd_std": distances["kid_std"]}

    def _describe_network(self) -> dict[str, Any]:
        return {
            "name": "I3D (Kinetics-400), StyleGAN-V TorchScript port of tf.hub deepmind/i3d-kinetics-400/1",
            "weights_file": None if self.weights_file is None else self.weights_file.name,
            "weights_url": I3D_WEIGHTS_URL,
            "weights_sha256": self.weights_sha256,
            "call": "detector(videos, " + ", ".join(f"{k}={v}" for k, v in I3D_DETECTOR_KWARGS.items()) + ")",
            "input": "(B, 3, T, H, W) uint8 in [0, 255]",
            "features": f"{I3D_FEATURE_DIM}-d Kinetics-400 logits before the softmax",
            "dtype": "float32",
        }

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of how ``compute``'s numbers are made (call after ``prepare``/``compute``)."""
        base = super().protocol()
        frames = None if self.reference_clip_shape is None else self.reference_clip_shape[1]
        return {
            "metric": base["metric"],
            "feature_extractor": base["feature_extractor"],
            "reference": base["reference"],
            "reference_size": base["reference_size"],
            "num_samples": self.num_samples,
            "sample_shape": self.sample_shape,
            "num_frames": frames,
            "frames": "the first num_frames frames of each clip" if self.num_frames else "all frames of each clip",
            "preprocessing": {
                "to_uint8": "round((clamp(x, -1, 1) + 1) * 127.5); grey repeated to RGB",
                "value_range": "uint8 [0, 255] into the detector; rescale=True maps it to [-1, 1] (x / 255 * 2 - 1)",
                "resize": f"inside the detector (resize=True), to {I3D_INPUT_SIZE}x{I3D_INPUT_SIZE}",
            },
            "fvd": {
                "implementation": "torchmetrics.FrechetInceptionDistance on given features",
                "dtype": "float64",
                "covariance": "unbiased (1/(N-1)); StyleGAN-V uses 1/N",
            },
            "kvd": base["kid"],
            "stylegan_v_fvd2048_16f": {
                "reference_clips": STYLEGAN_V_FVD_CLIPS,
                "generated_clips": STYLEGAN_V_FVD_CLIPS,
                "num_frames": STYLEGAN_V_FVD_FRAMES,
                "matched": self.reference_size == STYLEGAN_V_FVD_CLIPS
                and self.num_samples == STYLEGAN_V_FVD_CLIPS
                and frames == STYLEGAN_V_FVD_FRAMES,
            },
            "torchmetrics_version": base["torchmetrics_version"],
            "torch_version": torch.__version__,
        }


# ---------------------------------------------------------------------------------------
# Frame-wise FID/IS/KID: the image Inception metric on every frame
# ---------------------------------------------------------------------------------------


class FrameFIDMetric:
    """FID, Inception Score and KID of the frames of clips, by the image modality's ``InceptionMetric``.

    ::

        metric = FrameFIDMetric(weights_path="pt_inception-2015-12-05-6726825d.pth")
        metric.prepare(reference_dataset, device="cuda")
        metric.compute(samples)   # {"frame_fid", "frame_inception_score", "frame_inception_score_std",
                                  #  "frame_kid", "frame_kid_std"}

    The N·T frames of N clips of T frames are scored as N·T images; every argument but
    ``max_reference_clips`` (keep the reference's first clips; None: all) goes to
    ``InceptionMetric`` (``weights_path``, ``reference_stats`` of frames, ``feature``, ...).
    """

    name = "frame-fid"

    def __init__(self, max_reference_clips: int | None = None, **inception_args: Any):
        self.inception = InceptionMetric(**inception_args)
        self.max_reference_clips = max_reference_clips
        self.reference_clip_shape: list[int] | None = None
        self.num_samples: int | None = None
        self.sample_shape: list[int] | None = None

    def prepare(self, reference: Dataset | None = None, device: str | torch.device = "cpu") -> None:
        """Load Inception and embed every frame of the reference clips (or read ``reference_stats``)."""
        frames = None
        if reference is not None and self.inception.reference_stats is None:
            frames = ClipFrames(reference, self.max_reference_clips)
            self.reference_clip_shape = list(frames.clip_shape)
        self.inception.prepare(frames, device)
        if frames is not None:
            self.inception.reference_description.update(
                dataset=type(reference).__name__, clips=frames.num_clips, clip_shape=self.reference_clip_shape
            )

    def compute(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Inception metrics of all frames of ``samples`` (N, C, T, H, W) in [-1, 1]; ``labels`` are unused."""
        _check_clips("the frame-fid metric's samples", samples)
        results = self.inception.compute(clips_to_frames(samples))
        self.num_samples, self.sample_shape = len(samples), list(samples.shape[1:])
        return {f"frame_{key}": value for key, value in results.items()}

    def protocol(self) -> dict[str, Any]:
        """``InceptionMetric``'s protocol for the frames, and how clips became frames."""
        return {
            **self.inception.protocol(),
            "metric": self.name,
            "frames": "every frame of every clip is one image: N clips of T frames are N*T images",
            "num_clips": self.num_samples,
            "clip_shape": self.sample_shape,
            "reference_clip_shape": self.reference_clip_shape,
        }


# ---------------------------------------------------------------------------------------
# Moving digits: centroids, the frame classifier and its cache
# ---------------------------------------------------------------------------------------

MOVING_DIGITS_CLASSIFIER_FORMAT = "ditx-moving-digits-classifier"
# bump when the architecture, the preprocessing or the training procedure changes: it is part of the cache key
MOVING_DIGITS_CLASSIFIER_VERSION = 1
POSITION_DIM = 2
FRAME_FEATURE_DIM = FEATURE_DIM + POSITION_DIM  # classifier features, normalised centroid


def clip_feature_dim(num_frames: int) -> int:
    """Size of a moving-digits clip feature: mean and std of the classifier features, then T centroids."""
    return 2 * FEATURE_DIM + POSITION_DIM * num_frames


def frame_intensity(frames: Tensor) -> Tensor:
    """(..., C, H, W) in [-1, 1] -> (..., H, W) brightness ``clamp((x + 1) / 2, 0, 1)`` averaged over channels."""
    return ((frames.float() + 1) / 2).clamp(0, 1).mean(-3)


def intensity_centroid(frames: Tensor) -> Tensor:
    """(..., C, H, W) in [-1, 1] -> (..., 2) brightness-weighted mean position ``(y, x)`` in pixels.

    Positions are pixel indices (0 at the top-left pixel's centre); a black frame's
    centroid is the canvas centre ``((H - 1) / 2, (W - 1) / 2)``.
    """
    weight = frame_intensity(frames)  # (..., H, W)
    h, w = weight.shape[-2:]
    total = weight.sum((-2, -1))  # (...)
    ys = torch.arange(h, dtype=weight.dtype, device=weight.device)
    xs = torch.arange(w, dtype=weight.dtype, device=weight.device)
    y = (weight.sum(-1) * ys).sum(-1)  # (...)
    x = (weight.sum(-2) * xs).sum(-1)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=weight.dtype, device=weight.device)
    centroid = torch.stack([y, x], -1) / total.clamp_min(1e-12)[..., None]
    return torch.where((total > 0)[..., None], centroid, centre)


def clip_motion_px(clips: Tensor) -> Tensor:
    """(N, C, T, H, W) in [-1, 1] -> (N,) distance in pixels between the first and last frame's centroids."""
    _check_clips("clips", clips, min_frames=2)
    ends = intensity_centroid(clips[:, :, [0, -1]].transpose(1, 2))  # (N, 2 frames, 2)
    return (ends[:, 1] - ends[:, 0]).norm(dim=-1)


def centroid_crops(frames: Tensor, size: int, centroids: Tensor | None = None) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 1, size, size) grey windows centred on each frame's intensity centroid.

    The window's centre is the centroid rounded to the pixel grid; outside the frame is
    background (-1). ``centroids`` (B, 2) are computed when not given.
    """
    if centroids is None:
        centroids = intensity_centroid(frames)
    grey = frames.float().clamp(-1, 1).mean(1)  # (B, H, W)
    pad = size
    padded = F.pad(grey, (pad, pad, pad, pad), value=-1.0)  # (B, H + 2·size, W + 2·size)
    # (B, 2) into the padded frame; a centroid lies inside the frame, so the window lies inside the padding
    top_left = (centroids - (size - 1) / 2).round().long() + pad
    offsets = torch.arange(size, device=frames.device)
    rows = (top_left[:, 0, None] + offsets)[:, :, None]  # (B, size, 1)
    cols = (top_left[:, 1, None] + offsets)[:, None, :]  # (B, 1, size)
    batch = torch.arange(len(frames), device=frames.device)[:, None, None]
    return padded[batch, rows, cols][:, None]  # (B, 1, size, size)


def frame_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of frames predicted as their clip's label: ``predictions`` (N, T), ``labels`` (N,)."""
    if predictions.ndim != 2 or labels.shape != (len(predictions),):
        raise ValueError(
            f"frame_accuracy takes predictions (N, T) and labels (N,), got {tuple(predictions.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return float((predictions == labels[:, None].to(predictions.device)).double().mean())


def clip_consistency(predictions: Tensor) -> Tensor:
    """(N, T) predicted classes -> (N,) fraction of each clip's frames predicted as its most frequent class."""
    if predictions.ndim != 2 or predictions.shape[1] < 1:
        raise ValueError(f"clip_consistency takes predictions (N, T >= 1), got {tuple(predictions.shape)}")
    counts = F.one_hot(predictions.long(), int(predictions.max()) + 1).sum(1)  # (N, classes)
    return counts.max(1).values.double() / predictions.shape[1]


class MovingDigitsClassifier(nn.Module):
    """Frame classifier for moving digits: ``DigitsClassifier`` on a window centred on the digit.

    Input is frames ``(B, C, H, W)`` in [-1, 1] (channels averaged to grey). Each frame is
    cropped to ``crop_size``×``crop_size`` around its intensity centroid (so the network
    sees a centred digit wherever it is on the canvas) and classified by ``digits``, a
    ``DigitsClassifier`` (resized to 16×16 inside when ``crop_size`` is not 16).
    ``features_and_logits`` returns the 66-d frame features (64 scaled penultimate
    features and the centroid normalised to [-1, 1]) and the 10 logits.
    """

    def __init__(self, crop_size: int = CLASSIFIER_INPUT_SIZE):
        super().__init__()
        self.crop_size = crop_size
        self.digits = DigitsClassifier(1)

    def crops(self, frames: Tensor, centroids: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, 1, 16, 16) the centred windows the network classifies."""
        if frames.ndim != 4 or frames.shape[1] not in (1, 3):
            raise ValueError(f"MovingDigitsClassifier expects frames (B, 1 or 3, H, W), got {tuple(frames.shape)}")
        return DigitsClassifier.resize(centroid_crops(frames, self.crop_size, centroids))

    def forward(self, frames: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 10) logits."""
        return self.digits(self.crops(frames))

    def features_and_logits(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) in [-1, 1] -> frame features (B, 66) and logits (B, 10), from one pass."""
        centroids = intensity_centroid(frames)  # (B, 2)
        h, w = frames.shape[-2:]
        position = 2 * centroids / torch.tensor([h - 1, w - 1], dtype=centroids.dtype, device=centroids.device) - 1
        features, logits = self.digits.features_and_logits(self.crops(frames, centroids))
        return torch.cat([features, position.to(features.dtype)], 1), logits


def moving_digits_classifier_settings(
    size: int = 32,
    digit_size: int | None = None,
    num_frames: int = 8,
    num_clips: int = 1500,
    num_test_clips: int = 500,
    data_seed: int = 0,
    seed: int = 0,
    epochs: int = 8,
) -> dict[str, Any]:
    """Everything that determines the trained frame classifier but its data's checksum (added when rendered).

    ``digit_size`` defaults to 7/16 of ``size`` (14 at 32), the moving-digits data's default.
    """
    digit_size = size * 7 // 16 if digit_size is None else int(digit_size)
    return {
        "format": MOVING_DIGITS_CLASSIFIER_FORMAT,
        "version": MOVING_DIGITS_CLASSIFIER_VERSION,
        "data": "render_moving_digits",
        "render": {"num_clips": int(num_clips), "num_frames": int(num_frames), "size": int(size),
                   "digit_size": digit_size, "split": "train", "seed": int(data_seed)},
        "test_render": {"num_clips": int(num_test_clips), "split": "test"},
        "crop_size": digit_size + 2,
        "network": "DigitsClassifier(1) on centroid-centred crops",
        "feature_dim": FEATURE_DIM,
        "seed": int(seed),
        "epochs": int(epochs),
        "frames_per_clip_per_epoch": 1,
        "batch_size": 64,
        "lr": 3e-3,
        "augment": "shift1px@16",
    }  # fmt: skip


def _render(settings: dict[str, Any], split: str) -> tuple[Tensor, Tensor]:
    """Rendered clips as float frames ``(N, T, 1, S, S)`` in [-1, 1] and labels ``(N,)``."""
    from modalities.video.data import render_moving_digits

    r = settings["render"]
    num_clips = r["num_clips"] if split == "train" else settings["test_render"]["num_clips"]
    clips, labels, _ = render_moving_digits(num_clips, r["num_frames"], r["size"], r["digit_size"], split, r["seed"])
    clips = torch.as_tensor(np.ascontiguousarray(clips))  # (N, T, S, S) uint8
    return clips[:, :, None].float() / 127.5 - 1, torch.as_tensor(labels).long()


def _data_sha256(frames: Tensor, labels: Tensor) -> str:
    h = hashlib.sha256()
    h.update(frames.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _predict(model: MovingDigitsClassifier, frames: Tensor, batch_size: int = 1024) -> Tensor:
    """(M, C, H, W) -> (M,) predicted classes."""
    device = next(model.parameters()).device
    return torch.cat(
        [model(frames[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(frames), batch_size)]
    )


def train_moving_digits_classifier(
    settings: dict[str, Any], frames: Tensor, labels: Tensor, device: str | torch.device = "cpu"
) -> MovingDigitsClassifier:
    """Train a ``MovingDigitsClassifier`` on rendered train clips ``frames`` (N, T, 1, S, S), ``labels`` (N,).

    Each epoch shows one random frame of every clip (consecutive frames differ only in the
    digit's place, which the centred crop removes), shifted by up to 1 pixel. Deterministic.
    """
    start = time.perf_counter()
    n, t = frames.shape[:2]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(settings["seed"])
        model = MovingDigitsClassifier(settings["crop_size"])
    crops = torch.cat([model.crops(f) for f in frames.flatten(0, 1).split(4096)])  # (N·T, 1, 16, 16)
    crops = crops.view(n, t, *crops.shape[1:])
    generator = torch.Generator().manual_seed(settings["seed"])
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    batch = settings["batch_size"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["lr"], total_steps=settings["epochs"] * -(-n // batch)
    )
    for _epoch in range(settings["epochs"]):
        order = torch.randperm(n, generator=generator)
        frame = torch.randint(0, t, (n,), generator=generator)  # one frame per clip this epoch
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            x = _shift_1px(crops[idx, frame[idx]], generator).to(device)  # (B, 1, 16, 16)
            loss = F.cross_entropy(model.digits(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():  # unit-RMS features, as the image digits classifier (see DigitsClassifier.features)
        flat = crops.flatten(0, 1)
        hidden = torch.cat([model.digits._hidden(flat[i : i + 4096].to(device)) for i in range(0, len(flat), 4096)])
        model.digits.feature_scale.fill_(1.0 / hidden.pow(2).mean().sqrt().clamp_min(1e-6).item())
    logger.info("trained moving-digits classifier in %.1f s", time.perf_counter() - start)
    return model


def moving_digits_classifier_path(settings: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else ditx_cache_dir()
    return cache / f"moving-digits-classifier-{settings_hash(settings)}.safetensors"


def _load_moving_digits_classifier(path: Path, settings: dict[str, Any]) -> tuple[MovingDigitsClassifier, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    stored = json.loads(metadata.get("settings", "null"))
    if stored != settings:
        raise ValueError(f"settings stored in {path} ({stored}) differ from the requested ones ({settings})")
    model = MovingDigitsClassifier(settings["crop_size"])
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False), metadata


def load_or_train_moving_digits_classifier(
    size: int = 32,
    digit_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    num_frames: int = 8,
    num_clips: int = 1500,
    data_seed: int = 0,
    seed: int = 0,
    epochs: int = 8,
) -> MovingDigitsClassifier:
    """The moving-digits frame classifier for ``size``×``size`` frames, trained at most once.

    Renders the train split (``render_moving_digits(num_clips, num_frames, size,
    digit_size, "train", data_seed)``); its SHA-256 joins the settings, so a change of the
    renderer retrains. Looks for ``moving-digits-classifier-<settings hash>.safetensors``
    in ``cache_dir`` (default ``$DITX_CACHE`` or ``~/.cache/ditx``); if it is missing or
    unreadable (a warning says why), trains (under a minute on 2 CPU cores), measures the
    accuracy on frames of rendered test clips and writes the file atomically. The model is
    frozen, in eval mode, on ``device``, with ``settings``, ``settings_hash``,
    ``weights_sha256`` and ``test_accuracy`` attributes.
    """
    settings = moving_digits_classifier_settings(size, digit_size, num_frames, num_clips, data_seed=data_seed,
                                                 seed=seed, epochs=epochs)  # fmt: skip
    frames, labels = _render(settings, "train")
    settings["train_data_sha256"] = _data_sha256(frames, labels)

    def train_and_score():
        model = train_moving_digits_classifier(settings, frames, labels, device=device).cpu()
        test_frames, test_labels = _render(settings, "test")
        predictions = _predict(model, test_frames.flatten(0, 1)).view(test_frames.shape[:2])
        return model, frame_accuracy(predictions, test_labels)

    return cached_classifier(
        moving_digits_classifier_path(settings, cache_dir), settings, _load_moving_digits_classifier,
        train_and_score, what="moving-digits classifier", min_accuracy=0.97, device=device,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# The moving-digits metric
# ---------------------------------------------------------------------------------------


class MovingDigitsMetric:
    """Accuracy, consistency, motion and Fréchet distances of moving-digits clips (see the module doc).

    ::

        metric = MovingDigitsMetric()
        metric.prepare(MovingDigitsDataset(split="test"), device="cpu")
        metric.compute(samples, labels)
        # {"frame_accuracy", "clip_consistency", "motion_px", "reference_motion_px", "fvd_digits",
        #  "frame_fid_digits", "classifier_reference_accuracy"}

    Samples must have the reference clips' shape ``(C, T, H, W)`` (C = 1 or 3, square
    frames); the classifier is trained for frames of that size. ``frame_accuracy`` needs
    ``labels``; ``classifier_reference_accuracy`` needs a labelled reference.
    """

    name = "moving-digits"

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        digit_size: int | None = None,
        classifier_seed: int = 0,
        classifier_epochs: int = 8,
        classifier_clips: int = 1500,
        classifier_frames: int = 8,
        data_seed: int = 0,
        batch_size: int = 1024,
    ):
        self.cache_dir = cache_dir
        self.digit_size = digit_size
        self.classifier_seed = classifier_seed
        self.classifier_epochs = classifier_epochs
        self.classifier_clips = classifier_clips
        self.classifier_frames = classifier_frames
        self.data_seed = data_seed
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.classifier: MovingDigitsClassifier | None = None
        self.reference_clip_shape: tuple[int, ...] | None = None
        self.reference_frame_features: Tensor | None = None  # (N·T, 66)
        self.reference_clip_features: Tensor | None = None  # (N, 128 + 2T)
        self.reference_accuracy: float | None = None
        self.reference_motion_px: float | None = None
        self.reference_description: dict[str, Any] = {}
        self.num_samples: int | None = None

    def prepare(self, reference: Dataset, device: str | torch.device = "cpu") -> None:
        """Load (or train once) the classifier for the reference's frame size and embed the reference clips."""
        if reference is None:
            raise ValueError("the moving-digits metric needs a reference dataset of clips (the test split)")
        clips, labels = _dataset_clips(reference)
        _check_clips("the moving-digits metric's reference clips", clips, min_frames=2)
        if clips.shape[-1] != clips.shape[-2] or len(clips) < 2:
            raise ValueError(
                f"the moving-digits metric needs at least 2 reference clips with square frames, got shape "
                f"{tuple(clips.shape)}"
            )
        self.device = torch.device(device)
        self.classifier = load_or_train_moving_digits_classifier(
            size=clips.shape[-1], digit_size=self.digit_size, cache_dir=self.cache_dir, device=self.device,
            num_frames=self.classifier_frames, num_clips=self.classifier_clips, data_seed=self.data_seed,
            seed=self.classifier_seed, epochs=self.classifier_epochs,
        )  # fmt: skip
        self.reference_clip_shape = tuple(clips.shape[1:])
        frame_features, clip_features, predictions = self._embed(clips)
        self.reference_frame_features, self.reference_clip_features = frame_features, clip_features
        self.reference_accuracy = None if labels is None else frame_accuracy(predictions, labels)
        self.reference_motion_px = float(clip_motion_px(clips).mean())
        self.reference_description = {
            "dataset": type(reference).__name__,
            "split": getattr(reference, "split", None),
            "size": len(clips),
            "clip_shape": list(self.reference_clip_shape),
            "labelled": labels is not None,
        }

    @torch.no_grad()
    def _embed(self, clips: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C, T, H, W) -> frame features (N·T, 66), clip features (N, 128 + 2T), predictions (N, T)."""
        n, t = clips.shape[0], clips.shape[2]
        frames = clips_to_frames(clips)
        features, predictions = [], []
        for i in range(0, len(frames), self.batch_size):
            f, logits = self.classifier.features_and_logits(frames[i : i + self.batch_size].to(self.device))
            features.append(f.float().cpu())
            predictions.append(logits.argmax(1).cpu())
        frame_features = torch.cat(features)  # (N·T, 66)
        per_clip = frame_features.view(n, t, FRAME_FEATURE_DIM)
        appearance, positions = per_clip[..., :FEATURE_DIM], per_clip[..., FEATURE_DIM:]  # (N, T, 64), (N, T, 2)
        trajectory = positions[:, 1:] - positions[:, :1]  # (N, T - 1, 2), relative to the first frame
        clip_features = torch.cat(
            [appearance.mean(1), appearance.std(1, correction=0), positions[:, 0], trajectory.flatten(1)], 1
        )  # (N, 128 + 2T)
        return frame_features, clip_features, torch.cat(predictions).view(n, t)

    def _check_samples(self, samples: Tensor, labels: Tensor | None) -> None:
        expected = self.reference_clip_shape
        if not isinstance(samples, Tensor) or samples.ndim != 5 or tuple(samples.shape[1:]) != expected:
            got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
            raise ValueError(
                f"moving-digits metric samples must be clips (N, C, T, H, W) = (N, {', '.join(map(str, expected))}) "
                f"in [-1, 1] like the reference clips, got {got}"
            )
        if len(samples) < 2:
            raise ValueError(f"the moving-digits Fréchet distances need at least 2 sample clips, got {len(samples)}")
        if labels is not None and (labels.ndim != 1 or len(labels) != len(samples)):
            raise ValueError(f"labels must be (N,) = ({len(samples)},) class indices, got shape {tuple(labels.shape)}")

    def compute(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Metrics of ``samples`` (N, C, T, H, W) in [-1, 1] generated for ``labels`` (N,) (None: unconditional)."""
        if self.classifier is None:
            raise RuntimeError("MovingDigitsMetric.compute called before prepare(reference, device)")
        self._check_samples(samples, labels)
        frame_features, clip_features, predictions = self._embed(samples)
        result = {
            "clip_consistency": float(clip_consistency(predictions).mean()),
            "motion_px": float(clip_motion_px(samples).mean()),
            "reference_motion_px": self.reference_motion_px,
            "fvd_digits": frechet_distance(self.reference_clip_features, clip_features),
            "frame_fid_digits": frechet_distance(self.reference_frame_features, frame_features),
        }
        if labels is not None:
            result["frame_accuracy"] = frame_accuracy(predictions, labels.cpu().long())
        if self.reference_accuracy is not None:
            result["classifier_reference_accuracy"] = self.reference_accuracy
        self.num_samples = len(samples)
        return result

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of how ``compute``'s numbers are made (call after ``prepare``)."""
        classifier = self.classifier
        t = None if self.reference_clip_shape is None else self.reference_clip_shape[1]
        return {
            "metric": self.name,
            "classifier": {
                "name": "MovingDigitsClassifier (DigitsClassifier on centroid-centred crops)",
                "settings": None if classifier is None else classifier.settings,
                "settings_hash": None if classifier is None else classifier.settings_hash,
                "weights_sha256": None if classifier is None else classifier.weights_sha256,
                "test_accuracy_at_training": None if classifier is None else classifier.test_accuracy,
            },
            "reference": self.reference_description,
            "reference_size": self.reference_description.get("size"),
            "num_samples": self.num_samples,
            "definitions": {
                "intensity": "clamp((x + 1) / 2, 0, 1), averaged over channels",
                "centroid": "intensity-weighted mean pixel (y, x), 0 at the top-left pixel centre; "
                "the canvas centre for a black frame",
                "motion_px": "mean over clips of |centroid(last frame) - centroid(first frame)| in pixels",
                "frame_accuracy": "fraction of all frames classified as the clip's conditioning label",
                "clip_consistency": "mean over clips of the fraction of frames agreeing with the clip's most "
                "frequent predicted class",
                "classifier_reference_accuracy": "frame_accuracy of the reference clips with their labels",
                "frame_feature": f"{FRAME_FEATURE_DIM}-d: {FEATURE_DIM} classifier penultimate features (unit RMS "
                "on training frames) and the centroid scaled to [-1, 1] (2 c / (size - 1) - 1)",
                "clip_feature": f"{'128 + 2T' if t is None else clip_feature_dim(t)}-d: mean and population std "
                f"over frames of the {FEATURE_DIM} classifier features, the first frame's scaled centroid, and "
                "the trajectory: each later frame's scaled centroid minus the first frame's",
                "fvd_digits": "Frechet distance of clip features (unbiased covariances, float64)",
                "frame_fid_digits": "Frechet distance of frame features of all frames of all clips",
            },
            "fid": {"implementation": "torchmetrics.FrechetInceptionDistance on given features", "dtype": "float64"},
            "samples": "clamped to [-1, 1] before cropping",
            "torchmetrics_version": _package_version("torchmetrics"),
        }
