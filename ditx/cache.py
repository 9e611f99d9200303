"""Latent caching: encode a dataset once with the recipe's autoencoder (fast-DiT style).

``cache_latents`` writes ``shard_XXXXX.safetensors`` files (latents ``(n, variants,
*latent)`` and labels) and, last, ``index.json`` with a fingerprint of everything the
latents depend on (autoencoder, data arguments, shapes). Every shard is written
atomically, so an interrupted run resumes at the first missing shard. When a dataset
augments (e.g. flips), each item's variants are all cached and training picks one per
epoch, so the augmentation is not frozen into the cache.

Training uses the cache when ``train.latent_cache`` points at one, and refuses a
cache whose fingerprint disagrees with the recipe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ditx.checkpoint import atomic_write
from ditx.data import deterministic_choice
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
    key = dataset.cache_key() if hasattr(dataset, "cache_key") else {}
    return {
        "autoencoder": recipe.autoencoder.to_dict(),
        "autoencoder_weights": weights_sha256(autoencoder),
        "data": recipe.data.to_dict(),
        "dataset": key,
        "data_shape": list(dataset.data_shape),
        "latent_shape": list(latent_shape),
        "num_items": len(dataset),
    }


def fingerprint_difference(expected: dict[str, Any], got: dict[str, Any] | None) -> list[str]:
    """The keys on which two fingerprints differ, sorted."""
    got = got or {}
    return sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))


def default_cache_dir(recipe: Recipe) -> Path:
    if recipe.train.latent_cache:
        return Path(recipe.train.latent_cache)
    return Path("cache") / (recipe.name or "recipe").replace("/", "-")


def _variants(dataset: Dataset, index: int) -> list[dict]:
    return dataset.cache_variants(index) if hasattr(dataset, "cache_variants") else [dataset[index]]


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

    from ditx.files import claim_output_folder, folder_entries
    from ditx.train import build_components

    # seeded as training seeds it, so an autoencoder initialised from a config (not loaded) has the
    # weights training will have: the cache's identity includes them
    torch.manual_seed(recipe.train.seed)
    parts = build_components(recipe)
    dataset, ae = parts.dataset, parts.autoencoder
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if hasattr(ae, "to"):
        ae.to(device)
    out = Path(out) if out else default_cache_dir(recipe)
    fp = fingerprint(recipe, dataset, parts.latent_shape, ae)
    index_path = out / INDEX_NAME
    progress_path = out / "progress.json"  # fingerprint of the shards written so far
    written = index_path if index_path.is_file() else progress_path if progress_path.is_file() else None
    if written is not None:
        got = json.loads(written.read_text())
        got = got.get("fingerprint") if written == index_path else got
        if got == fp and written == index_path:
            logger.info("latent cache %s is complete and matches the recipe", out)
            return out
        if got != fp:
            kind = "latent cache" if written == index_path else "partial latent cache"
            claim_output_folder(out, overwrite=overwrite, what=f"a {kind} for other settings",
                                holds=f"differs in: {', '.join(fingerprint_difference(fp, got))}")  # fmt: skip
    elif folder_entries(out):
        claim_output_folder(out, overwrite=overwrite, what="files that are not a latent cache")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(progress_path) as tmp:
        tmp.write_text(json.dumps(fp))

    n = len(dataset)
    shards = []
    for k, start in enumerate(tqdm(range(0, n, shard_size), desc="cache-latents", unit="shard")):
        stop = min(start + shard_size, n)
        path = out / f"shard_{k:05d}.safetensors"
        shards.append({"file": path.name, "start": start, "count": stop - start})
        if _shard_ok(path, stop - start):
            continue  # written by an earlier, interrupted run
        latents, labels = [], []
        for b0 in range(start, stop, batch_size):
            items = [_variants(dataset, i) for i in range(b0, min(b0 + batch_size, stop))]
            v = len(items[0])
            x = torch.stack([it["x"] for variants in items for it in variants]).to(device)
            z = ae.encode(x).float().cpu()
            latents.append(z.reshape(len(items), v, *z.shape[1:]))
            labels.append(torch.tensor([int(variants[0].get("y", -1)) for variants in items]))
        with atomic_write(path) as tmp:
            save_file({"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels)}, str(tmp))
    index = {"format": CACHE_FORMAT, "fingerprint": fp, "shards": shards,
             "variants": len(_variants(dataset, 0))}  # fmt: skip
    with atomic_write(index_path) as tmp:
        tmp.write_text(json.dumps(index, indent=2))
    progress_path.unlink(missing_ok=True)
    return out


class CachedLatents(Dataset):
    """Items ``{"x": latent, "y": label}`` from a cache; with several variants per item
    (e.g. flipped), each epoch picks one per item deterministically."""

    def __init__(self, root: str | Path, seed: int = 0):
        from safetensors.torch import load_file

        root = Path(root)
        index = json.loads((root / INDEX_NAME).read_text())
        parts = [load_file(str(root / s["file"])) for s in index["shards"]]
        self.latents: Tensor = torch.cat([p["latents"] for p in parts])  # (N, V, *latent)
        self.labels: Tensor = torch.cat([p["labels"] for p in parts])
        self.variants = index["variants"]
        self.data_shape = tuple(index["fingerprint"]["latent_shape"])
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        v = deterministic_choice(self.seed, self.epoch, index, self.variants) if self.variants > 1 else 0
        item: dict[str, Any] = {"x": self.latents[index, v]}
        if self.labels[index] >= 0:
            item["y"] = int(self.labels[index])
        return item


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
    if got != expected:
        differ = fingerprint_difference(expected, got)
        raise StaleCacheError(
            f"latent cache {root} does not match the recipe (differs in: {', '.join(differ)}; "
            f"cache has {[got.get(k) for k in differ]}, recipe needs {[expected.get(k) for k in differ]}). "
            f"Re-run `ditx cache-latents` for this recipe or unset train.latent_cache"
        )
    return CachedLatents(root, seed=recipe.train.seed)
