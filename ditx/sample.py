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

from ditx.build import load_for_sampling
from ditx.generation import generate
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
) -> Path:
    """``ditx sample``: write ``num`` samples (default ``sample.num_samples``) into ``out``.

    ``fmt`` adds a modality-specific format written by the ``<modality>-<fmt>`` writer
    (e.g. ``npz`` for images: ADM's evaluation-suite layout). An ``out`` that already
    holds files is refused before sampling unless ``overwrite`` (which empties it first).
    """
    from ditx.files import claim_output_folder

    r, parts, model = load_for_sampling(path, recipe, overrides)
    extra = writer_for(r.modality, fmt) if fmt else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    parts.autoencoder.to(device)
    num = num or r.sample.num_samples
    out = Path(out) if out else Path(path) / "samples" / f"sample_{r.sample.scheduler}_{r.sample.num_steps}"
    claim_output_folder(out, overwrite=overwrite, what="samples", instead="pass --out DIR for another folder")
    samples, labels = generate(parts, model, num, device, progress=True)
    writer_for(r.modality)(samples, out, labels)
    if extra is not None:
        extra(samples, out, labels)
    logger.info("wrote %d samples to %s", num, out)
    return out
