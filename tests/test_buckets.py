"""Buckets: data of many sizes trained one size per optimizer step. Parsing, assignment to a
bucket, the batch sampler, the aspect-keeping crop, a video folder of several shapes, its
latent cache, and training on it across processes and through a SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_modality_jobs import tiny
from test_train import _accelerate, _ditx, _kill_at, _logged_steps, assert_same_weights, final_weights

from ditx.data import Bucket, BucketBatchSampler, BucketSubset, assign_buckets, parse_buckets
from ditx.metrics import Metric

VIDEO_AXES = ("frames", "height", "width")

# --------------------------------------------------------------------------------------
# parse_buckets
# --------------------------------------------------------------------------------------


def test_parse_buckets_reads_sizes_batch_sizes_and_probabilities():
    spec = [{"size": [8, 32, 48], "batch_size": 4, "probability": 0.5}, {"size": [8, 48, 32]}]
    buckets = parse_buckets(spec, VIDEO_AXES)
    assert [b.name for b in buckets] == ["8x32x48", "8x48x32"]
    assert [b.size for b in buckets] == [(8, 32, 48), (8, 48, 32)]
    assert [b.batch_size for b in buckets] == [4, None]  # None: train.batch_size
    assert [b.probability for b in buckets] == [0.5, 1.0]
    assert buckets[0].aspect == pytest.approx(np.log(1.5)) and buckets[1].aspect == pytest.approx(-np.log(1.5))
    assert parse_buckets(buckets, VIDEO_AXES) == buckets  # parsed buckets pass through unchanged
    assert parse_buckets([{"size": [16, 24], "probability": 1}], ("height", "width")) == [Bucket([16, 24])]


OK = {"size": [8, 32, 48]}
BAD_BUCKETS = {
    "not a list": ({"size": [8, 32, 48]}, r"data.buckets must be a non-empty list.*got \{'size'"),
    "empty": ([], r"data.buckets must be a non-empty list.*got \[\]"),
    "a string": ("8x32x48", r"data.buckets must be a non-empty list.*got '8x32x48'"),
    "no size": ([OK, {"batch_size": 4}],
                r"data.buckets\[1\] must be a mapping with a 'size' of \[frames, height, width\]"),
    "not a mapping": ([[8, 32, 48]], r"data.buckets\[0\] must be a mapping"),
    "wrong length": ([OK, {"size": [32, 48]}], r"data.buckets\[1\] size must be 3 positive integers.*got \[32, 48\]"),
    "zero": ([{"size": [8, 0, 48]}], r"data.buckets\[0\] size must be 3 positive integers.*got \[8, 0, 48\]"),
    "negative": ([OK, {"size": [8, 48, 32]}, {"size": [8, -32, 48]}], r"data.buckets\[2\] size must be 3 positive"),
    "float size": ([{"size": [8, 32.0, 48]}], r"data.buckets\[0\] size must be 3 positive integers"),
    "bool size": ([{"size": [True, 32, 48]}], r"data.buckets\[0\] size must be 3 positive integers"),
    "zero batch": ([OK, {"size": [8, 48, 32], "batch_size": 0}], r"data.buckets\[1\] batch_size must be a positive"),
    "float batch": ([{"size": [8, 48, 32], "batch_size": 2.5}], r"data.buckets\[0\] batch_size must be a positive"),
    "bool batch": ([{"size": [8, 48, 32], "batch_size": True}], r"data.buckets\[0\] batch_size must be a positive"),
    "probability 0": ([OK, {"size": [8, 48, 32], "probability": 0}],
                      r"data.buckets\[1\] probability must be in \(0, 1\], got 0"),
    "probability > 1": ([{"size": [8, 48, 32], "probability": 1.5}], r"data.buckets\[0\] probability .*got 1.5"),
    "negative probability": ([{"size": [8, 48, 32], "probability": -0.1}], r"data.buckets\[0\] probability must"),
    "string probability": ([{"size": [8, 48, 32], "probability": "0.5"}], r"data.buckets\[0\] probability must"),
    "unknown key": ([OK, {"size": [8, 48, 32], "batchsize": 4}], r"data.buckets\[1\] has unknown keys \['batchsize'\]"),
    "repeated size": ([OK, {"size": [8, 48, 32]}, {"size": [8, 32, 48], "batch_size": 2}],
                      r"data.buckets\[2\] repeats the size \[8, 32, 48\]"),
}  # fmt: skip


@pytest.mark.parametrize("spec, message", list(BAD_BUCKETS.values()), ids=list(BAD_BUCKETS))
def test_parse_buckets_errors_name_the_entry(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_buckets(spec, VIDEO_AXES)


# --------------------------------------------------------------------------------------
# assign_buckets
# --------------------------------------------------------------------------------------


def _image_buckets(*entries) -> list[Bucket]:
    return parse_buckets([e if isinstance(e, dict) else {"size": list(e)} for e in entries], ("height", "width"))


def test_assign_buckets_takes_the_nearest_aspect_ratio_in_log_space():
    buckets = _image_buckets((16, 16), (16, 32), (32, 16), (12, 16))
    # (height, width) -> bucket, worked out by hand from |log(w/h) - log(bucket w/h)|
    natives = {(100, 100): 0, (90, 160): 1, (300, 400): 3, (500, 200): 2, (64, 250): 1, (100, 115): 0, (100, 120): 3}
    assert assign_buckets(list(natives), buckets, seed=0).tolist() == list(natives.values())
    # 1.45 is nearer 1 than 2 on a line, nearer 2 in log space (the midpoint is sqrt 2 = 1.414)
    square_or_wide = _image_buckets((16, 16), (16, 32))
    assert assign_buckets([(100, 145), (100, 140)], square_or_wide, seed=0).tolist() == [1, 0]


def test_assign_buckets_only_takes_buckets_a_video_is_long_enough_for():
    buckets = parse_buckets([{"size": [12, 16, 24]}, {"size": [8, 16, 24]}, {"size": [8, 24, 16]}], VIDEO_AXES)
    fits = lambda n, t: n >= t  # noqa: E731
    natives = [(10, 32, 48), (12, 32, 48), (30, 32, 48), (10, 48, 32), (9, 100, 60)]
    assert assign_buckets(natives, buckets, 0, fits).tolist() == [1, 0, 0, 2, 2]
    assert assign_buckets(natives, buckets, 0).tolist() == [0, 0, 0, 2, 2]  # no length rule: the longest
    # too short for every bucket: the shortest ones, and among those the nearest aspect ratio
    assert assign_buckets([(4, 32, 48), (4, 48, 32)], buckets, 0, fits).tolist() == [1, 2]


def test_assign_buckets_tries_longest_then_largest_first_and_keeps_with_the_probability():
    spec = [{"size": [8, 16, 24]}, {"size": [12, 16, 24], "probability": 0.3}, {"size": [8, 32, 48]}]
    buckets = parse_buckets(spec, VIDEO_AXES)
    natives = [(16, 64, 96)] * 2000  # every bucket has the same aspect ratio and fits
    fits = lambda n, t: n >= t  # noqa: E731
    out = assign_buckets(natives, buckets, 7, fits)
    counts = np.bincount(out, minlength=3)
    assert 0.25 < counts[1] / 2000 < 0.35  # the longest first, kept with probability 0.3
    assert counts[2] == 2000 - counts[1] and counts[0] == 0  # the others fall to the largest of the rest
    assert np.array_equal(assign_buckets(natives, buckets, 7, fits), out)  # fixed by the seed
    other = assign_buckets(natives, buckets, 8, fits)
    assert not np.array_equal(other, out) and 0.25 < np.mean(other == 1) < 0.35
    assert np.array_equal(assign_buckets(natives[:100], buckets, 7, fits), out[:100])  # a draw per item
    always = parse_buckets([{**s, "probability": 1.0} for s in spec], VIDEO_AXES)
    assert set(assign_buckets(natives[:50], always, 7, fits).tolist()) == {1}


def test_assign_buckets_leaves_out_an_item_every_draw_refuses():
    buckets = _image_buckets({"size": [16, 24], "probability": 0.5}, {"size": [32, 48], "probability": 0.4},
                             (24, 16))  # fmt: skip
    out = assign_buckets([(64, 96)] * 2000, buckets, seed=3)
    # the larger landscape bucket first (0.4), then the smaller (0.6 x 0.5), never the portrait one
    assert set(out.tolist()) == {-1, 0, 1}
    assert 0.35 < np.mean(out == 1) < 0.45 and 0.25 < np.mean(out == 0) < 0.35 and 0.25 < np.mean(out == -1) < 0.35
    rare = _image_buckets({"size": [16, 24], "probability": 1e-6})
    assert assign_buckets([(64, 96)] * 20, rare, seed=0).tolist() == [-1] * 20


# --------------------------------------------------------------------------------------
# BucketBatchSampler
# --------------------------------------------------------------------------------------

ITEM_BUCKETS = np.random.default_rng(0).choice([-1, 0, 1, 2], size=70, p=[0.1, 0.4, 0.3, 0.2]).tolist()
BATCH_SIZES = [4, 8, 4]


def _sampler(**kwargs) -> BucketBatchSampler:
    args = dict(item_buckets=ITEM_BUCKETS, batch_sizes=BATCH_SIZES, grad_accum=1, rank=0, world=1, seed=5, epoch=0)
    return BucketBatchSampler(**{**args, **kwargs})


@pytest.mark.parametrize("grad_accum, world", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_bucket_sampler_batches_are_of_one_bucket_and_each_item_comes_at_most_once(grad_accum, world):
    counts = [ITEM_BUCKETS.count(b) for b in range(3)]
    steps = sum(c // s for c, s in zip(counts, BATCH_SIZES))
    seen = []
    for rank in range(world):
        sampler = _sampler(grad_accum=grad_accum, rank=rank, world=world)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.batches_per_epoch() == steps * grad_accum
        for k, batch in enumerate(batches):
            buckets = {ITEM_BUCKETS[i] for i in batch}
            assert len(buckets) == 1, f"micro-batch {k} mixes buckets {buckets}"
            (bucket,) = buckets
            assert bucket >= 0 and len(batch) == BATCH_SIZES[bucket] // (grad_accum * world)
            assert sampler.bucket_of(k) == bucket
        seen += [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))  # over the epoch and every process, each item at most once
    per_bucket = np.bincount([ITEM_BUCKETS[i] for i in seen], minlength=3).tolist()
    assert per_bucket == [c // s * s for c, s in zip(counts, BATCH_SIZES)]  # only incomplete batches dropped


@pytest.mark.parametrize("grad_accum, world", [(2, 1), (1, 2), (2, 2)])
def test_processes_and_accumulation_cut_the_same_global_batches(grad_accum, world):
    whole = list(_sampler())  # one process, no accumulation: the global batch of each optimizer step
    ranks = [list(_sampler(grad_accum=grad_accum, rank=r, world=world)) for r in range(world)]
    for step, batch in enumerate(whole):
        micro = [ranks[r][step * grad_accum + j] for j in range(grad_accum) for r in range(world)]
        assert [i for part in micro for i in part] == batch
    one_process = list(_sampler(grad_accum=grad_accum))
    two = [list(_sampler(grad_accum=grad_accum, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one_process  # world 2's slices make world 1's micro-batches


def test_bucket_sampler_start_skips_exactly_the_micro_batches_trained():
    full = list(_sampler(grad_accum=2, world=2, rank=1, epoch=2))
    for start in (1, 5, len(full) - 1, len(full)):
        rest = _sampler(grad_accum=2, world=2, rank=1, epoch=2, start=start)
        assert list(rest) == full[start:] and len(rest) == len(full) - start
        assert [rest.bucket_of(k) for k in range(start, len(full))] == [ITEM_BUCKETS[b[0]] for b in full[start:]]


def test_bucket_sampler_order_is_fixed_by_seed_and_epoch():
    a = list(_sampler(epoch=3))
    assert a == list(_sampler(epoch=3))
    assert a != list(_sampler(epoch=4)) and a != list(_sampler(seed=6, epoch=3))
    steps_a = sorted(ITEM_BUCKETS[b[0]] for b in a)  # another epoch: another order, the same steps per bucket
    assert steps_a == sorted(ITEM_BUCKETS[b[0]] for b in _sampler(epoch=4))
    assert sorted(i for b in a for i in b) != sorted(i for b in _sampler(epoch=4) for i in b)  # other items dropped


def test_bucket_sampler_refuses_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match=r"bucket 1's batch_size 6 must be divisible by grad_accum \(2\) x processes "
                                         r"\(2\); it is the global batch per optimizer step"):  # fmt: skip
        _sampler(batch_sizes=[4, 6, 4], grad_accum=2, world=2)


# --------------------------------------------------------------------------------------
# resize_cover_crop
# --------------------------------------------------------------------------------------


def _frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3): smooth gradients plus noise, so a shifted crop or a wrong scale shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([200 * yy, 200 * xx, 100 * (yy + xx)], axis=-1)[None] + 20 * np.arange(t)[:, None, None, None] / t
    return np.clip(base + rng.normal(0, 10, (t, h, w, 3)), 0, 255).astype(np.uint8)


# (source h, w) -> (target height, width), and the size it is scaled to before the centre crop,
# worked out by hand: the smallest scale that covers the target, the other side rounded
COVER_CASES = [
    ((30, 40), (24, 12), (24, 32)),  # landscape -> portrait: height decides (x0.8)
    ((40, 30), (12, 24), (32, 24)),  # portrait -> landscape: width decides (x0.8)
    ((30, 40), (16, 16), (16, 21)),  # a square: 40 x 16/30 = 21.33
    ((48, 64), (12, 16), (12, 16)),  # the same aspect ratio: no crop
    ((10, 12), (16, 24), (20, 24)),  # upscaled (x2)
    ((16, 30), (16, 24), (16, 30)),  # already covering: not resampled, only cropped
]


@pytest.mark.parametrize("source, target, scaled", COVER_CASES)
def test_resize_cover_crop_matches_a_float_reference(source, target, scaled):
    from ditx.modalities.video.clips import resize_cover_crop

    frames = _frames(3, *source)
    out = resize_cover_crop(frames, *target)
    assert out.shape == (3, 3, *target) and out.dtype == torch.float32
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if scaled != source:
        x = F.interpolate(x, size=scaled, mode="bilinear", antialias=True, align_corners=False)
    top, left = (scaled[0] - target[0]) // 2, (scaled[1] - target[1]) // 2
    expected = x[:, :, top : top + target[0], left : left + target[1]].permute(1, 0, 2, 3) / 127.5 - 1
    if scaled == source:
        assert torch.equal(out, expected)
    else:  # resized in uint8: within one grey level of the float resize
        assert (out - expected).abs().max() <= 1 / 127.5 + 1e-6
    assert out.min() >= -1 and out.max() <= 1


def _pre_bucket_center_crop(frames: np.ndarray, size: int) -> torch.Tensor:
    """resize_center_crop as it was before buckets (short side to ``size``, centre square)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new = (size, max(size, round(w * scale))) if h <= w else (max(size, round(h * scale)), size)
        x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
        h, w = new
    top, left = (h - size) // 2, (w - size) // 2
    return (x[:, :, top : top + size, left : left + size].permute(1, 0, 2, 3).float() / 127.5 - 1.0).contiguous()


