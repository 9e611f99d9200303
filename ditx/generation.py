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
    if recipe.train.mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if recipe.train.mixed_precision == "fp16" and device.type == "cuda":
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
) -> tuple[Tensor, Tensor | None]:
    """``num`` samples in data space (decoded) and the labels they were generated for.

    Batches of ``config.batch_size``; the initial noise of the whole set comes from one
    generator seeded with ``config.seed``, so results do not depend on the batch size.
    """
    config = config or parts.recipe.sample
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if labels is None:
        labels = class_labels(num, parts.num_classes)
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(num, *parts.latent_shape, generator=gen)
    out = []
    batches = range(0, num, config.batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="sampling", unit="batch")
    for start in batches:
        stop = min(start + config.batch_size, num)
        y = None if labels is None else labels[start:stop].to(device)
        with autocast_for(parts.recipe, device):
            z = diffusion_sample(
                model, parts.objective, (stop - start, *parts.latent_shape),
                scheduler=config.scheduler, num_steps=config.num_steps, y=y,
                null_class=model.null_class if y is not None else None,
                guidance_scale=config.guidance_scale if y is not None else 1.0,
                guided_channels=config.guided_channels, device=device,
                noise=noise[start:stop].to(device),
                generator=torch.Generator(device).manual_seed(config.seed + 1 + start),
            )  # fmt: skip
            x = parts.autoencoder.decode(z.float())
        out.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(out), labels


def write_previews(parts: Any, model: torch.nn.Module, out_dir: str | Path, device) -> list[Path]:
    """Sample ``recipe.sample.num_samples`` and write them as the modality's files."""
    samples, labels = generate(parts, model, parts.recipe.sample.num_samples, device)
    return writer_for(parts.recipe.modality)(samples, out_dir, labels)
