"""Image modality: registers its components with ditx (entry point ``ditx.plugins: image``)."""

from ditx import registry
from modalities.image.autoencoder import SDVAE
from modalities.image.data import DigitsDataset, ImageFolderDataset
from modalities.image.io import write_image_samples, write_npz_samples
from modalities.image.metrics import DigitsMetric, InceptionMetric
from modalities.image.tokenizer import Patch2DTokenizer

registry.tokenizers.register("patch2d", Patch2DTokenizer)
registry.autoencoders.register("sd-vae", SDVAE)
registry.datasets.register("digits", DigitsDataset)
registry.datasets.register("image-folder", ImageFolderDataset)
registry.metrics.register("digits", DigitsMetric)
registry.metrics.register("inception", InceptionMetric)
registry.writers.register("image", write_image_samples)
registry.writers.register("image-npz", write_npz_samples)
