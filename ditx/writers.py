"""The writer contract: how a modality's samples become files a person can open."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Writer(Protocol):
    """A function registered in ``ditx.registry.writers`` that writes one batch of samples.

    ``writer(samples, out_dir, labels=None) -> list[Path]``:

    - ``samples``: decoded samples ``(N, *data_shape)`` on the CPU, in the data's range
      (what the autoencoder's ``decode`` returns), e.g. images in [-1, 1];
    - ``out_dir``: a folder (created if missing) that the writer fills with files a person
      can open without ditx: PNG grids, MP4/GIF clips, OBJ/GLB meshes, plots;
    - ``labels``: ``(N,)`` the classes the samples were generated for, or None; a writer
      shows them (e.g. one grid row per class, the class in each file name);
    - returns the paths it wrote.

    The writer registered under the recipe's ``modality`` writes previews during training,
    ``ditx sample``'s output and the autoencoder previews of ``ditx train-autoencoder``;
    ``<modality>-<format>`` writers add formats (``ditx sample --format npz``).
    """

    def __call__(self, samples: Tensor, out_dir: str | os.PathLike, labels: Tensor | None = None) -> list[Path]: ...


def writer_for(modality: str, fmt: str | None = None) -> Writer:
    """The registered writer of ``modality``, or of its extra format ``fmt`` (``<modality>-<fmt>``)."""
    from ditx.registry import writers

    if fmt is None:
        return writers.get(modality)
    name = f"{modality}-{fmt}"
    if name not in writers:
        known = [n.split("-", 1)[1] for n in writers.names() if n.startswith(f"{modality}-")]
        raise ValueError(f"no {fmt!r} output for {modality}; formats: {', '.join(known) or '(none)'}")
    return writers.get(name)
