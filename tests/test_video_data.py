"""Video data: clip indices, video folders and manifests read with decord, bad files, moving digits."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from ditx.modalities.video import clips as video_clips
from ditx.modalities.video.clips import num_clip_starts, sample_clip_indices
from ditx.modalities.video.data import VideoFolderDataset
from ditx.modalities.video.io import write_video
from ditx.modalities.video.moving_digits import MOTIONS, MovingDigitsDataset, render_moving_digits, write_moving_digits

from ditx.data import deterministic_choice

pytest.importorskip("decord")
pytest.importorskip("av")

STEP = 12  # frame t of a coded video is grey 10 + STEP * t: its index survives H.264 and resizing


def coded_video(path, num_frames: int, height: int = 16, width: int = 16, ramp: bool = False) -> str:
    """A video whose frame t is a grey 10 + STEP * t (t < 16) on average: uniform, or with ``ramp`` a
    left-to-right ramp of +-6 (so a mirrored frame differs). ``.avi``: MPEG-4 (UCF-101's format); else H.264."""
    frames = (10 + STEP * np.arange(num_frames, dtype=np.float64))[:, None, None, None]
    frames = np.broadcast_to(frames, (num_frames, height, width, 3)).copy()
    if ramp:
        frames += np.linspace(-6, 6, width)[None, None, :, None]
    frames = frames.round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".avi":  # UCF-101's container: MPEG-4 part 2 in AVI, through PyAV
        import av

        with av.open(str(path), "w", format="avi") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"qscale": "1"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    else:
        write_video(frames, path.with_suffix(".mp4"))
        os.replace(path.with_suffix(".mp4"), path)  # the container is found from the contents, not the name
    return str(path)


def frame_indices(x: torch.Tensor) -> list[int]:
    """The coded frame index of each frame of a clip (3, T, S, S) in [-1, 1]."""
    grey = (x + 1) * 127.5
    return [round((float(grey[:, t].mean()) - 10) / STEP) for t in range(x.shape[1])]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def folder(tmp_path, cache, **kwargs) -> VideoFolderDataset:
    kwargs.setdefault("size", 8)
    kwargs.setdefault("num_frames", 4)
    return VideoFolderDataset(str(tmp_path), cache_dir=cache, **kwargs)


# --------------------------------------------------------------------------------------
# Clip indices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["loop", "pad", "skip"])
def test_sample_clip_indices_exhaustively(policy):
    for length in range(1, 14):
        for num_frames in range(1, 6):
            for stride in range(1, 4):
                span = (num_frames - 1) * stride + 1
                n = num_clip_starts(length, num_frames, stride, policy)
                if length >= span:
                    assert n == length - span + 1
                    clips = [sample_clip_indices(length, num_frames, stride, s, policy) for s in range(n)]
                    assert clips == [[s + k * stride for k in range(num_frames)] for s in range(n)]
                    assert clips[-1][-1] == length - 1  # the last start reaches the last frame
                    centre = sample_clip_indices(length, num_frames, stride, "center", policy)
                    assert centre == clips[(n - 1) // 2]
                    assert abs(centre[0] - (length - 1 - centre[-1])) <= 1  # as much room before as after
                elif policy == "skip":
                    assert n == 0
                    with pytest.raises(ValueError, match=f"{length} frames.*short_policy is 'skip'"):
                        sample_clip_indices(length, num_frames, stride, "center", policy)
                else:
                    assert n == 1
                    expected = [k * stride % length if policy == "loop" else min(k * stride, length - 1)
                                for k in range(num_frames)]  # fmt: skip
                    assert sample_clip_indices(length, num_frames, stride, 0, policy) == expected
                    assert sample_clip_indices(length, num_frames, stride, "center", policy) == expected


def test_sample_clip_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"start must be .center. or an integer in \[0, 4\).*got 4"):
        sample_clip_indices(10, 4, 2, 4)
    with pytest.raises(ValueError, match="short_policy must be one of skip, loop, pad, got 'wrap'"):
        sample_clip_indices(10, 4, 1, 0, "wrap")
    with pytest.raises(ValueError, match="num_frames must be a positive integer, got 0"):
        num_clip_starts(10, 0)


# --------------------------------------------------------------------------------------
# Sources: class folders, flat folders, manifests
# --------------------------------------------------------------------------------------


def test_class_folders_in_ucf_layout(tmp_path, cache):
    coded_video(tmp_path / "Biking" / "v_Biking_g01_c01.avi", 6)
    coded_video(tmp_path / "ApplyEyeMakeup" / "b.mp4", 5)
    coded_video(tmp_path / "ApplyEyeMakeup" / "deeper" / "a.mp4", 5)
    coded_video(tmp_path / ".thumbs" / "x.mp4", 5)  # hidden folder: not a class
    coded_video(tmp_path / "Biking" / ".hidden.mp4", 5)  # hidden file: skipped
    (tmp_path / "Biking" / "notes.txt").write_text("not a video")
    ds = folder(tmp_path, cache, split="test")
    assert ds.classes == ["ApplyEyeMakeup", "Biking"] and ds.class_to_idx == {"ApplyEyeMakeup": 0, "Biking": 1}
    assert ds.num_classes == 2 and ds.data_shape == (3, 4, 8, 8)
    files = [os.path.relpath(p, tmp_path) for p, _ in ds.samples]
    assert files == ["ApplyEyeMakeup/b.mp4", "ApplyEyeMakeup/deeper/a.mp4", "Biking/v_Biking_g01_c01.avi"]
    items = [ds[i] for i in range(3)]
    assert [it["y"] for it in items] == [0, 0, 1]
    assert frame_indices(items[2]["x"]) == [1, 2, 3, 4]  # the AVI decodes; the centred 4 of 6 frames
    assert all(it["x"].shape == (3, 4, 8, 8) and it["x"].dtype == torch.float32 for it in items)
    assert ds.stats == {"videos": 3, "unreadable": [], "short": 0, "skipped_short": 0}
    only_avi = folder(tmp_path, cache, extensions=[".AVI"])
    assert [os.path.basename(p) for p, _ in only_avi.samples] == ["v_Biking_g01_c01.avi"]


def test_a_flat_folder_is_unconditional(tmp_path, cache):
    for name in ("b.mp4", "a.mkv", "sub/c.mp4"):
        coded_video(tmp_path / name, 4)
    ds = folder(tmp_path, cache)
    assert len(ds) == 3 and ds.num_classes == 0 and ds.classes == []
    assert [os.path.relpath(p, tmp_path) for p, _ in ds.samples] == ["a.mkv", "b.mp4", "sub/c.mp4"]
    assert set(ds[0]) == {"x"} and ds[0]["x"].shape == (3, 4, 8, 8)


def test_a_folder_without_videos_is_a_clear_error(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no videos with extensions avi, mp4, mkv, webm, mov"):
        VideoFolderDataset(str(tmp_path / "empty"), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing.*set data.root"):
        VideoFolderDataset(str(tmp_path / "missing"), cache_dir=cache)
    with pytest.raises(ValueError, match="short_policy must be one of skip, loop, pad, got 'wrap'"):
        VideoFolderDataset(str(tmp_path / "empty"), short_policy="wrap", cache_dir=cache)
    with pytest.raises(ValueError, match="split must be one of train, test, eval, got 'val'"):
        VideoFolderDataset(str(tmp_path / "empty"), split="val", cache_dir=cache)


def test_a_csv_manifest_with_names_and_captions(tmp_path, cache):
    coded_video(tmp_path / "clips" / "a.mp4", 4)
    coded_video(tmp_path / "clips" / "b.mp4", 5)
    elsewhere = coded_video(tmp_path / "elsewhere" / "c.mp4", 6)
    manifest = tmp_path / "clips" / "train.csv"
    rows = [
        "path,label,caption",
        "a.mp4,walk,a person walks",
        f'{elsewhere},run,"someone runs, fast"',
        "b.mp4,jump,a jump",
    ]
    manifest.write_text("\n".join(rows) + "\n")
    ds = VideoFolderDataset(str(manifest), num_frames=4, size=8, cache_dir=cache, split="test")
    assert ds.classes == ["jump", "run", "walk"] and ds.num_classes == 3
    assert [(os.path.basename(p), y) for p, y in ds.samples] == [("a.mp4", 2), ("c.mp4", 1), ("b.mp4", 0)]
    item = ds[1]
    assert item["y"] == 1 and item["caption"] == "someone runs, fast" and frame_indices(item["x"]) == [1, 2, 3, 4]
    batch = torch.utils.data.default_collate([ds[0], ds[2]])  # captions collate as a list
    assert batch["caption"] == ["a person walks", "a jump"]

    manifest.write_text("path,label,caption\na.mp4,walk,a person walks\nb.mp4,jump,\n")
    with pytest.raises(ValueError, match=r"train.csv.*1 of 2 videos has a caption, 1 has none.*b.mp4"):  # all or none
        VideoFolderDataset(str(manifest), num_frames=4, size=8, cache_dir=cache)


def test_a_jsonl_manifest_with_integer_labels_or_none(tmp_path, cache):
    coded_video(tmp_path / "a.mp4", 4)
    coded_video(tmp_path / "b.mp4", 4)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "label": 3}) + "\n\n" + json.dumps({"path": "b.mp4", "label": 0}))
    ds = VideoFolderDataset(str(manifest), num_frames=4, size=8, cache_dir=cache)
    assert ds.num_classes == 4 and ds.classes == ["0", "1", "2", "3"] and [ds[0]["y"], ds[1]["y"]] == [3, 0]

    manifest.write_text(json.dumps({"path": "a.mp4"}) + "\n" + json.dumps({"path": str(tmp_path / "b.mp4")}))
    ds = VideoFolderDataset(str(manifest), num_frames=4, size=8, cache_dir=cache)
    assert ds.num_classes == 0 and set(ds[1]) == {"x"}


