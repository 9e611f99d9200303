"""The train-autoencoder job: a recipe's autoencoder trained from scratch on the recipe's
data (``ditx train-autoencoder``, and the first stage of two-stage recipes)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ditx.autoencoder import Autoencoder
from ditx.data import BucketBatchSampler
from ditx.files import OutputExistsError
from ditx.precision import resolve_precision

if TYPE_CHECKING:
    from ditx.recipe import Recipe

logger = logging.getLogger("ditx.autoencoder")


def default_autoencoder_dir(recipe: Recipe) -> Path:
    """``autoencoder_train.out``, else ``<train.output_dir>/<recipe>-autoencoder``."""
    if recipe.autoencoder_train.out:
        return Path(recipe.autoencoder_train.out)
    return Path(recipe.train.output_dir) / f"{(recipe.name or 'run').replace('/', '-')}-autoencoder"


def draw_frames(clips: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` frames of each clip ``(B, C, T, H, W)``, drawn at random without repeats, in their
    order: ``(B, C, k, H, W)`` (all ``T`` when ``k >= T``)."""
    b, _, t = clips.shape[:3]
    if k >= t:
        return clips
    idx = torch.rand(b, t, generator=generator).argsort(1)[:, :k].sort(1).values  # (B, k)
    return clips.transpose(1, 2)[torch.arange(b)[:, None], idx].transpose(1, 2).contiguous()


@torch.no_grad()
def _held_out_metrics(autoencoder: Autoencoder, batch: dict[str, Tensor]) -> tuple[dict[str, float], Tensor, Tensor]:
    """The autoencoder's reconstruction metrics on the held-out batch, its reconstructions and its latents."""
    metrics = autoencoder.reconstruction_metrics(batch)
    z = autoencoder.encode(batch["x"])
    return metrics, autoencoder.decode(z).float(), z.float()


