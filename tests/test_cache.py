"""Latent caching: shards + index, flipped copies, resumable, checked against the recipe."""

from __future__ import annotations

import json

import pytest
import torch

from ditx.build import build_components
from ditx.cache import CachedLatents, StaleCacheError, cache_latents, maybe_cached_dataset
from ditx.files import OutputExistsError
from ditx.train import train


def test_cache_keeps_flipped_copies_and_training_reads_it(tiny_recipe, tmp_path):
    cache = tmp_path / "cache"
    recipe = tiny_recipe(data={"flip": True, "split": "test"}, train={"latent_cache": str(cache), "steps": 2})
    out = cache_latents(recipe, shard_size=100)
    index = json.loads((out / "index.json").read_text())
    assert index["variants"] == 2 and len(index["shards"]) == 4  # 355 test digits in shards of 100
    cached = CachedLatents(out)
    parts = build_components(recipe)
    # identity autoencoder: the cached latents are the images and their mirror images
    for i in (0, 123, 354):
        item = parts.dataset.item(i)
        assert torch.equal(cached.latents[i, 0], item["x"])
        assert torch.equal(cached.latents[i, 1], item["x"].flip(-1))
        assert cached.labels[i] == item["y"]
    # each epoch picks one variant per item, deterministically, and both occur
    picks = []
    for epoch in range(2):
        cached.set_epoch(epoch)
        picks.append([bool(torch.equal(cached[i]["x"], cached.latents[i, 1])) for i in range(50)])
    assert any(picks[0]) and not all(picks[0]) and picks[0] != picks[1]
    assert isinstance(maybe_cached_dataset(recipe, parts), CachedLatents)
    run = train(recipe, run_dir=tmp_path / "run")
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_stale_cache_is_refused_with_what_differs(tiny_recipe, tmp_path):
    cache = tmp_path / "cache"
    cache_latents(tiny_recipe(data={"split": "test"}, train={"latent_cache": str(cache)}))
    other = tiny_recipe(data={"split": "test", "size": 16}, train={"latent_cache": str(cache)})
    stale = r"does not match the recipe \(differs in: data, data_shape.*ditx cache-latents"
    with pytest.raises(StaleCacheError, match=stale):
        maybe_cached_dataset(other, build_components(other))
    shards = sorted(p.name for p in cache.iterdir())
    with pytest.raises(OutputExistsError, match=r"a latent cache for other settings \(differs in: data.*--overwrite"):
        cache_latents(other)
    assert sorted(p.name for p in cache.iterdir()) == shards  # refused: nothing touched
    cache_latents(other, overwrite=True)  # says what it deletes, then encodes afresh
    assert maybe_cached_dataset(other, build_components(other)).data_shape == (1, 16, 16)


def test_cache_refuses_a_folder_of_other_files(tiny_recipe, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"files that are not a latent cache \(notes.txt\)"):
        cache_latents(tiny_recipe(train={"latent_cache": str(tmp_path / "cache")}))
    assert (tmp_path / "cache" / "notes.txt").read_text() == "mine"


