"""The evaluation job: sample a run with a fixed protocol and score it with registered metrics.

Irreproducible numbers are the field's top complaint, so ``metrics.json`` carries the
whole protocol next to the numbers: checkpoint (and whether EMA), number of samples,
labels, scheduler, steps, guidance, seed, reference split and each metric's own
description (feature extractor, its checksum, reference size).
"""

from __future__ import annotations

import dataclasses
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
    """``ditx eval RUN``: compute the recipe's ``eval.metrics``; writes ``metrics.json``.

    For data with buckets each bucket is evaluated apart (samples at its size against the test
    items in it; keys ``<metric>@<bucket>``); with ``eval.first_frame`` the samples generated from
    the test clips' first frames are scored too (``first_frame/<metric>``), with
    ``eval.first_frame_labeled`` those generated from the first frames and their clips' classes
    (``first_frame_labeled/<metric>``)."""
    from ditx.build import with_data_size
    from ditx.data import BucketSubset

    run = Path(run)
    recipe, parts, model = load_for_sampling(run, None, overrides)
    cfg = recipe.eval
    if not cfg.metrics:
        raise ValueError(
            f"the recipe of {run} lists no eval.metrics; registered metrics: {', '.join(metric_registry.names())}"
        )
    if cfg.first_frame_labeled and (parts.num_classes == 0 or parts.text_encoder is not None):
        raise ValueError("eval.first_frame_labeled is for class-conditional models: a text model's first frames "
                         "(eval.first_frame) already come with their clips' captions, an unconditional one has "
                         "no classes")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    parts.autoencoder.to(device)
    reference = reference_dataset(recipe)
    sample_cfg = recipe.sample
    sample_cfg.seed, sample_cfg.batch_size = cfg.seed, cfg.batch_size
    if parts.text_encoder is not None:
        parts.text_encoder.to(device)
    buckets = getattr(reference, "buckets", None)
    if buckets:  # each bucket apart: the model at its size, the test items in it
        groups = [(f"@{b.name}", with_data_size(parts, b.size), BucketSubset(reference, i), b.name)
                  for i, b in enumerate(buckets)]  # fmt: skip
    else:
        groups = [("", parts, reference, None)]
    results: dict[str, float] = {}
    protocols, evaluated, seconds = {}, [], 0.0
    for suffix, group_parts, group_reference, bucket in groups:
        if len(group_reference) < 2:
            logger.warning("bucket %s has %d test items: not evaluated", bucket, len(group_reference))
            continue
        built = [build_metric(spec) for spec in cfg.metrics]
        for _, metric in built:
            metric.prepare(group_reference, device)
        kinds = [("", None)] + [(f"{kind}/", kind) for kind in ("first_frame", "first_frame_labeled")
                                if getattr(cfg, kind)]  # fmt: skip
        for prefix, conditioning in kinds:
            tic = time.perf_counter()
            scored, record = _generate_and_score(group_parts, model, group_reference, built, cfg, sample_cfg,
                                                 device, conditioning)  # fmt: skip
            seconds += time.perf_counter() - tic
            results.update({f"{prefix}{k}{suffix}": v for k, v in scored.items()})
            evaluated.append({"bucket": bucket, "data_shape": list(group_parts.data_shape or []),
                              "reference_size": len(group_reference), "conditioning": conditioning, **record})
        protocols.update({f"{name}{suffix}": metric.protocol() for name, metric in built})
    checkpoint = parts.source
    document = {
        "run": str(run),
        "recipe": recipe.name,
        "metrics": results,
        "protocol": {
            "checkpoint": str(checkpoint) if checkpoint else None,
            "weights": "ema" if recipe.sample.use_ema else "model",
            "num_samples": cfg.num_samples,
            "scheduler": sample_cfg.scheduler,
            "num_steps": sample_cfg.num_steps,
            "guidance_scale": sample_cfg.guidance_scale,
            "guided_channels": sample_cfg.guided_channels,
            "guidance_interval": sample_cfg.guidance_interval,
            "frame_guidance_scale": sample_cfg.frame_guidance_scale,  # samples given frames (eval.first_frame)
            "frame_class_levels": sample_cfg.frame_class_levels,  # null-class samples given frames: their class read
            "frame_class_views": sample_cfg.frame_class_views,
            "frame_class_shift": sample_cfg.frame_class_shift,
            "seed": cfg.seed,
            "reference": {"dataset": recipe.data.name, "size": len(reference)},
            **(evaluated[0] if len(evaluated) == 1 else {"evaluated": evaluated}),
            "metrics": protocols,
        },
        "sampling_seconds": round(seconds, 2),
    }
    out = Path(out) if out else run / "metrics.json"
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    logger.info("wrote %s", out)
    return results


