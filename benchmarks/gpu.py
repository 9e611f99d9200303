"""The GPU benchmark: one script, at most 5 minutes on a CUDA machine; a smoke mode on CPU.

Rows (bf16 autocast on CUDA; every row alternates its candidates in the same process, after
warm-up, medians, with the device synchronised around each call):

1. Image training step (forward, MSE loss, backward) at 256 tokens (32x32 latents, patch 2),
   DiT-B/2 and DiT-XL/2: ditx against an official-DiT-style model built here (timm's
   attention as facebookresearch/DiT used it: explicit softmax(q kᵀ) v) and diffusers'
   ``DiTTransformer2DModel``; ditx with ``compile_blocks`` (``model.compile: true``) too.
   Model FLOPs utilisation (MFU): the step's FLOPs (counted once) per second over the bf16
   matmul peak measured in the same run.
2. Video training step at Latte-XL/2 size (28 blocks x 1152, 16 heads, spatial-temporal),
   16 frames of 32x32 latents (4,096 tokens): ditx against diffusers' ``LatteTransformer3DModel``.
3. Attention forward + backward at 4k, 16k and 64k tokens (16 heads x 72): torch SDPA's
   flash kernel, xformers where it runs, the ``math`` reference where its score matrix fits.

    python benchmarks/gpu.py                 # on a CUDA machine: the table, results/gpu.json
    python benchmarks/gpu.py --only attention
    python benchmarks/gpu.py --smoke --out /tmp/gpu.json   # tiny sizes, any device (CI, on CPU)

On CPU without ``--smoke`` it refuses (the sizes are for a GPU; the CPU rows live in the
other scripts). In smoke mode ``compile_blocks`` uses torch.compile's ``eager`` backend,
which exercises the same wrapping without a C++ toolchain or minutes of compilation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import count_flops, markdown_table, write_results  # noqa: E402

from ditx import build_dit  # noqa: E402
from ditx.attention import attention, math_attention, xformers_unavailable_reason  # noqa: E402
from ditx.positions import sincos_nd  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    image: tuple[tuple[str, int, int, int, int], ...]  # (name, depth, width, heads, batch) at 32x32 latents
    latent: int
    video: tuple[int, int, int, int, int]  # frames, latent size, depth, width, heads
    attention_tokens: tuple[int, ...]
    attention_heads: int
    head_dim: int
    repeats: int
    peak_n: int


FULL = Sizes(
    image=(("DiT-B/2", 12, 768, 12, 64), ("DiT-XL/2", 28, 1152, 16, 32)), latent=32,
    video=(16, 32, 28, 1152, 16), attention_tokens=(4096, 16384, 65536), attention_heads=16, head_dim=72,
    repeats=5, peak_n=8192,
)  # fmt: skip
SMOKE = Sizes(
    image=(("tiny/2", 2, 64, 2, 2),), latent=8, video=(2, 8, 2, 64, 2), attention_tokens=(64, 256),
    attention_heads=2, head_dim=16, repeats=1, peak_n=256,
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate_synced(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict:
    """Median seconds per call of each candidate, in turn, after one warm-up call each."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            tic = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(v) for name, v in times.items()}


def bf16_peak_tflops(device: torch.device, n: int) -> float:
    """The best of 10 n x n x n bf16 matrix products, TFLOP/s: what MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = math.inf
    for i in range(13):
        synchronize(device)
        tic = time.perf_counter()
        a @ b
        synchronize(device)
        if i >= 3:
            best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e12


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_step(model: nn.Module, call: Callable[[], torch.Tensor], target: torch.Tensor, device):
    def step() -> None:
        with autocast(device):
            out = call()
        F.mse_loss(out.float(), target).backward()
        model.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------
# the official-DiT-style reference (facebookresearch/DiT models.py with timm's blocks)
# ---------------------------------------------------------------------------------------


class TimmAttention(nn.Module):
    """timm's ``Attention`` as DiT used it: fused qkv, explicit softmax(q kᵀ · scale) v."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=2)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)


