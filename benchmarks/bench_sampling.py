"""Sampling speed: ditx's sampler against diffusers' DiTPipeline, same weights, same VAE, same process.

What one call does, on each side: 50-step DDIM (eta 0) with classifier-free guidance at scale
4.0 (DiT's and DiTPipeline's default), cond and uncond batched into one forward per step, for
a batch of 16 class labels (0..15) on DiT-S/2 over 32×32×4 latents (256 tokens), 1000 classes,
learned sigma (8 output channels), then decoding the latents to 256×256 images with one tiny
diffusers ``AutoencoderKL`` (block_out_channels [32, 64, 64, 64], f = 8, random weights).

- ditx: ``ditx.generation.generate``, the path of ``ditx sample`` and training previews
  (``ditx.diffusion.sample`` with the ``ddpm`` objective's DDIM scheduler, then the ``sd-vae``
  autoencoder's ``decode``); bf16 rows set the recipe's ``train.mixed_precision: bf16``, which
  wraps sampling and decoding in CPU autocast.
- peer: ``DiTPipeline(transformer=DiTTransformer2DModel, vae=<the same AutoencoderKL object>,
  scheduler=DDIMScheduler)`` with ``output_type="pt"``; bf16 rows wrap the call in the same
  autocast. Its scheduler is built from the config of ditx's (linear betas, "trailing"
  spacing, no clipping), so both visit the same timesteps.

Same weights: ditx's DiT is initialised randomly (with the adaLN-Zero and final layers made
non-zero, so outputs are not trivially 0) and mapped into diffusers' key layout
(``to_diffusers``: qkv split into to_q/to_k/to_v, the one timestep/label embedder copied
into every block, as diffusers' convert_dit_to_diffusers.py does from the official layout).
The diffusers model is built with ``norm_eps=1e-6`` (official DiT's value) and its timestep
embedders' ``downscale_freq_shift`` is set to 0: stock diffusers spaces the sinusoid
frequencies by 1/127 instead of the official 1/128, a different function at the same cost.
Every run first checks one fp32 forward of both transformers on the same input (max abs
difference < 1e-4) and a 2-step sampling run of both pipelines from the same noise.

Timing: a 2-step warm-up call of each candidate, then the calls alternating
(``common.alternate``), median per candidate. By default the 50-step call is not run whole:
a call costs ``fixed + steps × per_step`` (every DDIM step is the same guided forward on
the same batch; ``fixed`` is noise, set-up and the VAE decode), so 6-step and 1-step calls
are timed and the 50-step time is ``T(6) + 44 × (T(6) − T(1)) / 5`` per candidate
(``--timed-steps 0`` times whole 50-step calls instead; on 2026-11-26 the two agreed within
a few percent, see benchmarks/README.md). The table gives samples/s and the speed-up
ditx ÷ diffusers in samples/s (> 1: ditx faster), against the goal ≥ 1.2×, and the
transformer's FLOPs (counted once with torch.utils.flop_counter) per second as a fraction of
the matmul peak measured in this run.

    python benchmarks/bench_sampling.py              # batch 16, 50 steps from 6- and 1-step calls (~1.5 min)
    python benchmarks/bench_sampling.py --timed-steps 0             # whole 50-step calls, 1 each (~5 min)
    python benchmarks/bench_sampling.py --timed-steps 0 --repeats 3 # the same, median of 3 (~14 min on 2 cores)
    python benchmarks/bench_sampling.py --quick      # batch 4, 10 steps, median of 2 (< 1 min)

The full configuration is ~1.1 TFLOP of transformer work per sample (50 steps × 2 forwards),
~17 TFLOP per call: about 100 s per fp32 call and 40 s per bf16 call on 2 idle cores, hence
the extrapolation from shorter calls by default.
Writes benchmarks/results/sampling.json (``--quick``: sampling_quick.json).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from types import SimpleNamespace
from typing import Any

import torch
from common import (
    alternate,
    count_flops,
    markdown_table,
    matmul_peak,
    matmul_peaks,
    run_mode,
    use_ditx_allocator,
    write_results,
)
from torch import Tensor, nn

from ditx import build_dit
from ditx.diffusion import DDPMObjective
from ditx.dit import DIT_PRESETS, DiT
from ditx.generation import generate
from ditx.recipe import SampleConfig

PRESET = "DiT-S/2"
LATENT = (4, 32, 32)
NUM_CLASSES = 1000
GUIDANCE = 4.0
GOAL = 1.2
VAE_CONFIG: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64],  # f = 8: 32×32 latent -> 256×256 image
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_ditx(depth: int | None) -> DiT:
    """ditx's DiT-S/2 (learned sigma, 1000 classes) with random weights, none of them zero."""
    torch.manual_seed(0)
    extra = {} if depth is None else {"depth": depth}
    model = build_dit(PRESET, in_channels=LATENT[0], num_classes=NUM_CLASSES, **extra)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # adaLN-Zero modulations and the final linear start at 0
                p.normal_(0.0, 0.02)
    return model.eval()


