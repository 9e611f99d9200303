"""Video autoencoders behind ditx's ``Autoencoder`` protocol: an image VAE applied frame by
frame (``framewise-vae``, as Latte does with SD's VAE) and diffusers' 3D causal VAEs
(``video-vae``: CogVideoX's and Wan's).

Videos are (B, C, T, H, W) in [-1, 1]; latents are (B, c, t, h, w), scaled to unit
variance. A framewise VAE keeps every frame (t = T)::

    autoencoder: {name: framewise-vae, pretrained: stabilityai/sd-vae-ft-ema}

and ``config: tiny`` trains from scratch on a CPU with ``ditx train-autoencoder``. A 3D
VAE also compresses time, causally: the first frame is encoded alone, every further
``temporal_factor`` frames become one latent frame, so t = 1 + (T - 1) / 4 for the
released models (49 frames -> 13 latent frames)::

    autoencoder: {name: video-vae, kind: wan, pretrained: Wan-AI/Wan2.1-T2V-1.3B-Diffusers, subfolder: vae}
    autoencoder: {name: video-vae, kind: cogvideox, pretrained: THUDM/CogVideoX-2b, subfolder: vae}
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from ditx.modalities.image.autoencoder import DTYPES, SDVAE, load_pretrained_model
from torch import Tensor, nn

from ditx.autoencoder import Autoencoder

# ======================================================================================
# framewise-vae: an image VAE per frame
# ======================================================================================


def frames_to_batch(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B·T, C, H, W), frames of one video consecutive."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def batch_to_frames(x: Tensor, batch_size: int) -> Tensor:
    """(B·T, C, H, W) -> (B, C, T, H, W); inverts ``frames_to_batch``."""
    bt, c, h, w = x.shape
    return x.reshape(batch_size, bt // batch_size, c, h, w).permute(0, 2, 1, 3, 4).contiguous()


class FramewiseVAE(Autoencoder):
    """SD's VAE (``sd-vae``, diffusers' ``AutoencoderKL``) applied to every frame of a video.

    Latte's latent space: each frame is encoded on its own, so time is not compressed,
    (C, T, H, W) -> (latent_channels, T, H / f, W / f). Frames are folded into the batch
    and go through the image VAE ``chunk_size`` at a time, so memory stays bounded on
    long clips.

    Args:
        pretrained, subfolder, config, scaling_factor, sample_posterior, dtype: as for
            ``ditx.modalities.image.autoencoder.SDVAE`` (``config`` names: ``tiny``, ``tiny-f4``, ``sd``;
            ``scaling_factor`` None takes the VAE config's, 0.18215 for SD's VAE).
        chunk_size: frames per encoder/decoder call (over the whole batch).

    The VAE is frozen for diffusion training; ``trainable()`` and ``training_loss(x)``
    train it from scratch on videos (``ditx train-autoencoder``), the loss taken per
    frame exactly as ``sd-vae`` takes it per image. ``save_pretrained`` writes an
    ``AutoencoderKL`` folder, which both ``framewise-vae`` and ``sd-vae`` load.
    """

    supports_training = True

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        config: str | dict | None = None,
        scaling_factor: float | None = None,
        sample_posterior: bool = False,
        chunk_size: int = 16,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    ):
        super().__init__()
        try:
            self.image_vae = SDVAE(
                pretrained=pretrained,
                subfolder=subfolder,
                config=config,
                scaling_factor=scaling_factor,
                sample_posterior=sample_posterior,
                chunk_size=chunk_size,
                dtype=dtype,
            )
        except (ValueError, TypeError, OSError) as e:  # name the component the recipe used
            raise type(e)(f"framewise-vae (sd-vae applied to every frame): {e}") from e
        self.freeze()

    # ----------------------------------------------------------------------------------
    # the Autoencoder protocol
    # ----------------------------------------------------------------------------------

    @property
    def scaling_factor(self) -> float:
        return self.image_vae.scaling_factor

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:  # train_autoencoder re-measures it
        self.image_vae.scaling_factor = float(value)

    @property
    def vae(self) -> nn.Module:
        """The diffusers ``AutoencoderKL``."""
        return self.image_vae.vae

    @property
    def chunk_size(self) -> int:
        return self.image_vae.chunk_size

    @property
    def downsample_factor(self) -> int:
        return self.image_vae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.image_vae.latent_channels

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, T, H, W) -> (latent_channels, T, H / f, W / f)."""
        if len(data_shape) != 4:
            raise ValueError(f"framewise-vae encodes videos (C, T, H, W); got data shape {tuple(data_shape)}")
        c, t, h, w = (int(s) for s in data_shape)
        latent_c, latent_h, latent_w = self.image_vae.latent_shape((c, h, w))
        return (latent_c, t, latent_h, latent_w)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Videos (B, C, T, H, W) in [-1, 1] -> scaled latents (B, latent_channels, T, H/f, W/f).

        Every frame is encoded as ``sd-vae`` encodes an image: the posterior mean, or a
        posterior sample (noise from ``generator``) when ``sample`` or ``sample_posterior``.
        """
        _check_video(x, "framewise-vae", "x")
        z = self.image_vae.encode(frames_to_batch(x), sample=sample, generator=generator)  # (B·T, c, h, w)
        return batch_to_frames(z, x.shape[0])

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, latent_channels, T, h, w) -> videos (B, C, T, h·f, w·f)."""
        _check_video(z, "framewise-vae", "z")
        return batch_to_frames(self.image_vae.decode(frames_to_batch(z)), z.shape[0])

    # ----------------------------------------------------------------------------------
    # training (ditx train-autoencoder)
    # ----------------------------------------------------------------------------------

    def freeze(self) -> FramewiseVAE:
        """Eval mode, no gradients: how diffusion training uses the VAE."""
        self.image_vae.freeze()
        self.eval()
        return self

    def trainable(self) -> FramewiseVAE:
        """Train mode with gradients and float32 weights (mixed precision comes from autocast)."""
        self.image_vae.trainable()
        self.train()
        return self

    def training_loss(
        self, x: Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``sd-vae``'s loss with every frame of the videos (B, C, T, H, W) as an image:
        reconstruction (L1 summed over a frame's pixels) and KL (summed over a frame's
        latent) averaged over the B·T frames; ``mse`` per pixel, for logging."""
        _check_video(x, "framewise-vae", "x")
        return self.image_vae.training_loss(frames_to_batch(x), kl_weight=kl_weight, generator=generator)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the image VAE (config.json + safetensors, with this ``scaling_factor``) for
        ``FramewiseVAE(pretrained=directory)`` (or ``SDVAE(pretrained=directory)``)."""
        self.image_vae.save_pretrained(directory)

    def extra_repr(self) -> str:
        return f"per frame, chunk_size={self.chunk_size}"


def _check_video(x: Tensor, name: str, what: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name}: {what} must be a batch of videos (B, C, T, H, W), got shape {tuple(x.shape)}")


# ======================================================================================
# video-vae: diffusers' 3D causal VAEs
# ======================================================================================

MODEL_CLASSES = {"cogvideox": "AutoencoderKLCogVideoX", "wan": "AutoencoderKLWan"}

# Architectures for ``config: <name>`` (untrained; a mapping of the model's arguments works
# too, and ``config: {}`` is diffusers' default: the released CogVideoX-5b / Wan 2.1 VAE).
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "cogvideox": {
        # 53k parameters, spatial f = 4, temporal factor 4: for tests and CPU smoke runs
        "tiny": {
            "down_block_types": ["CogVideoXDownBlock3D"] * 3,
            "up_block_types": ["CogVideoXUpBlock3D"] * 3,
            "block_out_channels": [8, 8, 8],
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 2,
            "temporal_compression_ratio": 4,
        },
    },
    "wan": {
        # 14k parameters, spatial f = 4, temporal factor 4
        "tiny": {
            "base_dim": 4,
            "z_dim": 4,
            "dim_mult": [1, 1, 1],
            "num_res_blocks": 1,
            "temperal_downsample": [True, True],  # sic: diffusers' spelling
            "latents_mean": [0.0] * 4,
            "latents_std": [1.0] * 4,
        },
    },
}

