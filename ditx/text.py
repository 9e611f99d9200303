"""Text encoders: captions -> context tokens for the backbone's cross-attention.

The contract is :class:`TextEncoder`; ``hf-text`` wraps transformers' encoders (T5, UMT5,
CLIP's text tower) loaded with ``from_pretrained(path or hub id)``, the way PixArt, Open-Sora
and Wan (T5/UMT5) and SD3 (CLIP, whose pooled embedding joins the timestep condition) do.
Nothing is downloaded unless the id names the hub; a local folder written with
``save_pretrained`` loads the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ditx.registry import text_encoders

# kind -> (transformers class, whether it has a pooled/projected embedding)
MODEL_CLASSES = {
    "t5": ("T5EncoderModel", False),
    "umt5": ("UMT5EncoderModel", False),
    "clip": ("CLIPTextModelWithProjection", True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextEmbedding:
    """What a text encoder gives the backbone for a batch of captions."""

    tokens: Tensor  # (B, L, D) float, one row per caption, padded to max_length
    mask: Tensor  # (B, L) bool, True at real tokens (attend), False at padding
    pooled: Tensor | None = None  # (B, P): one vector per caption (CLIP), None when the encoder has none


class TextEncoder(nn.Module):
    """The text encoder contract (``ditx.registry.text_encoders`` builds subclasses of it).

    - ``encode(captions) -> TextEmbedding``: ``tokens`` ``(B, L, dim)`` with ``L =
      max_length`` and a ``mask`` (True at real tokens), and ``pooled`` ``(B, pooled_dim)``
      when the encoder has one; the empty caption ``""`` is the unconditional one;
    - ``dim``, ``max_length``, ``pooled_dim`` (None without a pooled embedding);
    - frozen: eval mode, no gradients; its weights never enter training checkpoints.
    """

    dim: int
    max_length: int
    pooled_dim: int | None = None

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        raise NotImplementedError(f"{type(self).__name__} must implement encode")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError('text encoders need transformers: pip install "ditx[text]"') from e
    return transformers


@text_encoders.register("hf-text")
class HFTextEncoder(TextEncoder):
    """A transformers text encoder and its tokenizer, frozen.

    Args:
        pretrained: a local folder (``save_pretrained``) or a hub id, e.g.
            ``google/t5-v1_1-xxl``, ``google/umt5-xxl``, ``openai/clip-vit-large-patch14``.
        kind: ``t5``, ``umt5`` or ``clip`` (the model class to load).
        max_length: captions are padded or truncated to this many tokens.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (weights and outputs).
        tokenizer: where the tokenizer is, when not beside the model.
        subfolder: the model's subfolder of ``pretrained`` (diffusers pipelines: ``text_encoder``).
    """

    def __init__(
        self,
        pretrained: str,
        kind: str = "t5",
        max_length: int = 120,
        dtype: str = "float32",
        tokenizer: str | None = None,
        subfolder: str | None = None,
    ):
        super().__init__()
        if kind not in MODEL_CLASSES:
            raise ValueError(f"text encoder kind must be one of {', '.join(MODEL_CLASSES)}, got {kind!r}")
        if dtype not in DTYPES:
            raise ValueError(f"text encoder dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"text encoder max_length must be a positive integer, got {max_length!r}")
        transformers = _transformers()
        class_name, has_pooled = MODEL_CLASSES[kind]
        extra = {"subfolder": subfolder} if subfolder else {}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or pretrained)
        model = getattr(transformers, class_name).from_pretrained(pretrained, torch_dtype=DTYPES[dtype], **extra)
        self.model = model.eval().requires_grad_(False)
        self.kind, self.max_length, self.pretrained = kind, max_length, str(pretrained)
        config = model.config
        self.dim = int(config.hidden_size if kind == "clip" else config.d_model)
        self.pooled_dim = int(config.projection_dim) if has_pooled else None

    def train(self, mode: bool = True) -> HFTextEncoder:
        return super().train(False)  # frozen, whatever wraps it asks

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")  # fmt: skip
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask)
        pooled = out.text_embeds if self.pooled_dim is not None else None
        return TextEmbedding(out.last_hidden_state, mask.bool(), pooled)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, pretrained={self.pretrained!r}, dim={self.dim}, max_length={self.max_length}"