@pytest.mark.parametrize(
    "lines, error",
    [
        (['{"path": "a.mp4", "label": 1}', '{"path": "b.mp4"}'], "line 2 has no label"),
        (['{"path": "a.mp4", "label": 1}', '{"path": "b.mp4", "label": "cat"}'], "line 1: label 1 is not a name"),
        (['{"path": "a.mp4", "label": -1}'], "line 1: label -1 is negative"),
        (['{"label": 1}'], "line 1 has no 'path'"),
        (['{"path": "a.mp4"', "x"], "line 1 is not JSON"),
    ],
)
def test_bad_manifests_name_the_line(tmp_path, cache, lines, error):
    coded_video(tmp_path / "a.mp4", 4)
    coded_video(tmp_path / "b.mp4", 4)
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match="m.jsonl.*" + error):
        VideoFolderDataset(str(tmp_path / "m.jsonl"), cache_dir=cache)


def test_a_csv_without_a_path_column_is_refused(tmp_path, cache):
    (tmp_path / "m.csv").write_text("file,label\na.mp4,1\n")
    with pytest.raises(ValueError, match="m.csv.*'path' column.*'file', 'label'"):
        VideoFolderDataset(str(tmp_path / "m.csv"), cache_dir=cache)


# --------------------------------------------------------------------------------------
# Short, corrupt and odd-sized videos
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, expected", [("loop", [0, 1, 2, 3, 4, 0, 1, 2]), ("pad", [0, 1, 2, 3, 4, 4, 4, 4]), ("skip", None)]
)
def test_short_videos_follow_the_policy(tmp_path, cache, policy, expected, caplog):
    coded_video(tmp_path / "a_long.mp4", 10)
    coded_video(tmp_path / "b_short.mp4", 5)
    with caplog.at_level(logging.INFO, logger="ditx.video"):
        ds = folder(tmp_path, cache, num_frames=8, short_policy=policy)
    assert ds.stats["short"] == 1 and "1 shorter than 8 frames" in caplog.text
    if expected is None:
        assert len(ds) == 1 and ds.stats["skipped_short"] == 1 and ds.samples[0][0].endswith("a_long.mp4")
    else:
        assert len(ds) == 2 and ds.stats["skipped_short"] == 0
        for epoch in range(3):  # a short video has one clip, whatever the epoch
            ds.set_epoch(epoch)
            assert frame_indices(ds[1]["x"]) == expected


