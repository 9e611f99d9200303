"""Sampling and evaluation jobs on a trained tiny run, and sampling a converted model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ditx.build import build_components
from ditx.checkpoint import save_model
from ditx.evaluate import evaluate_run
from ditx.files import OutputExistsError
from ditx.generation import generate
from ditx.pipeline import train_recipe
from ditx.recipe import load_recipe
from ditx.sample import sample_from
from ditx.train import train


@pytest.fixture
def tiny_run(tiny_recipe, tmp_path):
    return train(tiny_recipe(train={"steps": 2}, eval={"metrics": ["digits"], "num_samples": 30, "batch_size": 30}),
                 run_dir=tmp_path / "run")  # fmt: skip


def test_sample_writes_a_grid_and_labelled_pngs(tiny_run, tmp_path):
    out = sample_from(tiny_run, num=6, out=tmp_path / "samples")
    names = sorted(p.name for p in out.iterdir())
    assert names[:6] == [f"{i:05d}_class{i}.png" for i in range(6)] and "grid.png" in names
    img = Image.open(out / "00003_class3.png")
    assert img.size == (8, 8) and img.mode == "L"
    # a checkpoint directory works as well as the run, with overrides
    ckpt_dir = tiny_run / "checkpoints" / "step_00000002"
    out2 = sample_from(ckpt_dir, num=2, out=tmp_path / "s2", overrides=["sample.num_steps=2"], fmt="npz")
    assert (out2 / "grid.png").is_file()
    import numpy as np

    npz = np.load(out2 / "samples.npz")
    assert npz["arr_0"].shape == (2, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="no 'mp4' output for image; formats: npz"):
        sample_from(ckpt_dir, num=1, out=tmp_path / "s3", fmt="mp4")


def test_sample_output_folder_is_never_overwritten_silently(tiny_run, tmp_path, capsys):
    out = sample_from(tiny_run, num=2, out=tmp_path / "samples")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match=r"already holds samples.*--out DIR.*--overwrite"):
        sample_from(tiny_run, num=2, out=out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "notes.txt").write_text("old")
    sample_from(tiny_run, num=2, out=out, overwrite=True)  # says what it deletes, keeps nothing old
    assert "--overwrite: deleting samples" in capsys.readouterr().err
    assert not (out / "notes.txt").exists() and (out / "grid.png").is_file()
    default = sample_from(tiny_run, num=1)  # the default folder inside the run is guarded the same way
    with pytest.raises(OutputExistsError):
        sample_from(tiny_run, num=1)
    assert default.parent == tiny_run / "samples"


def test_sample_data_size_samples_another_resolution(tiny_run, tmp_path):
    from ditx.build import load_for_sampling

    recipe, parts, model = load_for_sampling(tiny_run, overrides=["sample.data_size=[12,16]", "sample.num_steps=2"])
    assert parts.latent_shape == (1, 12, 16) and parts.data_shape == (1, 12, 16)
    samples, _ = generate(parts, model, 2, "cpu")
    assert samples.shape == (2, 1, 12, 16) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match=r"width size 15 is not divisible by the patch size 2"):
        load_for_sampling(tiny_run, overrides=["sample.data_size=[12,15]"])
    with pytest.raises(ValueError, match=r"must give 2 sizes like the training data's \[8, 8\]"):
        load_for_sampling(tiny_run, overrides=["sample.data_size=[4,12,16]"])


def test_generation_does_not_depend_on_the_batch_size(tiny_run):
    from ditx.build import load_for_sampling

    recipe, parts, model = load_for_sampling(tiny_run)
    recipe.sample.batch_size = 5
    a, la = generate(parts, model, 10, "cpu")
    recipe.sample.batch_size = 10
    b, lb = generate(parts, model, 10, "cpu")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(la, torch.arange(10) % 10)


def test_eval_writes_metrics_and_protocol(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    results = evaluate_run(tiny_run)
    doc = json.loads((tiny_run / "metrics.json").read_text())
    assert set(results) >= {"class_accuracy", "fid", "kid"} and doc["metrics"] == results
    assert 0.0 <= results["class_accuracy"] <= 1.0 and results["fid"] > 0
    protocol = doc["protocol"]
    assert protocol["num_samples"] == 30 and protocol["scheduler"] == "ddim" and protocol["weights"] == "ema"
    assert protocol["checkpoint"].endswith("step_00000002")
    assert protocol["reference"]["size"] == 355  # the held-out digits
    assert "digits" in protocol["metrics"]


def test_eval_records_the_guidance_interval_and_network_evaluations(tiny_run, tmp_path, monkeypatch):
    """DDIM at 4 steps visits t = 999, 749, 499, 249: with guidance over levels [0, 0.5] two steps
    are guided (2 evaluations each) and two are not (1 each)."""
    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "interval.json"
    overrides = ["sample.num_steps=4", "sample.guidance_scale=2.0", "sample.guidance_interval=[0.0,0.5]"]
    evaluate_run(tiny_run, overrides, out=out)
    protocol = json.loads(out.read_text())["protocol"]
    assert protocol["guidance_interval"] == [0.0, 0.5] and protocol["network_evaluations"] == 6
    evaluate_run(tiny_run, overrides[:2], out=out)
    assert json.loads(out.read_text())["protocol"]["network_evaluations"] == 8


def test_sampling_a_model_directory_needs_a_matching_recipe(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    parts = build_components(recipe)
    save_model(parts.model, tmp_path / "model")
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(recipe.to_yaml())
    with pytest.raises(ValueError, match="pass --recipe"):
        sample_from(tmp_path / "model", num=2)
    out = sample_from(tmp_path / "model", num=2, out=tmp_path / "s", recipe=recipe_file,
                      overrides=["sample.num_steps=2"])  # fmt: skip
    assert (out / "grid.png").is_file()
    with pytest.raises(ValueError, match="does not match the recipe's model"):
        sample_from(tmp_path / "model", num=2, recipe=recipe_file, overrides=["model.depth=3"])


def test_official_dit_converts_and_samples_through_the_paper_recipe(tmp_path):
    """facebookresearch/DiT layout -> `ditx convert` -> `ditx sample --recipe image/dit-xl2-imagenet256`
    (DiT-S/2 instead of XL/2 and a tiny random SD-VAE-shaped VAE, to stay small)."""
    import numpy as np
    from diffusers import AutoencoderKL

    from ditx.cli import main
    from ditx.dit import build_dit
    from ditx.positions import sincos_nd

    torch.manual_seed(0)
    model = build_dit("DiT-S/2", num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    official = {"pos_embed": torch.from_numpy(sincos_nd(384, (4, 4))).float()[None], **model.state_dict()}
    torch.save(official, tmp_path / "DiT-S-2-64.pt")
    assert main(["convert", "dit-official", str(tmp_path / "DiT-S-2-64.pt"), str(tmp_path / "dit")]) == 0
    # SD-VAE's shape: 4 latent channels, 8x downsampling (3 halvings), tiny widths
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    out = sample_from(
        tmp_path / "dit", num=3, out=tmp_path / "samples", recipe="image/dit-xl2-imagenet256", fmt="npz",
        overrides=["model.preset=DiT-S/2", f"autoencoder.pretrained={tmp_path / 'vae'}", "sample.num_steps=3"],
    )  # fmt: skip
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (3, 64, 64, 3)  # 8x8 latents decoded by the 8x VAE
    assert (out / "grid.png").is_file()


def test_sampling_a_run_loads_its_model_without_building_a_random_one(tiny_run, tmp_path, monkeypatch):
    """The model comes from the checkpoint's ema/ model directory (built on the meta device,
    given the weights); the recipe's random-initialised DiT is never built."""
    import ditx.build
    import ditx.checkpoint as ckpt

    def no_model(*args, **kwargs):
        raise AssertionError("sampling built the recipe's DiT")

    monkeypatch.setattr(ditx.build, "build_model", no_model)
    _, parts, model = ditx.build.load_for_sampling(tiny_run)
    newest = ckpt.list_checkpoints(tiny_run / "checkpoints")[-1]
    expected = ckpt.load_model(newest / "ema").state_dict()
    assert parts.model is model and model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_sampling_and_eval_hash_only_the_files_they_read(tiny_run, tmp_path, monkeypatch):
    """Verification checks what is read, when it is read: never the optimizer states."""
    import ditx.checkpoint as ckpt

    hashed = []
    real = ckpt.file_sha256
    monkeypatch.setattr(ckpt, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    sample_from(tiny_run, num=2, out=tmp_path / "s")
    assert sorted(hashed) == ["config.json", "model.safetensors"]  # ema/: the model directory read
    hashed.clear()
    evaluate_run(tiny_run, overrides=["eval.num_samples=10", "eval.batch_size=10"])
    assert sorted(hashed) == ["config.json", "model.safetensors"]  # ema/: the model directory read
    # a corrupt optimizer state does not stop sampling from that checkpoint (it is not read) ...
    newest = tiny_run / "checkpoints" / "step_00000002"
    data = bytearray((newest / "optimizer.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.safetensors").write_bytes(bytes(data))
    from ditx.build import load_for_sampling

    assert load_for_sampling(tiny_run)[1].source == newest
    # ... while resuming, which reads it, refuses that checkpoint
    assert ckpt.verify_checkpoint(newest) is not None


@pytest.mark.slow
def test_a_moved_two_stage_run_samples_and_evaluates_from_anywhere(tiny_recipe, tmp_path, monkeypatch):
    """A run folder refers to what it holds (the first stage's autoencoder) relative to itself."""
    import shutil

    recipe = tiny_recipe(
        data={"size": 16, "channels": 3},
        autoencoder={"name": "sd-vae", "config": "tiny"},
        autoencoder_train={"first_stage": True, "steps": 2, "batch_size": 8},
        train={"steps": 2},
        eval={"metrics": ["digits"], "num_samples": 20, "batch_size": 20},
    )
    run = train_recipe(recipe, run_dir=tmp_path / "a" / "run")
    assert "${run}/autoencoder" in (run / "config.yaml").read_text()
    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(str(run), str(moved))
    monkeypatch.chdir(tmp_path)  # another working directory, and the old folder is gone
    out = sample_from(moved, num=2)
    assert (out / "grid.png").is_file()
    assert "class_accuracy" in evaluate_run(moved)
    # and it continues training there from its own config.yaml, with the autoencoder it holds
    again = train_recipe(load_recipe(moved / "config.yaml", ["train.steps=3"]), run_dir=moved, resume=True)
    assert again == moved and (moved / "checkpoints" / "step_00000003").is_dir()
    assert "${run}/autoencoder" in (moved / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"refers to a run's own files \(\$\{run\}/autoencoder\).*--run-dir"):
        train_recipe(load_recipe(moved / "config.yaml"))


def test_steps_benchmark_tables_samplers_by_network_evaluations_and_its_rows_are_ditx_eval(
    tiny_recipe, tmp_path, monkeypatch
):
    """benchmarks/bench_steps.py on a 2-step run guided at 2.0: the 50-step reference at two
    seeds, then each sampler and interval; every row is `ditx eval RUN <its overrides>`."""
    import sys
    from types import SimpleNamespace

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("bench_steps", None)
    import bench_steps

    run = train(tiny_recipe(train={"steps": 2}, sample={"guidance_scale": 2.0},
                            eval={"metrics": ["digits"], "num_samples": 20, "batch_size": 20}),
                run_dir=tmp_path / "run")  # fmt: skip
    args = SimpleNamespace(steps=[2], schedulers=["ddim", "unipc"], intervals=["none", "0.0,0.5"],
                           interval_scheduler="unipc", out=tmp_path / "steps.json")  # fmt: skip
    doc = bench_steps.quality_table(run, args)
    assert doc["reference"]["nfe"] == 100 and doc["reference"]["overrides"][:2] == [
        "sample.scheduler=ddim", "sample.num_steps=50"]  # fmt: skip
    # DDIM and UniPC at 2 steps, guided throughout: 4; UniPC's t = 999, 500 with guidance over [0, 0.5]: 1 + 2
    assert [(bench_steps.sampler_name(r), r["nfe"]) for r in doc["rows"]] == [
        (("ddim", 2, None), 4), (("unipc", 2, None), 4), (("unipc", 2, [0.0, 0.5]), 3)]  # fmt: skip
    assert set(doc["tolerances"]) == {"fid", "class_accuracy"}
    assert json.loads((tmp_path / "steps.json").read_text())["rows"][2]["nfe"] == 3
    again = evaluate_run(run, doc["rows"][2]["overrides"], out=tmp_path / "again.json")
    assert again == doc["rows"][2]["metrics"]
