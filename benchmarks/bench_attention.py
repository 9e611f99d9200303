"""Long-sequence attention: ditx's ``attention`` with the sdpa and auto backends against the naive math one.

Joint (full) self-attention over 1,024, 4,096 and 16,384 tokens, batch 1, 6 heads of 64
dims (the DiT-S width), float32 by default: ``ditx.attention.attention(q, k, v, backend=...)``
with ``sdpa`` (torch's fused CPU flash kernel), ``auto`` (what DiT blocks use; the table
shows the backend it resolves to, and when that is one of the others it is not timed twice:
its row repeats that backend's run) and ``math`` (softmax(q kᵀ/√d) v written out in float32,
with the full N×N score matrix).

For each length the backends run in the same process, alternating, after warm-up (median):
the forward alone (under no_grad) and forward + backward (inputs require grad; backward of
a fixed random output gradient). GFLOP/s counts the forward's two matrix products,
4·B·H·N²·d. Peak memory is the resident-memory growth over one call, measured in a fresh
child process per candidate (``--memory-of``) after a warm-up call on 256 tokens; it
includes the output (B·H·N·d values) and, with backward, the three input gradients.

The math backend's score matrices are the memory problem: at 16,384 tokens and 6 heads one
float32 N×N matrix per head is 6.4 GB; its forward holds two (12.9 GB), its backward about
four (~26 GB), so math's forward + backward is skipped where that estimate exceeds
``--math-budget-gb`` (14 GB: the machine has 24 GB). sdpa never materialises them.

    python benchmarks/bench_attention.py            # 1,024 / 4,096 / 16,384 tokens (~3 min on 2 cores, 13 GB peak)
    python benchmarks/bench_attention.py --quick    # 1,024 / 4,096 tokens, fewer repeats (<1 min)

Writes benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    MODE_FLAGS,
    alternate,
    fmt_mb,
    markdown_table,
    measure_growth,
    peak_memory_mb,
    run_mode,
    use_ditx_allocator,
    write_results,
)

from ditx.attention import attention, resolve_backend

BACKENDS = ("sdpa", "auto", "math")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the goals, at the longest sequence: memory growth of a forward under this, and this much faster than math
MEMORY_GOAL_MB = 100.0
SPEED_GOAL = 5.0
WARMUP_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]
    heads: int
    head_dim: int
    repeats: int
    long_repeats: int  # for sizes of 8,192 tokens and more
    batch: int = 1

    def repeats_for(self, n: int) -> int:
        return self.long_repeats if n >= 8192 else self.repeats


CONFIGS = {
    "full": Config(sizes=(1024, 4096, 16384), heads=6, head_dim=64, repeats=5, long_repeats=1),
    "quick": Config(sizes=(1024, 4096), heads=6, head_dim=64, repeats=3, long_repeats=1),
    "smoke": Config(sizes=(64, 512), heads=2, head_dim=16, repeats=1, long_repeats=1),
}


def math_estimate_gb(cfg: Config, n: int, mode: str) -> float:
    """Rough peak of the math backend: float32 N×N score buffers alive at once (2 forward, ~4 with backward)."""
    return (2 if mode == "fwd" else 4) * cfg.batch * cfg.heads * n * n * 4 / 1e9


def make_call(cfg: Config, n: int, backend: str, mode: str, dtype: torch.dtype) -> Callable[[], None]:
    """One attention call (``mode`` "fwd" or "fwd+bwd") on fixed random (B, H, N, d) inputs."""
    gen = torch.Generator().manual_seed(n)
    shape = (cfg.batch, cfg.heads, n, cfg.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype).requires_grad_(mode == "fwd+bwd") for _ in range(3))
    if mode == "fwd":

        def call() -> None:
            with torch.no_grad():
                attention(q, k, v, backend=backend)

        return call
    grad = torch.randn(shape, generator=gen).to(dtype)

    def call_backward() -> None:
        attention(q, k, v, backend=backend).backward(grad)
        q.grad = k.grad = v.grad = None

    return call_backward


def probe_memory(cfg: Config, n: int, backend: str, mode: str, dtype: torch.dtype) -> None:
    """Child-process mode: warm up on a short sequence, then print the memory growth over one call."""
    make_call(cfg, min(n, WARMUP_TOKENS), backend, mode, dtype)()
    call = make_call(cfg, n, backend, mode, dtype)
    print(f"PEAK_MB {measure_growth(call):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,024 and 4,096 tokens only, 3 repeats")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="input dtype (default float32)")
    parser.add_argument("--math-budget-gb", type=float, default=14.0,
                        help="skip math-backend runs whose estimated peak exceeds this (default 14)")  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention.json)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes, to test the script
    parser.add_argument("--memory-of", choices=BACKENDS, help=argparse.SUPPRESS)  # child-process mode
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="fwd", help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode_name = run_mode(args)
    cfg = CONFIGS[mode_name]
    dtype = DTYPES[args.dtype]
    if args.memory_of:
        probe_memory(cfg, args.tokens, args.memory_of, args.mode, dtype)
        return
    use_ditx_allocator()

    print(f"joint attention, batch {cfg.batch}, {cfg.heads} heads × {cfg.head_dim} dims, {args.dtype}, "
          f"{torch.get_num_threads()} threads; math skipped above ~{args.math_budget_gb:g} GB (estimate)",
          flush=True)  # fmt: skip
    script = str(Path(__file__).resolve())
    flags = MODE_FLAGS[mode_name]
    rows = []
    for n in cfg.sizes:
        probe = torch.empty(cfg.batch, cfg.heads, n, cfg.head_dim, dtype=dtype)
        ms: dict[str, dict[str, float | None]] = {b: {} for b in BACKENDS}
        memory: dict[str, dict[str, float | None]] = {b: {} for b in BACKENDS}
        resolved_in: dict[str, str] = {}
        for mode in MODES:
            with torch.set_grad_enabled(mode == "fwd+bwd"):  # what auto picks depends on whether grads are needed
                auto = resolve_backend("auto", probe.requires_grad_(mode == "fwd+bwd"))
            run = [b for b in BACKENDS if b != "math" or math_estimate_gb(cfg, n, mode) <= args.math_budget_gb]
            if auto in run:  # auto runs that very backend: time it once
                run.remove("auto")
            calls = {b: make_call(cfg, n, b, mode, dtype) for b in run}
            med = alternate(calls, cfg.repeats_for(n), warmup=1)
            del calls
            if "auto" not in run:
                med["auto"] = med.get(auto)
            for b in BACKENDS:
                ms[b][mode] = 1e3 * med[b] if med.get(b) is not None else None
                memory[b][mode] = (
                    peak_memory_mb(script, ["--memory-of", b, "--tokens", str(n), "--mode", mode,
                                            "--dtype", args.dtype, *flags])
                    if b in run else None
                )  # fmt: skip
            if "auto" not in run:
                memory["auto"][mode] = memory[auto][mode]
            resolved_in[mode] = auto
            print(f"{n} tokens, {mode}: " + ", ".join(f"{b} {med[b] * 1e3:.1f} ms" for b in run), flush=True)
        flop = 4 * cfg.batch * cfg.heads * n * n * cfg.head_dim
        for b in BACKENDS:
            speedup = {
                m: ms["math"][m] / ms[b][m] if ms["math"][m] is not None and ms[b][m] is not None else None
                for m in MODES
            }
            fwd_gflop_s = flop / ms[b]["fwd"] / 1e6 if ms[b]["fwd"] is not None else None
            estimate = {m: math_estimate_gb(cfg, n, m) for m in MODES} if b == "math" else None
            resolved_b = resolved_in if b == "auto" else {m: b for m in MODES}
            rows.append({"tokens": n, "backend": b, "resolved": resolved_b, "ms": ms[b], "speedup_vs_math": speedup,
                         "fwd_gflop_s": fwd_gflop_s, "peak_memory_mb": memory[b],
                         "math_estimate_gb": estimate})  # fmt: skip

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    header = ["tokens", "backend", "fwd ms", "fwd × vs math", "fwd GFLOP/s", "fwd MB", "fwd+bwd ms",
              "fwd+bwd × vs math", "fwd+bwd MB"]  # fmt: skip
    table = []
    for r in rows:
        picks = sorted(set(r["resolved"].values()))
        label = r["backend"] if picks == [r["backend"]] else f"{r['backend']} (→ {' / '.join(picks)}: same run)"
        table.append([
            f"{r['tokens']:,}", label, cell(r["ms"]["fwd"], ".1f"), cell(r["speedup_vs_math"]["fwd"], ".1f"),
            cell(r["fwd_gflop_s"], ".0f"), fmt_mb(r["peak_memory_mb"]["fwd"]), cell(r["ms"]["fwd+bwd"], ".1f"),
            cell(r["speedup_vs_math"]["fwd+bwd"], ".1f"), fmt_mb(r["peak_memory_mb"]["fwd+bwd"]),
        ])  # fmt: skip
    print()
    print(markdown_table(header, table))
    longest = max(cfg.sizes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    out_mb = cfg.batch * cfg.heads * longest * cfg.head_dim * itemsize / 2**20
    print(f"\n— = not run (math's estimated peak over the budget). At {longest:,} tokens the output alone is "
          f"{fmt_mb(out_mb)} MB; forward + backward also keeps q/k/v gradients ({fmt_mb(3 * out_mb)} MB).")  # fmt: skip
    goals = {}
    for r in rows:
        if r["tokens"] != longest or r["backend"] == "math":
            continue
        mem, speed = r["peak_memory_mb"]["fwd"], r["speedup_vs_math"]["fwd"]
        goals[r["backend"]] = {"memory_met": mem < MEMORY_GOAL_MB,
                               "speed_met": None if speed is None else speed >= SPEED_GOAL}  # fmt: skip
        speed_text = (
            "math not run" if speed is None else f"{speed:.1f}× ({'met' if speed >= SPEED_GOAL else 'not met'})"
        )
        print(f"goals at {longest:,} tokens, {r['backend']}: forward memory growth < {MEMORY_GOAL_MB:.0f} MB: "
              f"{fmt_mb(mem)} MB ({'met' if mem < MEMORY_GOAL_MB else 'not met'}); "
              f"≥{SPEED_GOAL:.0f}× faster than math: {speed_text}")  # fmt: skip
    doc = {
        "config": {**dataclasses.asdict(cfg), "dtype": args.dtype, "mode": mode_name,
                   "math_budget_gb": args.math_budget_gb, "layout": "joint (full) self-attention"},
        "goals": {"memory_growth_mb_below": MEMORY_GOAL_MB, "speedup_vs_math": SPEED_GOAL, "at_tokens": longest,
                  "met": goals},
        "rows": rows,
    }  # fmt: skip
    if path := write_results("attention", doc, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
