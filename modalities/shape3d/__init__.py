"""3D modality: registers its components with ditx (entry point ``ditx.plugins: shape3d``)."""

from ditx import registry
from modalities.shape3d.tokenizer import TriplaneTokenizer

registry.tokenizers.register("triplane", TriplaneTokenizer)
