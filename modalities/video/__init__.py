"""Video modality: registers its components with ditx (entry point ``ditx.plugins: video``).

Registration only: components are imported when a recipe asks for them, after the
packages below are checked, so this module imports nothing but ``ditx.registry``.
"""

from ditx import registry

# decord reads clips, PyAV writes MP4; moving digits and the frame metrics reuse the image
# modality's scikit-learn digits and torchmetrics (the video extra includes the image one)
video = registry.declare_modality(
    "video",
    requires={"decord": "decord", "av": "av", "sklearn": "scikit-learn", "torchmetrics": "torchmetrics"},
    extra="video",
)
video.register(registry.tokenizers, "tubelet", "ditx.modalities.video.tokenizer:TubeletTokenizer")
video.register(registry.autoencoders, "framewise-vae", "ditx.modalities.video.autoencoder:FramewiseVAE")
video.register(registry.autoencoders, "video-vae", "ditx.modalities.video.autoencoder:VideoVAE")
video.register(registry.datasets, "video-folder", "ditx.modalities.video.data:VideoFolderDataset")
video.register(registry.datasets, "moving-digits", "ditx.modalities.video.moving_digits:MovingDigitsDataset")
video.register(registry.datasets, "moving-digits-text", "ditx.modalities.video.moving_digits:MovingDigitsTextDataset")
video.register(registry.writers, "video", "ditx.modalities.video.io:write_video_samples")
video.register(registry.readers, "video", "ditx.modalities.video.io:read_given_frames")
video.register(registry.metrics, "fvd", "ditx.modalities.video.metrics:FVDMetric")
video.register(registry.metrics, "frame-fid", "ditx.modalities.video.metrics:FrameFIDMetric")
video.register(registry.metrics, "moving-digits", "ditx.modalities.video.moving_digits_metric:MovingDigitsMetric")
