"""Quality against network evaluations: every sampler of a trained run at several step counts,
with guidance at every step or only over an interval of noise levels, and the fewest
evaluations that keep the 50-step quality; then ditx at that default against diffusers'
DiTPipeline at 50-step DDIM with classifier-free guidance.

Each row is ``ditx eval RUN sample.scheduler=S sample.num_steps=N [sample.guidance_interval=[lo,hi]]``
(``ditx.evaluate.evaluate_run``, the recipe's own eval: its metric, sample count, labels and
seed), so any row can be reproduced from the command line. Network evaluations (NFE) are per
sample as the sampler counts them: a guided step is 2 (its conditional and unconditional
rows), an unguided one 1; Heun takes 2 a step but 1 on the last.

"Keeps the 50-step quality": every quality metric of the recipe (digits: FID on the digits
classifier's features and class accuracy; moving-digits: FVD on the clip classifier's
features, frame accuracy, clip consistency) within a tolerance of the reference row (the
objective's first-order solver, DDIM or flow Euler, at 50 steps,
guidance at every step). The tolerance is measured, not
chosen: twice the difference between the reference at eval seeds 0 and 1 (the spread of the
numbers when only the noise changes), with a floor of 0.005 for accuracies and 5% for
Fréchet distances.

The DiTPipeline row (``--peer``): a run trained with the ``ddpm`` objective (DiT's ε with
learned Σ, which DiTPipeline samples) has its EMA weights mapped into diffusers'
``DiTTransformer2DModel`` (the mapping of bench_sampling.py, checked on one forward); DiTPipeline
samples it with 50-step DDIM at the recipe's guidance scale, labels i mod 10, scored by the
same metric as the ditx rows. The ditx side is the fewest-evaluations row of each run given
(the ``ddpm`` run itself: same weights; a rectified-flow run: ditx's recipe default).
Samples/s is generation alone (noise to decoded samples, batches of the recipe's
eval.batch_size), not scoring. Quality is matched by the metrics in the same table: the
ditx row counts only if each metric is within the tolerance floors above of the DiTPipeline
row's (a Fréchet distance at most 5% higher, an accuracy at most 0.005 lower) or better.

    ditx train image/digits --run-dir runs/digits                       # rectified flow (the recipe)
    ditx train image/digits objective.name=ddpm sample.scheduler=unipc sample.num_steps=8 \
        sample.guidance_interval=null --run-dir runs/digits-ddpm
    ditx train video/moving-digits --run-dir runs/moving-digits
    python benchmarks/bench_steps.py runs/digits runs/moving-digits     # quality vs NFE tables
    python benchmarks/bench_steps.py runs/digits-ddpm --peer runs/digits-ddpm --also runs/digits
    python benchmarks/bench_steps.py RUN --steps 4 8 --schedulers flow-unipc --intervals none  # a subset

Writes benchmarks/results/steps_<recipe>.json per run and steps_peer.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, write_results

from ditx.build import build_metric, load_for_sampling, reference_dataset
from ditx.diffusion.objectives import FLOW_SCHEDULERS
from ditx.evaluate import evaluate_run
from ditx.generation import generate

STEPS = [4, 6, 8, 12, 16, 25]
REFERENCE_STEPS = 50
INTERVALS = ["none", "0.0,0.8", "0.2,1.0", "0.2,0.8"]  # noise levels: σ (flow), t/1000 (DDPM)
# (key, better): the quality metrics each recipe's eval reports
QUALITY = {
    "digits": [("fid", "lower"), ("class_accuracy", "higher")],
    "moving-digits": [("fvd_digits", "lower"), ("frame_accuracy", "higher"), ("clip_consistency", "higher")],
}


def deterministic_schedulers(objective_name: str) -> list[str]:
    """The ODE solvers for an objective: DDIM, DPM-Solver++ 2M, UniPC / flow Euler, Heun, DPM-Solver++, UniPC."""
    if objective_name == "rectified-flow":
        return list(FLOW_SCHEDULERS)
    return ["ddim", "dpm-solver++", "unipc"]


def parse_interval(text: str) -> list[float] | None:
    return None if text == "none" else [float(v) for v in text.split(",")]


def evaluate(run: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``ditx eval`` of ``run`` with ``overrides``: its metrics, NFE per sample and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        tic = time.perf_counter()
        evaluate_run(run, overrides, out=out)
        doc = json.loads(out.read_text())
    return {"overrides": overrides, "metrics": doc["metrics"], "nfe": doc["protocol"]["network_evaluations"],
            "eval_seconds": time.perf_counter() - tic}  # fmt: skip


def tolerances(reference: dict[str, float], other_seed: dict[str, float], keys) -> dict[str, float]:
    """Twice the seed-to-seed spread of each metric, floored at 0.005 (accuracies) or 5% (distances)."""
    out = {}
    for key, better in keys:
        floor = 0.05 * abs(reference[key]) if better == "lower" else 0.005
        out[key] = max(2 * abs(reference[key] - other_seed[key]), floor)
    return out


def keeps(row: dict[str, float], reference: dict[str, float], tol: dict[str, float], keys) -> bool:
    for key, better in keys:
        if better == "lower" and row[key] > reference[key] + tol[key]:
            return False
        if better == "higher" and row[key] < reference[key] - tol[key]:
            return False
    return True


def sampler_name(row: dict[str, Any]) -> tuple[str, int, list[float] | None]:
    o = dict(item.split("=", 1) for item in row["overrides"] if item.startswith("sample."))
    interval = o.get("sample.guidance_interval")
    return o["sample.scheduler"], int(o["sample.num_steps"]), None if interval is None else json.loads(interval)


def overrides_for(scheduler: str, steps: int, interval: list[float] | None) -> list[str]:
    """Explicit about the interval (``null``: every step), whatever the run's recipe default is."""
    where = "null" if interval is None else f"[{interval[0]},{interval[1]}]"
    return [f"sample.scheduler={scheduler}", f"sample.num_steps={steps}", f"sample.guidance_interval={where}"]


