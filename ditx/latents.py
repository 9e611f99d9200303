"""A latent cache's identity and its reader: what training needs of a cache (``ditx.cache`` writes it).

A cache's ``index.json`` holds a fingerprint of everything its latents depend on: the
autoencoder's settings and a SHA-256 of its weights, the data arguments, the dataset's
``cache_key`` (for folders: each file's path, size and mtime), the shapes. Training reads
a cache only when the fingerprint matches the recipe's (:func:`maybe_cached_dataset`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditx.data import Dataset, deterministic_choice
from ditx.recipe import Recipe

logger = logging.getLogger("ditx.cache")

INDEX_NAME = "index.json"
CACHE_FORMAT = "ditx-latent-cache"


class StaleCacheError(ValueError):
    """A latent cache that was made for different settings than the recipe's."""


def weights_sha256(module: Any) -> str | None:
    """SHA-256 over a module's state (names, dtypes, shapes, values); None for a non-module.

    Part of a cache's identity: autoencoder weights retrained at the same path change it.
    """
    import hashlib

    if not isinstance(module, torch.nn.Module):
        return None
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def fingerprint(recipe: Recipe, dataset: Dataset, latent_shape: tuple[int, ...], autoencoder: Any) -> dict[str, Any]:
    """Everything the cached latents depend on: settings, the autoencoder's weights and
    (through the dataset's ``cache_key``) its files' paths, sizes and modification times."""
    key = dataset.cache_key()
    buckets = getattr(dataset, "buckets", None)
    extra = {}
    if buckets:  # each bucket's latent shape
        extra["bucket_latent_shapes"] = [list(autoencoder.latent_shape((dataset.data_shape[0], *b.size)))
                                         for b in buckets]  # fmt: skip
    return {
        **extra,
        "autoencoder": recipe.autoencoder.to_dict(),
        "autoencoder_weights": weights_sha256(autoencoder),
        "data": recipe.data.to_dict(),
        "dataset": key,
        "data_shape": list(dataset.data_shape),
        "latent_shape": list(latent_shape),
        "num_items": len(dataset),
    }


def fingerprint_difference(expected: dict[str, Any], got: dict[str, Any] | None) -> list[str]:
    """The keys on which two fingerprints differ, sorted.

    Where the autoencoder's weights are hashed and equal, its ``pretrained`` path is only where
    they were read from: a run moved or copied elsewhere (its autoencoder with it) keeps its cache.
    """
    got = got or {}
    differ = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
    weights = expected.get("autoencoder_weights")
    if "autoencoder" in differ and weights is not None and weights == got.get("autoencoder_weights"):
        located = [{k: v for k, v in dict(f.get("autoencoder") or {}).items() if k != "pretrained"}
                   for f in (expected, got)]  # fmt: skip
        if located[0] == located[1]:
            differ.remove("autoencoder")
    return differ


