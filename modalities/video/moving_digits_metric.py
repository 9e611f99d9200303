"""The moving-digits metrics of the tiny video recipe: a small frame classifier (trained on
rendered clips, cached) judges what digit each generated frame shows, whether a clip keeps
its digit, and how far the digit moves; a motion-type classifier and a shape-consistency
score (``motion.py``) judge whether it moves and keeps its shape like the test clips."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ditx.modalities.image.digits_classifier import CLASSIFIER_INPUT_SIZE, FEATURE_DIM, DigitsClassifier, _shift_1px
from ditx.modalities.video.metrics import _check_clips, _dataset_clips, clips_to_frames
from ditx.modalities.video.motion import (
    INK_THRESHOLD,
    MIN_MOTION_FRAMES,
    MOTIONS,
    TRAJECTORY_POINTS,
    MotionClassifier,
    centroid_crops,
    frame_intensity,  # noqa: F401  (re-exported: it was defined here)
    intensity_centroid,
    load_or_train_motion_classifier,
    motion_histogram,
    shape_consistency,
    total_variation,
)
from ditx.modalities.video.moving_digits import MovingDigitsDataset, parse_caption
from torch import Tensor, nn

from ditx.data import Dataset
from ditx.metrics import Metric, cached_classifier, frechet_distance, judge_cache_path
from ditx.registry import package_version

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Moving digits: the frame classifier and its cache (centroids and crops are in motion.py)
# ---------------------------------------------------------------------------------------

MOVING_DIGITS_CLASSIFIER_FORMAT = "ditx-moving-digits-classifier"
# bump when the architecture, the preprocessing or the training procedure changes: it is part of the cache key
MOVING_DIGITS_CLASSIFIER_VERSION = 1
POSITION_DIM = 2
FRAME_FEATURE_DIM = FEATURE_DIM + POSITION_DIM  # classifier features, normalised centroid


def clip_feature_dim(num_frames: int) -> int:
    """Size of a moving-digits clip feature: mean and std of the classifier features, then T centroids."""
    return 2 * FEATURE_DIM + POSITION_DIM * num_frames


def clip_motion_px(clips: Tensor) -> Tensor:
    """(N, C, T, H, W) in [-1, 1] -> (N,) distance in pixels between the first and last frame's centroids."""
    _check_clips("clips", clips, min_frames=2)
    ends = intensity_centroid(clips[:, :, [0, -1]].transpose(1, 2))  # (N, 2 frames, 2)
    return (ends[:, 1] - ends[:, 0]).norm(dim=-1)


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
    from ditx.modalities.video.moving_digits import render_moving_digits

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
    return judge_cache_path("moving-digits-classifier", settings, cache_dir)


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
        moving_digits_classifier_path(settings, cache_dir), settings, lambda s: MovingDigitsClassifier(s["crop_size"]),
        train_and_score, what="moving-digits classifier", min_accuracy=0.97, device=device,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# The moving-digits metric
# ---------------------------------------------------------------------------------------