def quality_table(run: Path, args) -> dict[str, Any]:
    recipe, parts, _ = load_for_sampling(run)
    metric_name = recipe.eval.metrics[0] if isinstance(recipe.eval.metrics[0], str) else recipe.eval.metrics[0]["name"]
    keys = QUALITY[metric_name]
    objective = recipe.objective.name
    schedulers = args.schedulers or deterministic_schedulers(objective)
    base = deterministic_schedulers(objective)[0]  # first order (DDIM / flow Euler), whatever the recipe's default
    print(f"\n== {run} ({recipe.data.name}, objective {objective}, guidance {recipe.sample.guidance_scale}; "
          f"reference: {base} {REFERENCE_STEPS} steps)")  # fmt: skip
    ref = evaluate(run, overrides_for(base, REFERENCE_STEPS, None))
    ref_seed1 = evaluate(run, overrides_for(base, REFERENCE_STEPS, None) + ["eval.seed=1"])
    tol = tolerances(ref["metrics"], ref_seed1["metrics"], keys)
    print("tolerances (2 x seed spread, floored): " + ", ".join(f"{k} {v:.4f}" for k, v in tol.items()))
    rows = []

    def run_row(scheduler, steps, interval_text):
        row = evaluate(run, overrides_for(scheduler, steps, parse_interval(interval_text)))
        row["keeps_reference_quality"] = keeps(row["metrics"], ref["metrics"], tol, keys)
        rows.append(row)
        print(f"  {scheduler:18s} {steps:3d} steps interval {interval_text:8s} NFE {row['nfe']:3d}  "
              + "  ".join(f"{k} {row['metrics'][k]:.4f}" for k, _ in keys)
              + ("  keeps" if row["keeps_reference_quality"] else ""), flush=True)  # fmt: skip

    for scheduler in schedulers:  # guidance at every step
        for steps in args.steps:
            run_row(scheduler, steps, "none")
    # the intervals with the solver that kept the quality at the fewest evaluations (else the
    # one closest to the reference at the most steps), rather than with every solver
    kept = [r for r in rows if r["keeps_reference_quality"]]
    pick = min(kept, key=lambda r: r["nfe"]) if kept else min(
        (r for r in rows if sampler_name(r)[1] == max(args.steps)),
        key=lambda r: sum(abs(r["metrics"][k] - ref["metrics"][k]) / max(tol[k], 1e-9) for k, _ in keys))  # fmt: skip
    interval_scheduler = args.interval_scheduler or sampler_name(pick)[0]
    for interval_text in (i for i in args.intervals if i != "none"):
        for steps in args.steps:
            run_row(interval_scheduler, steps, interval_text)
    kept = [r for r in rows if r["keeps_reference_quality"]]
    best = min(kept, key=lambda r: (r["nfe"], sampler_name(r)[1])) if kept else None
    header = ["sampler", "steps", "guidance over", "NFE / sample", *[f"{k} ({b})" for k, b in keys], "keeps 50-step"]
    table = [[base + " (reference)", REFERENCE_STEPS, "every step", ref["nfe"],
              *[f"{ref['metrics'][k]:.4f}" for k, _ in keys], "—"],
             [base + " (reference, eval.seed=1)", REFERENCE_STEPS, "every step", ref_seed1["nfe"],
              *[f"{ref_seed1['metrics'][k]:.4f}" for k, _ in keys], "—"]]  # fmt: skip
    for r in rows:
        scheduler, steps, interval = sampler_name(r)
        where = "every step" if interval is None else f"level in [{interval[0]}, {interval[1]}]"
        mark = "yes" + (" (fewest NFE)" if r is best else "") if r["keeps_reference_quality"] else "no"
        table.append([scheduler, steps, where, r["nfe"], *[f"{r['metrics'][k]:.4f}" for k, _ in keys], mark])
    print(markdown_table(header, table))
    if best is not None:
        scheduler, steps, interval = sampler_name(best)
        print(f"fewest evaluations keeping the {REFERENCE_STEPS}-step quality: {scheduler}, {steps} steps, guidance "
              f"{'at every step' if interval is None else f'over {interval}'}: {best['nfe']} NFE against "
              f"{ref['nfe']} ({ref['nfe'] / best['nfe']:.1f}x fewer)")  # fmt: skip
    doc = {"run": str(run), "recipe_data": recipe.data.name, "objective": objective,
           "guidance_scale": recipe.sample.guidance_scale, "quality": keys, "reference": ref,
           "reference_seed1": ref_seed1, "tolerances": tol, "rows": rows, "fewest": best}  # fmt: skip
    write_results(f"steps_{recipe.data.name}" + ("" if objective == "rectified-flow" else f"_{objective}"), doc,
                  args.out)  # fmt: skip
    return doc


