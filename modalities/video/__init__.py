"""Video modality: registers its components with ditx (entry point ``ditx.plugins: video``)."""

from ditx import registry
from modalities.video.autoencoder import FramewiseVAE, VideoVAE
from modalities.video.data import MovingDigitsDataset, VideoFolderDataset
from modalities.video.io import write_video_samples
from modalities.video.metrics import FrameFIDMetric, FVDMetric, MovingDigitsMetric
from modalities.video.tokenizer import TubeletTokenizer

registry.tokenizers.register("tubelet", TubeletTokenizer)
registry.autoencoders.register("framewise-vae", FramewiseVAE)
registry.autoencoders.register("video-vae", VideoVAE)
registry.datasets.register("video-folder", VideoFolderDataset)
registry.datasets.register("moving-digits", MovingDigitsDataset)
registry.writers.register("video", write_video_samples)
registry.metrics.register("fvd", FVDMetric)
registry.metrics.register("frame-fid", FrameFIDMetric)
registry.metrics.register("moving-digits", MovingDigitsMetric)
