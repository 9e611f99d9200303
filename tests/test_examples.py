"""Every example under examples/ runs as its documentation says, through the ``ditx`` command.

Each test names the documented command lines and first checks that the documentation still
says them word for word, then runs them (with fewer steps appended as overrides, and local
stand-ins where the example would download weights), so a documented path cannot break
silently: changing the docs or the code without the other fails here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def documented(doc: Path, *lines: str) -> None:
    text = doc.read_text()
    for line in lines:
        assert line in text, f"{doc.relative_to(ROOT)} no longer documents: {line}"


def ditx(args: str | list[str], *extra: str, env: dict | None = None, cwd: Path = ROOT) -> str:
    """Run ``ditx ARGS EXTRA...`` as the console script does; returns stdout's last line."""
    argv = [*(shlex.split(args) if isinstance(args, str) else args), *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "ditx.cli", *argv], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"ditx {shlex.join(argv)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


FEW_STEPS = ["train.steps=4", "train.checkpoint_every=4", "train.log_every=2", "train.batch_size=16"]
FEW_SAMPLES = ["sample.num_steps=4", "sample.num_samples=10", "sample.batch_size=10"]


@pytest.mark.slow
def test_custom_tokenizer_installs_trains_samples_and_evaluates(tmp_path):
    doc = ROOT / "docs" / "tokenizers.md"
    documented(
        doc,
        "pip install -e examples/custom_tokenizer",
        "run=$(ditx train examples/custom_tokenizer/digits_rows.yaml)",
        'ditx sample "$run"',
        'ditx eval "$run"',
    )
    site = tmp_path / "site"
    _install(EXAMPLES / "custom_tokenizer", site)
    assert list(site.glob("ditx_rows-*.dist-info"))
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "DITX_CACHE": str(tmp_path / "cache")}
    run = ditx(
        "train examples/custom_tokenizer/digits_rows.yaml", *FEW_STEPS, "train.output_dir=" + str(tmp_path / "runs"),
        env=env,
    )  # fmt: skip
    config = (Path(run) / "config.yaml").read_text()
    assert "name: rows" in config
    samples = Path(ditx(["sample", run, *FEW_SAMPLES], env=env))
    assert (samples / "grid.png").is_file()
    ditx(["eval", run, *FEW_SAMPLES, "eval.num_samples=20", "eval.batch_size=20"], env=env)
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["class_accuracy"] <= 1.0
    # without the package installed, the recipe's tokenizer is unknown and the error lists the known ones
    proc = subprocess.run(
        [sys.executable, "-m", "ditx.cli", "train", "examples/custom_tokenizer/digits_rows.yaml"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown tokenizer 'rows'" in proc.stderr and "patch2d" in proc.stderr


@pytest.mark.slow
def test_own_images_readme_runs_on_exported_digits(tmp_path):
    doc = EXAMPLES / "own_images" / "README.md"
    documented(
        doc,
        "cp examples/own_images/my_images.yaml my_images.yaml",
        "ditx train my_images.yaml data.root=toy_digits data.flip=false train.steps=300",
        'ditx sample "$run" --num 64 --out samples/',
    )
    # the README's export of scikit-learn's digits, as written there
    export = doc.read_text().split('python -c "', 1)[1].split('"\n', 1)[0]
    subprocess.run([sys.executable, "-c", export], check=True, cwd=tmp_path, timeout=120)
    assert len(list((tmp_path / "toy_digits").rglob("*.png"))) == 1797
    (tmp_path / "my_images.yaml").write_bytes((EXAMPLES / "own_images" / "my_images.yaml").read_bytes())
    env = {"PYTHONPATH": str(ROOT)}
    run = ditx(
        "train my_images.yaml data.root=toy_digits data.flip=false train.steps=300", *FEW_STEPS,
        "train.num_workers=0", env=env, cwd=tmp_path,
    )  # fmt: skip
    out = ditx(["sample", run, "--num", "10", "--out", "samples/", *FEW_SAMPLES], env=env, cwd=tmp_path)
    assert (tmp_path / out / "grid.png").is_file()
    assert len(list((tmp_path / out).glob("0000?_class?.png"))) == 10


@pytest.mark.slow
def test_own_clips_readme_caches_trains_and_samples(tmp_path):
    pytest.importorskip("decord")
    from diffusers import AutoencoderKL
    from ditx.modalities.video.io import write_video

    doc = EXAMPLES / "own_clips" / "README.md"
    documented(
        doc,
        "ditx cache-latents examples/own_clips/my_clips.yaml data.root=clips",
        "ditx train examples/own_clips/my_clips.yaml data.root=clips",
        "ditx sample runs/my_clips-<date>-<time> --num 16",
    )
    rng = np.random.default_rng(0)
    for cls in ("jump", "run"):
        for i in range(3):
            write_video(rng.integers(0, 256, (10, 24, 32, 3), dtype=np.uint8), tmp_path / "clips" / cls / f"{i}.mp4")
    # SD's VAE would be downloaded: a small AutoencoderKL saved locally goes through the same from_pretrained
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16,
    ).save_pretrained(tmp_path / "vae")  # fmt: skip
    recipe = str(EXAMPLES / "own_clips" / "my_clips.yaml")
    small = ["data.size=16", "data.num_frames=4", f"autoencoder.pretrained={tmp_path / 'vae'}",
             "model.preset=null", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
             "train.num_workers=0", "train.output_dir=runs"]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT)}
    cache = ditx(["cache-latents", recipe, "data.root=clips", *small], env=env, cwd=tmp_path)
    assert (tmp_path / cache).is_dir() and any((tmp_path / cache).rglob("*.safetensors"))
    run = ditx(["train", recipe, "data.root=clips", *small, *FEW_STEPS, "train.batch_size=4"], env=env, cwd=tmp_path)
    assert Path(run).name.startswith("my_clips-")
    out = ditx(["sample", run, "--num", "2", *small, *FEW_SAMPLES], env=env, cwd=tmp_path)
    assert {"grid.mp4", "grid.gif"} <= {p.name for p in (tmp_path / out).iterdir()}


