"""``triplane``: p×p patches of the three axis-aligned feature planes of a 3D shape.

A triplane holds three R×R feature planes (xy, xz, yz) of C channels. ditx keeps
tensors channel-first like every modality, so the diffusion latent is (B, C, 3, R, R)
("plane", "height", "width") — the ``(B, 3, C, R, R)`` stack that triplane papers use is
``x.transpose(1, 2)``. Direct3D/Rodin's rolled-out layout puts the planes side by side,
(B, C, R, 3R); ``layout="rolled"`` takes and returns that form.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from ditx.positions import sincos_nd
from ditx.tokenizer import Grid, PatchTokenizer


class TriplaneTokenizer(PatchTokenizer):
    """(B, C, 3, R, R) -> (B, 3 · (R/p)², hidden) on the grid ("plane", "height", "width").

    The three planes share one p×p patch embedding (a (1, p, p) convolution); a learned
    plane embedding (3, hidden) is added to the tokens of each plane, and the fixed
    position codes are 2D sin-cos codes of (height, width), the same on every plane.
    ``untokenize`` inverts the patching exactly. Joint attention over all planes is the
    default; ``layout: plane-cross-plane`` alternates per-plane and joint blocks.
    """

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 8,
        hidden_size: int = 384,
        out_channels: int | None = None,
        layout: Literal["planes", "rolled"] = "planes",
    ):
        if isinstance(patch_size, (list, tuple)):
            if len(set(patch_size)) != 1:
                raise ValueError(f"triplane patch_size must be one int p (p×p patches), got {patch_size!r}")
            patch_size = patch_size[0]
        if layout not in ("planes", "rolled"):
            raise ValueError(
                f"triplane layout must be 'planes' (B, C, 3, R, R) or 'rolled' (B, C, R, 3R), got {layout!r}"
            )
        patch = (1, patch_size, patch_size)
        super().__init__(("plane", "height", "width"), patch, in_channels, hidden_size, out_channels)
        self.layout = layout
        self.plane_embed = nn.Parameter(torch.zeros(3, hidden_size))
        nn.init.normal_(self.plane_embed, std=0.02)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        nn.init.normal_(self.plane_embed, std=0.02)

    # ---- layouts ------------------------------------------------------------------------

    @staticmethod
    def unroll(x: Tensor) -> Tensor:
        """(B, C, R, 3R) side-by-side planes -> (B, C, 3, R, R)."""
        b, c, r, w = x.shape
        if w != 3 * r:
            raise ValueError(f"a rolled-out triplane is (B, C, R, 3R); got width {w} for R = {r} (expected {3 * r})")
        return rearrange(x, "b c r (plane w) -> b c plane r w", plane=3)

    @staticmethod
    def roll(x: Tensor) -> Tensor:
        """(B, C, 3, R, R) -> (B, C, R, 3R), planes side by side along the width."""
        return rearrange(x, "b c plane r w -> b c r (plane w)")

    def _planes(self, x: Tensor) -> Tensor:
        if self.layout == "rolled":
            if x.ndim != 4:
                raise ValueError(f"triplane (layout 'rolled') expects (B, C, R, 3R), got shape {tuple(x.shape)}")
            return self.unroll(x)
        if x.ndim != 5 or x.shape[2] != 3:
            raise ValueError(
                f"triplane expects (B, C, 3, R, R) (channels first; a (B, 3, C, R, R) stack is x.transpose(1, 2)), "
                f"got shape {tuple(x.shape)}"
            )
        return x

    # ---- the contract -------------------------------------------------------------------

    def grid_for(self, spatial) -> Grid:
        spatial = tuple(spatial)
        if self.layout == "rolled":
            if len(spatial) != 2 or spatial[1] != 3 * spatial[0]:
                raise ValueError(f"a rolled-out triplane has spatial size (R, 3R), got {spatial}")
            spatial = (3, spatial[0], spatial[0])
        return super().grid_for(spatial)

    def tokenize(self, x: Tensor) -> tuple[Tensor, Grid]:
        x = self._planes(x)  # (B, C, 3, R, R)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} channels, got {x.shape[1]}")
        grid = PatchTokenizer.grid_for(self, x.shape[2:])  # (3, R/p, R/p)
        tokens = self.embed_patches(x)  # (B, 3·h·w, D)
        per_plane = grid[1] * grid[2]
        plane = self.plane_embed.to(tokens.dtype).repeat_interleave(per_plane, dim=0)  # (N, D)
        return tokens + plane, grid

    def untokenize(self, tokens: Tensor, grid: Grid) -> Tensor:
        x = super().untokenize(tokens, grid)  # (B, C_out, 3, R, R)
        return self.roll(x) if self.layout == "rolled" else x

    def compute_position_codes(self, grid: Grid) -> Tensor:
        planes, h, w = grid
        codes = torch.from_numpy(sincos_nd(self.hidden_size, (h, w))).float()  # (h·w, D)
        return codes.repeat(planes, 1)  # the same 2D codes on each plane

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, patch_size={self.patch_size[1]}, layout={self.layout!r}"