def test_when_every_video_is_too_short_to_keep_the_error_says_so(tmp_path, cache):
    coded_video(tmp_path / "a.mp4", 3)
    with pytest.raises(ValueError, match="1 shorter than 7 frames with short_policy 'skip'"):
        folder(tmp_path, cache, num_frames=4, frame_stride=2, short_policy="skip")


def test_unreadable_videos_are_left_out_at_scan_time(tmp_path, cache, caplog):
    coded_video(tmp_path / "a_good.mp4", 4)
    (tmp_path / "b_noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    data = open(coded_video(tmp_path / "c_cut.mp4", 12, 32, 32), "rb").read()
    (tmp_path / "c_cut.mp4").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "d_empty.mp4").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ditx.video"):
        ds = folder(tmp_path, cache)
    bad = [str(tmp_path / n) for n in ("b_noise.mp4", "c_cut.mp4", "d_empty.mp4")]
    assert len(ds) == 1 and ds.stats["unreadable"] == bad and ds.stats["videos"] == 1
    assert all(path in caplog.text for path in bad)


def test_a_video_that_breaks_after_the_scan_raises_an_error_naming_it(tmp_path, cache):
    coded_video(tmp_path / "a.mp4", 4)
    broken = coded_video(tmp_path / "b.mp4", 4)
    ds = folder(tmp_path, cache)
    (tmp_path / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 broken")
    assert ds[0]["x"].shape == (3, 4, 8, 8)
    with pytest.raises(OSError, match=f"cannot read video {broken}: "):
        ds[1]
    with pytest.raises(OSError, match="b.mp4"):
        ds.cache_variants(1)


def banded_video(path, height: int, width: int) -> None:
    """Red side bands around a centre square that is blue above and green below (landscape)."""
    side = min(height, width)
    frame = np.zeros((side, max(height, width), 3), np.uint8)
    band = (frame.shape[1] - side) // 2
    frame[:, :band] = frame[:, band + side :] = (255, 0, 0)
    frame[: side // 2, band : band + side] = (0, 0, 255)
    frame[side // 2 :, band : band + side] = (0, 255, 0)
    if height > width:  # portrait: bands above and below, the centre square's halves left and right
        frame = frame.transpose(1, 0, 2)
    write_video(np.repeat(frame[None], 4, axis=0), path)


@pytest.mark.parametrize("portrait", [False, True])
def test_the_crop_keeps_the_centre_square(tmp_path, cache, portrait):
    banded_video(tmp_path / "v.mp4", *((96, 48) if portrait else (48, 96)))
    for decode_size in (None, 24):  # decord may also scale while decoding
        ds = folder(tmp_path, cache, size=16, num_frames=2, decode_size=decode_size)
        x = (ds[0]["x"][:, 0] + 1) * 127.5  # (3, 16, 16) in [0, 255]
        if portrait:
            x = x.transpose(1, 2)
        assert x[0, 1:15, 3:13].max() < 40  # no red away from the resampling kernels' reach of the edges
        assert x[2, :5, 3:13].min() > 200 and x[1, :5, 3:13].max() < 40
        assert x[1, 11:, 3:13].min() > 200 and x[2, 11:, 3:13].max() < 40


def test_odd_and_awkward_sizes_decode(tmp_path, cache):
    coded_video(tmp_path / "a_odd.mp4", 5, height=33, width=47)  # stored padded to 34x48
    coded_video(tmp_path / "b_portrait.mp4", 5, height=40, width=24)  # a width decord pads rows of
    coded_video(tmp_path / "c_tiny.mp4", 5, height=6, width=8)  # smaller than size: upscaled
    ds = folder(tmp_path, cache, size=12, split="test")
    for i in range(3):
        x = ds[i]["x"]
        assert x.shape == (3, 4, 12, 12) and -1 <= x.min() and x.max() <= 1
        assert frame_indices(x) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="decode_size must be null or an integer >= size .12., got 8"):
        folder(tmp_path, cache, size=12, decode_size=8)


# --------------------------------------------------------------------------------------
# Determinism, workers, caches
# --------------------------------------------------------------------------------------


def test_crops_and_flips_depend_only_on_seed_epoch_and_index(tmp_path, cache):
    for i in range(3):
        coded_video(tmp_path / f"{i}.mp4", 16, ramp=True)
    kwargs = {"num_frames": 4, "frame_stride": 2, "flip": True, "seed": 5}  # span 7: 10 starts
    ds, again = folder(tmp_path, cache, **kwargs), folder(tmp_path, cache, **kwargs)
    starts, flips = set(), set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        for i in range(len(ds)):
            x = ds[i]["x"]
            torch.testing.assert_close(x, again[i]["x"], atol=0, rtol=0)  # another instance (worker, process)
            start = deterministic_choice(5, epoch, i, 10)
            assert frame_indices(x) == [start + 2 * k for k in range(4)]
            plain = ds.load(i, start)
            flipped = torch.equal(x, plain.flip(-1))
            assert flipped == (deterministic_choice(5, epoch, ~i) == 1) and (flipped or torch.equal(x, plain))
            starts.add(start)
            flips.add(flipped)
    assert len(starts) > 3 and flips == {True, False}

    test = folder(tmp_path, cache, split="test", **kwargs)
    test.set_epoch(3)
    assert frame_indices(test.load(0)) == [4, 6, 8, 10]  # centred: starts 0..9, the middle one is 4
    variants = ds.cache_variants(0)  # centred, whatever the split or epoch, plain then mirrored
    torch.testing.assert_close(variants[0]["x"], test.load(0), atol=0, rtol=0)
    torch.testing.assert_close(variants[1]["x"], variants[0]["x"].flip(-1), atol=0, rtol=0)
    assert len(folder(tmp_path, cache, num_frames=4).cache_variants(0)) == 1


def test_dataloader_workers_read_the_same_items(tmp_path, cache):
    for label in ("a", "b"):
        for i in range(2):
            coded_video(tmp_path / label / f"{i}.mp4", 9, 20, 28)
    ds = folder(tmp_path, cache, flip=True, seed=1)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    torch.testing.assert_close(torch.cat([b["x"] for b in batches]), torch.stack([ds[i]["x"] for i in range(4)]))
    assert torch.cat([b["y"] for b in batches]).tolist() == [0, 0, 1, 1]


def test_video_lengths_are_read_once_and_cached(tmp_path, cache, monkeypatch):
    root = tmp_path / "videos"
    coded_video(root / "a.mp4", 6)
    coded_video(root / "b.mp4", 7)
    (root / "c.mp4").write_bytes(b"junk")
    first = VideoFolderDataset(str(root), num_frames=2, size=8, cache_dir=cache)
    assert [first.num_video_frames(i) for i in range(2)] == [6, 7] and len(first.stats["unreadable"]) == 1
    assert len(list((tmp_path / "cache" / "video-index").glob("*.json"))) == 1

    opened = []
    real_probe = video_clips.probe_video
    monkeypatch.setattr(video_clips, "probe_video", lambda path: opened.append(path) or real_probe(path))
    second = VideoFolderDataset(str(root), num_frames=2, size=8, cache_dir=cache)
    assert opened == [] and second.samples == first.samples and second.stats == first.stats

    coded_video(root / "b.mp4", 9)  # a changed file (size, mtime) is read again, the others are not
    os.utime(root / "b.mp4", ns=(1, 1))
    third = VideoFolderDataset(str(root), num_frames=2, size=8, cache_dir=cache)
    assert opened == [str(root / "b.mp4")] and third.num_video_frames(1) == 9


def test_the_index_cache_follows_ditx_cache(tmp_path, monkeypatch):
    coded_video(tmp_path / "v" / "a.mp4", 3)
    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "elsewhere"))
    VideoFolderDataset(str(tmp_path / "v"), num_frames=2, size=8)
    assert len(list((tmp_path / "elsewhere" / "video-index").glob("*.json"))) == 1


