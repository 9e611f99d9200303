"""CPU allocator: ditx's training step with glibc's default malloc against ``reuse_freed_memory``.

``ditx.cpu_allocator.reuse_freed_memory()`` (called by the ``ditx`` command) makes glibc
keep freed blocks mapped for the next tensor instead of unmapping them (see that module).
An allocator setting holds for a whole process, so each candidate runs in its own child
process; the children alternate (default, reuse, default, reuse, ...) and the table gives
the median per-step time, the minor page faults per step (``getrusage``: each is a fresh
4 KB page the kernel zeroes before an op can write it) and the child's peak RSS.

    python benchmarks/bench_allocator.py            # DiT-B/2 (256 tokens, batch 8), fp32 and bf16, 2 children each
    python benchmarks/bench_allocator.py --quick    # DiT-S/2

Writes benchmarks/results/allocator.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import markdown_table, peak_rss_mb, run_mode, write_results

MODES = ("default", "reuse")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def child(preset: str, dtype: str, mode: str, steps: int, depth: int | None) -> dict:
    """In this process: set the allocator, warm up, time ``steps`` training steps of ditx's DiT."""
    from bench_train_step import make_step

    from ditx import build_dit
    from ditx.cpu_allocator import reuse_freed_memory

    applied = reuse_freed_memory(mode == "reuse")
    torch.manual_seed(0)
    x, t, y = torch.randn(8, 4, 32, 32), torch.randint(0, 1000, (8,)).float(), torch.randint(0, 1000, (8,))
    extra = {} if depth is None else {"depth": depth}
    model = build_dit(preset, in_channels=4, num_classes=1000, **extra).train()
    step = make_step(model, lambda m, x, t, y: m(x, t, y), x, t, y, DTYPES[dtype])
    for _ in range(2):
        step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"applied": applied, "step_s": statistics.median(times), "faults_per_step": statistics.median(faults),
            "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="DiT-S/2")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # S/2 depth 2, 1 child each
    parser.add_argument("--children", type=int, default=None, help="child processes per candidate (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=4, metavar=("PRESET", "DTYPE", "MODE", "DEPTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        preset, dtype, mode, depth = args.child
        result = child(preset, dtype, mode, args.steps, None if depth == "-" else int(depth))
        print("RESULT " + json.dumps(result))
        return

    preset = "DiT-B/2" if run_mode(args) == "full" else "DiT-S/2"
    depth = 2 if args.smoke else None
    children = args.children or (1 if args.smoke else 2)
    tic = time.perf_counter()
    rows = []
    for dtype in DTYPES:
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(children):
            for mode in MODES:  # alternating children, so machine noise hits both alike
                command = [sys.executable, str(Path(__file__)), "--steps", str(args.steps),
                           "--child", preset, dtype, mode, "-" if depth is None else str(depth)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"child {' '.join(command[2:])} failed:\n{done.stderr[-2000:]}")
                runs[mode].append(json.loads(lines[-1][len("RESULT ") :]))
        med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("step_s", "faults_per_step", "peak_rss_mb")}
               for m in MODES}  # fmt: skip
        rows.append({"dtype": dtype, "runs": runs, "median": med,
                     "applied": all(r["applied"] for r in runs["reuse"]),
                     "speedup_reuse": med["default"]["step_s"] / med["reuse"]["step_s"]})  # fmt: skip

    model = preset if depth is None else f"{preset} depth {depth}"
    print(f"{model}, 256 tokens, batch 8, training step (fwd + loss + bwd); median over {children} child process(es) "
          f"of the median of {args.steps} steps each")  # fmt: skip
    header = ["dtype", "default ms", "reuse ms", "speed-up", "default faults/step", "reuse faults/step",
              "default peak MB", "reuse peak MB"]  # fmt: skip
    table = [
        [r["dtype"], f"{1000 * r['median']['default']['step_s']:.0f}", f"{1000 * r['median']['reuse']['step_s']:.0f}",
         f"{r['speedup_reuse']:.2f}×" + ("" if r["applied"] else " (not applied: not glibc)"),
         f"{r['median']['default']['faults_per_step']:,.0f}", f"{r['median']['reuse']['faults_per_step']:,.0f}",
         f"{r['median']['default']['peak_rss_mb']:,.0f}", f"{r['median']['reuse']['peak_rss_mb']:,.0f}"]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(header, table))
    doc = {"config": {"preset": preset, "depth": depth, "tokens": 256, "batch": 8, "children": children,
                      "steps": args.steps, "mode": run_mode(args)},
           "rows": rows, "wall_s": time.perf_counter() - tic}  # fmt: skip
    if path := write_results("allocator", doc, args.out):
        print(f"wrote {path} ({doc['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
