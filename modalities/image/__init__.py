"""Image modality: registers its components with ditx (entry point ``ditx.plugins: image``)."""

from ditx.registry import tokenizers
from modalities.image.tokenizer import Patch2DTokenizer

tokenizers.register("patch2d", Patch2DTokenizer)
