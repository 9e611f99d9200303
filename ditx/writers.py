"""The writer contract: how a modality's samples become files a person can open."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Writer(Protocol):
    """A function registered in ``ditx.registry.writers`` that writes one batch of samples.

    ``writer(samples, out_dir, labels=None[, captions]) -> list[Path]``:

    - ``samples``: decoded samples ``(N, *data_shape)`` on the CPU, in the data's range
      (what the autoencoder's ``decode`` returns), e.g. images in [-1, 1];
    - ``out_dir``: a folder (created if missing) that the writer fills with files a person
      can open without ditx: PNG grids, MP4/GIF clips, OBJ/GLB meshes, plots;
    - ``labels``: ``(N,)`` the classes the samples were generated for, or None; a writer
      shows them (e.g. one grid row per class, the class in each file name);
    - ``captions``: a text recipe's prompts, one per sample (passed only then, so a writer
      that never meets text may leave it out); a writer puts ``caption_slug(prompt)`` in each
      sample's file name (:func:`sample_stem` does both);
    - returns the paths it wrote.

    The writer registered under the recipe's ``modality`` writes previews during training,
    ``ditx sample``'s output and the autoencoder previews of ``ditx train-autoencoder``;
    ``<modality>-<format>`` writers add formats (``ditx sample --format npz``).
    """

    def __call__(self, samples: Tensor, out_dir: str | os.PathLike, labels: Tensor | None = None) -> list[Path]: ...


def caption_slug(caption: str, max_length: int = 40) -> str:
    """A short, file-name-safe slug of a prompt: ``"A 7 moving left, right!"`` -> ``a-7-moving-left-right``.

    Lower-case ASCII letters and digits joined by ``-``, cut at a word boundary within
    ``max_length`` characters; ``"empty"`` for a caption without any."""
    import re
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", caption).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        longer = f"{slug}-{word}" if slug else word
        if len(longer) > max_length:
            break
        slug = longer
    return slug or (words[0][:max_length] if words else "empty")


def sample_stem(index: int, labels: Tensor | None = None, captions: list[str] | None = None,
                prefix: str = "sample_") -> str:  # fmt: skip
    """A sample's file name without extension: ``sample_00003[_class7][_a-7-moving-left-and-right]``."""
    stem = f"{prefix}{index:05d}"
    if labels is not None:
        stem += f"_class{int(labels[index])}"
    if captions is not None:
        stem += f"_{caption_slug(captions[index])}"
    return stem


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
