"""Image-to-video against frame guidance: a run's samples from its test clips' first frames (as
``ditx eval`` with ``eval.first_frame`` makes them: the null class, the clips in eval.seed's order)
at several ``sample.frame_guidance_scale`` values, in one bucket, scored by the recipe's first metric.
``--class-levels K`` (``sample.frame_class_levels``, default the recipe's): the class is first read
from each frame by the model at K noise levels, then guided towards; the table then also says how
often the class read is the clip's own; ``--class-views V`` (``sample.frame_class_views``) shares
the levels among V placements of the frame.

    python examples/frame_guidance_sweep.py RUN [--bucket 0] [--num 64] [--scales 1 2 4 6 8 12] \
        [--class-levels 32] [--class-views 4]
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
    parser.add_argument("--class-levels", type=int, default=None,
                        help="sample.frame_class_levels: read the class from the frame first (0: off)")  # fmt: skip
    parser.add_argument("--class-views", type=int, default=None,
                        help="sample.frame_class_views: placements of the frame sharing the levels")  # fmt: skip
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
    levels = recipe.sample.frame_class_levels if args.class_levels is None else args.class_levels
    views = recipe.sample.frame_class_views if args.class_views is None else args.class_views
    read = " class read right |" if levels else ""
    print(f"| frame guidance |{read} frame accuracy (class kept) | clip consistency | motion px | "
          f"network evaluations |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |" + (" --- |" if levels else ""))
    for scale in args.scales:
        sample_cfg = dataclasses.replace(recipe.sample, seed=cfg.seed, batch_size=cfg.batch_size,
                                         frame_guidance_scale=scale, frame_class_levels=levels,
                                         frame_class_views=views)  # fmt: skip
        scores, record = _generate_and_score(parts, model, reference, built, cfg, sample_cfg, torch.device("cpu"),
                                             "first_frame")  # fmt: skip
        right = f" {scores['inferred_class_accuracy']:.3f} |" if levels else ""
        evaluations = record["network_evaluations"] + record.get("class_evaluations", 0)
        print(f"| {scale:g} |{right} {scores['frame_accuracy']:.3f} | {scores['clip_consistency']:.3f} | "
              f"{scores['motion_px']:.1f} | {evaluations} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
