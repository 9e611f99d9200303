"""3D modality: registers its components with ditx (entry point ``ditx.plugins: shape3d``)."""

from ditx import registry
from modalities.shape3d.autoencoder import TriplaneAutoencoder
from modalities.shape3d.data import PrimitivesDataset, ShapeFolderDataset
from modalities.shape3d.io import write_shape_samples
from modalities.shape3d.metrics import PointCloudSetMetric, ShapeGenerationMetric
from modalities.shape3d.tokenizer import TriplaneTokenizer

registry.tokenizers.register("triplane", TriplaneTokenizer)
registry.autoencoders.register("triplane-ae", TriplaneAutoencoder)
registry.datasets.register("shape-folder", ShapeFolderDataset)
registry.datasets.register("primitives", PrimitivesDataset)
registry.metrics.register("pointcloud-set", PointCloudSetMetric)
registry.metrics.register("shape3d", ShapeGenerationMetric)
registry.writers.register("shape3d", write_shape_samples)