def _generate_and_score(parts, model, reference, built, cfg, sample_cfg, device, conditioning):
    """Sample ``cfg.num_samples`` for one group (the whole test split, or one bucket) and score them.

    ``conditioning="first_frame"``: each sample is generated from the first frame of a test
    clip (the clips in an order seeded by ``eval.seed``, taken in turn) and scored with its
    label; a class-conditional model (with a null class) generates them for the null class,
    so the digit kept is the given frame's doing. ``"first_frame_labeled"``: the same first frames,
    generated for their clips' own classes with the class guidance as well (image-to-video with
    its prompt). Returns the metrics and what the protocol records of this group."""
    from ditx.diffusion.frames import given_frames

    captions = labels = drawn = frames = None
    record: dict = {}
    if parts.text_encoder is not None:  # prompts (and their items' labels) from the test split
        captions, labels, drawn = test_prompts(reference, cfg.num_samples, cfg.seed)
    asked = labels if parts.num_classes > 0 else None  # the classes the samples are generated for
    if conditioning in ("first_frame", "first_frame_labeled"):
        if drawn is None:
            order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            drawn = [order[i % len(order)] for i in range(cfg.num_samples)]
        items = {i: reference[i] for i in set(drawn)}
        if parts.num_classes > 0 and labels is None:
            labels = asked = torch.tensor([int(items[i]["y"]) for i in drawn])
            if model.null_class is not None and conditioning == "first_frame":  # the frame is the only condition
                asked = torch.full_like(labels, model.null_class)
                if sample_cfg.frame_class_levels:
                    record["classes"] = (f"the null class, then the class the model reads from the given frame "
                                         f"({sample_cfg.frame_class_levels} noise levels, sample.frame_class_levels), "
                                         f"with the class guidance: the given frame is the only condition")  # fmt: skip
                else:
                    sample_cfg = dataclasses.replace(sample_cfg, guidance_scale=1.0)
                    record["classes"] = "the null class (guidance 1): the given frame is the only condition"
            elif conditioning == "first_frame_labeled":
                record["classes"] = "the given clips' own classes (class guidance as sampled): the frame and the class"
        clips, masks = zip(*(given_frames(parts.data_shape[1], first=items[i]["x"][:, :1]) for i in drawn))
        frames = (torch.stack(clips), torch.stack(masks))
        record["first_frames"] = {"source": "the first frame of each test item (a permutation seeded with "
                                            "eval.seed, taken in turn)", "items": drawn}  # fmt: skip
    stats: dict = {}
    samples, generated_for = generate(parts, model, cfg.num_samples, device, config=sample_cfg, progress=True,
                                      labels=asked, captions=captions, frames=frames, stats=stats)  # fmt: skip
    record["network_evaluations"] = stats["network_evaluations"]  # per sample
    inferred = stats.get("class_evaluations", 0) > 0  # the null class's samples took the class read from their frames
    if inferred:
        record["class_evaluations"] = stats["class_evaluations"]  # per sample, reading the class
    if captions is None and labels is None:
        labels = generated_for
    record["labels"] = _labels_protocol(captions, labels) if conditioning is None else (
        "the labels of the test items whose first frames were given")  # fmt: skip
    if captions is not None:
        record["prompts"] = {
            "source": f"captions of the test split's items (split {reference.split!r}): a permutation seeded "
                      f"with eval.seed, taken in turn",
            "negative_prompt": sample_cfg.negative_prompt, "items": drawn, "captions": captions}  # fmt: skip
    results: dict[str, float] = {}
    if inferred:  # how often the class read from the given frame is the clip's own
        results["inferred_class_accuracy"] = float((generated_for == labels).float().mean())
    for _, metric in built:
        results.update({key: float(value) for key, value in metric.compute(samples, labels, captions).items()})
    return results, record
