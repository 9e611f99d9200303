"""Condition embeddings: diffusion timestep, class label (with a CFG null class), context tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_frequencies(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) float timesteps -> (B, dim) sinusoidal features, cosines first (as DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep -> (B, hidden): sinusoidal features through a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_frequencies(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (B, hidden). Row ``num_classes`` is the null class that labels are
    dropped to with probability ``dropout_prob`` during training (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder needs at least one class, got num_classes={num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"label dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # last row: null class

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """Replace labels by the null class, at random (training) or where ``force_drop`` is true."""
        if force_drop is None:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        else:
            drop = force_drop.bool()
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def forward(self, y: Tensor, train: bool, force_drop: Tensor | None = None) -> Tensor:
        if y.min() < 0 or y.max() > self.num_classes:
            bad = y[(y < 0) | (y > self.num_classes)][0].item()
            raise ValueError(
                f"class label {bad} is out of range: labels are 0..{self.num_classes - 1}, "
                f"{self.null_class} is the null (unconditional) class"
            )
        if (train and self.dropout_prob > 0) or force_drop is not None:
            y = self.drop_labels(y, force_drop)
        return self.embedding_table(y)


class PooledTextProjection(nn.Module):
    """A pooled text embedding (B, pooled_dim) -> (B, hidden), added to the timestep condition
    (SD3 adds CLIP's pooled embedding this way: linear, SiLU, linear)."""

    def __init__(self, pooled_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(pooled_dim, hidden_size)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(pooled.to(self.fc1.weight.dtype))))


class ContextProjection(nn.Module):
    """Context tokens (B, L, context_dim) -> (B, L, hidden), a tanh-GELU MLP as in PixArt."""

    def __init__(self, context_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(context_dim, hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, context: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(context)))
