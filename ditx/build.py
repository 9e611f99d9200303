"""Recipe -> components: the one builder under every job.

``build_components`` turns a recipe into its dataset, autoencoder, objective and DiT with
their shapes checked together; ``load_for_sampling`` does the same for a trained run, a
checkpoint or a converted model, with the weights loaded; ``reference_dataset`` and
``build_metric`` give evaluation its held-out data and metrics. Train, sample, eval,
cache-latents and train-autoencoder all build through here, so no job imports another
to get its components.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditx import checkpoint as ckpt
from ditx.autoencoder import Autoencoder
from ditx.data import Dataset
from ditx.dit import DiT, build_dit
from ditx.metrics import Metric
from ditx.recipe import Recipe, load_recipe
from ditx.registry import autoencoders, datasets, objectives, text_encoders
from ditx.registry import metrics as metric_registry
from ditx.text import TextEncoder


@dataclass
class Components:
    """A recipe's parts with their shapes checked together. The model is built when first
    asked for (``cache-latents`` never asks), or set from loaded weights (sampling)."""

    recipe: Recipe
    dataset: Dataset | None
    autoencoder: Autoencoder
    objective: Any
    data_shape: tuple[int, ...] | None
    latent_shape: tuple[int, ...]
    num_classes: int
    # what sampling generates, when training items hold more (e.g. a clip plus image frames)
    sample_data_shape: tuple[int, ...] | None = None
    sample_latent_shape: tuple[int, ...] | None = None
    source: Path | None = None  # the checkpoint the weights were loaded from, if any
    _model: DiT | None = None
    _text: TextEncoder | None = None

    @property
    def model(self) -> DiT:
        """The recipe's DiT, randomly initialized on first use, unless weights were set."""
        if self._model is None:
            self._model = build_model(self.recipe, self.latent_shape, self.num_classes, self.objective,
                                      self.text_encoder)  # fmt: skip
        return self._model

    @property
    def text_encoder(self) -> TextEncoder | None:
        """The recipe's text encoder, built (frozen) on first use; None for a recipe without text.

        Training from a latent cache sets a :class:`ditx.text.CaptionTable` here instead, so
        the encoder itself is never loaded."""
        if self._text is None and self.recipe.text_encoder is not None:
            self._text = build_text_encoder(self.recipe)
        return self._text

    @text_encoder.setter
    def text_encoder(self, encoder: TextEncoder | None) -> None:
        self._text = encoder

    @model.setter
    def model(self, model: DiT) -> None:
        self._model = model

    def for_sampling(self) -> Components:
        """These components with the shapes a trained model generates (the same model)."""
        if self.sample_latent_shape is None:
            return self
        return dataclasses.replace(self, data_shape=self.sample_data_shape, latent_shape=self.sample_latent_shape,
                                   _model=self.model)  # one model, built once, shared by both


def build_dataset(recipe: Recipe, split: str | None = None, augment: bool = True) -> Dataset:
    """The recipe's dataset (see :class:`ditx.data.Dataset` for what a factory is given).

    ``split`` replaces the recipe's (``data.split``, default ``"train"``); ``augment=False``
    builds it without random augmentation (the metrics' reference).
    """
    args = dict(recipe.data.args)
    if split is not None:
        args["split"] = split
    args.setdefault("split", "train")
    args.setdefault("seed", recipe.train.seed)
    args["augment"] = augment
    return _built(datasets.build(recipe.data.name, **args), Dataset, "dataset", recipe.data.name)


def build_autoencoder(recipe: Recipe) -> Autoencoder:
    """The recipe's autoencoder (see :class:`ditx.autoencoder.Autoencoder`)."""
    built = autoencoders.build(recipe.autoencoder.name, **recipe.autoencoder.args)
    return _built(built, Autoencoder, "autoencoder", recipe.autoencoder.name)


def build_text_encoder(recipe: Recipe) -> TextEncoder:
    """The recipe's text encoder (see :class:`ditx.text.TextEncoder`), frozen.

    Built under a forked RNG: loading it never changes the random state the DiT is
    initialised from, so a recipe initialises alike with its encoder loaded or cached."""
    component = recipe.text_encoder
    if component is None:
        raise ValueError(f"{recipe.name or 'the recipe'} has no text_encoder section")
    with torch.random.fork_rng(devices=[]):
        built = text_encoders.build(component.name, **component.args)
    return _built(built, TextEncoder, "text_encoder", component.name).eval().requires_grad_(False)


