"""Image-to-video against frame guidance: a run's samples from its test clips' first frames (as
``ditx eval`` with ``eval.first_frame`` makes them: the null class, the clips in eval.seed's order)
at several ``sample.frame_guidance_scale`` values, in one bucket, scored by the recipe's first metric.

    python examples/frame_guidance_sweep.py RUN [--bucket 0] [--num 64] [--scales 1 2 4 6 8 12]
"""

import argparse
import dataclasses

import torch

from ditx.build import build_metric, load_for_sampling, reference_dataset, with_data_size
from ditx.data import BucketSubset
from ditx.evaluate import _generate_and_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a ditx run directory")
    parser.add_argument("--bucket", type=int, default=0, help="index into data.buckets (ignored without buckets)")
    parser.add_argument("--num", type=int, default=64, help="samples per scale")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4, 6, 8, 12])
    args = parser.parse_args()
    recipe, parts, model = load_for_sampling(args.run)
    reference = reference_dataset(recipe)
    buckets = getattr(reference, "buckets", None)
    if buckets:
        parts = with_data_size(parts, buckets[args.bucket].size)
        reference = BucketSubset(reference, args.bucket)
    built = [build_metric(recipe.eval.metrics[0])]
    built[0][1].prepare(reference, "cpu")
    cfg = dataclasses.replace(recipe.eval, num_samples=args.num, batch_size=args.num)
    print("| frame guidance | frame accuracy (class kept) | clip consistency | motion px | network evaluations |")
    print("| --- | --- | --- | --- | --- |")
    for scale in args.scales:
        sample_cfg = dataclasses.replace(recipe.sample, seed=cfg.seed, batch_size=cfg.batch_size,
                                         frame_guidance_scale=scale)  # fmt: skip
        scores, record = _generate_and_score(parts, model, reference, built, cfg, sample_cfg, torch.device("cpu"),
                                             "first_frame")  # fmt: skip
        print(f"| {scale:g} | {scores['frame_accuracy']:.3f} | {scores['clip_consistency']:.3f} | "
              f"{scores['motion_px']:.1f} | {record['network_evaluations']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
