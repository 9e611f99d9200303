"""``tubelet``: non-overlapping t×p×p tubes of a clip or clip latent (Latte, ViViT, CogVideoX)."""

from __future__ import annotations

from collections.abc import Sequence

from ditx.tokenizer import PatchTokenizer


class TubeletTokenizer(PatchTokenizer):
    """(B, C, T, H, W) -> (B, T/t · H/p · W/p, hidden) on the grid ("time", "height", "width").

    ``patch_size`` is ``(t, p, p)`` (an int ``p`` means ``(1, p, p)``): ``(1, 2, 2)`` is
    Latte's per-frame patching, ``(2, 2, 2)`` CogVideoX-style tubes. Any clip length and
    frame size divisible by the patch works; position codes are 3-axis sin-cos computed
    for each grid, so a model trained on 16 frames samples 8 or 24.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = (1, 2, 2),
        in_channels: int = 4,
        hidden_size: int = 384,
        out_channels: int | None = None,
    ):
        patch = (1, patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if len(patch) != 3:
            raise ValueError(f"tubelet patch_size must be (t, p, p) or an int p, got {patch_size!r}")
        super().__init__(("time", "height", "width"), patch, in_channels, hidden_size, out_channels)
