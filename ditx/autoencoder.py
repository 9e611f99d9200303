"""The autoencoder protocol every recipe's latent space follows, and the identity (pixel space)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ditx.registry import autoencoders


@runtime_checkable
class Autoencoder(Protocol):
    """What the trainer and sampler need from an autoencoder.

    ``encode`` maps data to *scaled* latents (unit variance, ready for diffusion);
    ``decode`` inverts it. ``latent_shape`` maps a data shape (C, *spatial) to the
    latent shape, so tokenizers and caches can be checked before any data is seen.
    """

    scaling_factor: float

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]: ...


@autoencoders.register("identity")
class IdentityAutoencoder(nn.Module):
    """Pixel-space diffusion: latents are the data (optionally scaled)."""

    def __init__(self, scaling_factor: float = 1.0):
        super().__init__()
        self.scaling_factor = scaling_factor

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        return x * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        return z / self.scaling_factor

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(data_shape)