class MovingDigitsMetric(Metric):
    """Accuracy, consistency, motion and Fréchet distances of moving-digits clips (see the module doc).

    ::

        metric = MovingDigitsMetric()
        metric.prepare(MovingDigitsDataset(split="test"), device="cpu")
        metric.compute(samples, labels, motions=None)  # motions: one name of MOTIONS per sample
        # {"frame_accuracy", "clip_consistency", "motion_px", "reference_motion_px", "fvd_digits",
        #  "frame_fid_digits", "classifier_reference_accuracy", "shape_consistency",
        #  "reference_shape_consistency", "motion_tv", "motion_histogram_<type>",
        #  "reference_motion_histogram_<type>" for each type of MOTIONS, "motion_accuracy"}

    Samples must have the reference clips' shape ``(C, T, H, W)`` (C = 1 or 3); the frame
    classifier is trained for digits of 7/16 of the shorter side (the data's default), the
    motion classifier for square canvases (its keys are left out for others). ``frame_accuracy`` needs
    ``labels``; ``classifier_reference_accuracy`` needs a labelled reference;
    ``motion_accuracy`` needs ``motions`` (the motion each sample was prompted with). The
    motion-type keys need clips of at least ``MIN_MOTION_FRAMES`` (4) frames and are left
    out for shorter ones.
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
        self.motion_classifier: MotionClassifier | None = None
        self.reference_motion_histogram: Tensor | None = None  # (len(MOTIONS),) float64
        self.reference_shape_consistency: float | None = None
        self.reference_description: dict[str, Any] = {}
        self.num_samples: int | None = None
        self.held_out_pairs: set[tuple[int, str]] = set()

    def prepare(self, reference: Dataset, device: str | torch.device = "cpu") -> None:
        """Load (or train once) the classifiers for the reference's clip shape and score the reference clips."""
        if reference is None:
            raise ValueError("the moving-digits metric needs a reference dataset of clips (the test split)")
        clips, labels = _dataset_clips(reference)
        _check_clips("the moving-digits metric's reference clips", clips, min_frames=2)
        if len(clips) < 2:
            raise ValueError(f"the moving-digits metric needs at least 2 reference clips, got {tuple(clips.shape)}")
        self.device = torch.device(device)
        side = min(clips.shape[-2:])  # the digits are 7/16 of the shorter side (write_moving_digits)
        self.classifier = load_or_train_moving_digits_classifier(
            size=side, digit_size=self.digit_size, cache_dir=self.cache_dir, device=self.device,
            num_frames=self.classifier_frames, num_clips=self.classifier_clips, data_seed=self.data_seed,
            seed=self.classifier_seed, epochs=self.classifier_epochs,
        )  # fmt: skip
        self.reference_clip_shape = tuple(clips.shape[1:])
        frame_features, clip_features, predictions = self._embed(clips)
        self.reference_frame_features, self.reference_clip_features = frame_features, clip_features
        self.reference_accuracy = None if labels is None else frame_accuracy(predictions, labels)
        self.reference_motion_px = float(clip_motion_px(clips).mean())
        self.reference_shape_consistency = float(shape_consistency(clips).mean())
        self.motion_classifier, self.reference_motion_histogram = None, None
        if clips.shape[2] >= MIN_MOTION_FRAMES and clips.shape[-1] == clips.shape[-2]:  # trained on square canvases
            self.motion_classifier = load_or_train_motion_classifier(
                size=clips.shape[-1], digit_size=self.digit_size, cache_dir=self.cache_dir, device=self.device,
                num_frames=clips.shape[2], data_seed=self.data_seed, seed=self.classifier_seed,
            )  # fmt: skip
            self.reference_motion_histogram = motion_histogram(self.motion_classifier.predict(clips))
        # the (digit, motion) pairs a captioned dataset's training split never shows
        self.held_out_pairs = set(reference.held_out_pairs) if isinstance(reference, MovingDigitsDataset) else set()
        self.reference_description = {
            "dataset": type(reference).__name__,
            "split": reference.split,
            "size": len(clips),
            "clip_shape": list(self.reference_clip_shape),
            "labelled": labels is not None,
            "held_out_pairs": sorted(f"{d} {m}" for d, m in self.held_out_pairs),
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

    def _check_samples(self, samples: Tensor, labels: Tensor | None, motions: Sequence[str] | None) -> None:
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
        if motions is None:
            return
        if isinstance(motions, str) or len(motions) != len(samples):
            got = repr(motions) if isinstance(motions, str) else f"{len(motions)} names"
            raise ValueError(f"motions must be one motion name per sample ({len(samples)}), got {got}")
        unknown = sorted({repr(m) for m in motions if m not in MOTIONS})
        if unknown:
            raise ValueError(
                f"unknown motions {', '.join(unknown)}; the moving-digits motions are {', '.join(MOTIONS)}"
            )
        if self.motion_classifier is None:
            raise ValueError(
                f"motion_accuracy needs square clips of at least {MIN_MOTION_FRAMES} frames, the reference has "
                f"{'x'.join(map(str, self.reference_clip_shape[1:]))}"
            )

    def compute(
        self,
        samples: Tensor,
        labels: Tensor | None = None,
        captions: list[str] | None = None,
        *,
        motions: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Metrics of ``samples`` (N, C, T, H, W) in [-1, 1] generated for ``labels`` (N,) (None: unconditional)
        and, when given, the ``motions`` they were prompted with (one name of ``MOTIONS`` per sample).

        ``captions`` (a text recipe's prompts) say the digit and motion asked for
        (``parse_caption``): they give ``motions`` (and the labels when none are given), and
        the accuracies are also reported apart for prompts whose (digit, motion) pair the
        training split showed (``_seen``) and for the reference's held-out pairs (``_held_out``)."""
        if self.classifier is None:
            raise RuntimeError("MovingDigitsMetric.compute called before prepare(reference, device)")
        asked = None
        if captions is not None:
            if len(captions) != len(samples):
                raise ValueError(f"captions must be one per sample ({len(samples)}), got {len(captions)}")
            asked = [parse_caption(c) for c in captions]
            unparsed = [c for c, (d, m) in zip(captions, asked) if d is None or m is None]
            if unparsed:
                raise ValueError(f"the moving-digits metric reads digit and motion from each prompt; it cannot read "
                                 f"{unparsed[0]!r} (e.g. 'a 7 moving left and right')")  # fmt: skip
            motions = [m for _, m in asked] if motions is None else motions
            labels = torch.tensor([d for d, _ in asked]) if labels is None else labels
        self._check_samples(samples, labels, motions)
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
        result["shape_consistency"] = float(shape_consistency(samples).mean())
        result["reference_shape_consistency"] = self.reference_shape_consistency
        if self.motion_classifier is not None:
            predicted = self.motion_classifier.predict(samples)  # (N,) indices into MOTIONS
            histogram = motion_histogram(predicted)
            result["motion_tv"] = total_variation(histogram, self.reference_motion_histogram)
            reference = self.reference_motion_histogram.tolist()
            for name, generated, expected in zip(MOTIONS, histogram.tolist(), reference):
                result[f"motion_histogram_{name}"] = generated
                result[f"reference_motion_histogram_{name}"] = expected
            if motions is not None:
                prompted = torch.tensor([MOTIONS.index(m) for m in motions])
                result["motion_accuracy"] = float((predicted == prompted).double().mean())
        if asked is not None:  # seen and held-out prompts apart
            held_out = torch.tensor([pair in self.held_out_pairs for pair in asked])
            for group, members in (("seen", ~held_out), ("held_out", held_out)):
                result[f"num_samples_{group}"] = float(members.sum())
                if not members.any():
                    continue
                result[f"frame_accuracy_{group}"] = frame_accuracy(predictions[members], labels.cpu().long()[members])
                result[f"clip_consistency_{group}"] = float(clip_consistency(predictions[members]).mean())
                if self.motion_classifier is not None:
                    result[f"motion_accuracy_{group}"] = float((predicted == prompted)[members].double().mean())
        self.num_samples = len(samples)
        return result

    def _describe_motion_classifier(self) -> dict[str, Any]:
        motion = self.motion_classifier
        shape = self.reference_clip_shape
        return {
            "name": "MotionClassifier (MLP on the intensity-centroid trajectory)",
            "used": motion is not None,
            "why_not": None if motion is not None or shape is None else (
                f"clips of {shape[1]} frames, fewer than {MIN_MOTION_FRAMES}" if shape[1] < MIN_MOTION_FRAMES
                else f"frames of {shape[2]}x{shape[3]}: it is trained on square canvases"),
            "settings": None if motion is None else motion.settings,
            "settings_hash": None if motion is None else motion.settings_hash,
            "weights_sha256": None if motion is None else motion.weights_sha256,
            "test_accuracy_at_training": None if motion is None else motion.test_accuracy,
            "test_accuracies_at_training": None if motion is None else motion.accuracy_report(),
        }  # fmt: skip

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
            "motion_classifier": self._describe_motion_classifier(),
            "reference": self.reference_description,
            "reference_size": self.reference_description.get("size"),
            "num_samples": self.num_samples,
            "definitions": {
                "prompts": "a text recipe's captions, read by parse_caption for the digit and motion asked for; "
                "_seen / _held_out: the accuracies over prompts whose (digit, motion) pair the training split "
                "showed / over the reference's held_out_pairs",
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
                "ink": f"intensity > {INK_THRESHOLD}",
                "shape_consistency": "mean over clips of the mean over frames t >= 1 of the IoU of frame t's ink "
                "mask with frame 0's, both in windows of 2 max(H, W) + 1 pixels centred on their (rounded) "
                "centroids, best over shifts of frame t's window by up to 1 pixel in y and x; a pair in which "
                "either frame has no ink scores 0; a digit translated by whole pixels scores 1",
                "reference_shape_consistency": "shape_consistency of the reference clips",
                "motion_type": f"the motion classifier's prediction among {', '.join(MOTIONS)} from the centroid "
                f"trajectory (minus its mean, divided by the canvas side, resampled to {TRAJECTORY_POINTS} times)",
                "motion_histogram_<type>": "fraction of sample clips predicted as <type>",
                "reference_motion_histogram_<type>": "fraction of reference clips predicted as <type>",
                "motion_tv": "total variation distance 0.5 sum |p - q| between the motion-type histograms of the "
                "samples and of the reference clips",
                "motion_accuracy": "fraction of sample clips whose predicted motion type is the prompted one",
            },
            "fid": {"implementation": "torchmetrics.FrechetInceptionDistance on given features", "dtype": "float64"},
            "samples": "clamped to [-1, 1] before cropping",
            "torchmetrics_version": package_version("torchmetrics"),
        }
