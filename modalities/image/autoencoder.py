"""Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) as a ditx autoencoder (``sd-vae``).

DiT diffuses in the latent space of SD's VAE: a 256×256×3 image becomes a 32×32×4
latent (downsampling f = 8), scaled by 0.18215 to roughly unit variance. Recipes use a
released VAE::

    autoencoder: {name: sd-vae, pretrained: stabilityai/sd-vae-ft-ema}

or train one from scratch (``config: tiny`` trains on a CPU in minutes), with
``ditx train-autoencoder RECIPE`` and then ``autoencoder.pretrained=<its output>``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ditx.autoencoder import Autoencoder

# Architectures for ``config: <name>`` (an untrained VAE, e.g. to train from scratch).
CONFIGS: dict[str, dict[str, Any]] = {
    # f = 2, 32/64 channels: trains on 16×16 digits on a CPU in seconds
    "tiny": {
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 16,
    },
    # f = 4, 32/64/64 channels: 32×32 frames -> 8×8×4 latents (the moving-digits video recipe)
    "tiny-f4": {
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    # the architecture of stabilityai/sd-vae-ft-{ema,mse} (f = 8, 83.7M parameters)
    "sd": {
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
    },
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

OFFLINE_HINT = (
    "a hub id (e.g. 'stabilityai/sd-vae-ft-ema') needs network access, or a local copy: download it "
    "once (then HF_HUB_OFFLINE=1 loads it from the cache) or pass the path of a folder written by "
    "save_pretrained"
)


def _looks_like_path(name: str) -> bool:
    """A string that can only be a local path, never a hub id (``org/name`` or ``name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name.count("/") > 1
        or "\\" in name
        or name in (".", "..")
    )


def load_autoencoder_kl(pretrained: str, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """``AutoencoderKL.from_pretrained`` with errors that name the path and what to do."""
    from diffusers import AutoencoderKL

    return load_pretrained_model(AutoencoderKL, pretrained, subfolder, torch_dtype, "sd-vae", OFFLINE_HINT,
                                 " (or `ditx train-autoencoder`)")  # fmt: skip


def load_pretrained_model(
    cls: Any,
    pretrained: str,
    subfolder: str | None,
    torch_dtype: torch.dtype,
    component: str,
    offline_hint: str,
    written_by: str = "",
    check: Callable[[Path], None] | None = None,
):
    """``cls.from_pretrained`` (a diffusers model) from a local folder or a hub id, with errors
    that name ``component``, the path and what to do; ``check`` sees a local folder first."""
    where = f"{pretrained!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    local = Path(pretrained).expanduser()
    if local.exists():
        target = local / subfolder if subfolder else local
        if not (target / "config.json").is_file():
            raise FileNotFoundError(
                f"{component}: pretrained={where}: {target} has no config.json; pass a folder written by "
                f"{cls.__name__}.save_pretrained{written_by}, or the right subfolder "
                f"(e.g. subfolder: vae for a full pipeline)"
            )
        if check is not None:
            check(target)
        pretrained = str(local)
    elif _looks_like_path(pretrained):
        raise FileNotFoundError(f"{component}: pretrained={where}: no such local directory; {offline_hint}")
    try:
        return cls.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=torch_dtype)
    except Exception as e:  # hub, network and file errors come in many types; say what to do
        raise OSError(f"{component}: could not load pretrained={where}: {e} -- {offline_hint}") from e


def _config_kwargs(config: str | dict) -> dict[str, Any]:
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(
                f"sd-vae: unknown config {config!r}; named configs: {', '.join(CONFIGS)} "
                f"(or a mapping of AutoencoderKL arguments)"
            )
        return copy.deepcopy(CONFIGS[config])
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"sd-vae: config must be a name ({', '.join(CONFIGS)}) or a mapping, got {config!r}")


