"""A third-party ditx plugin: the ``rows`` tokenizer (one token per image row band).

``pip install -e examples/custom_tokenizer`` and then any recipe can say
``tokenizer: {name: rows, band: 2}``.
"""

from __future__ import annotations

from ditx.registry import tokenizers
from ditx.tokenizer import PatchTokenizer


@tokenizers.register("rows")
class RowBandTokenizer(PatchTokenizer):
    """(B, C, H, W) -> one token per band of ``band`` full-width rows, grid ("height", "width").

    A patch tokenizer whose patch spans the whole width: the width grid axis has size 1,
    so the shared backbone, its position codes and attention layouts work unchanged.
    """

    def __init__(self, width: int = 16, band: int = 2, in_channels: int = 1, hidden_size: int = 64,
                 out_channels: int | None = None):  # fmt: skip
        super().__init__(("height", "width"), (band, width), in_channels, hidden_size, out_channels)