def _built(obj: Any, contract: type, kind: str, name: str) -> Any:
    """``obj`` when it follows ``contract`` (a class of the core), else an error saying what to do."""
    if not isinstance(obj, contract):
        raise TypeError(
            f"{kind} {name!r} built a {type(obj).__module__}.{type(obj).__name__}, which is not a "
            f"{contract.__module__}.{contract.__name__}: a registered {kind} subclasses it "
            f"(its docstring is the contract)"
        )
    return obj


def build_model(
    recipe: Recipe, latent_shape: tuple[int, ...], num_classes: int, objective: Any, text: TextEncoder | None = None
) -> DiT:
    """The recipe's DiT for data of ``latent_shape``; with a text encoder, cross-attention over its
    tokens (``context_dim``) and, when it has one and ``model.pooled_text``, its pooled embedding."""
    m = recipe.model
    context_dim, pooled_dim = m.context_dim, None
    if text is not None:
        if context_dim is not None and context_dim != text.dim:
            raise ValueError(f"model.context_dim={context_dim} disagrees with the text encoder's width {text.dim}; "
                             f"leave model.context_dim unset to take the encoder's")  # fmt: skip
        context_dim = text.dim
        pooled_dim = text.pooled_dim if m.pooled_text else None
    in_channels = latent_shape[0]
    tokenizer = recipe.tokenizer.to_dict()
    tokenizer.setdefault("in_channels", in_channels)
    tokenizer.setdefault("out_channels", objective.out_channels(in_channels))
    sizes = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads") if getattr(m, k) is not None}
    model = build_dit(
        m.preset,
        tokenizer=tokenizer,
        num_classes=num_classes,
        class_dropout_prob=m.class_dropout_prob,
        mlp_ratio=m.mlp_ratio,
        layout=m.layout,
        attention_backend=m.attention_backend,
        context_dim=context_dim,
        pooled_dim=pooled_dim,
        context_pool=m.context_pool,
        position=m.position,
        rope_shares=m.rope_shares,
        rope_theta=m.rope_theta,
        qk_norm=m.qk_norm,
        **sizes,
    )
    model.enable_gradient_checkpointing(m.gradient_checkpointing)
    return model


