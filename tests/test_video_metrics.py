"""Video metrics: FVD (StyleGAN-V's I3D convention), frame-wise FID, and the moving-digits judge.

The real I3D and Inception weights cannot be downloaded here: FVD runs a tiny TorchScript
stand-in with the I3D's call signature (it refuses any other call convention), frame-FID a
randomly initialised Inception. That proves the conventions and the pipeline, not the
published numbers.
"""

import hashlib
import json
import math
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from ditx.modalities.image import inception as INC
from ditx.modalities.video import metrics as VM
from ditx.modalities.video import moving_digits_metric as MDM
from torch import Tensor, nn

from ditx.data import Dataset

pytest.importorskip("torchmetrics")

# the I3D ships only as TorchScript, which torch deprecates; the stand-in is written the same way
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


class ClipList(Dataset):
    """A dataset of {"x": clip (C, T, H, W)} items, with "y" when labels are given."""

    def __init__(self, clips, labels=None, split="test"):
        self.clips, self.labels, self.split = clips, labels, split

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        item = {"x": self.clips[i]}
        if self.labels is not None:
            item["y"] = int(self.labels[i])
        return item


def uniform_clips(n, c, t, size, seed, low=-1.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, t, size, size, generator=g) * (high - low) + low


# ---------------------------------------------------------------------------------------
# FVD with a stand-in for StyleGAN-V's i3d_torchscript.pt
# ---------------------------------------------------------------------------------------