class CachedLatents(Dataset):
    """Items ``{"x": latent, "y": label}`` (and ``"caption"``) from a cache; with several
    variants per item (e.g. flipped), each epoch picks one per item deterministically.

    A cache of a bucketed dataset holds each bucket's latents in its own shards (one latent
    shape each); items keep the dataset's order and buckets (``buckets``, ``item_buckets``)."""

    def __init__(self, root: str | Path, seed: int = 0, buckets: list | None = None):
        from safetensors import safe_open

        root = Path(root)
        index = json.loads((root / INDEX_NAME).read_text())
        per_bucket: dict[int, list[Tensor]] = {}
        rows: dict[int, tuple[int, int]] = {}  # item -> (bucket, row in that bucket's latents)
        labels, captions = {}, {}
        for shard in index["shards"]:
            bucket = shard.get("bucket", 0)
            items = shard["items"] if "bucket" in shard else range(shard["start"], shard["start"] + shard["count"])
            with safe_open(str(root / shard["file"]), framework="pt") as f:
                latents = f.get_tensor("latents")
                shard_labels = f.get_tensor("labels").tolist()
                shard_captions = (f.metadata() or {}).get("captions")
            done = sum(len(t) for t in per_bucket.get(bucket, []))
            per_bucket.setdefault(bucket, []).append(latents)
            shard_captions = json.loads(shard_captions) if shard_captions is not None else [None] * len(items)
            for j, i in enumerate(items):
                rows[i] = (bucket, done + j)
                labels[i], captions[i] = shard_labels[j], shard_captions[j]
        n = len(rows)
        # bucket -> (N_b, V, *latent of the bucket)
        self.bucket_latents: dict[int, Tensor] = {b: torch.cat(t) for b, t in per_bucket.items()}
        self._rows = [rows[i] for i in range(n)]
        self.labels: Tensor = torch.tensor([labels[i] for i in range(n)], dtype=torch.int64)
        ordered = [captions[i] for i in range(n)]
        self.captions = ordered if all(isinstance(c, str) for c in ordered) else None
        self.variants = index["variants"]
        self.data_shape = tuple(index["fingerprint"]["latent_shape"])
        self.buckets = buckets
        self.item_buckets = [b for b, _ in self._rows] if buckets else None
        self.seed, self.epoch = seed, 0

    @property
    def latents(self) -> Tensor:
        """(N, V, *latent) every item's latents, for a cache of one latent shape."""
        if len(self.bucket_latents) != 1:
            raise ValueError("a cache of several buckets holds latents of several shapes; read bucket_latents")
        return next(iter(self.bucket_latents.values()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        v = deterministic_choice(self.seed, self.epoch, index, self.variants) if self.variants > 1 else 0
        bucket, row = self._rows[index]
        item: dict[str, Any] = {"x": self.bucket_latents[bucket][row, v]}
        if self.labels[index] >= 0:
            item["y"] = int(self.labels[index])
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


def _joined_captions(per_shard: list[str | None]) -> list[str] | None:
    """The items' captions from each shard's ``captions`` metadata (JSON), None when a shard has none."""
    if not per_shard or any(c is None for c in per_shard):
        return None
    return [c for shard in per_shard for c in json.loads(shard)]


def cached_captions(root: str | Path) -> list[str] | None:
    """A cache's captions in item order (read from the shards' metadata only, not their latents)."""
    from safetensors import safe_open

    root = Path(root)
    per_shard = []
    for shard in json.loads((root / INDEX_NAME).read_text())["shards"]:
        with safe_open(str(root / shard["file"]), framework="pt") as f:
            per_shard.append((f.metadata() or {}).get("captions"))
    return _joined_captions(per_shard)


def no_captions_error(recipe: Recipe) -> ValueError:
    """The error of a text recipe whose data gives no captions."""
    return ValueError(
        f"{recipe.name or 'the recipe'} has a text encoder, but its dataset {recipe.data.name!r} gives no captions "
        f"(see docs/datasets.md: a caption column in the manifest or a .txt beside each file)"
    )


def cached_caption_table(recipe: Recipe, root: str | Path | None = None):
    """The caption embeddings ``ditx cache-latents`` stored for the recipe's text encoder, or
    None (with a warning naming what to run) when the cache holds none for it."""
    from ditx.text import CaptionTable, caption_table_name, text_encoder_key

    root = Path(root or recipe.train.latent_cache)
    path = root / caption_table_name(text_encoder_key(recipe.text_encoder))
    if not path.is_file():
        logger.warning("latent cache %s holds no caption embeddings for this text encoder; encoding captions "
                       "on the fly (run `ditx cache-latents` to encode them once)", root)  # fmt: skip
        return None
    return CaptionTable.load(path)


def maybe_cached_dataset(recipe: Recipe, parts: Any) -> Dataset:
    """The cached latents when ``train.latent_cache`` holds a cache matching the recipe,
    else the recipe's dataset (with a warning if a cache was named but is missing)."""
    root = recipe.train.latent_cache
    if not root:
        return parts.dataset
    index_path = Path(root) / INDEX_NAME
    if not index_path.is_file():
        logger.warning("train.latent_cache=%s has no complete cache; encoding on the fly "
                       "(run `ditx cache-latents` first to skip the autoencoder during training)", root)  # fmt: skip
        return parts.dataset
    index = json.loads(index_path.read_text())
    expected = fingerprint(recipe, parts.dataset, parts.latent_shape, parts.autoencoder)
    got = index.get("fingerprint", {})
    differ = fingerprint_difference(expected, got)
    if differ:
        raise StaleCacheError(
            f"latent cache {root} does not match the recipe (differs in: {', '.join(differ)}; "
            f"cache has {[got.get(k) for k in differ]}, recipe needs {[expected.get(k) for k in differ]}). "
            f"Re-run `ditx cache-latents` for this recipe or unset train.latent_cache"
        )
    return CachedLatents(root, seed=recipe.train.seed, buckets=getattr(parts.dataset, "buckets", None))