class SDVAE(Autoencoder):
    """Diffusers' ``AutoencoderKL`` behind ditx's ``Autoencoder`` protocol.

    Args:
        pretrained: hub id or local folder for ``AutoencoderKL.from_pretrained``
            (e.g. ``stabilityai/sd-vae-ft-ema``, DiT's VAE).
        subfolder: folder inside ``pretrained`` (``vae`` for a full SD pipeline repo).
        config: an untrained VAE instead of ``pretrained``: a name from ``CONFIGS``
            (``tiny``, ``tiny-f4``, ``sd``) or a mapping of ``AutoencoderKL`` arguments.
        scaling_factor: latents are ``(posterior - shift_factor) * scaling_factor``;
            ``None`` takes the VAE config's value (0.18215 for SD-VAE as in DiT; for a VAE
            trained by ``ditx train-autoencoder``, the factor that gives unit variance).
        sample_posterior: encode with a posterior sample instead of its mean.
        chunk_size: encode/decode at most this many items at once (bounds memory).
        dtype: weight dtype of the VAE; inputs are cast to it, outputs come back in the
            input's dtype.

    The VAE is frozen (eval mode, no gradients) for diffusion training; ``trainable()``
    unfreezes it and ``training_loss(x)`` gives the loss to train it with.
    """

    supports_training = True

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        config: str | dict | None = None,
        scaling_factor: float | None = None,
        sample_posterior: bool = False,
        chunk_size: int = 32,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    ):
        super().__init__()
        from diffusers import AutoencoderKL

        if (pretrained is None) == (config is None):
            raise ValueError(
                "sd-vae needs exactly one of `pretrained` (a hub id such as stabilityai/sd-vae-ft-ema, or a local "
                f"folder) and `config` (an untrained VAE: {', '.join(CONFIGS)} or a mapping of AutoencoderKL "
                f"arguments); got pretrained={pretrained!r}, config={config!r} (to load a VAE trained from a "
                f"config, override both: autoencoder.pretrained=DIR autoencoder.config=null)"
            )
        if dtype not in DTYPES:
            raise ValueError(f"sd-vae: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"sd-vae: chunk_size must be a positive integer, got {chunk_size!r}")
        if pretrained is not None:
            self.vae = load_autoencoder_kl(pretrained, subfolder, DTYPES[dtype])
        else:
            kwargs = _config_kwargs(config)
            try:
                self.vae = AutoencoderKL(**kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"sd-vae: config {config!r} does not build an AutoencoderKL: {e}") from None
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.sample_posterior = sample_posterior
        self.chunk_size = chunk_size
        if self._weight_dtype() != DTYPES[dtype]:
            self.vae.to(dtype=DTYPES[dtype])
        self.freeze()

    # ----------------------------------------------------------------------------------
    # the Autoencoder protocol
    # ----------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def _weight_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, H, W) -> (latent_channels, H / f, W / f), f = 2 ** (number of blocks - 1)."""
        if len(data_shape) != 3:
            raise ValueError(f"sd-vae encodes images (C, H, W); got data shape {tuple(data_shape)}")
        c, h, w = (int(s) for s in data_shape)
        f, in_channels = self.downsample_factor, int(self.vae.config.in_channels)
        if c != in_channels:
            raise ValueError(
                f"sd-vae takes {in_channels}-channel images, the data has {c} channels "
                f"(data shape {tuple(data_shape)}); set the dataset's channels to {in_channels}"
            )
        if h % f or w % f:
            raise ValueError(
                f"sd-vae downsamples by {f}: image size {h}x{w} is not divisible by {f}; "
                f"use a size that is a multiple of {f}"
            )
        return (self.latent_channels, h // f, w // f)

    def _posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> posterior mean and std, each (B, latent_channels, H/f, W/f), in chunks."""
        means, stds = [], []
        for chunk in x.to(self._weight_dtype()).split(self.chunk_size):
            dist = self.vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return torch.cat(means), torch.cat(stds)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, latent_channels, H/f, W/f).

        The posterior mean, or a sample from the posterior when ``sample`` or
        ``sample_posterior`` is set (noise from ``generator``, drawn for the whole batch
        at once so chunking does not change it).
        """
        mean, std = self._posterior(x)
        z = mean
        if sample or self.sample_posterior:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
            z = mean + std * noise.to(device=mean.device, dtype=mean.dtype)
        return ((z - self.shift_factor) * self.scaling_factor).to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, latent_channels, h, w) -> images (B, C, h·f, w·f), roughly in [-1, 1]."""
        raw = (z / self.scaling_factor + self.shift_factor).to(self._weight_dtype())
        out = [self.vae.decode(chunk).sample for chunk in raw.split(self.chunk_size)]
        return torch.cat(out).to(z.dtype)

    # ----------------------------------------------------------------------------------
    # training (ditx train-autoencoder)
    # ----------------------------------------------------------------------------------

    def trainable(self) -> SDVAE:
        """Train mode with gradients and float32 weights (mixed precision comes from autocast)."""
        if self._weight_dtype() != torch.float32:
            self.vae.to(dtype=torch.float32)
        self.train()
        self.requires_grad_(True)
        return self

    def training_loss(
        self, x: Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The VAE loss of Latent Diffusion without its perceptual and GAN terms.

        ``reconstruction`` is the L1 error of decoding a posterior sample, summed over
        each image's pixels; ``kl`` is KL(posterior || N(0, I)) summed over each latent;
        both are averaged over the batch, so ``kl_weight`` means what it means for SD's
        VAE (1e-6). ``mse`` (per pixel, not differentiated) is for logging.
        """
        dist = self.vae.encode(x.to(self._weight_dtype())).latent_dist
        device = generator.device if generator is not None else dist.mean.device
        noise = torch.randn(dist.mean.shape, generator=generator, device=device, dtype=torch.float32)
        z = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)  # reparameterized
        recon = self.vae.decode(z).sample.float()  # (B, C, H, W)
        target = x.float()
        reconstruction = (recon - target).abs().flatten(1).sum(1).mean()
        kl = dist.kl().float().mean()  # kl() sums over (C, h, w)
        return {
            "loss": reconstruction + kl_weight * kl,
            "reconstruction": reconstruction,
            "kl": kl,
            "mse": (recon.detach() - target).pow(2).mean(),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the VAE (config.json + safetensors) for ``SDVAE(pretrained=directory)``;
        the config records this object's ``scaling_factor``."""
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.vae.save_pretrained(str(directory))

    def extra_repr(self) -> str:
        return (
            f"scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor}, "
            f"f={self.downsample_factor}, sample_posterior={self.sample_posterior}, chunk_size={self.chunk_size}"
        )
