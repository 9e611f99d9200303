"""The cache-latents job: encode a dataset once with the recipe's autoencoder (fast-DiT style).

``cache_latents`` writes ``shard_XXXXX.safetensors`` files (latents ``(n, variants,
*latent)`` and labels) and, last, ``index.json`` with a fingerprint of everything the
latents depend on (autoencoder, data arguments, shapes). Every shard is written
atomically, so an interrupted run resumes at the first missing shard. When a dataset
augments (e.g. flips), each item's variants are all cached and training picks one per
epoch, so the augmentation is not frozen into the cache.

Training reads the cache through ``ditx.latents`` (its identity and reader) when
``train.latent_cache`` points at one, and refuses a cache whose fingerprint disagrees
with the recipe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ditx.files import atomic_write
from ditx.latents import (
    CACHE_FORMAT,
    INDEX_NAME,
    CachedLatents,
    StaleCacheError,
    cached_captions,
    fingerprint,
    fingerprint_difference,
    maybe_cached_dataset,
    no_captions_error,
)
from ditx.recipe import Recipe

__all__ = ["CachedLatents", "StaleCacheError", "cache_latents", "default_cache_folder", "maybe_cached_dataset"]

logger = logging.getLogger("ditx.cache")

def default_cache_folder(recipe: Recipe) -> Path:
    """Where ``ditx cache-latents`` writes without ``--out``: ``train.latent_cache``, else ``cache/<recipe>``."""
    if recipe.train.latent_cache:
        return Path(recipe.train.latent_cache)
    return Path("cache") / (recipe.name or "recipe").replace("/", "-")


def _shard_ok(path: Path, n: int) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("latents").get_shape()[0] == n
    except Exception:
        return False


@torch.no_grad()
def cache_latents(
    recipe: Recipe,
    out: str | Path | None = None,
    shard_size: int = 1024,
    batch_size: int = 64,
    device=None,
    overwrite: bool = False,
) -> Path:
    """Encode the recipe's dataset into ``out`` (default ``train.latent_cache`` or ``cache/<recipe>``).

    A complete cache for the same settings is reused, a partial one resumed; a folder holding
    a cache for other settings, or other files, is refused unless ``overwrite`` (which
    says what it deletes and encodes afresh).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ditx.build import build_components
    from ditx.files import claim_output_folder

    # seeded as training seeds it, so an autoencoder initialised from a config (not loaded) has the
    # weights training will have: the cache's identity includes them
    torch.manual_seed(recipe.train.seed)
    parts = build_components(recipe)
    dataset, ae = parts.dataset, parts.autoencoder
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ae.to(device)
    out = Path(out) if out else default_cache_folder(recipe)
    fp = fingerprint(recipe, dataset, parts.latent_shape, ae)
    index_path = out / INDEX_NAME
    progress_path = out / "progress.json"  # fingerprint of the shards written so far
    if index_path.is_file():
        kind, got = "latent cache", json.loads(index_path.read_text()).get("fingerprint")
        if not fingerprint_difference(fp, got):
            logger.info("latent cache %s is complete and matches the recipe", out)
            _cache_captions(recipe, out, device)
            return out
    elif progress_path.is_file():  # an interrupted run: resumed when its settings are the same
        kind, got = "partial latent cache", json.loads(progress_path.read_text())
    else:
        kind, got = None, fp
    differ = fingerprint_difference(fp, got)
    if differ:
        claim_output_folder(out, overwrite=overwrite, what=f"a {kind} for other settings",
                            holds=f"differs in: {', '.join(differ)}")  # fmt: skip
    elif kind is None:
        claim_output_folder(out, overwrite=overwrite, what="files that are not a latent cache")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(progress_path) as tmp:
        tmp.write_text(json.dumps(fp))

    # a shard holds items of one bucket (one latent shape); without buckets, items in order
    groups = _items_by_bucket(dataset)
    planned = [(bucket, items[i : i + shard_size]) for bucket, items in groups
               for i in range(0, len(items), shard_size)]  # fmt: skip
    shards = []
    for k, (bucket, members) in enumerate(tqdm(planned, desc="cache-latents", unit="shard")):
        path = out / f"shard_{k:05d}.safetensors"
        entry = {"file": path.name, "count": len(members)}
        entry.update({"start": members[0]} if bucket is None else {"bucket": bucket, "items": members})
        shards.append(entry)
        if _shard_ok(path, len(members)):
            continue  # written by an earlier, interrupted run
        latents, labels, captions = [], [], []
        for b0 in range(0, len(members), batch_size):
            items = [dataset.cache_variants(i) for i in members[b0 : b0 + batch_size]]
            v = len(items[0])
            x = torch.stack([it["x"] for variants in items for it in variants]).to(device)
            z = ae.encode(x).float().cpu()
            latents.append(z.reshape(len(items), v, *z.shape[1:]))
            labels.append(torch.tensor([int(variants[0].get("y", -1)) for variants in items]))
            captions += [variants[0].get("caption") for variants in items]
        # a shard's captions travel in its metadata, written atomically with its latents
        metadata = {"captions": json.dumps(captions)} if all(isinstance(c, str) for c in captions) else None
        with atomic_write(path) as tmp:
            save_file({"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels)}, str(tmp),
                      metadata=metadata)  # fmt: skip
    index = {"format": CACHE_FORMAT, "fingerprint": fp, "shards": shards,
             "variants": len(dataset.cache_variants(0))}  # fmt: skip
    with atomic_write(index_path) as tmp:
        tmp.write_text(json.dumps(index, indent=2))
    progress_path.unlink(missing_ok=True)
    _cache_captions(recipe, out, device)
    return out


def _items_by_bucket(dataset) -> list[tuple[int | None, list[int]]]:
    """(bucket, its item indices in order) for each bucket of a bucketed dataset, else [(None, every index)]."""
    if not getattr(dataset, "buckets", None):
        return [(None, list(range(len(dataset))))]
    item_buckets = torch.as_tensor(list(dataset.item_buckets))
    return [(b, torch.nonzero(item_buckets == b).flatten().tolist()) for b in range(len(dataset.buckets))
            if (item_buckets == b).any()]  # fmt: skip


def _cache_captions(recipe: Recipe, out: Path, device) -> None:
    """For a text recipe: every distinct caption of the cache (and ``""``) encoded once with the
    recipe's text encoder, in ``text-<encoder key>.safetensors`` beside the latents. Keyed by the
    encoder's settings (``max_length`` among them) and files, so another encoder adds its own
    file and reuses the latents; training then never runs the encoder."""
    from ditx.build import build_text_encoder
    from ditx.text import CaptionTable, caption_table_name, text_encoder_key

    if recipe.text_encoder is None:
        return
    key = text_encoder_key(recipe.text_encoder)
    path = out / caption_table_name(key)
    if path.is_file():
        return
    captions = cached_captions(out)
    if captions is None:
        raise no_captions_error(recipe)
    encoder = build_text_encoder(recipe).to(device)
    # the recipe's preview prompts too, so training previews need no encoder either
    wanted = captions + list(recipe.sample.prompts or []) + [recipe.sample.negative_prompt]
    CaptionTable.build(encoder, wanted, key=key, progress=True).save(path)
    logger.info("cached the embeddings of %d distinct captions in %s", len(set(captions)) + 1, path)
