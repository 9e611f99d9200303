"""The ceiling a latent DiT works under: a run's test clips encoded and decoded by its autoencoder,
scored by the recipe's first eval metric, bucket by bucket.

    python examples/autoencoder_ceiling.py RUN [--num 128]
"""

import argparse

import torch

from ditx.build import build_metric, load_for_sampling, reference_dataset
from ditx.data import BucketSubset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a ditx run directory")
    parser.add_argument("--num", type=int, default=128, help="test clips per bucket")
    args = parser.parse_args()
    recipe, parts, _ = load_for_sampling(args.run)
    reference = reference_dataset(recipe)
    buckets = getattr(reference, "buckets", None)
    groups = [(b.name, BucketSubset(reference, i)) for i, b in enumerate(buckets)] if buckets else [("", reference)]
    for name, group in groups:
        n = min(args.num, len(group))
        items = [group[j] for j in range(n)]
        x = torch.stack([item["x"] for item in items])
        y = torch.tensor([int(item["y"]) for item in items])
        with torch.no_grad():
            reconstructed = parts.autoencoder.decode(parts.autoencoder.encode(x)).float()
        _, metric = build_metric(recipe.eval.metrics[0])
        metric.prepare(group, "cpu")
        scores = metric.compute(reconstructed, y, None)
        shown = {k: round(float(v), 3) for k, v in sorted(scores.items()) if not k.startswith("reference")}
        print(name or "all", shown)


if __name__ == "__main__":
    main()
