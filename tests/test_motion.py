"""Motion realism of moving digits: the motion-type classifier (trained once per session, in a
temporary cache), shape consistency, motion-type histograms and their place in the
moving-digits metric."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from ditx.modalities.video import motion as M
from ditx.modalities.video import moving_digits_metric as MDM
from ditx.modalities.video.moving_digits import MOTIONS, render_moving_digits
from torch import Tensor

from ditx.data import Dataset

pytest.importorskip("decord")
pytest.importorskip("av")


def as_clips(uint8_clips) -> Tensor:
    """uint8 (N, T, H, W) grey -> (N, 3, T, H, W) in [-1, 1], like decoded RGB clips."""
    clips = torch.as_tensor(uint8_clips).float() / 127.5 - 1
    return clips[:, None].expand(-1, 3, -1, -1, -1).contiguous()


def blank(t: int, size: int = 8) -> Tensor:
    return -torch.ones(1, 1, t, size, size)


@pytest.fixture(scope="session")
def motion_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ditx-motion-cache")


@pytest.fixture(scope="session")
def motion_classifier(motion_cache):
    return M.load_or_train_motion_classifier(32, cache_dir=motion_cache)


@pytest.fixture(scope="session")
def held_out():
    """400 test-split clips of 8 frames with another seed than the classifier's own scoring (1)."""
    clips, labels, motions = render_moving_digits(400, 8, 32, 14, "test", 5)
    return as_clips(clips), torch.as_tensor(labels), list(motions)


def types_of(motions) -> Tensor:
    return torch.tensor([MOTIONS.index(m) for m in motions])


# ---------------------------------------------------------------------------------------
# the motion-type classifier
# ---------------------------------------------------------------------------------------


def per_type_accuracy(predictions: Tensor, types: Tensor) -> dict[str, float]:
    return {name: float((predictions[types == k] == k).double().mean()) for k, name in enumerate(MOTIONS)}


