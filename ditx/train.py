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

from ditx.build import adamw, build_components, lr_lambda, run_relative
from ditx.data import BucketBatchSampler, GlobalBatchSampler, SkipBadSamples, collate_skipping_errors, step_generator
from ditx.diffusion.frames import check_frame_mask_mix, draw_frame_masks
from ditx.dit import compile_problem
from ditx.files import atomic_write, pause_point
from ditx.parallel import enable_sequence_parallel, sequence_parallel_groups
from ditx.precision import resolve_precision
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


def first_stage_pending(recipe: Recipe) -> bool:
    """A two-stage recipe (``autoencoder_train.first_stage``) whose autoencoder is not trained yet."""
    return recipe.autoencoder_train.first_stage and not recipe.autoencoder.args.get("pretrained")


def _claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run never writes into a folder holding an earlier one (unless ``overwrite``)."""
    from ditx import checkpoint as ckpt
    from ditx.files import claim_output_folder

    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    holds = f"checkpoints up to {found[-1].name}" if found else ""
    claim_output_folder(run_dir, overwrite=overwrite, what="a training run", holds=holds,
                        instead=f"continue it with --resume (--run-dir {run_dir} --resume)")  # fmt: skip


class Trainer:
    """One training run of a recipe's DiT, as named steps (torchtune's recipe shape)::

        trainer = Trainer(recipe, run_dir, resume=False, overwrite=False)  # the run folder, claimed
        trainer.run()  # setup() (components, optimizer, resumed state), then train_step() per
                       # micro-batch; after each optimizer step: log(), save(), preview()

    The constructor only chooses and claims the run folder (every process agrees on it) and
    writes ``config.yaml``, so what must happen before the model is built (a two-stage
    recipe's autoencoder and latent cache: ``ditx.pipeline``) can use ``run_dir`` and
    ``accelerator``. A recipe whose first stage has not run is refused by ``setup``.
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False):  # fmt: skip
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, broadcast_object_list

        cfg = recipe.train
        if resume and overwrite:
            raise ValueError("--resume continues a run and --overwrite deletes it: pass one of them")
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16', 'auto' or 'no'")
        self.recipe, self.cfg, self.resume = recipe, cfg, resume
        self.precision = resolve_precision(cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
        self.accelerator = accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # CPU-only: several processes talk through gloo
            mixed_precision=self.precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=".", logging_dir="."),
        )
        # data-parallel rank and world: the processes of one sequence-parallel group share a batch
        self.sp, self.rank, self.world = sequence_parallel_groups(cfg.sequence_parallel)
        self.micro_global = cfg.batch_size // cfg.grad_accum
        if cfg.batch_size % (cfg.grad_accum * self.world):
            raise ValueError(
                f"train.batch_size={cfg.batch_size} must be divisible by grad_accum ({cfg.grad_accum}) x "
                f"data-parallel processes ({self.world}); it is the global batch per optimizer step"
            )
        self.local = self.micro_global // self.world

        # one run directory, chosen on the main process
        if run_dir is None and resume:
            run_dir = latest_run_dir(recipe)
            if run_dir is None:
                raise FileNotFoundError(f"--resume: no earlier run of {recipe.name!r} in {cfg.output_dir!r}")
        chosen = [str(run_dir or new_run_dir(recipe))]
        if accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        self.run_dir = Path(chosen[0])
        self.ckpt_root = self.run_dir / "checkpoints"
        self.found = _resumable_checkpoint(self.ckpt_root) if resume else None  # before anything is written
        if not resume:  # every process checks before anything is written, so all refuse alike
            if accelerator.is_main_process or not overwrite:
                _claim_run_dir(self.run_dir, overwrite)  # with overwrite, only the main process deletes
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.run_dir / "config.yaml") as tmp:  # what it holds, relative to it
                tmp.write_text(run_relative(recipe, self.run_dir).to_yaml())
            _setup_file_logging(self.run_dir / "train.log")
        accelerator.wait_for_everyone()

    # ---- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Components (the model initialised alike on every process), EMA, optimizer and LR
        schedule, wrapped by accelerate; the resumed state; the data."""
        from ditx import checkpoint as ckpt
        from ditx.latents import maybe_cached_dataset

        recipe, cfg, accelerator = self.recipe, self.cfg, self.accelerator
        if first_stage_pending(recipe):
            raise ValueError(
                f"{recipe.name or 'this recipe'} is a two-stage recipe (autoencoder_train.first_stage) whose "
                f"autoencoder is not trained yet: run it with `ditx train` or ditx.pipeline.train_recipe"
            )
        torch.manual_seed(cfg.seed)  # model initialisation is the same on every process
        self.parts = parts = build_components(recipe)
        self.dataset = maybe_cached_dataset(recipe, parts)  # latents from `ditx cache-latents` if present
        self.cached = self.dataset is not parts.dataset
        self.text = self._text_source()
        model = parts.model
        self.pooled_text = model.pooled_embedder is not None
        self.frame_masks = self._frame_mask_mix(model)
        self.sampling = parts.for_sampling()  # shapes of what the model generates (previews, checkpoints)
        self.objective, self.autoencoder = parts.objective, parts.autoencoder
        self.autoencoder.to(accelerator.device)
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
        self.ema.model.to(accelerator.device)
        optimizer = adamw(model.parameters(), accelerator.device, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          betas=cfg.betas)  # fmt: skip
        schedule = lr_lambda(cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        if self._compiles(recipe.model.compile, accelerator.device):  # in place, before DDP/FSDP wrap it
            # one static graph per grid shape (each bucket's), faster than dynamic shapes' one graph
            # (benchmarks/bench_bucket_step.py), so dynamo may keep a graph for each bucket, with and
            # without clean frames
            shapes = 2 * len(getattr(self.dataset, "buckets", None) or [None])
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
            model.compile_blocks(dynamic=False)  # a DiT compiles block by block
        # the LR schedule counts optimizer steps and is stepped by hand: accelerate's wrapper would
        # step it once per process, making warmup depend on the number of processes
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        enable_sequence_parallel(self.model, self.sp)  # on the trained model only: EMA and previews sample alone

        self.step, self.bad_samples = 0, 0
        if self.resume:
            state = ckpt.load_training_state(  # verified above, before anything was written
                self.found, self.model, self.ema, self.optimizer, self.scheduler, accelerator.scaler,
                accelerator.process_index,
                verify=False,
            )  # fmt: skip
            self.step, self.bad_samples = state["step"], state.get("bad_samples", 0)
            if accelerator.is_main_process:
                logger.info("resumed from %s at step %d", self.found, self.step)
                for name in ckpt.remove_unfinished(self.ckpt_root):
                    logger.info("removed %s, a checkpoint write that never finished", name)
                _forget_logged_steps_after(self.run_dir / "metrics.jsonl", self.step)
        accelerator.init_trackers(str(self.run_dir / "logs"), config=_flat_hparams(recipe))

        self.data = SkipBadSamples(self.dataset)
        self._bucket_shapes()
        self._epoch_sampler: tuple[int, Any] | None = None
        self.per_epoch = self._sampler(0).batches_per_epoch()
        if self.per_epoch == 0:
            wanted = self.micro_global if self.buckets is None else dict(zip(
                [b.name for b in self.buckets], self.bucket_batch))  # fmt: skip
            raise ValueError(
                f"the dataset has {len(self.data)} items, fewer than one global micro-batch of {wanted}"
                + ("" if self.buckets is None else f" in any bucket (items per bucket: "
                   f"{dict(zip([b.name for b in self.buckets], _counts(self.dataset.item_buckets, self.buckets)))})")
            )
        self.micro_step = self.step * cfg.grad_accum
        self.last_good = self.found  # a new run folder holds no checkpoint; a resumed one, the one it resumed from
        self.window: list[float] = []
        self.window_samples = 0
        self.tic = time.perf_counter()

    def _bucket_shapes(self) -> None:
        """Each bucket's global batch and latent shape (one bucket, the recipe's, for data of one size)."""
        self.buckets = getattr(self.dataset, "buckets", None) or None
        if self.buckets is None:
            self.bucket_batch, self.bucket_latent = [self.cfg.batch_size], [tuple(self.parts.latent_shape)]
            return
        channels = self.parts.data_shape[0]
        self.bucket_batch = [b.batch_size or self.cfg.batch_size for b in self.buckets]
        self.bucket_latent = [tuple(self.autoencoder.latent_shape((channels, *b.size))) for b in self.buckets]

    def _sampler(self, epoch: int, start: int = 0):
        """The batch sampler of ``epoch`` (one bucket per optimizer step when the data has buckets)."""
        cfg = self.cfg
        if self.buckets is None:
            return GlobalBatchSampler(len(self.data), self.local, self.rank, self.world, cfg.seed, epoch, start)
        return BucketBatchSampler(self.dataset.item_buckets, self.bucket_batch, cfg.grad_accum, self.rank,
                                  self.world, cfg.seed, epoch, start)  # fmt: skip

    def _bucket_at(self, micro_step: int) -> int:
        """The bucket of micro-batch ``micro_step`` (counted from the start of training)."""
        if self.buckets is None:
            return 0
        epoch, position = divmod(micro_step, self.per_epoch)
        if self._epoch_sampler is None or self._epoch_sampler[0] != epoch:
            self._epoch_sampler = (epoch, self._sampler(epoch))
        return self._epoch_sampler[1].bucket_of(position)

    def _text_source(self):
        """What turns a batch's captions into context: the caption embeddings cached beside the
        latents when there are some (the encoder is then never loaded), else the text encoder."""
        from ditx.latents import cached_caption_table, no_captions_error

        recipe, parts = self.recipe, self.parts
        if recipe.text_encoder is None:
            return None
        if self.dataset.captions is None:
            raise no_captions_error(recipe)
        if self.cached:
            table = cached_caption_table(recipe)
            if table is not None:
                parts.text_encoder = table
        return parts.text_encoder.to(self.accelerator.device)

    def batches(self):
        """Micro-batches of this process from the current position to the end of training,
        epoch after epoch (each epoch: ``set_epoch``, one seeded permutation)."""
        cfg = self.cfg
        # cached latents are slices of tensors already in memory: worker processes would only add
        # their start-up (every epoch) and the copies between processes
        num_workers = 0 if self.cached else cfg.num_workers
        while self.step < cfg.steps:
            epoch, start = divmod(self.micro_step, self.per_epoch)
            self.dataset.set_epoch(epoch)
            sampler = self._sampler(epoch, start)
            yield from DataLoader(
                self.data,
                batch_sampler=sampler,
                num_workers=num_workers,
                collate_fn=collate_skipping_errors,
                generator=torch.Generator().manual_seed(cfg.seed + epoch),  # workers never touch the global RNG
            )

    # ---- one step -------------------------------------------------------------------------

    def _step_randomness(self) -> None:
        """Noise, timesteps and label dropout for the whole global batch of this optimizer step,
        drawn once; each micro-batch of each process takes its slice (independent of process count)."""
        cfg = self.cfg
        bucket = self._bucket_at(self.micro_step)
        batch, shape = self.bucket_batch[bucket], self.bucket_latent[bucket]  # this step's global batch and latents
        self.micro_global = batch // cfg.grad_accum
        self.local = self.micro_global // self.world
        g = step_generator(cfg.seed, self.step)
        self.noise_all = torch.randn(batch, *shape, generator=g)
        self.t_all = self.objective.sample_t(batch, shape=shape, generator=g)
        self.drop_all = torch.rand(batch, generator=g) < self.recipe.model.class_dropout_prob
        # drawn after the others, so recipes without text keep their random streams
        self.caption_drop_all = torch.rand(batch, generator=g) < self.recipe.model.caption_dropout_prob
        if self.frame_masks:  # and the frame masks after those (image-to-video, extension, interpolation)
            mix, patch = self.frame_masks
            self.frame_mask_all = draw_frame_masks(mix, batch, shape[1], patch, g)
            p = cfg.frame_mask_condition_dropout
            if p is not None:  # a condition dropout of its own for the samples given frames
                given, drop = self.frame_mask_all.any(1), torch.rand(batch, generator=g) < p
                self.drop_all = torch.where(given, drop, self.drop_all)
                self.caption_drop_all = torch.where(given, drop, self.caption_drop_all)

    @staticmethod
    def _compiles(setting: bool | str, device: torch.device) -> bool:
        """``model.compile``: true compiles (a clear error where torch.compile cannot run here),
        auto compiles where it can and trains eagerly, saying why, where it cannot."""
        if setting is False:
            return False
        problem = compile_problem(device.type)
        if problem is None:
            return True
        if setting == "auto":
            logger.warning("model.compile=auto: training without torch.compile: %s", problem)
            return False
        raise RuntimeError(f"model.compile=true, but {problem}; set model.compile: auto (compile where it can) "
                           f"or false")  # fmt: skip

    def _frame_mask_mix(self, model) -> tuple[dict[str, float], int] | None:
        """(the checked mix, frames per token) when the recipe trains with frame masks, else None."""
        mix = check_frame_mask_mix(self.cfg.frame_masks)
        p = self.cfg.frame_mask_condition_dropout
        if p is not None and not (any(mix.values()) and 0.0 <= p <= 1.0):
            raise ValueError(f"train.frame_mask_condition_dropout={p!r}: allowed a probability in [0, 1], "
                             f"with train.frame_masks giving frames (got {self.cfg.frame_masks!r})")  # fmt: skip
        if not any(mix.values()):
            return None
        _, patch = model.time_axis("train.frame_masks")
        return mix, patch

    def _loss(self, batch: dict[str, Any], n: int) -> Tensor:
        """The mean diffusion loss of this process's ``n`` items (a zero with gradients when none is readable)."""
        cfg, device, model = self.cfg, self.accelerator.device, self.model
        if not n:
            return sum(p.sum() * 0.0 for p in model.parameters())
        first = (self.micro_step % cfg.grad_accum) * self.micro_global + self.rank * self.local
        sl = slice(first, first + n)
        x = batch["x"].to(device)
        with torch.no_grad():
            z = x if self.cached else self.autoencoder.encode(x)
        kwargs: dict[str, Any] = {}
        y = None
        if self.parts.num_classes > 0:
            y = batch["y"].to(device)
            kwargs["force_drop"] = self.drop_all[sl].to(device)
        if self.text is not None:  # captions dropped to the empty one (classifier-free guidance)
            captions = ["" if drop else c for c, drop in zip(batch["caption"], self.caption_drop_all[sl].tolist())]
            kwargs.update(self.text.encode(captions).to(device).model_kwargs(pooled=self.pooled_text))
        if self.frame_masks:  # given frames enter clean, the loss covers the others
            kwargs["frame_mask"] = self.frame_mask_all[sl].to(device)
        if "num_images" in batch:  # joint image-video training (Latte)
            kwargs["num_images"] = int(batch["num_images"][0])
        terms = self.objective.loss(model, z, y=y, model_kwargs=kwargs, noise=self.noise_all[sl].to(device),
                                    t=self.t_all[sl].to(device))  # fmt: skip
        return terms["loss"].mean()

    def train_step(self, batch: dict[str, Any]) -> tuple[float, Tensor | None]:
        """One micro-batch: forward, the NaN/Inf and bad-sample checks, backward, and the
        optimizer step when it completes one. Returns (the global mean loss, the gradient norm
        when an optimizer step was taken)."""
        cfg, accelerator, model, optimizer = self.cfg, self.accelerator, self.model, self.optimizer
        for err in batch["errors"]:
            logger.warning("skipping unreadable sample: %s", err)
        x = batch.get("x")
        n = 0 if x is None else len(x)
        if self.micro_step % cfg.grad_accum == 0:
            self._step_randomness()
        grad_norm = None
        with accelerator.accumulate(model):
            loss = self._loss(batch, n)
            # one all-reduce: the loss for the NaN check and logging, and bad-sample counts
            stats = torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=loss.device),
                                 torch.tensor(float(len(batch["errors"])), device=loss.device)])  # fmt: skip
            stats = accelerator.reduce(stats, reduction="sum")
            # the processes of a sequence-parallel group read the same items: count them once
            self.bad_samples += int(stats[2].item()) // cfg.sequence_parallel
            if self.bad_samples > cfg.max_bad_samples:
                raise DataBudgetError(
                    f"{self.bad_samples} unreadable samples exceed train.max_bad_samples={cfg.max_bad_samples} "
                    f"(see the warnings above for their paths); fix the data or raise the budget"
                )
            mean_loss = (stats[0] / stats[1].clamp(min=1)).item()
            if not math.isfinite(mean_loss):
                optimizer.zero_grad(set_to_none=True)
                raise _stopped(NonFiniteLossError, f"loss is {mean_loss}", self.step + 1,
                               f"(micro-step {self.micro_step})", self.last_good)  # fmt: skip
            # a sequence-parallel group's processes each hold a share of the gradient, summed by the
            # data-parallel mean only after scaling by the group size (ditx.parallel)
            accelerator.backward(loss * cfg.sequence_parallel if self.sp is not None else loss)
            if accelerator.sync_gradients:
                # the global norm, the same on every process whatever wraps the model (DDP, FSDP);
                # without clipping, max_norm=inf leaves the gradients as they are
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                # with fp16 the GradScaler skips a step whose gradients overflowed, as designed
                if accelerator.scaler is None and not torch.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    raise _stopped(NonFiniteGradientError, f"gradient norm is {float(grad_norm)}", self.step + 1,
                                   f"with a finite loss ({mean_loss:.4g})", self.last_good)  # fmt: skip
            optimizer.step()  # a no-op until the last micro-batch of the step
            optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                self.scheduler.step()
        self.micro_step += 1
        self.window.append(mean_loss)
        self.window_samples += self.micro_global
        return mean_loss, grad_norm

    # ---- after an optimizer step ----------------------------------------------------------

    def log(self, grad_norm: Tensor | None) -> None:
        """Mean loss, LR, samples/s (and the gradient norm) to TensorBoard and ``metrics.jsonl``."""
        elapsed = time.perf_counter() - self.tic
        logs = {"loss": sum(self.window) / len(self.window), "lr": self.scheduler.get_last_lr()[0],
                "samples_per_s": self.window_samples / max(elapsed, 1e-9)}  # fmt: skip
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        self.accelerator.log(logs, step=self.step)
        self.progress.set_postfix(loss=f"{logs['loss']:.4f}")
        if self.accelerator.is_main_process:
            _append_jsonl(self.run_dir / "metrics.jsonl", {"step": self.step, **logs})
        self.window, self.window_samples, self.tic = [], 0, time.perf_counter()

    def save(self) -> Path:
        """``checkpoints/step_N`` (see ``ditx.checkpoint.save_training_state``)."""
        from ditx import checkpoint as ckpt

        # what the model generates, in its model directory (ema/config.json), for sampling without the run
        shapes = {"data_shape": list(self.sampling.data_shape), "latent_shape": list(self.sampling.latent_shape),
                  "num_classes": self.parts.num_classes}  # fmt: skip
        self.last_good = ckpt.save_training_state(
            self.ckpt_root, self.step, self.accelerator, self.model, self.ema, self.optimizer, self.scheduler,
            extra={"bad_samples": self.bad_samples, "micro_step": self.micro_step, "world_size": self.world,
                   "sequence_parallel": self.cfg.sequence_parallel, "batches_per_epoch": self.per_epoch},
            keep=self.cfg.keep_checkpoints, model_metadata=shapes,
        )  # fmt: skip
        return self.last_good

    def preview(self) -> None:
        """Samples of the EMA model as the modality's files, in ``samples/step_N``."""
        from ditx.build import build_text_encoder
        from ditx.generation import cycle_prompts, write_previews
        from ditx.text import CaptionTable

        out = self.run_dir / "samples" / f"step_{self.step:08d}"
        captions = None
        if self.text is not None:  # the recipe's sample.prompts, else the first distinct training captions
            prompts = self.recipe.sample.prompts or list(dict.fromkeys(self.dataset.captions))
            captions = cycle_prompts(prompts, self.recipe.sample.num_samples)
            wanted = set(captions) | {self.recipe.sample.negative_prompt}
            table = self.sampling.text_encoder
            if isinstance(table, CaptionTable) and not wanted <= set(table.row):  # prompts not cached: the encoder
                self.sampling.text_encoder = build_text_encoder(self.recipe).to(self.accelerator.device)
        write_previews(self.sampling, self.ema.model, out, self.accelerator.device, captions)

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> Path:
        """``setup``, then train to ``train.steps``; returns the run folder."""
        from tqdm.auto import tqdm

        self.setup()
        cfg, accelerator = self.cfg, self.accelerator
        self.progress = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not accelerator.is_main_process)
        self.model.train()
        for batch in self.batches():
            _, grad_norm = self.train_step(batch)
            if not accelerator.sync_gradients:
                continue
            self.step += 1
            self.ema.update(self.model, self.step)
            self.progress.update(1)
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                self.log(grad_norm)
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save()
            if accelerator.is_main_process and ((cfg.sample_every and self.step % cfg.sample_every == 0) or last):
                self.preview()
            pause_point(f"step:{self.step}")  # tests kill the process here, between steps
            if self.step >= cfg.steps:
                break
        self.progress.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()  # also tears down the process group
        return self.run_dir


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``recipe``'s DiT; returns the run directory (``Trainer(...).run()``).

    With ``resume=True`` the newest complete checkpoint in ``run_dir`` (default: the
    newest run of this recipe) is restored first; a corrupt newest checkpoint is
    skipped with a warning in favour of the previous one. Without it, a ``run_dir``
    that already holds files is refused before anything is written
    (:class:`ditx.files.OutputExistsError`), unless ``overwrite=True``, which says
    what it deletes and starts the run afresh. A two-stage recipe runs through
    ``ditx.pipeline.train_recipe`` (what ``ditx train`` calls), which trains its
    autoencoder first.
    """
    return Trainer(recipe, run_dir, resume=resume, overwrite=overwrite).run()


def _counts(item_buckets, buckets) -> list[int]:
    import numpy as np

    return np.bincount(np.asarray(item_buckets, dtype=np.int64), minlength=len(buckets)).tolist()


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
