"""Where a ditx training step spends its time: torch.profiler, self CPU time grouped by kind of op.

The benchmark tables say how fast a step is; this says why. For one model and dtype it
profiles a few training steps (forward, MSE loss, backward, after warm-up) and groups the
operators' self CPU time into matmuls, attention, GELU, normalisation, dtype casts and
layout copies, other elementwise work and the rest, with the top operators of each group.

    python benchmarks/profile_step.py                                # DiT-B/2, 256 tokens, batch 8, bf16 autocast
    python benchmarks/profile_step.py --model DiT-S/2 --dtype float32
    python benchmarks/profile_step.py --video                        # the video row: 16x32x32x4, 12 blocks, 384 wide

Writes benchmarks/results/profile_<model>_<dtype>.json.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from common import markdown_table, write_results
from torch.profiler import ProfilerActivity, profile

from ditx import build_dit

# first matching pattern wins
GROUPS = [
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention|softmax|baddbmm|bmm"),
    ("matmul", r"aten::(mm|addmm|matmul|linear|_convolution|convolution|mkldnn|conv)"),
    ("gelu", r"gelu"),
    ("norm", r"layer_norm|group_norm|native_layer_norm"),
    ("casts and copies", r"aten::(copy_|to|_to_copy|contiguous|clone|cat|stack|_unsafe_view|reshape|permute|"
     r"transpose|t|view|expand|as_strided|unsqueeze|split|chunk|narrow|select|slice)$"),
    ("elementwise", r"aten::(add|add_|mul|mul_|sub|div|addcmul|addcdiv|silu|sigmoid|tanh|pow|exp|neg|fill_|zero_|"
     r"mse_loss|sum|mean|ones_like|zeros_like|where|lerp|sqrt|rsqrt)"),
]  # fmt: skip


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def build_step(args: argparse.Namespace):
    """The training step the benchmark tables time: bench_video_step's or bench_train_step's."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if args.video:
        from bench_video_step import CONFIGS
        from bench_video_step import make_step as video_step

        return video_step("ditx", CONFIGS["full"], dtype)[0]
    from bench_train_step import make_step

    torch.manual_seed(0)
    model = build_dit(args.model, in_channels=4, num_classes=1000).train()
    x = torch.randn(args.batch, 4, args.size, args.size)
    t, y = torch.rand(args.batch) * 999, torch.randint(0, 1000, (args.batch,))
    return make_step(model, lambda m, x, t, y: m(x, t, y), x, t, y, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--video", action="store_true", help="the video row instead of an image preset")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    step = build_step(args)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in prof.key_averages():
        if event.self_cpu_time_total <= 0:
            continue
        group = group_of(event.key)
        totals[group] += event.self_cpu_time_total
        ops[group][event.key] += event.self_cpu_time_total
    whole = sum(totals.values())
    name = "video" if args.video else f"{args.model} {args.size}x{args.size} batch {args.batch}"
    print(f"{name}, {args.dtype}: {whole / 1e3 / args.steps:.0f} ms of operator self time per step")
    rows = []
    for group, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        top = sorted(ops[group].items(), key=lambda kv: -kv[1])[:3]
        rows.append([group, f"{t / 1e3 / args.steps:.1f}", f"{100 * t / whole:.0f}%",
                     ", ".join(f"{k.replace('aten::', '')} {100 * v / whole:.0f}%" for k, v in top)])  # fmt: skip
    print(markdown_table(["group", "ms/step", "share", "top operators (share of the step)"], rows))
    slug = "video" if args.video else f"{args.model.replace('/', '')}_{args.size}"
    doc = {"model": name, "dtype": args.dtype, "ms_per_step": whole / 1e3 / args.steps,
           "groups": {g: {"ms_per_step": t / 1e3 / args.steps, "share": t / whole,
                          "ops": {k: v / whole for k, v in sorted(ops[g].items(), key=lambda kv: -kv[1])[:8]}}
                      for g, t in totals.items()}}  # fmt: skip
    print(f"wrote {write_results(f'profile_{slug}_{args.dtype}', doc)}")


if __name__ == "__main__":
    main()