VIDEO_OFFLINE_HINT = (
    "a hub id (e.g. 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers' or 'THUDM/CogVideoX-2b', with subfolder 'vae') needs "
    "network access, or a local copy: download it once (then HF_HUB_OFFLINE=1 loads it from the cache) or "
    "pass the path of a folder written by save_pretrained"
)


def _model_class(kind: str):
    import diffusers

    if kind not in MODEL_CLASSES:
        raise ValueError(f"video-vae: unknown kind {kind!r}; kinds: {', '.join(MODEL_CLASSES)}")
    return getattr(diffusers, MODEL_CLASSES[kind])


def load_video_vae(kind: str, pretrained: str, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """``<diffusers class of kind>.from_pretrained`` with errors that name the path and what to do."""
    cls = _model_class(kind)
    where = f"{pretrained!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")

    def same_class(folder: Path) -> None:
        found = json.loads((folder / "config.json").read_text()).get("_class_name")
        if found is not None and found != cls.__name__:
            known = {v: k for k, v in MODEL_CLASSES.items()}
            hint = f"kind: {known[found]}" if found in known else f"a folder holding a {cls.__name__}"
            raise ValueError(
                f"video-vae: pretrained={where} holds a {found}, but kind={kind!r} loads a {cls.__name__}; use {hint}"
            )

    return load_pretrained_model(cls, pretrained, subfolder, torch_dtype, "video-vae", VIDEO_OFFLINE_HINT,
                                 check=same_class)  # fmt: skip