def test_motion_classifier_is_accurate_on_each_motion_of_held_out_jittered_clips(motion_classifier, held_out):
    clips, _, motions = held_out
    types = types_of(motions)
    trajectories = M.centroid_trajectories(clips)  # (N, 8, 2)
    jittered = trajectories + 0.5 * torch.randn(trajectories.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predictions = motion_classifier.trajectory_logits(jittered, (32, 32)).argmax(1)
    accuracy = per_type_accuracy(predictions, types)
    assert min(accuracy.values()) >= 0.95, accuracy
    assert (motion_classifier.predict(clips) == types).double().mean() >= 0.97  # without jitter


@pytest.mark.parametrize("num_frames", [4, 16])
def test_motion_classifier_works_for_other_clip_lengths(motion_classifier, num_frames):
    clips, _, motions = render_moving_digits(200, num_frames, 32, 14, "test", 6)
    accuracy = per_type_accuracy(motion_classifier.predict(as_clips(clips)), types_of(motions))
    assert min(accuracy.values()) >= 0.93, accuracy


def test_recorded_accuracies_cover_rendered_and_mp4_clips_of_every_motion(motion_classifier):
    report = motion_classifier.accuracy_report()
    assert set(report) == {"rendered", "mp4"}
    for accuracies in report.values():
        assert set(accuracies) == {"all", *MOTIONS}
        assert min(accuracies.values()) >= 0.95, report
    assert motion_classifier.test_accuracy == pytest.approx(min(report["rendered"]["all"], report["mp4"]["all"]))


def test_second_load_comes_from_the_cache_without_training(motion_classifier, motion_cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train_motion_classifier retrained although the cache holds the model")

    monkeypatch.setattr(M, "train_motion_classifier", no_training)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = M.load_or_train_motion_classifier(32, cache_dir=motion_cache)
    state, cached = motion_classifier.state_dict(), loaded.state_dict()
    assert state.keys() == cached.keys() and "accuracies" in state
    assert all(torch.equal(state[k], cached[k]) for k in state)
    assert loaded.weights_sha256 == motion_classifier.weights_sha256
    assert loaded.accuracy_report() == motion_classifier.accuracy_report()
    settings = motion_classifier.settings
    assert settings["render"]["split"] == "train" and settings["test_render"]["split"] == "test"
    assert len(settings["train_data_sha256"]) == 64
    for change in ({"epochs": 3}, {"seed": 1}, {"train_data_sha256": "0" * 64}):
        assert M.motion_classifier_path({**settings, **change}) != M.motion_classifier_path(settings)


def test_trajectory_features_do_not_depend_on_clip_length_canvas_size_or_place():
    def arc(t: int, side: float, offset: float) -> Tensor:
        angle = torch.linspace(0, math.pi / 2, t)
        return (offset + side * 0.2 * torch.stack([angle.sin(), angle.cos()], 1))[None]  # (1, T, 2)

    def line(t: int) -> Tensor:
        return torch.stack([torch.full((t,), 3.0), torch.linspace(0, 12, t)], 1)[None]

    torch.testing.assert_close(M.trajectory_features(line(5), (32, 32)), M.trajectory_features(line(9), (32, 32)))
    torch.testing.assert_close(
        M.trajectory_features(arc(16, 32, 16), (32, 32)), M.trajectory_features(arc(16, 64, 3), (64, 64))
    )
    assert M.trajectory_features(line(8), (32, 32)).shape == (1, 2 * M.TRAJECTORY_POINTS)
    with pytest.raises(ValueError, match="at least 4 frames"):
        M.MotionClassifier()(blank(3))


# ---------------------------------------------------------------------------------------
# shape consistency
# ---------------------------------------------------------------------------------------


def test_a_digit_translated_by_whole_pixels_keeps_its_shape(held_out):
    clips = held_out[0]
    torch.testing.assert_close(M.shape_consistency(clips), torch.ones(len(clips)))  # rendered: whole-pixel moves
    # one digit, moved by hand along a path with steps of up to 6 pixels (on a wider canvas: nothing wraps)
    digit = F.pad(clips[0, :1, 0], (8, 8, 8, 8), value=-1.0)  # (1, 48, 48)
    path = [(0, 0), (1, 3), (3, 2), (-2, -4), (-5, 1)]
    moved = torch.stack([torch.roll(digit, shift, dims=(-2, -1)) for shift in path], 1)[None]  # (1, 1, 5, 48, 48)
    assert M.shape_consistency(moved).item() == 1.0


def test_faint_smudges_that_move_the_centroid_do_not_cost_iou():
    # a 5x5 ink square; in frame 1 three faint pixels (intensity 0.45, not ink) pull the centroid 0.77 px to the
    # right, so the rounded centroids disagree by a pixel and only the +-1 px alignment recovers the identical masks
    clip = blank(2, 32)
    clip[..., 8:13, 8:13] = 1.0
    clip[0, 0, 1, 8:11, 25] = -0.1
    centroids = M.centroid_trajectories(clip)[0]
    assert centroids[1, 1] - centroids[0, 1] == pytest.approx(0.77, abs=0.01)
    assert M.shape_consistency(clip).item() == 1.0
    assert M.shape_consistency(clip, max_shift=0).item() == pytest.approx(20 / 30)


def test_shape_consistency_of_a_tiny_clip_is_the_hand_computed_mean_iou():
    clip = blank(3)
    clip[..., 0, 1:3, 1:3] = 1.0  # frame 0: a 2x2 square (4 ink pixels)
    clip[..., 1, 4:6, 3:6] = 0.5  # frame 1: a 2x3 rectangle elsewhere, intensity 0.75: 4 / 6 at best
    clip[..., 2, 0, 0] = 0.0  # frame 2: intensity 0.5, not above the threshold: no ink, IoU 0
    assert M.shape_consistency(clip).item() == pytest.approx((4 / 6 + 0) / 2)
    assert M.shape_consistency(clip.expand(2, 3, -1, -1, -1)).tolist() == pytest.approx([1 / 3, 1 / 3])
    assert M.shape_consistency(clip, threshold=0.2).item() == pytest.approx((4 / 6 + 1 / 4) / 2)  # 1 ink pixel
    assert M.shape_consistency(blank(4)).item() == 0.0  # no digit at all: nothing kept
    with pytest.raises(ValueError, match="at least 2 frames"):
        M.shape_consistency(blank(1))
    with pytest.raises(ValueError, match="threshold"):
        M.shape_consistency(blank(2), threshold=1.5)


def rotate(frames: Tensor, angle: float) -> Tensor:
    """(B, C, H, W) in [-1, 1] rotated by ``angle`` radians about the canvas centre (bilinear)."""
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]]).expand(len(frames), 2, 3)
    grid = F.affine_grid(theta, list(frames.shape), align_corners=False)
    return F.grid_sample(frames + 1, grid, align_corners=False) - 1


