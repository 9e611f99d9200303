"""Image modality: registers its components with ditx (entry point ``ditx.plugins: image``).

Registration only: components are imported when a recipe asks for them, after the
packages below are checked, so this module imports nothing but ``ditx.registry``.
"""

from ditx import registry

# scikit-learn ships the tiny recipe's digits; torchmetrics computes FID/KID/IS
image = registry.declare_modality(
    "image", requires={"sklearn": "scikit-learn", "torchmetrics": "torchmetrics"}, extra="image"
)
image.register(registry.tokenizers, "patch2d", "ditx.modalities.image.tokenizer:Patch2DTokenizer")
image.register(registry.autoencoders, "sd-vae", "ditx.modalities.image.autoencoder:SDVAE")
image.register(registry.datasets, "digits", "ditx.modalities.image.data:DigitsDataset")
image.register(registry.datasets, "image-folder", "ditx.modalities.image.data:ImageFolderDataset")
image.register(registry.metrics, "digits", "ditx.modalities.image.metrics:DigitsMetric")
image.register(registry.metrics, "inception", "ditx.modalities.image.metrics:InceptionMetric")
image.register(registry.writers, "image", "ditx.modalities.image.io:write_image_samples")
image.register(registry.writers, "image-npz", "ditx.modalities.image.io:write_npz_samples")