@pytest.mark.parametrize("source, size", [((30, 40), 16), ((40, 30), 16), ((17, 17), 16), ((16, 24), 16), ((9, 13), 9)])
def test_resize_center_crop_is_the_square_cover_crop_bit_for_bit(source, size):
    from ditx.modalities.video.clips import resize_center_crop, resize_cover_crop

    frames = _frames(2, *source, seed=1)
    square = resize_center_crop(frames, size)
    assert torch.equal(square, resize_cover_crop(frames, size, size))
    assert torch.equal(square, _pre_bucket_center_crop(frames, size))


# --------------------------------------------------------------------------------------
# A video folder of three shapes
# --------------------------------------------------------------------------------------

SHAPES = {"landscape": (12, 32, 48), "portrait": (8, 48, 32), "square": (8, 32, 32)}  # frames, height, width
FOLDER_BUCKETS = [{"size": [12, 16, 24]}, {"size": [8, 16, 24]}, {"size": [8, 24, 16]}, {"size": [8, 16, 16]}]
# the longest landscape bucket takes the 12-frame landscape videos; the 8-frame one gets none
FOLDER_EXPECTED = {"landscape": 0, "portrait": 2, "square": 3}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """18 real MP4s in two class folders: 6 each of landscape (12 frames), portrait and square (8 frames)."""
    pytest.importorskip("decord")
    pytest.importorskip("av")
    from ditx.modalities.video.io import write_video

    root = tmp_path_factory.mktemp("clips")
    for n, (shape, (t, h, w)) in enumerate(SHAPES.items()):
        for k in range(6):
            folder = root / f"class{k % 2}"
            folder.mkdir(exist_ok=True)
            write_video(_frames(t, h, w, seed=10 * n + k), folder / f"{shape}_{k}.mp4")
    return root