def test_a_digit_swapped_or_deformed_mid_clip_loses_shape_consistency(held_out):
    clips, labels, _ = held_out
    clips, labels = clips[:100], labels[:100]
    other = torch.tensor([int(torch.nonzero(labels != y)[0]) for y in labels])  # a clip of another digit
    swapped = clips.clone()
    swapped[:, :, 2:] = clips[other][:, :, 2:]
    deformed = clips.clone()
    for t in range(1, clips.shape[2]):
        deformed[:, :, t] = rotate(clips[:, :, t], 0.12 * t)  # 7 degrees more every frame
    assert M.shape_consistency(swapped).mean() < 0.7
    assert M.shape_consistency(deformed).mean() < 0.7


def test_clips_through_the_mp4_pipeline_keep_their_shape_and_motion(motion_classifier):
    clips, _, motions = render_moving_digits(60, 8, 32, 14, "test", 8)
    decoded = M.mp4_roundtrip(clips)
    assert decoded.shape == (60, 3, 8, 32, 32)
    assert M.shape_consistency(decoded).mean() >= 0.98
    assert (motion_classifier.predict(decoded) == types_of(motions)).double().mean() >= 0.95


# ---------------------------------------------------------------------------------------
# histograms and total variation
# ---------------------------------------------------------------------------------------


def test_motion_histogram_and_total_variation_closed_forms():
    histogram = M.motion_histogram(torch.tensor([0, 0, 1, 3]))
    assert histogram.tolist() == [0.5, 0.25, 0.0, 0.25]
    p, q = torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.5, 0.5, 0.0])
    assert M.total_variation(p, q) == 0.5
    assert M.total_variation(p, p) == 0.0
    assert M.total_variation(torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 0.25, 0.75])) == 1.0
    assert M.total_variation(histogram, torch.full((4,), 0.25)) == pytest.approx(0.5 * (0.25 + 0 + 0.25 + 0))
    with pytest.raises(ValueError, match=r"values from 0 to 4"):
        M.motion_histogram(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one shape"):
        M.total_variation(p, p[:3] / p[:3].sum())
    with pytest.raises(ValueError, match="sum to 1"):
        M.total_variation(p, 2 * q)


# ---------------------------------------------------------------------------------------
# in the moving-digits metric
# ---------------------------------------------------------------------------------------


class ClipList(Dataset):
    num_classes = 10

    def __init__(self, clips: Tensor, labels: Tensor | None = None):
        self.clips, self.labels, self.split = clips, labels, "test"
        self.sample_shape = tuple(clips.shape[1:])

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.clips[i]} if self.labels is None else {"x": self.clips[i], "y": self.labels[i]}


def untrained_frame_classifier(size=32, *args, **kwargs):
    """Stands in for the frame classifier (tested in test_video_metrics.py): the motion keys do not use it."""
    torch.manual_seed(0)
    model = MDM.MovingDigitsClassifier().eval().requires_grad_(False)
    model.settings, model.settings_hash, model.weights_sha256, model.test_accuracy = {}, "0" * 16, "0" * 64, 0.1
    return model


@pytest.fixture(scope="module")
def metric(motion_classifier, motion_cache, held_out):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MDM, "load_or_train_moving_digits_classifier", untrained_frame_classifier)
        metric = MDM.MovingDigitsMetric(cache_dir=motion_cache)
        metric.prepare(ClipList(*held_out[:2]), "cpu")
    return metric


def test_the_reference_has_the_reference_motion_and_shape(metric, held_out, motion_classifier):
    clips, labels, motions = held_out
    result = metric.compute(clips, labels, motions=motions)
    histogram = [f"motion_histogram_{m}" for m in MOTIONS]
    reference = [f"reference_motion_histogram_{m}" for m in MOTIONS]
    for key in ("motion_tv", "shape_consistency", "reference_shape_consistency", "motion_accuracy", *histogram,
                *reference, "frame_accuracy", "clip_consistency", "motion_px", "fvd_digits"):  # fmt: skip
        assert isinstance(result[key], float), key
    assert result["motion_tv"] == 0.0
    assert [result[k] for k in histogram] == [result[k] for k in reference]
    assert sum(result[k] for k in histogram) == pytest.approx(1.0)
    assert min(result[k] for k in histogram) > 0.15  # the renderer draws the four motions about equally
    assert result["shape_consistency"] == result["reference_shape_consistency"] == 1.0
    assert result["motion_accuracy"] >= 0.97
    assert metric.motion_classifier.weights_sha256 == motion_classifier.weights_sha256
    wrong = [MOTIONS[(MOTIONS.index(m) + 1) % 4] for m in motions]
    assert metric.compute(clips, motions=wrong)["motion_accuracy"] < 0.05
    assert "motion_accuracy" not in metric.compute(clips)