class TinyI3D(nn.Module):
    """StyleGAN-V's detector call: ``detector(videos uint8 (B, 3, T, H, W), rescale=, resize=, return_features=)``.

    It accepts only the call FVD must make (uint8 RGB, all three flags set) and returns
    400-d features of the rescaled ([-1, 1]) and resized clips. The real one resizes to
    224x224; this one to 8x8, which keeps the test small.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 64, (1, 4, 4), stride=(1, 4, 4))
        self.proj = nn.Linear(64 * 8, 400)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8:
            raise ValueError("TinyI3D: videos must be uint8 in [0, 255]")
        if x.shape[1] != 3:
            raise ValueError("TinyI3D: videos must be RGB (B, 3, T, H, W)")
        if not (rescale and resize and return_features):
            raise ValueError("TinyI3D: FVD calls the detector with rescale=True, resize=True, return_features=True")
        v = x.float() / 255 * 2 - 1
        v = F.interpolate(v, size=(int(x.shape[2]), 8, 8), mode="trilinear", align_corners=False)
        h = torch.tanh(self.conv(v))  # (B, 64, T, 2, 2)
        h = F.adaptive_avg_pool3d(h, (2, 2, 2))  # (B, 64, 2, 2, 2)
        return self.proj(h.flatten(1))


class WrongOutputI3D(nn.Module):
    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        return x.float().flatten(1)[:, :10]


@pytest.fixture(scope="module")
def i3d_path(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.jit.script(TinyI3D())
    path = tmp_path_factory.mktemp("i3d") / VM.I3D_WEIGHTS_FILE
    torch.jit.save(module, str(path))
    return path


@pytest.fixture
def no_i3d_env(monkeypatch):
    monkeypatch.delenv(VM.I3D_WEIGHTS_ENV, raising=False)


def independent_fvd(path, reference, samples):
    """FVD by hand: StyleGAN-V's pixels into the detector, Fréchet distance in numpy/scipy."""
    detector = torch.jit.load(str(path))

    def features(clips):
        pixels = torch.round((clips.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
        pixels = pixels.repeat(1, 3 // clips.shape[1], 1, 1, 1)  # grey -> RGB
        with torch.no_grad():
            return detector(pixels, rescale=True, resize=True, return_features=True).double().numpy()

    a, b = features(reference), features(samples)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.linalg.matrix_rank(s1) == 400 and np.linalg.matrix_rank(s2) == 400  # a fair test: full-rank Gaussians
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def fvd_sets():
    reference = uniform_clips(450, 1, 3, 8, seed=0)  # grey clips: repeated to RGB on the way in
    samples = uniform_clips(430, 1, 3, 8, seed=1, low=-1.0, high=0.4)  # darker
    return reference, samples


@pytest.fixture(scope="module")
def fvd_metric(i3d_path, fvd_sets):
    metric = VM.FVDMetric(weights=str(i3d_path), batch_size=64, kid_subsets=10, kid_subset_size=200)
    metric.prepare(ClipList(fvd_sets[0]), "cpu")
    return metric


def test_missing_i3d_weights_error_says_where_to_get_them_and_how_to_pass_them(no_i3d_env):
    with pytest.raises(FileNotFoundError) as info:
        VM.FVDMetric().prepare(ClipList(uniform_clips(2, 3, 2, 8, seed=0)), "cpu")
    message = str(info.value)
    for needed in (VM.I3D_WEIGHTS_FILE, VM.I3D_WEIGHTS_URL, "weights=", VM.I3D_WEIGHTS_ENV, "name: fvd"):
        assert needed in message


def test_i3d_weights_come_from_the_argument_then_the_environment_never_a_fallback(
    i3d_path, tmp_path, monkeypatch, no_i3d_env
):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt.*" + VM.I3D_WEIGHTS_FILE):
        VM.find_i3d_weights(missing)
    monkeypatch.setenv(VM.I3D_WEIGHTS_ENV, str(i3d_path))
    assert VM.find_i3d_weights() == i3d_path
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        VM.find_i3d_weights(missing)  # a given path wins over the environment, even when missing
    monkeypatch.setenv(VM.I3D_WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=VM.I3D_WEIGHTS_ENV):
        VM.find_i3d_weights()


def test_files_that_are_not_the_i3d_are_refused_with_the_how_to(tmp_path):
    bad = tmp_path / "not-torchscript.pt"
    torch.save({"weight": torch.zeros(3)}, bad)  # a state dict, not a TorchScript archive
    with pytest.raises(ValueError, match="not a TorchScript module.*" + VM.I3D_WEIGHTS_URL.replace("?", r"\?")):
        VM.load_i3d_detector(bad)
    wrong = tmp_path / "wrong-output.pt"
    torch.jit.save(torch.jit.script(WrongOutputI3D()), str(wrong))
    metric = VM.FVDMetric(weights=str(wrong))
    with pytest.raises(ValueError, match=r"returned \(2, 10\).*\(2, 400\)"):
        metric.prepare(ClipList(uniform_clips(2, 3, 2, 8, seed=0)), "cpu")


def test_fvd_is_the_frechet_distance_of_i3d_features_of_stylegan_v_pixels(fvd_metric, fvd_sets, i3d_path):
    reference, samples = fvd_sets
    expected = independent_fvd(i3d_path, reference, samples)
    result = fvd_metric.compute(samples)
    assert set(result) == {"fvd", "kvd", "kvd_std"}
    assert expected > 1.0
    assert result["fvd"] == pytest.approx(expected, rel=1e-4)
    assert result["kvd"] > 0


def test_fvd_of_a_set_to_itself_is_zero(fvd_metric, fvd_sets):
    reference, samples = fvd_sets
    same = fvd_metric.compute(reference)
    different = fvd_metric.compute(samples)
    assert abs(same["fvd"]) < 1e-6 * different["fvd"]
    assert abs(same["kvd"]) < 0.1 * different["kvd"]


def test_fvd_features_are_the_detectors_on_rounded_rgb_pixels(fvd_metric, i3d_path):
    clips = uniform_clips(4, 1, 3, 8, seed=5)
    detector = torch.jit.load(str(i3d_path))
    rgb = torch.round((clips + 1) * 127.5).to(torch.uint8).repeat(1, 3, 1, 1, 1)
    expected = detector(rgb, rescale=True, resize=True, return_features=True)
    torch.testing.assert_close(fvd_metric.features(clips), expected)
    torch.testing.assert_close(fvd_metric.features(clips.repeat(1, 3, 1, 1, 1)), expected)  # grey == its RGB


def test_fvd_checks_clip_counts_lengths_and_shapes(fvd_metric, i3d_path):
    with pytest.raises(RuntimeError, match="before prepare"):
        VM.FVDMetric(weights=str(i3d_path)).compute(uniform_clips(4, 3, 3, 8, seed=0))
    with pytest.raises(ValueError, match="at least 2 sample clips"):
        fvd_metric.compute(uniform_clips(1, 1, 3, 8, seed=0))
    with pytest.raises(ValueError, match="4 frames.*reference clips 3"):
        fvd_metric.compute(uniform_clips(8, 1, 4, 8, seed=0))
    with pytest.raises(ValueError, match=r"clips \(N, C, T, H, W\)"):
        fvd_metric.compute(torch.zeros(8, 1, 8, 8))  # images, not clips
    with pytest.raises(ValueError, match="at least 2 reference clips"):
        VM.FVDMetric(weights=str(i3d_path)).prepare(ClipList(uniform_clips(1, 1, 3, 8, seed=0)), "cpu")
    with pytest.raises(ValueError, match="num_frames"):
        VM.FVDMetric(num_frames=0)


def test_num_frames_keeps_the_first_frames_of_every_clip(i3d_path):
    reference, samples = uniform_clips(40, 3, 6, 8, seed=0), uniform_clips(30, 3, 5, 8, seed=1)
    cut = VM.FVDMetric(weights=str(i3d_path), num_frames=4, kid_subsets=2)
    cut.prepare(ClipList(reference), "cpu")
    full = VM.FVDMetric(weights=str(i3d_path), kid_subsets=2)
    full.prepare(ClipList(reference[:, :, :4]), "cpu")
    assert cut.compute(samples)["fvd"] == pytest.approx(full.compute(samples[:, :, :4])["fvd"], rel=1e-6)
    assert cut.protocol()["num_frames"] == 4
    with pytest.raises(ValueError, match="at least 4 frames"):
        cut.compute(uniform_clips(4, 3, 3, 8, seed=2))


def test_fvd_protocol_records_clips_frames_pixels_and_weights(fvd_metric, fvd_sets, i3d_path):
    fvd_metric.compute(fvd_sets[1])
    protocol = json.loads(json.dumps(fvd_metric.protocol()))
    assert protocol["metric"] == "fvd"
    assert protocol["num_samples"] == 430 and protocol["reference_size"] == 450 and protocol["num_frames"] == 3
    extractor = protocol["feature_extractor"]
    assert extractor["weights_sha256"] == hashlib.sha256(i3d_path.read_bytes()).hexdigest()
    assert extractor["weights_url"] == VM.I3D_WEIGHTS_URL
    assert "rescale=True" in extractor["call"] and "resize=True" in extractor["call"]
    assert "224" in protocol["preprocessing"]["resize"] and "[0, 255]" in protocol["preprocessing"]["value_range"]
    assert protocol["reference"]["max_reference_clips"] == 2048
    assert protocol["stylegan_v_fvd2048_16f"]["matched"] is False


# ---------------------------------------------------------------------------------------
# frame-wise FID: the image Inception metric over all frames
# ---------------------------------------------------------------------------------------


def test_clips_to_frames_puts_frame_t_of_clip_i_at_row_i_times_t():
    clips = torch.arange(2 * 3 * 4 * 5 * 5, dtype=torch.float32).view(2, 3, 4, 5, 5)
    frames = VM.clips_to_frames(clips)
    assert frames.shape == (8, 3, 5, 5)
    for i in range(2):
        for t in range(4):
            assert torch.equal(frames[i * 4 + t], clips[i, :, t])
    dataset = VM.ClipFrames(ClipList(clips))
    assert len(dataset) == 8
    assert all(torch.equal(dataset[k]["x"], frames[k]) for k in range(8))
    assert len(VM.ClipFrames(ClipList(clips), max_clips=1)) == 4


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A randomly initialised FeatureExtractorInceptionV3 state dict, as in test_inception_metrics."""
    try:
        extractor = INC.inception_extractor_class()
    except ImportError as e:
        pytest.skip(f"torch-fidelity is not importable: {e}")
    module = sys.modules[extractor.__module__]
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(extractor, "load_state_dict", lambda self, state_dict, strict=True: None)
        torch.manual_seed(0)
        network = extractor("inception-v3-compat", ["64"])
    for m in network.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


def test_frame_fid_scores_every_frame_with_the_inception_metric(random_inception):
    reference = uniform_clips(2, 3, 2, 32, seed=0)  # 4 frames
    other = uniform_clips(2, 1, 2, 32, seed=1, low=-0.9, high=-0.6)  # grey, dark
    metric = VM.FrameFIDMetric(weights_path=str(random_inception), feature=64, is_splits=2, kid_subsets=3)
    with pytest.warns(RuntimeWarning, match="not the official"):
        metric.prepare(ClipList(reference), "cpu")
    same, different = metric.compute(reference), metric.compute(other)
    keys = {"frame_fid", "frame_inception_score", "frame_inception_score_std", "frame_kid", "frame_kid_std"}
    assert set(same) == set(different) == keys
    assert different["frame_fid"] > 1e-3
    assert abs(same["frame_fid"]) < 1e-6 * different["frame_fid"]
    assert all(math.isfinite(v) for v in different.values())
    protocol = json.loads(json.dumps(metric.protocol()))
    assert protocol["metric"] == "frame-fid" and protocol["reference_size"] == 4  # frames
    assert protocol["reference"]["dataset"] == "ClipList" and protocol["reference"]["clips"] == 2
    assert protocol["num_clips"] == 2 and protocol["clip_shape"] == [1, 2, 32, 32]
    with pytest.raises(ValueError, match=r"clips \(N, C, T, H, W\)"):
        metric.compute(torch.zeros(4, 3, 32, 32))


# ---------------------------------------------------------------------------------------
# moving digits: centroids, motion, consistency (closed forms and constructed inputs)
# ---------------------------------------------------------------------------------------


def square_clip(t, size, corner, step, side=4, channels=1, value=1.0):
    """A (1, C, T, size, size) clip of a bright square moving by ``step`` pixels per frame."""
    clip = -torch.ones(1, channels, t, size, size)
    for k in range(t):
        y, x = corner[0] + step[0] * k, corner[1] + step[1] * k
        clip[0, :, k, y : y + side, x : x + side] = value
    return clip


def test_intensity_centroid_is_the_brightness_weighted_mean_position():
    frame = -torch.ones(1, 1, 10, 12)
    frame[0, 0, 2, 3] = 1.0  # intensity 1
    frame[0, 0, 6, 9] = 0.0  # intensity 0.5
    expected = torch.tensor([(2 * 1 + 6 * 0.5) / 1.5, (3 * 1 + 9 * 0.5) / 1.5])
    torch.testing.assert_close(MDM.intensity_centroid(frame)[0], expected)
    # channels are averaged; a black frame's centroid is the canvas centre
    torch.testing.assert_close(MDM.intensity_centroid(frame.expand(1, 3, 10, 12))[0], expected)
    torch.testing.assert_close(MDM.intensity_centroid(-torch.ones(2, 1, 10, 12)), torch.tensor([[4.5, 5.5]] * 2))


@pytest.mark.parametrize("channels", [1, 3])
def test_motion_px_of_a_translating_square_is_its_displacement(channels):
    clips = torch.cat(
        [
            square_clip(6, 32, (2, 3), (1, 2), channels=channels),  # moves (5, 10) in 5 steps
            square_clip(6, 32, (20, 20), (-3, 0), channels=channels, value=0.2),  # moves (-15, 0), dimmer
            square_clip(6, 32, (10, 10), (0, 0), channels=channels),  # static
        ]
    )
    torch.testing.assert_close(MDM.clip_motion_px(clips), torch.tensor([math.hypot(5, 10), 15.0, 0.0]))


def test_centroid_crops_centre_the_digit_wherever_it_is():
    frames = torch.cat([square_clip(1, 32, corner, (0, 0))[:, :, 0] for corner in [(0, 0), (14, 20), (28, 28)]])
    crops = MDM.centroid_crops(frames, 16)
    assert crops.shape == (3, 1, 16, 16)
    for crop in crops:  # the 4x4 square's centroid sits at the window centre (7.5, 7.5)
        torch.testing.assert_close(MDM.intensity_centroid(crop[None])[0], torch.tensor([7.5, 7.5]))
        assert (crop > 0).sum() == 16  # all of the square, and background (-1) around it


def test_frame_accuracy_and_clip_consistency_on_constructed_predictions():
    predictions = torch.tensor(
        [
            [3, 3, 3, 3],  # all frames agree, and match label 3
            [1, 1, 2, 1],  # majority 1 (3 of 4); label 2
            [0, 5, 5, 7],  # majority 5 (2 of 4); label 7
            [4, 6, 4, 6],  # a tie: 2 of 4 either way; label 9
        ]
    )
    labels = torch.tensor([3, 2, 7, 9])
    torch.testing.assert_close(
        MDM.clip_consistency(predictions), torch.tensor([1.0, 0.75, 0.5, 0.5], dtype=torch.float64)
    )
    assert MDM.frame_accuracy(predictions, labels) == pytest.approx((4 + 1 + 1 + 0) / 16)
    with pytest.raises(ValueError, match="labels"):
        MDM.frame_accuracy(predictions, labels[:3])


# ---------------------------------------------------------------------------------------
# the moving-digits classifier (trained once per session, in a temporary cache) and metric
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ditx-video-cache")


@pytest.fixture(scope="session")
def frame_classifier(digits_cache):
    pytest.importorskip("ditx.modalities.video.data")
    return MDM.load_or_train_moving_digits_classifier(32, cache_dir=digits_cache)


@pytest.fixture(scope="session")
def test_clips():
    """200 held-out clips (digits the classifier never saw), as RGB in [-1, 1] like the decoded dataset."""
    from ditx.modalities.video.moving_digits import render_moving_digits

    clips, labels, _ = render_moving_digits(200, num_frames=8, size=32, split="test", seed=7)
    clips = torch.as_tensor(clips).float() / 127.5 - 1  # (N, T, H, W)
    return clips[:, None].expand(-1, 3, -1, -1, -1).contiguous(), torch.as_tensor(labels)


@pytest.fixture(scope="session")
def digits_metric(frame_classifier, digits_cache, test_clips):
    metric = MDM.MovingDigitsMetric(cache_dir=digits_cache)
    metric.prepare(ClipList(*test_clips), "cpu")
    return metric


def test_classifier_is_accurate_on_held_out_rendered_frames(frame_classifier, test_clips):
    clips, labels = test_clips
    with torch.no_grad():
        predictions = frame_classifier(VM.clips_to_frames(clips)).argmax(1).view(len(clips), -1)
    assert MDM.frame_accuracy(predictions, labels) >= 0.95
    assert frame_classifier.test_accuracy >= 0.97  # recorded at training, on 500 other test clips


def test_second_load_comes_from_the_cache_without_training(frame_classifier, digits_cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train_moving_digits_classifier retrained although the cache holds the model")

    monkeypatch.setattr(MDM, "train_moving_digits_classifier", no_training)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = MDM.load_or_train_moving_digits_classifier(32, cache_dir=digits_cache)
    state, cached = frame_classifier.state_dict(), loaded.state_dict()
    assert state.keys() == cached.keys()
    assert all(torch.equal(state[k], cached[k]) for k in state)
    assert loaded.weights_sha256 == frame_classifier.weights_sha256
    assert loaded.test_accuracy == frame_classifier.test_accuracy
    path = MDM.moving_digits_classifier_path(frame_classifier.settings, digits_cache)
    assert [p.name for p in digits_cache.iterdir()] == [path.name]  # no temporaries left by the atomic write


def test_corrupted_cache_file_is_retrained_with_a_warning(frame_classifier, digits_cache, tmp_path, monkeypatch):
    path = MDM.moving_digits_classifier_path(frame_classifier.settings, tmp_path)
    data = MDM.moving_digits_classifier_path(frame_classifier.settings, digits_cache).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    calls = []

    def cheap_training(settings, frames, labels, device="cpu"):  # stands in for the real (tested above) training
        calls.append(settings)
        torch.manual_seed(0)
        return MDM.MovingDigitsClassifier(settings["crop_size"]).eval()

    monkeypatch.setattr(MDM, "train_moving_digits_classifier", cheap_training)
    with pytest.warns(RuntimeWarning) as caught:
        MDM.load_or_train_moving_digits_classifier(32, cache_dir=tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("could not be loaded" in m for m in messages), messages
    assert any("reached only 0.1" in m for m in messages), messages  # the untrained stand-in is flagged
    assert len(calls) == 1 and calls[0]["train_data_sha256"] == frame_classifier.settings["train_data_sha256"]


def test_cache_key_follows_the_settings(frame_classifier, tmp_path):
    settings = frame_classifier.settings
    assert MDM.moving_digits_classifier_path(settings, tmp_path).parent == tmp_path
    assert settings["render"]["split"] == "train" and settings["crop_size"] == 16
    for change in ({"epochs": 3}, {"seed": 1}, {"train_data_sha256": "0" * 64}):
        other = {**settings, **change}
        assert MDM.moving_digits_classifier_path(other) != MDM.moving_digits_classifier_path(settings)


def test_the_reference_scores_as_perfect_against_itself(digits_metric, test_clips):
    clips, labels = test_clips
    result = digits_metric.compute(clips, labels)
    assert set(result) == {
        "frame_accuracy", "clip_consistency", "motion_px", "reference_motion_px", "fvd_digits",
        "frame_fid_digits", "classifier_reference_accuracy", "shape_consistency", "reference_shape_consistency",
        "motion_tv", *(f"{side}motion_histogram_{m}" for side in ("", "reference_") for m in MDM.MOTIONS),
    }  # fmt: skip
    assert result["motion_tv"] == 0.0 and result["shape_consistency"] == result["reference_shape_consistency"] == 1.0
    assert result["frame_accuracy"] == result["classifier_reference_accuracy"] >= 0.95
    assert result["clip_consistency"] >= 0.97
    assert result["motion_px"] == pytest.approx(result["reference_motion_px"])
    assert result["reference_motion_px"] >= 3.6  # the renderer moves every digit at least 0.2 * (32 - 14) pixels
    assert abs(result["fvd_digits"]) < 1e-6 and abs(result["frame_fid_digits"]) < 1e-6
    assert "frame_accuracy" not in digits_metric.compute(clips)  # unconditional samples


def test_broken_clips_lose_consistency_motion_or_distance(digits_metric, test_clips):
    clips, labels = test_clips
    n, _, t = clips.shape[:3]
    # each frame from another clip: the digit changes identity and jumps around
    g = torch.Generator().manual_seed(0)
    mixed = torch.stack(
        [clips[torch.randint(0, n, (1,), generator=g).item(), :, k] for _ in range(n) for k in range(t)]
    )
    mixed = mixed.view(n, t, *mixed.shape[1:]).transpose(1, 2)
    static = clips[:, :, :1].expand(-1, -1, t, -1, -1)  # the first frame, frozen
    noise = torch.rand(clips.shape, generator=g) * 2 - 1

    real = digits_metric.compute(clips, labels)
    mixed_result = digits_metric.compute(mixed, labels)
    static_result = digits_metric.compute(static, labels)
    noise_result = digits_metric.compute(noise, labels)
    # real frames in the wrong order: identity changes, the clip distance sees it, the frame distance does not
    assert mixed_result["clip_consistency"] < 0.6 < real["clip_consistency"]
    assert mixed_result["frame_accuracy"] < 0.3
    assert mixed_result["fvd_digits"] > 100 * mixed_result["frame_fid_digits"]
    # real frames that do not move: no motion, and the clip distance (its trajectory part) sees it
    assert static_result["motion_px"] == 0.0 and static_result["clip_consistency"] == 1.0
    assert static_result["fvd_digits"] > 1.0 > 10 * static_result["frame_fid_digits"]
    assert mixed_result["fvd_digits"] > static_result["fvd_digits"]
    # noise: far from digits frame by frame
    assert noise_result["frame_fid_digits"] > 10.0 and noise_result["fvd_digits"] > 10.0


def test_metric_rejects_clips_unlike_the_reference(digits_metric, digits_cache):
    with pytest.raises(RuntimeError, match="before prepare"):
        MDM.MovingDigitsMetric(cache_dir=digits_cache).compute(torch.zeros(4, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 32, 32\).*got \(4, 3, 8, 16, 16\)"):
        digits_metric.compute(torch.zeros(4, 3, 8, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 32, 32\)"):
        digits_metric.compute(torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match="labels must be"):
        digits_metric.compute(torch.zeros(4, 3, 8, 32, 32), torch.zeros(3, dtype=torch.long))


def test_protocol_describes_the_judge_the_reference_and_the_definitions(digits_metric, frame_classifier):
    protocol = json.loads(json.dumps(digits_metric.protocol()))
    assert protocol["metric"] == "moving-digits"
    assert protocol["classifier"]["settings_hash"] == frame_classifier.settings_hash
    assert protocol["classifier"]["weights_sha256"] == frame_classifier.weights_sha256
    assert protocol["reference_size"] == 200 and protocol["reference"]["clip_shape"] == [3, 8, 32, 32]
    for key in ("motion_px", "clip_consistency", "frame_accuracy", "fvd_digits", "frame_fid_digits", "centroid"):
        assert protocol["definitions"][key]
