"""The training job: a recipe's model trained with accelerate, checkpointed, resumable.

The same code runs on one process, under ``accelerate launch --num_processes N`` (DDP;
gloo on CPU) and with FSDP through an accelerate config. Determinism does not depend
on how many processes run: the global batch is cut from one seeded permutation per
epoch, and the diffusion noise, timesteps and label dropout of every micro-batch are
drawn for the *global* batch from a generator seeded by (seed, micro-step), each
process taking its slice. So 2 processes × b reproduce 1 process × 2b, and a resumed
run reproduces an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ditx.build import build_components, run_relative
from ditx.data import GlobalBatchSampler, SkipBadSamples, collate_skipping_errors, step_generator
from ditx.files import atomic_write, pause_point
from ditx.recipe import Recipe

logger = logging.getLogger("ditx.train")


class NonFiniteError(RuntimeError):
    """Training met NaN/Inf and stopped before the optimizer step (no such weights are saved)."""


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN/Inf: training stopped before the optimizer step."""


class NonFiniteGradientError(NonFiniteError):
    """The gradients became NaN/Inf with a finite loss: training stopped before the optimizer step."""


class DataBudgetError(RuntimeError):
    """More unreadable samples than ``train.max_bad_samples`` allows."""


# --------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the weights, kept in float32 (DiT: decay 0.9999).

    With ``warmup`` the decay at optimizer step k is ``min(decay, (1 + k) / (10 + k))``
    (diffusers' EMAModel), so short runs are not dominated by the initial weights; DiT's
    paper recipe uses the constant decay (``train.ema_warmup: false``).
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """``model`` is the trained module, possibly wrapped by FSDP (its full parameters are
        gathered for the update: FSDP1 through ``summon_full_params``, FSDP2 DTensors through
        ``full_tensor``). ``step`` is the optimizer step just taken (1-based)."""
        decay = self.decay_at(step - 1)
        with _full_parameters(model):
            ema = list(self.model.parameters())
            cur = [_full(p).detach().float() for p in model.parameters()]
            torch._foreach_lerp_(ema, cur, 1.0 - decay)  # ema += (1 - decay) * (cur - ema)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


def _full(p: Tensor) -> Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors


def _full_parameters(model: torch.nn.Module):
    import contextlib

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # torch built without distributed
        return contextlib.nullcontext()
    if isinstance(model, FSDP):
        return FSDP.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def new_run_dir(recipe: Recipe) -> Path:
    from ditx.files import unique_folder

    name = (recipe.name or "run").replace("/", "-")
    return unique_folder(Path(recipe.train.output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def latest_run_dir(recipe: Recipe) -> Path | None:
    root = Path(recipe.train.output_dir)
    name = (recipe.name or "run").replace("/", "-")
    runs = sorted(p for p in root.glob(f"{name}-*") if (p / "config.yaml").is_file())
    return runs[-1] if runs else None


def _resumable_checkpoint(ckpt_root: Path) -> Path:
    """The checkpoint ``--resume`` continues from; errors name every broken one and delete nothing."""
    from ditx import checkpoint as ckpt

    found = ckpt.find_resumable(ckpt_root)
    if found is not None:
        return found
    broken = ckpt.list_checkpoints(ckpt_root)
    if broken:  # every one is corrupt: name them all, delete none
        problems = "; ".join(f"{p.name}: {ckpt.verify_checkpoint(p)}" for p in broken)
        raise ckpt.CheckpointError(
            f"--resume: no checkpoint in {ckpt_root} is intact ({problems}); nothing was changed. "
            f"Restore one from a backup, or start afresh with --overwrite"
        )
    raise FileNotFoundError(f"--resume: {ckpt_root.parent} has no complete checkpoint to resume from")


def _stopped(error: type[NonFiniteError], what: str, step: int, detail: str, last_good: Path | None) -> NonFiniteError:
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return error(
        f"{what} at step {step} {detail}; stopped before the optimizer step, {kept}. Lower train.lr, "
        f"set train.grad_clip or use mixed_precision=no"
    )


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _first_stage(recipe: Recipe, run_dir: Path, accelerator: Any) -> None:
    """Two-stage recipes (``autoencoder_train.first_stage``): train the autoencoder into
    ``<run>/autoencoder`` unless it is there (a resumed run) or the recipe names weights,
    and point the recipe (and the run's config.yaml) at it."""
    from ditx.train_autoencoder import train_autoencoder

    if not recipe.autoencoder_train.first_stage or recipe.autoencoder.args.get("pretrained"):
        return
    out = run_dir / "autoencoder"
    if accelerator.is_main_process and not out.exists():
        logger.info("stage 1: training the autoencoder into %s", out)
        train_autoencoder(recipe, out=out)
    accelerator.wait_for_everyone()
    recipe.autoencoder.args["pretrained"] = str(out)
    recipe.autoencoder.args.pop("config", None)
    if recipe.autoencoder_train.cache_latents:
        from ditx.cache import cache_latents

        if not recipe.train.latent_cache:
            recipe.train.latent_cache = str(run_dir / "latents")
        if accelerator.is_main_process:
            logger.info("encoding the dataset once into %s", recipe.train.latent_cache)
            cache_latents(recipe)  # resumable; returns at once when complete
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # paths inside the run written relative to it (${run}/...)
        with atomic_write(run_dir / "config.yaml") as tmp:
            tmp.write_text(run_relative(recipe, run_dir).to_yaml())
    logger.info("stage 2: training the DiT on the latents of %s", out)


def _claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run never writes into a folder holding an earlier one (unless ``overwrite``)."""
    from ditx import checkpoint as ckpt
    from ditx.files import claim_output_folder

    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    holds = f"checkpoints up to {found[-1].name}" if found else ""
    claim_output_folder(run_dir, overwrite=overwrite, what="a training run", holds=holds,
                        instead=f"continue it with --resume (--run-dir {run_dir} --resume)")  # fmt: skip


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``recipe``; returns the run directory.

    With ``resume=True`` the newest complete checkpoint in ``run_dir`` (default: the
    newest run of this recipe) is restored first; a corrupt newest checkpoint is
    skipped with a warning in favour of the previous one. Without it, a ``run_dir``
    that already holds files is refused before anything is written
    (:class:`ditx.files.OutputExistsError`), unless ``overwrite=True``, which says
    what it deletes and starts the run afresh.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list
    from tqdm.auto import tqdm

    from ditx import checkpoint as ckpt
    from ditx.generation import write_previews
    from ditx.latents import maybe_cached_dataset

    cfg = recipe.train
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite deletes it: pass one of them")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16' or 'no'")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # CPU-only: several processes talk through gloo
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=".", logging_dir="."),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_global = cfg.batch_size // cfg.grad_accum
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(
            f"train.batch_size={cfg.batch_size} must be divisible by grad_accum ({cfg.grad_accum}) x "
            f"processes ({world}); it is the global batch per optimizer step"
        )
    local = micro_global // world

    # one run directory, chosen on the main process
    if run_dir is None and resume:
        run_dir = latest_run_dir(recipe)
        if run_dir is None:
            raise FileNotFoundError(f"--resume: no earlier run of {recipe.name!r} in {cfg.output_dir!r}")
    chosen = [str(run_dir or new_run_dir(recipe))]
    if world > 1:
        broadcast_object_list(chosen)
    run_dir = Path(chosen[0])
    ckpt_root = run_dir / "checkpoints"
    found = _resumable_checkpoint(ckpt_root) if resume else None  # before anything is written
    if not resume:  # every process checks before anything is written, so all refuse alike
        if accelerator.is_main_process or not overwrite:
            _claim_run_dir(run_dir, overwrite)  # with overwrite, only the main process deletes
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / "config.yaml") as tmp:
            tmp.write_text(recipe.to_yaml())
        _setup_file_logging(run_dir / "train.log")
    accelerator.wait_for_everyone()
    _first_stage(recipe, run_dir, accelerator)

    # components
    torch.manual_seed(cfg.seed)  # model initialisation is the same on every process
    parts = build_components(recipe)
    dataset = maybe_cached_dataset(recipe, parts)  # latents from `ditx cache-latents` if present
    cached = dataset is not parts.dataset
    sampling = parts.for_sampling()  # shapes of what the model generates (previews, checkpoints)
    model, objective, autoencoder = parts.model, parts.objective, parts.autoencoder
    autoencoder.to(accelerator.device)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    ema.model.to(accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps))
    if recipe.model.compile:  # in place, before DDP/FSDP wrap it; a DiT compiles block by block
        model.compile_blocks() if hasattr(model, "compile_blocks") else model.compile()
    # the LR schedule counts optimizer steps and is stepped by hand: accelerate's wrapper would
    # step it once per process, making warmup depend on the number of processes
    model, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    bad_samples = 0
    if resume:
        state = ckpt.load_training_state(  # verified above, before anything was written
            found, model, ema, optimizer, scheduler, accelerator.scaler, rank, verify=False
        )
        step, bad_samples = state["step"], state.get("bad_samples", 0)
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", found, step)
            for name in ckpt.remove_unfinished(ckpt_root):
                logger.info("removed %s, a checkpoint write that never finished", name)
            _forget_logged_steps_after(run_dir / "metrics.jsonl", step)
    accelerator.init_trackers(str(run_dir / "logs"), config=_flat_hparams(recipe))

    data = SkipBadSamples(dataset)
    # cached latents are slices of tensors already in memory: worker processes would only add
    # their start-up (every epoch) and the copies between processes
    num_workers = 0 if cached else cfg.num_workers
    per_epoch = GlobalBatchSampler(len(data), local, rank, world, cfg.seed, 0).batches_per_epoch()
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(data)} items, fewer than one global micro-batch of {micro_global}")
    micro_step = step * cfg.grad_accum
    progress = tqdm(total=cfg.steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    last_good = found  # a new run folder holds no checkpoint; a resumed one, the one it resumed from
    window: list[float] = []
    tic = time.perf_counter()
    model.train()
    while step < cfg.steps:
        epoch, start = divmod(micro_step, per_epoch)
        dataset.set_epoch(epoch)
        sampler = GlobalBatchSampler(len(data), local, rank, world, cfg.seed, epoch, start)
        loader = DataLoader(
            data,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_skipping_errors,
            generator=torch.Generator().manual_seed(cfg.seed + epoch),  # workers never touch the global RNG
        )
        for batch in loader:
            for err in batch["errors"]:
                logger.warning("skipping unreadable sample: %s", err)
            x = batch.get("x")
            n = 0 if x is None else len(x)
            # diffusion randomness for the whole global batch of this optimizer step, drawn once;
            # each micro-batch of each process takes its slice (independent of process count)
            if micro_step % cfg.grad_accum == 0:
                g = step_generator(cfg.seed, step)
                noise_all = torch.randn(cfg.batch_size, *parts.latent_shape, generator=g)
                t_all = objective.sample_t(cfg.batch_size, generator=g)
                drop_all = torch.rand(cfg.batch_size, generator=g) < recipe.model.class_dropout_prob
            first = (micro_step % cfg.grad_accum) * micro_global + rank * local
            sl = slice(first, first + n)
            with accelerator.accumulate(model):
                if n:
                    x = x.to(accelerator.device)
                    with torch.no_grad():
                        z = x if cached else autoencoder.encode(x)
                    kwargs = {}
                    y = None
                    if parts.num_classes > 0:
                        y = batch["y"].to(accelerator.device)
                        kwargs["force_drop"] = drop_all[sl].to(accelerator.device)
                    if "num_images" in batch:  # joint image-video training (Latte)
                        kwargs["num_images"] = int(batch["num_images"][0])
                    terms = objective.loss(
                        model, z, y=y, model_kwargs=kwargs,
                        noise=noise_all[sl].to(accelerator.device), t=t_all[sl].to(accelerator.device),
                    )  # fmt: skip
                    loss = terms["loss"].mean()
                else:
                    loss = sum(p.sum() * 0.0 for p in model.parameters())
                # one all-reduce: the loss for the NaN check and logging, and bad-sample counts
                stats = torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=loss.device),
                                     torch.tensor(float(len(batch["errors"])), device=loss.device)])  # fmt: skip
                stats = accelerator.reduce(stats, reduction="sum")
                bad_samples += int(stats[2].item())
                if bad_samples > cfg.max_bad_samples:
                    raise DataBudgetError(
                        f"{bad_samples} unreadable samples exceed train.max_bad_samples={cfg.max_bad_samples} "
                        f"(see the warnings above for their paths); fix the data or raise the budget"
                    )
                mean_loss = (stats[0] / stats[1].clamp(min=1)).item()
                if not math.isfinite(mean_loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise _stopped(NonFiniteLossError, f"loss is {mean_loss}", step + 1,
                                   f"(micro-step {micro_step})", last_good)  # fmt: skip
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    # the global norm, the same on every process whatever wraps the model (DDP, FSDP);
                    # without clipping, max_norm=inf leaves the gradients as they are
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                    # with fp16 the GradScaler skips a step whose gradients overflowed, as designed
                    if accelerator.scaler is None and not torch.isfinite(grad_norm):
                        optimizer.zero_grad(set_to_none=True)
                        raise _stopped(NonFiniteGradientError, f"gradient norm is {float(grad_norm)}", step + 1,
                                       f"with a finite loss ({mean_loss:.4g})", last_good)  # fmt: skip
                optimizer.step()  # a no-op until the last micro-batch of the step
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    scheduler.step()
            micro_step += 1
            window.append(mean_loss)
            if not accelerator.sync_gradients:
                continue
            step += 1
            ema.update(model, step)
            progress.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - tic
                logs = {"loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": len(window) * micro_global / max(elapsed, 1e-9)}  # fmt: skip
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
                if accelerator.is_main_process:
                    _append_jsonl(run_dir / "metrics.jsonl", {"step": step, **logs})
                window, tic = [], time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                path = ckpt.save_training_state(
                    ckpt_root, step, accelerator, model, ema, optimizer, scheduler,
                    extra={"bad_samples": bad_samples, "micro_step": micro_step, "world_size": world,
                           "batches_per_epoch": per_epoch, "data_shape": list(sampling.data_shape),
                           "latent_shape": list(sampling.latent_shape), "num_classes": parts.num_classes},
                    keep=cfg.keep_checkpoints,
                )  # fmt: skip
                last_good = path
            if accelerator.is_main_process and (
                (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.steps
            ):
                write_previews(sampling, ema.model, run_dir / "samples" / f"step_{step:08d}", accelerator.device)
            pause_point(f"step:{step}")  # tests kill the process here, between steps
            if step >= cfg.steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group
    return run_dir


def _flat_hparams(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", recipe.to_dict())
    return out


def _forget_logged_steps_after(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (logged by a run that was interrupted later):
    the resumed run logs them again, so each step appears once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        with atomic_write(path) as tmp:
            tmp.write_text("".join(keep))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _setup_file_logging(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("ditx")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