def _shape_of(path: str) -> str:
    return Path(path).name.split("_")[0]


def _folder(clips, tmp_path, **kwargs):
    from ditx.modalities.video.data import VideoFolderDataset

    kwargs.setdefault("buckets", FOLDER_BUCKETS)
    return VideoFolderDataset(str(clips), cache_dir=str(tmp_path / "cache"), **kwargs)


def test_video_folder_gives_each_video_its_bucket_and_clips_of_that_shape(clips, tmp_path):
    ds = _folder(clips, tmp_path)
    assert len(ds) == 18 and ds.num_classes == 2
    assert [int(b) for b in ds.item_buckets] == [FOLDER_EXPECTED[_shape_of(ds.path(i))] for i in range(18)]
    assert ds.stats["buckets"] == {"12x16x24": 6, "8x16x24": 0, "8x24x16": 6, "8x16x16": 6}
    assert ds.stats["left_out_by_bucket_probability"] == 0
    assert ds.data_shape == (3, 12, 16, 24)  # the first bucket's
    for i in range(len(ds)):
        item = ds[i]
        assert item["x"].shape == (3, *ds.buckets[ds.item_buckets[i]].size), ds.path(i)
        assert item["y"] == int(Path(ds.path(i)).parent.name[-1])  # class0, class1
    subset = BucketSubset(ds, 2)  # one shape: what a per-bucket metric reference reads
    assert len(subset) == 6 and subset.data_shape == (3, 8, 24, 16)
    assert all(_shape_of(ds.path(i)) == "portrait" for i in subset.indices)
    assert torch.equal(subset[0]["x"], ds[int(subset.indices[0])]["x"])


