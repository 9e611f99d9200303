"""Shared pieces of the benchmark scripts: the matmul peak, alternating timing, peak memory, tables, JSON.

Every script times ditx and its peer in the same process, alternating, after warm-up, and
reports medians (``alternate``); peak memory is measured in a fresh child process per
candidate (``peak_memory_mb``), since a CPU process has no allocator statistics to reset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.flop_counter as flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).parent / "results"


def use_ditx_allocator() -> None:
    """Run this (timing) process with the CPU allocator setting of the ``ditx`` command, and say which.

    ``ditx.cpu_allocator.reuse_freed_memory``: glibc keeps freed blocks mapped for reuse
    (``DITX_CPU_ALLOCATOR=default`` keeps glibc's default, to compare). It holds for the whole
    process, so ditx and its peer run under the same setting and their ratio is unaffected;
    memory probes (``peak_memory_mb`` children with ``tight_malloc``) do not call this.
    """
    from ditx.cpu_allocator import reuse_freed_memory

    mode = "reuse" if reuse_freed_memory() else "default"
    print(f"CPU allocator: {mode} (ditx.cpu_allocator; set DITX_CPU_ALLOCATOR=default for glibc's)", flush=True)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 8) -> float:
    """GFLOP/s of an n×n×n matrix product in ``dtype``: the best of ``repeats``, after warm-up.

    The best, not the median: it is the ceiling the model steps are compared against, and on
    a shared machine a median of a few 2048³ products moved by ±15% from run to run.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / min(times) / 1e9


def matmul_peaks() -> dict[str, float]:
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s} measured now, in this process."""
    return {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}


def alternate(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, run in turn ``repeats`` times after ``warmup`` calls each.

    Alternating makes machine noise (frequency, other processes) hit every candidate alike,
    so the ratios are steadier than the absolute times.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(v) for name, v in times.items()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """This process's resident memory now, MB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory since start (or the last ``reset_peak_rss``), MB."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux: writing 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_growth(fn: Callable[[], Any]) -> float:
    """Peak resident-memory growth (MB) while ``fn`` runs, over what was resident before."""
    import gc

    gc.collect()
    before = rss_mb()
    reset_peak_rss()
    fn()
    return peak_rss_mb() - before


def peak_memory_mb(script: str, args: Sequence[str], timeout: float = 600, tight_malloc: bool = True) -> float:
    """Run ``python script *args`` in a fresh process; it prints ``PEAK_MB <number>`` as its last such line.

    ``tight_malloc``: fixed glibc malloc thresholds, so that freed blocks go back to the OS
    and RSS follows the live tensors; every large op then faults in fresh pages, so time
    measured in such a child is pessimistic. Without it the child runs as a user's process.
    """
    env = dict(os.environ)
    if tight_malloc:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    done = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {script} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_MB ")]
    if not lines:
        raise RuntimeError(f"memory probe {script} {' '.join(args)} printed no PEAK_MB line:\n{done.stdout[-2000:]}")
    return float(lines[-1].split()[1])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def fmt_mb(mb: float | None) -> str:
    """A memory figure for a table: "—" when not measured, 1 decimal under 10 MB."""
    if mb is None:
        return "—"
    return f"{mb:,.0f}" if abs(mb) >= 10 else f"{mb:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


MODE_FLAGS = {"smoke": ["--smoke"], "quick": ["--quick"], "full": []}  # what a child process is passed


def run_mode(args: Any) -> str:
    """ "smoke" (tiny sizes, to test a script), "quick" or "full", from a script's parsed arguments."""
    return "smoke" if getattr(args, "smoke", False) else "quick" if getattr(args, "quick", False) else "full"


def bench_parser(doc: str, name: str, quick: str) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags they share: ``--quick`` (``quick`` says what it cuts),
    ``--smoke`` (tiny sizes, to test the script; hidden) and ``--out`` (default results/<name>.json)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/{name}.json)")
    return parser


def write_results(name: str, doc: dict[str, Any], out: str | Path | None = None) -> Path | None:
    """Write ``doc`` with the machine description to results/<name>.json (atomically); return the path.

    A ``--quick`` run writes results/<name>_quick.json, so it never replaces the full numbers;
    a ``--smoke`` run (tiny sizes, to test a script) writes only to an explicit ``out``.
    """
    if out is None and "--smoke" in sys.argv[1:]:
        print("smoke run: no results written (pass --out)")
        return None
    if "--quick" in sys.argv[1:] and not name.endswith("_quick"):
        name += "_quick"
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **doc}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _cpu_flash_fwd(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_flash_bwd(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


# torch's flop counter knows the CUDA flash/efficient kernels but not the CPU one SDPA runs here
CPU_SDPA_FLOPS = {
    getattr(torch.ops.aten, name): fn
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_bwd))
    if hasattr(torch.ops.aten, name)
}  # fmt: skip


GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


class _RecordGemms(TorchDispatchMode):
    """Records the matrix products a call runs: (op, [(shape, stride, dtype) or value, ...], kwargs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = {getattr(torch.ops.aten, name).default for name in GEMM_OPS}
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in self.ops:
            spec = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, spec, kwargs))
        return func(*args, **kwargs)


def gemm_ceiling(fn: Callable[[], Any], repeats: int = 3) -> dict[str, float]:
    """The matrix products of one call of ``fn``, replayed alone: what the call would cost if nothing else did.

    Every mm/addmm/bmm/baddbmm ``fn`` runs (after autocast, so in the dtype it really ran)
    is recorded with its shapes and strides, then replayed on random tensors of the same
    layout, back to back (median of ``repeats`` after one warm-up). Returns the replay's
    seconds and GFLOP; ``step FLOPs / seconds`` is the best GFLOP/s the call could reach
    on this machine's GEMM kernels at these shapes, i.e. with every other op free. Attention
    run by SDPA's fused kernel is not a GEMM here, so it counts as free (an upper bound).
    """
    recorder = _RecordGemms()
    with recorder:
        fn()

    def make(spec: Any) -> Any:
        if isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[1], tuple):
            shape, stride, dtype = spec
            return torch.empty_strided(shape, stride, dtype=dtype).uniform_(-1, 1)
        return spec

    replay = [(func, [make(a) for a in spec], kwargs) for func, spec, kwargs in recorder.calls]
    flops = 0
    for _, args, _ in replay:
        a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
        flops += 2 * a.numel() * b.shape[-1]

    def run() -> None:
        for func, args, kwargs in replay:
            func(*args, **kwargs)

    seconds = alternate({"gemms": run}, repeats)["gemms"]
    return {"seconds": seconds, "gflop": flops / 1e9, "calls": len(replay)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (torch.utils.flop_counter, CPU SDPA included)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()
