"""Files that are never lost: atomic writes, hashes, output folders never overwritten silently,
fingerprints of data files, and the one cache-folder rule.

``atomic_write``: everything goes to a temporary sibling that is fsynced and then renamed
onto the target, so a crash or bad input never leaves half a file or folder.

Every job that writes a folder (a training run, an autoencoder, a latent cache, samples)
asks :func:`claim_output_folder` first: a folder that already holds files is refused with
an error naming what is there and what to do (``--resume``, another ``--out``, or
``--overwrite``); ``overwrite=True`` says what it deletes, then deletes it. A typo'd rerun
of last night's command therefore stops before it writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path


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
    With ``overwrite=False`` an existing ``path`` is a ``FileExistsError``; for a directory
    also one that appears while the block runs (processes racing to write the same thing:
    the first one's stays).

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
        if directory and not overwrite:
            try:  # rename() refuses a non-empty target: of writers racing for ``path``, the first wins
                os.rename(tmp, path)
            except OSError as e:
                if path.exists():
                    raise FileExistsError(f"{path} already exists (written meanwhile by another process)") from e
                raise
        elif directory and path.exists():
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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OutputExistsError(FileExistsError):
    """An output folder already holds files and neither resuming nor overwriting was asked for."""


def folder_entries(path: str | os.PathLike) -> list[Path]:
    """What ``path`` holds (empty if it does not exist); an error if it is a file."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_dir():
        raise OutputExistsError(f"{path} exists and is a file, not a folder; choose another output folder")
    return sorted(path.iterdir())


def claim_output_folder(
    path: str | os.PathLike, *, overwrite: bool, what: str, holds: str = "", instead: str = ""
) -> None:
    """Make sure writing into ``path`` destroys nothing unasked.

    An empty or missing folder is fine. A folder with files raises :class:`OutputExistsError`
    naming ``what`` it holds (``holds``: e.g. "checkpoints up to step_00000120") and the
    options (``instead``, e.g. "continue it with --resume", and ``--overwrite``). With
    ``overwrite=True`` it prints what it deletes, then empties the folder.
    """
    path = Path(path)
    entries = folder_entries(path)
    if not entries:
        return
    names = ", ".join(p.name for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
    found = f"{what} ({holds})" if holds else f"{what} ({names})"
    if not overwrite:
        options = f"{instead}, or " if instead else ""
        raise OutputExistsError(
            f"{path} already holds {found}; nothing was written. To keep it, {options}choose another folder; "
            f"to delete it and start over, pass --overwrite"
        )
    print(f"--overwrite: deleting {found} in {path} ({len(entries)} entries: {names})", file=sys.stderr, flush=True)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def unique_folder(path: str | os.PathLike) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist yet."""
    path = Path(path)
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate


def files_fingerprint(root: str | os.PathLike, relative_paths: Iterable[str]) -> str:
    """SHA-256 over each file's relative path, size and modification time (ns).

    Cheap (one ``stat`` per file, no reading) and changes when a file is added, removed,
    renamed, replaced or rewritten, even with the same count: what a cache of data derived
    from these files must notice. A file that has gone missing counts as size -1.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for rel in sorted(str(p) for p in relative_paths):
        try:
            st = (root / rel).stat()
            facts = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            facts = "-1:-1"
        digest.update(f"{rel}\0{facts}\n".encode())
    return digest.hexdigest()


PAUSE_ENV = "DITX_TEST_PAUSE"  # "step:15" or "checkpoint:20": where a test stops the process
PAUSE_MARKER_ENV = "DITX_TEST_PAUSE_MARKER"  # a file created when the pause begins


def pause_point(point: str) -> None:
    """A test hook: when ``$DITX_TEST_PAUSE`` equals ``point``, create ``$DITX_TEST_PAUSE_MARKER``
    and wait forever, so a test can kill the process at exactly this point (between steps,
    or while a checkpoint is half written). Does nothing otherwise."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    import time

    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        Path(marker).write_text(point)
    while True:
        time.sleep(60)


def ditx_cache_dir(*parts: str) -> Path:
    """Where ditx keeps what it can rebuild (judges' classifiers, video probe indexes, mesh
    samples, generated tiny datasets): ``$DITX_CACHE``, else ``$XDG_CACHE_HOME/ditx``, else
    ``~/.cache/ditx``; ``parts`` are appended. The one rule every modality uses."""
    root = os.environ.get("DITX_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ditx"
    return base.joinpath(*parts)
