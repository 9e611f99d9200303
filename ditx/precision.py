"""Mixed precision where it pays: ``mixed_precision: auto`` takes bf16 autocast only on
hardware that runs bf16 matmuls fast.

On a CPU with AMX or AVX-512 BF16, bf16 matmuls run several times faster than fp32 ones;
on one without (an AVX2-only CPU, for example), oneDNN emulates them and they run hundreds
of times slower, so the same recipe can take minutes on one machine and hours on another.
``auto`` measures instead of guessing: a small matmul in both types, once per process.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

logger = logging.getLogger("ditx.precision")

PRECISIONS = ("no", "bf16", "fp16", "auto")


@functools.cache
def cpu_matmul_speeds(n: int = 256, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of an ``n``×``n`` matmul on this CPU in float32 and bfloat16 (best of ``repeats``)."""
    speeds = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
        a @ a  # warm-up: kernel selection, first-touch allocation
        best = float("inf")
        for _ in range(repeats):
            tic = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - tic)
        speeds[name] = 2 * n**3 / max(best, 1e-9) / 1e9
    return speeds


def cpu_bf16_is_fast() -> bool:
    """Whether bf16 matmuls run at least as fast as fp32 ones on this CPU (measured once)."""
    speeds = cpu_matmul_speeds()
    return speeds["bf16"] >= speeds["fp32"]


def resolve_precision(value: str, device: torch.device | str, where: str = "train.mixed_precision") -> str:
    """The precision a job runs at: ``no``, ``bf16`` or ``fp16``.

    ``auto`` is bf16 on a CUDA GPU that supports it and on a CPU where bf16 matmuls are at
    least as fast as fp32 ones (:func:`cpu_bf16_is_fast`), else ``no`` (fp32). An explicit
    ``bf16`` on a CPU where it is slow is kept, with a warning giving the measured speeds.
    """
    if value not in PRECISIONS:
        raise ValueError(f"{where} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    device = torch.device(device)
    if value == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        if device.type != "cpu":
            return "no"
        fast = cpu_bf16_is_fast()
        speeds = cpu_matmul_speeds()
        _say_once(logging.INFO, f"{where}=auto: {'bf16' if fast else 'fp32'} (bf16 matmuls {speeds['bf16']:.1f} "
                                f"GFLOP/s, fp32 {speeds['fp32']:.1f} on this CPU)")  # fmt: skip
        return "bf16" if fast else "no"
    if value == "bf16" and device.type == "cpu" and not cpu_bf16_is_fast():
        speeds = cpu_matmul_speeds()
        _say_once(logging.WARNING, f"{where}=bf16 on a CPU where bf16 matmuls run at {speeds['bf16']:.2f} GFLOP/s "
                                   f"against fp32's {speeds['fp32']:.1f} (no AMX or AVX-512 BF16): this job will be "
                                   f"slow; {where}=auto picks fp32 here")  # fmt: skip
    return value


@functools.cache
def _say_once(level: int, message: str) -> None:
    """Log ``message`` once per process: sampling resolves the precision for every batch."""
    logger.log(level, message)
