"""Sequence parallelism over a process group (DeepSpeed-Ulysses).

Each process of a sequence-parallel group holds ``1/P`` of every clip's tokens: a
contiguous range along the grid's first axis (frames, for video). Everything a DiT does
per token (adaLN, MLP, cross-attention, the final layer) runs on the local shard alone.
Self-attention over a set of axes that includes the first one needs every token: an
all-to-all turns the sequence shards of q, k and v into head shards (each process then
holds ``num_heads / P`` heads of the whole sequence), attention runs as usual, and a
second all-to-all turns the output back into sequence shards. A block that attends
over other axes only (a spatial block, within one frame) needs no communication.

Activations per process then shrink to about ``1/P`` (the attention exchange moves
``4 · N · D / P`` values per block and process); the outputs are gathered once at the
end, so the model's ``forward`` returns the whole prediction on every process, the
same as without parallelism.

Gradients: every process of a group computes the same loss on the gathered output, and
each backpropagates through its own shard only (the gather's backward keeps the local
slice), so a parameter's gradient is the *sum* over the group of the processes'
gradients. Data parallel training averages gradients over all processes, so the trainer
multiplies the loss by ``P`` before backward (``train.sequence_parallel``).

Use: ``enable_sequence_parallel(model, group)`` on a ``DiT``, with ``group`` from
``sequence_parallel_groups(P)`` (consecutive ranks form one group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
    """Cut ``x`` into P chunks along ``scatter_dim``, send chunk i to rank i of ``group``, and
    concatenate what arrives (in rank order) along ``gather_dim``."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim))  # (P, ...chunk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim``; backward keeps this process's slice (every process computes the
    same loss from the gathered tensor, so no gradient is summed here)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group) -> Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


class SequenceParallel:
    """The shards of one sequence-parallel group: which tokens this process holds, and the
    exchanges around attention. ``group`` is a ``torch.distributed`` process group (None: the
    default group, every process)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("sequence parallelism needs torch.distributed initialised (accelerate launch ...)")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"

    def check(self, grid: Sequence[int], num_heads: int) -> None:
        """A clear error when ``grid``'s first axis or the head count does not divide over the group."""
        if grid[0] % self.size:
            raise ValueError(
                f"sequence parallelism over {self.size} processes splits the grid's first axis, but the grid "
                f"is {tuple(grid)}: its first axis ({grid[0]}) must be divisible by {self.size} "
                f"(for video, choose a latent frame count divisible by train.sequence_parallel)"
            )
        if num_heads % self.size:
            raise ValueError(
                f"sequence parallelism over {self.size} processes shards the attention heads, but the model "
                f"has num_heads={num_heads}: it must be divisible by {self.size}"
            )

    def local_grid(self, grid: Sequence[int]) -> tuple[int, ...]:
        """The grid of this process's tokens: the first axis divided by the group size."""
        return (grid[0] // self.size, *grid[1:])

    def exchanges(self, attend: tuple[int, ...] | None) -> bool:
        """Whether attention over the ``attend`` axes (None: all) needs the whole sequence."""
        return attend is None or 0 in attend

    def split(self, x: Tensor, dim: int = 1) -> Tensor:
        """This process's contiguous slice of ``x`` along ``dim`` (tokens, or a per-token mask).
        Its gradient reaches only that slice, as the group's sum of gradients needs."""
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        """The whole sequence from every process's slice along ``dim`` (in rank order)."""
        return _GatherSequence.apply(x, dim, self.group)

    def sequence_to_heads(self, x: Tensor, seq_dim: int, head_dim: int) -> Tensor:
        """(…, n/P tokens, …, H heads, …) -> (…, n tokens, …, H/P heads, …)."""
        return _AllToAll.apply(x, head_dim, seq_dim, self.group)

    def heads_to_sequence(self, x: Tensor, seq_dim: int, head_dim: int) -> Tensor:
        """Inverse of ``sequence_to_heads``."""
        return _AllToAll.apply(x, seq_dim, head_dim, self.group)


def sequence_parallel_groups(size: int) -> tuple[SequenceParallel | None, int, int]:
    """Split every process into groups of ``size`` consecutive ranks.

    Returns (this process's ``SequenceParallel``, or None for ``size == 1``; its data-parallel
    rank; the data-parallel world size). Every process must call it (``new_group`` is collective).
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"train.sequence_parallel must be a positive integer, got {size!r}")
    if size == 1:
        if dist.is_available() and dist.is_initialized():
            return None, dist.get_rank(), dist.get_world_size()
        return None, 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"train.sequence_parallel={size} needs {size} or a multiple of {size} processes: start with "
            f"`accelerate launch --num_processes {size} -m ditx.cli train ...`"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(
            f"train.sequence_parallel={size} must divide the number of processes ({world}): "
            f"processes = data-parallel groups x sequence-parallel size"
        )
    mine = None
    for first in range(0, world, size):  # every process creates every group, in the same order
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceParallel(mine), rank // size, world // size


def enable_sequence_parallel(model: torch.nn.Module, parallel: SequenceParallel | None) -> torch.nn.Module:
    """Make a ``DiT`` split its tokens over ``parallel``'s group (None: switch it off); returns it.

    Set on the model that trains, not on copies that sample alone (EMA, saved models): the
    attribute is not part of the state dict or the config."""
    inner = getattr(model, "module", model)  # DDP/FSDP wrappers keep the DiT as .module
    if not hasattr(inner, "blocks"):
        raise TypeError(f"sequence parallelism is for a ditx DiT, got {type(inner).__name__}")
    inner.sequence_parallel = parallel
    return model

