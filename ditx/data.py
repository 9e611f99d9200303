"""Data plumbing shared by every modality: deterministic global batches, bad-sample
tolerance, and augmentation choices that depend only on (seed, epoch, index)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, default_collate


def deterministic_choice(seed: int, epoch: int, index: int, n: int = 2) -> int:
    """A choice in ``range(n)`` fixed by (seed, epoch, index): the same in every worker,
    process and resumed run, so augmentation (e.g. a flip) never depends on RNG state."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's slice of each global micro-batch of one seeded epoch permutation.

    Global micro-batch ``k`` is ``perm[k*G:(k+1)*G]`` with ``G = local * world``;
    process ``r`` takes ``[r*local:(r+1)*local]`` of it. Incomplete batches are dropped.
    ``start`` skips micro-batches already trained on (resume).
    """

    def __init__(self, n: int, local_batch: int, rank: int, world: int, seed: int, epoch: int, start: int = 0):
        self.n, self.local, self.rank, self.world = n, local_batch, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def batches_per_epoch(self) -> int:
        return self.n // (self.local * self.world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        size = self.local * self.world
        for k in range(self.start, self.batches_per_epoch()):
            first = k * size + self.rank * self.local
            yield perm[first : first + self.local]


class SkipBadSamples(Dataset):
    """Wraps a dataset so that an item that raises becomes an error record (path and reason)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except Exception as e:  # reported by the trainer against the budget
            return {"__error__": f"item {index}: {e}"}


def collate_skipping_errors(items: list[dict]) -> dict[str, Any]:
    good = [it for it in items if "__error__" not in it]
    batch = default_collate(good) if good else {}
    batch["errors"] = [it["__error__"] for it in items if "__error__" in it]
    return batch


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one optimizer step's noise, timesteps and label dropout (global batch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 17) % (2**63))