def _video_config_kwargs(kind: str, config: str | dict) -> dict[str, Any]:
    if isinstance(config, str):
        if config not in CONFIGS[kind]:
            raise ValueError(
                f"video-vae: unknown config {config!r} for kind {kind!r}; named configs: "
                f"{', '.join(CONFIGS[kind])} (or a mapping of {MODEL_CLASSES[kind]} arguments)"
            )
        return copy.deepcopy(CONFIGS[kind][config])
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"video-vae: config must be a name ({', '.join(CONFIGS[kind])}) or a mapping, got {config!r}")


class VideoVAE(Autoencoder):
    """A diffusers 3D causal VAE (CogVideoX's or Wan's) behind ditx's ``Autoencoder`` protocol.

    Args:
        kind: ``cogvideox`` (``AutoencoderKLCogVideoX``) or ``wan`` (``AutoencoderKLWan``).
        pretrained: hub id or local folder for ``from_pretrained`` (``THUDM/CogVideoX-2b``,
            ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ... with ``subfolder: vae``).
        subfolder: folder inside ``pretrained``.
        config: an untrained VAE instead: ``tiny`` or a mapping of the model's arguments.
        scaling_factor: see below; ``None`` takes the config's (CogVideoX) or 1 (Wan).
        sample_posterior: encode with a posterior sample instead of its mean.
        tiling: turn on the model's spatial tiling and batch slicing (diffusers'
            ``enable_tiling``/``enable_slicing``) to bound memory on large videos. Tiling
            engages above the tile size only (CogVideoX: half its config's sample_height ×
            sample_width, 240×360 for the released models; Wan: 256×256) and blends tiles,
            so results differ slightly from untiled ones.
        dtype: weight dtype; inputs are cast to it, outputs come back in the input's dtype.

    Scaling: with the posterior ``z`` (B, c, t, h, w), the latents are
    ``(z - mean) / std * scaling_factor``, ``mean`` and ``std`` per channel:

    - CogVideoX: ``mean = 0``, ``std = 1``, ``scaling_factor = config.scaling_factor``
      (0.7 for CogVideoX-2b, 1.15258426 for CogVideoX-5b), as its pipelines do;
    - Wan: ``mean = config.latents_mean``, ``std = config.latents_std`` (16 values each for
      Wan 2.1), ``scaling_factor = 1``, as ``WanPipeline`` does.

    Time: ``temporal_factor`` (4 for the released models) is derived from the config. A
    clip of T frames has t = 1 + (T - 1) / temporal_factor latent frames, and decoding t
    latent frames gives back T frames, for T = 1 + k·``frame_step`` only: Wan's encoder
    reads frames in steps of 4 (T = 1, 5, 9, ...); CogVideoX's decoder needs an odd t,
    so T = 1, 9, 17, ..., 49 (its training length). Other lengths are an error rather
    than frames silently dropped or added. H and W must be multiples of
    ``downsample_factor`` (8 for the released models).

    Frozen (eval mode, no gradients); not trainable by ditx (use ``framewise-vae`` or a
    released VAE).
    """

    def __init__(
        self,
        kind: Literal["cogvideox", "wan"],
        pretrained: str | None = None,
        subfolder: str | None = None,
        config: str | dict | None = None,
        scaling_factor: float | None = None,
        sample_posterior: bool = False,
        tiling: bool = False,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    ):
        super().__init__()
        cls = _model_class(kind)
        if (pretrained is None) == (config is None):
            raise ValueError(
                "video-vae needs exactly one of `pretrained` (a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers with "
                f"subfolder vae, or a local folder) and `config` (an untrained VAE: {', '.join(CONFIGS[kind])} or a "
                f"mapping of {cls.__name__} arguments); got pretrained={pretrained!r}, config={config!r}"
            )
        if dtype not in DTYPES:
            raise ValueError(f"video-vae: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.kind = kind
        if pretrained is not None:
            self.vae = load_video_vae(kind, pretrained, subfolder, DTYPES[dtype])
        else:
            kwargs = _video_config_kwargs(kind, config)
            try:
                self.vae = cls(**kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"video-vae: config {config!r} does not build a {cls.__name__}: {e}") from None
        if next(self.vae.parameters()).dtype != DTYPES[dtype]:
            self.vae.to(dtype=DTYPES[dtype])

        cfg = self.vae.config
        n = self.latent_channels
        # plain floats, not buffers: module.to(bfloat16) must not round them
        self.latents_mean = _per_channel(getattr(cfg, "latents_mean", None), getattr(cfg, "shift_factor", None), n)
        self.latents_std = _per_channel(getattr(cfg, "latents_std", None), None, n, default=1.0)
        if scaling_factor is None:
            scaling_factor = getattr(cfg, "scaling_factor", None) or 1.0
        self.scaling_factor = float(scaling_factor)
        self.sample_posterior = sample_posterior
        self.tiling = tiling
        if tiling:
            for switch in ("enable_tiling", "enable_slicing"):
                if callable(getattr(self.vae, switch, None)):
                    getattr(self.vae, switch)()
        if self.frame_step % self.temporal_factor:
            raise ValueError(
                f"video-vae: a {kind} VAE with temporal factor {self.temporal_factor} is not supported: diffusers "
                f"encodes its frames {self.frame_step} at a time; use a config that compresses time by a divisor "
                f"of {self.frame_step}"
            )
        self.freeze()

    # ----------------------------------------------------------------------------------
    # geometry, derived from the config
    # ----------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        cfg = self.vae.config
        return int(cfg.z_dim if self.kind == "wan" else cfg.latent_channels)

    @property
    def in_channels(self) -> int:
        """Channels of the data (Wan 2.2 folds 2×2 pixel patches into its input channels)."""
        cfg = self.vae.config
        patch = getattr(cfg, "patch_size", None) or 1
        return int(cfg.in_channels) // (patch * patch)

    @property
    def downsample_factor(self) -> int:
        """Spatial compression: 2 per downsampling block (times Wan's pixel patch size)."""
        cfg = self.vae.config
        if self.kind == "wan":
            return 2 ** (len(cfg.dim_mult) - 1) * (getattr(cfg, "patch_size", None) or 1)
        return 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first: 2 per block that also downsamples time."""
        cfg = self.vae.config
        if self.kind == "wan":
            return 2 ** sum(bool(d) for d in cfg.temperal_downsample[: len(cfg.dim_mult) - 1])
        levels = int(math.log2(cfg.temporal_compression_ratio))
        return 2 ** min(levels, len(cfg.block_out_channels) - 1)

    @property
    def frame_step(self) -> int:
        """Clip lengths that round-trip are T = 1 + k·frame_step.

        Wan: diffusers encodes the first frame, then 4 frames at a time (a shorter rest is
        dropped). CogVideoX: the decoder takes latent frames in pairs after an odd first
        group and only decodes the first latent frame to a single frame when t is odd, so
        t must be odd: T = 1 + k·2·temporal_factor.
        """
        return 4 if self.kind == "wan" else 2 * self.temporal_factor

    def _check_frames(self, frames: int, what: str = "T") -> None:
        step = self.frame_step if what == "T" else self.frame_step // self.temporal_factor
        if frames >= 1 and (frames - 1) % step == 0:
            return
        below = 1 + max(frames - 1, 0) // step * step
        allowed = ", ".join(str(1 + k * step) for k in range(4))
        raise ValueError(
            f"video-vae ({self.kind}) takes {'clips' if what == 'T' else 'latents'} of {what} = 1 + k·{step} "
            f"{'frames' if what == 'T' else 'latent frames'} ({allowed}, ...); got {what}={frames}: use "
            f"{what}={below} or {what}={below + step}"
        )

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, T, H, W) -> (latent_channels, 1 + (T - 1) / temporal_factor, H / f, W / f)."""
        if len(data_shape) != 4:
            raise ValueError(f"video-vae encodes videos (C, T, H, W); got data shape {tuple(data_shape)}")
        c, t, h, w = (int(s) for s in data_shape)
        if c != self.in_channels:
            raise ValueError(
                f"video-vae ({self.kind}) takes {self.in_channels}-channel videos, the data has {c} channels "
                f"(data shape {tuple(data_shape)}); set the dataset's channels to {self.in_channels}"
            )
        self._check_frames(t)
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(
                f"video-vae ({self.kind}) downsamples by {f}: frame size {h}x{w} is not divisible by {f}; "
                f"use a size that is a multiple of {f}"
            )
        return (self.latent_channels, 1 + (t - 1) // self.temporal_factor, h // f, w // f)

    # ----------------------------------------------------------------------------------
    # the Autoencoder protocol
    # ----------------------------------------------------------------------------------

    def _normalization(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std as (1, c, 1, 1, 1) float32 tensors on ``like``'s device."""
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Videos (B, C, T, H, W) in [-1, 1] -> scaled latents (B, c, t, h, w), ``latent_shape``'s.

        The posterior mean (diffusers' ``latent_dist``, a diagonal Gaussian), or a
        posterior sample (noise from ``generator``) when ``sample`` or ``sample_posterior``.
        """
        _check_video(x, "video-vae", "x")
        self.latent_shape(x.shape[1:])  # a clear error instead of frames silently dropped
        dist = self.vae.encode(x.to(next(self.vae.parameters()).dtype)).latent_dist
        z = dist.mean
        if sample or self.sample_posterior:
            device = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=torch.float32)
            z = z + dist.std * noise.to(device=z.device, dtype=z.dtype)
        mean, std = self._normalization(z)
        return ((z.float() - mean) / std * self.scaling_factor).to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, c, t, h, w) -> videos (B, C, 1 + (t - 1)·temporal_factor, h·f, w·f)."""
        _check_video(z, "video-vae", "z")
        self._check_frames(z.shape[2], what="t")
        mean, std = self._normalization(z)
        raw = (z.float() / self.scaling_factor * std + mean).to(next(self.vae.parameters()).dtype)
        return self.vae.decode(raw).sample.to(z.dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the VAE (config.json + safetensors) for ``VideoVAE(kind, pretrained=directory)``.

        The config records this object's scaling: CogVideoX's ``scaling_factor``; for Wan,
        whose config has none, ``latents_std / scaling_factor`` (the same latents, in the
        form ``WanPipeline`` reads too).
        """
        if "scaling_factor" in self.vae.config:
            self.vae.register_to_config(scaling_factor=self.scaling_factor)
            self.vae.save_pretrained(str(directory))
            return
        before = self.vae.config.latents_std
        self.vae.register_to_config(latents_std=[s / self.scaling_factor for s in self.latents_std])
        try:
            self.vae.save_pretrained(str(directory))
        finally:  # this object keeps scaling with (latents_std, scaling_factor)
            self.vae.register_to_config(latents_std=before)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, scaling_factor={self.scaling_factor}, f={self.downsample_factor}, "
            f"temporal_factor={self.temporal_factor}, frame_step={self.frame_step}, "
            f"sample_posterior={self.sample_posterior}, tiling={self.tiling}"
        )


def _per_channel(values, scalar: float | None, n: int, default: float = 0.0) -> list[float]:
    """A config's per-channel list (or one scalar for all channels) as n floats."""
    if values is not None:
        values = [float(v) for v in values]
        if len(values) != n:
            raise ValueError(f"video-vae: the config has {len(values)} latents_mean/std values for {n} latent channels")
        return values
    return [float(scalar if scalar is not None else default)] * n
