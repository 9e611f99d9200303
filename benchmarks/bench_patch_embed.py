"""Patch embedding: ditx's matrix product over flattened patches against the strided convolution
it replaces (the same weights, ``PatchTokenizer.proj``), same process, forward and backward.

Shapes of the recipes and examples: DiT-S/2 on 32x32x4 latents (batch 32, 2x2 patches, 384),
the bucketed video recipe's largest bucket (batch 8, 4 x 12 x 8 x 12 latents, tubelets 1x2x2,
192), the example row-band tokenizer (batch 32, 1 x 16 x 16 digits, 1x16 rows, 128). For each,
fp32 and bf16 autocast: the time of one forward + backward and the largest error against the
float64 convolution, relative to its largest value (bf16 rounds at ~4e-3).

    python benchmarks/bench_patch_embed.py            # ~20 s on 2 cores
    python benchmarks/bench_patch_embed.py --quick    # fewer repeats

Writes benchmarks/results/patch_embed.json.
"""

from __future__ import annotations

import contextlib

import torch
from common import alternate, bench_parser, markdown_table, run_mode, write_results

from ditx.tokenizer import PatchTokenizer

SHAPES = {  # name: (batch, channels, spatial sizes, patch, hidden)
    "DiT-S/2, 32x32x4 latents": (32, 4, (32, 32), (2, 2), 384),
    "video bucket 12x32x48, tubelet 1x2x2": (8, 4, (12, 8, 12), (1, 2, 2), 192),
    "row bands 1x16 of 16x16 digits": (32, 1, (16, 16), (1, 16), 128),
}


def candidates(tok: PatchTokenizer, x: torch.Tensor, dtype: torch.dtype):
    """{"matmul (ditx)": fn, "convolution": fn}, each one forward + backward under ``dtype``."""
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def run(embed):
        def step():
            tok.zero_grad(set_to_none=True)
            with autocast:
                out = embed(x)
            out.float().square().mean().backward()
            return out

        return step

    return {
        "matmul (ditx)": run(tok.embed_patches),
        "convolution": run(lambda v: tok.proj(v).flatten(2).transpose(1, 2)),
    }


def main() -> None:
    args = bench_parser(__doc__, "patch_embed", "5 repeats instead of 20").parse_args()
    mode = run_mode(args)
    repeats = {"smoke": 1, "quick": 5, "full": 20}[mode]
    rows, doc = [], {}
    for name, (batch, channels, spatial, patch, hidden) in SHAPES.items():
        if mode == "smoke":
            batch, hidden = 2, 16
        torch.manual_seed(0)
        tok = PatchTokenizer(tuple("abc"[: len(patch)]), patch, in_channels=channels, hidden_size=hidden)
        x = torch.randn(batch, channels, *spatial)
        conv = getattr(torch.nn.functional, f"conv{len(patch)}d")
        with torch.no_grad():
            ref = conv(x.double(), tok.proj.weight.double(), tok.proj.bias.double(), stride=patch)
        ref = ref.flatten(2).transpose(1, 2)
        for dtype in (torch.float32, torch.bfloat16):
            fns = candidates(tok, x, dtype)
            errors = {k: float((fn().detach().double() - ref).abs().max() / ref.abs().max()) for k, fn in fns.items()}
            seconds = alternate(fns, repeats=repeats, warmup=1)
            ms = {k: s * 1e3 for k, s in seconds.items()}
            dt = str(dtype).removeprefix("torch.")
            rows.append([name, dt, f"{ms['matmul (ditx)']:.2f}", f"{ms['convolution']:.2f}",
                         f"{ms['convolution'] / ms['matmul (ditx)']:.2f}x",
                         f"{errors['matmul (ditx)']:.1e}", f"{errors['convolution']:.1e}"])  # fmt: skip
            doc[f"{name} / {dt}"] = {"ms": ms, "relative_error": errors}
    print(f"patch embedding, forward + backward, median of {repeats}")
    header = ["shape", "dtype", "matmul ms", "conv ms", "matmul speed-up", "matmul error", "conv error"]
    print(markdown_table(header, rows))
    write_results("patch_embed", {"repeats": repeats, "results": doc}, args.out)


if __name__ == "__main__":
    main()
