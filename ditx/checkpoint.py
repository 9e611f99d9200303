"""Checkpoints: atomic writes, the ditx model format, and import of official DiT weights.

A ditx model checkpoint is a directory::

    OUT/
      config.json        # DiT(**config) rebuilds the model; plus "format": "ditx-model"
      model.safetensors  # its state dict

written with ``atomic_write``: everything goes to a temporary sibling that is fsynced
and then renamed onto ``OUT``, so a crash or bad input never leaves half a checkpoint.

facebookresearch/DiT state dicts load with ``load_official_dit``. ditx's ``DiT`` uses
the official parameter names, with one exception: the official model stores its fixed
2D sin-cos ``pos_embed`` as a (frozen) parameter, while ditx computes position codes in
the tokenizer. Conversion checks that the stored codes are the ones ditx computes and
drops them. ``official_dit_keys`` is the one place the official key layout is written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditx.dit import DIT_PRESETS, DIT_SIZES, DiT
from ditx.files import pause_point

MODEL_FORMAT = "ditx-model"
MODEL_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# keys of config.json that describe the file, not DiT(**config) arguments
_FILE_KEYS = ("format", "format_version", "ditx_version", "metadata")

# Official keys that ditx computes instead of storing.
OFFICIAL_COMPUTED_KEYS = ("pos_embed",)
POS_EMBED_ATOL = 1e-5


class CheckpointError(ValueError):
    """A checkpoint or state dict that cannot be read, converted or loaded (the message says why)."""


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory entry list (no-op where directories can't be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_path(Path(root, name))
            _fsync_path(Path(root))
    else:
        _fsync_path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sibling(path: Path, tag: str) -> Path:
    # hidden, unique, in the same directory (so the final rename stays on one filesystem)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{tag}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Write ``path`` all at once: yields a temporary path to write, renamed onto ``path`` on success.

    The temporary file (or, with ``directory=True``, an empty directory) sits next to
    ``path``. When the block finishes, its contents are fsynced and it replaces ``path``
    (``os.replace``; an existing directory is first moved aside and deleted after the
    swap). If the block raises, the temporary is removed and ``path`` is left as it was.
    With ``overwrite=False`` an existing ``path`` is a ``FileExistsError``.

    ::

        with atomic_write("ckpt/step-1000", directory=True) as tmp:
            save_file(state, tmp / "model.safetensors")
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; remove it or choose another output path")
    if path.exists() and path.is_dir() != directory:
        error = IsADirectoryError if path.is_dir() else NotADirectoryError
        kind = "a directory" if path.is_dir() else "a file"
        raise error(f"{path} is {kind}; cannot replace it with a {'directory' if directory else 'file'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary path {tmp} for {path}")
        _fsync_tree(tmp)
        if directory and path.exists():
            # rename() cannot replace a non-empty directory: swap through a moved-aside copy
            old = _sibling(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        _remove(tmp)
        raise


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
    from safetensors.torch import save_file

    import ditx

    config = getattr(model, "config", None)
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
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"  # fails here, before anything is written
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    with atomic_write(out_dir, directory=True, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(text)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        # safetensors may create its file private (0600); give it the permissions of config.json (umask)
        os.chmod(tmp / WEIGHTS_NAME, (tmp / CONFIG_NAME).stat().st_mode & 0o777)
    return out_dir


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


def load_model(path: str | os.PathLike) -> DiT:
    """Rebuild a ``DiT`` from a checkpoint directory written by ``save_model`` (on CPU, in eval mode)."""
    path = Path(path)
    document = read_model_config(path)
    config = {k: v for k, v in document.items() if k not in _FILE_KEYS}
    try:
        model = _build_for_loading(lambda: DiT(**config))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot build the model described by {path / CONFIG_NAME}: {e}") from None
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{path} is incomplete: {weights_path} is missing")
    state_dict = _read_safetensors(weights_path)
    _load_weights(model, state_dict, str(weights_path))
    return model.eval()


# ---------------------------------------------------------------------------------------
# Reading state dicts
# ---------------------------------------------------------------------------------------

STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...: a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _unwrap_training_checkpoint(obj: Any) -> Any:
    """A facebookresearch/DiT training checkpoint's weights: ``"ema"`` (to sample with), else ``"model"``."""
    if isinstance(obj, Mapping):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.pt``/``.pth`` file (``torch.load``, weights only) or a ``.safetensors`` file.

    Training checkpoints of facebookresearch/DiT (a dict with ``"model"``, ``"ema"``,
    ``"opt"``, ``"args"``) give their ``"ema"`` weights, or ``"model"`` when there is no EMA.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif suffix in (".pt", ".pth"):
        # DiT's training checkpoints also pickle the argparse Namespace of their arguments
        allow = getattr(torch.serialization, "safe_globals", None)
        guard = allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext()
        try:
            with guard:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot read {path} as a weights-only torch checkpoint ({first}); "
                "it may be truncated, or contain objects other than tensors"
            ) from None
    else:
        raise CheckpointError(f"unsupported checkpoint file {path}: expected one of {', '.join(STATE_DICT_SUFFIXES)}")
    obj = _unwrap_training_checkpoint(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state dict of tensors: entries {bad[:5]} are not (name, tensor) pairs")
    return obj


# ---------------------------------------------------------------------------------------
# Official facebookresearch/DiT checkpoints
# ---------------------------------------------------------------------------------------


def official_dit_keys(depth: int) -> list[str]:
    """Every key of a facebookresearch/DiT state dict with ``depth`` blocks, in its order.

    This is the single definition of the official layout; ditx's ``DiT`` has the same
    names minus ``OFFICIAL_COMPUTED_KEYS`` (``pos_embed``, which ditx computes).
    LayerNorms carry no parameters (no affine), so they have no keys.
    """
    keys = [
        "pos_embed",  # (1, N, D) fixed 2D sin-cos codes
        "x_embedder.proj.weight",  # (D, C, p, p)
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",  # (D, 256)
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",  # (num_classes + 1, D), last row: null class
    ]
    block_layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    for i in range(depth):
        keys += [f"blocks.{i}.{layer}.{kind}" for layer in block_layers for kind in ("weight", "bias")]
    keys += [f"final_layer.{layer}.{kind}" for layer in ("linear", "adaLN_modulation.1") for kind in ("weight", "bias")]
    return keys


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_official_keys(state_dict: Mapping[str, Any], depth: int) -> None:
    """Raise a ``CheckpointError`` naming missing and unexpected keys unless the keys are exactly the official ones."""
    expected = official_dit_keys(depth)
    expected_set = set(expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected_set]
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    hint = ""
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if prefixes & {"module", "_orig_mod"}:
        hint = " (keys saved from a DDP- or torch.compile-wrapped model: strip the 'module.'/'_orig_mod.' prefix)"
    raise CheckpointError(f"not a facebookresearch/DiT state dict with {depth} blocks: {'; '.join(problems)}{hint}")


@dataclass(frozen=True)
class OfficialDiTSpec:
    """The architecture of an official DiT state dict, read from its tensor shapes."""

    preset: str | None  # "DiT-XL/2", or None for sizes no preset has
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    in_channels: int
    out_channels: int
    num_classes: int
    input_size: int  # latent height = width the pos_embed was made for

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.patch_size
        return side, side

    def summary(self) -> str:
        name = self.preset or f"custom DiT (depth {self.depth}, hidden {self.hidden_size}, patch {self.patch_size})"
        sigma = ", learned sigma" if self.learn_sigma else ""
        return (
            f"{name}, {self.num_heads} heads, {self.num_classes} classes, "
            f"{self.in_channels}->{self.out_channels} channels{sigma}, "
            f"input {self.in_channels}x{self.input_size}x{self.input_size} ({self.grid[0]}x{self.grid[1]} tokens)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape_error(key: str, tensor: Tensor, expected: str) -> CheckpointError:
    return CheckpointError(f"{key} has shape {tuple(tensor.shape)}, expected {expected}")


def inspect_official_dit(state_dict: Mapping[str, Tensor], num_heads: int | None = None) -> OfficialDiTSpec:
    """Check the keys of an official DiT state dict strictly and infer its architecture from tensor shapes.

    Heads are not visible in the shapes: they come from the DiT preset with the same
    depth and hidden size, or from ``num_heads`` (needed when no preset matches).
    """
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    check_official_keys(state_dict, depth)
    if depth == 0:
        raise CheckpointError("the state dict has no transformer blocks (no blocks.N.* keys)")

    w = state_dict["x_embedder.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise _shape_error("x_embedder.proj.weight", w, "(hidden, in_channels, p, p)")
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])

    table = state_dict["y_embedder.embedding_table.weight"]
    if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] != hidden:
        raise _shape_error("y_embedder.embedding_table.weight", table, f"(num_classes + 1, {hidden})")
    num_classes = int(table.shape[0]) - 1

    final = state_dict["final_layer.linear.weight"]
    if final.ndim != 2 or final.shape[0] % (patch * patch) or final.shape[1] != hidden:
        raise _shape_error("final_layer.linear.weight", final, f"(out_channels * {patch}*{patch}, {hidden})")
    out_channels = int(final.shape[0]) // (patch * patch)

    pos = state_dict["pos_embed"]
    side = math.isqrt(int(pos.shape[1])) if pos.ndim == 3 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden or side * side != pos.shape[1] or side == 0:
        raise _shape_error("pos_embed", pos, f"(1, n*n, {hidden}) for a square n x n token grid")

    preset = None
    size = next((s for s, v in DIT_SIZES.items() if (v["depth"], v["hidden_size"]) == (depth, hidden)), None)
    if num_heads is None:
        if size is None:
            known = "; ".join(f"{s}: depth {v['depth']}, hidden {v['hidden_size']}" for s, v in DIT_SIZES.items())
            raise CheckpointError(
                f"no DiT preset has depth {depth} and hidden size {hidden} (presets: {known}); "
                "the number of attention heads cannot be read from the weights: pass num_heads (--num-heads)"
            )
        num_heads = DIT_SIZES[size]["num_heads"]
    if hidden % num_heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by num_heads={num_heads}")
    if size is not None and DIT_SIZES[size]["num_heads"] == num_heads and f"{size}/{patch}" in DIT_PRESETS:
        preset = f"{size}/{patch}"
    return OfficialDiTSpec(
        preset=preset,
        depth=depth,
        hidden_size=hidden,
        num_heads=num_heads,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
        num_classes=num_classes,
        input_size=side * patch,
    )