# ---------------------------------------------------------------- DiTPipeline row


def pixel_space(scaling_factor: float = 1.0):
    """What DiTPipeline calls its ``vae`` for a pixel-space model: decode is the identity (of the
    latents divided by ``scaling_factor``, as the pipeline does before decoding)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput

    class PixelSpace(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, scaling_factor: float = 1.0):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1))  # the pipeline reads its device from a tensor

        def decode(self, z):
            return DecoderOutput(sample=z)

    return PixelSpace(scaling_factor)


def diffusers_dit(model, latent_shape) -> torch.nn.Module:
    """ditx's DiT (official layout) as diffusers' DiTTransformer2DModel for (C, H, H) latents; its
    null label at 1000, where DiTPipeline looks for it."""
    from bench_sampling import set_timestep_shift, to_diffusers
    from diffusers import DiTTransformer2DModel

    depth, heads, patch = len(model.blocks), model.num_heads, model.x_embedder.patch_size
    channels, size, width = latent_shape
    if patch[0] != patch[1] or size != width:
        raise SystemExit(f"DiTTransformer2DModel needs square latents and patches, got {latent_shape}, {patch}")
    peer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=model.hidden_size // heads, in_channels=channels,
        out_channels=model.out_channels, num_layers=depth, sample_size=size, patch_size=patch[0],
        num_embeds_ada_norm=1000, norm_eps=1e-6,
    )  # fmt: skip
    state = model.state_dict()
    table = state["y_embedder.embedding_table.weight"]  # (num_classes + 1, hidden): the null row last
    wide = torch.zeros(1001, table.shape[1])
    wide[: table.shape[0] - 1], wide[1000] = table[:-1], table[-1]
    state = {**state, "y_embedder.embedding_table.weight": wide}
    peer.load_state_dict(to_diffusers(state, depth), strict=True)
    set_timestep_shift(peer, 0)  # official DiT's sinusoid frequencies (bench_sampling.py)
    return peer.eval()


def time_generation(fn, repeats: int) -> tuple[torch.Tensor, float]:
    times, out = [], None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - tic)
    return out, sorted(times)[len(times) // 2]


@torch.no_grad()
def peer_row(peer_run: Path, ours: list[tuple[Path, list[str]]], args) -> dict[str, Any]:
    from diffusers import DDIMScheduler, DiTPipeline

    recipe, parts, model = load_for_sampling(peer_run)
    if recipe.objective.name != "ddpm":
        raise SystemExit(f"--peer needs a run trained with objective ddpm (what DiTPipeline samples), "
                         f"{peer_run} has {recipe.objective.name!r}")  # fmt: skip
    cfg = recipe.eval
    n, batch, scale = cfg.num_samples, cfg.batch_size, recipe.sample.guidance_scale
    peer = diffusers_dit(model, parts.latent_shape)
    x = torch.randn(4, *parts.latent_shape, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([999, 500, 20, 0]), torch.tensor([3, 9, model.null_class, 7])
    mine = model(x, t.float(), y)
    y_peer = torch.where(y == model.null_class, 1000, y)
    diff = (peer(x, timestep=t, class_labels=y_peer).sample - mine).abs().max().item()
    print(f"same weights: forward max |ditx - diffusers| = {diff:.2e}")
    if not diff < 1e-4:
        raise SystemExit(f"the transformers disagree (max abs diff {diff:.3g}): the weight mapping is wrong")
    ddim = parts.objective.make_scheduler("ddim", REFERENCE_STEPS)
    pipe = DiTPipeline(transformer=peer, vae=pixel_space(), scheduler=DDIMScheduler.from_config(ddim.config))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(n) % parts.num_classes

    def diffusers_samples():
        out = []
        for start in range(0, n, batch):
            ids = labels[start : start + batch].tolist()
            images = pipe(class_labels=ids, guidance_scale=scale, num_inference_steps=REFERENCE_STEPS,
                          generator=torch.Generator().manual_seed(start), output_type="pt").images  # fmt: skip
            out.append(images * 2 - 1)  # [0, 1] -> [-1, 1], the data range the metric reads
        return torch.cat(out)

    metric_name = recipe.eval.metrics[0]
    keys = QUALITY[metric_name]
    _, metric = build_metric(metric_name)
    metric.prepare(reference_dataset(recipe), "cpu")
    samples, seconds = time_generation(diffusers_samples, args.repeats)
    rows = [{"name": f"diffusers DiTPipeline, DDIM {REFERENCE_STEPS} steps, CFG {scale} (every step)",
             "run": str(peer_run), "nfe": 2 * REFERENCE_STEPS, "seconds": seconds,
             "metrics": metric.compute(samples.clamp(-1, 1), labels)}]  # fmt: skip
    for run, overrides in ours:
        r, p, m = load_for_sampling(run, None, overrides)
        stats: dict = {}
        sample_cfg = r.sample
        sample_cfg.seed, sample_cfg.batch_size = cfg.seed, batch
        (samples, got), seconds = time_generation(
            lambda p=p, m=m, c=sample_cfg, s=stats: generate(p, m, n, "cpu", config=c, stats=s), args.repeats
        )
        interval = sample_cfg.guidance_interval
        rows.append({"name": f"ditx {r.objective.name}: {sample_cfg.scheduler} {sample_cfg.num_steps} steps, CFG "
                             f"{sample_cfg.guidance_scale} "
                             f"({'every step' if interval is None else f'level in {interval}'})",
                     "run": str(run), "overrides": overrides, "nfe": stats["network_evaluations"],
                     "seconds": seconds, "metrics": metric.compute(samples, got)})  # fmt: skip
    peer_doc = rows[0]
    for row in rows:
        row["samples_per_s"] = n / row["seconds"]
        row["speedup_over_diffusers"] = row["samples_per_s"] / peer_doc["samples_per_s"]
        row["quality_at_least_diffusers"] = all(
            (row["metrics"][k] <= peer_doc["metrics"][k] * 1.05) if b == "lower"
            else (row["metrics"][k] >= peer_doc["metrics"][k] - 0.005) for k, b in keys
        )  # fmt: skip
    header = ["sampler", "NFE / sample", *[f"{k} ({b})" for k, b in keys], "samples/s", "speed-up", "goal ≥2.5×"]
    table = [[r["name"], r["nfe"], *[f"{r['metrics'][k]:.4f}" for k, _ in keys], f"{r['samples_per_s']:.1f}",
              f"{r['speedup_over_diffusers']:.2f}×",
              "—" if r is peer_doc else ("met" if r["speedup_over_diffusers"] >= 2.5 and r["quality_at_least_diffusers"]
                                         else "not met")] for r in rows]  # fmt: skip
    print(f"{n} samples, batches of {batch}, fp32 on {torch.get_num_threads()} threads; speed-up = samples/s ÷ "
          f"DiTPipeline's; quality matched: each metric within 5% (distances) / 0.005 (accuracies) of "
          f"DiTPipeline's, or better")  # fmt: skip
    print(markdown_table(header, table))
    doc = {"peer_run": str(peer_run), "num_samples": n, "batch_size": batch, "forward_max_abs_diff": diff,
           "rows": rows}  # fmt: skip
    write_results("steps_peer", doc, args.out)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="trained runs: a quality-vs-NFE table each")
    parser.add_argument("--steps", nargs="+", type=int, default=STEPS)
    parser.add_argument("--schedulers", nargs="+", default=None, help="default: the objective's ODE solvers")
    parser.add_argument("--intervals", nargs="+", default=INTERVALS, help="'none' or 'low,high' noise levels")
    parser.add_argument("--interval-scheduler", default=None,
                        help="the solver of the interval rows (default: the one that kept the 50-step quality "
                             "at the fewest evaluations)")  # fmt: skip
    parser.add_argument("--peer", type=Path, default=None, help="a ddpm-objective run: the DiTPipeline row")
    parser.add_argument("--also", nargs="*", type=Path, default=[],
                        help="further runs for the DiTPipeline table, each at its fewest-NFE row of "
                             "results/steps_*.json (else its recipe's sampler)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="timed generations per DiTPipeline-table row")
    parser.add_argument("--out", default=None, help="results JSON (default results/steps_<data>.json)")
    args = parser.parse_args()
    fewest = {}
    for path in sorted(Path(__file__).parent.glob("results/steps_*.json")):  # earlier tables' fewest rows
        doc = json.loads(path.read_text())
        if doc.get("fewest"):
            fewest[Path(doc["run"])] = doc["fewest"]["overrides"]
    for run in args.runs:
        doc = quality_table(run, args)
        if doc["fewest"] is not None:
            fewest[run] = doc["fewest"]["overrides"]
    if args.peer is not None:
        ours = [(run, fewest.get(run, [])) for run in [args.peer, *args.also]]
        peer_row(args.peer, ours, args)
    if not args.runs and args.peer is None:
        parser.error("give trained runs, --peer, or both")


if __name__ == "__main__":
    main()