def to_diffusers(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """ditx (= official DiT minus pos_embed) keys -> diffusers ``DiTTransformer2DModel`` keys."""
    out = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": state["final_layer.linear.weight"],
        "proj_out_2.bias": state["final_layer.linear.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."  # diffusers keeps a copy of the condition embedders in every block
        for kind in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{kind}"] = state[f"t_embedder.mlp.0.{kind}"]
            out[emb + f"timestep_embedder.linear_2.{kind}"] = state[f"t_embedder.mlp.2.{kind}"]
            q, k, v = state[src + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[dst + f"attn1.to_q.{kind}"], out[dst + f"attn1.to_k.{kind}"], out[dst + f"attn1.to_v.{kind}"] = q, k, v
            out[dst + f"attn1.to_out.0.{kind}"] = state[src + f"attn.proj.{kind}"]
            out[dst + f"ff.net.0.proj.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"ff.net.2.{kind}"] = state[src + f"mlp.fc2.{kind}"]
            out[dst + f"norm1.linear.{kind}"] = state[src + f"adaLN_modulation.1.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    return {k: v.clone() for k, v in out.items()}


def make_peer(ours: DiT) -> nn.Module:
    """diffusers' DiTTransformer2DModel with the same architecture, ``ours``' weights and official timesteps."""
    from diffusers import DiTTransformer2DModel

    depth, heads = len(ours.blocks), ours.num_heads
    peer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=ours.hidden_size // heads, in_channels=LATENT[0],
        out_channels=ours.out_channels, num_layers=depth, sample_size=LATENT[1],
        patch_size=DIT_PRESETS[PRESET]["patch_size"], num_embeds_ada_norm=NUM_CLASSES, norm_eps=1e-6,
    )  # fmt: skip
    peer.load_state_dict(to_diffusers(ours.state_dict(), depth), strict=True)
    set_timestep_shift(peer, 0)
    return peer.eval()  # eval: in train mode its label embedder drops labels at random


def set_timestep_shift(peer: nn.Module, shift: int) -> None:
    """Sinusoid frequencies exp(-ln(1e4)·i/(128 - shift)): 0 as official DiT and ditx, 1 stock diffusers."""
    for block in peer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


class Candidates:
    """Both samplers over shared models; ``run(name, dtype, batch, steps)`` -> images in [0, 1]."""

    def __init__(self, depth: int | None):
        from diffusers import DDIMScheduler, DiTPipeline
        from ditx.modalities.image.autoencoder import SDVAE

        self.model = make_ditx(depth)
        self.peer = make_peer(self.model)
        self.objective = DDPMObjective()  # ε with learned Σ, DiT's linear schedule
        self.vae = SDVAE(config=VAE_CONFIG)  # ditx's sd-vae autoencoder around one AutoencoderKL
        ddim = self.objective.make_scheduler("ddim", 50)
        self.pipe = DiTPipeline(
            transformer=self.peer, vae=self.vae.vae, scheduler=DDIMScheduler.from_config(ddim.config)
        )
        self.pipe.set_progress_bar_config(disable=True)

    def ditx(self, dtype: str, batch: int, steps: int) -> Tensor:
        config = SampleConfig(scheduler="ddim", num_steps=steps, guidance_scale=GUIDANCE, batch_size=batch, seed=0)
        train = SimpleNamespace(mixed_precision="bf16" if dtype == "bfloat16" else "no")  # generate's autocast
        parts = SimpleNamespace(
            recipe=SimpleNamespace(sample=config, train=train),
            objective=self.objective,
            autoencoder=self.vae,
            latent_shape=LATENT,
            num_classes=NUM_CLASSES,
        )
        x, _ = generate(parts, self.model, batch, "cpu", config=config)
        return (x / 2 + 0.5).clamp(0, 1)  # what DiTPipeline returns

    def diffusers(self, dtype: str, batch: int, steps: int) -> Tensor:
        with autocast(dtype):
            out = self.pipe(
                class_labels=list(range(batch)), guidance_scale=GUIDANCE, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="pt",
            )  # fmt: skip
        return out.images

    def run(self, name: str, dtype: str, batch: int, steps: int) -> Tensor:
        return getattr(self, name)(dtype, batch, steps)


@torch.no_grad()
def check_same(c: Candidates) -> dict[str, float]:
    """fp32 agreement of the two transformers and of 2-step sampling from the same noise."""
    torch.manual_seed(1)
    x = torch.randn(4, *LATENT)
    t = torch.tensor([999, 500, 20, 0])
    y = torch.tensor([3, 999, NUM_CLASSES, 7])  # NUM_CLASSES: the null class
    ours = c.model(x, t.float(), y)
    diff = (c.peer(x, timestep=t, class_labels=y).sample - ours).abs().max().item()
    set_timestep_shift(c.peer, 1)
    stock = (c.peer(x, timestep=t, class_labels=y).sample - ours).abs().max().item()
    set_timestep_shift(c.peer, 0)
    a, b = c.run("ditx", "float32", 2, 2), c.run("diffusers", "float32", 2, 2)
    doc = {"forward_max_abs_diff": diff, "forward_max_abs_diff_stock_diffusers_timesteps": stock,
           "forward_output_std": ours.std().item(),
           "sample_2step_max_abs_diff": (a - b).abs().max().item(),
           "sample_2step_unclamped_fraction": ((b > 0) & (b < 1)).float().mean().item()}  # fmt: skip
    print(f"same weights: forward max |ditx - diffusers| = {diff:.2e} (output std {doc['forward_output_std']:.3f}; "
          f"{stock:.2e} with stock diffusers timestep frequencies); 2-step images max |diff| = "
          f"{doc['sample_2step_max_abs_diff']:.2e} ({100 * doc['sample_2step_unclamped_fraction']:.0f}% of "
          "pixels inside (0, 1))")  # fmt: skip
    if not diff < 1e-4:
        raise SystemExit(f"the transformers disagree (max abs diff {diff:.3g} >= 1e-4): the weight mapping is wrong")
    if not doc["sample_2step_max_abs_diff"] < 1e-2:
        raise SystemExit("the two samplers disagree on the same noise: they do not compute the same thing")
    return doc


def transformer_flops(model: DiT) -> float:
    """FLOPs of one guided step for one sample (a forward on [cond, uncond])."""
    with torch.no_grad():
        return float(count_flops(lambda: model(torch.randn(2, *LATENT), torch.full((2,), 500.0),
                                               torch.tensor([0, NUM_CLASSES]))))  # fmt: skip


def time_calls(c: Candidates, dtype: str, batch: int, steps: int, timed: int, repeats: int):
    """Seconds per ``steps``-step call of each candidate, and the calls actually timed.

    ``timed`` = 0: whole calls. Otherwise ``timed``- and 1-step calls, alternating, and
    ``T(steps) = T(timed) + (steps - timed) * (T(timed) - T(1)) / (timed - 1)``.
    """
    names = ("ditx", "diffusers")
    if not timed:
        calls = {n: (lambda n=n: c.run(n, dtype, batch, steps)) for n in names}
        med = alternate(calls, repeats, warmup=0)
        return med, {f"{n} {steps} steps": s for n, s in med.items()}
    calls = {f"{n} {k} steps": (lambda n=n, k=k: c.run(n, dtype, batch, k)) for n in names for k in (timed, 1)}
    measured = alternate(calls, repeats, warmup=0)
    med = {n: extrapolate(measured[f"{n} {timed} steps"], measured[f"{n} 1 steps"], timed, steps) for n in names}
    return med, measured


def extrapolate(t_timed: float, t_one: float, timed: int, steps: int) -> float:
    """Seconds of a ``steps``-step call from a ``timed``-step and a 1-step call, as ``fixed + k × per_step``."""
    per_step = (t_timed - t_one) / (timed - 1)
    return t_timed + (steps - timed) * per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, 10 steps, median of 2")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # depth 2, batch 2, 2 steps
    parser.add_argument("--batch", type=int, default=None, help="samples per call (default 16; --quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per candidate (default 1; --quick 2)")
    parser.add_argument(
        "--timed-steps",
        type=int,
        default=None,
        help="time calls of this many steps and of 1 step and extrapolate to --steps "
        "(default 6 for the full run; 0: time whole --steps calls)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--out", default=None, help="results JSON (default results/sampling[_quick].json)")
    args = parser.parse_args()
    use_ditx_allocator()
    if args.smoke:
        depth, batch, steps, repeats = 2, 2, 2, 1
    elif args.quick:
        depth, batch, steps, repeats = None, 4, 10, 2
    else:
        depth, batch, steps, repeats = None, 16, 50, 1
    batch, steps, repeats = args.batch or batch, args.steps or steps, args.repeats or repeats
    timed = (6 if not (args.smoke or args.quick) else 0) if args.timed_steps is None else args.timed_steps
    timed = timed if 1 < timed < steps else 0  # 0: whole calls

    tic = time.perf_counter()
    if args.smoke:
        peaks = {name: matmul_peak(dt, n=512) for name, dt in DTYPES.items()}
    else:
        peaks = matmul_peaks()
    c = Candidates(depth)
    check = check_same(c)
    flops = transformer_flops(c.model) * steps * batch  # per call
    rows = []
    for dtype in args.dtypes:
        for name in ("ditx", "diffusers"):  # warm-up: same shapes, 2 steps
            c.run(name, dtype, batch, 2)
        med, measured = time_calls(c, dtype, batch, steps, timed, repeats)
        sps = {n: batch / s for n, s in med.items()}
        rows.append({
            "dtype": dtype, "seconds_per_call": med, "measured_calls_s": measured, "samples_per_s": sps,
            "speedup_ditx_over_peer": sps["ditx"] / sps["diffusers"],
            "transformer_gflop_s": {n: flops / s / 1e9 for n, s in med.items()},
            "peak_fraction": {n: flops / s / 1e9 / peaks[dtype] for n, s in med.items()},
        })  # fmt: skip

    tokens = (LATENT[1] // DIT_PRESETS[PRESET]["patch_size"]) ** 2
    model_name = PRESET if depth is None else f"{PRESET} depth {depth}"
    config = f"{model_name}, {tokens} tokens, batch {batch}, DDIM {steps} steps, CFG {GUIDANCE}"
    print(f"matmul peak (this run): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    how = (
        f"median of {repeats} call(s)"
        if not timed
        else (f"{steps}-step time from {timed}- and 1-step calls (median of {repeats}): fixed + {steps} × per step")
    )
    print(f"speed-up = ditx samples/s ÷ diffusers samples/s (> 1: ditx faster); {how}")
    header = ["config", "dtype", "ditx samples/s", "diffusers samples/s", "speed-up (ditx ÷ peer)", "goal",
              "ditx % peak", "peer % peak"]  # fmt: skip
    table = [
        [config, r["dtype"] + (" (autocast)" if r["dtype"] == "bfloat16" else ""),
         f"{r['samples_per_s']['ditx']:.3f}", f"{r['samples_per_s']['diffusers']:.3f}",
         f"{r['speedup_ditx_over_peer']:.2f}×",
         f"≥{GOAL}× ({'met' if r['speedup_ditx_over_peer'] >= GOAL else 'not met'})",
         f"{100 * r['peak_fraction']['ditx']:.0f}%", f"{100 * r['peak_fraction']['diffusers']:.0f}%"]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(header, table))
    doc = {
        "config": {"preset": PRESET, "depth": len(c.model.blocks), "latent": list(LATENT), "tokens": tokens,
                   "num_classes": NUM_CLASSES, "learn_sigma": True, "batch": batch, "scheduler": "ddim",
                   "steps": steps, "timed_steps": timed or steps, "guidance_scale": GUIDANCE, "vae": VAE_CONFIG,
                   "repeats": repeats,
                   "mode": run_mode(args)},
        "goal_speedup": GOAL, "peaks_gflop_s": peaks, "same_weights_check": check,
        "transformer_gflop_per_call": flops / 1e9, "rows": rows, "wall_s": time.perf_counter() - tic,
    }  # fmt: skip
    if path := write_results("sampling", doc, args.out):
        print(f"wrote {path} ({doc['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