def test_interrupted_caching_resumes(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe(data={"split": "test"})
    ref = cache_latents(recipe, out=tmp_path / "ref", shard_size=64)
    # fail while encoding the third shard: two shards stay, no index is written
    import ditx.autoencoder

    calls = {"n": 0}
    original = ditx.autoencoder.IdentityAutoencoder.encode

    def failing(self, x, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(self, x, *a, **k)

    monkeypatch.setattr(ditx.autoencoder.IdentityAutoencoder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(recipe, out=tmp_path / "cache", shard_size=64, batch_size=64)
    assert not (tmp_path / "cache" / "index.json").exists()
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard_*")) == ["shard_00000.safetensors",
                                                                            "shard_00001.safetensors"]
    # the rerun encodes only the missing shards
    calls["n"] = -100
    cache_latents(recipe, out=tmp_path / "cache", shard_size=64, batch_size=64)
    assert calls["n"] == -100 + 4  # 6 shards of 355 items, 2 already there
    a, b = CachedLatents(ref), CachedLatents(tmp_path / "cache")
    assert torch.equal(a.latents, b.latents) and torch.equal(a.labels, b.labels)


def _image_folder(root, count=12):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_cache_is_refused_when_data_files_are_replaced_with_the_same_count(tiny_recipe, tmp_path):
    import numpy as np
    from PIL import Image

    images = _image_folder(tmp_path / "images")
    recipe = tiny_recipe(data={"name": "image-folder", "root": str(images), "size": 8},
                         train={"latent_cache": str(tmp_path / "cache"), "batch_size": 4})  # fmt: skip
    cache_latents(recipe)
    maybe_cached_dataset(recipe, build_components(recipe))  # matches
    # one image replaced by another one: same file count, same names
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "c0" / "0.png")
    with pytest.raises(StaleCacheError, match=r"differs in: dataset\b"):
        maybe_cached_dataset(recipe, build_components(recipe))


def test_cache_is_refused_when_autoencoder_weights_change_at_the_same_path(tiny_recipe, tmp_path):
    from diffusers import AutoencoderKL

    kl = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8],
              down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
              layers_per_block=1, norm_num_groups=4, sample_size=8)  # fmt: skip
    torch.manual_seed(0)
    AutoencoderKL(**kl).save_pretrained(tmp_path / "vae")
    images = _image_folder(tmp_path / "images")
    recipe = tiny_recipe(data={"name": "image-folder", "root": str(images), "size": 8},
                         autoencoder={"name": "sd-vae", "pretrained": str(tmp_path / "vae")},
                         train={"latent_cache": str(tmp_path / "cache"), "batch_size": 4})  # fmt: skip
    cache_latents(recipe)
    maybe_cached_dataset(recipe, build_components(recipe))  # matches
    torch.manual_seed(1)  # "retrained": other weights saved over the same folder
    AutoencoderKL(**kl).save_pretrained(tmp_path / "vae")
    with pytest.raises(StaleCacheError, match=r"differs in: autoencoder_weights\b"):
        maybe_cached_dataset(recipe, build_components(recipe))


def test_one_cache_folder_rule_for_every_modality(monkeypatch, tmp_path):
    from ditx.modalities.shape3d.data import PrimitivesDataset  # noqa: F401  (imports resolve)

    from ditx.files import ditx_cache_dir

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ditx_cache_dir("shape3d-samples") == tmp_path / "mine" / "shape3d-samples"
    monkeypatch.delenv("DITX_CACHE")
    assert ditx_cache_dir() == tmp_path / "xdg" / "ditx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ditx_cache_dir("moving-digits") == tmp_path / "home" / ".cache" / "ditx" / "moving-digits"


def test_caching_never_builds_the_dit(tiny_recipe, tmp_path, monkeypatch):
    """cache-latents needs the dataset and the autoencoder: the model is built only when asked for."""
    import ditx.build

    def no_model(*args, **kwargs):
        raise AssertionError("cache-latents built a DiT")

    monkeypatch.setattr(ditx.build, "build_model", no_model)
    out = cache_latents(tiny_recipe(data={"split": "test"}), out=tmp_path / "cache")
    assert json.loads((out / "index.json").read_text())["fingerprint"]["num_items"] == 355


def test_a_moved_autoencoder_with_the_same_weights_keeps_the_cache():
    """A run copied or moved elsewhere reads its autoencoder from a new path: the weights' hash says
    they are the same, so the cache stays valid; other weights, or another setting, do not."""
    from ditx.latents import fingerprint_difference

    cached = {"autoencoder": {"name": "framewise-vae", "pretrained": "/old/run/autoencoder", "chunk_size": 256},
              "autoencoder_weights": "ab12", "latent_shape": [4, 8, 8, 8]}  # fmt: skip
    moved = {**cached, "autoencoder": {**cached["autoencoder"], "pretrained": "/new/run/autoencoder"}}
    assert fingerprint_difference(moved, cached) == []
    retrained = {**moved, "autoencoder_weights": "cd34"}
    assert fingerprint_difference(retrained, cached) == ["autoencoder", "autoencoder_weights"]
    other = {**moved, "autoencoder": {**moved["autoencoder"], "chunk_size": 16}}
    assert fingerprint_difference(other, cached) == ["autoencoder"]
    unhashed = {**moved, "autoencoder_weights": None}
    assert fingerprint_difference(unhashed, {**cached, "autoencoder_weights": None}) == ["autoencoder"]
