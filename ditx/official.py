"""Weights from facebookresearch/DiT: reading state dicts (.pt/.pth/.safetensors, training
checkpoints' EMA) and converting official DiT state dicts to ditx's ``DiT``.

ditx's ``DiT`` uses the official parameter names, with one exception: the official model
stores its fixed 2D sin-cos ``pos_embed`` as a (frozen) parameter, while ditx computes
position codes in the tokenizer. Conversion checks that the stored codes are the ones ditx
computes and drops them. ``official_dit_keys`` is the one place the official key layout is
written. ``ditx convert dit-official`` saves the result in the ditx model format.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditx.checkpoint import CheckpointError, _build_for_loading, _load_weights, _read_safetensors
from ditx.dit import DIT_PRESETS, DIT_SIZES, DiT

# Official keys that ditx computes instead of storing.
OFFICIAL_COMPUTED_KEYS = ("pos_embed",)
POS_EMBED_ATOL = 1e-5


# ---------------------------------------------------------------------------------------
# Reading state dicts
# ---------------------------------------------------------------------------------------

STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors")


def _unwrap_training_checkpoint(obj: Any) -> Any:
    """A facebookresearch/DiT training checkpoint's weights: ``"ema"`` (to sample with), else ``"model"``."""
    if isinstance(obj, Mapping):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.pt``/``.pth`` file (``torch.load``, weights only) or a ``.safetensors`` file.

    Training checkpoints of facebookresearch/DiT (a dict with ``"model"``, ``"ema"``,
    ``"opt"``, ``"args"``) give their ``"ema"`` weights, or ``"model"`` when there is no EMA.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif suffix in (".pt", ".pth"):
        # DiT's training checkpoints also pickle the argparse Namespace of their arguments
        allow = getattr(torch.serialization, "safe_globals", None)
        guard = allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext()
        try:
            with guard:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot read {path} as a weights-only torch checkpoint ({first}); "
                "it may be truncated, or contain objects other than tensors"
            ) from None
    else:
        raise CheckpointError(f"unsupported checkpoint file {path}: expected one of {', '.join(STATE_DICT_SUFFIXES)}")
    obj = _unwrap_training_checkpoint(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state dict of tensors: entries {bad[:5]} are not (name, tensor) pairs")
    return obj


# ---------------------------------------------------------------------------------------
# Official facebookresearch/DiT checkpoints
# ---------------------------------------------------------------------------------------


def official_dit_keys(depth: int) -> list[str]:
    """Every key of a facebookresearch/DiT state dict with ``depth`` blocks, in its order.

    This is the single definition of the official layout; ditx's ``DiT`` has the same
    names minus ``OFFICIAL_COMPUTED_KEYS`` (``pos_embed``, which ditx computes).
    LayerNorms carry no parameters (no affine), so they have no keys.
    """
    keys = [
        "pos_embed",  # (1, N, D) fixed 2D sin-cos codes
        "x_embedder.proj.weight",  # (D, C, p, p)
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",  # (D, 256)
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",  # (num_classes + 1, D), last row: null class
    ]
    block_layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    for i in range(depth):
        keys += [f"blocks.{i}.{layer}.{kind}" for layer in block_layers for kind in ("weight", "bias")]
    keys += [f"final_layer.{layer}.{kind}" for layer in ("linear", "adaLN_modulation.1") for kind in ("weight", "bias")]
    return keys


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_official_keys(state_dict: Mapping[str, Any], depth: int) -> None:
    """Raise a ``CheckpointError`` naming missing and unexpected keys unless the keys are exactly the official ones."""
    expected = official_dit_keys(depth)
    expected_set = set(expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected_set]
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    hint = ""
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if prefixes & {"module", "_orig_mod"}:
        hint = " (keys saved from a DDP- or torch.compile-wrapped model: strip the 'module.'/'_orig_mod.' prefix)"
    raise CheckpointError(f"not a facebookresearch/DiT state dict with {depth} blocks: {'; '.join(problems)}{hint}")


@dataclass(frozen=True)
class OfficialDiTSpec:
    """The architecture of an official DiT state dict, read from its tensor shapes."""

    preset: str | None  # "DiT-XL/2", or None for sizes no preset has
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    in_channels: int
    out_channels: int
    num_classes: int
    input_size: int  # latent height = width the pos_embed was made for

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.patch_size
        return side, side

    def summary(self) -> str:
        name = self.preset or f"custom DiT (depth {self.depth}, hidden {self.hidden_size}, patch {self.patch_size})"
        sigma = ", learned sigma" if self.learn_sigma else ""
        return (
            f"{name}, {self.num_heads} heads, {self.num_classes} classes, "
            f"{self.in_channels}->{self.out_channels} channels{sigma}, "
            f"input {self.in_channels}x{self.input_size}x{self.input_size} ({self.grid[0]}x{self.grid[1]} tokens)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape_error(key: str, tensor: Tensor, expected: str) -> CheckpointError:
    return CheckpointError(f"{key} has shape {tuple(tensor.shape)}, expected {expected}")


def inspect_official_dit(state_dict: Mapping[str, Tensor], num_heads: int | None = None) -> OfficialDiTSpec:
    """Check the keys of an official DiT state dict strictly and infer its architecture from tensor shapes.

    Heads are not visible in the shapes: they come from the DiT preset with the same
    depth and hidden size, or from ``num_heads`` (needed when no preset matches).
    """
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    check_official_keys(state_dict, depth)
    if depth == 0:
        raise CheckpointError("the state dict has no transformer blocks (no blocks.N.* keys)")

    w = state_dict["x_embedder.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise _shape_error("x_embedder.proj.weight", w, "(hidden, in_channels, p, p)")
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])

    table = state_dict["y_embedder.embedding_table.weight"]
    if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] != hidden:
        raise _shape_error("y_embedder.embedding_table.weight", table, f"(num_classes + 1, {hidden})")
    num_classes = int(table.shape[0]) - 1

    final = state_dict["final_layer.linear.weight"]
    if final.ndim != 2 or final.shape[0] % (patch * patch) or final.shape[1] != hidden:
        raise _shape_error("final_layer.linear.weight", final, f"(out_channels * {patch}*{patch}, {hidden})")
    out_channels = int(final.shape[0]) // (patch * patch)

    pos = state_dict["pos_embed"]
    side = math.isqrt(int(pos.shape[1])) if pos.ndim == 3 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden or side * side != pos.shape[1] or side == 0:
        raise _shape_error("pos_embed", pos, f"(1, n*n, {hidden}) for a square n x n token grid")

    preset = None
    size = next((s for s, v in DIT_SIZES.items() if (v["depth"], v["hidden_size"]) == (depth, hidden)), None)
    if num_heads is None:
        if size is None:
            known = "; ".join(f"{s}: depth {v['depth']}, hidden {v['hidden_size']}" for s, v in DIT_SIZES.items())
            raise CheckpointError(
                f"no DiT preset has depth {depth} and hidden size {hidden} (presets: {known}); "
                "the number of attention heads cannot be read from the weights: pass num_heads (--num-heads)"
            )
        num_heads = DIT_SIZES[size]["num_heads"]
    if hidden % num_heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by num_heads={num_heads}")
    if size is not None and DIT_SIZES[size]["num_heads"] == num_heads and f"{size}/{patch}" in DIT_PRESETS:
        preset = f"{size}/{patch}"
    return OfficialDiTSpec(
        preset=preset,
        depth=depth,
        hidden_size=hidden,
        num_heads=num_heads,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
        num_classes=num_classes,
        input_size=side * patch,
    )


