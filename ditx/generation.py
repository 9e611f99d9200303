"""Generating samples from a model: what training previews, ``ditx sample`` and ``ditx eval`` share.

``generate`` turns a model + objective + autoencoder into data-space samples through
``ditx.diffusion.sample`` (batched, the initial noise of the whole set from one seeded
generator, so results do not depend on the batch size); ``write_previews`` writes them
as the modality's files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditx.diffusion import sample as diffusion_sample
from ditx.recipe import Recipe, SampleConfig
from ditx.writers import writer_for


def class_labels(num: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor | None:
    """Labels cycling through the classes (each class equally often), None if unconditional."""
    return None if num_classes == 0 else torch.arange(num, device=device) % num_classes


def autocast_for(recipe: Recipe, device: torch.device):
    from ditx.precision import resolve_precision

    precision = resolve_precision(recipe.train.mixed_precision, device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(
    parts: Any,
    model: torch.nn.Module,
    num: int,
    device: torch.device | str = "cpu",
    labels: Tensor | None = None,
    config: SampleConfig | None = None,
    progress: bool = False,
    captions: list[str] | None = None,
    frames: tuple[Tensor, Tensor] | None = None,
    stats: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``num`` samples in data space (decoded) and the labels they were generated for.

    A text recipe's samples are generated for ``captions`` (one per sample), guided
    against ``config.negative_prompt`` (the empty caption by default), with ``labels``
    only when given (else a model with classes gets its null class). Batches of
    ``config.batch_size``; the initial noise of the whole set comes from one generator
    seeded with ``config.seed``, so results do not depend on the batch size.

    ``frames``: frame conditioning, ``(clip, mask)``: a data-space clip (C, T, H, W) and a (T,)
    bool mask of its given frames (``ditx.diffusion.frames.given_frames``) for every sample,
    encoded once; or one clip per sample, (N, C, T, H, W) with (N, T) masks, encoded batch by
    batch. The given latent frames stay clean while the rest is generated.

    ``stats``: a dict in which ``network_evaluations`` (model evaluations per sample) is set.
    """
    config = config or parts.recipe.sample
    device = torch.device(device)
    text = parts.text_encoder
    if text is not None:
        if captions is None or len(captions) != num or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{parts.recipe.name or 'this'} is a text recipe: give one caption (a str) per sample, "
                             f"{num} in all, got {captions if captions is None else len(captions)}")  # fmt: skip
        pooled = model.pooled_embedder is not None
        # the negative prompt's condition, encoded once for the largest batch (each batch takes its rows)
        negative = text.encode([config.negative_prompt] * min(num, config.batch_size)).to(device).model_kwargs(pooled)
    elif captions is not None:
        raise ValueError(f"captions were given, but {parts.recipe.name or 'the recipe'} has no text_encoder")
    was_training = model.training
    model.eval()
    if labels is None and text is None:  # a text recipe's model with classes too: the null class unless given
        labels = class_labels(num, parts.num_classes)
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(num, *parts.latent_shape, generator=gen)
    per_sample = frames is not None and frames[0].ndim == len(parts.latent_shape) + 1
    if per_sample and (len(frames[0]) != num or len(frames[1]) != num):
        raise ValueError(f"per-sample given frames need one clip and mask per sample ({num}), got "
                         f"{len(frames[0])} clips and {len(frames[1])} masks")  # fmt: skip
    given = None if frames is None or per_sample else _encode_given_frames(parts, frames, device)
    if frames is not None and config.frame_class_levels:
        labels = infer_frame_classes(parts, model, frames, labels, config, device, stats, progress)
    out = []
    batches = range(0, num, config.batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="sampling", unit="batch")
    for start in batches:
        stop = min(start + config.batch_size, num)
        y = None if labels is None else labels[start:stop].to(device)
        if per_sample:
            given = _encode_given_frames(parts, (frames[0][start:stop], frames[1][start:stop]), device)
        cond, uncond = {}, {}
        if text is not None:
            cond = text.encode(captions[start:stop]).to(device).model_kwargs(pooled)
            uncond = {k: v[: stop - start] for k, v in negative.items()}
        with autocast_for(parts.recipe, device):
            z = diffusion_sample(
                model, parts.objective, (stop - start, *parts.latent_shape),
                scheduler=config.scheduler, num_steps=config.num_steps, y=y,
                null_class=model.null_class if y is not None else None,
                guidance_scale=config.guidance_scale if y is not None or text is not None else 1.0,
                model_kwargs=cond, uncond_model_kwargs=uncond,
                guided_channels=config.guided_channels, guidance_interval=config.guidance_interval,
                stats=stats, device=device,
                noise=noise[start:stop].to(device),
                generator=torch.Generator(device).manual_seed(config.seed + 1 + start),
                frames=None if given is None else tuple(v.expand(stop - start, *v.shape[1:]) for v in given),
                frame_guidance_scale=1.0 if given is None else config.frame_guidance_scale,
            )  # fmt: skip
            x = parts.autoencoder.decode(z.float())
        out.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(out), labels