def test_video_folder_bucket_probability_leaves_videos_out(clips, tmp_path):
    spec = [{"size": [12, 16, 24], "probability": 0.5}, {"size": [8, 24, 16]}, {"size": [8, 16, 16]}]
    ds = _folder(clips, tmp_path, buckets=spec, seed=4)
    every = _folder(clips, tmp_path, buckets=None, num_frames=8, size=16)
    paths = [every.path(i) for i in range(len(every))]
    expected = assign_buckets([SHAPES[_shape_of(p)] for p in paths], parse_buckets(spec, VIDEO_AXES), 4,
                              lambda n, t: n >= t)  # fmt: skip
    left_out = int((expected < 0).sum())
    assert 0 < left_out < 6  # 6 landscape videos, each kept with probability 0.5 (fixed by seed 4)
    assert len(ds) == 18 - left_out and ds.stats["left_out_by_bucket_probability"] == left_out
    assert [ds.path(i) for i in range(len(ds))] == [p for p, b in zip(paths, expected) if b >= 0]
    assert all(_shape_of(p) == "landscape" for p, b in zip(paths, expected) if b < 0)
    assert ds.stats["buckets"] == {"12x16x24": 6 - left_out, "8x24x16": 6, "8x16x16": 6}


def test_video_folder_cache_key_follows_the_buckets(clips, tmp_path):
    key = _folder(clips, tmp_path).cache_key()
    assert _folder(clips, tmp_path).cache_key() == key
    assert "bucket" not in json.dumps(_folder(clips, tmp_path, buckets=None, num_frames=8, size=16).cache_key())
    resized = [*FOLDER_BUCKETS[:3], {"size": [8, 24, 24]}]
    assert _folder(clips, tmp_path, buckets=resized).cache_key() != key
    batched = [*FOLDER_BUCKETS[:3], {"size": [8, 16, 16], "batch_size": 2}]
    assert _folder(clips, tmp_path, buckets=batched).cache_key() != key
    with pytest.raises(ValueError, match=r"buckets and image_frames=2 do not go together.*data.image_frames=0"):
        _folder(clips, tmp_path, image_frames=2)


