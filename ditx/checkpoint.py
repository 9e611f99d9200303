"""Checkpoints: the ditx model format, and training state (everything needed to resume).

A ditx model checkpoint is a directory::

    OUT/
      config.json        # DiT(**config) rebuilds the model; plus "format": "ditx-model"
      model.safetensors  # its state dict

written with ``ditx.files.atomic_write``: a crash or bad input never leaves half a
checkpoint. A training checkpoint ``RUN/checkpoints/step_N/`` holds its EMA weights as
such a model directory (``ema/``, whose ``metadata`` gives the shapes it generates and its
class count), the trained weights (``model.safetensors``, same keys), optimizer, schedulers,
RNG states and ``trainer_state.json``, with ``manifest.json`` (size and SHA-256 of every
file) written last. So ``load_model(RUN/checkpoints/step_N/ema)`` and
``ditx sample RUN/checkpoints/step_N/ema --recipe R`` need nothing else of the run.
Official DiT weights: ``ditx.official``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditx.dit import DiT
from ditx.files import _remove, atomic_write, file_sha256, pause_point

MODEL_FORMAT = "ditx-model"
MODEL_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# keys of config.json that describe the file, not DiT(**config) arguments
_FILE_KEYS = ("format", "format_version", "ditx_version", "metadata")

class CheckpointError(ValueError):
    """A checkpoint or state dict that cannot be read, converted or loaded (the message says why)."""


# ---------------------------------------------------------------------------------------
# ditx model checkpoints
# ---------------------------------------------------------------------------------------


def _build_for_loading(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` without spending time on random initialization that loading overwrites.

    Builds on the meta device and allocates empty CPU storage. Falls back to a normal
    build when the module holds state a state dict would not restore (non-persistent
    buffers or plain tensor attributes).
    """
    with torch.device("meta"):
        model = factory()
    persistent = set(model.state_dict())
    loose = any(name not in persistent for name, _ in model.named_buffers()) or any(
        isinstance(v, Tensor) for m in model.modules() for v in vars(m).values()
    )
    if loose:
        return factory()
    return model.to_empty(device="cpu")


def _load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights from {source} do not fit the model: {e}") from None


