"""Video training step: ditx's space-time DiT against diffusers' LatteTransformer3DModel, same process.

Config (Latte-S/2-like): 16 frames of 32×32×4 latents, patch (1, 2, 2) -> 16 × 256 = 4,096
tokens, batch 1; 12 blocks of width 384 with 6 heads (64 dims), MLP ratio 4, tanh-GELU;
learned-sigma output (8 channels) on both sides.

- ditx: ``build_dit(tokenizer="tubelet", patch_size=2, layout="spatial-temporal", ...)``:
  even blocks attend within a frame (256 tokens), odd blocks over time (16 tokens);
  class-conditional (101 classes, as the UCF-101 recipe; label dropout 0.1 in training);
  attention backend ``auto`` (sdpa in fp32; eager for ≤512 keys under CPU bf16).
- peer: ``LatteTransformer3DModel(num_layers=6)``, i.e. 6 spatial + 6 temporal blocks,
  interleaved like ditx; input (B, C, T, H, W), output (B, out_channels, T, H, W).
  Latte's settings: ``norm_type="ada_norm_single"`` (PixArt-α: one shared timestep MLP,
  a learned scale-shift table per block), ``activation_fn="gelu-approximate"``,
  ``attention_bias=True``, no norm affine, eps 1e-6. ``cross_attention_dim=None``: no
  cross-attention, so both models do the same work per block (Latte's class-conditional
  UCF-101 model has no cross-attention either). diffusers' Latte has no class labels;
  its forward needs ``encoder_hidden_states``: a dummy (1, 8, 32) caption that only goes
  through the caption projection. Its attention goes through F.scaled_dot_product_attention.

Each row times a training step (forward, MSE loss, backward) of both models in the same
process, alternating, after warm-up (median). FLOPs are counted once per model (fp32 step,
``torch.utils.flop_counter``, with the CPU flash-attention kernels added, which torch's
counter leaves at 0); GFLOP/s and the fraction of the matmul peak (2048³ GEMM in the same
dtype, measured in this run) follow. Peak memory is the resident-memory growth over one
training step after one warm-up step, measured in a fresh child process per candidate
(``--memory-of``), without and (ditx) with gradient checkpointing.

    python benchmarks/bench_video_step.py            # 16 frames, fp32 and bf16 (~2-3 min on 2 cores)
    python benchmarks/bench_video_step.py --quick    # 8 frames (2,048 tokens), fewer repeats (~1 min)

Writes benchmarks/results/video_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    MODE_FLAGS,
    alternate,
    count_flops,
    fmt_mb,
    gemm_ceiling,
    markdown_table,
    matmul_peaks,
    measure_growth,
    peak_memory_mb,
    run_mode,
    use_ditx_allocator,
    write_results,
)

# the goals: ditx faster by these factors (peer time / ditx time), and peak memory at most this × peer's
SPEED_GOALS = {"float32": 1.15, "bfloat16": 2.0}
MEMORY_GOAL = 0.8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Config:
    frames: int
    size: int  # latent height = width
    depth: int  # blocks in total (spatial + temporal)
    width: int
    heads: int
    repeats: int
    patch: int = 2
    in_channels: int = 4
    out_channels: int = 8  # learned sigma
    num_classes: int = 101
    caption_tokens: int = 8
    caption_channels: int = 32

    @property
    def tokens(self) -> int:
        return self.frames * (self.size // self.patch) ** 2


CONFIGS = {
    "full": Config(frames=16, size=32, depth=12, width=384, heads=6, repeats=2),
    "quick": Config(frames=8, size=32, depth=12, width=384, heads=6, repeats=3),
    "smoke": Config(frames=2, size=8, depth=2, width=64, heads=2, repeats=1),
}


def build_ditx(cfg: Config) -> torch.nn.Module:
    from ditx import build_dit

    return build_dit(
        tokenizer="tubelet", in_channels=cfg.in_channels, out_channels=cfg.out_channels, patch_size=cfg.patch,
        depth=cfg.depth, hidden_size=cfg.width, num_heads=cfg.heads, layout="spatial-temporal",
        num_classes=cfg.num_classes,
    )  # fmt: skip


def build_peer(cfg: Config) -> torch.nn.Module:
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.depth // 2, sample_size=cfg.size, patch_size=cfg.patch,
        video_length=cfg.frames, activation_fn="gelu-approximate", norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6,
        cross_attention_dim=None, caption_channels=cfg.caption_channels,
    )  # fmt: skip


def make_step(
    name: str, cfg: Config, dtype: torch.dtype, checkpointing: bool = False
) -> tuple[Callable[[], None], int]:
    """A training-step closure for candidate ``name`` ("ditx" or "peer") and its parameter count."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, cfg.frames, cfg.size, cfg.size, generator=gen)  # (B, C, T, H, W)
    target = torch.randn(1, cfg.out_channels, cfg.frames, cfg.size, cfg.size, generator=gen)
    t = torch.randint(0, 1000, (1,), generator=gen).float()
    torch.manual_seed(0)
    if name == "ditx":
        model = build_ditx(cfg).train()
        y = torch.randint(0, cfg.num_classes, (1,), generator=gen)
        call: Callable[[], torch.Tensor] = lambda: model(x, t, y)
    elif name == "peer":
        model = build_peer(cfg).train()
        caption = torch.randn(1, cfg.caption_tokens, cfg.caption_channels, generator=gen)
        call = lambda: model(x, timestep=t, encoder_hidden_states=caption).sample
    else:
        raise ValueError(f"unknown candidate {name!r}")
    if checkpointing:
        model.enable_gradient_checkpointing()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            out = call()
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def probe_memory(cfg: Config, name: str, dtype: str, checkpointing: bool) -> None:
    """Child-process mode: one warm-up step, then print the resident-memory growth over one step."""
    step, _ = make_step(name, cfg, DTYPES[dtype], checkpointing)
    step()
    print(f"PEAK_MB {measure_growth(step):.1f}")