def test_cache_key_names_what_the_pixels_depend_on(tmp_path, cache):
    coded_video(tmp_path / "a.mp4", 6)
    key = folder(tmp_path, cache).cache_key()
    assert key["size"] == 8 and key["num_frames"] == 4 and key["num_files"] == 1 and key["temporal_crop"] == "center"
    assert str(tmp_path) in key["root"]
    for change in ({"size": 6}, {"frame_stride": 2}, {"flip": True}, {"short_policy": "pad"}, {"num_frames": 3}):
        assert folder(tmp_path, cache, **change).cache_key() != key


def test_recipe_arguments_are_checked(tiny_recipe, tmp_path):
    from ditx.recipe import RecipeError
    from ditx.registry import datasets

    datasets.register("test-video-folder", VideoFolderDataset, replace=True)
    try:
        recipe = tiny_recipe(data={"name": "test-video-folder", "root": str(tmp_path), "short_policy": "pad",
                                   "decode_size": None, "extensions": ["mp4"]})  # fmt: skip
        assert recipe.data.args["short_policy"] == "pad"
        with pytest.raises(RecipeError, match="data.short_policy"):
            tiny_recipe(data={"name": "test-video-folder", "root": str(tmp_path), "short_policy": "wrap"})
    finally:
        datasets.unregister("test-video-folder")