class ReferenceDiT(nn.Module):
    """DiT as the official code builds it: conv patch embedding, fixed sin-cos positions, a
    256-wide sinusoidal timestep MLP, a label table with a null class, adaLN-Zero blocks.
    Parameter names are the official ones, so a ditx DiT's state dict loads (and gives the
    same outputs: tests/test_benchmark_tools.py)."""

    def __init__(self, depth: int, dim: int, heads: int, latent: int, patch: int = 2, classes: int = 1000):
        super().__init__()
        self.patch, self.grid = patch, latent // patch
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(4, dim, patch, stride=patch)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_nd(dim, (self.grid, self.grid))).float()[None],
                             persistent=False)  # fmt: skip
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, dim)
        self.blocks = nn.ModuleList(ReferenceBlock(dim, heads) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_layer.linear = nn.Linear(dim, patch * patch * 8)

    def forward(self, x, t, y):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([args.cos(), args.sin()], dim=-1)) + self.y_embedder.embedding_table(y)
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x, c)
        f = self.final_layer
        shift, scale = f.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)
        x = f.linear(f.norm_final(x) * (1 + scale) + shift)  # (B, N, p*p*8)
        b, g, p = x.shape[0], self.grid, self.patch
        return x.view(b, g, g, p, p, 8).permute(0, 5, 1, 3, 2, 4).reshape(b, 8, g * p, g * p)


def diffusers_dit(depth: int, dim: int, heads: int, latent: int):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=4, out_channels=8,
        num_layers=depth, sample_size=latent, patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------


def image_rows(s: Sizes, device, peak: float, smoke: bool) -> list[dict]:
    rows = []
    for spec in s.image:
        rows.append(image_row(spec, s, device, peak, smoke))
        if device.type == "cuda":  # the models of one row are gone before the next is built
            torch.cuda.empty_cache()
    return rows


