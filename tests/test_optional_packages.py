"""A modality stands alone: with one modality's optional packages taken away (in a fresh
subprocess where importing them fails as if they were not installed), every shipped recipe
of the other modalities loads and trains two steps through the ``ditx`` command, and the
affected modality's recipes fail with a message naming the modality, the package and the
``pip install`` that brings it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomllib

from ditx import registry
from ditx.recipe import list_recipes
from ditx.text import save_tiny_t5

ROOT = Path(__file__).resolve().parents[1]

# a package is "not installed" when sys.modules holds None for it: importing it then raises
# ModuleNotFoundError (e.name = the package) and importlib.util.find_spec returns None, as
# for a package that is absent
DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    blocked, calls = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in blocked:
        sys.modules[name] = None
    from ditx.cli import main
    results = []
    for argv in calls:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
        results.append({"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
        from accelerate.state import AcceleratorState, GradientState  # one process, several runs
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    print("RESULTS " + json.dumps(results))
    """
)

SMALL_KL = {  # a few thousand parameters, f = 2: stands in for SD's VAE through the same from_pretrained path
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16,
}  # fmt: skip

SMALL_MODEL = ["model.preset=null", "model.depth=2", "model.hidden_size=32", "model.num_heads=2"]


def _two_steps(batch: int = 2) -> list[str]:
    return [
        "train.steps=2", f"train.batch_size={batch}", "train.checkpoint_every=2", "train.sample_every=0",
        "train.log_every=1", "train.num_workers=0", "sample.num_steps=2", "sample.num_samples=2",
        "sample.batch_size=2",
    ]  # fmt: skip


