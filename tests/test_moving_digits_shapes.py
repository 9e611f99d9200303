"""Moving digits of many shapes (the bucketed recipe's data): rectangular canvases, groups of
clip shapes written to one folder, bucketed items, and the metric on non-square clips."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("decord")
pytest.importorskip("av")

from ditx.modalities.video import moving_digits as MD  # noqa: E402
from ditx.modalities.video import moving_digits_metric as MDM  # noqa: E402

from ditx.data import Dataset  # noqa: E402

SHAPES = [[8, 32, 32], [12, 32, 48], [6, 48, 32]]


def centroids(clips: np.ndarray) -> np.ndarray:
    """uint8 (N, T, H, W) -> (N, T, 2) ink-weighted mean (y, x)."""
    w = clips.astype(np.float64)
    ys, xs = np.arange(clips.shape[2]), np.arange(clips.shape[3])
    total = w.sum((2, 3))
    return np.stack([(w.sum(3) * ys).sum(2) / total, (w.sum(2) * xs).sum(2) / total], -1)


def test_a_square_canvas_renders_as_before_and_streams_draw_other_clips():
    square, labels, motions = MD.render_moving_digits(30, 8, 32, 14, "train", 0)
    same, same_labels, _ = MD.render_moving_digits(30, 8, (32, 32), 14, "train", 0, stream=0)
    assert np.array_equal(square, same) and np.array_equal(labels, same_labels)
    other, _, _ = MD.render_moving_digits(30, 8, 32, 14, "train", 0, stream=1)
    assert not np.array_equal(square, other)
    # every class equally often and every clip moves (at least 0.2 of the room of 18 px)
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    c = centroids(square)
    assert (np.linalg.norm(c[:, -1] - c[:, 0], axis=-1) >= 0.2 * 18 - 0.5).all()
    assert set(motions) <= set(MD.MOTIONS)


def test_a_rectangular_canvas_uses_its_whole_width():
    clips, labels, motions = MD.render_moving_digits(200, 12, (32, 48), 14, "test", 0)
    assert clips.shape == (200, 12, 32, 48) and clips.dtype == np.uint8
    ink = clips.astype(bool)
    assert ink[:, :, :, 32:].any()  # digits reach beyond a square's width
    assert not ink[:, :, :, :].all(axis=(2, 3)).any() and ink.any(axis=(2, 3)).all()  # one digit in every frame
    c = centroids(clips)
    horizontal = np.array([m == "horizontal" for m in motions])
    # horizontal motion: y fixed, x travels at least 0.2 of the horizontal room (34 px)
    assert np.abs(np.diff(c[horizontal, :, 0], axis=1)).max() < 1e-9
    assert (np.abs(c[horizontal, -1, 1] - c[horizontal, 0, 1]) >= 0.2 * 34 - 0.5).all()
    with pytest.raises(ValueError, match=r"min\(height, width\) - digit_size >= 10"):
        MD.render_moving_digits(10, 8, (20, 48), 14)


def test_clip_shapes_write_each_shape_in_turn_and_bucketed_items_keep_them(tmp_path):
    root = tmp_path / "mixed"
    counts = {"train": 30, "test": 12}
    MD.write_moving_digits(root, counts, clip_shapes=SHAPES)
    settings = json.loads((root / ".complete").read_text())
    assert settings["clip_shapes"] == SHAPES and settings["digit_size"] == 32 * 7 // 16
    from ditx.modalities.video.clips import probe_videos

    for split, n in counts.items():
        paths = sorted((root / split).rglob("*.mp4"), key=lambda p: p.name)
        assert len(paths) == n
        infos = probe_videos([str(p) for p in paths], tmp_path / "probe", root / split)
        for p, info in zip(paths, infos):
            frames, height, width = SHAPES[int(p.stem.split("_")[1]) % len(SHAPES)]
            assert (info["frames"], info["height"], info["width"]) == (frames, height, width), p
    # asking for other shapes in the same folder is refused, naming the difference
    with pytest.raises(ValueError, match=r"clip_shapes"):
        MD.write_moving_digits(root, counts, clip_shapes=SHAPES[:2])

    buckets = [{"size": s, "batch_size": 2} for s in SHAPES]
    data = MD.MovingDigitsDataset(str(root), "train", num_clips_train=30, num_clips_test=12, clip_shapes=SHAPES,
                                  buckets=buckets, cache_dir=str(tmp_path / "probe"))  # fmt: skip
    assert data.stats["buckets"] == {"8x32x32": 10, "12x32x48": 10, "6x48x32": 10}
    for i in range(len(data)):
        written = SHAPES[clip_index(data, i) % len(SHAPES)]  # each clip lands in the bucket of its own shape
        assert SHAPES[int(data.item_buckets[i])] == written
        assert tuple(data[i]["x"].shape) == (3, *written)


def test_small_groups_of_shapes_together_hold_every_digit_each_balanced():
    shapes = [[8, 32, 32], [12, 32, 32], [8, 32, 48], [12, 32, 48]]
    clips, labels, _ = MD._render_split(16, 8, 32, 14, "train", 0, set(), shapes)  # 4 clips per shape
    assert sorted(set(labels.tolist())) == list(range(10))  # a folder of class folders 0 to 9
    for g, shape in enumerate(shapes):
        group = labels[g::4]
        assert len(set(group.tolist())) == 4 and all(c.shape == tuple(shape) for c in clips[g::4])


def clip_index(data, i) -> int:
    """The clip index in the file name of item ``i`` (clip_<index>.mp4)."""
    return int(str(data.path(i)).rsplit("clip_", 1)[1].split(".")[0])


class Clips(Dataset):
    def __init__(self, clips, labels):
        self.clips, self.labels = clips, labels
        self.data_shape, self.num_classes = tuple(clips.shape[1:]), 10

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        return {"x": self.clips[i], "y": int(self.labels[i])}


def as_clips(uint8_clips):
    clips = torch.as_tensor(uint8_clips).float() / 127.5 - 1
    return clips[:, None].expand(-1, 3, -1, -1, -1).contiguous()


def test_the_metric_scores_non_square_clips_with_the_shorter_sides_classifier(tmp_path):
    reference, labels, _ = MD.render_moving_digits(60, 8, (32, 48), 14, "test", 0, stream=3)
    samples, sample_labels, _ = MD.render_moving_digits(60, 8, (32, 48), 14, "test", 0, stream=4)
    metric = MDM.MovingDigitsMetric(cache_dir=tmp_path)
    metric.prepare(Clips(as_clips(reference), labels), "cpu")
    assert metric.classifier.settings["render"]["size"] == 32  # the 32x32 classifier: digits of 14 px
    scores = metric.compute(as_clips(samples), torch.as_tensor(sample_labels))
    assert scores["frame_accuracy"] >= 0.9 and scores["clip_consistency"] >= 0.9  # real clips of unseen digits
    assert scores["motion_px"] > 3.0
    shuffled = metric.compute(as_clips(samples), torch.as_tensor((sample_labels + 1) % 10))
    assert shuffled["frame_accuracy"] < 0.2  # the labels matter
    assert "motion_tv" not in scores  # the motion classifier knows square canvases only, and says so
    assert "square" in metric.protocol()["motion_classifier"]["why_not"]
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 32, 48\)"):
        metric.compute(as_clips(samples[:, :, :, :32]), None)
