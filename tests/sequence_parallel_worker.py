"""Run under ``torch.distributed.run --nproc_per_node P`` by tests/test_sequence_parallel.py.

Each process builds the same DiT and inputs, runs them once without parallelism (the
reference) and once split over all processes (``ditx.parallel``), and rank 0 writes the
largest differences of outputs and of gradients (summed over the group) as JSON to
``argv[1]``, one entry per case.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from ditx.dit import DiT
from ditx.parallel import SequenceParallel, enable_sequence_parallel

CASES = {
    # name: (tokenizer spec, input shape (C, *spatial), model kwargs, extras)
    "joint-rope-qknorm-frames": (
        {"name": "tubelet", "in_channels": 3, "out_channels": 3, "patch_size": [1, 2, 2]}, (3, 4, 8, 8),
        dict(layout="joint", position="rope", qk_norm=True, num_classes=5), {"frame_mask": True},
    ),
    "spatial-temporal-sincos-text": (
        {"name": "tubelet", "in_channels": 3, "out_channels": 6, "patch_size": [1, 2, 2]}, (3, 4, 8, 12),
        dict(layout="spatial-temporal", position="sincos", context_dim=16), {"context": True},
    ),
    "spatial-temporal-rope-tubelets": (
        {"name": "tubelet", "in_channels": 4, "out_channels": 4, "patch_size": [2, 2, 2]}, (4, 8, 8, 8),
        dict(layout="spatial-temporal", position="rope", num_classes=3), {},
    ),
    "image-joint": (
        {"name": "patch2d", "in_channels": 4, "out_channels": 8, "patch_size": 2}, (4, 8, 8),
        dict(layout="joint", num_classes=3), {},
    ),
}


def _model(spec, kwargs) -> DiT:
    torch.manual_seed(0)
    model = DiT(dict(spec), depth=3, num_heads=4, hidden_size=64, **kwargs).double()
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give them weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()  # no random label dropout: both runs see the same labels


def _inputs(shape, kwargs, extras, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64) * 999
    inputs = {"x": x, "t": t}
    if kwargs.get("num_classes"):
        inputs["y"] = torch.randint(0, kwargs["num_classes"], (batch,), generator=g)
    if extras.get("context"):
        inputs["context"] = torch.randn(batch, 5, kwargs["context_dim"], generator=g, dtype=torch.float64)
        inputs["context_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    if extras.get("frame_mask"):
        mask = torch.zeros(batch, shape[1], dtype=torch.bool)
        mask[0, 0] = True  # image-to-video on the first sample, interpolation on the second
        mask[1, [0, -1]] = True
        inputs["frame_mask"] = mask
    return inputs


def _run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()  # a loss whose gradient differs at every output
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_exchanges(model, inputs) -> int:
    """All-to-all calls in one forward (2 per block whose attention spans the split axis)."""
    calls, real = [], dist.all_to_all_single

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_to_all_single = counted
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        dist.all_to_all_single = real
    return len(calls)


def main(path: str) -> None:
    dist.init_process_group("gloo")
    sp = SequenceParallel()
    results = {}
    for name, (spec, shape, kwargs, extras) in CASES.items():
        model = _model(spec, kwargs)
        inputs = _inputs(shape, kwargs, extras)
        ref_out, ref_grads = _run(model, inputs)
        enable_sequence_parallel(model, sp)
        out, grads = _run(model, inputs)
        exchanges = _count_exchanges(model, inputs)
        enable_sequence_parallel(model, None)
        for g in grads.values():
            dist.all_reduce(g)  # the group's sum, as data parallel training takes it (times P)
        missing = sorted(set(ref_grads) ^ set(grads))
        results[name] = {
            "output": (out - ref_out).abs().max().item(),
            "output_scale": ref_out.abs().max().item(),
            "grad": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
            "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
            "missing_grads": missing,
            "exchanges": exchanges,
        }
    # a grid whose first axis does not divide over the group is refused with the numbers
    model = _model(*[CASES["image-joint"][i] for i in (0, 2)])
    enable_sequence_parallel(model, sp)
    try:
        model(torch.randn(1, 4, 6 * sp.size + 2, 8, dtype=torch.float64), torch.tensor([3.0]))
        results["indivisible"] = None
    except ValueError as e:
        results["indivisible"] = str(e)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"size": sp.size, "cases": results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