def save_model(
    model: DiT, out_dir: str | os.PathLike, *, overwrite: bool = False, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` as a ditx checkpoint directory (``config.json`` + ``model.safetensors``), atomically.

    The model must have a ``config`` (models built from a tokenizer spec, e.g. by
    ``build_dit``, have one). ``metadata`` (JSON-able) is stored in ``config.json``
    under ``"metadata"``, e.g. the latent input size. Returns the output path.
    """


    text = _config_text(model, metadata)  # fails here, before anything is written
    out_dir = Path(out_dir)
    with atomic_write(out_dir, directory=True, overwrite=overwrite) as tmp:
        _write_model_files(tmp, text, model.state_dict())
    return out_dir


def _config_text(model: DiT, metadata: Mapping[str, Any] | None) -> str:
    """``config.json`` of ``model``: its constructor config, the format and ``metadata``."""
    import ditx

    config = model.config
    if not config:
        raise CheckpointError(
            "this model has no config (it was built from a tokenizer instance); only models built from a "
            "tokenizer spec, e.g. build_dit(...) or DiT(tokenizer={'name': ...}, ...), can be saved"
        )
    clash = [k for k in _FILE_KEYS if k in config]
    if clash:
        raise CheckpointError(f"model config uses reserved checkpoint keys {clash}")
    document = dict(config, format=MODEL_FORMAT, format_version=MODEL_FORMAT_VERSION, ditx_version=ditx.__version__)
    if metadata:
        document["metadata"] = dict(metadata)
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _write_model_files(folder: Path, config_text: str, state: Mapping[str, Tensor]) -> None:
    """A model directory's two files in ``folder`` (which the caller renames into place)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(config_text)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    # safetensors may create its file private (0600); give it the permissions of config.json (umask)
    os.chmod(folder / WEIGHTS_NAME, (folder / CONFIG_NAME).stat().st_mode & 0o777)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a ditx checkpoint directory (including ``format`` and ``metadata``)."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a ditx model checkpoint: expected a directory with {CONFIG_NAME}")
    try:
        document = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a ditx model checkpoint: {config_path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path} is unreadable or not valid JSON: {e}") from None
    if not isinstance(document, dict) or document.get("format") != MODEL_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(f"{config_path} is not a ditx model config (format {found!r}, expected {MODEL_FORMAT!r})")
    version = document.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {version!r}; this ditx reads versions up to {MODEL_FORMAT_VERSION} "
            "(upgrade ditx)"
        )
    return document


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...: a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def load_model(
    path: str | os.PathLike, weights: str | os.PathLike | None = None, attention_backend: str | None = None
) -> DiT:
    """Rebuild a ``DiT`` from a model directory written by ``save_model`` (on CPU, in eval mode).

    The model is built on the meta device and gets its storage from the weights, so no
    time goes into a random initialization. ``weights`` loads another safetensors file
    of the same model instead (a training checkpoint's ``model.safetensors`` beside its ``ema/``);
    ``attention_backend`` replaces the recorded one (a setting of the machine, not of the weights).
    """
    path = Path(path)
    document = read_model_config(path)
    config = {k: v for k, v in document.items() if k not in _FILE_KEYS}
    if attention_backend is not None:
        config["attention_backend"] = attention_backend
    try:
        model = _build_for_loading(lambda: DiT(**config))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot build the model described by {path / CONFIG_NAME}: {e}") from None
    weights_path = Path(weights) if weights is not None else path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{path} is incomplete: {weights_path} is missing")
    state_dict = _read_safetensors(weights_path)
    _load_weights(model, state_dict, str(weights_path))
    return model.eval()


# ---------------------------------------------------------------------------------------
# Training checkpoints: everything needed to resume, verified by a manifest
# ---------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
EMA_DIR = "ema"  # a training checkpoint's EMA weights, as a model directory
_STEP_DIR = "step_{:08d}"


_SLOT = "::"  # parameter name :: optimizer slot (parameter names contain dots)


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state dict (keyed by parameter name) -> (tensors for safetensors, the rest as JSON)."""
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}{_SLOT}{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}{_SLOT}{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        pid, name = key.rsplit(_SLOT, 1)
        state.setdefault(pid, {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _full_state_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's RNG states: torch (and CUDA) as tensors, Python and NumPy as JSON."""
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    rest = {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, rest


def set_rng_state(tensors: dict[str, Tensor], rest: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    v, keys, gauss = rest["python"]
    random.setstate((v, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_training_state(
    root: str | os.PathLike,
    step: int,
    accelerator: Any,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: Mapping[str, Any] | None = None,
    keep: int = 3,
    model_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``root/step_XXXXXXXX`` atomically on the main process; returns its path.

    Holds the EMA as a model directory ``ema/`` (``config.json`` with ``model_metadata``,
    e.g. the shapes it generates, + ``model.safetensors``), the model (safetensors),
    optimizer (tensors in safetensors, the rest JSON), LR scheduler, grad scaler, every
    process's RNG states and ``trainer_state.json``; ``manifest.json`` (sizes and SHA-256
    of every file) is written last and is what makes a checkpoint complete. Keeps the
    newest ``keep`` checkpoints (0 keeps all).
    """
    from accelerate.utils import gather_object
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = Path(root)
    target = root / _STEP_DIR.format(step)
    # full (unsharded) model and optimizer states keyed by parameter name, whatever wraps the
    # model (DDP, FSDP1, FSDP2): collectives under FSDP, so every process calls them
    full = _full_state_options(cpu_offload=True)
    state = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=full)
    rng = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    # the last line of defence: a checkpoint never holds NaN/inf weights (every process checks
    # the EMA, which it holds whole and which follows the model, so all refuse alike)
    for name, tensors in (("model", state), ("EMA", ema.state_dict())):
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(
                f"refusing to write checkpoint step {step}: the {name} weights {', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''} are not finite; the checkpoints written before are kept"
            )
    if accelerator.is_main_process:
        config_text = _config_text(ema.model, model_metadata)
        opt_tensors, opt_rest = _split_optimizer_state(optim_state)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        trainer = {"step": step, "format": "ditx-train-state", **(extra or {})}
        with atomic_write(target, directory=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
            pause_point(f"checkpoint:{step}")  # tests kill the process here, mid-write
            _write_model_files(tmp / EMA_DIR, config_text, ema.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            (tmp / "scaler.json").write_text(json.dumps(scaler))
            for rank, (tensors, rest) in enumerate(rng):
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng_{rank}.safetensors"))
                (tmp / f"rng_{rank}.json").write_text(json.dumps(rest))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer, indent=2))
            files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}  # fmt: skip
            (tmp / MANIFEST_NAME).write_text(json.dumps({"step": step, "files": files}, indent=2))
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                _remove(old)
    accelerator.wait_for_everyone()
    return target


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first (temporaries excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name)]
    return sorted(found, key=lambda p: p.name)


def remove_unfinished(root: str | os.PathLike) -> list[str]:
    """Delete the temporaries of checkpoint writes that never finished (a process killed while
    writing: ``.step_XXXXXXXX.<random>.tmp``/``.old``); returns their names. Only complete,
    renamed checkpoints are ever resumed, so these hold nothing to keep."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"\.step_\d{8}\.[0-9a-f]+\.(tmp|old)", p.name)]
    for p in found:
        _remove(p)
    return sorted(p.name for p in found)


def verify_checkpoint(path: str | os.PathLike, files: Collection[str] | None = None) -> str | None:
    """Why the checkpoint at ``path`` is incomplete or corrupt, or None if it is intact.

    Every file of the manifest must exist with its size; the SHA-256 is checked for the
    ``files`` that will be read (all when None): sampling reads the weights it samples with,
    not the optimizer states (for DiT-XL/2, 2.7 of a checkpoint's 11 GB).
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (json.JSONDecodeError, OSError) as e:
        return f"unreadable manifest.json ({e})"
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if (files is None or name in files) and file_sha256(f) != meta["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupt)"
    return None


def find_resumable(root: str | os.PathLike, quiet: bool = False, files: Collection[str] | None = None) -> Path | None:
    """The newest intact checkpoint under ``root`` (``files``: those that will be read, see
    ``verify_checkpoint``); broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path, files)
        if problem is None:
            return path
        if not quiet:
            warnings.warn(f"skipping checkpoint {path}: {problem}; falling back to the previous one", stacklevel=2)
    return None


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    rank: int = 0,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote into live objects; returns ``trainer_state``.

    ``verify=False`` skips the hashes when the caller has just verified the checkpoint.

    ``model`` and ``optimizer`` may be plain or prepared by accelerate (DDP, FSDP1, FSDP2):
    every process reads the full states and loads its part.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    problem = verify_checkpoint(path) if verify else None
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
    weights = load_file(str(path / "model.safetensors"))
    try:
        set_model_state_dict(model, weights, options=_full_state_options(strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"weights from {path / 'model.safetensors'} do not fit the model: {e}") from None
    ema.load_state_dict(load_file(str(path / EMA_DIR / WEIGHTS_NAME)))
    opt = _join_optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                json.loads((path / "optimizer.json").read_text()))  # fmt: skip
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), opt, options=_full_state_options())
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    scaler_state = json.loads((path / "scaler.json").read_text())
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    rng_file = path / f"rng_{rank}.safetensors"
    if not rng_file.is_file():  # resuming with more processes than were saved
        warnings.warn(f"{path} has no RNG state for process {rank}; using process 0's", stacklevel=2)
        rng_file = path / "rng_0.safetensors"
    set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))
    return json.loads((path / "trainer_state.json").read_text())
