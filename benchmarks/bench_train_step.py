"""Training-step speed: ditx's DiT against diffusers' DiTTransformer2DModel, same sizes, same process.

For each row both models run a training step (forward, MSE loss, backward) on the same
batch, alternating, after warm-up; the table gives the median per-sample time, the ratio
ditx/peer, achieved GFLOP/s (FLOPs counted once with torch.utils.flop_counter) and the
fraction of the matmul peak measured in this run (a large GEMM in the same dtype).

    python benchmarks/bench_train_step.py            # DiT-S/2 and DiT-B/2, fp32 and bf16
    python benchmarks/bench_train_step.py --quick    # DiT-S/2 only, fewer repeats

Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ditx import build_dit
from ditx.dit import DIT_PRESETS


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n×n×n matrix product in ``dtype`` (median of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / statistics.median(times) / 1e9


def diffusers_dit(preset: str, size: int):
    from diffusers import DiTTransformer2DModel

    spec = DIT_PRESETS[preset]
    heads = spec["num_heads"]
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=spec["hidden_size"] // heads, in_channels=4, out_channels=8,
        num_layers=spec["depth"], sample_size=size, patch_size=spec["patch_size"], num_embeds_ada_norm=1000,
    )  # fmt: skip


def make_step(model, call, x, t, y, dtype):
    target = torch.randn(x.shape[0], 8, *x.shape[2:])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()

    def step():
        with autocast:
            out = call(model, x, t, y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def run_row(preset: str, size: int, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 4, size, size)
    t = torch.randint(0, 1000, (batch,)).float()
    y = torch.randint(0, 1000, (batch,))
    ours = build_dit(preset, in_channels=4, num_classes=1000).train()
    peer = diffusers_dit(preset, size).train()
    steps = {
        "ditx": make_step(ours, lambda m, x, t, y: m(x, t, y), x, t, y, dtype),
        "diffusers": make_step(peer, lambda m, x, t, y: m(x, timestep=t, class_labels=y).sample, x, t, y, dtype),
    }
    with FlopCounterMode(display=False) as counter:
        steps["ditx"]()
    flops = counter.get_total_flops()
    for fn in steps.values():  # warm-up
        fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):  # alternating, so machine noise hits both
        for name, fn in steps.items():
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "preset": preset, "tokens": (size // DIT_PRESETS[preset]["patch_size"]) ** 2, "batch": batch,
        "dtype": str(dtype).replace("torch.", ""), "ms_per_sample": {k: 1e3 * v / batch for k, v in med.items()},
        "ratio_ditx_over_peer": med["ditx"] / med["diffusers"], "gflops_per_step": flops / 1e9,
        "gflop_s": {k: flops / v / 1e9 for k, v in med.items()},
        "params": {"ditx": sum(p.numel() for p in ours.parameters()),
                   "diffusers": sum(p.numel() for p in peer.parameters())},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="DiT-S/2 only, 3 repeats")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    presets = ["DiT-S/2"] if args.quick else ["DiT-S/2", "DiT-B/2"]
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    rows = []
    for preset in presets:
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(run_row(preset, 32, 8, dtype, repeats))
            r = rows[-1]
            r["peak_fraction"] = {k: v / peaks[r["dtype"]] for k, v in r["gflop_s"].items()}
    print(f"matmul peak (2048^3, this run): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    print("| model | dtype | ditx ms/sample | diffusers ms/sample | ditx/peer | ditx GFLOP/s | ditx % peak "
          "| peer % peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['preset']} ({r['tokens']} tokens, batch {r['batch']}) | {r['dtype']} | "
              f"{r['ms_per_sample']['ditx']:.1f} | {r['ms_per_sample']['diffusers']:.1f} | "
              f"{r['ratio_ditx_over_peer']:.2f} | {r['gflop_s']['ditx']:.0f} | "
              f"{100 * r['peak_fraction']['ditx']:.0f}% | {100 * r['peak_fraction']['diffusers']:.0f}% |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "peaks_gflop_s": peaks, "rows": rows}  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
