"""The evaluation job: sample a run with a fixed protocol and score it with registered metrics.

Irreproducible numbers are the field's top complaint, so ``metrics.json`` carries the
whole protocol next to the numbers: checkpoint (and whether EMA), number of samples,
labels, scheduler, steps, guidance, seed, reference split and each metric's own
description (feature extractor, its checksum, reference size).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from ditx.build import build_metric, load_for_sampling, reference_dataset
from ditx.files import atomic_write
from ditx.generation import generate
from ditx.registry import metrics as metric_registry

logger = logging.getLogger("ditx.evaluate")


def test_prompts(reference, num: int, seed: int) -> tuple[list[str], Tensor | None, list[int]]:
    """``num`` prompts drawn from the test split's captions: its items in an order seeded by
    ``seed``, taken in turn (each item equally often). Returns the captions, the items'
    labels (None for unlabelled data) and the items' indices."""
    captions = reference.captions
    if captions is None:
        raise ValueError(
            f"the test split of {type(reference).__name__} has no captions; a text recipe's eval draws its prompts "
            f"from them (see docs/datasets.md)"
        )
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    drawn = [order[i % len(order)] for i in range(num)]
    labels = None
    if reference.num_classes > 0:
        labels = torch.tensor([int(reference[i]["y"]) for i in drawn])
    return [captions[i] for i in drawn], labels, drawn


def _labels_protocol(captions: list[str] | None, labels: Tensor | None) -> str:
    if captions is not None:
        return "the labels of the test items whose captions were the prompts" if labels is not None else "none"
    return "uniform over classes (i mod num_classes)" if labels is not None else "unconditional"


def evaluate_run(run: str | Path, overrides: list[str] | None = None, out: str | Path | None = None) -> dict:
    """``ditx eval RUN``: compute the recipe's ``eval.metrics``; writes ``metrics.json``."""
    run = Path(run)
    recipe, parts, model = load_for_sampling(run, None, overrides)
    cfg = recipe.eval
    if not cfg.metrics:
        raise ValueError(
            f"the recipe of {run} lists no eval.metrics; registered metrics: {', '.join(metric_registry.names())}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    parts.autoencoder.to(device)
    built = [build_metric(spec) for spec in cfg.metrics]
    reference = reference_dataset(recipe)
    for _, metric in built:
        metric.prepare(reference, device)
    sample_cfg = recipe.sample
    sample_cfg.seed, sample_cfg.batch_size = cfg.seed, cfg.batch_size
    captions = labels = drawn = None
    if parts.text_encoder is not None:  # prompts (and their items' labels) from the test split
        parts.text_encoder.to(device)
        captions, labels, drawn = test_prompts(reference, cfg.num_samples, cfg.seed)
    tic = time.perf_counter()
    samples, generated_for = generate(parts, model, cfg.num_samples, device, config=sample_cfg, progress=True,
                                      labels=labels if parts.num_classes > 0 else None, captions=captions)  # fmt: skip
    if captions is None:
        labels = generated_for
    seconds = time.perf_counter() - tic
    results: dict[str, float] = {}
    protocols = {}
    for name, metric in built:
        for key, value in metric.compute(samples, labels, captions).items():
            results[key] = float(value)
        protocols[name] = metric.protocol()
    checkpoint = parts.source
    document = {
        "run": str(run),
        "recipe": recipe.name,
        "metrics": results,
        "protocol": {
            "checkpoint": str(checkpoint) if checkpoint else None,
            "weights": "ema" if recipe.sample.use_ema else "model",
            "num_samples": cfg.num_samples,
            "labels": _labels_protocol(captions, labels),
            "scheduler": sample_cfg.scheduler,
            "num_steps": sample_cfg.num_steps,
            "guidance_scale": sample_cfg.guidance_scale,
            "guided_channels": sample_cfg.guided_channels,
            "seed": cfg.seed,
            "reference": {"dataset": recipe.data.name, "size": len(reference)},
            **({} if captions is None else {"prompts": {
                "source": f"captions of the test split's items (split {reference.split!r}): a permutation seeded "
                          f"with eval.seed, taken in turn",
                "negative_prompt": sample_cfg.negative_prompt, "items": drawn, "captions": captions}}),
            "metrics": protocols,
        },
        "sampling_seconds": round(seconds, 2),
    }
    out = Path(out) if out else run / "metrics.json"
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    logger.info("wrote %s", out)
    return results
