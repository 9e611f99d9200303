"""Bucketed video training step: ditx eager against ditx compiled, and clean frames chosen per time
slice against per token, same process.

The model and data shapes of ``recipes/video/moving-digits-buckets.yaml``: a 6-block × 192 DiT
with rotary positions and QK norm over tubelet (1, 2, 2) tokens of 4-channel latents, one step
per bucket in turn (16 × 8×8×8, 12 × 12×8×8, 12 × 8×8×12, 8 × 12×8×12 latents: 2,048-2,304
tokens a step), a third of each batch given its first frame clean, under the recipe's mixed
precision (bf16 autocast where ``ditx.precision`` finds it fast); the rectified-flow loss,
backward and an AdamW step. A call is one step of each bucket; the table gives the mean step.

- eager: ``DiT`` as ``ditx train`` runs it with ``model.compile: false``;
- eager, per-token clean frames: the adaLN values of clean frames chosen token by token,
  (B, N, D), as ditx did before it chose them per time slice, (B, T, 1, D);
- compiled, dynamic shapes: ``compile_blocks()`` (torch.compile's default: after the second
  shape, one graph with symbolic sizes);
- compiled, static shapes: ``compile_blocks(dynamic=False)``, one graph per bucket, what
  ``ditx train`` compiles with ``model.compile: true`` or ``auto``.

The compile column is the first call's time beyond an eager call's (compiling every bucket's
graphs, cold inductor cache unless ``TORCHINDUCTOR_CACHE_DIR`` holds them).

    python benchmarks/bench_bucket_step.py            # ~3 min on 2 cores
    python benchmarks/bench_bucket_step.py --quick    # fewer repeats

Writes benchmarks/results/bucket_step.json.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable

import torch
from common import alternate, bench_parser, markdown_table, run_mode, use_ditx_allocator, write_results

from ditx.build import build_components
from ditx.precision import resolve_precision
from ditx.recipe import load_recipe

RECIPE = "video/moving-digits-buckets"


def bucket_batches(recipe, parts, smoke: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One (latents, labels, frame mask) batch per bucket of the recipe."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for bucket in recipe.data.args["buckets"][: 2 if smoke else None]:
        frames, height, width = bucket["size"]
        b = 2 if smoke else bucket["batch_size"]
        shape = parts.autoencoder.latent_shape((3, frames, height, width))  # (C, T, h, w)
        mask = torch.zeros(b, shape[1], dtype=torch.bool)
        mask[: max(1, b // 3), 0] = True  # image-to-video for a third of the batch
        batches.append((torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g), mask))
    return batches


def make_step(model, objective, batches, dtype) -> Callable[[], None]:
    """One training step (loss, backward, AdamW) on each bucket's batch in turn."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        for x, y, mask in batches:
            with autocast:
                loss = objective.loss(model, x, y=y, model_kwargs={"frame_mask": mask})["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def per_token_clean_frames(model):
    """The model with clean frames' adaLN values chosen token by token: each time slice's flag
    repeated over its tokens, (B, N) instead of (B, T)."""
    by_slice = model._clean_tokens

    def per_token(frame_mask, grid, batch):
        return by_slice(frame_mask, grid, batch).repeat_interleave(grid[1] * grid[2], dim=1)

    model._clean_tokens = per_token
    return model


def main() -> None:
    args = bench_parser(__doc__, "bucket_step", "3 repeats instead of 7").parse_args()
    mode = run_mode(args)
    use_ditx_allocator()
    torch._dynamo.config.recompile_limit = 64  # every bucket's graph, for each compiled candidate

    recipe = load_recipe(RECIPE)
    if mode == "smoke":
        recipe.model.depth, recipe.model.hidden_size, recipe.model.num_heads = 1, 48, 2
    torch.manual_seed(0)
    parts = build_components(recipe)
    base = parts.model.train()
    precision = resolve_precision(recipe.train.mixed_precision, "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    batches = bucket_batches(recipe, parts, mode == "smoke")
    models = {
        "eager": copy.deepcopy(base),
        "eager, per-token clean frames": per_token_clean_frames(copy.deepcopy(base)),
        "compiled, dynamic shapes": copy.deepcopy(base).compile_blocks(),
        "compiled, static shapes": copy.deepcopy(base).compile_blocks(dynamic=False),
    }
    steps = {name: make_step(m, parts.objective, batches, dtype) for name, m in models.items()}
    first = {}
    for name, step in steps.items():  # the first call compiles
        tic = time.perf_counter()
        step()
        first[name] = time.perf_counter() - tic
    repeats = {"smoke": 1, "quick": 3, "full": 7}[mode]
    seconds = alternate(steps, repeats=repeats, warmup=1)
    per_step = {name: s / len(batches) * 1e3 for name, s in seconds.items()}
    eager = per_step["eager"]
    rows = [
        [name, f"{ms:.0f}", f"{eager / ms:.2f}x", f"{max(0.0, first[name] - seconds[name]):.0f} s"]
        for name, ms in per_step.items()
    ]
    print(f"{RECIPE}: {len(batches)} buckets, {precision} ({dtype}), mean of one step per bucket, {repeats} repeats")
    print(markdown_table(["candidate", "ms / step", "speed vs eager", "compile"], rows))
    write_results(
        "bucket_step",
        {"recipe": RECIPE, "precision": precision, "ms_per_step": per_step,
         "first_call_s": first, "repeats": repeats},  # fmt: skip
        args.out,
    )


if __name__ == "__main__":
    main()