# --------------------------------------------------------------------------------------
# Moving digits
# --------------------------------------------------------------------------------------


def centroids(frames: np.ndarray) -> np.ndarray:
    """(..., H, W) grey -> (..., 2) intensity centroids (y, x)."""
    h, w = frames.shape[-2:]
    mass = frames.astype(np.float64).sum(axis=(-2, -1))
    y = (frames * np.arange(h)[:, None]).sum(axis=(-2, -1)) / mass
    x = (frames * np.arange(w)[None, :]).sum(axis=(-2, -1)) / mass
    return np.stack([y, x], axis=-1)


def test_rendered_digits_move_are_balanced_and_deterministic():
    clips, labels, motions = render_moving_digits(60, num_frames=8, size=32, digit_size=14, split="train", seed=0)
    assert clips.shape == (60, 8, 32, 32) and clips.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == [6] * 10
    assert set(motions) <= set(MOTIONS) and len(set(motions)) >= 3
    assert (clips.reshape(60, 8, -1).max(axis=-1) > 100).all()  # a digit in every frame
    c = centroids(clips)
    displacement = np.linalg.norm(c[:, -1] - c[:, 0], axis=-1)
    assert displacement.min() > 2 and displacement.mean() >= 4
    for motion, axis in (("horizontal", 0), ("vertical", 1)):  # the other axis stays put
        moving = [i for i, m in enumerate(motions) if m == motion]
        assert np.abs(c[moving, :, axis] - c[moving, :1, axis]).max() < 1

    again = render_moving_digits(60, num_frames=8, size=32, digit_size=14, split="train", seed=0)
    assert np.array_equal(again[0], clips) and np.array_equal(again[1], labels) and again[2] == motions
    assert not np.array_equal(render_moving_digits(60, seed=1)[0], clips)
    assert not np.array_equal(render_moving_digits(60, split="test")[0], clips)


