"""Sequence parallelism (``ditx.parallel``): per-process memory and step time, SP=2 against SP=1.

One long clip (8 x 32 x 32 = 8,192 tokens by default) through a DiT training step (forward,
loss, backward) with the tokens split over 2 processes (gloo on CPU, 1 thread each) against
the whole clip in 1 process (2 threads): the same machine's cores either way. Each row is
measured in its own ``torch.distributed.run`` launch, started by this script; it prints
them side by side.

Per process:
- activation MB: the tensors autograd saves for backward during the forward (deduplicated by
  storage), what sequence parallelism is meant to cut;
- peak RSS growth MB: the process's high-water mark over the step minus its resident memory
  before the first forward (model, optimizer state and inputs already there);
- step ms: median of the timed steps, after one warm-up step.
Outputs of SP=2 are checked against SP=1 on the same weights (max |diff| printed).

    python benchmarks/bench_sequence_parallel.py            # 8k tokens, joint and spatial-temporal
    python benchmarks/bench_sequence_parallel.py --frames 16 # 16k tokens
    python benchmarks/bench_sequence_parallel.py --quick    # 1k tokens, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _worker(args) -> None:
    import torch
    import torch.distributed as dist
    from common import measure_growth

    from ditx.dit import DiT
    from ditx.parallel import SequenceParallel, enable_sequence_parallel

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = {"name": "tubelet", "in_channels": 4, "out_channels": 4, "patch_size": [1, 2, 2]}
    model = DiT(spec, depth=args.depth, num_heads=6, hidden_size=args.hidden, layout=args.layout,
                position="rope", num_classes=10)  # fmt: skip
    with torch.no_grad():  # weights off adaLN-Zero's identity, so every block computes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if size > 1:
        enable_sequence_parallel(model, SequenceParallel())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.frames, 2 * args.side, 2 * args.side, generator=g)
    t, y = torch.tensor([500.0]), torch.tensor([3])
    target = torch.randn(x.shape, generator=g)

    def step(count_saved: bool = False) -> int:
        saved: dict[int, int] = {}

        def pack(tensor):
            if count_saved:
                storage = tensor.untyped_storage()
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(x, t, y)
        loss = ((out - target) ** 2).mean()
        loss.backward()
        model.zero_grad(set_to_none=False)
        return sum(saved.values())

    activation = 0

    def first_step():
        nonlocal activation
        activation = step(count_saved=True)

    peak_growth = measure_growth(first_step)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    with torch.no_grad():
        out = model(x, t, y)
    stats = torch.tensor([activation / 2**20, peak_growth, statistics.median(times) * 1e3])
    gathered = [torch.zeros_like(stats) for _ in range(size)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        rows = torch.stack(gathered)
        torch.save(out, Path(args.out).with_suffix(".pt"))
        Path(args.out).write_text(json.dumps({
            "activation_mb": rows[:, 0].max().item(), "peak_growth_mb": rows[:, 1].max().item(),
            "step_ms": rows[:, 2].max().item(),
        }))  # fmt: skip
    dist.destroy_process_group()


def _launch(nproc: int, threads: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           __file__, "--worker", "--out", str(out), "--threads", str(threads), "--layout", args.layout,
           "--frames", str(args.frames), "--side", str(args.side), "--depth", str(args.depth),
           "--hidden", str(args.hidden), "--steps", str(args.steps)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="joint")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--side", type=int, default=32, help="tokens along height and width")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 x 16 x 16 tokens, 2 blocks, 1 timed step")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes: checks it runs
    parser.add_argument("--results", help=argparse.SUPPRESS)  # where a smoke run writes its JSON
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    if args.quick:
        args.frames, args.side, args.depth, args.steps = 4, 16, 2, 1
    if args.smoke:
        args.frames, args.side, args.depth, args.hidden, args.steps = 2, 4, 1, 48, 1
    import torch
    from common import markdown_table, write_results

    cores = os.cpu_count() or 2
    results = {}
    layouts = [args.layout] if args.layout != "joint" else ["joint", "spatial-temporal"]
    with tempfile.TemporaryDirectory() as tmp:
        for layout in layouts:
            args.layout = layout
            one = _launch(1, cores, args, Path(tmp) / f"{layout}-1.json")
            two = _launch(2, max(1, cores // 2), args, Path(tmp) / f"{layout}-2.json")
            diff = (torch.load(Path(tmp) / f"{layout}-1.pt") - torch.load(Path(tmp) / f"{layout}-2.pt")).abs().max()
            results[layout] = {"sp1": one, "sp2": two, "max_abs_diff": diff.item()}
    tokens = args.frames * args.side**2
    print(f"\nDiT {args.depth} blocks x {args.hidden}, 6 heads, RoPE, fp32; one clip of {args.frames} x "
          f"{args.side} x {args.side} = {tokens:,} tokens; training step (forward, loss, backward)")  # fmt: skip
    header = ["layout", "SP", "processes x threads", "activation MB / process", "x vs SP=1",
              "peak RSS growth MB / process", "x vs SP=1", "step ms", "outputs max abs diff"]  # fmt: skip
    rows = []
    for layout, r in results.items():
        base = r["sp1"]
        for sp, key, threads in ((1, "sp1", cores), (2, "sp2", max(1, cores // 2))):
            row = r[key]
            rows.append([layout, sp, f"{sp} x {threads}", f"{row['activation_mb']:,.1f}",
                         f"{row['activation_mb'] / base['activation_mb']:.2f}", f"{row['peak_growth_mb']:,.0f}",
                         f"{row['peak_growth_mb'] / max(base['peak_growth_mb'], 1e-9):.2f}", f"{row['step_ms']:,.0f}",
                         "" if sp == 1 else f"{r['max_abs_diff']:.1e}"])  # fmt: skip
    print(markdown_table(header, rows))
    write_results("sequence_parallel", {"tokens": tokens, "depth": args.depth, "hidden": args.hidden,
                                        "results": results}, args.results)  # fmt: skip


if __name__ == "__main__":
    main()