def train_autoencoder(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Train the recipe's autoencoder from scratch on the recipe's dataset; returns ``out``.

    Settings come from the recipe's ``autoencoder_train`` section (steps, batch size,
    AdamW learning rate, KL weight, mixed precision, seed). One process, on CUDA when
    available. A fixed, seeded subset of the dataset (one batch, at most a tenth) is held
    out: it is never trained on and gives the final reconstruction MSE/PSNR.

    ``out`` (default ``autoencoder_train.out`` or ``<train.output_dir>/<recipe>-autoencoder``)
    is written all at once when training ends and holds:

    - the autoencoder's ``save_pretrained`` files. Its scaling factor is re-measured on the
      held-out batch so that the scaled latents have unit standard deviation there (the
      Latent Diffusion recipe for a new VAE, instead of SD-VAE's 0.18215);
    - ``preview/``: the modality writer's view of held-out items (first half) and their
      reconstructions (second half);
    - ``metrics.json``: reconstruction MSE and PSNR before and after training, the scaling
      factor, the held-out indices and the settings; ``train_log.jsonl``: the loss curve.

    Afterwards point the recipe's ``autoencoder.pretrained`` at ``out`` (and set
    ``autoencoder.config`` back to null), in the YAML or as overrides:
    ``ditx train RECIPE autoencoder.pretrained=<out> autoencoder.config=null``.
    """
    from torch.utils.data import DataLoader, Subset, default_collate
    from tqdm.auto import tqdm

    from ditx.build import adamw, build_autoencoder, build_dataset, lr_lambda
    from ditx.files import atomic_write
    from ditx.writers import writer_for

    cfg = recipe.autoencoder_train
    out = Path(out) if out is not None else default_autoencoder_dir(recipe)
    if out.exists() and not overwrite:  # fail before training, not after
        raise OutputExistsError(
            f"{out} already exists and holds an autoencoder ({', '.join(p.name for p in sorted(out.iterdir())[:6])}); "
            f"nothing was written. Pass --out DIR for another folder, or --overwrite to replace it"
        )
    if out.exists():  # replaced only when the new one is complete (an atomic rename at the end)
        print(f"--overwrite: {out} will be replaced by the autoencoder trained now", file=sys.stderr, flush=True)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"autoencoder_train.steps and batch_size must be at least 1, got {cfg.steps} and {cfg.batch_size}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("autoencoder_train.mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16', 'auto' or "
                         "'no'")  # fmt: skip
    precision = resolve_precision(cfg.mixed_precision, device, "autoencoder_train.mixed_precision")
    write_preview = writer_for(recipe.modality)  # an unknown modality fails now, not after training

    torch.manual_seed(cfg.seed)  # initialisation of an untrained autoencoder
    ae = build_autoencoder(recipe)
    if not ae.supports_training:
        raise ValueError(
            f"autoencoder {recipe.autoencoder.name!r} ({type(ae).__name__}) cannot be trained by ditx: it does not "
            f"implement trainable, training_loss and save_pretrained (supports_training is False; see "
            f"ditx.autoencoder.Autoencoder); use one that does, e.g. "
            f"autoencoder: {{name: sd-vae, config: tiny}}"
        )
    dataset = build_dataset(recipe)
    n = len(dataset)
    held_count = min(cfg.batch_size, n // 10)
    if held_count < 1 or n - held_count < cfg.batch_size:
        raise ValueError(
            f"the dataset has {n} items: too few for a held-out batch and a training batch of "
            f"autoencoder_train.batch_size={cfg.batch_size}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    item_buckets = dataset.item_buckets if getattr(dataset, "buckets", None) else None
    if item_buckets is not None:  # data of many sizes: the held-out batch and the calibration from one bucket
        same = int(item_buckets[order[0]])
        order = [i for i in order if item_buckets[i] == same] + [i for i in order if item_buckets[i] != same]
    held_out, train_idx = sorted(order[:held_count]), order[held_count:]
    held_batch = {k: v.to(device) for k, v in default_collate([dataset[i] for i in held_out]).items()
                  if isinstance(v, Tensor)}  # fmt: skip
    x_held = held_batch["x"]
    if isinstance(cfg.frames_per_clip, bool) or not isinstance(cfg.frames_per_clip, int) or cfg.frames_per_clip < 0:
        raise ValueError(f"autoencoder_train.frames_per_clip must be an integer >= 0 (0: every frame), got "
                         f"{cfg.frames_per_clip!r}")  # fmt: skip
    if cfg.frames_per_clip and (x_held.ndim != 5 or ae.latent_shape(tuple(x_held.shape[1:]))[1] != x_held.shape[2]):
        raise ValueError(f"autoencoder_train.frames_per_clip={cfg.frames_per_clip}: frames drawn from clips need "
                         f"video data and an autoencoder that encodes each frame alone (framewise-vae), got data "
                         f"{tuple(x_held.shape[1:])} and {recipe.autoencoder.name!r}")  # fmt: skip
    pick = torch.Generator().manual_seed(cfg.seed + 2)  # the frames drawn from each clip

    ae.to(device)
    ae.eval()
    initial, _, _ = _held_out_metrics(ae, held_batch)
    ae.trainable()
    params = [p for p in ae.parameters() if p.requires_grad]
    optimizer = adamw(params, device, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.lr_schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    noise = torch.Generator(device).manual_seed(cfg.seed + 1)  # posterior samples

    log: list[dict[str, float]] = []
    window: dict[str, list[float]] = {}
    step, epoch = 0, 0
    progress = tqdm(total=cfg.steps, desc="train-autoencoder")
    while step < cfg.steps:
        dataset.set_epoch(epoch)
        batching = dict(batch_size=cfg.batch_size, shuffle=True, drop_last=True)
        if item_buckets is not None:  # each batch from one bucket
            sampler = BucketBatchSampler([item_buckets[i] for i in train_idx], [cfg.batch_size] * len(dataset.buckets),
                                         1, 0, 1, cfg.seed, epoch)  # fmt: skip
            if len(sampler) == 0:
                counts = {b.name: sum(1 for i in train_idx if item_buckets[i] == k)
                          for k, b in enumerate(dataset.buckets)}  # fmt: skip
                raise ValueError(f"no bucket holds a batch of autoencoder_train.batch_size={cfg.batch_size} clips "
                                 f"(training clips per bucket: {counts}); lower the batch size")  # fmt: skip
            batching = dict(batch_sampler=sampler)
        loader = DataLoader(
            Subset(dataset, train_idx), **batching,
            num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )  # fmt: skip
        for batch in loader:
            x = batch["x"]
            if cfg.frames_per_clip:
                x = draw_frames(x, cfg.frames_per_clip, pick)
            x = x.to(device)
            extra = {k: v.to(device) for k, v in ae.loss_inputs(batch).items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                terms = ae.training_loss(x, kl_weight=cfg.kl_weight, generator=noise, **extra)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"autoencoder loss is {loss.item()} at step {step + 1}; nothing was written. Lower "
                    f"autoencoder_train.lr or use autoencoder_train.mixed_precision=no"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            progress.update(1)
            for k, v in terms.items():
                window.setdefault(k, []).append(float(v.detach()))
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, **{k: sum(v) / len(v) for k, v in window.items()},
                          "lr": schedule.get_last_lr()[0]}  # fmt: skip
                log.append(record)
                shown = {k: f"{record[k]:.4g}" for k in ("loss", "mse", "iou") if k in record}
                progress.set_postfix(**shown)
                window = {}
            if step >= cfg.steps:
                break
        epoch += 1
    progress.close()

    # measure the trained autoencoder on the held-out batch; normalise latents to unit std
    ae.freeze()
    calibration = train_idx if item_buckets is None else [i for i in train_idx if item_buckets[i] == same]
    training = DataLoader(Subset(dataset, sorted(calibration[:512])), batch_size=cfg.batch_size)
    ae.calibrate_latents(x_held, ({k: v.to(device) for k, v in b.items() if isinstance(v, Tensor)} for b in training))
    held, recon, z = _held_out_metrics(ae, held_batch)
    metrics = {
        **held,
        **{f"initial_{k}": v for k, v in initial.items()},
        "scaling_factor": float(ae.scaling_factor),
        "held_out": held_out,
        "steps": cfg.steps,
        "autoencoder": recipe.autoencoder.to_dict(),
        "data": recipe.data.to_dict(),
        "autoencoder_train": {k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "kl_weight",
                                                           "mixed_precision", "seed", "frames_per_clip",
                                                           "lr_schedule", "warmup_steps")},
        "precision": precision,  # what mixed_precision (auto) resolved to on this machine
        "recipe": recipe.name or recipe.source,
    }  # fmt: skip
    k = min(8, len(held_out))
    # held-out items, then their reconstructions; only the reconstructions when they differ in kind
    preview = torch.cat([x_held[:k], recon[:k].to(x_held.dtype)]) if recon.shape == x_held.shape else recon[:k]
    with atomic_write(out, directory=True, overwrite=overwrite) as tmp:
        ae.save_pretrained(tmp)
        write_preview(preview.cpu(), tmp / "preview", None)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    logger.info("autoencoder written to %s: held-out %s", out, ", ".join(f"{k} {v:.4g}" for k, v in held.items()))
    return out
