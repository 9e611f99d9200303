"""Motion realism of moving-digit clips: where the digit is (intensity centroids), which way it
moves (a small motion-type classifier on the centroid trajectory, trained on rendered clips
and cached), and whether it keeps its shape while it moves (``shape_consistency``).

The moving-digits metric (``moving_digits_metric.py``) reports these beside the test clips'
own values: the motion-type histogram of generated clips against the reference's (total
variation distance), the shape consistency of both, and, for prompted motions, the motion
accuracy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ditx.modalities.video.metrics import _check_clips
from ditx.modalities.video.moving_digits import MOTIONS, render_moving_digits
from torch import Tensor, nn

from ditx.metrics import cached_classifier, judge_cache_path

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Where the digit is: intensity, centroids, centred windows
# ---------------------------------------------------------------------------------------

# a pixel is ink when its intensity clamp((x + 1) / 2, 0, 1) (channels averaged) exceeds this: half-way
# between the black background and white ink, so the anti-aliased rim of a stroke counts when it is mostly ink
INK_THRESHOLD = 0.5


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


def centroid_trajectories(clips: Tensor) -> Tensor:
    """(N, C, T, H, W) in [-1, 1] -> (N, T, 2) each frame's intensity centroid ``(y, x)`` in pixels."""
    _check_clips("clips", clips, min_frames=1)
    return intensity_centroid(clips.transpose(1, 2))


# ---------------------------------------------------------------------------------------
# Shape consistency
# ---------------------------------------------------------------------------------------


def _aligned_ious(masks: Tensor, reference: Tensor, max_shift: int) -> Tensor:
    """Best IoU of ``masks`` (B, S, S) bool against ``reference`` (B, S, S) over shifts of up to ``max_shift``.

    A pair with an empty union scores 0 (see ``shape_consistency``).
    """
    s = masks.shape[-1]
    padded = F.pad(masks, (max_shift,) * 4)  # (B, S + 2m, S + 2m), False outside
    best = torch.zeros(len(masks), dtype=torch.float64, device=masks.device)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            shifted = padded[:, dy : dy + s, dx : dx + s]
            intersection = (shifted & reference).sum((-2, -1)).double()
            union = (shifted | reference).sum((-2, -1)).double()
            best = torch.maximum(best, torch.where(union > 0, intersection / union.clamp_min(1), 0.0))
    return best


