"""The autoencoder contract every recipe's latent space follows, and the identity (pixel space)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ditx.registry import autoencoders


class Autoencoder(nn.Module):
    """The autoencoder contract: a recipe's latent space (``ditx.registry.autoencoders``
    builds subclasses of this class).

    Required:

    - ``encode(x, sample=False, generator=None)``: data ``(B, *data_shape)`` to *scaled*
      latents (unit variance, ready for diffusion); the posterior mean unless ``sample``;
    - ``decode(z)``: scaled latents back to data (what the modality's writer and metrics take);
    - ``latent_shape(data_shape)``: the latent shape of a data shape ``(C, *spatial)``, so
      tokenizers and caches are checked before any data is seen;
    - ``scaling_factor``: the scale between the autoencoder's raw latents and ``encode``'s.

    Optional hooks, each with a default here:

    - ``freeze()``: eval mode, no gradients (for diffusion training; the default does that);
    - training from scratch (``ditx train-autoencoder`` and two-stage recipes), where
      ``supports_training`` is True: ``trainable()`` (train mode, gradients, float32),
      ``training_loss(x, kl_weight=..., generator=..., **loss_inputs(batch))`` ->
      ``{"loss": scalar, ...parts}``, ``save_pretrained(directory)`` (what the
      autoencoder's ``pretrained`` argument loads back), ``loss_inputs(batch)`` (the batch
      entries besides ``x`` that the loss reads; none by default),
      ``reconstruction_metrics(batch)`` (held-out numbers; MSE and PSNR of
      ``decode(encode(x))`` by default) and ``calibrate_latents(x, training_batches)``
      (after training: make the scaled latents unit-variance; by default one scale from
      the held-out items ``x``, the Latent Diffusion recipe for a new VAE).
    """

    scaling_factor: float = 1.0
    supports_training: bool = False

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement decode")

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        raise NotImplementedError(f"{type(self).__name__} must implement latent_shape")

    def freeze(self) -> Autoencoder:
        """Eval mode without gradients."""
        return self.eval().requires_grad_(False)

    # ---- training from scratch (supports_training) ----------------------------------------

    def _not_trainable(self, what: str):
        return NotImplementedError(
            f"{type(self).__name__} cannot be trained by ditx (no {what}; see ditx.autoencoder.Autoencoder)"
        )

    def trainable(self) -> Autoencoder:
        raise self._not_trainable("trainable()")

    def training_loss(
        self, x: Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None, **inputs: Tensor
    ) -> dict[str, Tensor]:
        raise self._not_trainable("training_loss()")

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        raise self._not_trainable("save_pretrained()")

    def loss_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch entries besides ``x`` that ``training_loss`` takes by name."""
        return {}

    @torch.no_grad()
    def reconstruction_metrics(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Held-out numbers of a batch: MSE and PSNR of ``decode(encode(x))`` with the posterior mean."""
        x = batch["x"]
        mse = float((self.decode(self.encode(x)).float() - x.float()).pow(2).mean())
        return {"mse": mse, "psnr": _psnr(mse)}

    @torch.no_grad()
    def calibrate_latents(self, x: Tensor, training_batches: Iterable[dict[str, Tensor]]) -> None:
        """After training: rescale so that the scaled latents of the held-out items ``x``
        have unit standard deviation (``training_batches``, up to 512 training items in
        batches, are there for autoencoders that fit statistics over more data)."""
        latent_std = float(self.encode(x).float().std())
        if latent_std > 0 and math.isfinite(latent_std):
            self.scaling_factor = float(self.scaling_factor) / latent_std


@autoencoders.register("identity")
class IdentityAutoencoder(Autoencoder):
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


def _psnr(mse: float, data_range: float = 2.0) -> float:
    """PSNR in dB of data in [-1, 1] (range 2)."""
    return 10.0 * math.log10(data_range**2 / mse) if mse > 0 else float("inf")
