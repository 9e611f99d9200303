"""The shared DiT backbone: adaLN-Zero blocks over any tokenizer's grid.

Follows "Scalable Diffusion Models with Transformers" (Peebles & Xie): the condition
(timestep + class) is embedded once into ``c``; every block regresses shift, scale
and gate from ``c`` (adaLN-Zero, gates start at zero so each block starts as the
identity). Names of parameters follow facebookresearch/DiT so its checkpoints load.

What a block attends over is a subset of the grid's axes (its *layout* entry): all
axes (joint), ``("height", "width")`` (per frame / per plane), ``("time",)``, ...
Video's space-time factorisation and triplane per-plane attention are both this one
mechanism.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ditx.attention import attention
from ditx.embeddings import ContextProjection, LabelEmbedder, PooledTextProjection, TimestepEmbedder
from ditx.positions import POSITIONS, RotaryPositions, apply_rotary, rope_dims
from ditx.tokenizer import Grid, Tokenizer

if TYPE_CHECKING:
    from ditx.parallel import SequenceParallel

# depth, hidden size, heads (Table 1 of the DiT paper); the patch size is the "/p" suffix.
DIT_SIZES: dict[str, dict[str, int]] = {
    "DiT-S": dict(depth=12, hidden_size=384, num_heads=6),
    "DiT-B": dict(depth=12, hidden_size=768, num_heads=12),
    "DiT-L": dict(depth=24, hidden_size=1024, num_heads=16),
    "DiT-XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"{size}/{p}": dict(DIT_SIZES[size], patch_size=p) for size in DIT_SIZES for p in (2, 4, 8)
}

# ---------------------------------------------------------------------------------------
# Attention layouts
# ---------------------------------------------------------------------------------------

Layout = list  # per block: a tuple of axis names, or None for all axes (joint)
LAYOUT_PRESETS = ("joint", "spatial-temporal", "spatial-then-temporal", "plane-cross-plane")


def resolve_layout(layout: str | Sequence[Any], depth: int, axes: Sequence[str]) -> list[tuple[str, ...] | None]:
    """Per-block attention axes for a preset name or an explicit list.

    Presets: ``joint`` (every block over all axes); ``spatial-temporal`` (Latte's
    interleaved blocks: even blocks over the non-time axes, odd over ``time``);
    ``spatial-then-temporal`` (first half spatial, second half temporal);
    ``plane-cross-plane`` (triplanes: per-plane blocks interleaved with joint ones).
    A list is repeated to ``depth``; its entries are lists of axis names or
    ``"all"``/``None`` for joint attention.
    """
    axes = tuple(axes)

    def without(axis: str, preset: str) -> tuple[str, ...]:
        if axis not in axes:
            raise ValueError(f"layout {preset!r} needs a {axis!r} axis, but the tokenizer's axes are {axes}")
        if len(axes) < 2:
            raise ValueError(f"layout {preset!r} needs another axis besides {axis!r}; axes are {axes}")
        return tuple(a for a in axes if a != axis)

    if isinstance(layout, str):
        if layout == "joint":
            pattern: list[Any] = [None]
        elif layout == "spatial-temporal":
            pattern = [without("time", layout), ("time",)]
        elif layout == "spatial-then-temporal":
            half = depth // 2
            return [without("time", layout)] * (depth - half) + [("time",)] * half
        elif layout == "plane-cross-plane":
            pattern = [without("plane", layout), None]
        else:
            raise ValueError(f"unknown attention layout {layout!r}; presets: {', '.join(LAYOUT_PRESETS)}, or a list")
    else:
        pattern = list(layout)
        if not pattern:
            raise ValueError("an attention layout list must not be empty")
    blocks: list[tuple[str, ...] | None] = []
    for i in range(depth):
        entry = pattern[i % len(pattern)]
        if entry is None or entry == "all" or entry == "joint":
            blocks.append(None)
            continue
        entry = (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in entry if a not in axes]
        if unknown or not entry or len(set(entry)) != len(entry):
            raise ValueError(f"layout entry {list(entry)} is not a set of the tokenizer's axes {axes}")
        # keep the tokenizer's axis order; all axes is joint attention
        entry = tuple(a for a in axes if a in entry)
        blocks.append(None if entry == axes else entry)
    return blocks


@functools.cache
def _group_patterns(ndim: int, attend: tuple[int, ...]) -> tuple[str, str]:
    """einops patterns (flat, grouped) for a grid of ``ndim`` axes a0, a1, ... attended over ``attend``.

    E.g. a video grid (time a0, height a1, width a2): spatial blocks group
    ``b (a0 a1 a2) d -> (b a0) (a1 a2) d``, temporal ones ``b (a0 a1 a2) d -> (b a1 a2) a0 d``.
    """
    names = [f"a{i}" for i in range(ndim)]
    outer = " ".join(names[i] for i in range(ndim) if i not in attend)
    inner = " ".join(names[i] for i in attend)
    return f"b ({' '.join(names)}) d", f"(b {outer}) ({inner}) d"


def _group(x: Tensor, grid: Grid, attend: tuple[int, ...]) -> Tensor:
    """(B, N, D) -> (B * G, n, D): sequences over the ``attend`` axes of the grid.

    G is the product of the other axes. Attending over trailing axes is a view.
    """
    flat, grouped = _group_patterns(len(grid), attend)
    return rearrange(x, f"{flat} -> {grouped}", **{f"a{i}": g for i, g in enumerate(grid)})


def _ungroup(x: Tensor, grid: Grid, attend: tuple[int, ...]) -> Tensor:
    """Inverse of ``_group``: (B * G, n, D) -> (B, N, D)."""
    flat, grouped = _group_patterns(len(grid), attend)
    return rearrange(x, f"{grouped} -> {flat}", **{f"a{i}": g for i, g in enumerate(grid)})


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


def attendable(mask: Tensor | None) -> Tensor | None:
    """A (B, L) padding mask (True = real token) as bool, with a row of padding only made all
    True: a caption without tokens then attends to all of them, not to none (which is NaN)."""
    if mask is None:
        return None
    keep = mask.bool()
    return keep | ~keep.any(1, keepdim=True)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """(B, L, D) tokens, (B, L) ``attendable`` mask -> (B, D) mean of each row's real tokens
    (of all tokens when the mask is None)."""
    if mask is None:
        return tokens.mean(1)
    keep = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * keep).sum(1) / keep.sum(1)


def _runs(x: Tensor, values: Tensor) -> Tensor:
    """(B, N, D) tokens viewed as (B, F, N / F, D): the contiguous runs of ``values``' (B, F, 1, D)."""
    return x.unflatten(1, (values.shape[1], -1))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift over (B, N, D) tokens, with per-sample (B, D) shift/scale
    or (B, F, 1, D) ones for F contiguous runs of tokens (``modulations``)."""
    if shift.ndim == 2:
        return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))
    return torch.addcmul(shift, _runs(x, shift), 1 + scale).flatten(1, 2)


# frame conditioning: (the condition of clean frames (B, D), which runs of tokens are clean
# (B, F) bool: the N tokens split into F equal contiguous runs, F = N or the grid's first axis)
CleanTokens = tuple[Tensor, Tensor]


def modulations(layer: nn.Module, c: Tensor, chunks: int, clean: CleanTokens | None) -> list[Tensor]:
    """adaLN's ``chunks`` regressed values (shift, scale, gate, ...): (B, D) each from the (B, D)
    condition ``c``; with clean conditioning frames, (B, F, 1, D) each, taking the values of the
    clean frames' condition on their runs of tokens. Selecting per run, not per token, keeps
    the selection and its gradient's reduction F-sized: per token they took 10% of the tiny
    video recipe's step (torch.profiler)."""
    values = layer(c).chunk(chunks, dim=1)
    if clean is None:
        return list(values)
    c_clean, runs = clean
    values_clean = layer(c_clean).chunk(chunks, dim=1)
    keep = runs[..., None]  # (B, F, 1)
    return [torch.where(keep, v0[:, None], v[:, None]).unsqueeze(2) for v, v0 in zip(values, values_clean)]


