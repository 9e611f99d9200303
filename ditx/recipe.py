"""Recipes: typed YAML configs that name registered components, with dotted overrides.

A recipe is data, not code (torchtune's configs are the model)::

    description: Tiny class-conditional DiT on scikit-learn's digits
    modality: image
    data: {name: digits, size: 16}          # component sections: a registered name + its arguments
    tokenizer: {name: patch2d, patch_size: 2}
    autoencoder: {name: identity}
    objective: {name: ddpm}
    model: {depth: 6, hidden_size: 192, num_heads: 6}
    train: {batch_size: 64, lr: 3.0e-4, steps: 2000}

``load_recipe("image/digits", ["train.batch_size=8"])`` finds the shipped recipe (or
a path), applies overrides and validates: an unknown key or a wrong type is an error
naming the key, the file and the allowed keys.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ditx.registry import REGISTRIES


class RecipeError(ValueError):
    """A recipe that cannot be loaded: names the file and the offending key."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass
class Component:
    """A registered component: ``name`` plus the keyword arguments of its factory."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.args}


@dataclass
class ModelConfig:
    """Backbone sizes: a ``preset`` (DiT-S/2 ... DiT-XL/8) and/or explicit sizes."""

    preset: str | None = None
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    layout: str | list = "joint"
    attention_backend: str = "auto"
    num_classes: int | None = None  # None: taken from the dataset (0 = unconditional)
    class_dropout_prob: float = 0.1
    # text recipes: captions drop to the empty caption with this probability in training
    # (classifier-free guidance), independently of the labels' class_dropout_prob
    caption_dropout_prob: float = 0.1
    # None: the text encoder's width when the recipe has one (cross-attention), else no context
    context_dim: int | None = None
    # add the text encoder's pooled embedding (CLIP) to the timestep condition, as SD3 does
    pooled_text: bool = True
    # add the mean of the caption's tokens (e.g. T5's) to the timestep condition, as Hunyuan-DiT does
    context_pool: bool = False
    # sincos: fixed codes added to the tokens (DiT); rope: rotary positions over the tokenizer's
    # axes inside attention (rope_shares weighs the axes, e.g. {time: 2, height: 1, width: 1})
    position: Literal["sincos", "rope", "none"] = "sincos"
    rope_shares: dict[str, float] | list[float] | None = None
    rope_theta: float = 10000.0
    qk_norm: bool = False  # RMS-normalised queries and keys (SD3, FLUX)
    gradient_checkpointing: bool = False
    compile: bool | Literal["auto"] = False  # auto: where torch.compile runs here (ditx.dit.compile_problem)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``batch_size`` is global (split over processes), as in DiT."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    # constant after the warmup (DiT), or cosine down to zero at ``steps`` (a resumed run with other
    # steps follows the new curve from where it is)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = None
    grad_accum: int = 1
    # split each clip's tokens over this many processes (ditx.parallel, DeepSpeed-Ulysses); the
    # processes are data-parallel groups x this; 1: off
    sequence_parallel: int = 1
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"  # auto: ditx.precision
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+k)/(10+k)) at step k; DiT's paper: false
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: only at the end
    log_every: int = 50
    seed: int = 0
    num_workers: int = 0  # DataLoader processes; 0 when reading cached latents (already in memory)
    max_bad_samples: int = 10
    # frame conditioning: {image-to-video: p, extension: p, interpolation: p}, each sample's mask
    # kind drawn with these probabilities (the rest generate every frame); see ditx/diffusion/frames.py
    frame_masks: dict[str, float] | None = None
    # class / caption dropout among the samples given frames (None: model.class_dropout_prob and
    # caption_dropout_prob as for the rest); higher teaches the model to take what the given frames
    # show, as when it samples from a frame for the null class
    frame_mask_condition_dropout: float | None = None
    latent_cache: str | None = None  # folder written by `ditx cache-latents`; used when present
    output_dir: str = "runs"


@dataclass
class SampleConfig:
    scheduler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 1.0
    guided_channels: int | None = None  # None: guide all channels; 3: DiT's paper mode
    # [low, high]: guidance only at noise levels (σ for rectified flow, t/1000 for DDPM) in it,
    # one conditional evaluation elsewhere; None: at every step
    guidance_interval: list[float] | None = None
    # samples given frames (image-to-video, extension, interpolation): guidance towards the given
    # frames against the model without them (1: none); see docs/video.md
    frame_guidance_scale: float = 1.0
    # class-conditional models, samples given frames for the null class: their class is first read
    # from the given frames by the model itself (its denoising errors under each class at this many
    # noise levels, ditx.diffusion.class_errors), then sampled with the class guidance; 0: off
    frame_class_levels: int = 0
    # the levels split over this many views of the held frames: the first as given, the others
    # shifted by frame_class_shift pixels (right, left, down, up, then diagonally; at most 9), so
    # that the model's errors on one placement of the frame do not decide alone
    frame_class_views: int = 1
    frame_class_shift: int = 3
    num_samples: int = 16
    batch_size: int = 16
    use_ema: bool = True
    seed: int = 0
    # spatial sizes of the data to sample, e.g. [24, 32, 32] (frames, height, width); None: as trained
    data_size: list[int] | None = None
    # text recipes: what previews and `ditx sample` draw without --prompt; None: training captions
    prompts: list[str] | None = None
    negative_prompt: str = ""  # guidance is against this caption ("" = the unconditional one)


@dataclass
class EvalConfig:
    """``ditx eval``: ``num_samples`` samples scored by ``metrics`` (per bucket for data with
    ``data.buckets``: ``num_samples`` in each, keys ``<metric>@<bucket>``). ``first_frame``:
    also generate from the first frames of the test split's clips (image-to-video; keys
    ``first_frame/<metric>``), for the null class (the frame is the only condition) and scored
    with those clips' labels: does the given digit carry through the clip. ``first_frame_labeled``
    (class-conditional models): also from those first frames for the clips' own classes, with
    the class guidance too (image-to-video with its prompt, as a text recipe's first frames come
    with their captions; keys ``first_frame_labeled/<metric>``)."""

    metrics: list[str] = field(default_factory=list)
    num_samples: int = 1000
    batch_size: int = 100
    seed: int = 0
    first_frame: bool = False
    first_frame_labeled: bool = False


@dataclass
class AutoencoderTrainConfig:
    """``ditx train-autoencoder``: train the recipe's autoencoder from scratch on its dataset.

    ``out`` defaults to ``<train.output_dir>/<recipe>-autoencoder``; afterwards point
    ``autoencoder.pretrained`` at it. ``kl_weight`` weighs the posterior's KL term
    against the reconstruction loss (1e-6 as for Stable Diffusion's VAE).
    ``num_workers`` data-loading processes decode the data beside the training step.
    ``first_stage: true`` makes ``ditx train`` run both stages: when the recipe's
    autoencoder has no ``pretrained`` weights, it is trained first into ``<run>/autoencoder``
    (kept across ``--resume``), then the DiT trains on its latents; with ``cache_latents:
    true`` they are encoded once into ``<run>/latents`` (or ``train.latent_cache``) first.
    ``frames_per_clip`` (video, framewise autoencoders): each training clip gives that many
    of its frames, drawn at random, so a step of the same cost sees more clips (0 = all).
    ``lr_schedule``: ``constant`` after ``warmup_steps`` of linear warmup, or ``cosine``:
    from there down to zero at the last step, so the weights saved are not those of one
    noisy step at the full learning rate.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1.0e-3
    kl_weight: float = 1.0e-6
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"  # auto: ditx.precision
    seed: int = 0
    out: str | None = None
    log_every: int = 50
    num_workers: int = 0
    first_stage: bool = False
    cache_latents: bool = False
    frames_per_clip: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0


@dataclass
class Recipe:
    description: str
    modality: str
    data: Component
    tokenizer: Component
    objective: Component
    autoencoder: Component = field(default_factory=lambda: Component("identity"))
    text_encoder: Component | None = None  # captions -> context tokens (ditx.text); None: no text
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    autoencoder_train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    name: str = ""  # filled from the file; not part of the YAML
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what `ditx recipes show` prints and runs save)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("name", "source"):
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Component) else _plain(value)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=float("inf"))


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# component sections and the registry that resolves each
COMPONENT_REGISTRIES = {"data": "datasets", "tokenizer": "tokenizers", "objective": "objectives",
                        "autoencoder": "autoencoders", "text_encoder": "text_encoders"}  # fmt: skip