def _small_autoencoder_stage() -> list[str]:
    return ["autoencoder_train.steps=1", "autoencoder_train.batch_size=2", "autoencoder_train.log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small stand-ins for the paper recipes' data and pretrained VAE, written with every package present."""
    import trimesh
    from diffusers import AutoencoderKL
    from ditx.modalities.video.io import write_video
    from PIL import Image

    root = tmp_path_factory.mktemp("stand-ins")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(2):
            (root / "images" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "images" / cls / f"{i}.png")
            write_video(rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8), root / "clips" / cls / f"{i}.mp4")
    for cls, mesh in (("box", trimesh.creation.box()), ("ball", trimesh.creation.icosphere(subdivisions=1))):
        for i in range(8):  # the autoencoder stage holds out a tenth: at least 10 training meshes
            (root / "meshes" / cls).mkdir(parents=True, exist_ok=True)
            mesh.apply_scale(1.0 + 0.1 * i).export(root / "meshes" / cls / f"{i}.obj")
    AutoencoderKL(**SMALL_KL).save_pretrained(root / "vae")
    # captioned clips (a manifest) and a tiny T5 written with save_pretrained, for the text recipes
    rows = [f"clips/{cls}/{i}.mp4,a {cls} running" for cls in ("cat", "dog") for i in range(2)]
    (root / "captions.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    save_tiny_t5(root / "t5", ["a", "cat", "dog", "running"], dim=16, heads=2)
    return {"root": root, "cache": root / "cache", "runs": root / "runs"}


def train_calls(data: dict[str, Path], recipes: list[str], case: str) -> list[list[str]]:
    """``ditx train RECIPE ...`` for each recipe: the recipe itself, two steps, paper-scale sizes shrunk
    and its data and pretrained VAE pointed at the stand-ins (nothing can be downloaded here)."""
    root = data["root"]
    tiny_points = ["data.n_surface=256", "data.n_volume=512", "data.n_near=512", "data.query_size=256",
                   "data.uniform_points=256", "data.num_workers=0"]  # fmt: skip
    small_triplane = ["autoencoder.resolution=8", "autoencoder.latent_channels=2", "autoencoder.width=16",
                      "autoencoder.decoder_width=16", "autoencoder.decode_resolution=16"]  # fmt: skip
    overrides = {
        "image/digits": _two_steps(8),
        "image/dit-xl2-imagenet256": [
            f"data.root={root / 'images'}", "data.size=16", f"autoencoder.pretrained={root / 'vae'}",
            *SMALL_MODEL, *_two_steps(),
        ],
        "video/moving-digits": [
            f"data.root={root / 'moving'}", "data.num_clips_train=10", "data.num_clips_test=10",
            *_small_autoencoder_stage(), "autoencoder_train.num_workers=0", *_two_steps(),
        ],
        "video/moving-digits-text": [
            f"data.root={root / 'moving-text'}", "data.num_clips_train=10", "data.num_clips_test=10",
            *_small_autoencoder_stage(), "autoencoder_train.num_workers=0", *_two_steps(),
        ],
        "video/moving-digits-buckets": [
            f"data.root={root / 'moving-buckets'}", "data.num_clips_train=16", "data.num_clips_test=10",
            "data.buckets=[{size: [8, 32, 32], batch_size: 2}, {size: [12, 32, 32], batch_size: 2}, "
            "{size: [8, 32, 48], batch_size: 2}, {size: [12, 32, 48], batch_size: 2}]",
            "model.compile=false",  # two steps: compiling (model.compile: auto) would cost more than they do
            *_small_autoencoder_stage(), "autoencoder_train.num_workers=0", *_two_steps(),
        ],
        "video/latte-t2v": [
            f"data.root={root / 'captions.csv'}", "data.size=16", "data.num_frames=4", "data.frame_stride=1",
            f"autoencoder.pretrained={root / 'vae'}", f"text_encoder.pretrained={root / 't5'}",
            "text_encoder.dtype=float32", "text_encoder.max_length=8", *SMALL_MODEL, *_two_steps(),
        ],
        "video/latte-ucf101": [
            f"data.root={root / 'clips'}", "data.size=16", "data.num_frames=4", "data.frame_stride=1",
            f"autoencoder.pretrained={root / 'vae'}", *SMALL_MODEL, *_two_steps(),
        ],
        "shape3d/primitives": [
            f"data.root={root / 'primitives'}", "data.num_train=2", "data.num_test=1", *tiny_points,
            *small_triplane, *_small_autoencoder_stage(), *_two_steps(), "eval.num_samples=2",
        ],
        "shape3d/triplane-shapenet": [
            f"data.root={root / 'meshes'}", "data.test_fraction=0.2", *tiny_points, *small_triplane,
            "autoencoder.chunk_size=4096", *_small_autoencoder_stage(), *SMALL_MODEL, *_two_steps(),
        ],
    }
    missing = set(list_recipes()) - set(overrides)
    assert not missing, f"a shipped recipe has no two-step settings here: {missing}"
    return [
        ["train", name, *overrides[name], "--run-dir", str(data["runs"] / case / name.replace("/", "-"))]
        for name in recipes
    ]


def run_blocked(blocked: list[str], calls: list[list[str]], cache: Path) -> list[dict]:
    env = {**__import__("os").environ, "DITX_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(blocked), json.dumps(calls)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"driver failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


# (packages taken away, the modalities they belong to, the extra named in the message)
CASES = {
    "trimesh": (["trimesh"], {"shape3d"}, "trimesh"),
    "decord+av": (["decord", "av"], {"video"}, "decord"),
    "scikit-learn": (["sklearn"], {"image", "video"}, "scikit-learn"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_other_modalities_train_and_the_affected_one_says_what_to_install(case, data):
    blocked, affected, package = CASES[case]
    recipes = sorted(list_recipes())
    usable = [r for r in recipes if r.split("/")[0] not in affected]
    unusable = [r for r in recipes if r.split("/")[0] in affected]
    assert usable and unusable
    calls = [["env"], *train_calls(data, usable, case), *(["recipes", "show", r] for r in unusable),
             *train_calls(data, unusable, case)]  # fmt: skip
    results = run_blocked(blocked, calls, data["cache"])

    env = results[0]  # ditx env names what is missing and for which modality
    assert env["rc"] == 0, env["stderr"]
    for modality in affected:
        line = next(line for line in env["stdout"].splitlines() if f"Modality {modality}:" in line)
        assert "unusable" in line and package in line and f'pip install "ditx[{modality}]"' in line, line
    for modality in {"image", "video", "shape3d"} - affected:
        assert f"Modality {modality}:" in env["stdout"] and "usable" in env["stdout"]
    for result in results[1 : 1 + len(usable)]:
        name = result["argv"][1]
        assert result["rc"] == 0, f"{name} failed with {blocked} missing:\n{result['stderr'][-3000:]}"
        run = data["runs"] / case / name.replace("/", "-")
        assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file(), name
        assert any((run / "samples").rglob("*.*")), f"{name} wrote no preview samples"
    for result in results[1 + len(usable) :]:
        name = result["argv"][1] if result["argv"][0] == "train" else result["argv"][2]
        modality = name.split("/")[0]
        assert result["rc"] == 2, f"{name} should fail with {blocked} missing: {result}"
        message = result["stderr"].strip()
        assert len(message.splitlines()) == 1, message  # a one-line error, not a traceback
        assert f"'{modality}' modality" in message and package in message, message
        assert f'pip install "ditx[{modality}]"' in message, message


def test_declared_packages_match_the_extras_in_pyproject():
    """What a modality checks for is what its pip extra installs (and nothing more)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        out = set()
        for req in extras[extra]:
            name = req.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip()
            out |= names(req.split("[")[1].split("]")[0]) if name == "ditx" else {name}
        return out

    registry.load_plugins()
    for name in ("image", "video", "shape3d"):
        modality = registry.modalities[name]
        assert modality.extra == name
        assert set(modality.requires.values()) == names(name), name


def test_plugin_imports_nothing_but_the_registry():
    """Importing the built-in plugins (what every registry lookup does) needs none of their packages."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("trimesh", "decord", "av", "sklearn", "skimage", "torchmetrics", "scipy", "networkx"):
            sys.modules[name] = None
        from ditx import registry
        registry.load_plugins()
        print(sorted(registry.tokenizers.names()))
        print(sorted(m for m in sys.modules if m.startswith("ditx.modalities.") and m.count(".") > 2))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    tokenizers, modules = out.stdout.splitlines()
    assert {"patch2d", "tubelet", "triplane"} <= set(eval(tokenizers))
    assert eval(modules) == []  # only the packages' __init__ (registration) ran
