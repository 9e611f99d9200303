"""1-D signals for ditx: a patch tokenizer over time, a dataset of noisy sines whose class is
their frequency, a metric that reads the frequency back with an FFT, and a writer (CSV + PNG).

Each follows its contract in the core (the class it subclasses; its docstring is the
contract) and nothing more:

- tokenizer: a ``ditx.tokenizer.PatchTokenizer`` over one axis, ``("time",)``;
- dataset: a ``ditx.data.Dataset``: items ``{"x": (1, length) in [-1, 1], "y": class}``,
  ``data_shape``, ``num_classes``, ``split`` (``test`` is the metrics' reference), ``seed``
  and ``augment`` (it has no augmentation to turn off);
- metric: a ``ditx.metrics.Metric``: ``prepare(reference, device)``,
  ``compute(samples, labels) -> dict``, ``protocol()``;
- writer: a ``ditx.writers.Writer``: ``write(samples, out_dir, labels) -> list of paths``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ditx.data import Dataset
from ditx.metrics import Metric
from ditx.tokenizer import PatchTokenizer


class SignalPatchTokenizer(PatchTokenizer):
    """(B, C, length) -> one token per ``patch_size`` samples, grid ``("time",)``."""

    def __init__(self, patch_size: int = 8, in_channels: int = 1, hidden_size: int = 64,
                 out_channels: int | None = None):  # fmt: skip
        super().__init__(("time",), (patch_size,), in_channels, hidden_size, out_channels)


def class_frequency(label: int) -> int:
    """Cycles per window of class ``label``: 2, 4, 6, ..."""
    return 2 + 2 * int(label)


class SineWaves(Dataset):
    """Sines of ``class_frequency(y)`` cycles per window, random phase and amplitude in
    [0.5, 0.9], plus a little Gaussian noise; ``split`` ``train`` or ``test`` (other seeds)."""

    def __init__(self, length: int = 64, num_classes: int = 4, num_items: int = 512, split: str = "train",
                 noise: float = 0.02, seed: int = 0, augment: bool = True):  # fmt: skip
        if split not in ("train", "test"):
            raise ValueError(f"sine-waves split must be 'train' or 'test', got {split!r}")
        if length < 4 * class_frequency(num_classes - 1):
            raise ValueError(f"sine-waves length {length} is too short for {num_classes} classes (Nyquist)")
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        self.labels = rng.integers(0, num_classes, num_items)
        t = np.arange(length) / length
        phase = rng.uniform(0, 2 * np.pi, num_items)[:, None]
        amplitude = rng.uniform(0.5, 0.9, num_items)[:, None]
        freq = np.array([class_frequency(y) for y in self.labels])[:, None]
        waves = amplitude * np.sin(2 * np.pi * freq * t[None] + phase)
        waves += noise * rng.standard_normal((num_items, length))
        self.signals = torch.from_numpy(np.clip(waves, -1, 1).astype(np.float32))[:, None]  # (N, 1, length)
        self.data_shape = (1, length)
        self.num_classes, self.split = num_classes, split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.signals[index], "y": int(self.labels[index])}


def dominant_frequency(signals: Tensor) -> Tensor:
    """(N, 1, length) -> the strongest non-constant FFT bin of each signal (cycles per window)."""
    spectrum = torch.fft.rfft(signals[:, 0].float(), dim=-1).abs()
    return spectrum[:, 1:].argmax(dim=-1) + 1


class DominantFrequencyMetric(Metric):
    """Share of samples whose dominant frequency is their class's (``frequency_accuracy``), and
    the same judge on the reference split (``reference_frequency_accuracy``: its ceiling)."""

    def __init__(self) -> None:
        self.reference_accuracy: float | None = None

    def prepare(self, reference: SineWaves, device) -> None:
        labels = torch.as_tensor(reference.labels)
        self.reference_accuracy = self._accuracy(reference.signals, labels)

    @staticmethod
    def _accuracy(signals: Tensor, labels: Tensor) -> float:
        expected = torch.tensor([class_frequency(y) for y in labels.tolist()])
        return float((dominant_frequency(signals) == expected).float().mean())

    def compute(self, samples: Tensor, labels: Tensor | None, captions: list[str] | None = None) -> dict[str, float]:
        if labels is None:
            raise ValueError("dominant-frequency needs class-conditional samples (the class is the frequency)")
        return {"frequency_accuracy": self._accuracy(samples.cpu(), labels.cpu()),
                "reference_frequency_accuracy": self.reference_accuracy}  # fmt: skip

    def protocol(self) -> dict:
        return {"judge": "argmax of |rfft| over bins >= 1 equals 2 + 2 * class"}


def write_signal_samples(samples: Tensor, out_dir: str | Path, labels: Tensor | None = None) -> list[Path]:
    """``signals.csv`` (class, then the values, one sample a row) and ``plot.png`` (one trace a row)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = samples[:, 0].float().clamp(-1, 1).cpu().numpy()
    ys = labels.tolist() if labels is not None else [-1] * len(values)
    with open(out / "signals.csv", "w") as f:
        f.write("class," + ",".join(f"t{i}" for i in range(values.shape[1])) + "\n")
        for y, row in zip(ys, values):
            f.write(f"{y}," + ",".join(f"{v:.5f}" for v in row) + "\n")
    width, row_h = 4 * values.shape[1], 48
    image = Image.new("RGB", (width, row_h * len(values)), "white")
    draw = ImageDraw.Draw(image)
    for k, row in enumerate(values):
        points = [(4 * i, k * row_h + (1 - v) * (row_h - 4) / 2 + 2) for i, v in enumerate(row)]
        draw.line(points, fill=(30, 60, 160), width=1)
        draw.text((2, k * row_h), f"class {ys[k]}", fill=(160, 30, 30))
    image.save(out / "plot.png")
    return [out / "signals.csv", out / "plot.png"]
