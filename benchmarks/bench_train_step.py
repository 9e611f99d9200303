"""Training-step speed: ditx's DiT against diffusers' DiTTransformer2DModel, same sizes, same process.

For each row both models run a training step (forward, MSE loss, backward) on the same
batch, alternating, after warm-up; the table gives the median per-sample time, the ratio
ditx/peer, achieved GFLOP/s (FLOPs counted once with torch.utils.flop_counter, CPU SDPA
included) and the fraction of the matmul peak measured in this run (a large GEMM in the
same dtype). "GEMMs alone" replays the step's own matrix products (same shapes, strides and
dtypes) back to back (``common.gemm_ceiling``): their share of the step, and the % of peak
the step would reach if every other op were free -- the ceiling of this row on this machine.

    python benchmarks/bench_train_step.py            # DiT-S/2, DiT-B/2 (+ compile_blocks in bf16) at 256 tokens,
                                                     # DiT-S/2 at 1,024 (fp32); fp32 and bf16
    python benchmarks/bench_train_step.py --quick    # DiT-S/2 at 256 tokens only, fewer repeats

Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
from common import alternate, count_flops, gemm_ceiling, markdown_table, matmul_peaks, use_ditx_allocator, write_results

from ditx import build_dit
from ditx.dit import DIT_PRESETS


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


FLOPS: dict[tuple, int] = {}


def run_row(
    preset: str, size: int, batch: int, dtype: torch.dtype, repeats: int, compile: bool = False, ceiling: bool = True
) -> dict:
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
    key = (preset, size, batch)
    if key not in FLOPS:  # the same count in either dtype
        FLOPS[key] = count_flops(steps["ditx"])
    flops = FLOPS[key]
    compile_s = None
    if compile:  # what model.compile: true runs: a copy with each block compiled (inductor); compile timed apart
        compiled = copy.deepcopy(ours).compile_blocks()
        steps["ditx compiled"] = make_step(compiled, lambda m, x, t, y: m(x, t, y), x, t, y, dtype)
        tic = time.perf_counter()
        steps["ditx compiled"]()
        compile_s = time.perf_counter() - tic
    med = alternate(steps, repeats, warmup=1)  # alternating, so machine noise hits both
    gemms = gemm_ceiling(steps["ditx"], repeats=1) if ceiling else None  # ditx's own GEMMs alone: the ceiling
    return {
        "preset": preset, "tokens": (size // DIT_PRESETS[preset]["patch_size"]) ** 2, "batch": batch,
        "dtype": str(dtype).replace("torch.", ""), "ms_per_sample": {k: 1e3 * v / batch for k, v in med.items()},
        "ratio_ditx_over_peer": med["ditx"] / med["diffusers"], "gflops_per_step": flops / 1e9,
        "compile_s": compile_s, "gemm_only_ms": 1e3 * gemms["seconds"] if gemms else None,
        "gemm_share": gemms["seconds"] / med["ditx"] if gemms else None,
        "ceiling_gflop_s": flops / gemms["seconds"] / 1e9 if gemms else None,
        "gflop_s": {k: flops / v / 1e9 for k, v in med.items()},
        "params": {"ditx": sum(p.numel() for p in ours.parameters()),
                   "diffusers": sum(p.numel() for p in peer.parameters())},
    }  # fmt: skip


# (preset, latent size, batch, dtypes): the rows; DiT-S/2 at 64×64 latents is 1,024 tokens (fp32 row)
BOTH = (torch.float32, torch.bfloat16)
ROWS = [("DiT-S/2", 32, 8, BOTH), ("DiT-B/2", 32, 8, BOTH), ("DiT-S/2", 64, 2, (torch.float32,))]
GOALS = {  # (speed-up over diffusers, fraction of the matmul peak) per (preset, size, dtype); None: no goal
    ("DiT-S/2", 32, "float32"): (1.15, None), ("DiT-B/2", 32, "float32"): (1.05, 0.80),
    ("DiT-B/2", 32, "bfloat16"): (None, 0.60),
}  # fmt: skip


def goal_text(row: dict) -> str:
    speed, peak = GOALS.get((row["preset"], row["size"], row["dtype"]), (None, None))
    parts = []
    if speed is not None:
        got = 1 / row["ratio_ditx_over_peer"]
        parts.append(f"≥{speed:.2f}× faster: {'met' if got >= speed else 'not met'} ({got:.2f}×)")
    if peak is not None:
        got = max(row["peak_fraction"].get(k, 0) for k in ("ditx", "ditx compiled"))
        parts.append(f"≥{100 * peak:.0f}% peak: {'met' if got >= peak else 'not met'}")
    return "; ".join(parts) or "—"


def ceiling_text(row: dict) -> str:
    if row["gemm_share"] is None:
        return "—"
    return f"{100 * row['gemm_share']:.0f}%, {100 * row['ceiling_peak_fraction']:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="DiT-S/2 at 32×32 only, 2 repeats")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step.json)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate (DiT-B/2 rows)")
    args = parser.parse_args()
    use_ditx_allocator()
    repeats = 2 if args.quick else 3
    peaks = matmul_peaks()
    print(f"matmul peak (2048^3, this run): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s",
          flush=True)  # fmt: skip
    rows = []
    for preset, size, batch, dtypes in ROWS[:1] if args.quick else ROWS:
        for dtype in dtypes:
            # compile where it pays: bf16 (fuses the casts and elementwise chains); in fp32 it gave 2%
            compile = preset == "DiT-B/2" and dtype == torch.bfloat16 and not args.no_compile
            # the GEMM-only ceiling where a row has a goal (it costs about three steps)
            has_goal = (preset, size, str(dtype).replace("torch.", "")) in GOALS
            r = run_row(preset, size, batch, dtype, repeats, compile=compile, ceiling=has_goal or args.quick)
            r["size"] = size
            r["peak_fraction"] = {k: v / peaks[r["dtype"]] for k, v in r["gflop_s"].items()}
            r["ceiling_peak_fraction"] = r["ceiling_gflop_s"] / peaks[r["dtype"]] if r["ceiling_gflop_s"] else None
            rows.append(r)
            print(f"{preset} {size}x{size} {r['dtype']}: ditx/peer {r['ratio_ditx_over_peer']:.2f}", flush=True)
    header = ["model", "dtype", "ditx ms/sample", "diffusers ms/sample", "ditx/peer", "ditx GFLOP/s", "ditx % peak",
              "peer % peak", "ditx compiled ms/sample (% peak; compile s)", "GEMMs alone: share, ceiling % peak",
              "goal (issue 7)"]  # fmt: skip
    table = []
    for r in rows:
        compiled = "—"
        if r["compile_s"] is not None:
            compiled = (f"{r['ms_per_sample']['ditx compiled']:.1f} ({100 * r['peak_fraction']['ditx compiled']:.0f}%; "
                        f"{r['compile_s']:.0f} s)")  # fmt: skip
        table.append([f"{r['preset']} ({r['tokens']} tokens, batch {r['batch']})",
                      r["dtype"] if r["dtype"] == "float32" else "bfloat16 (autocast)",
                      f"{r['ms_per_sample']['ditx']:.1f}", f"{r['ms_per_sample']['diffusers']:.1f}",
                      f"{r['ratio_ditx_over_peer']:.2f}", f"{r['gflop_s']['ditx']:.0f}",
                      f"{100 * r['peak_fraction']['ditx']:.0f}%", f"{100 * r['peak_fraction']['diffusers']:.0f}%",
                      compiled, ceiling_text(r),
                      goal_text(r)])  # fmt: skip
    print(markdown_table(header, table))
    print(f"wrote {write_results('train_step', {'peaks_gflop_s': peaks, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
