"""The sampling job: generate from a trained run (or a converted model) and write files.

``generate`` turns a model + objective + autoencoder into data-space samples through
``ditx.diffusion.sample``; ``sample_from`` is ``ditx sample``: it finds the weights (a
run directory, one of its checkpoints, or a ditx model directory with ``--recipe``),
samples with the recipe's ``sample`` section and writes the modality's files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditx.diffusion import sample as diffusion_sample
from ditx.recipe import Recipe, SampleConfig, load_recipe
from ditx.registry import writers

logger = logging.getLogger("ditx.sample")


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
                null_class=getattr(model, "null_class", None) if y is not None else None,
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
    return writers.get(parts.recipe.modality)(samples, out_dir, labels)


def load_for_sampling(
    path: str | Path, recipe: str | Path | None = None, overrides: list[str] | None = None, use_ema: bool | None = None
):
    """(recipe, components, model) for a run dir, a checkpoint dir or a ditx model dir."""
    from safetensors.torch import load_file

    from ditx import checkpoint as ckpt
    from ditx.train import build_components

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory, a checkpoint or a model directory)")
    if (path / "config.yaml").is_file():  # a run
        run, checkpoint = path, ckpt.find_resumable(path / "checkpoints")
        if checkpoint is None:
            raise FileNotFoundError(f"run {path} has no complete checkpoint in {path / 'checkpoints'}")
    elif (path / ckpt.MANIFEST_NAME).is_file():  # a checkpoint of a run
        run, checkpoint = path.parent.parent, path
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise ckpt.CheckpointError(f"checkpoint {path} is not usable: {problem}")
    elif (path / "config.json").is_file():  # a ditx model (e.g. a converted official DiT)
        if recipe is None:
            raise ValueError(f"{path} is a model directory: pass --recipe to say how to sample and decode it")
        r = load_recipe(recipe, overrides)
        config = ckpt.read_model_config(path)
        model = ckpt.load_model(path)
        shape = (config.get("metadata") or {}).get("latent_shape")
        parts = build_components(
            r, latent_shape=tuple(shape) if shape else None, num_classes=config.get("num_classes")
        )  # without a stored latent shape, the recipe's data tells it
        _check_same_architecture(parts.model, model, path)
        parts.model = model
        _resize(parts, (config.get("metadata") or {}).get("data_shape"))
        return r, parts, model
    else:
        raise FileNotFoundError(f"{path} is not a ditx run, checkpoint or model directory")
    r = load_recipe(recipe or run / "config.yaml", overrides)
    if recipe is None:
        r.name = run.name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    shape = state.get("latent_shape")  # absent in checkpoints of older runs: then the data tells
    parts = build_components(r, latent_shape=tuple(shape) if shape else None, num_classes=state.get("num_classes"))
    use_ema = r.sample.use_ema if use_ema is None else use_ema
    weights = checkpoint / ("ema.safetensors" if use_ema else "model.safetensors")
    parts.model.load_state_dict(load_file(str(weights)))
    _resize(parts, state.get("data_shape"))
    return r, parts, parts.model


def _resize(parts: Any, trained_data_shape: list[int] | None) -> None:
    """Apply ``sample.data_size``: sample another resolution or clip length than trained on.

    Tokenizers compute position codes for any grid, so e.g. a video model trained on 16
    frames samples 8 or 24 (``sample.data_size=[24,32,32]``).
    """
    size = parts.recipe.sample.data_size
    if not size:
        return
    channels = trained_data_shape[0] if trained_data_shape else parts.latent_shape[0]
    trained = trained_data_shape[1:] if trained_data_shape else parts.latent_shape[1:]
    if len(size) != len(trained):
        raise ValueError(
            f"sample.data_size={list(size)} must give {len(trained)} sizes like the training data's {list(trained)}"
        )
    data_shape = (channels, *size)
    parts.latent_shape = tuple(parts.autoencoder.latent_shape(data_shape))
    grid_for = getattr(parts.model.x_embedder, "grid_for", None)
    if grid_for is not None:
        grid_for(parts.latent_shape[1:])  # a clear error now if the patch does not divide
    parts.data_shape = data_shape


def _check_same_architecture(expected: torch.nn.Module, got: torch.nn.Module, path: Path) -> None:
    a = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in got.state_dict().items()}
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(f"the model in {path} does not match the recipe's model (first differences: {diff})")


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
    extra = None
    if fmt:
        name = f"{r.modality}-{fmt}"
        if name not in writers:
            known = [n.split("-", 1)[1] for n in writers.names() if n.startswith(f"{r.modality}-")]
            raise ValueError(f"no {fmt!r} output for {r.modality}; formats: {', '.join(known) or '(none)'}")
        extra = writers.get(name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if hasattr(parts.autoencoder, "to"):
        parts.autoencoder.to(device)
    num = num or r.sample.num_samples
    out = Path(out) if out else Path(path) / "samples" / f"sample_{r.sample.scheduler}_{r.sample.num_steps}"
    claim_output_folder(out, overwrite=overwrite, what="samples", instead="pass --out DIR for another folder")
    samples, labels = generate(parts, model, num, device, progress=True)
    writers.get(r.modality)(samples, out, labels)
    if extra is not None:
        extra(samples, out, labels)
    logger.info("wrote %d samples to %s", num, out)
    return out