def build_components(
    recipe: Recipe,
    dataset: Dataset | None = None,
    *,
    latent_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> Components:
    """Dataset, autoencoder, objective and model of a recipe, with shapes checked together.

    Sampling a trained model needs no data: given ``latent_shape`` and ``num_classes``
    (stored with every checkpoint), the dataset is not built (``dataset``/``data_shape``
    are then None). The model is built on first use of ``Components.model``.
    """
    autoencoder = build_autoencoder(recipe)
    objective = objectives.build(recipe.objective.name, **recipe.objective.args)
    data_shape = None
    if latent_shape is None or num_classes is None:
        dataset = build_dataset(recipe) if dataset is None else dataset
        data_shape = tuple(dataset.data_shape)
        latent_shape = tuple(autoencoder.latent_shape(data_shape))
        num_classes = int(dataset.num_classes)
    if recipe.model.num_classes is not None:
        num_classes = recipe.model.num_classes
    parts = Components(recipe, dataset, autoencoder, objective, data_shape, tuple(latent_shape), num_classes)
    sample_shape = dataset.sample_shape if data_shape is not None else None
    if sample_shape is not None and tuple(sample_shape) != data_shape:
        parts.sample_data_shape = tuple(sample_shape)
        parts.sample_latent_shape = tuple(autoencoder.latent_shape(sample_shape))
    return parts


def adamw(params, device: torch.device, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel on CPU and CUDA (one pass over every tensor):
    torch picks the per-tensor loop on CPU otherwise, which took 21.5 ms a step against 6.6 ms
    fused for the 83 tensors of video/moving-digits-buckets' DiT (the same updates to 2.4e-7)."""
    return torch.optim.AdamW(params, fused=device.type in ("cpu", "cuda"), **kwargs)


def lr_lambda(warmup_steps: int, total_steps: int | None = None, schedule: str = "constant"):
    """The learning-rate factor at each optimizer step (``torch.optim.lr_scheduler.LambdaLR``): linear
    warmup over ``warmup_steps``, then ``constant`` 1, or ``cosine`` from 1 down to 0 at ``total_steps``
    (a run of at most ``warmup_steps`` steps never leaves the warmup)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    if schedule == "cosine" and total_steps is None:
        raise ValueError("a cosine lr_schedule needs the number of steps it ends at")

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        # a run no longer than its warmup (a smoke test of one step) ends on the warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return factor


def build_metric(spec: str | dict[str, Any]):
    """A metric from a recipe entry: a registered name or ``{name: ..., **args}``."""
    args = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = args.pop("name", None)
    if name is None:
        raise ValueError(f"eval.metrics entry {spec!r} needs a 'name' (one of {metric_registry.names()})")
    return name, _built(metric_registry.build(name, **args), Metric, "metric", name)


def reference_dataset(recipe: Recipe) -> Dataset:
    """Held-out data for metrics: the recipe's dataset for ``split="test"``, not augmented."""
    return build_dataset(recipe, split="test", augment=False)


def load_for_sampling(
    path: str | Path, recipe: str | Path | None = None, overrides: list[str] | None = None, use_ema: bool | None = None
):
    """(recipe, components, model) for a run dir, a checkpoint dir or a ditx model dir.

    A run samples its newest intact checkpoint with its own ``config.yaml``; a checkpoint
    of a run, the same; a model directory (a converted model, or a checkpoint's ``ema/``)
    needs ``recipe`` to say how to sample and decode. The model is rebuilt from the model
    directory's ``config.json`` (on the meta device, then given the weights); the files read
    are verified against the checkpoint's manifest as they are read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory, a checkpoint or a model directory)")
    if (path / "config.yaml").is_file():  # a run: its newest checkpoint whose read files are intact
        run, checkpoint = path, None
    elif (path / ckpt.MANIFEST_NAME).is_file():  # a checkpoint of a run
        run, checkpoint = path.parent.parent, path
    elif (path / ckpt.CONFIG_NAME).is_file():  # a ditx model (a converted official DiT, a checkpoint's ema/)
        if recipe is None:
            raise ValueError(f"{path} is a model directory: pass --recipe to say how to sample and decode it")
        r = load_recipe(recipe, overrides)
        parts = _with_model(r, path, None, check=True)
        return r, parts, parts.model
    else:
        raise FileNotFoundError(f"{path} is not a ditx run, checkpoint or model directory")
    r = load_recipe(recipe or run / "config.yaml", overrides)
    if recipe is None:
        r.name = run.name
        resolve_run_paths(r, run)
    use_ema = r.sample.use_ema if use_ema is None else use_ema
    model_dir = f"{ckpt.EMA_DIR}/"  # the EMA's config describes the trained weights too
    read = (model_dir + ckpt.CONFIG_NAME, model_dir + ckpt.WEIGHTS_NAME if use_ema else "model.safetensors")
    if checkpoint is None:
        checkpoint = ckpt.find_resumable(run / "checkpoints", files=read)
        if checkpoint is None:
            raise FileNotFoundError(f"run {run} has no complete checkpoint in {run / 'checkpoints'}")
    else:
        problem = ckpt.verify_checkpoint(checkpoint, files=read)
        if problem:
            raise ckpt.CheckpointError(f"checkpoint {checkpoint} is not usable: {problem}")
    weights = None if use_ema else checkpoint / "model.safetensors"
    parts = _with_model(r, checkpoint / ckpt.EMA_DIR, weights, check=recipe is not None)
    parts.source = checkpoint
    return r, parts, parts.model


def _with_model(recipe: Recipe, model_dir: Path, weights: Path | None, check: bool) -> Components:
    """The recipe's components (no dataset when the model records its latent shape) with the
    model of ``model_dir``; ``check``: the recipe must describe the same architecture."""
    config = ckpt.read_model_config(model_dir)
    metadata = config.get("metadata") or {}
    shape = metadata.get("latent_shape")  # without it (an official DiT), the recipe's data tells
    latent_shape = tuple(shape) if shape else None
    parts = build_components(recipe, latent_shape=latent_shape, num_classes=config.get("num_classes"))
    model = ckpt.load_model(model_dir, weights=weights, attention_backend=recipe.model.attention_backend)
    if check:
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialized for real
            expected = build_model(recipe, parts.latent_shape, parts.num_classes, parts.objective,
                                   parts.text_encoder)  # fmt: skip
        _check_same_architecture(expected, model, model_dir)
    parts.model = model
    _resize(parts, metadata.get("data_shape"))
    return parts


RUN = "${run}"  # in a run's config.yaml: the run folder itself, wherever it has moved


def run_relative(recipe: Recipe, run_dir: Path) -> Recipe:
    """A copy of ``recipe`` whose paths inside ``run_dir`` (a first stage's autoencoder and
    latents) are written ``${run}/...``: a run folder refers to what it holds relative to
    itself, so it can be moved or copied and still sampled from anywhere."""
    out = copy.deepcopy(recipe)
    root = os.path.abspath(run_dir)

    def relative(value: Any) -> Any:
        full = os.path.abspath(value) if isinstance(value, str) else None
        if full is not None and (full == root or full.startswith(root + os.sep)):
            return RUN + full[len(root) :]
        return value

    _map_run_paths(out, relative)
    return out


def resolve_run_paths(recipe: Recipe, run_dir: Path) -> None:
    """Undo ``run_relative`` for a recipe read from ``run_dir/config.yaml`` (in place)."""
    _map_run_paths(recipe, lambda v: str(run_dir) + v[len(RUN) :] if isinstance(v, str) and v.startswith(RUN) else v)


def _map_run_paths(recipe: Recipe, fn: Any) -> None:
    """Apply ``fn`` to the paths a run may hold itself: a first stage's autoencoder and latents."""
    if "pretrained" in recipe.autoencoder.args:
        recipe.autoencoder.args["pretrained"] = fn(recipe.autoencoder.args["pretrained"])
    recipe.train.latent_cache = fn(recipe.train.latent_cache)


def _resize(parts: Any, trained_data_shape: list[int] | None) -> None:
    """Apply ``sample.data_size``: sample another resolution or clip length than trained on.

    Tokenizers compute position codes for any grid, so e.g. a video model trained on 16
    frames samples 8 or 24 (``sample.data_size=[24,32,32]``).
    """
    size = parts.recipe.sample.data_size
    if not size:
        if trained_data_shape and parts.data_shape is None:  # what the model generates, for given frames
            parts.data_shape = tuple(trained_data_shape)
        return
    channels = trained_data_shape[0] if trained_data_shape else parts.latent_shape[0]
    trained = trained_data_shape[1:] if trained_data_shape else parts.latent_shape[1:]
    if len(size) != len(trained):
        raise ValueError(
            f"sample.data_size={list(size)} must give {len(trained)} sizes like the training data's {list(trained)}"
        )
    data_shape = (channels, *size)
    parts.latent_shape = tuple(parts.autoencoder.latent_shape(data_shape))
    parts.model.x_embedder.grid_for(parts.latent_shape[1:])  # a clear error now if the patch does not divide
    parts.data_shape = data_shape


def with_data_size(parts: Components, size: list[int] | tuple[int, ...]) -> Components:
    """``parts`` (the same model) generating data of ``size`` (the data axes without channels, as
    ``sample.data_size``), e.g. one bucket of a bucketed recipe."""
    channels = parts.data_shape[0] if parts.data_shape else parts.latent_shape[0]
    data_shape = (channels, *size)
    latent_shape = tuple(parts.autoencoder.latent_shape(data_shape))
    parts.model.x_embedder.grid_for(latent_shape[1:])  # a clear error now if the patch does not divide
    return dataclasses.replace(parts, data_shape=data_shape, latent_shape=latent_shape, _model=parts.model,
                               _text=parts._text)  # fmt: skip


def _check_same_architecture(expected: torch.nn.Module, got: torch.nn.Module, path: Path) -> None:
    a = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in got.state_dict().items()}
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(f"the model in {path} does not match the recipe's model (first differences: {diff})")
