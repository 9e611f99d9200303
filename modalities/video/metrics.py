"""Video metrics: FVD with StyleGAN-V's I3D and frame-wise FID/IS/KID with the image Inception metric
(the moving-digits metrics of the tiny recipe, judged by a small frame classifier, are in
``moving_digits_metric.py``; they are described here with the others).

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
For the tiny recipe (``ditx.modalities.video.moving_digits.render_moving_digits``: one scikit-learn digit
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

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from ditx.modalities.image.metrics import InceptionMetric
from torch import Tensor, nn

from ditx.data import Dataset
from ditx.files import file_sha256
from ditx.metrics import FeatureDistanceMetric, Metric

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
        self.split = clips.split
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
        from ditx.modalities.image.io import images_to_uint8

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

    def compute(
        self, samples: Tensor, labels: Tensor | None = None, captions: list[str] | None = None
    ) -> dict[str, float]:
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


class FrameFIDMetric(Metric):
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

    def compute(
        self, samples: Tensor, labels: Tensor | None = None, captions: list[str] | None = None
    ) -> dict[str, float]:
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
