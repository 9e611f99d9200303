"""3D modality: registers its components with ditx (entry point ``ditx.plugins: shape3d``).

Registration only: components are imported when a recipe asks for them, after the
packages below are checked, so this module imports nothing but ``ditx.registry``.
"""

from ditx import registry

# trimesh loads meshes (networkx: its winding repair), scikit-image's marching cubes, scipy's EMD
shape3d = registry.declare_modality(
    "shape3d",
    requires={"trimesh": "trimesh", "networkx": "networkx", "skimage": "scikit-image", "scipy": "scipy"},
    extra="shape3d",
)
shape3d.register(registry.tokenizers, "triplane", "ditx.modalities.shape3d.tokenizer:TriplaneTokenizer")
shape3d.register(registry.autoencoders, "triplane-ae", "ditx.modalities.shape3d.autoencoder:TriplaneAutoencoder")
shape3d.register(registry.datasets, "shape-folder", "ditx.modalities.shape3d.data:ShapeFolderDataset")
shape3d.register(registry.datasets, "primitives", "ditx.modalities.shape3d.data:PrimitivesDataset")
shape3d.register(registry.metrics, "pointcloud-set", "ditx.modalities.shape3d.metrics:PointCloudSetMetric")
shape3d.register(registry.metrics, "shape3d", "ditx.modalities.shape3d.metrics:ShapeGenerationMetric")
shape3d.register(registry.writers, "shape3d", "ditx.modalities.shape3d.io:write_shape_samples")