def test_prompts_give_the_motions_and_split_seen_from_held_out_pairs(metric, held_out):
    import numpy as np
    from ditx.modalities.video.moving_digits import caption_for

    clips, labels, motions = held_out
    rng = np.random.default_rng(0)
    captions = [caption_for(int(y), m, rng) for y, m in zip(labels, motions)]
    by_motion = metric.compute(clips, labels, motions=motions)
    metric.held_out_pairs = {(0, "circle"), (4, "diagonal")}
    try:
        result = metric.compute(clips, None, captions)  # the digits and motions come from the prompts
    finally:
        metric.held_out_pairs = set()
    held = [(int(y), m) in {(0, "circle"), (4, "diagonal")} for y, m in zip(labels, motions)]
    assert result["num_samples_held_out"] == sum(held) > 0 and result["num_samples_seen"] == len(clips) - sum(held)
    assert result["motion_accuracy"] == by_motion["motion_accuracy"]
    assert result["frame_accuracy"] == by_motion["frame_accuracy"]  # labels read from the prompts
    predicted, asked = metric.motion_classifier.predict(clips), torch.tensor([MOTIONS.index(m) for m in motions])
    mask = torch.tensor(held)
    assert result["motion_accuracy_held_out"] == float((predicted == asked)[mask].double().mean())
    assert result["motion_accuracy_seen"] == float((predicted == asked)[~mask].double().mean())
    assert {"frame_accuracy_seen", "clip_consistency_held_out"} <= result.keys()
    with pytest.raises(ValueError, match="cannot read 'a dog running'"):
        metric.compute(clips[:2], None, ["a dog running", captions[1]])


def test_clips_of_one_motion_are_far_from_the_reference_histogram(metric, held_out):
    clips, _, motions = held_out
    circles = clips[[i for i, m in enumerate(motions) if m == "circle"]]
    result = metric.compute(circles, motions=["circle"] * len(circles))
    assert result["motion_histogram_circle"] >= 0.95
    expected = 1 - result["reference_motion_histogram_circle"]  # all mass on one type: TV is the rest of the reference
    assert result["motion_tv"] == pytest.approx(expected, abs=0.05)
    static = clips[:, :, :1].expand(-1, -1, clips.shape[2], -1, -1)
    assert metric.compute(static)["shape_consistency"] == 1.0  # a frozen digit keeps its shape (motion_px shows it)


def test_metric_checks_prompted_motions(metric, held_out):
    clips = held_out[0][:4]
    with pytest.raises(ValueError, match=r"one motion name per sample \(4\), got 3 names"):
        metric.compute(clips, motions=["circle"] * 3)
    with pytest.raises(ValueError, match=r"unknown motions 'zigzag'; .*horizontal, vertical, diagonal, circle"):
        metric.compute(clips, motions=["circle", "zigzag", "circle", "circle"])
    with pytest.raises(ValueError, match="one motion name per sample"):
        metric.compute(clips, motions="circle")


def test_protocol_describes_the_motion_classifier_and_the_new_keys(metric, motion_classifier):
    protocol = json.loads(json.dumps(metric.protocol()))
    described = protocol["motion_classifier"]
    assert described["used"] and described["settings_hash"] == motion_classifier.settings_hash
    assert described["weights_sha256"] == motion_classifier.weights_sha256
    assert described["test_accuracies_at_training"] == motion_classifier.accuracy_report()
    for key in ("motion_tv", "shape_consistency", "motion_accuracy", "motion_histogram_<type>", "ink"):
        assert protocol["definitions"][key]


def test_clips_too_short_for_motion_types_keep_the_other_keys(motion_cache, held_out):
    clips, labels, _ = held_out
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MDM, "load_or_train_moving_digits_classifier", untrained_frame_classifier)
        metric = MDM.MovingDigitsMetric(cache_dir=motion_cache)
        metric.prepare(ClipList(clips[:20, :, :3], labels[:20]), "cpu")
    result = metric.compute(clips[:10, :, :3])
    assert not any(k.startswith(("motion_tv", "motion_hist", "reference_motion_hist")) for k in result)
    assert result["shape_consistency"] == 1.0
    assert "fewer than 4" in metric.protocol()["motion_classifier"]["why_not"]
    with pytest.raises(ValueError, match="at least 4 frames"):
        metric.compute(clips[:10, :, :3], motions=["circle"] * 10)
