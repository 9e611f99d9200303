"""Sampling through diffusers schedulers, with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ditx.diffusion.frames import per_frame
from ditx.diffusion.objectives import Objective

__all__ = ["sample", "apply_guidance", "class_errors"]


def apply_guidance(cond: Tensor, uncond: Tensor, scale: float, guided_channels: int | None = None) -> Tensor:
    """Classifier-free guidance: uncond + scale · (cond − uncond) on the channels (dim 1) being guided.

    ``guided_channels=None`` guides every channel. ``guided_channels=k`` guides only the first k;
    the rest (e.g. learned-variance channels) are taken from ``cond``. DiT's sample.py guides the
    first 3 channels of its 4-channel latents this way, so ``k=3`` reproduces its samples.
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond outputs differ in shape: {tuple(cond.shape)} vs {tuple(uncond.shape)}"
        )
    if scale == 1.0:
        return cond
    k = cond.shape[1] if guided_channels is None else guided_channels
    if not 0 <= k <= cond.shape[1]:
        raise ValueError(f"guided_channels must be in [0, {cond.shape[1]}] or None, got {guided_channels!r}")
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    objective: Objective,
    shape: tuple[int, ...],
    *,
    scheduler: str = "ddim",
    num_steps: int = 50,
    y: Tensor | None = None,
    null_class: int | None = None,
    guidance_scale: float = 1.0,
    guided_channels: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    uncond_model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    noise: Tensor | None = None,
    frames: tuple[Tensor, Tensor] | None = None,
    guidance_interval: tuple[float, float] | None = None,
    stats: dict[str, float] | None = None,
    frame_guidance_scale: float = 1.0,
) -> Tensor:
    """Draw samples of ``shape`` = (B, C, *spatial) from ``model`` trained with ``objective``.

    Args:
        scheduler: one of ``ditx.diffusion.SCHEDULERS`` that ``objective.schedulers`` allows
            (``ddpm``, ``ddim``, ``dpm-solver++`` for DDPM-family objectives; ``flow-euler`` for
            rectified flow).
        y: (B,) class labels, or None for an unconditional model.
        guidance_scale, null_class, guided_channels: classifier-free guidance. When the scale is
            not 1, the model runs once per step on [x, x] with labels [y, null_class] (when ``y``
            is given) and model inputs [model_kwargs, uncond_model_kwargs], and the outputs are
            combined by ``apply_guidance``.
        model_kwargs: extra model inputs (e.g. text ``context``); under guidance, tensors whose
            first dim is B are doubled, unless ``uncond_model_kwargs`` gives their unconditional
            value (e.g. the empty or negative caption's context).
        generator: seeds the initial noise and any stochastic scheduler steps.
        noise: (B, C, *spatial) initial noise to start from instead of drawing it.
        frames: frame conditioning (image-to-video, extension, interpolation): ``(clean, mask)``,
            data ``clean`` (B, C, T, ...) and a (B, T) bool ``mask`` of the frames given. Those
            frames of the sample are ``clean``'s at every step and at the end; the model sees
            the mask (``frame_mask``), so it treats them as clean (as it was trained to).
        guidance_interval: ``(low, high)`` noise levels, on the model's timestep scale divided by
            1000 (σ for rectified flow, t/1000 for DDPM-family objectives; 1 is pure noise):
            guidance only at steps whose level lies in [low, high]; elsewhere the model runs
            once, on the condition alone (Kynkäänniemi et al. 2024, "Applying guidance in a
            limited interval"). None: guidance at every step.
        stats: a dict in which ``network_evaluations`` is set: model evaluations per sample (a
            guided step counts 2, its conditional and unconditional rows).
        frame_guidance_scale: with ``frames``, guidance towards the given frames (1: off): a
            branch without them (no ``frame_mask``, the given frames noised to the step's level
            with the initial ``noise``, as training shows a clip without a mask) is the baseline
            the generated frames are pushed away from, under the class or caption the direction
            is taken at (the sample's own without class guidance; with it, InstructPix2Pix's
            order: none -> frames -> frames and condition, 3 evaluations). Steps outside
            ``guidance_interval`` run without it.

    Returns:
        (B, C, *spatial) samples, in ``dtype`` on ``device``.
    """
    if device is None:
        device = noise.device if noise is not None else next(_parameters(model), torch.empty(0)).device
    device = torch.device(device)
    sched = objective.make_scheduler(scheduler, num_steps, device=device, shape=shape[1:])
    B = shape[0]

    guide = guidance_scale != 1.0
    low, high = _interval(guidance_interval)
    uncond_model_kwargs = dict(uncond_model_kwargs or {})
    if guide:
        if y is None and not uncond_model_kwargs:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs class labels y or an unconditional text condition "
                f"(uncond_model_kwargs); got neither"
            )
        if y is not None and null_class is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs null_class, the model's null label id")
    if y is not None:
        y = torch.as_tensor(y, device=device)
        if y.shape != (B,):
            raise ValueError(f"y must have shape ({B},) for a batch of {B}, got {tuple(y.shape)}")
    model_kwargs = dict(model_kwargs or {})
    keep = None
    if frames is not None:
        clean, frame_mask = frames
        if tuple(clean.shape) != tuple(shape) or tuple(frame_mask.shape) != (B, shape[2]):
            raise ValueError(f"frames must be (clean data of shape {tuple(shape)}, a ({B}, {shape[2]}) bool mask), "
                             f"got {tuple(clean.shape)} and {tuple(frame_mask.shape)}")  # fmt: skip
        frame_mask = frame_mask.to(device=device, dtype=torch.bool)
        keep = per_frame(frame_mask, len(shape))  # (B, 1, T, 1, ...)
        clean = clean.to(device=device, dtype=dtype)
        model_kwargs["frame_mask"] = frame_mask
    unknown = set(uncond_model_kwargs) - set(model_kwargs)
    if unknown:
        raise ValueError(f"uncond_model_kwargs {sorted(unknown)} have no conditional value in model_kwargs")
    frame_guide = frame_guidance_scale != 1.0
    if frame_guide and frames is None:
        raise ValueError(f"frame_guidance_scale={frame_guidance_scale} guides towards given frames: pass frames")
    # the branches a step may run, each (labels, model inputs): conditional, unconditional (class
    # or caption dropped) and, for frame guidance, without the given frames
    cond_branch = (y, model_kwargs)
    uncond_branch = (None if y is None else torch.full_like(y, null_class), {**model_kwargs, **uncond_model_kwargs}) \
        if guide else None  # fmt: skip
    if frame_guide:  # frames dropped: no frame mask, under the condition the frame direction is taken at
        base_y, base_kwargs = uncond_branch if guide else cond_branch
        free_branch = (base_y, {**base_kwargs, "frame_mask": torch.zeros_like(frame_mask)})

    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal shape {tuple(shape)}")
    start = noise.to(device=device, dtype=dtype)  # also the given frames' noise, for frame guidance
    x = start * getattr(sched, "init_noise_sigma", 1.0)
    scaled = sched.scale_model_input if hasattr(sched, "scale_model_input") else lambda v, t: v

    # DDIM clips the predicted x0 but, by default, keeps stepping along the unclipped noise
    # prediction; re-deriving it from the clipped x0 (ADM/GLIDE) keeps the update consistent.
    step_kwargs = {"use_clipped_model_output": True} if _accepts(sched.step, "use_clipped_model_output") else {}
    if _accepts(sched.step, "generator"):  # stochastic steps (DDPM, SDE solvers); UniPC has none
        step_kwargs["generator"] = generator
    timesteps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc=f"sampling ({scheduler})")
    evaluations = 0
    for t in timesteps:
        if keep is not None:
            x = torch.where(keep, clean, x)
        x_in = scaled(x, t)
        t_model = objective.model_timestep(t.reshape(1)).to(device)
        in_interval = low <= t_model.item() / 1000 <= high
        guided, frame_guided = guide and in_interval, frame_guide and in_interval
        inputs = [(x_in, *cond_branch)]
        if guided:
            inputs.append((x_in, *uncond_branch))
        if frame_guided:  # the given frames as the model saw them in training without a mask: noised to this level
            free = torch.where(keep, objective.noised(clean, start, t_model.expand(B)), x)
            inputs.append((scaled(free, t), *free_branch))
        outs = _run_branches(model, inputs, t_model, B).chunk(len(inputs))
        out = outs[0]
        if guided and frame_guided:  # InstructPix2Pix's order: frames against none, then the condition
            out = apply_guidance(outs[1], outs[2], frame_guidance_scale, guided_channels)
            out = out + apply_guidance(outs[0], outs[1], guidance_scale, guided_channels) - outs[1]
        elif guided:
            out = apply_guidance(outs[0], outs[1], guidance_scale, guided_channels)
        elif frame_guided:
            out = apply_guidance(outs[0], outs[1], frame_guidance_scale, guided_channels)
        evaluations += len(inputs)
        out = objective.model_output_to_scheduler(out, sched).to(dtype)
        x = sched.step(out, t, x, **step_kwargs).prev_sample
    if stats is not None:
        stats["network_evaluations"] = evaluations
    return x if keep is None else torch.where(keep, clean, x)


