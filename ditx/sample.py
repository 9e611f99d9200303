"""The sampling job: generate from a trained run (or a converted model) and write files.

``sample_from`` is ``ditx sample``: it loads the weights through ``ditx.build.load_for_sampling``
(a run directory, one of its checkpoints, or a ditx model directory with ``--recipe``),
samples with the recipe's ``sample`` section (``ditx.generation.generate``) and writes the
modality's files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from ditx.build import load_for_sampling
from ditx.generation import cycle_prompts, generate, write_samples
from ditx.writers import writer_for

logger = logging.getLogger("ditx.sample")


def sample_from(
    path: str | Path,
    num: int | None = None,
    out: str | Path | None = None,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    fmt: str | None = None,
    overwrite: bool = False,
    prompts: list[str] | None = None,
    negative_prompt: str | None = None,
    first_frame: str | Path | None = None,
    last_frame: str | Path | None = None,
    extend: str | Path | None = None,
    extend_frames: int | None = None,
) -> Path:
    """``ditx sample``: write ``num`` samples into ``out``; returns ``out``.

    A text recipe samples ``prompts`` (default: the recipe's ``sample.prompts``), going round
    them (each equally often) to ``num`` samples, by default one per prompt; guidance is
    against ``negative_prompt`` (default ``sample.negative_prompt``, the empty caption). Each
    file's name carries a slug of its prompt, and ``prompts.json`` in ``out`` lists them. Other
    recipes write ``num`` (default ``sample.num_samples``) samples for classes in turn.

    ``fmt`` adds a modality-specific format written by the ``<modality>-<fmt>`` writer
    (e.g. ``npz`` for images: ADM's evaluation-suite layout). An ``out`` that already
    holds files is refused before sampling unless ``overwrite`` (which empties it first).

    In Python, e.g.::

        sample_from("runs/video-moving-digits-text-<time>", prompts=["a 7 moving left and right"], num=4)

    Video models trained with ``train.frame_masks`` also generate from given frames:
    ``first_frame`` (an image: image-to-video), ``last_frame`` (with a first frame:
    interpolation), or the first ``extend_frames`` frames of the clip ``extend`` (extension);
    each is resized and centre-cropped to the model's frame size::

        sample_from("runs/video-moving-digits-<time>", first_frame="digit.png", num=4)

    A class-conditional model with ``sample.frame_class_levels`` samples given frames for the
    class it reads from them (``generation.infer_frame_classes``) instead of classes in turn.
    """
    from ditx.files import claim_output_folder

    r, parts, model = load_for_sampling(path, recipe, overrides)
    captions = None
    if negative_prompt is not None:
        r.sample.negative_prompt = negative_prompt
    if r.text_encoder is not None:
        prompts = list(prompts or r.sample.prompts or [])
        if not prompts:
            raise ValueError(f"{r.name or path} is a text recipe: give prompts (--prompt TEXT or --prompts FILE, "
                             f"or sample.prompts in the recipe)")  # fmt: skip
        num = num or len(prompts)
        captions = cycle_prompts(prompts, num)
    elif prompts or negative_prompt is not None:
        raise ValueError(f"{r.name or path} has no text encoder: it samples classes, not prompts")
    extra = writer_for(r.modality, fmt) if fmt else None  # an unknown format fails before sampling
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    parts.autoencoder.to(device)
    if parts.text_encoder is not None:
        parts.text_encoder.to(device)
    num = num or r.sample.num_samples
    out = Path(out) if out else Path(path) / "samples" / f"sample_{r.sample.scheduler}_{r.sample.num_steps}"
    claim_output_folder(out, overwrite=overwrite, what="samples", instead="pass --out DIR for another folder")
    frames = _given_frames(r, parts, first_frame, last_frame, extend, extend_frames)
    labels = None
    if frames is not None and r.sample.frame_class_levels and captions is None and model.null_class is not None:
        labels = torch.full((num,), model.null_class)  # each sample takes the class its given frames show
    samples, labels = generate(parts, model, num, device, labels=labels, progress=True, captions=captions,
                               frames=frames)  # fmt: skip
    write_samples(r, samples, out, labels, captions)
    if extra is not None:
        extra(samples, out, labels)
    logger.info("wrote %d samples to %s", num, out)
    return out


def _given_frames(recipe, parts, first_frame, last_frame, extend, extend_frames) -> tuple[Tensor, Tensor] | None:
    """(clip, mask) of the frames a user gives (``ditx.diffusion.frames.given_frames``), read by the
    modality's reader at the model's frame size; None when none are given."""
    from ditx.diffusion.frames import given_frames
    from ditx.registry import readers

    if first_frame is None and last_frame is None and extend is None:
        if extend_frames is not None:
            raise ValueError("--frames N goes with --extend CLIP (the first N frames of CLIP are kept)")
        return None
    if (extend is None) != (extend_frames is None):
        raise ValueError("extension needs both --extend CLIP and --frames N (the first N frames of CLIP are kept)")
    shape = parts.data_shape
    if shape is None or len(shape) != 4:
        raise ValueError(f"given frames need a video model (C, frames, H, W); this one generates {shape}")
    read = readers.get(recipe.modality)  # an unknown modality: an error listing the readers
    size = tuple(shape[2:])  # (height, width): the given frames are resized to cover it, centre-cropped
    first = None if first_frame is None else read(first_frame, 1, size)
    last = None if last_frame is None else read(last_frame, 1, size)
    start = None if extend is None else read(extend, extend_frames, size)
    return given_frames(shape[1], first=first, last=last, start=start)