def test_moving_digits_writer_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    root = tmp_path / "md"
    settings = {"num_clips_per_split": {"train": 20, "test": 10}, "num_frames": 6, "size": 32, "seed": 2}
    write_moving_digits(root, **settings)
    clips = sorted(root.glob("*/*/clip_*.mp4"))
    assert len(clips) == 30 and sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert json.loads((root / ".complete").read_text())["num_frames"] == 6
    assert not (root / ".generating").exists()

    from ditx.modalities.video import io as video_io

    calls = []
    original = video_io.write_video
    monkeypatch.setattr(video_io, "write_video", lambda frames, path, fps=8: calls.append(path) or original(
        frames, path, fps))  # fmt: skip
    write_moving_digits(root, **settings)  # finished: nothing is redone
    assert calls == []

    removed = clips[3:6]
    mtime = clips[0].stat().st_mtime_ns
    for path in removed:
        path.unlink()
    (root / ".complete").unlink()  # as if interrupted
    write_moving_digits(root, **settings)
    assert sorted(calls) == removed and all(p.is_file() for p in removed) and (root / ".complete").is_file()
    assert clips[0].stat().st_mtime_ns == mtime  # existing clips are kept

    with pytest.raises(ValueError, match=f"moving-digits folder '{root}'.*num_frames: 6 .asked 8.*delete"):
        write_moving_digits(root, **{**settings, "num_frames": 8})