def image_row(spec: tuple[str, int, int, int, int], s: Sizes, device, peak: float, smoke: bool) -> dict:
    name, depth, dim, heads, batch = spec
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, s.latent, s.latent, generator=g).to(device)
    target = torch.randn(batch, 8, s.latent, s.latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    ours = build_dit(depth=depth, hidden_size=dim, num_heads=heads, patch_size=2, in_channels=4,
                     num_classes=1000).to(device).train()  # fmt: skip
    ref = ReferenceDiT(depth, dim, heads, s.latent).to(device).train()
    peer = diffusers_dit(depth, dim, heads, s.latent).to(device).train()
    compiled = copy.deepcopy(ours).compile_blocks(**({"backend": "eager"} if smoke else {}))
    steps = {
        "ditx": training_step(ours, lambda: ours(x, t, y), target, device),
        "ditx compiled": training_step(compiled, lambda: compiled(x, t, y), target, device),
        "official-style": training_step(ref, lambda: ref(x, t, y), target, device),
        "diffusers": training_step(peer, lambda: peer(x, timestep=t, class_labels=y).sample, target, device),
    }
    tic = time.perf_counter()
    steps["ditx compiled"]()
    synchronize(device)
    compile_s = time.perf_counter() - tic
    flops = count_flops(steps["ditx"])
    med = alternate_synced(steps, s.repeats, device)
    best = min(med["ditx"], med["ditx compiled"])
    return {"model": name, "tokens": (s.latent // 2) ** 2, "batch": batch, "tflop_per_step": flops / 1e12,
            "ms": {c: 1e3 * sec for c, sec in med.items()},
            "mfu": {c: flops / sec / 1e12 / peak for c, sec in med.items()}, "compile_s": compile_s,
            "speedup_vs_official": med["official-style"] / best,
            "speedup_vs_diffusers": med["diffusers"] / best}  # fmt: skip


def video_rows(s: Sizes, device, peak: float) -> list[dict]:
    from bench_video_step import Config, build_ditx, build_peer

    frames, size, depth, dim, heads = s.video
    cfg = Config(frames=frames, size=size, depth=depth, width=dim, heads=heads, repeats=s.repeats)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, frames, size, size, generator=g).to(device)
    target = torch.randn(1, cfg.out_channels, frames, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (1,), generator=g).float().to(device)
    y = torch.randint(0, cfg.num_classes, (1,), generator=g).to(device)
    caption = torch.randn(1, cfg.caption_tokens, cfg.caption_channels, generator=g).to(device)
    torch.manual_seed(0)
    ours = build_ditx(cfg).to(device).train()  # the CPU video benchmark's models, on this device
    peer = build_peer(cfg).to(device).train()
    steps = {
        "ditx": training_step(ours, lambda: ours(x, t, y), target, device),
        "diffusers Latte": training_step(
            peer, lambda: peer(x, timestep=t, encoder_hidden_states=caption).sample, target, device
        ),
    }
    flops = count_flops(steps["ditx"])
    med = alternate_synced(steps, s.repeats, device)
    label = f"{depth // 2} spatial + {depth // 2} temporal blocks x {dim}" + (" (Latte-XL/2)" if s is FULL else "")
    return [{"model": label, "tokens": frames * (size // 2) ** 2,
             "tflop_per_step": flops / 1e12, "ms": {k: 1e3 * v for k, v in med.items()},
             "mfu": {k: flops / v / 1e12 / peak for k, v in med.items()},
             "speedup_vs_peer": med["diffusers Latte"] / med["ditx"]}]  # fmt: skip


def attention_rows(s: Sizes, device) -> list[dict]:
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [attention_row(n, s, device, dtype, free) for n in s.attention_tokens]


def attention_row(n: int, s: Sizes, device, dtype: torch.dtype, free: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s.attention_heads, n, s.head_dim, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))  # fmt: skip
    flops = 4 * n * n * s.head_dim * s.attention_heads * 3.5  # fwd 4 n² d h; bwd 2.5x (recompute included)
    calls: dict[str, Callable[[], object]] = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                attention(q, k, v, backend="sdpa").sum().backward()

        calls["sdpa flash"] = flash
    else:
        calls["sdpa"] = lambda: attention(q, k, v, backend="sdpa").sum().backward()
    if xformers_unavailable_reason(q) is None:
        calls["xformers"] = lambda: attention(q, k, v, backend="xformers").sum().backward()
    # math keeps float32 scores, probabilities and their gradients: about 4 score matrices
    if 4 * 4 * s.attention_heads * n * n < 0.5 * free:
        calls["math"] = lambda: math_attention(q, k, v).sum().backward()
    med = alternate_synced(calls, s.repeats, device)
    return {"tokens": n, "ms": {b: 1e3 * sec for b, sec in med.items()},
            "tflop_s": {b: flops / sec / 1e12 for b, sec in med.items()},
            "xformers": xformers_unavailable_reason(q)}  # fmt: skip


# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the script runs")
    parser.add_argument("--only", nargs="+", choices=("image", "video", "attention"))
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/gpu.json; a smoke run needs it)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("benchmarks/gpu.py needs a CUDA device (its sizes are for a GPU); on CPU run it with --smoke")
    s = SMOKE if args.smoke else FULL
    only = set(args.only or ("image", "video", "attention"))
    started = time.perf_counter()
    peak = bf16_peak_tflops(device, s.peak_n)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; bf16 matmul peak {peak:.1f} TFLOP/s ({s.peak_n}³, best of 10)")
    doc: dict = {"device": name, "bf16_peak_tflops": peak}
    if "image" in only:
        doc["image"] = rows = image_rows(s, device, peak, args.smoke)
        cands = ("ditx", "ditx compiled", "official-style", "diffusers")
        print("\n### Image training step, bf16, 256 tokens\n")
        print(markdown_table(
            ["model", "batch", "TFLOP/step", *[f"{c} ms" for c in cands], *[f"{c} MFU" for c in cands],
             "compile s", "× official", "× diffusers"],
            [[r["model"], r["batch"], f"{r['tflop_per_step']:.3g}", *[f"{r['ms'][c]:.1f}" for c in cands],
              *[f"{r['mfu'][c]:.0%}" for c in cands], f"{r['compile_s']:.0f}", f"{r['speedup_vs_official']:.2f}",
              f"{r['speedup_vs_diffusers']:.2f}"] for r in rows],
        ))  # fmt: skip
    if "video" in only:
        doc["video"] = rows = video_rows(s, device, peak)
        print("\n### Video training step, bf16, spatial-temporal\n")
        print(markdown_table(
            ["model", "tokens", "TFLOP/step", "ditx ms", "Latte ms", "ditx MFU", "Latte MFU", "× Latte"],
            [[r["model"], r["tokens"], f"{r['tflop_per_step']:.3g}", f"{r['ms']['ditx']:.1f}",
              f"{r['ms']['diffusers Latte']:.1f}", f"{r['mfu']['ditx']:.0%}", f"{r['mfu']['diffusers Latte']:.0%}",
              f"{r['speedup_vs_peer']:.2f}"] for r in rows],
        ))  # fmt: skip
    if "attention" in only:
        doc["attention"] = rows = attention_rows(s, device)
        backends = sorted({b for r in rows for b in r["ms"]})
        print(f"\n### Attention forward + backward, {s.attention_heads} heads × {s.head_dim}\n")
        print(markdown_table(
            ["tokens", *[f"{b} ms" for b in backends], *[f"{b} TFLOP/s" for b in backends]],
            [[f"{r['tokens']:,}", *[f"{r['ms'][b]:.2f}" if b in r["ms"] else "—" for b in backends],
              *[f"{r['tflop_s'][b]:.1f}" if b in r["ms"] else "—" for b in backends]] for r in rows],
        ))  # fmt: skip
        if rows[0]["xformers"]:
            print(f"xformers: {rows[0]['xformers']}")
    doc["wall_s"] = time.perf_counter() - started
    print(f"\n{doc['wall_s']:.0f} s in all")
    write_results("gpu", doc, args.out)


if __name__ == "__main__":
    main()
