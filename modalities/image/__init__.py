"""Image modality: registers its components with ditx (entry point ``ditx.plugins: image``)."""

from ditx.registry import datasets, tokenizers, writers
from modalities.image.data import DigitsDataset
from modalities.image.io import write_image_samples
from modalities.image.tokenizer import Patch2DTokenizer

tokenizers.register("patch2d", Patch2DTokenizer)
datasets.register("digits", DigitsDataset)
writers.register("image", write_image_samples)
