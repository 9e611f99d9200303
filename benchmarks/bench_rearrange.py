"""einops rearrangements (ditx today) against the hand-written reshape/permute they replaced.

ditx's layout grouping (``ditx.dit._group``/``_ungroup``: a block attends over some grid
axes) and DiT's unpatchify (``PatchTokenizer.untokenize``) are written as einops patterns
over the grid's axes. The peer is the previous code, kept here verbatim: the same reshape
and permute calls, computed by hand. Rows: one call of each alone (the Python overhead
einops adds is what can differ; both produce the same memory layout, checked first), and
the whole training step of a video DiT with spatial-temporal blocks (every block
regroups twice), the peer patched in, alternating in one process.

    python benchmarks/bench_rearrange.py            # Latte-S-like: 8 frames x 16 x 16 tokens, batch 4
    python benchmarks/bench_rearrange.py --quick
    python benchmarks/bench_rearrange.py --smoke

Writes benchmarks/results/rearrange.json.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager

import torch
from common import alternate, markdown_table, run_mode, use_ditx_allocator, write_results

import ditx.dit as dit_module
import ditx.tokenizer as tokenizer_module
from ditx import build_dit


# ---- the peer: the hand-written code einops replaced ---------------------------------
def group_by_hand(x, grid, attend):
    b, rest = x.shape[0], x.shape[2:]
    outer = [i for i in range(len(grid)) if i not in attend]
    perm = outer + list(attend)
    x = x.reshape(b, *grid, *rest)
    if perm != sorted(perm):
        x = x.permute(0, *(1 + i for i in perm), *range(1 + len(grid), x.ndim))
    n = math.prod(grid[i] for i in attend)
    return x.reshape(-1, n, *rest)


def ungroup_by_hand(x, grid, attend):
    outer = [i for i in range(len(grid)) if i not in attend]
    perm = outer + list(attend)
    sizes = tuple(grid[i] for i in perm)
    batch = x.shape[0] // math.prod(grid[i] for i in outer)
    d = x.shape[-1]
    x = x.reshape(batch, *sizes, d)
    if perm != sorted(perm):
        inverse = sorted(range(len(perm)), key=perm.__getitem__)
        x = x.permute(0, *(1 + i for i in inverse), len(perm) + 1)
    return x.reshape(batch, -1, d)


def untokenize_by_hand(self, tokens, grid):
    b, n, _ = tokens.shape
    nd = len(grid)
    x = tokens.reshape(b, *grid, *self.patch_size, self.out_channels)
    order = [0, 2 * nd + 1] + [i for k in range(nd) for i in (1 + k, 1 + nd + k)]
    x = x.permute(*order)
    return x.reshape(b, self.out_channels, *(g * p for g, p in zip(grid, self.patch_size)))


@contextmanager
def by_hand():
    saved = dit_module._group, dit_module._ungroup, tokenizer_module.PatchTokenizer.untokenize
    dit_module._group, dit_module._ungroup = group_by_hand, ungroup_by_hand
    tokenizer_module.PatchTokenizer.untokenize = untokenize_by_hand
    try:
        yield
    finally:
        dit_module._group, dit_module._ungroup, tokenizer_module.PatchTokenizer.untokenize = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mode = run_mode(args)
    use_ditx_allocator()
    frames, side, batch, depth, repeats = {"full": (8, 16, 4, 6, 9), "quick": (8, 16, 2, 4, 5),
                                            "smoke": (2, 4, 1, 2, 1)}[mode]  # fmt: skip
    torch.manual_seed(0)
    model = build_dit(tokenizer={"name": "tubelet", "patch_size": [1, 2, 2]}, in_channels=4, depth=depth,
                      hidden_size=384, num_heads=6, layout="spatial-temporal")  # fmt: skip
    grid = (frames, side, side)
    x = torch.randn(batch, 4, frames, 2 * side, 2 * side)
    t = torch.rand(batch) * 999
    tokens = torch.randn(batch, math.prod(grid), 384)
    outputs = torch.randn(batch, math.prod(grid), model.x_embedder.out_channels * model.x_embedder.patch_numel)

    rows, doc = [], {"mode": mode, "grid": list(grid), "batch": batch, "depth": depth, "rows": []}
    checks = {
        "group (height, width)": (lambda f: f(tokens, grid, (1, 2)), dit_module._group, group_by_hand),
        "group (time,)": (lambda f: f(tokens, grid, (0,)), dit_module._group, group_by_hand),
        "ungroup (time,)": (
            lambda f: f(group_by_hand(tokens, grid, (0,)), grid, (0,)), dit_module._ungroup, ungroup_by_hand),
        "untokenize": (
            lambda f: f(model.x_embedder, outputs, grid),
            tokenizer_module.PatchTokenizer.untokenize, untokenize_by_hand),
    }  # fmt: skip
    for name, (call, ours, peer) in checks.items():
        a, b = call(ours), call(peer)
        assert torch.equal(a, b) and a.stride() == b.stride(), f"{name}: einops and the peer differ"
        timed = alternate({"einops": lambda c=call, f=ours: c(f), "by hand": lambda c=call, f=peer: c(f)},
                          repeats=200 * repeats)  # fmt: skip
        rows.append([name, f"{timed['einops'] * 1e6:.1f} µs", f"{timed['by hand'] * 1e6:.1f} µs",
                     f"{timed['by hand'] / timed['einops']:.2f}x"])  # fmt: skip
        doc["rows"].append({"row": name, "einops_s": timed["einops"], "by_hand_s": timed["by hand"]})

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(x, t).float().square().mean()
        loss.backward()

    def step_by_hand():
        with by_hand():
            step()

    timed = alternate({"einops": step, "by hand": step_by_hand}, repeats=repeats)
    name = f"video DiT step (bf16, {depth} blocks, {math.prod(grid)} tokens)"
    rows.append([name, f"{timed['einops'] * 1e3:.1f} ms", f"{timed['by hand'] * 1e3:.1f} ms",
                 f"{timed['by hand'] / timed['einops']:.2f}x"])  # fmt: skip
    doc["rows"].append({"row": name, "einops_s": timed["einops"], "by_hand_s": timed["by hand"]})
    print(markdown_table(["", "ditx (einops)", "previous (reshape/permute by hand)", "speed-up"], rows))
    write_results("rearrange", doc, args.out)


if __name__ == "__main__":
    main()