def test_an_interrupted_generation_with_other_settings_is_refused(tmp_path, monkeypatch):
    from ditx.modalities.video import io as video_io

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "write_video", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_moving_digits(tmp_path, {"train": 10, "test": 10}, num_frames=4)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="size: 32 .asked 48"):
        write_moving_digits(tmp_path, {"train": 10, "test": 10}, num_frames=4, size=48)


def test_moving_digits_dataset_reads_the_rendered_clips_back(tmp_path):
    kwargs = {"root": str(tmp_path / "md"), "num_clips_train": 20, "num_clips_test": 10, "cache_dir": str(tmp_path)}
    train = MovingDigitsDataset(split="train", **kwargs)
    test = MovingDigitsDataset(split="test", **kwargs)
    assert (len(train), len(test)) == (20, 10) and train.num_classes == test.num_classes == 10
    assert train.data_shape == (3, 8, 32, 32) and train.classes == [str(d) for d in range(10)]
    clips, labels, _ = render_moving_digits(10, num_frames=8, size=32, split="test", seed=0)
    for i in range(len(test)):
        index = int(os.path.basename(test.path(i))[5:10])  # clip_00007.mp4 is rendered clip 7
        item = test[i]
        assert item["y"] == labels[index]
        decoded = ((item["x"] + 1) * 127.5).numpy()  # (3, 8, 32, 32)
        assert np.abs(decoded - clips[index][None]).mean() < 2
        assert np.abs(decoded[0] - decoded[2]).max() < 3  # grey stays grey
    assert train.cache_key()["moving_digits"]["num_clips_per_split"] == {"train": 20, "test": 10}
    with pytest.raises(ValueError, match="num_clips_test must be an integer >= 10"):
        MovingDigitsDataset(**{**kwargs, "num_clips_test": 5})


def test_image_frames_append_single_frames_of_other_videos(tmp_path, cache):
    """Latte's joint image-video training: k frames of other videos join each clip."""
    for i in range(4):
        coded_video(tmp_path / f"v{i}.mp4", num_frames=12)
    ds = folder(tmp_path, cache, image_frames=2)
    assert ds.data_shape == (3, 6, 8, 8) and ds.sample_shape == (3, 4, 8, 8)
    item = ds[1]
    assert item["x"].shape == (3, 6, 8, 8) and item["num_images"] == 2
    picks = ds.image_frames_for(1)
    assert frame_indices(item["x"][:, 4:]) == [f for _, f in picks]  # the coded frame of each pick
    assert torch.equal(ds[1]["x"], item["x"])  # fixed by (seed, epoch, index)
    epoch0 = [ds.image_frames_for(i) for i in range(4)]
    ds.set_epoch(1)
    assert [ds.image_frames_for(i) for i in range(4)] != epoch0  # new picks each epoch
    with pytest.raises(ValueError, match="latent caches hold clips only"):
        ds.cache_variants(0)
    with pytest.raises(ValueError, match="image_frames must be an integer >= 0"):
        folder(tmp_path, cache, image_frames=-1)