def _install(package: Path, site: Path) -> None:
    """A real install (a wheel built from its pyproject.toml, entry points and all) into a folder that
    only this test's processes see; an editable install would add it to every later test."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(package)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_a_fourth_modality_from_outside_trains_samples_and_evaluates(tmp_path):
    """examples/signals registers a tokenizer, dataset, metric and writer of its own through the
    entry point: the contracts ditx calls are the whole contract."""
    documented(
        EXAMPLES / "signals" / "README.md",
        "pip install -e examples/signals",
        "run=$(ditx train examples/signals/signals.yaml)",
        'ditx sample "$run"',
        'ditx eval "$run"',
    )
    site = tmp_path / "site"
    _install(EXAMPLES / "signals", site)
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    run = ditx("train examples/signals/signals.yaml train.steps=60 train.checkpoint_every=60",
               "train.output_dir=" + str(tmp_path / "runs"), env=env)  # fmt: skip
    samples = Path(ditx(["sample", run], env=env))
    assert {"signals.csv", "plot.png"} <= {p.name for p in samples.iterdir()}
    rows = (samples / "signals.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 and len(rows[1].split(",")) == 1 + 64  # header, 16 samples of 64 values
    ditx(["eval", run, "eval.num_samples=64"], env=env)
    metrics = json.loads((Path(run) / "metrics.json").read_text())["metrics"]
    assert metrics["reference_frequency_accuracy"] == 1.0  # the FFT judge on the data itself
    assert 0.0 <= metrics["frequency_accuracy"] <= 1.0


def test_every_example_has_a_test():
    tested = {"custom_tokenizer", "own_images", "own_clips", "signals"}
    assert {p.name for p in EXAMPLES.iterdir() if p.is_dir()} == tested
