"""A recipe's stages in order, above the jobs: ``ditx train`` runs this.

A one-stage recipe is the DiT trainer alone. A two-stage recipe
(``autoencoder_train.first_stage``, e.g. ``video/moving-digits``, ``shape3d/primitives``)
first trains its autoencoder into ``<run>/autoencoder`` (the train-autoencoder job) and,
with ``autoencoder_train.cache_latents``, encodes the dataset once into ``<run>/latents``
(the cache-latents job), then trains the DiT on those latents. Each stage is skipped when
its output is already complete (a resumed run), and the run's ``config.yaml`` is rewritten
to point at them relative to the run folder (``${run}/...``), so the run can be moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ditx.build import RUN, resolve_run_paths, run_relative
from ditx.files import atomic_write
from ditx.recipe import Recipe
from ditx.train import Trainer, first_stage_pending

logger = logging.getLogger("ditx.train")


def train_recipe(recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Every stage of ``recipe`` into one run folder; returns it (arguments as ``ditx.train.train``).

    A run's own ``config.yaml`` names what the run holds relative to it (``${run}/autoencoder``):
    those paths are taken in ``run_dir``, so ``ditx train RUN/config.yaml --run-dir RUN --resume``
    continues a run wherever it has moved."""
    held = [v for v in (recipe.autoencoder.args.get("pretrained"), recipe.train.latent_cache)
            if isinstance(v, str) and v.startswith(RUN)]  # fmt: skip
    if held:
        if run_dir is None:
            raise ValueError(f"the recipe refers to a run's own files ({', '.join(held)}): it is a run's "
                             f"config.yaml; pass that run's folder as --run-dir (with --resume to continue "
                             f"it)")  # fmt: skip
        resolve_run_paths(recipe, Path(run_dir))
    trainer = Trainer(recipe, run_dir, resume=resume, overwrite=overwrite)  # the run folder, claimed
    if first_stage_pending(recipe):
        first_stage(recipe, trainer.run_dir, trainer.accelerator)
    return trainer.run()


def first_stage(recipe: Recipe, run_dir: Path, accelerator) -> None:
    """Train the autoencoder into ``<run>/autoencoder`` unless it is there, cache the latents
    if the recipe asks, and point ``recipe`` (and the run's ``config.yaml``) at both. The
    main process works; the others wait for it."""
    from ditx.cache import cache_latents
    from ditx.train_autoencoder import train_autoencoder

    out = run_dir / "autoencoder"
    if accelerator.is_main_process and not out.exists():
        logger.info("stage 1: training the autoencoder into %s", out)
        train_autoencoder(recipe, out=out)
    accelerator.wait_for_everyone()
    recipe.autoencoder.args["pretrained"] = str(out)
    recipe.autoencoder.args.pop("config", None)
    if recipe.autoencoder_train.cache_latents:
        if not recipe.train.latent_cache:
            recipe.train.latent_cache = str(run_dir / "latents")
        if accelerator.is_main_process:
            logger.info("encoding the dataset once into %s", recipe.train.latent_cache)
            cache_latents(recipe)  # resumable; returns at once when complete
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # paths inside the run written relative to it (${run}/...)
        with atomic_write(run_dir / "config.yaml") as tmp:
            tmp.write_text(run_relative(recipe, run_dir).to_yaml())
    logger.info("stage 2: training the DiT on the latents of %s", out)