def shape_consistency(
    clips: Tensor, threshold: float = INK_THRESHOLD, max_shift: int = 1, batch_size: int = 64
) -> Tensor:
    """(N, C, T, H, W) in [-1, 1] -> (N,) how much each clip's digit keeps its shape, in [0, 1].

    Per clip, the mean over frames ``t >= 1`` of the IoU between frame ``t``'s ink mask
    and frame 0's once the motion is taken out: the ink mask is intensity >
    ``threshold`` (``INK_THRESHOLD``, 0.5: half-way between background and ink), each
    frame's mask is taken in a window centred on the frame's intensity centroid
    (``centroid_crops``; ``2·max(H, W) + 1`` pixels, so it holds every pixel of the frame
    wherever the centroid lies), and the IoU is the best over shifts of frame ``t``'s
    window by up to ``max_shift`` pixels in y and x (so rounding the centroids to the
    pixel grid, or a faint smudge that moves a centroid by a fraction of a pixel, costs
    nothing). A frame pair in which either frame has no ink scores 0 (both inkless
    included): a clip that shows no digit has no shape to keep. A digit translated by
    whole pixels scores 1.
    """
    _check_clips("shape_consistency clips", clips, min_frames=2)
    if not 0 <= threshold < 1:
        raise ValueError(f"shape_consistency threshold must be an intensity in [0, 1), got {threshold!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"shape_consistency max_shift must be a non-negative integer, got {max_shift!r}")
    n, _, t, h, w = clips.shape
    size = 2 * max(h, w) + 1
    grey_threshold = 2 * threshold - 1  # intensity > threshold <=> grey (the crops' scale, [-1, 1]) > this
    scores = []
    for i in range(0, n, batch_size):
        frames = clips[i : i + batch_size].transpose(1, 2)  # (B, T, C, H, W)
        b = len(frames)
        masks = centroid_crops(frames.flatten(0, 1), size)[:, 0] > grey_threshold  # (B·T, S, S)
        masks = masks.view(b, t, size, size)
        first = masks[:, :1].expand(-1, t - 1, -1, -1)  # (B, T - 1, S, S)
        ious = _aligned_ious(masks[:, 1:].flatten(0, 1), first.flatten(0, 1), max_shift)  # (B·(T - 1),)
        scores.append(ious.view(b, t - 1).mean(1))
    return torch.cat(scores).float()


# ---------------------------------------------------------------------------------------
# Motion-type histograms
# ---------------------------------------------------------------------------------------


def motion_histogram(predictions: Tensor, num_types: int = len(MOTIONS)) -> Tensor:
    """(N,) motion types in ``[0, num_types)`` -> (num_types,) float64 fractions summing to 1."""
    predictions = torch.as_tensor(predictions)
    if predictions.ndim != 1 or len(predictions) == 0:
        raise ValueError(
            f"motion_histogram takes a non-empty (N,) tensor of types, got shape {tuple(predictions.shape)}"
        )
    if predictions.min() < 0 or predictions.max() >= num_types:
        raise ValueError(
            f"motion_histogram types must lie in [0, {num_types}), got values from {int(predictions.min())} "
            f"to {int(predictions.max())}"
        )
    return torch.bincount(predictions.long().cpu(), minlength=num_types).double() / len(predictions)


def total_variation(p: Tensor, q: Tensor) -> float:
    """Total variation distance ``0.5 · sum |p - q|`` of two histograms of the same shape (each summing to 1)."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"total_variation takes two histograms (K,) of one shape, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")  # fmt: skip
    for name, h in (("p", p), ("q", q)):
        if (h < 0).any() or abs(float(h.sum()) - 1) > 1e-6:
            raise ValueError(f"total_variation {name} must be non-negative and sum to 1, got {h.tolist()}")
    return 0.5 * float((p - q).abs().sum())


# ---------------------------------------------------------------------------------------
# The motion-type classifier and its cache
# ---------------------------------------------------------------------------------------

MOTION_CLASSIFIER_FORMAT = "ditx-moving-digits-motion-classifier"
# bump when the features, the architecture or the training procedure changes: it is part of the cache key
MOTION_CLASSIFIER_VERSION = 1
MIN_MOTION_FRAMES = 4  # fewer frames do not tell an arc from a bounce
TRAJECTORY_POINTS = 16
TRAJECTORY_SCALE = 4.0  # centred positions / canvas side · 4: of order 1 for the renderer's motions
TRAIN_LENGTHS = (4, 5, 6, 8, 12, 16)
ACCURACY_SETS = ("rendered", "mp4")  # rows of MotionClassifier.accuracies


def trajectory_features(trajectories: Tensor, size: tuple[int, int], points: int = TRAJECTORY_POINTS) -> Tensor:
    """(N, T, 2) centroid positions in pixels of ``size`` = (H, W) frames -> (N, 2·points) features.

    The trajectory minus its mean over time, divided by the canvas side ``(H + W) / 2``
    and multiplied by ``TRAJECTORY_SCALE``, then resampled linearly to ``points`` evenly
    spaced times from the first to the last frame (so any ``T >= 2`` and any frame size
    give the same features for the same motion); y's ``points`` values, then x's.
    """
    if trajectories.ndim != 3 or trajectories.shape[-1] != 2 or trajectories.shape[1] < 2:
        raise ValueError(f"trajectory_features takes trajectories (N, T >= 2, 2), got {tuple(trajectories.shape)}")
    side = (size[0] + size[1]) / 2
    centred = (trajectories.float() - trajectories.float().mean(1, keepdim=True)) * (TRAJECTORY_SCALE / side)
    resampled = F.interpolate(centred.transpose(1, 2), size=points, mode="linear", align_corners=True)  # (N, 2, P)
    return resampled.flatten(1)


class MotionClassifier(nn.Module):
    """Which motion (``MOTIONS``: horizontal, vertical, diagonal, circle) a moving-digit clip shows.

    Input is clips ``(N, C, T, H, W)`` in [-1, 1] with ``T >= MIN_MOTION_FRAMES`` frames
    of any size; the network sees only the intensity-centroid trajectory
    (``trajectory_features``), through a two-hidden-layer MLP (GELU). The buffer
    ``accuracies`` ``(2, 1 + len(MOTIONS))`` holds the accuracy measured when it was
    trained: rows ``ACCURACY_SETS`` (rendered test clips with centroid jitter, and the
    same kind of clips written as MP4 and decoded back), columns all clips then each
    motion type (see ``accuracy_report``).
    """

    def __init__(self, points: int = TRAJECTORY_POINTS, hidden: int = 128):
        super().__init__()
        self.points = points
        self.mlp = nn.Sequential(
            nn.Linear(2 * points, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, len(MOTIONS)),
        )  # fmt: skip
        self.register_buffer("accuracies", torch.full((len(ACCURACY_SETS), 1 + len(MOTIONS)), float("nan")))

    def trajectory_logits(self, trajectories: Tensor, size: tuple[int, int]) -> Tensor:
        """(N, T, 2) centroid trajectories in pixels of ``size`` frames -> (N, 4) logits."""
        return self.mlp(trajectory_features(trajectories, size, self.points))

    def forward(self, clips: Tensor) -> Tensor:
        """(N, C, T, H, W) in [-1, 1] -> (N, 4) logits over ``MOTIONS``."""
        _check_clips("MotionClassifier clips", clips, min_frames=MIN_MOTION_FRAMES)
        return self.trajectory_logits(centroid_trajectories(clips), tuple(clips.shape[-2:]))

    @torch.no_grad()
    def predict(self, clips: Tensor, batch_size: int = 256) -> Tensor:
        """(N, C, T, H, W) in [-1, 1] -> (N,) motion types (indices into ``MOTIONS``), on the CPU."""
        device = next(self.parameters()).device
        return torch.cat(
            [self(clips[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(clips), batch_size)]
        )

    def accuracy_report(self) -> dict[str, dict[str, float]]:
        """``{"rendered": {"all": a, "horizontal": a, ...}, "mp4": {...}}`` from the ``accuracies`` buffer."""
        names = ("all", *MOTIONS)
        return {s: {k: float(v) for k, v in zip(names, row.tolist())} for s, row in zip(ACCURACY_SETS, self.accuracies)}


def motion_classifier_settings(
    size: int = 32,
    digit_size: int | None = None,
    num_frames: int = 8,
    num_clips: int = 2000,
    num_test_clips: int = 600,
    data_seed: int = 0,
    seed: int = 0,
    epochs: int = 30,
) -> dict[str, Any]:
    """Everything that determines the trained motion classifier but its data's checksum (added when rendered).

    It trains on ``num_clips`` rendered train clips of each length in ``TRAIN_LENGTHS``
    (and ``num_frames``) and is scored on ``num_test_clips`` rendered test clips of
    ``num_frames`` frames (another seed: ``data_seed + 1``). ``digit_size`` defaults to
    7/16 of ``size`` (14 at 32), the moving-digits data's default.
    """
    digit_size = size * 7 // 16 if digit_size is None else int(digit_size)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < MIN_MOTION_FRAMES:
        raise ValueError(
            f"the motion classifier needs clips of at least {MIN_MOTION_FRAMES} frames, got num_frames {num_frames!r}"
        )
    return {
        "format": MOTION_CLASSIFIER_FORMAT,
        "version": MOTION_CLASSIFIER_VERSION,
        "data": "render_moving_digits",
        "render": {"num_clips": int(num_clips), "lengths": sorted({*TRAIN_LENGTHS, int(num_frames)}), "size": int(size),
                   "digit_size": digit_size, "split": "train", "seed": int(data_seed)},
        "test_render": {"num_clips": int(num_test_clips), "num_frames": int(num_frames), "split": "test",
                        "seed": int(data_seed) + 1, "jitter_px": 0.5},
        "mp4": {"fps": 8, "crf": 18, "reader": "decord", "clips": "the test_render clips, no jitter"},
        "features": {"points": TRAJECTORY_POINTS, "scale": TRAJECTORY_SCALE, "centred": "mean over time",
                     "side": "(H + W) / 2"},
        "hidden": 128,
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": 128,
        "lr": 3e-3,
        "augment": "random sign of y and of x, time reversal, transpose (horizontal <-> vertical), "
        "Gaussian centroid jitter per frame with sigma ~ U(0, 1) px",
    }  # fmt: skip


def _render_trajectories(settings: dict[str, Any], num_frames: int) -> tuple[Tensor, Tensor, str]:
    """Rendered train clips' centroid trajectories ``(N, T, 2)``, motion types ``(N,)`` and the clips' SHA-256."""
    r = settings["render"]
    num_clips, seed = r["num_clips"], r["seed"]
    clips, _, motions = render_moving_digits(num_clips, num_frames, r["size"], r["digit_size"], "train", seed)
    types = torch.tensor([MOTIONS.index(m) for m in motions])
    sha = hashlib.sha256(np.ascontiguousarray(clips).tobytes() + types.numpy().tobytes()).hexdigest()
    frames = torch.as_tensor(clips)[:, :, None]  # (N, T, 1, S, S) uint8
    trajectories = torch.cat([intensity_centroid(f.float() / 127.5 - 1) for f in frames.split(256)])
    return trajectories, types, sha


def _augment(trajectories: Tensor, types: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random flips, time reversal, transposition (relabelled) and centroid jitter of (B, T, 2) trajectories."""
    b = len(trajectories)
    signs = torch.randint(0, 2, (b, 1, 2), generator=generator).float() * 2 - 1
    x = trajectories * signs  # mirrored about the origin: the features are centred, so no canvas is needed
    reverse = torch.rand(b, generator=generator) < 0.5
    x = torch.where(reverse[:, None, None], x.flip(1), x)
    transpose = torch.rand(b, generator=generator) < 0.5
    x = torch.where(transpose[:, None, None], x.flip(2), x)
    swapped = torch.tensor([MOTIONS.index(m) for m in ("vertical", "horizontal", "diagonal", "circle")])
    types = torch.where(transpose, swapped[types], types)
    sigma = torch.rand(b, 1, 1, generator=generator)  # px
    return x + sigma * torch.randn(x.shape, generator=generator), types


def train_motion_classifier(
    settings: dict[str, Any], data: list[tuple[Tensor, Tensor]], device: str | torch.device = "cpu"
) -> MotionClassifier:
    """Train a ``MotionClassifier`` on ``data``: one ``(trajectories (N, T, 2), types (N,))`` per clip length.

    Each step takes a batch of one length, augmented (``_augment``); every epoch visits
    every clip once. Deterministic for given settings and data.
    """
    start = time.perf_counter()
    size = (settings["render"]["size"],) * 2
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(settings["seed"])
        model = MotionClassifier(settings["features"]["points"], settings["hidden"])
    generator = torch.Generator().manual_seed(settings["seed"])
    model.to(device).train()
    batch = settings["batch_size"]
    steps_per_epoch = sum(-(-len(types) // batch) for _, types in data)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["lr"], total_steps=settings["epochs"] * steps_per_epoch
    )
    for _epoch in range(settings["epochs"]):
        batches = [(k, i) for k, (_, types) in enumerate(data) for i in range(0, len(types), batch)]
        orders = [torch.randperm(len(types), generator=generator) for _, types in data]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            k, i = batches[j]
            idx = orders[k][i : i + batch]
            x, y = _augment(data[k][0][idx], data[k][1][idx], generator)
            loss = F.cross_entropy(model.trajectory_logits(x.to(device), size), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    logger.info("trained the moving-digits motion classifier in %.1f s", time.perf_counter() - start)
    return model.eval().requires_grad_(False)


def _accuracies(predictions: Tensor, types: Tensor) -> list[float]:
    """[accuracy over all clips, then per motion type] (NaN for a type with no clips)."""
    hits = (predictions == types).double()
    return [float(hits.mean())] + [float(hits[types == k].mean()) if (types == k).any() else float("nan")
                                   for k in range(len(MOTIONS))]  # fmt: skip


def mp4_roundtrip(clips: np.ndarray, fps: float = 8, crf: int = 18, folder: str | os.PathLike | None = None) -> Tensor:
    """uint8 grey clips ``(N, T, H, W)`` -> float ``(N, 3, T, H, W)`` in [-1, 1] after the data pipeline's MP4 trip.

    Each clip is written with ``write_video`` (H.264, ``crf``) as the moving-digits data
    is, and read back with decord (``read_frames``) as ``VideoFolderDataset`` reads it, in
    a temporary folder inside ``folder`` (default: the system's), removed afterwards.
    """
    from ditx.modalities.video.clips import read_frames
    from ditx.modalities.video.io import write_video

    with tempfile.TemporaryDirectory(prefix="ditx-motion-mp4-", dir=folder) as tmp:
        paths = [str(Path(tmp) / f"clip_{i:05d}.mp4") for i in range(len(clips))]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # x264 runs outside the GIL
            list(pool.map(lambda job: write_video(job[1], job[0], fps, crf=crf), zip(paths, clips)))
            decoded = list(pool.map(lambda path: read_frames(path, list(range(clips.shape[1]))), paths))
    frames = torch.as_tensor(np.stack(decoded))  # (N, T, H, W, 3) uint8
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def _score(model: MotionClassifier, settings: dict[str, Any]) -> float:
    """Fill ``model.accuracies`` on held-out rendered clips (jittered) and their MP4 round trip; the lower one."""
    test = settings["test_render"]
    r = settings["render"]
    clips, _, motions = render_moving_digits(test["num_clips"], test["num_frames"], r["size"], r["digit_size"],
                                             "test", test["seed"])  # fmt: skip
    types = torch.tensor([MOTIONS.index(m) for m in motions])
    size = (r["size"],) * 2
    trajectories = intensity_centroid(torch.as_tensor(clips)[:, :, None].float() / 127.5 - 1)  # (N, T, 2)
    generator = torch.Generator().manual_seed(settings["seed"] + 1)
    jittered = trajectories + test["jitter_px"] * torch.randn(trajectories.shape, generator=generator)
    with torch.no_grad():
        rendered = model.cpu().trajectory_logits(jittered, size).argmax(1)
    decoded = mp4_roundtrip(clips, settings["mp4"]["fps"], settings["mp4"]["crf"])
    mp4 = model.predict(decoded)
    model.accuracies.copy_(torch.tensor([_accuracies(rendered, types), _accuracies(mp4, types)]))
    return float(model.accuracies[:, 0].min())


def motion_classifier_path(settings: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    return judge_cache_path("moving-digits-motion-classifier", settings, cache_dir)


def load_or_train_motion_classifier(
    size: int = 32,
    digit_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    num_frames: int = 8,
    num_clips: int = 2000,
    data_seed: int = 0,
    seed: int = 0,
    epochs: int = 30,
) -> MotionClassifier:
    """The moving-digits motion classifier for ``size``×``size`` clips of ``num_frames`` frames, trained at most once.

    Renders the train split at every length of the settings (``render_moving_digits(
    num_clips, T, size, digit_size, "train", data_seed)``); their SHA-256 joins the
    settings, so a change of the renderer retrains. Looks for
    ``moving-digits-motion-classifier-<settings hash>.safetensors`` in ``cache_dir``
    (default ``$DITX_CACHE`` or ``~/.cache/ditx``); if it is missing or unreadable (a
    warning says why), trains (about 10 s on 2 idle CPU cores), measures its accuracy on
    rendered test clips with 0.5 px centroid jitter and on the same clips after an MP4
    round trip (``accuracies``; ``test_accuracy`` is the lower of the two, and a warning
    flags it below 0.95), and writes the file atomically. The model is frozen, in eval
    mode, on ``device``, with ``settings``, ``settings_hash``, ``weights_sha256`` and
    ``test_accuracy`` attributes.
    """
    settings = motion_classifier_settings(size, digit_size, num_frames, num_clips, data_seed=data_seed, seed=seed,
                                          epochs=epochs)  # fmt: skip
    data, hashes = [], hashlib.sha256()
    for length in settings["render"]["lengths"]:
        trajectories, types, sha = _render_trajectories(settings, length)
        data.append((trajectories, types))
        hashes.update(sha.encode())
    settings["train_data_sha256"] = hashes.hexdigest()

    def train_and_score():
        model = train_motion_classifier(settings, data, device=device).cpu()
        return model, _score(model, settings)

    return cached_classifier(
        motion_classifier_path(settings, cache_dir), settings, lambda s: MotionClassifier(s["features"]["points"],
        s["hidden"]), train_and_score, what="moving-digits motion classifier", min_accuracy=0.95, device=device,
    )  # fmt: skip
