"""Masks of clean conditioning frames: which frames of a clip are given and which are generated.

A mask is (B, T) bool over the data's frames (latent frames in latent space), True where a frame
is given clean. The kinds a recipe mixes in training (``train.frame_masks``) and samples with:

- ``image-to-video``: the first frame (a causal 3D VAE's first latent frame is that image alone);
- ``extension``: the first k frames, k drawn uniformly from 1 .. T/2 in training (given the
  start of a clip, continue it);
- ``interpolation``: the first and the last frame (Wan's first-last-frame).

Masks are drawn in whole temporal patches (``patch`` frames per token), since a token is either
clean or not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

FRAME_MASK_KINDS = ("image-to-video", "extension", "interpolation")


def check_frame_mask_mix(mix: Mapping[str, float] | None, where: str = "train.frame_masks") -> dict[str, float]:
    """The recipe's {kind: probability}, checked: known kinds, probabilities in [0, 1] summing to <= 1
    (the rest of the samples train unconditioned on frames)."""
    mix = dict(mix or {})
    unknown = sorted(set(mix) - set(FRAME_MASK_KINDS))
    if unknown:
        raise ValueError(f"{where}: unknown mask kind(s) {unknown}; allowed: {', '.join(FRAME_MASK_KINDS)}")
    if any(not 0 <= float(p) <= 1 for p in mix.values()) or sum(float(p) for p in mix.values()) > 1 + 1e-9:
        raise ValueError(f"{where}: probabilities must be in [0, 1] and sum to at most 1, got {mix}")
    return {k: float(p) for k, p in mix.items()}


def frame_mask(kind: str, frames: int, given: int = 1, patch: int = 1) -> Tensor:
    """(frames,) bool mask of one kind; ``given``: the frames kept by ``extension`` (in frames, a
    multiple of ``patch``)."""
    if kind not in FRAME_MASK_KINDS:
        raise ValueError(f"unknown frame mask kind {kind!r}; allowed: {', '.join(FRAME_MASK_KINDS)}")
    if frames % patch:
        raise ValueError(f"{frames} frames do not split into temporal patches of {patch}")
    mask = torch.zeros(frames, dtype=torch.bool)
    if kind == "image-to-video":
        mask[:patch] = True
    elif kind == "extension":
        if given % patch or not 0 < given < frames:
            raise ValueError(f"extension keeps 1 .. {frames - patch} frames in whole patches of {patch}, got {given}")
        mask[:given] = True
    else:
        if frames < 3 * patch:
            raise ValueError(f"interpolation needs at least one frame between the first and the last, got {frames}")
        mask[:patch] = mask[-patch:] = True
    return mask


def draw_frame_masks(
    mix: Mapping[str, float], batch: int, frames: int, patch: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """(batch, frames) masks, each row's kind drawn with the mix's probabilities (none: all False).

    Draws two numbers per row from ``generator`` (the kind, extension's length), whatever the
    kinds, so a batch's masks do not depend on how it is split over processes.
    """
    tokens = frames // patch
    u = torch.rand(batch, generator=generator)
    lengths = torch.randint(1, max(2, tokens // 2 + 1), (batch,), generator=generator)  # extension: 1 .. T/2
    masks = torch.zeros(batch, frames, dtype=torch.bool)
    edge = 0.0
    for kind in FRAME_MASK_KINDS:
        p = mix.get(kind, 0.0)
        rows = ((u >= edge) & (u < edge + p)).nonzero().flatten().tolist()
        edge += p
        for i in rows:
            masks[i] = frame_mask(kind, frames, int(lengths[i]) * patch, patch)
    return masks


def per_frame(mask: Tensor, ndim: int) -> Tensor:
    """A (B, T) frame mask as (B, 1, T, 1, ...), broadcastable over data (B, C, T, ...) of ``ndim`` dims."""
    return mask.bool().view(mask.shape[0], 1, mask.shape[1], *[1] * (ndim - 3))


def latent_frame_mask(mask: Tensor, latent_frames: int) -> Tensor:
    """A (..., T) mask over data frames -> (..., latent_frames) over latent frames.

    A framewise autoencoder keeps the frames; a causal 3D VAE with temporal factor r makes
    ``1 + (T - 1) / r`` latent frames, the first one the first frame alone and each other one r
    frames: a latent frame is given when all its frames are.
    """
    frames = mask.shape[-1]
    if latent_frames == frames:
        return mask.bool()
    if latent_frames < 2 or (frames - 1) % (latent_frames - 1):
        raise ValueError(f"cannot map {frames} frames onto {latent_frames} latent frames: neither framewise nor "
                         f"a causal VAE (1 + (T - 1) / r latent frames)")  # fmt: skip
    r = (frames - 1) // (latent_frames - 1)
    rest = mask[..., 1:].bool().unflatten(-1, (latent_frames - 1, r)).all(-1)
    return torch.cat([mask[..., :1].bool(), rest], dim=-1)


def given_frames(
    frames: int, first: Tensor | None = None, last: Tensor | None = None, start: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The clip of given frames (C, T, H, W) (zeros where not given) and its (T,) mask, from a first
    frame, a last frame (each (C, 1, H, W)) and/or the start of a clip (C, k, H, W) (extension)."""
    parts = [p for p in (first, last, start) if p is not None]
    if not parts:
        raise ValueError("give a first frame, a last frame or the start of a clip to condition on")
    if first is not None and start is not None:
        raise ValueError("give either a first frame or the start of a clip (extension), not both")
    c, _, h, w = parts[0].shape
    clip, mask = torch.zeros(c, frames, h, w), torch.zeros(frames, dtype=torch.bool)
    for given, at in ((first, 0), (start, 0), (last, frames - 1)):
        if given is None:
            continue
        if given.shape[0] != c or given.shape[2:] != (h, w):
            raise ValueError(f"given frames differ in size: {tuple(given.shape)} vs {tuple(parts[0].shape)}")
        k = given.shape[1]
        if k >= frames or (at and mask[at]):
            raise ValueError(f"{k} given frames leave none of the {frames} to generate")
        clip[:, at : at + k], mask[at : at + k] = given, True
    if mask.all():
        raise ValueError(f"the given frames cover all {frames} frames: nothing to generate")
    return clip, mask


def hold_given_frames(clip: Tensor, mask: Tensor) -> Tensor:
    """Every frame of ``clip`` (..., C, T, H, W) replaced by the given frame nearest in time (the
    earlier of two as near), by a (..., T) ``mask`` of its given frames: a first frame alone becomes
    a still clip of it. What the frames' class is inferred from (``sample.frame_class_levels``)."""
    if clip.ndim < 4 or mask.shape != (*clip.shape[:-4], clip.shape[-3]):
        raise ValueError(f"hold_given_frames takes a clip (..., C, T, H, W) and a (..., T) mask, got "
                         f"{tuple(clip.shape)} and {tuple(mask.shape)}")  # fmt: skip
    given = mask.bool()
    if not given.any(-1).all():
        raise ValueError("hold_given_frames: a clip has no given frame to hold")
    frames = torch.arange(clip.shape[-3], device=clip.device)
    distance = (frames[:, None] - frames[None, :]).abs().float()  # (T, S): from frame t to frame s
    distance = distance.masked_fill(~given[..., None, :], float("inf"))  # (..., T, S)
    nearest = distance.argmin(-1)  # (..., T); ties: the earlier frame (argmin's first)
    index = nearest[..., None, :, None, None].expand(*clip.shape)
    return clip.gather(-3, index)


# (down, right) offsets of the views of held frames the class is read from (``shifted_views``)
VIEW_OFFSETS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))


def shifted_views(clip: Tensor, views: int, shift: int) -> list[Tensor]:
    """``views`` copies of ``clip`` (..., H, W): the first as it is, the others moved by ``shift``
    pixels (right, left, down, up, then diagonally), the edge pixels repeated into the gap. The
    model's reading of the class over several placements of the same frames
    (``sample.frame_class_views``)."""
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= len(VIEW_OFFSETS):
        raise ValueError(f"sample.frame_class_views={views!r}: allowed 1 to {len(VIEW_OFFSETS)} views")
    H, W = clip.shape[-2:]
    if isinstance(shift, bool) or not isinstance(shift, int) or not (0 < shift < min(H, W) or views == 1):
        raise ValueError(f"sample.frame_class_shift={shift!r}: allowed a whole number of pixels from 1 to "
                         f"{min(H, W) - 1} (frames of {H}x{W})")  # fmt: skip
    out = []
    for dy, dx in VIEW_OFFSETS[:views]:
        rows = (torch.arange(H, device=clip.device) - dy * shift).clamp(0, H - 1)  # source row of each row
        cols = (torch.arange(W, device=clip.device) - dx * shift).clamp(0, W - 1)
        out.append(clip[..., rows, :][..., cols])
    return out