# --------------------------------------------------------------------------------------
# Latent cache per bucket
# --------------------------------------------------------------------------------------

CACHE_BUCKETS = [{"size": [4, 16, 24]}, {"size": [4, 24, 16]}, {"size": [4, 16, 16]}]


def _bucket_recipe(clips, tmp_path, buckets, train=None, **sections):
    """A tiny class-conditional video recipe on the clips folder, pixel space unless sections say otherwise."""
    data = {"name": "video-folder", "root": str(clips), "cache_dir": str(tmp_path / "index"), "buckets": buckets}
    train = {"steps": 8, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 4, "log_every": 1, "mixed_precision": "no",
             "output_dir": str(tmp_path / "runs"), "seed": 1, **(train or {})}  # fmt: skip
    model = {"depth": 2, "hidden_size": 32, "num_heads": 2, "layout": "spatial-temporal"}
    sample = {"scheduler": "flow-euler", "num_steps": 2, "num_samples": 2, "batch_size": 2,
              **sections.pop("sample", {})}  # fmt: skip
    tokenizer = sections.pop("tokenizer", {"name": "tubelet", "patch_size": [2, 4, 4]})
    return tiny(tmp_path, "video", data, tokenizer, model=model, train=train, sample=sample, **sections)


def test_latent_cache_holds_each_bucket_apart_and_equals_encoding_each_item(clips, tmp_path, monkeypatch):
    from ditx.modalities.video import data as video_data

    from ditx.build import build_components
    from ditx.cache import CachedLatents, StaleCacheError, cache_latents, maybe_cached_dataset
    from ditx.files import OutputExistsError
    from ditx.train import train

    # the smallest VAE of the image tests (test_cache), per frame: 2x down, 4 latent channels
    kl = dict(latent_channels=4, block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4)  # fmt: skip
    latent_space = {"autoencoder": {"name": "framewise-vae", "config": kl},
                    "tokenizer": {"name": "tubelet", "patch_size": [1, 2, 2]}}  # fmt: skip
    train_cfg = {"steps": 3, "checkpoint_every": 3, "latent_cache": str(tmp_path / "latents")}
    recipe = _bucket_recipe(clips, tmp_path, CACHE_BUCKETS, train=train_cfg, **latent_space)
    out = cache_latents(recipe, shard_size=4, batch_size=3)
    index = json.loads((out / "index.json").read_text())
    assert [(s["bucket"], s["count"]) for s in index["shards"]] == [(0, 4), (0, 2), (1, 4), (1, 2), (2, 4), (2, 2)]
    torch.manual_seed(recipe.train.seed)  # the autoencoder's weights, as caching and training build them
    parts = build_components(recipe)
    dataset = parts.dataset
    cached = maybe_cached_dataset(recipe, parts)
    assert isinstance(cached, CachedLatents) and len(cached) == len(dataset) == 18
    assert list(cached.item_buckets) == [int(b) for b in dataset.item_buckets]
    latent = {0: (4, 4, 8, 12), 1: (4, 4, 12, 8), 2: (4, 4, 8, 8)}  # (C, T, H/2, W/2) of each bucket
    for i in range(len(dataset)):
        bucket = int(dataset.item_buckets[i])
        x = dataset.cache_variants(i)[0]["x"]  # the centred clip, at the bucket's size
        with torch.no_grad():
            z = parts.autoencoder.encode(x[None])[0]
        item = cached[i]
        assert item["x"].shape == latent[bucket], (i, bucket)
        torch.testing.assert_close(item["x"], z, atol=1e-5, rtol=1e-4, msg=f"item {i}")
        assert item["y"] == dataset[i]["y"]

    # a cache for other buckets is refused, not read
    other_buckets = [*CACHE_BUCKETS[:2], {"size": [4, 24, 24]}]
    other = _bucket_recipe(clips, tmp_path, other_buckets, train={"latent_cache": str(out)}, **latent_space)
    torch.manual_seed(recipe.train.seed)  # the same autoencoder: only the buckets differ
    with pytest.raises(StaleCacheError, match=r"differs in: bucket_latent_shapes, data, dataset;"):
        maybe_cached_dataset(other, build_components(other))
    with pytest.raises(OutputExistsError, match=r"a latent cache for other settings"):
        cache_latents(other)

    # training reads each step's bucket from the cache and never decodes a video
    def no_decoding(*args, **kwargs):
        raise AssertionError("a training step decoded video")

    monkeypatch.setattr(video_data, "read_frames", no_decoding)
    run = train(recipe, run_dir=tmp_path / "run")
    assert json.loads((run / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())["step"] == 3


# --------------------------------------------------------------------------------------
# Training on buckets
# --------------------------------------------------------------------------------------

# 6 landscape videos in a bucket of global batch 4 (1 step an epoch), 6 portrait in batches of 2
# (3 steps), 6 square in batches of train.batch_size 4 (1 step): 5 optimizer steps an epoch
TRAIN_BUCKETS = [{"size": [8, 16, 24], "batch_size": 4}, {"size": [4, 24, 16], "batch_size": 2}, {"size": [4, 16, 16]}]


def test_each_training_step_is_one_bucket_at_its_batch_size(clips, tmp_path, monkeypatch):
    from ditx.modalities.video.data import VideoFolderDataset

    from ditx.train import Trainer, train

    fetched, steps = [], []
    get, step = VideoFolderDataset.__getitem__, Trainer.train_step

    def recording_get(self, index):
        fetched.append(index)
        return get(self, index)

    def recording_step(self, batch):
        steps.append((list(fetched), tuple(batch["x"].shape), batch["y"].tolist(), self.dataset))
        fetched.clear()
        return step(self, batch)

    monkeypatch.setattr(VideoFolderDataset, "__getitem__", recording_get)
    monkeypatch.setattr(Trainer, "train_step", recording_step)
    train(_bucket_recipe(clips, tmp_path, TRAIN_BUCKETS, train={"steps": 5, "checkpoint_every": 5}),
          run_dir=tmp_path / "run")  # fmt: skip
    assert len(steps) == 5
    dataset = steps[0][3]
    trained = []
    for items, shape, labels, _ in steps:
        (bucket,) = {int(dataset.item_buckets[i]) for i in items}  # one bucket per step
        size = TRAIN_BUCKETS[bucket]["size"]
        assert shape == (TRAIN_BUCKETS[bucket].get("batch_size", 4), 3, *size) and len(items) == shape[0]
        assert labels == [int(dataset[i]["y"]) for i in items]
        assert {SHAPES[_shape_of(dataset.path(i))][1:] for i in items} == {
            {0: (32, 48), 1: (48, 32), 2: (32, 32)}[bucket]}  # fmt: skip
        trained += items
    assert len(trained) == len(set(trained))  # one epoch: every item at most once
    assert sorted(int(dataset.item_buckets[i]) for i in trained) == [0] * 4 + [1] * 6 + [2] * 4


class _WhatWasJudged(Metric):
    """A metric that scores what it was given: its reference's size and the samples' frames."""

    name = "test-what-was-judged"
    judged: list = []

    def prepare(self, reference, device="cpu"):
        self.reference = reference

    def compute(self, samples, labels=None, captions=None):
        shapes = {tuple(self.reference[i]["x"].shape) for i in range(len(self.reference))}
        self.judged.append((tuple(samples.shape), shapes, tuple(self.reference.data_shape)))
        return {"items": float(len(self.reference)), "frames": float(samples.shape[2])}

    def protocol(self):
        return {"metric": self.name}


def test_eval_scores_each_bucket_apart(clips, tmp_path):
    from ditx.evaluate import evaluate_run
    from ditx.registry import metrics
    from ditx.train import train

    judge = _WhatWasJudged
    judge.judged = []
    metrics.register(judge.name, judge, replace=True)
    try:
        recipe = _bucket_recipe(clips, tmp_path, TRAIN_BUCKETS, train={"steps": 1, "checkpoint_every": 1},
                                eval={"metrics": [judge.name], "num_samples": 2, "batch_size": 2})  # fmt: skip
        results = evaluate_run(train(recipe, run_dir=tmp_path / "run"))
    finally:
        metrics.unregister(judge.name)
    assert results == {"items@8x16x24": 6.0, "frames@8x16x24": 8.0, "items@4x24x16": 6.0, "frames@4x24x16": 4.0,
                       "items@4x16x16": 6.0, "frames@4x16x16": 4.0}  # fmt: skip
    for (samples, reference, data_shape), bucket in zip(judge.judged, TRAIN_BUCKETS):
        size = tuple(bucket["size"])
        assert samples == (2, 3, *size) and reference == {(3, *size)} and data_shape == (3, *size)
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["bucket"] for e in doc["protocol"]["evaluated"]] == ["8x16x24", "4x24x16", "4x16x16"]



