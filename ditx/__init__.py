"""ditx: one Diffusion Transformer backbone for images, video and 3D ("DiT-for-X").

The registries are in ``ditx.registry`` (``ditx.metrics`` is the module of the metric
contract; its registry is ``ditx.registry.metrics``).
"""

from ditx.dit import DIT_PRESETS, DiT, build_dit
from ditx.registry import autoencoders, datasets, load_plugins, objectives, tokenizers
from ditx.tokenizer import PatchTokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "PatchTokenizer",
    "Tokenizer",
    "autoencoders",
    "build_dit",
    "datasets",
    "load_plugins",
    "objectives",
    "tokenizers",
]
