"""``patch2d``: non-overlapping p×p patches of an image or image latent (DiT's tokenizer)."""

from __future__ import annotations

from ditx.tokenizer import PatchTokenizer


class Patch2DTokenizer(PatchTokenizer):
    """(B, C, H, W) -> (B, H/p · W/p, hidden) on the grid ("height", "width").

    Any H×W divisible by p, square or not. The projection is a Conv2d with kernel and
    stride p whose weights are named like DiT's ``x_embedder.proj``.
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        out_channels: int | None = None,
    ):
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        super().__init__(("height", "width"), patch, in_channels, hidden_size, out_channels)