class _WhatWasGiven(_WhatWasJudged):
    """Keeps the samples and labels it was asked to score."""

    name = "test-what-was-given"

    def compute(self, samples, labels=None, captions=None):
        self.judged.append((self.reference, samples.clone(), None if labels is None else labels.clone()))
        return {"items": float(len(self.reference))}


@pytest.mark.parametrize("levels", [0, 2], ids=["null-class", "class-read"])
def test_eval_first_frame_samples_keep_a_test_clips_first_frame_and_are_scored_with_its_label(
        clips, tmp_path, monkeypatch, levels):  # fmt: skip
    """Per bucket, the plain, first-frame and labeled first-frame kinds. ``sample.frame_class_levels``
    (class-read): the first-frame samples are asked for the null class, generate reads their class
    from the frame, and they are sampled with class guidance; eval reports how often the class read
    is the clip's own."""
    from ditx import evaluate as evaluate_module
    from ditx.evaluate import evaluate_run
    from ditx.registry import metrics
    from ditx.train import train

    asked, generate = [], evaluate_module.generate

    def recording_generate(*args, **kwargs):
        config = kwargs["config"]
        samples, generated_for = generate(*args, **kwargs)
        asked.append((kwargs.get("labels"), config.guidance_scale, kwargs.get("frames") is not None,
                      config.frame_guidance_scale, generated_for))  # fmt: skip
        return samples, generated_for

    monkeypatch.setattr(evaluate_module, "generate", recording_generate)
    judge = _WhatWasGiven
    judge.judged = []
    metrics.register(judge.name, judge, replace=True)
    buckets = TRAIN_BUCKETS[:2]
    try:
        recipe = _bucket_recipe(clips, tmp_path, buckets, train={"steps": 1, "checkpoint_every": 1},
                                eval={"metrics": [judge.name], "num_samples": 3, "batch_size": 3, "first_frame": True,
                                      "first_frame_labeled": True},
                                sample={"scheduler": "flow-euler", "num_steps": 2, "guidance_scale": 4.0,
                                        "frame_guidance_scale": 3.0, "frame_class_levels": levels},
                                tokenizer={"name": "tubelet", "patch_size": [1, 4, 4]})  # a frame alone can be given
        results = evaluate_run(train(recipe, run_dir=tmp_path / "run"))
    finally:
        metrics.unregister(judge.name)
    kinds = ("", "first_frame", "first_frame_labeled")
    read = {f"first_frame/inferred_class_accuracy@{b}" for b in ("8x16x24", "4x24x16")} if levels else set()
    assert set(results) == {f"{k}{'/' if k else ''}items@{b}" for k in kinds for b in ("8x16x24", "4x24x16")} | read
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = doc["protocol"]["evaluated"]
    assert [(e["bucket"], e["conditioning"]) for e in evaluated] == [
        (b, k or None) for b in ("8x16x24", "4x24x16") for k in kinds]  # fmt: skip
    # plain samples: the classes, guided (2 evaluations a step); first-frame ones: the null class, class
    # guidance off, guided towards the frames instead (2); labeled first-frame ones: the clips' own
    # classes, guided by both (3: with class and frames, null class with frames, neither)
    null = {2}  # the clips folder has 2 classes, the null class is the next index
    assert doc["protocol"]["frame_guidance_scale"] == 3.0
    assert doc["protocol"]["frame_class_levels"] == levels
    for (labels, guidance, framed, frame_guidance, generated_for), e, (reference, _, scored) in zip(
            asked, evaluated, judge.judged):  # fmt: skip
        assert frame_guidance == 3.0
        if e["conditioning"] is None:
            assert (guidance, framed) == (4.0, False) and labels is None  # generate draws the classes itself
            assert e["network_evaluations"] == 4
        elif e["conditioning"] == "first_frame" and not levels:
            assert (guidance, framed) == (1.0, True) and set(labels.tolist()) == null
            assert e["network_evaluations"] == 4 and "class_evaluations" not in e
        elif e["conditioning"] == "first_frame":  # the class read from the frame, then both guidances
            assert (guidance, framed) == (4.0, True) and set(labels.tolist()) == null
            assert set(generated_for.tolist()) <= {0, 1} and e["network_evaluations"] == 6
            assert e["class_evaluations"] == levels * 2 and "reads from the given frame" in e["classes"]
            accuracy = results[f"first_frame/inferred_class_accuracy@{e['bucket']}"]
            assert accuracy == pytest.approx((generated_for == scored).float().mean().item())
        else:
            given = [int(reference[i]["y"]) for i in e["first_frames"]["items"]]
            assert (guidance, framed) == (4.0, True) and labels.tolist() == given
            assert e["network_evaluations"] == 6
    for (reference, samples, labels), e in zip(judge.judged, evaluated):
        if e["conditioning"] is None:
            continue
        items = e["first_frames"]["items"]
        assert len(items) == 3 and len(set(items)) == 3  # a permutation of the bucket's test items
        for j, i in enumerate(items):  # each sample starts with its test clip's first frame, and takes its label
            torch.testing.assert_close(samples[j, :, 0], reference[i]["x"][:, 0].clamp(-1, 1), atol=1e-4, rtol=0)
            assert int(labels[j]) == int(reference[i]["y"])
        assert not torch.allclose(samples[:, :, 1:], samples[:, :, :1].expand_as(samples[:, :, 1:]))


