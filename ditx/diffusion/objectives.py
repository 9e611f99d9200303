"""Training objectives: how to noise data, what the model predicts, and the loss.

Every objective follows the backbone's calling convention
``model(x_t, t, y=None, **model_kwargs) -> (B, out_channels(C), *spatial)`` with ``t`` a
float tensor (B,) on the 0..1000 scale, and knows which diffusers schedulers can sample
from what it trained. Tensors may have any number of spatial dims (images, video, triplanes);
losses are averaged over all non-batch dims.

Built-ins (registry names): ``ddpm`` (ε-prediction, learned Σ and DiT's hybrid loss by
default), ``v-prediction`` and ``rectified-flow``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ditx.diffusion.frames import per_frame
from ditx.registry import objectives

__all__ = [
    "SCHEDULERS",
    "VP_SCHEDULERS",
    "FLOW_SCHEDULERS",
    "Objective",
    "DDPMObjective",
    "VPredictionObjective",
    "RectifiedFlowObjective",
    "beta_schedule_values",
]

# Sampler names understood by ``Objective.make_scheduler`` / ``ditx.diffusion.sample``: for the
# DDPM family (ε, v) ancestral DDPM, DDIM (η = 0), DPM-Solver++ 2M and UniPC (bh2, order 2); for
# rectified flow Euler (which is DDIM η = 0 in flow form: x0 = x − σv, ε = x + (1−σ)v give the same
# step), Heun (second order, two evaluations a step) and the multistep DPM-Solver++ 2M and UniPC
# on flow sigmas (second order, one evaluation a step).
VP_SCHEDULERS = ("ddpm", "ddim", "dpm-solver++", "unipc")
FLOW_SCHEDULERS = ("flow-euler", "flow-heun", "flow-dpm-solver++", "flow-unipc")
SCHEDULERS = VP_SCHEDULERS + FLOW_SCHEDULERS
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def mean_flat(x: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean over all non-batch dims: (B, ...) -> (B,); with ``keep`` (bool, broadcastable to x),
    over the kept elements only (0 for a row without any)."""
    if keep is None:
        return x.flatten(1).mean(dim=1)
    keep = keep.expand_as(x).flatten(1)
    return (x.flatten(1) * keep).sum(1) / keep.sum(1).clamp_min(1)