def load_official_dit(
    state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike, num_heads: int | None = None
) -> DiT:
    """A ditx ``DiT`` holding the weights of a facebookresearch/DiT checkpoint, in eval mode.

    Accepts a state dict, a training checkpoint dict (its ``"ema"`` weights) or a path
    (see ``read_state_dict``). Keys are checked strictly
    against ``official_dit_keys``; the architecture is read from the shapes (see
    ``inspect_official_dit``); ``pos_embed`` must equal the sin-cos codes ditx computes
    for that grid. The result is called like the official model, ``model(x, t, y)``,
    and gives the same outputs. Only class-conditional checkpoints trained with label
    dropout (a null-class row in the label table) have this layout, as all released ones do.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        source = str(state_dict_or_path)
        state_dict = read_state_dict(state_dict_or_path)
    else:
        source, state_dict = "the given state dict", _unwrap_training_checkpoint(state_dict_or_path)
    spec = inspect_official_dit(state_dict, num_heads)
    tokenizer = dict(
        name="patch2d", patch_size=spec.patch_size, in_channels=spec.in_channels, out_channels=spec.out_channels
    )

    def build() -> DiT:
        return DiT(
            tokenizer, depth=spec.depth, num_heads=spec.num_heads, hidden_size=spec.hidden_size,
            num_classes=spec.num_classes,
        )  # fmt: skip

    model = _build_for_loading(build)
    codes = model.x_embedder.position_codes(spec.grid)  # (N, D)
    given = state_dict["pos_embed"][0].detach().float().cpu()
    error = (given - codes).abs().max().item()
    if not error <= POS_EMBED_ATOL:  # also catches NaN
        raise CheckpointError(
            f"pos_embed of {source} is not the fixed 2D sin-cos code of a {spec.grid[0]}x{spec.grid[1]} grid "
            f"(max |difference| {error:.3g} > {POS_EMBED_ATOL}); ditx computes position codes and cannot "
            "load a learned or modified pos_embed"
        )
    weights = {k: v for k, v in state_dict.items() if k not in OFFICIAL_COMPUTED_KEYS}
    _load_weights(model, weights, source)
    return model.eval()