def infer_frame_classes(
    parts: Any, model: torch.nn.Module, frames: tuple[Tensor, Tensor], labels: Tensor | None,
    config: SampleConfig, device: torch.device, stats: dict[str, float] | None = None, progress: bool = False,
) -> Tensor:  # fmt: skip
    """``labels`` with each null class replaced by the class the model reads from that sample's
    given frames (``config.frame_class_levels`` noise levels): every frame of the clip held at the
    given frame nearest it (a first frame alone: a still clip of it), in ``config.frame_class_views``
    placements (``ditx.diffusion.frames.shifted_views``) each encoded, and classified by its
    denoising errors (``ditx.diffusion.class_errors``, the levels shared among the views). The
    noise of sample i comes from a generator seeded with ``config.seed + i``, so the classes do
    not depend on the batch size.
    ``stats["class_evaluations"]``: model evaluations per sample this took; ``progress``: a bar."""
    from ditx.diffusion import class_errors
    from ditx.diffusion.frames import hold_given_frames, shifted_views

    levels = config.frame_class_levels
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise ValueError(f"sample.frame_class_levels={levels!r}: allowed a number of noise levels >= 1, or 0 (off)")
    if model.null_class is None or labels is None:
        raise ValueError(f"sample.frame_class_levels={levels} reads the class of given frames: it needs a "
                         f"class-conditional model (with a null class); set it to 0 for this one")  # fmt: skip
    clip, mask = frames
    shared = clip.ndim == len(parts.latent_shape)  # one clip for every sample: read once, for them all
    if shared:
        clip, mask = clip[None], mask[None]
    rows = (labels == model.null_class).nonzero().flatten()
    labels = labels.clone()
    if stats is not None:
        stats["class_evaluations"] = levels * parts.num_classes if len(rows) else 0
    if not len(rows):
        return labels
    groups = [rows[:1]] if shared else [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    for chosen in groups:
        source = torch.zeros_like(chosen) if shared else chosen  # the rows of clip and mask to read
        held = shifted_views(hold_given_frames(clip[source], mask[source]), config.frame_class_views,
                             config.frame_class_shift)  # fmt: skip
        # level i reads view i mod V: views past the number of levels are never read
        views = [_encode_given_frames(parts, (view, mask[source]), device)[0] for view in held[:levels]]
        shape = views[0].shape[1:]
        noise = torch.stack([torch.randn(levels, *shape, generator=torch.Generator().manual_seed(config.seed + i))
                             for i in chosen.tolist()])  # fmt: skip
        with autocast_for(parts.recipe, device):
            errors = class_errors(model, parts.objective, views, parts.num_classes, levels, noise=noise,
                                  progress=progress)  # fmt: skip
        labels[rows if shared else chosen] = errors.argmin(1).to(labels.device)
    return labels


def _encode_given_frames(parts: Any, frames: tuple[Tensor, Tensor], device) -> tuple[Tensor, Tensor]:
    """(data clip (C, T, H, W), (T,) mask) -> (latents (1, C', T', h, w), (1, T') latent mask); clips
    (B, C, T, H, W) with masks (B, T) -> (B, C', T', h, w), (B, T')."""
    from ditx.diffusion.frames import latent_frame_mask

    clip, mask = frames
    if clip.ndim == len(parts.latent_shape):  # one clip for every sample
        clip, mask = clip[None], mask[None]
    if parts.data_shape is not None and tuple(clip.shape[1:]) != tuple(parts.data_shape):
        raise ValueError(f"the given frames make a clip of {tuple(clip.shape[1:])}, the model generates "
                         f"{tuple(parts.data_shape)} (C, frames, H, W)")  # fmt: skip
    with torch.no_grad():
        z = parts.autoencoder.encode(clip.to(device)).float()  # (B, C', T', h, w)
    if tuple(z.shape[1:]) != tuple(parts.latent_shape):
        raise ValueError(f"the given frames encode to {tuple(z.shape[1:])}, the model's latents are "
                         f"{tuple(parts.latent_shape)}")  # fmt: skip
    return z, latent_frame_mask(mask, z.shape[2]).to(device)


def write_previews(
    parts: Any, model: torch.nn.Module, out_dir: str | Path, device, captions: list[str] | None = None
) -> list[Path]:
    """Sample ``recipe.sample.num_samples`` (for ``captions``, a text recipe's) and write them as
    the modality's files."""
    samples, labels = generate(parts, model, parts.recipe.sample.num_samples, device, captions=captions)
    return write_samples(parts.recipe, samples, out_dir, labels, captions)


def cycle_prompts(prompts: list[str], num: int) -> list[str]:
    """``num`` prompts, going round ``prompts`` (each equally often, in order)."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    return [prompts[i % len(prompts)] for i in range(num)]


def write_samples(
    recipe: Recipe, samples: Tensor, out_dir: str | Path, labels: Tensor | None = None,
    captions: list[str] | None = None,
) -> list[Path]:  # fmt: skip
    """Samples as the modality's files; a text recipe's file names carry a slug of their prompt,
    and ``prompts.json`` lists each sample's prompt (with the negative prompt and guidance)."""
    import json

    from ditx.files import atomic_write

    writer = writer_for(recipe.modality)
    written = writer(samples, out_dir, labels) if captions is None else writer(samples, out_dir, labels, captions)
    if captions is not None:
        document = {"prompts": list(captions), "negative_prompt": recipe.sample.negative_prompt,
                    "guidance_scale": recipe.sample.guidance_scale,
                    "files": [str(Path(p).relative_to(out_dir)) for p in written]}  # fmt: skip
        with atomic_write(Path(out_dir) / "prompts.json") as tmp:
            tmp.write_text(json.dumps(document, indent=2) + "\n")
    return written