# --------------------------------------------------------------------------------------
# Type checking against the schema
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # annotations we don't model are not checked


def _coerce(value: Any, tp: Any) -> Any:
    """YAML reads ``1e-4`` as a string, ``3`` where a float is meant and ``no`` as false; fix those."""
    if isinstance(value, bool) and typing.get_origin(tp) is Literal and not _matches(value, tp):
        word = {False: "no", True: "yes"}[value]
        if word in typing.get_args(tp):
            return word
    if isinstance(value, str) and _matches(1.0, tp) and not _matches(value, tp):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and tp is float:
        return float(value)
    return value


def _build_dataclass(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: '{where}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "source") or cls is not Recipe]
    kwargs = {}
    for key, value in data.items():
        if key not in allowed:
            raise RecipeError(
                f"{source}: unknown key '{where + '.' if where else ''}{key}'; "
                f"allowed keys{' in ' + where if where else ''}: {', '.join(allowed)}"
            )
        tp = hints[key]
        if tp == Component | None and value is None:  # an optional component section, left out
            kwargs[key] = None
        elif tp in (Component, Component | None):
            kwargs[key] = _build_component(value, key, source)
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = _build_dataclass(tp, value, key, source)
        else:
            value = _coerce(value, tp)
            if not _matches(value, tp):
                raise RecipeError(
                    f"{source}: '{where + '.' if where else ''}{key}' must be {_type_name(tp)}, got {value!r}"
                )
            kwargs[key] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise RecipeError(f"{source}: missing required key(s) {', '.join(missing)}{' in ' + where if where else ''}")
    return cls(**kwargs)


def _build_component(data: Any, section: str, source: str) -> Component:
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise RecipeError(
            f"{source}: '{section}' needs a registered 'name' (e.g. {section}: {{name: ...}}), got {data!r}"
        )
    args = {k: v for k, v in data.items() if k != "name"}
    return Component(data["name"], args)


def check_component_args(component: Component, section: str, source: str, skip: tuple[str, ...] = ()) -> None:
    """Check a component's arguments against its factory's signature (names and simple types)."""
    registry = REGISTRIES[COMPONENT_REGISTRIES[section]]
    try:
        factory = registry.get(component.name)
    except KeyError as e:
        raise RecipeError(f"{source}: {section}.name: {e}") from None
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:
        hints = {}
    positional = inspect.Parameter.VAR_POSITIONAL
    allowed = [n for n, p in params.items() if n not in ("self", *skip) and p.kind is not positional]
    for key, value in component.args.items():
        if key not in allowed:
            raise RecipeError(
                f"{source}: unknown key '{section}.{key}' for {section} {component.name!r}; "
                f"allowed keys: name, {', '.join(allowed)}"
            )
        tp = hints.get(key, Any)
        component.args[key] = value = _coerce(value, tp)
        if not _matches(value, tp):
            raise RecipeError(f"{source}: '{section}.{key}' must be {_type_name(tp)}, got {value!r}")


# --------------------------------------------------------------------------------------
# Finding, loading, overriding
# --------------------------------------------------------------------------------------


def recipes_root() -> Path:
    return Path(str(importlib.resources.files("ditx.recipes")))


def list_recipes() -> dict[str, str]:
    """Shipped recipe names (``modality/name``) -> one-line description."""
    root = recipes_root()
    out = {}
    for path in sorted(root.glob("*/*.yaml")):
        with open(path) as f:
            data = yaml.safe_load(f)
        text = str(data.get("description", "")).strip() if isinstance(data, dict) else ""
        out[f"{path.parent.name}/{path.stem}"] = text.splitlines()[0] if text else ""
    return out


def find_recipe(name_or_path: str | Path) -> Path:
    """A shipped recipe name (``image/digits``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return path
    shipped = recipes_root() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise RecipeError(
        f"unknown recipe {str(name_or_path)!r}; shipped recipes: {', '.join(list_recipes()) or '(none)'} "
        f"(or pass a path to a .yaml file)"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.batch_size=8`` -> (["train", "batch_size"], 8); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} must look like section.key=value (e.g. train.batch_size=8)")
    return key.split("."), yaml.safe_load(raw) if raw != "" else None


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if isinstance(child, str) and key in COMPONENT_REGISTRIES:
                child = node[key] = {"name": child}
            if not isinstance(child, dict):
                raise RecipeError(f"{source}: override {text!r}: '{'.'.join(keys[: depth + 1])}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe (components are checked against their factories)."""
    path = find_recipe(name_or_path)
    source = str(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    return recipe_from_dict(data or {}, source, overrides, name=_recipe_name(path))


def recipe_from_dict(
    data: dict[str, Any], source: str = "<recipe>", overrides: list[str] | None = None, name: str = ""
) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for section, default in (("autoencoder", "identity"),):  # optional component sections
        data.setdefault(section, {"name": default})
    data = apply_overrides(data, list(overrides or []), source)
    recipe = _build_dataclass(Recipe, data, "", source)
    recipe.name, recipe.source = name, source
    check_component_args(recipe.data, "data", source)
    check_component_args(recipe.objective, "objective", source)
    check_component_args(recipe.autoencoder, "autoencoder", source)
    if recipe.text_encoder is not None:
        check_component_args(recipe.text_encoder, "text_encoder", source)
    # the tokenizer's width and channels come from the model and autoencoder
    check_component_args(recipe.tokenizer, "tokenizer", source, skip=("hidden_size",))
    return recipe


def _recipe_name(path: Path) -> str:
    try:
        rel = path.resolve().relative_to(recipes_root().resolve())
        return str(rel.with_suffix(""))
    except ValueError:
        return path.stem