def clean_frames(x_t: Tensor, x0: Tensor, model_kwargs: dict[str, Any] | None) -> tuple[Tensor, Tensor | None]:
    """Frame conditioning in training: ``model_kwargs["frame_mask"]`` (B, T), True where a frame
    along the data's first spatial axis (time) is given clean. Returns x_t with those frames
    replaced by x0's, and the mask of the elements the loss covers (the generated frames;
    None without a frame mask)."""
    mask = (model_kwargs or {}).get("frame_mask")
    if mask is None:
        return x_t, None
    if x0.ndim < 3 or mask.shape != x0.shape[:1] + x0.shape[2:3]:
        raise ValueError(f"frame_mask must be (B, frames) = {tuple(x0.shape[:1] + x0.shape[2:3])} for data "
                         f"(B, C, frames, ...) = {tuple(x0.shape)}, got {tuple(mask.shape)}")  # fmt: skip
    clean = per_frame(mask, x0.ndim)  # (B, 1, T, 1, ...)
    return torch.where(clean, x0, x_t), ~clean


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """(B,) per-sample values -> (B, 1, ..., 1) matching ``like``'s rank, device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def beta_schedule_values(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """The β_t of a named diffusers schedule, in float64 (diffusers computes them in float32).

    ``squaredcos_cap_v2`` is the Improved DDPM cosine schedule, ᾱ(s) = cos²((s + 0.008)/1.008 · π/2),
    with β capped at 0.999.
    """
    n = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion's schedule: linear in sqrt(β)
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        s = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class Objective:
    """Base class: noising process, model target, loss and matching samplers.

    Subclasses set ``name``, ``schedulers`` (the names in ``SCHEDULERS`` they can sample with)
    and implement ``loss`` and ``_scheduler``.
    """

    name: str = "objective"
    schedulers: tuple[str, ...] = ()
    #: model t = scheduler timestep * timestep_scale (diffusers timesteps already use the 0..1000 scale)
    timestep_scale: float = 1.0

    def out_channels(self, in_channels: int) -> int:
        """Channels the model must output for inputs with ``in_channels`` channels."""
        return in_channels

    def loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        *,
        y: Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training loss for clean data ``x0`` (B, C, *spatial).

        ``noise`` (like ``x0``) and ``t`` (B,), in the objective's own units, are drawn when not
        given. Returns ``{"loss": (B,), <component terms>: (B,)}``; reduce ``loss`` with ``.mean()``.
        """
        raise NotImplementedError

    def sample_t(
        self,
        batch_size: int,
        *,
        shape: Sequence[int] | None = None,
        device=None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Training timesteps (B,) in the objective's own units, for data of ``shape`` (C, *spatial)
        (objectives whose schedule depends on the data's size read it; None: the recipe's size)."""
        raise NotImplementedError

    def levels(self, num: int, shape: Sequence[int] | None = None) -> Tensor:
        """``num`` training timesteps (num,) in the objective's own units (as ``loss`` takes them),
        spread as training draws them for data of ``shape`` (C, *spatial): the quantiles at the
        middles of ``num`` equal parts of probability, so their mean loss estimates the training
        loss."""
        raise NotImplementedError

    def model_timestep(self, t: Tensor) -> Tensor:
        """Scheduler timesteps -> the float t the model is conditioned on."""
        return t.float() * self.timestep_scale

    def make_scheduler(self, name: str, num_steps: int, *, device=None, shape: Sequence[int] | None = None):
        """A diffusers scheduler ``name`` (one of ``SCHEDULERS``) configured for this objective,
        with ``num_steps`` inference timesteps already set, for samples of ``shape`` (C, *spatial)."""
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        if name not in self.schedulers:
            raise ValueError(
                f"scheduler {name!r} cannot sample objective {self.name!r}; "
                f"schedulers for {self.name!r}: {', '.join(self.schedulers)}"
            )
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        return self._scheduler(name, num_steps, device, shape)

    def _scheduler(self, name: str, num_steps: int, device, shape: Sequence[int] | None = None):
        raise NotImplementedError

    def model_output_to_scheduler(self, out: Tensor, scheduler) -> Tensor:
        """The part of the model output ``scheduler.step`` expects (all channels by default)."""
        return out

    def noised(self, x0: Tensor, noise: Tensor, t_model: Tensor) -> Tensor:
        """x0 taken forward to the noise level of the model timestep ``t_model`` (B,) (as
        ``model_timestep`` gives it) with ``noise``: what the model sees there in training."""
        raise NotImplementedError

    def _predict(self, model, x_t: Tensor, t: Tensor, y: Tensor | None, model_kwargs) -> Tensor:
        """Run the model and check its output shape; float32 even under bf16 autocast."""
        out = model(x_t, t, y, **(model_kwargs or {}))
        expected = (x_t.shape[0], self.out_channels(x_t.shape[1]), *x_t.shape[2:])
        if tuple(out.shape) != expected:
            raise ValueError(
                f"objective {self.name!r} needs a model output of shape {expected} for input "
                f"{tuple(x_t.shape)}, got {tuple(out.shape)}; build the model with "
                f"out_channels=objective.out_channels(in_channels)"
            )
        return out.float()

    def _noise_and_t(self, x0: Tensor, noise: Tensor | None, t: Tensor | None, generator):
        # Draw on the generator's device so a CPU generator works with CUDA data.
        gen_device = generator.device if generator is not None else x0.device
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        if t is None:
            t = self.sample_t(x0.shape[0], shape=x0.shape[1:], device=gen_device, generator=generator)
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0]},) (one per sample), got {tuple(t.shape)}")
        return noise.to(x0.device), t.to(x0.device)


class _VPObjective(Objective):
    """Shared discrete variance-preserving process x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, t ∈ {0..T-1}.

    Schedule constants are float64 (as in DiT) and follow the diffusers config in
    ``scheduler_config``, so training and every DDPM-family scheduler share one schedule.
    """

    schedulers = VP_SCHEDULERS
    prediction_type = "epsilon"  # diffusers' name for what the model predicts

    def __init__(
        self,
        *,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = False,
    ):
        self.num_train_timesteps = int(num_train_timesteps)
        self.clip_sample = bool(clip_sample)
        self.betas = beta_schedule_values(beta_schedule, self.num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.scheduler_config = dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=self.prediction_type,
        )

    def sample_t(self, batch_size: int, *, shape=None, device=None, generator=None) -> Tensor:
        """Uniform integer steps in [0, T) (B,)."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)

    def levels(self, num: int, shape: Sequence[int] | None = None) -> Tensor:
        """Integer steps at the middles of ``num`` equal parts of [0, T) (training draws them uniformly)."""
        return ((torch.arange(num) + 0.5) * self.num_train_timesteps / num).long()

    def _at(self, values: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        """Gather float64 schedule values at integer steps t (B,), cast to (B, 1, ...) like ``like``."""
        return _broadcast(torch.from_numpy(values)[t.long().cpu()], like)

    def _noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self._at(self.sqrt_alphas_cumprod, t, x0)
        b = self._at(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + b * noise, a, b

    def noised(self, x0: Tensor, noise: Tensor, t_model: Tensor) -> Tensor:
        return self._noised(x0, noise, t_model.round().long())[0].to(x0.dtype)

    @property
    def variance_type(self) -> str:
        return "fixed_small"

    def _scheduler(self, name: str, num_steps: int, device, shape=None):
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

        # Latents are not bounded to [-1, 1], so the predicted x0 is clipped only when asked
        # (``clip_sample=True``: pixel-space data in [-1, 1], ADM's clip_denoised).
        clip = self.clip_sample
        if name == "ddpm":
            # "linspace" spacing runs from T-1 down to 0 like DiT's respacing (no noise on the last step).
            s = DDPMScheduler(
                **self.scheduler_config,
                variance_type=self.variance_type,
                clip_sample=clip,
                timestep_spacing="linspace",
            )
        elif name == "ddim":
            # DDIM steps t -> t - T/num_steps, so only "leading"/"trailing" spacings are consistent;
            # "trailing" starts at T-1 (pure noise).
            s = DDIMScheduler(**self.scheduler_config, clip_sample=clip, timestep_spacing="trailing")
        else:
            # dynamic thresholding with ratio 1 clips x0 to [-1, 1] exactly
            threshold = dict(thresholding=clip, dynamic_thresholding_ratio=1.0, sample_max_value=1.0)
            cls = DPMSolverMultistepScheduler if name == "dpm-solver++" else UniPCMultistepScheduler
            extra = {"algorithm_type": "dpmsolver++"} if name == "dpm-solver++" else {"solver_type": "bh2"}
            s = cls(**self.scheduler_config, solver_order=2, final_sigmas_type="zero", **threshold, **extra)
        s.set_timesteps(num_steps, device=device)
        return s


@objectives.register("ddpm")
class DDPMObjective(_VPObjective):
    """ε-prediction with DiT's defaults: learned Σ and the hybrid loss of Improved DDPM.

    With ``learn_sigma=True`` the model outputs 2C channels, ε and v ∈ [-1, 1], with
    log Σ_t = (v+1)/2 · log β_t + (1 - (v+1)/2) · log β̃_t (β̃_t the posterior variance), and the
    per-sample loss is ``mse + vb``: the ε MSE plus the variational bound term in bits/dim
    (KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t)) for t > 0, the discretized Gaussian decoder NLL at
    t = 0), computed with the predicted mean detached so the VLB only trains Σ.
    With ``learn_sigma=False`` it is plain ε MSE with C output channels.
    """

    name = "ddpm"
    prediction_type = "epsilon"

    def __init__(
        self,
        *,
        learn_sigma: bool = True,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = False,
    ):
        super().__init__(
            beta_schedule=beta_schedule,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            clip_sample=clip_sample,
        )
        self.learn_sigma = bool(learn_sigma)
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, β̃_t); β̃_0 = 0, so its log is clipped to β̃_1.
        self.posterior_variance = self.betas * (1.0 - ab_prev) / (1.0 - ab)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef_x0 = self.betas * np.sqrt(ab_prev) / (1.0 - ab)
        self.posterior_mean_coef_xt = (1.0 - ab_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ab)
        self.log_betas = np.log(self.betas)

    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels if self.learn_sigma else in_channels

    @property
    def variance_type(self) -> str:
        return "learned_range" if self.learn_sigma else "fixed_small"

    def model_output_to_scheduler(self, out: Tensor, scheduler) -> Tensor:
        """Drop the variance channels unless ``scheduler`` samples with the learned variance."""
        uses_variance = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
        if not self.learn_sigma or uses_variance:
            return out
        return out[:, : out.shape[1] // 2]

    def loss(self, model, x0, *, y=None, model_kwargs=None, noise=None, t=None, generator=None):
        """Per-sample ``{"loss", "mse"[, "vb"]}`` (B,); ``t`` are integer steps in [0, T)."""
        noise, t = self._noise_and_t(x0, noise, t, generator)
        x_t, a, b = self._noised(x0, noise, t)
        x_t, keep = clean_frames(x_t, x0, model_kwargs)
        out = self._predict(model, x_t, t.float(), y, model_kwargs)  # (B, C or 2C, *spatial)
        C = x0.shape[1]
        eps, v = out[:, :C], out[:, C:]
        mse = mean_flat((noise.float() - eps) ** 2, keep)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse}
        vb = self._vb(eps.detach(), v, x0.float(), x_t.float(), t, a.float(), b.float(), keep)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb(
        self, eps: Tensor, v: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, a: Tensor, b: Tensor, keep: Tensor | None
    ) -> Tensor:
        """VLB term in bits/dim (B,) for predicted ε (detached by the caller) and interpolation v."""
        coef_x0 = self._at(self.posterior_mean_coef_x0, t, x_t)
        coef_xt = self._at(self.posterior_mean_coef_xt, t, x_t)
        true_mean = coef_x0 * x0 + coef_xt * x_t
        true_log_var = self._at(self.posterior_log_variance_clipped, t, x_t)

        x0_pred = (x_t - b * eps) / a
        model_mean = coef_x0 * x0_pred + coef_xt * x_t
        frac = (v + 1) / 2
        min_log = true_log_var
        max_log = self._at(self.log_betas, t, x_t)
        model_log_var = frac * max_log + (1 - frac) * min_log

        kl = 0.5 * (
            -1.0
            + model_log_var
            - true_log_var
            + torch.exp(true_log_var - model_log_var)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
        )
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        return torch.where(t == 0, mean_flat(nll, keep), mean_flat(kl, keep)) / math.log(2.0)


def _discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for data in [-1, 1] quantized to 256 levels (bins of width 2/255)
    under N(mean, exp(log_scale)²); the edge bins take the tails."""
    inv_std = torch.exp(-log_scale)
    upper = torch.special.ndtr((x - mean + 1 / 255) * inv_std)
    lower = torch.special.ndtr((x - mean - 1 / 255) * inv_std)
    log_cdf_upper = torch.log(upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1 - lower).clamp(min=1e-12))
    log_bin = torch.log((upper - lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))


@objectives.register("v-prediction")
class VPredictionObjective(_VPObjective):
    """v-prediction (Salimans & Ho): target v = √ᾱ_t ε − √(1-ᾱ_t) x0, MSE, C output channels."""

    name = "v-prediction"
    prediction_type = "v_prediction"

    def loss(self, model, x0, *, y=None, model_kwargs=None, noise=None, t=None, generator=None):
        """Per-sample ``{"loss", "mse"}`` (B,); ``t`` are integer steps in [0, T)."""
        noise, t = self._noise_and_t(x0, noise, t, generator)
        x_t, a, b = self._noised(x0, noise, t)
        x_t, keep = clean_frames(x_t, x0, model_kwargs)
        target = a * noise - b * x0
        mse = mean_flat((target.float() - self._predict(model, x_t, t.float(), y, model_kwargs)) ** 2, keep)
        return {"loss": mse, "mse": mse}


@objectives.register("rectified-flow")
class RectifiedFlowObjective(Objective):
    """Rectified flow in diffusers' FlowMatchEuler convention: x_σ = (1−σ) x0 + σ ε, σ ∈ [0, 1],
    the model predicts the velocity ε − x0 at t = 1000·σ.

    Training σ is logit-normal, σ = sigmoid(N(logit_mean, logit_std²)), then shifted by
    σ' = shift·σ / (1 + (shift−1)·σ) (shift > 1 spends more steps at high noise, as for large
    images in SD3). The sampler shifts its σ grid by ``sample_shift`` (default: ``shift``);
    SD3, for example, trains with shift 1 and samples with shift 3.

    ``shift_reference`` (the latent spatial size at which ``shift`` and ``sample_shift`` hold,
    e.g. ``[8, 8, 8]`` frames x height x width) makes both grow with the data's size: at a
    size of ``m`` latent positions against the reference's ``n``, each is multiplied by
    ``sqrt(m / n)``, SD3's resolution rule, which Open-Sora applies to space and time
    together: more tokens carry more redundancy, so the same σ destroys less of the signal.
    """

    name = "rectified-flow"
    schedulers = FLOW_SCHEDULERS
    timestep_scale = 1.0  # FlowMatchEuler timesteps are already σ·1000
    num_train_timesteps = 1000

    def __init__(
        self,
        *,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        sample_shift: float | None = None,
        shift_reference: Sequence[int] | None = None,
    ):
        sample_shift = shift if sample_shift is None else sample_shift
        for key, value in (("shift", shift), ("sample_shift", sample_shift)):
            if value <= 0:
                raise ValueError(f"{key} must be > 0, got {value!r}")
        if logit_std < 0:
            raise ValueError(f"logit_std must be >= 0, got {logit_std!r}")
        if shift_reference is not None and (
            not shift_reference or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shift_reference)
        ):
            raise ValueError(f"objective.shift_reference must be a latent size, positive ints such as [8, 8, 8], "
                             f"got {shift_reference!r}")  # fmt: skip
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.shift, self.sample_shift = float(shift), float(sample_shift)
        self.shift_reference = None if shift_reference is None else tuple(shift_reference)

    def size_factor(self, shape: Sequence[int] | None) -> float:
        """sqrt(positions of ``shape``'s spatial dims / the reference's); 1 without a reference or shape."""
        if self.shift_reference is None or shape is None:
            return 1.0
        spatial = tuple(shape[1:])
        if len(spatial) != len(self.shift_reference):
            raise ValueError(f"objective.shift_reference {list(self.shift_reference)} has {len(self.shift_reference)} "
                             f"dims, but the latents are (C, *spatial) = {tuple(shape)}")  # fmt: skip
        return math.sqrt(math.prod(spatial) / math.prod(self.shift_reference))

    def shift_sigma(self, sigma: Tensor, shift: float | None = None) -> Tensor:
        """σ -> shift·σ / (1 + (shift−1)·σ) (``shift`` default: the objective's); the identity for 1."""
        shift = self.shift if shift is None else shift
        return shift * sigma / (1 + (shift - 1) * sigma)

    def sample_t(self, batch_size: int, *, shape=None, device=None, generator=None) -> Tensor:
        """Shifted logit-normal σ in (0, 1) (B,), the shift scaled to ``shape``'s size."""
        z = torch.randn(batch_size, generator=generator, device=device)
        sigma = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return self.shift_sigma(sigma, self.shift * self.size_factor(shape))

    def levels(self, num: int, shape: Sequence[int] | None = None) -> Tensor:
        """σ at the quantiles (k + 1/2) / ``num`` of the shifted logit-normal training draws (``sample_t``)."""
        z = torch.special.ndtri((torch.arange(num, dtype=torch.float64) + 0.5) / num)
        sigma = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return self.shift_sigma(sigma, self.shift * self.size_factor(shape)).float()

    def loss(self, model, x0, *, y=None, model_kwargs=None, noise=None, t=None, generator=None):
        """Per-sample ``{"loss", "mse"}`` (B,); ``t`` is σ ∈ [0, 1] (B,)."""
        noise, sigma = self._noise_and_t(x0, noise, t, generator)
        s = _broadcast(sigma, x0)
        x_t, keep = clean_frames((1 - s) * x0 + s * noise, x0, model_kwargs)
        out = self._predict(model, x_t, sigma.float() * self.num_train_timesteps, y, model_kwargs)
        mse = mean_flat(((noise - x0).float() - out) ** 2, keep)
        return {"loss": mse, "mse": mse}

    def noised(self, x0: Tensor, noise: Tensor, t_model: Tensor) -> Tensor:
        s = _broadcast(t_model.float() / self.num_train_timesteps, x0).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def _scheduler(self, name: str, num_steps: int, device, shape=None):
        from diffusers import (
            DPMSolverMultistepScheduler,
            FlowMatchEulerDiscreteScheduler,
            FlowMatchHeunDiscreteScheduler,
            UniPCMultistepScheduler,
        )

        shift = self.sample_shift * self.size_factor(shape)
        # Every solver walks the same grid: σ uniform from 1 to 1/num_steps, shifted once, then 0.
        grid = torch.from_numpy(np.linspace(1.0, 1.0 / num_steps, num_steps)).float()
        shifted = self.shift_sigma(grid, shift)
        if name == "flow-euler":
            s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=shift)
            # the scheduler shifts the given σ itself; its default grid would shift σ_min twice
            s.set_timesteps(sigmas=grid.tolist(), device=device)
            return s
        if name == "flow-heun":
            # Heun on each interval of the grid, an Euler step into σ = 0 (where Heun's second
            # slope is undefined): 2·num_steps − 1 evaluations. diffusers' own grid runs to
            # σ_min = 1/1000 and cannot be given, so its schedule is set to ditx's here, in
            # the scheduler's layout (every inner σ twice: the end of one step, the start of the next).
            s = FlowMatchHeunDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=shift)
            s.set_timesteps(num_steps, device=device)
            inner = shifted[1:].repeat_interleave(2)
            s.sigmas = torch.cat([shifted[:1], inner, torch.zeros(1)])
            s.timesteps = (torch.cat([shifted[:1], inner]) * self.num_train_timesteps).to(device)
            return s
        cls = DPMSolverMultistepScheduler if name == "flow-dpm-solver++" else UniPCMultistepScheduler
        extra = {"algorithm_type": "dpmsolver++"} if name == "flow-dpm-solver++" else {"solver_type": "bh2"}
        s = cls(num_train_timesteps=self.num_train_timesteps, use_flow_sigmas=True, prediction_type="flow_prediction",
                flow_shift=shift, solver_order=2, final_sigmas_type="zero", **extra)  # fmt: skip
        if name == "flow-unipc":  # it shifts the given σ itself and moves σ = 1 to 1 − 1e-6 (log(α/σ) finite)
            s.set_timesteps(device=device, sigmas=grid.double().numpy())
        else:  # DPM-Solver++ takes no σ: its grid is ditx's scaled by 1 − 1/1000 before the shift
            s.set_timesteps(num_steps, device=device)
        # Both store timesteps as int64 (σ·1000 truncated); the model is given the σ the solver steps from.
        s.timesteps = (s.sigmas[:-1] * self.num_train_timesteps).float().to(device)
        return s