@pytest.fixture(scope="module")
def bucket_run(clips, tmp_path_factory):
    """The bucketed recipe as a YAML file, and its run on one process (8 steps, checkpoints at 4 and 8)."""
    root = tmp_path_factory.mktemp("bucket-run")
    recipe = root / "buckets.yaml"
    recipe.write_text(_bucket_recipe(clips, root, TRAIN_BUCKETS).to_yaml())
    assert yaml.safe_load(recipe.read_text())["data"]["buckets"] == TRAIN_BUCKETS
    one = _ditx("train", recipe, "--run-dir", root / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    state = json.loads((root / "one/checkpoints/step_00000004/trainer_state.json").read_text())
    assert state["batches_per_epoch"] == 5  # the epoch arithmetic of TRAIN_BUCKETS
    return recipe, root / "one"


def test_two_processes_train_buckets_as_one(bucket_run, tmp_path):
    recipe, one = bucket_run
    two = _accelerate(2, "train", recipe, "--run-dir", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    state = json.loads((tmp_path / "two/checkpoints/step_00000008/trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(one), atol=1e-5)


def test_sigkill_in_the_next_epoch_resumes_bucketed_training_bit_exact(bucket_run, tmp_path):
    """Killed at step 7 (epoch 1), resumed from step 4 (inside epoch 0, between buckets' steps)."""
    recipe, one = bucket_run
    run = tmp_path / "killed"
    _kill_at(recipe, run, "step:7")
    assert _logged_steps(run) == list(range(1, 8))
    resumed = _ditx("train", recipe, "--run-dir", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in (run / "train.log").read_text()
    assert _logged_steps(run) == list(range(1, 9))
    assert_same_weights(final_weights(run), final_weights(one))  # bit-exact
    assert_same_weights(final_weights(run, "ema"), final_weights(one, "ema"))


def test_eval_first_frame_labeled_needs_a_class_conditional_model(tiny_recipe, tmp_path):
    from ditx.evaluate import evaluate_run
    from ditx.train import train

    recipe = tiny_recipe(model={"num_classes": 0}, train={"steps": 1, "checkpoint_every": 1},
                         eval={"metrics": ["digits"], "first_frame_labeled": True})  # fmt: skip
    run = train(recipe, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="first_frame_labeled is for class-conditional models"):
        evaluate_run(run)