def _gated(gate: Tensor, x: Tensor) -> Tensor:
    if gate.ndim == 2:
        return gate.unsqueeze(1) * x
    return (gate * _runs(x, gate)).flatten(1, 2)


def _rms_norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """``norm(x)`` with its weight in x's dtype: under bf16 autocast a float32 weight beside bf16
    queries sends torch to its unfused RMSNorm (several elementwise passes and a warning)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens or over groups along some grid axes, with
    optional RMS-normalised queries and keys (``qk_norm``, as SD3 and FLUX) and rotary positions
    (``rope``: the ``(cos, sin)`` tables of the grouped sequence, ``RotaryPositions.tables``)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto", qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        grid: Grid,
        attend: tuple[int, ...] | None = None,
        mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        sp: SequenceParallel | None = None,
    ) -> Tensor:
        if sp is not None:
            if sp.exchanges(attend):  # the axes span the shards: attend over head shards of the whole sequence
                return self._exchanged(x, grid, attend, mask, rope, sp)
            grid = sp.local_grid(grid)  # within this process's frames: no communication
        d = x.shape[-1]
        if attend is not None:  # regroup the D-wide tokens, not the 3D-wide qkv (a third of the copying)
            x = _group(x, grid, attend)  # (B*G, n, D)
        bg, n = x.shape[:2]
        qkv = self.qkv(x).view(bg, n, 3, self.num_heads, self.head_dim)  # (B', n, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', H, n, d)
        out = self._attend(q, k, v, mask, rope)  # (B', H, n, d); mask (n, n)
        out = self.proj(out.transpose(1, 2).reshape(bg, n, d))  # (B', n, D)
        if attend is not None:
            out = _ungroup(out, grid, attend)  # (B, N, D)
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, rope) -> Tensor:
        """(B', heads, n, d) queries, keys, values -> attention output: QK norm, rotary positions
        ((n, d/2) tables, the same for every sequence of the block), then the backend."""
        if self.q_norm is not None:
            q, k = _rms_norm(self.q_norm, q), _rms_norm(self.k_norm, k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return attention(q, k, v, mask=mask, backend=self.backend)

    def _exchanged(self, x: Tensor, grid: Grid, attend, mask, rope, sp: SequenceParallel) -> Tensor:
        """Sequence-parallel attention (Ulysses): x is this process's (B, N/P, D) shard of ``grid``."""
        b, n_local, d = x.shape
        heads = self.num_heads // sp.size
        qkv = self.qkv(x).view(b, n_local, 3, self.num_heads, self.head_dim)  # (B, N/P, 3, H, d)
        qkv = sp.sequence_to_heads(qkv, seq_dim=1, head_dim=3)  # (B, N, 3, H/P, d)
        n = qkv.shape[1]
        if attend is not None:
            qkv = _group(qkv.reshape(b, n, -1), grid, attend)  # (B*G, n', 3 * H/P * d)
        bg, m = qkv.shape[:2]
        q, k, v = qkv.reshape(bg, m, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B', H/P, n', d)
        out = self._attend(q, k, v, mask, rope).transpose(1, 2)  # (B', n', H/P, d)
        if attend is not None:
            out = _ungroup(out.reshape(bg, m, -1), grid, attend)  # (B, N, H/P * d)
        out = sp.heads_to_sequence(out.reshape(b, n, heads, self.head_dim), seq_dim=1, head_dim=2)  # (B, N/P, H, d)
        return self.proj(out.reshape(b, n_local, d))


class CrossAttention(nn.Module):
    """Tokens attend to context tokens (PixArt-style), with an optional (B, L) bool padding mask
    holding a True in every row (``attendable``: the DiT makes it once per forward)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        kv = self.kv(context).view(b, context.shape[1], 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, L)
        out = attention(q, k, v, mask=mask, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block; ``attend`` names the grid axes its self-attention spans (None = all)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attend: tuple[int, ...] | None = None,
        cross_attention: bool = False,
        backend: str = "auto",
        qk_norm: bool = False,
    ):
        super().__init__()
        self.attend = attend
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, backend, qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads, backend) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        grid: Grid,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        clean: CleanTokens | None = None,
        sp: SequenceParallel | None = None,
    ) -> Tensor:
        """x: (B, N, D) tokens of ``grid`` (with ``sp``: this process's (B, N/P, D) shard of it)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulations(self.adaLN_modulation, c, 6, clean)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + _gated(gate_msa, self.attn(h, grid, self.attend, attn_mask, rope, sp))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, context_mask)
        x = x + _gated(gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map to the tokenizer's per-token output values."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, clean: CleanTokens | None = None) -> Tensor:
        shift, scale = modulations(self.adaLN_modulation, c, 2, clean)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


@functools.cache
def compile_problem(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device_type`` (``"cpu"``, ``"cuda"``) here; None if it
    can. Inductor builds C++ kernels on CPU (a C++ compiler and Python's headers) and Triton ones
    on GPUs, and without them the first compiled forward fails; a tiny function compiled once per
    process and device type tells beforehand (a few seconds, the imports a real compile needs)."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(8, device=device_type))
    except Exception as e:  # a missing compiler or header, an unsupported platform
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"torch.compile does not run on {device_type} here ({type(e).__name__}: {first})"
    return None


class DiT(nn.Module):
    """Diffusion Transformer over the tokens of any registered tokenizer.

    Args:
        tokenizer: a ``Tokenizer`` whose ``hidden_size`` is the model width, or a spec
            ``{"name": "patch2d", **kwargs}`` built from the tokenizer registry with
            ``hidden_size`` filled in (only specs make a model saveable).
        depth, num_heads, mlp_ratio: transformer size.
        num_classes: class count; 0 means unconditional. Labels drop to the null
            class ``num_classes`` with ``class_dropout_prob`` during training.
        layout: attention layout, see ``resolve_layout``.
        attention_backend: ``auto``, ``xformers``, ``sdpa`` or ``math``.
        context_dim: width of optional context tokens (a text encoder's), attended through
            cross-attention with an optional (B, L) padding mask.
        pooled_dim: width of an optional pooled text embedding (CLIP's), projected and added
            to the timestep condition (SD3).
        context_pool: also add the masked mean of the context tokens, projected, to the
            timestep condition (Hunyuan-DiT adds pooled T5 tokens so): every block's adaLN
            then sees the caption, not only its cross-attention.
        hidden_size: needed only with a tokenizer spec.

    ``forward(x, t, y=None, context=None, context_mask=None, pooled=None)`` maps
    (B, C, *spatial) inputs to (B, out_channels, *spatial).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | dict[str, Any],
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        layout: str | Sequence[Any] = "joint",
        attention_backend: str = "auto",
        context_dim: int | None = None,
        hidden_size: int | None = None,
        pooled_dim: int | None = None,
        context_pool: bool = False,
        position: str = "sincos",
        rope_shares: dict[str, float] | Sequence[float] | None = None,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
    ):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"unknown model.position {position!r}; allowed: {', '.join(POSITIONS)}")
        if position != "rope" and rope_shares is not None:
            raise ValueError(f"model.rope_shares is for rotary positions, but model.position is {position!r}")
        if isinstance(tokenizer, dict):
            from ditx.registry import tokenizers

            if hidden_size is None:
                raise ValueError("DiT(tokenizer={...spec...}) needs hidden_size")
            spec = dict(tokenizer)
            name = spec.pop("name", None)
            if name is None:
                raise ValueError(f"tokenizer spec needs a 'name' (one of {tokenizers.names()}), got {tokenizer}")
            recorded: dict[str, Any] | None = dict(tokenizer)
            tokenizer = tokenizers.build(name, hidden_size=hidden_size, **spec)
        else:  # an instance: recorded through its registered name and constructor arguments
            recorded = tokenizer.spec()
            if recorded is not None:
                recorded.pop("hidden_size", None)
        if hidden_size is not None and hidden_size != tokenizer.hidden_size:
            raise ValueError(f"hidden_size={hidden_size} disagrees with the tokenizer's {tokenizer.hidden_size}")
        # the constructor config (what save_model writes and DiT(**config) rebuilds); None only
        # for a tokenizer whose class is not registered
        self.config: dict[str, Any] | None = None if recorded is None else dict(
            tokenizer=recorded, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_classes=num_classes, class_dropout_prob=class_dropout_prob,
            layout=layout if isinstance(layout, str) else [list(e) if e else e for e in layout],
            attention_backend=attention_backend, context_dim=context_dim, hidden_size=tokenizer.hidden_size,
        )  # fmt: skip
        if pooled_dim is not None and self.config is not None:  # only then: older model configs stay as they were
            self.config["pooled_dim"] = pooled_dim
        if context_pool and self.config is not None:
            self.config["context_pool"] = True
        if self.config is not None:  # recorded only when not the defaults: older configs stay as they were
            extra = dict(position=position, rope_shares=rope_shares, rope_theta=rope_theta, qk_norm=qk_norm)
            defaults = dict(position="sincos", rope_shares=None, rope_theta=10000.0, qk_norm=False)
            self.config.update({k: v for k, v in extra.items() if v != defaults[k]})
        hidden_size = tokenizer.hidden_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.out_channels = tokenizer.out_channels
        self.gradient_checkpointing = False
        self.sequence_parallel: SequenceParallel | None = None  # ditx.parallel.enable_sequence_parallel

        self.x_embedder = tokenizer
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.context_embedder = ContextProjection(context_dim, hidden_size) if context_dim else None
        self.pooled_embedder = PooledTextProjection(pooled_dim, hidden_size) if pooled_dim else None
        if context_pool and not context_dim:
            raise ValueError("context_pool needs context tokens (context_dim)")
        self.context_pool_embedder = PooledTextProjection(context_dim, hidden_size) if context_pool else None
        self.layout = resolve_layout(layout, depth, tokenizer.axes)
        self.position = position
        head_dim = hidden_size // num_heads
        self.rope = (
            RotaryPositions(tokenizer.axes, head_dim, rope_dims(tokenizer.axes, head_dim, rope_shares), rope_theta)
            if position == "rope"
            else None
        )
        self.blocks = nn.ModuleList(
            DiTBlock(
                hidden_size,
                num_heads,
                mlp_ratio,
                attend=None if axes is None else tuple(tokenizer.axes.index(a) for a in axes),
                cross_attention=context_dim is not None,
                backend=attention_backend,
                qk_norm=qk_norm,
            )
            for axes in self.layout
        )
        self.final_layer = FinalLayer(hidden_size, tokenizer.patch_numel * tokenizer.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialization, in one place.

        Linear layers: Xavier-uniform, zero bias (ViT). Patch embedding: Xavier over
        its flattened kernel, like a linear layer. Label and timestep embeddings:
        N(0, 0.02). adaLN modulations and the final linear: zero, so every block is
        the identity and the model outputs 0 at step 0 (adaLN-Zero). Cross-attention
        output projections: zero, so context enters gradually (PixArt).
        """

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        self.x_embedder.initialize_weights()
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int | None:
        """Label id of the unconditional (null) class, None for unconditional models."""
        return None if self.y_embedder is None else self.y_embedder.null_class

    def embed_condition(
        self, t: Tensor, y: Tensor | None, force_drop: Tensor | None = None, pooled: Tensor | None = None
    ) -> Tensor:
        """(B,) timesteps and labels (and (B, P) pooled text) -> the condition c (B, D), once per forward."""
        c = self.t_embedder(t)
        if self.pooled_embedder is not None:
            if pooled is None:
                raise ValueError("this DiT adds a pooled text embedding (pooled_dim is set): pass pooled=(B, P)")
            c = c + self.pooled_embedder(pooled)
        elif pooled is not None:
            raise ValueError("a pooled text embedding was given, but this DiT has none (pooled_dim=None)")
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this DiT is unconditional (num_classes=0) but class labels were given")
            return c
        if y is None:  # no labels: sample the unconditional model
            y = torch.full((t.shape[0],), self.null_class, dtype=torch.long, device=t.device)
        return c + self.y_embedder(y, self.training, force_drop)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        force_drop: Tensor | None = None,
        num_images: int = 0,
        pooled: Tensor | None = None,
        frame_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, C, *spatial) noisy input, (B,) timesteps, (B,) labels -> (B, out_channels, *spatial).

        ``num_images``: joint image-video training (Latte): the last ``num_images`` frames
        along the ``time`` axis are independent images; attention over time keeps them
        apart from the clip and from each other.

        ``frame_mask``: (B, T) bool over the input's frames (the ``time`` axis), True where a
        frame is given clean (image-to-video, extension, interpolation): the tokens of those
        frames are modulated by the condition at timestep 0, the others by ``t`` (Open-Sora's
        per-frame timesteps); None: every token at ``t``.
        """
        tokens, grid = self.x_embedder.tokenize(x)  # (B, N, D)
        # one layout for every block: a transposed (B, N, D) view (a conv's output) made
        # torch 2.13's inductor compute wrong gradients in compiled blocks (7-12% off in tests)
        tokens = tokens.contiguous()
        masks = self._image_masks(grid, num_images, tokens.device) if num_images else {}
        if self.position == "sincos":
            codes = self.x_embedder.position_codes(grid, tokens.device)  # (N, D) or None
            if codes is not None:
                tokens = tokens + codes.to(tokens.dtype)
        # rotary: one (cos, sin) pair of (n, head_dim/2) tables per distinct block layout
        ropes = {} if self.rope is None else {
            attend: self.rope.tables(grid, attend, tokens.device) for attend in {b.attend for b in self.blocks}
        }  # fmt: skip
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c = self.embed_condition(t, y, force_drop, pooled)  # (B, D)
        if self.context_embedder is not None:
            if context is None:
                raise ValueError("this DiT has cross-attention (context_dim is set): pass context=(B, L, context_dim)")
            context_mask = attendable(context_mask)  # once for every block's cross-attention
            if self.context_pool_embedder is not None:  # the caption's mean token joins the condition too
                c = c + self.context_pool_embedder(masked_mean(context, context_mask))
            context = self.context_embedder(context)  # (B, L, D)
        elif context is not None:
            raise ValueError("context tokens given, but this DiT has no cross-attention (context_dim=None)")
        clean = None
        if frame_mask is not None:  # clean frames: the same condition at t = 0
            c_clean = c + self.t_embedder(torch.zeros_like(t)) - self.t_embedder(t)
            clean = (c_clean, self._clean_tokens(frame_mask, grid, x.shape[0]))
        sp = self.sequence_parallel
        if sp is not None:  # this process keeps its 1/P of the tokens along the grid's first axis
            sp.check(grid, self.num_heads)
            tokens = sp.split(tokens)  # (B, N/P, D)
            if clean is not None:
                clean = (clean[0], sp.split(clean[1]))
        for block in self.blocks:
            mask, rope = masks.get(block.attend), ropes.get(block.attend)
            args = (tokens, c, grid, context, context_mask, mask, rope, clean, sp)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)  # (B, N, D)
        tokens = self.final_layer(tokens, c, clean)  # (B, N, patch_numel * out_channels)
        if sp is not None:
            tokens = sp.gather(tokens)  # every process gets the whole prediction
        return self.x_embedder.untokenize(tokens, grid)  # (B, out_channels, *spatial)

    def compile_blocks(self, **kwargs: Any) -> DiT:
        """``torch.compile`` each block in place (regional compilation); returns self.

        The blocks share one class and, with parameters traced as inputs, one compiled graph
        per distinct ``attend`` (one for joint attention, two for spatial-temporal), so a
        cold compile costs one block's instead of the whole model's: DiT-B/2 bf16 training
        19 s against 52 s for ``torch.compile(model)``, with the same step time (1,144 vs
        1,163 ms). Parameter names and the state dict stay as they are. ``kwargs`` go to
        ``torch.compile`` (``mode``, ``dynamic``, ...).
        """
        for block in self.blocks:
            block.compile(**kwargs)
        return self

    def time_axis(self, why: str) -> tuple[int, int]:
        """(index of the tokenizer's ``time`` axis, frames per token along it); an error naming
        ``why`` (what needs a time axis) for a tokenizer without one."""
        axes = tuple(self.x_embedder.axes)
        if "time" not in axes:
            raise ValueError(f"{why} needs a tokenizer with a 'time' axis, got axes {axes}")
        ti = axes.index("time")
        patch = self.x_embedder.patch_size
        return ti, 1 if patch is None else patch[ti]

    def _clean_tokens(self, frame_mask: Tensor, grid: Grid, batch: int) -> Tensor:
        """(B, T) bool over frames -> (B, F) bool over F equal contiguous runs of the tokens: which
        hold clean frames; a run is one slice of the grid's first axis when time is that axis
        (a row-major grid), else one token."""
        ti, p = self.time_axis("frame_mask")
        if frame_mask.shape != (batch, grid[ti] * p):
            raise ValueError(f"frame_mask must be (B, frames) = ({batch}, {grid[ti] * p}) bool, "
                             f"got {tuple(frame_mask.shape)}")  # fmt: skip
        per_token = frame_mask.bool().view(batch, grid[ti], p)
        if (per_token.any(2) != per_token.all(2)).any():
            raise ValueError(f"frame_mask splits a token: the tokenizer patches {p} frames together, so clean "
                             f"frames must come in whole groups of {p} (a causal VAE's first latent frame "
                             f"is one image: patch it alone)")  # fmt: skip
        per_token = per_token[:, :, 0]  # (B, grid[ti])
        if ti == 0:
            return per_token  # (B, grid[0])
        return per_token[:, _frame_of_position(grid, ti, frame_mask.device)]  # (B, N)

    def _image_masks(self, grid: Grid, num_images: int, device) -> dict:
        """{block.attend: (n, n) bool mask} keeping image frames out of attention over time."""
        ti, p = self.time_axis("num_images")
        if p != 1:
            raise ValueError(f"num_images needs one frame per token along time (patch {p} there)")
        if not 0 < num_images < grid[ti]:
            raise ValueError(f"num_images must be in [1, {grid[ti] - 1}] for {grid[ti]} frames, got {num_images}")
        masks = {}
        for attend in {block.attend for block in self.blocks}:
            idx = tuple(range(len(grid))) if attend is None else attend
            if ti not in idx:
                continue  # spatial blocks see one frame at a time already
            t = _frame_of_position([grid[i] for i in idx], idx.index(ti), device)
            video = t < grid[ti] - num_images
            masks[attend] = (video[:, None] & video[None, :]) | (t[:, None] == t[None, :])
        return masks

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, guided_channels: int | None = 3):
        """DiT's sampling call: the batch holds [cond half; uncond half] with equal x.

        Guides the first ``guided_channels`` output channels (3 in the DiT paper; None
        for all) and returns both halves with the guided result, like the official code.
        """
        from ditx.diffusion.sampling import apply_guidance

        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        cond, uncond = out.chunk(2)
        guided = apply_guidance(cond, uncond, cfg_scale, guided_channels)
        return torch.cat([guided, guided])

    def enable_gradient_checkpointing(self, enabled: bool = True) -> DiT:
        self.gradient_checkpointing = enabled
        return self


def _frame_of_position(sizes: Sequence[int], time: int, device) -> Tensor:
    """(prod(sizes),) the frame of each position of a row-major grid whose axis ``time`` is time."""
    stride = math.prod(sizes[time + 1 :])
    return torch.arange(math.prod(sizes), device=device) // stride % sizes[time]


def build_dit(
    preset: str | None = None,
    *,
    tokenizer: str | dict[str, Any] = "patch2d",
    in_channels: int = 4,
    learn_sigma: bool = True,
    out_channels: int | None = None,
    **kwargs: Any,
) -> DiT:
    """A DiT from a preset (``"DiT-XL/2"``) or explicit sizes, with a registered tokenizer.

    ``tokenizer`` is a registry name or a spec dict. The tokenizer gets the arguments
    the tokenizer contract names (``in_channels``, ``out_channels``; ``hidden_size`` from
    the backbone) and, only when a preset (its "/p") or an explicit ``patch_size`` asks for
    one and the spec sets none, ``patch_size=p`` as an int (``tubelet`` reads it as
    ``(1, p, p)``). Output channels default to ``2 * in_channels`` with learned sigma.
    Explicit ``depth``, ``hidden_size``, ``num_heads`` and ``patch_size`` override the preset.
    """
    sizes: dict[str, Any] = {}
    if preset is not None:
        if preset not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {preset!r}; presets: {', '.join(DIT_PRESETS)}")
        sizes.update(DIT_PRESETS[preset])
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        if key in kwargs:
            sizes[key] = kwargs.pop(key)
    missing = [k for k in ("depth", "hidden_size", "num_heads") if k not in sizes]
    if missing:
        raise ValueError(f"build_dit needs a preset ({', '.join(DIT_PRESETS)}) or explicit {missing}")
    spec = {"name": tokenizer} if isinstance(tokenizer, str) else dict(tokenizer)
    spec.setdefault("in_channels", in_channels)
    spec.setdefault("out_channels", out_channels or (2 * spec["in_channels"] if learn_sigma else spec["in_channels"]))
    if "patch_size" in sizes:
        spec.setdefault("patch_size", sizes["patch_size"])
    return DiT(spec, depth=sizes["depth"], num_heads=sizes["num_heads"], hidden_size=sizes["hidden_size"], **kwargs)