def goal_cell(value: float, goal: float, higher_is_better: bool) -> str:
    met = value >= goal if higher_is_better else value <= goal
    return f"{'≥' if higher_is_better else '≤'}{goal:.2f}×: {'met' if met else 'not met'} ({value:.2f}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 frames (2,048 tokens), 3 repeats")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/video_step.json)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes, to test the script
    parser.add_argument("--memory-of", choices=("ditx", "peer"), help=argparse.SUPPRESS)  # child-process mode
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = run_mode(args)
    mode_flags = MODE_FLAGS[mode]
    cfg = CONFIGS[mode]
    if args.memory_of:
        probe_memory(cfg, args.memory_of, args.dtype, args.checkpointing)
        return
    use_ditx_allocator()

    print(f"{cfg.frames} frames of {cfg.size}x{cfg.size}x{cfg.in_channels} latents, patch (1, {cfg.patch}, "
          f"{cfg.patch}) -> {cfg.tokens} tokens, batch 1; {cfg.depth} blocks, width {cfg.width}, {cfg.heads} heads; "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    peaks = matmul_peaks()
    print(f"matmul peak (2048^3, this run): fp32 {peaks['float32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s", flush=True)  # fmt: skip
    flops: dict[str, int] = {}
    params: dict[str, int] = {}
    rows = []
    for dtype_name, dtype in DTYPES.items():
        steps = {}
        for name in ("ditx", "peer"):
            steps[name], params[name] = make_step(name, cfg, dtype)
            if name not in flops:  # the same count under autocast
                flops[name] = count_flops(steps[name])
        med = alternate(steps, cfg.repeats, warmup=1)
        gemms = {k: gemm_ceiling(step, repeats=1) for k, step in steps.items()}  # the matmuls alone
        del steps
        script = str(Path(__file__).resolve())
        base = ["--dtype", dtype_name, *mode_flags]
        memory = {
            "ditx": peak_memory_mb(script, ["--memory-of", "ditx", *base]),
            "peer": peak_memory_mb(script, ["--memory-of", "peer", *base]),
            "ditx_checkpointing": peak_memory_mb(script, ["--memory-of", "ditx", "--checkpointing", *base]),
        }
        gflop_s = {k: flops[k] / v / 1e9 for k, v in med.items()}
        rows.append({
            "dtype": dtype_name, "ms_per_step": {k: 1e3 * v for k, v in med.items()},
            "ratio_ditx_over_peer": med["ditx"] / med["peer"], "speedup": med["peer"] / med["ditx"],
            "gflop_s": gflop_s, "peak_fraction": {k: v / peaks[dtype_name] for k, v in gflop_s.items()},
            "gemm_only_ms": {k: 1e3 * g["seconds"] for k, g in gemms.items()},
            "ceiling_peak_fraction": {k: flops[k] / g["seconds"] / 1e9 / peaks[dtype_name] for k, g in gemms.items()},
            "peak_memory_mb": memory, "memory_ratio_ditx_over_peer": memory["ditx"] / memory["peer"],
            "memory_ratio_checkpointing_over_peer": memory["ditx_checkpointing"] / memory["peer"],
        })  # fmt: skip
        print(f"{dtype_name}: ditx {1e3 * med['ditx']:.0f} ms, peer {1e3 * med['peer']:.0f} ms", flush=True)

    print(f"\nGFLOP per step: ditx {flops['ditx'] / 1e9:.1f}, peer {flops['peer'] / 1e9:.1f}; "
          f"params: ditx {params['ditx'] / 1e6:.2f} M, peer {params['peer'] / 1e6:.2f} M\n")  # fmt: skip
    header = ["dtype", "ditx ms/step", "Latte ms/step", "ditx/peer", "speed goal (peer/ditx)", "ditx GFLOP/s",
              "ditx % peak", "peer GFLOP/s", "peer % peak", "ditx MB", "peer MB", "ditx ckpt MB",
              "memory goal (ditx/peer)", "GEMMs alone ms ditx / peer (ceiling % peak)"]  # fmt: skip
    table = []
    for r in rows:
        label = r["dtype"] if r["dtype"] == "float32" else f"{r['dtype']} (autocast)"
        table.append([
            label, f"{r['ms_per_step']['ditx']:.0f}", f"{r['ms_per_step']['peer']:.0f}",
            f"{r['ratio_ditx_over_peer']:.2f}", goal_cell(r["speedup"], SPEED_GOALS[r["dtype"]], True),
            f"{r['gflop_s']['ditx']:.0f}", f"{100 * r['peak_fraction']['ditx']:.0f}%",
            f"{r['gflop_s']['peer']:.0f}", f"{100 * r['peak_fraction']['peer']:.0f}%",
            fmt_mb(r["peak_memory_mb"]["ditx"]), fmt_mb(r["peak_memory_mb"]["peer"]),
            fmt_mb(r["peak_memory_mb"]["ditx_checkpointing"]),
            goal_cell(r["memory_ratio_ditx_over_peer"], MEMORY_GOAL, False),
            f"{r['gemm_only_ms']['ditx']:.0f} / {r['gemm_only_ms']['peer']:.0f} "
            f"({100 * r['ceiling_peak_fraction']['ditx']:.0f}%)",
        ])  # fmt: skip
    print(markdown_table(header, table))
    print(f"\ngoals (issue): ditx ≥{SPEED_GOALS['float32']}× faster in fp32, ≥{SPEED_GOALS['bfloat16']}× in bf16, "
          f"peak memory ≤{MEMORY_GOAL}× the peer's (both without gradient checkpointing)")  # fmt: skip
    doc = {
        "config": {**dataclasses.asdict(cfg), "tokens": cfg.tokens, "batch": 1, "mode": mode},
        "peer": "diffusers.LatteTransformer3DModel (ada_norm_single, no cross-attention)",
        "peaks_gflop_s": peaks, "gflop_per_step": {k: v / 1e9 for k, v in flops.items()}, "params": params,
        "goals": {"speedup": SPEED_GOALS, "memory_ratio": MEMORY_GOAL}, "rows": rows,
    }  # fmt: skip
    if path := write_results("video_step", doc, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
