"""Video modality: registers its components with ditx (entry point ``ditx.plugins: video``)."""

from ditx import registry
from modalities.video.tokenizer import TubeletTokenizer

registry.tokenizers.register("tubelet", TubeletTokenizer)