def load_official_dit(
    state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike, num_heads: int | None = None
) -> DiT:
    """A ditx ``DiT`` holding the weights of a facebookresearch/DiT checkpoint, in eval mode.

    Accepts a state dict, a training checkpoint dict (its ``"ema"`` weights) or a path
    (see ``read_state_dict``). Keys are checked strictly
    against ``official_dit_keys``; the architecture is read from the shapes (see
    ``inspect_official_dit``); ``pos_embed`` must equal the sin-cos codes ditx computes
    for that grid. The result is called like the official model, ``model(x, t, y)``,
    and gives the same outputs. Only class-conditional checkpoints trained with label
    dropout (a null-class row in the label table) have this layout, as all released ones do.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        source = str(state_dict_or_path)
        state_dict = read_state_dict(state_dict_or_path)
    else:
        source, state_dict = "the given state dict", _unwrap_training_checkpoint(state_dict_or_path)
    spec = inspect_official_dit(state_dict, num_heads)
    tokenizer = dict(
        name="patch2d", patch_size=spec.patch_size, in_channels=spec.in_channels, out_channels=spec.out_channels
    )

    def build() -> DiT:
        return DiT(
            tokenizer, depth=spec.depth, num_heads=spec.num_heads, hidden_size=spec.hidden_size,
            num_classes=spec.num_classes,
        )  # fmt: skip

    model = _build_for_loading(build)
    codes = model.x_embedder.position_codes(spec.grid)  # (N, D)
    given = state_dict["pos_embed"][0].detach().float().cpu()
    error = (given - codes).abs().max().item()
    if not error <= POS_EMBED_ATOL:  # also catches NaN
        raise CheckpointError(
            f"pos_embed of {source} is not the fixed 2D sin-cos code of a {spec.grid[0]}x{spec.grid[1]} grid "
            f"(max |difference| {error:.3g} > {POS_EMBED_ATOL}); ditx computes position codes and cannot "
            "load a learned or modified pos_embed"
        )
    weights = {k: v for k, v in state_dict.items() if k not in OFFICIAL_COMPUTED_KEYS}
    _load_weights(model, weights, source)
    return model.eval()


# ---------------------------------------------------------------------------------------
# Training checkpoints: everything needed to resume, verified by a manifest
# ---------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
_STEP_DIR = "step_{:08d}"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
) -> Path:
    """Write ``root/step_XXXXXXXX`` atomically on the main process; returns its path.

    Holds model, EMA (safetensors), optimizer (tensors in safetensors, the rest JSON),
    LR scheduler, grad scaler, every process's RNG states and ``trainer_state.json``;
    ``manifest.json`` (sizes and SHA-256 of every file) is written last and is what
    makes a checkpoint complete. Keeps the newest ``keep`` checkpoints (0 keeps all).
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
        opt_tensors, opt_rest = _split_optimizer_state(optim_state)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        trainer = {"step": step, "format": "ditx-train-state", **(extra or {})}
        with atomic_write(target, directory=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
            pause_point(f"checkpoint:{step}")  # tests kill the process here, mid-write
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))  # fmt: skip
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            (tmp / "scaler.json").write_text(json.dumps(scaler))
            for rank, (tensors, rest) in enumerate(rng):
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng_{rank}.safetensors"))
                (tmp / f"rng_{rank}.json").write_text(json.dumps(rest))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer, indent=2))
            files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
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
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
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