@pytest.mark.parametrize("shape", [(3, 240, 320), (2, 33, 47), (2, 300, 200)])
def test_uint8_resize_matches_the_float_reference_to_one_grey_level(shape):
    """The fast uint8 resize (+ centre crop) against the same resize done in float32."""
    t, h, w = shape
    frames = np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    got = video_clips.resize_center_crop(frames, 24)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double()
    s = 24 / min(h, w)
    new = (24, max(24, round(w * s))) if h <= w else (max(24, round(h * s)), 24)
    ref = torch.nn.functional.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = (new[0] - 24) // 2, (new[1] - 24) // 2
    ref = ref[:, :, top : top + 24, left : left + 24].permute(1, 0, 2, 3).clamp(0, 255) / 127.5 - 1
    assert got.shape == (3, t, 24, 24) and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 1.0 / 127.5 + 1e-6


def _clip_breaking_mid_stream(path, num_frames: int = 16, size: int = 32) -> str:
    """An H.264 MP4 (index at the front) that will break mid-stream: ``_break_tail`` overwrites
    its last quarter with noise afterwards, so it opens, its length is right, and decoding its
    last frames fails."""
    import av

    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt, stream.options = "yuv420p", {"g": "4"}
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def _break_tail(path: str) -> None:
    """Overwrite the last quarter of ``path`` with noise, keeping its size and mtime: the folder's
    video index (valid while both are unchanged) still holds the probe of the intact file, so
    the clip is met broken mid-stream in training rather than at the scan. (Probing the broken
    file itself was flaky: decord's decoder reads packets ahead while decoding frame 0, and under
    load it sometimes reached the noise, so the scan left the clip out.)"""
    before = os.stat(path)
    data = bytearray(open(path, "rb").read())
    start = 3 * len(data) // 4
    data[start:] = np.random.default_rng(2).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns


def test_a_clip_breaking_mid_stream_is_skipped_counted_named_and_counted_across_resume(
    tiny_recipe, tmp_path, monkeypatch, caplog
):
    import decord

    from ditx import checkpoint as ckpt
    from ditx.train import DataBudgetError, train

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    for i in range(8):
        coded_video(tmp_path / "clips" / f"good_{i}.mp4", 16)
    bad = _clip_breaking_mid_stream(tmp_path / "clips" / "bad.mp4")

    def recipe(steps):  # 9 clips, global batch 3: the broken clip comes once an epoch (3 steps)
        return tiny_recipe(
            modality="video",
            data={"name": "video-folder", "root": str(tmp_path / "clips"), "num_frames": 16, "size": 16},
            tokenizer={"name": "tubelet", "patch_size": [4, 4, 4]},
            train={"steps": steps, "batch_size": 3, "checkpoint_every": 3, "max_bad_samples": 1},
            sample={"num_steps": 2, "num_samples": 1, "batch_size": 1},
        )

    from ditx.build import build_dataset

    assert len(build_dataset(recipe(3))) == 9  # the scan indexes all 9 intact clips ...
    _break_tail(bad)  # ... then one breaks
    reader = decord.VideoReader(bad, num_threads=1)
    assert len(reader) == 16  # it opens with its length ...
    with pytest.raises(Exception):  # noqa: B017  (decord's own error type)
        reader.get_batch([13, 14, 15])  # ... and breaks later
    del reader

    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="ditx"):
        train(recipe(3), run_dir=run)  # one epoch: one broken clip, within the budget of 1
    assert f"cannot read video {bad}" in caplog.text
    state = json.loads((ckpt.list_checkpoints(run / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["bad_samples"] == 1
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    # the resumed run meets it again in the next epoch: 2 in all, over the budget
    with pytest.raises(DataBudgetError, match=r"2 unreadable samples exceed train.max_bad_samples=1"):
        train(recipe(6), run_dir=run, resume=True)
