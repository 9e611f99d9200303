"""The tokenizer contract and the N-D patch tokenizer every modality builds on.

A tokenizer turns a modality's tensor ``(B, C, *spatial)`` into tokens ``(B, N, hidden)``
on a named grid (``axes``) and back. The backbone only sees tokens, the grid and the
position codes, so resolution and clip length may change from batch to batch.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from ditx.positions import sincos_nd

Grid = tuple[int, ...]


class Tokenizer(nn.Module):
    """Base class of all tokenizers (see DESIGN.md, "The tokenizer contract").

    Subclasses set ``axes`` (names of the grid axes), ``hidden_size`` and
    ``out_channels`` and implement ``tokenize``/``untokenize``. ``patch_numel`` is
    the number of output values per token that ``untokenize`` expects per channel,
    so the backbone's final layer emits ``patch_numel * out_channels`` per token.
    ``patch_size`` (one entry per axis) is set by tokenizers whose tokens are patches
    of the grid, None otherwise. What the backbone calls besides: ``position_codes``,
    ``grid_for`` (a data shape's grid, to check sizes before any data is seen) and
    ``initialize_weights`` (after the backbone's own initialization).
    """

    axes: tuple[str, ...] = ()
    hidden_size: int
    out_channels: int
    patch_numel: int
    patch_size: tuple[int, ...] | None = None

    def __new__(cls, *args, **kwargs):
        # the constructor's arguments, so that a model can record how to rebuild its tokenizer (spec())
        self = super().__new__(cls)
        object.__setattr__(self, "_constructor_args", (args, dict(kwargs)))
        return self

    def __init__(self) -> None:
        super().__init__()
        self._code_cache: dict[tuple, Tensor] = {}

    def spec(self) -> dict[str, Any] | None:
        """``{"name": <registered name>, **constructor arguments}``: what rebuilds this tokenizer
        through ``ditx.registry.tokenizers``; None when its class is not registered."""
        from ditx.registry import tokenizers

        name = tokenizers.name_of(type(self))
        if name is None:
            return None
        args, kwargs = self._constructor_args
        signature = inspect.signature(type(self))
        spec: dict[str, Any] = {"name": name}
        for key, value in signature.bind(*args, **kwargs).arguments.items():
            kind = signature.parameters[key].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                return None  # not expressible as keyword arguments
            spec.update(value if kind is inspect.Parameter.VAR_KEYWORD else {key: value})
        return spec

    def tokenize(self, x: Tensor) -> tuple[Tensor, Grid]:
        """(B, C, *spatial) -> tokens (B, N, hidden), grid (one size per axis, prod == N)."""
        raise NotImplementedError

    def untokenize(self, tokens: Tensor, grid: Grid) -> Tensor:
        """(B, N, out_channels * patch_numel) -> (B, out_channels, *spatial)."""
        raise NotImplementedError

    def grid_for(self, spatial: Sequence[int]) -> Grid | None:
        """The grid of data with these spatial sizes (a clear error when they do not fit),
        or None when the tokenizer cannot tell before tokenizing."""
        return None

    def initialize_weights(self) -> None:
        """Initialize the tokenizer's own weights; the backbone calls it after its own
        initialization (which gave every ``nn.Linear`` Xavier-uniform weights, zero bias)."""

    def compute_position_codes(self, grid: Grid) -> Tensor | None:
        """Uncached codes for ``grid``; default: N-D sin-cos over all axes."""
        return torch.from_numpy(sincos_nd(self.hidden_size, grid)).float()

    def position_codes(self, grid: Grid, device: torch.device | None = None) -> Tensor | None:
        """(N, hidden) fixed codes for this grid, cached per grid and device."""
        key = (tuple(grid), str(device))
        codes = self._code_cache.get(key)
        if codes is None:
            codes = self.compute_position_codes(tuple(grid))
            if codes is not None:
                codes = codes.to(device)
            self._code_cache[key] = codes
        return codes

    def extra_repr(self) -> str:
        return f"axes={self.axes}, hidden_size={self.hidden_size}, out_channels={self.out_channels}"


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class PatchTokenizer(Tokenizer):
    """Non-overlapping N-D patches embedded by a strided convolution's weights (1D, 2D or 3D).

    ``patch_size`` has one entry per spatial axis; e.g. ``(2, 2)`` on images or
    ``(1, 2, 2)`` on video. Token values in ``untokenize`` are laid out as
    ``(*patch, channel)``, the layout of DiT's ``unpatchify``, so DiT's final layer
    weights load unchanged. The weights live in ``proj``, a ``ConvNd`` with kernel = stride =
    ``patch_size`` (DiT's ``x_embedder.proj`` key layout); ``embed_patches`` applies them as
    one matrix product over the flattened patches, the same map.
    """

    def __init__(
        self,
        axes: Sequence[str],
        patch_size: Sequence[int],
        in_channels: int,
        hidden_size: int,
        out_channels: int | None = None,
        bias: bool = True,
    ):
        super().__init__()
        if len(axes) != len(patch_size):
            raise ValueError(f"need one patch size per axis {tuple(axes)}, got patch_size={tuple(patch_size)}")
        if len(patch_size) not in _CONV:
            raise ValueError(f"patches of {len(patch_size)} dims are not supported (allowed: 1, 2, 3)")
        if any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch sizes must be positive, got {tuple(patch_size)}")
        self.axes = tuple(axes)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_numel = math.prod(self.patch_size)
        self.proj = _CONV[len(self.patch_size)](
            in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size, bias=bias
        )

    def initialize_weights(self) -> None:
        """The patch embedding like a linear layer (DiT: Xavier-uniform over the flattened kernel)."""
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def grid_for(self, spatial: Sequence[int]) -> Grid:
        """The token grid of an input with these spatial sizes; a clear error if a size doesn't divide."""
        if len(spatial) != len(self.patch_size):
            raise ValueError(
                f"{type(self).__name__} expects {len(self.patch_size)} spatial dims {self.axes}, "
                f"got {len(spatial)} ({tuple(spatial)})"
            )
        for name, size, p in zip(self.axes, spatial, self.patch_size):
            if size % p:
                raise ValueError(
                    f"{name} size {size} is not divisible by the patch size {p}; "
                    f"resize or crop the input to a multiple of {p}"
                )
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def tokenize(self, x: Tensor) -> tuple[Tensor, Grid]:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} channels, got {x.shape[1]}")
        grid = self.grid_for(x.shape[2:])
        return self.embed_patches(x), grid

    def embed_patches(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) -> (B, N, hidden): ``proj`` on each patch, as ``F.linear`` on the
        patches flattened in the kernel's (channel, *patch) order, tokens in grid order (what
        ``self.proj(x).flatten(2).transpose(1, 2)`` gives). Not the convolution itself: under
        bf16 autocast on CPU, oneDNN's convolution gave wrong numbers, sometimes inf or NaN
        that changed from call to call, for a kernel spanning the whole width (``(1, 16)`` on
        16x16 inputs, 1, 4 or 8 channels; torch 2.13 on an Intel Xeon with AMX), where the
        matrix product is right (``tests/test_tokenizer.py``)."""
        sizes = {f"p{i}": p for i, p in enumerate(self.patch_size)}
        patches = rearrange(x, _patchify_pattern(len(self.patch_size)), **sizes)  # (B, N, C * prod(patch))
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)

    def untokenize(self, tokens: Tensor, grid: Grid) -> Tensor:
        # (B, N, *patch * C) -> (B, C, g0 * p0, g1 * p1, ...), e.g. on images
        # "b (g0 g1) (p0 p1 c) -> b c (g0 p0) (g1 p1)": DiT's unpatchify
        sizes = {f"g{i}": g for i, g in enumerate(grid)} | {f"p{i}": p for i, p in enumerate(self.patch_size)}
        return rearrange(tokens, _unpatchify_pattern(len(grid)), c=self.out_channels, **sizes)


def _pattern_axes(ndim: int) -> tuple[str, str, str]:
    """einops names of an N-D patch grid: the grid axes, the patch axes, the data axes (g p)."""
    grid = " ".join(f"g{i}" for i in range(ndim))
    patch = " ".join(f"p{i}" for i in range(ndim))
    return grid, patch, " ".join(f"(g{i} p{i})" for i in range(ndim))


@functools.cache
def _patchify_pattern(ndim: int) -> str:
    grid, patch, data = _pattern_axes(ndim)
    return f"b c {data} -> b ({grid}) (c {patch})"


@functools.cache
def _unpatchify_pattern(ndim: int) -> str:
    grid, patch, data = _pattern_axes(ndim)
    return f"b ({grid}) ({patch} c) -> b c {data}"