@torch.no_grad()
def class_errors(
    model: Callable[..., Tensor],
    objective: Objective,
    x0: Tensor | Sequence[Tensor],
    num_classes: int,
    levels: int,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> Tensor:
    """The model as a classifier of ``x0`` (B, C, *spatial): (B, ``num_classes``) denoising errors,
    each the geometric mean of its training loss under that class over ``levels`` noise levels
    spread as training draws them (``Objective.levels``); the likeliest class has the least
    (``errors.argmin(1)``). A diffusion classifier (Li et al. 2023, "Your Diffusion Model is
    Secretly a Zero-Shot Classifier"): the classes are compared on the same noise at every level,
    so they differ only in the label. The geometric mean compares them by the ratio of their
    losses at each level, so every level weighs alike; an arithmetic mean is ruled by the noisiest
    levels, whose losses are the largest (the tiny bucketed recipe's first frames read right in
    0.914-0.953 per bucket against 0.891-0.945, docs/video.md). ``x0`` may also be a sequence of
    V views of the same samples (``ditx.diffusion.frames.shifted_views``): level i then noises view
    i mod V, so each view is read at levels spread over the range and the model's errors on one
    view do not decide alone. ``noise``: (B, levels, C, *spatial), else drawn from ``generator``.
    ``num_classes * levels`` model evaluations of the batch; ``progress``: a bar over the levels."""
    if levels < 1 or num_classes < 1:
        raise ValueError(f"class_errors needs levels >= 1 and num_classes >= 1, got {levels} and {num_classes}")
    views = [x0] if isinstance(x0, Tensor) else list(x0)
    if not views or any(v.shape != views[0].shape for v in views):
        raise ValueError(f"class_errors takes x0 (B, C, *spatial) or views of one shape, got "
                         f"{[tuple(v.shape) for v in views]}")  # fmt: skip
    x0 = views[0]
    B = x0.shape[0]
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn((B, levels, *x0.shape[1:]), generator=generator, device=gen_device, dtype=x0.dtype)
    if tuple(noise.shape) != (B, levels, *x0.shape[1:]):
        raise ValueError(f"noise must be (B, levels, C, *spatial) = {(B, levels, *x0.shape[1:])}, "
                         f"got {tuple(noise.shape)}")  # fmt: skip
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    errors = torch.zeros(B, num_classes, device=x0.device)
    steps = enumerate(objective.levels(levels, shape=x0.shape[1:]).to(x0.device))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=levels, desc="reading the class", unit="level")
    for i, t in steps:
        for c in range(num_classes):
            y = torch.full((B,), c, device=x0.device, dtype=torch.long)
            loss = objective.loss(model, views[i % len(views)], y=y, model_kwargs=model_kwargs, noise=noise[:, i],
                                  t=t.expand(B))  # fmt: skip
            errors[:, c] += loss["mse"].float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return (errors / levels).exp()


def _run_branches(model, inputs, t_model: Tensor, B: int) -> Tensor:
    """One model call on the branches stacked along the batch: [(x, y, kwargs), ...] -> (n·B, ...).
    Tensors of the kwargs with a first dim of B are stacked; the rest are shared."""
    if len(inputs) == 1:
        x, y, kwargs = inputs[0]
        return model(x, t_model.expand(B), y, **kwargs)
    xs = torch.cat([x for x, _, _ in inputs])
    ys = None if inputs[0][1] is None else torch.cat([y for _, y, _ in inputs])
    kwargs = {
        k: torch.cat([kw[k] for _, _, kw in inputs]) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == B else v
        for k, v in inputs[0][2].items()
    }  # fmt: skip
    return model(xs, t_model.expand(len(xs)), ys, **kwargs)


def _interval(interval) -> tuple[float, float]:
    if interval is None:
        return 0.0, 1.0
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval must be [low, high] noise levels with 0 <= low <= high <= 1 "
                         f"(1: pure noise), got {interval!r}")  # fmt: skip
    return low, high


def _accepts(fn, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def _parameters(model):
    return model.parameters() if isinstance(model, torch.nn.Module) else iter(())
