"""Video and 3D end to end on tiny settings: train (real MP4s through decord; meshes through
trimesh, both stages) -> sample (MP4/GIF; OBJ/GLB/PNG) -> eval (metrics.json)."""

from __future__ import annotations

import json

import numpy as np
import torch

from ditx.evaluate import evaluate_run
from ditx.pipeline import train_recipe as train
from ditx.recipe import recipe_from_dict
from ditx.sample import sample_from


def tiny(tmp_path, modality, data, tokenizer, **sections):
    d = {
        "description": f"test: tiny {modality}",
        "modality": modality,
        "data": data,
        "tokenizer": tokenizer,
        "model": {"depth": 2, "hidden_size": 32, "num_heads": 2, "layout": "joint"},
        "objective": {"name": "rectified-flow"},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1,
                  "mixed_precision": "no", "output_dir": str(tmp_path / "runs"), "seed": 1},
        "sample": {"scheduler": "flow-euler", "num_steps": 2, "num_samples": 4, "batch_size": 4},
    }  # fmt: skip
    d.update(sections)
    return recipe_from_dict(d, source="tiny.yaml", name=f"test/{modality}")


def test_video_train_sample_eval(tmp_path, monkeypatch):
    import decord

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    data = {"name": "moving-digits", "root": str(tmp_path / "clips"), "num_frames": 4, "size": 24,
            "num_clips_train": 24, "num_clips_test": 10}  # fmt: skip
    recipe = tiny(
        tmp_path, "video", data, {"name": "tubelet", "patch_size": [2, 4, 4]},
        model={"depth": 2, "hidden_size": 32, "num_heads": 2, "layout": "spatial-temporal"},
        train={"steps": 2, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1, "num_workers": 1,
               "mixed_precision": "no", "output_dir": str(tmp_path / "runs"), "seed": 1},
        eval={"metrics": [{"name": "moving-digits", "classifier_clips": 60, "classifier_epochs": 1}],
              "num_samples": 10, "batch_size": 10},
    )  # fmt: skip
    assert len(list((tmp_path / "clips" / "train").rglob("*.mp4"))) == 0  # written by the dataset, not the test
    run = train(recipe, run_dir=tmp_path / "run")
    clips = sorted((tmp_path / "clips" / "train").rglob("*.mp4"))
    assert len(clips) == 24
    assert len(decord.VideoReader(str(clips[0]))) == 4
    out = sample_from(run, num=3, out=tmp_path / "samples")
    names = sorted(p.name for p in out.iterdir())
    assert {"grid.mp4", "grid.gif", "sample_00002_class2.mp4", "sample_00002_class2.gif"} <= set(names)
    assert len(decord.VideoReader(str(out / "sample_00000_class0.mp4"))) == 4
    # a model trained on 4 frames samples 8 (position codes per grid)
    out8 = sample_from(run, num=1, out=tmp_path / "s8", overrides=["sample.data_size=[8,24,24]"])
    assert len(decord.VideoReader(str(out8 / "sample_00000_class0.mp4"))) == 8
    results = evaluate_run(run)
    assert {"frame_accuracy", "clip_consistency", "motion_px", "fvd_digits"} <= set(results)
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["protocol"]["num_samples"] == 10 and "moving-digits" in doc["protocol"]["metrics"]


def test_shape3d_both_stages_sample_eval(tmp_path, monkeypatch):
    import trimesh

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    data = {"name": "primitives", "root": str(tmp_path / "meshes"), "num_train": 2, "num_test": 1,
            "n_surface": 256, "n_volume": 512, "n_near": 512, "uniform_points": 256}  # fmt: skip
    def recipe(steps):
        return tiny(
            tmp_path, "shape3d", data, {"name": "triplane", "patch_size": 2},
            autoencoder={"name": "triplane-ae", "resolution": 8, "latent_channels": 2, "width": 16,
                         "decoder_width": 16, "decode_resolution": 16},
            autoencoder_train={"first_stage": True, "steps": 3, "batch_size": 4, "cache_latents": True},
            train={"steps": steps, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1,
                   "mixed_precision": "no", "output_dir": str(tmp_path / "runs"), "seed": 1},
            eval={"metrics": [{"name": "shape3d", "n_points": 128, "emd_points": 16}], "num_samples": 4,
                  "batch_size": 4},
        )  # fmt: skip

    run = train(recipe(2), run_dir=tmp_path / "run")
    ae = json.loads((run / "autoencoder" / "metrics.json").read_text())
    assert 0.0 <= ae["iou"] <= 1.0 and ae["steps"] == 3
    assert "pretrained: ${run}/autoencoder" in (run / "config.yaml").read_text()  # relative to the run
    assert (run / "latents" / "index.json").is_file()  # stage 2 trained on latents encoded once
    # the resumed run keeps the trained autoencoder instead of training it again
    stamp = (run / "autoencoder" / "model.safetensors").stat().st_mtime_ns
    train(recipe(3), run_dir=run, resume=True)
    assert (run / "autoencoder" / "model.safetensors").stat().st_mtime_ns == stamp
    # sampling writes a preview, and meshes for samples with a surface; meshes load back
    g = 16
    axis = (torch.arange(g) + 0.5) / g - 0.5
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    from ditx.modalities.shape3d.io import write_shape_samples

    ball = (x**2 + y**2 + z**2 < 0.3**2).float()[None, None]
    paths = write_shape_samples(ball, tmp_path / "ball")
    mesh = trimesh.load(tmp_path / "ball" / "sample_00000.obj", force="mesh")
    assert mesh.is_watertight and abs(mesh.volume - 4 / 3 * np.pi * 0.3**3) < 0.02
    assert (tmp_path / "ball" / "preview.png") in paths
    out = sample_from(run, num=2, out=tmp_path / "samples")
    assert (out / "preview.png").is_file()
    results = evaluate_run(run)
    assert {"watertight", "empty"} <= set(results)


def test_video_latent_cache_means_training_never_decodes(tmp_path, monkeypatch):
    from ditx.modalities.video import data as video_data

    from ditx.cache import cache_latents

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    data = {"name": "moving-digits", "root": str(tmp_path / "clips"), "num_frames": 4, "size": 24,
            "num_clips_train": 12, "num_clips_test": 10, "flip": True}  # fmt: skip
    recipe = tiny(
        tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 2, 2]},
        autoencoder={"name": "framewise-vae", "config": "tiny", "chunk_size": 3},
        train={"steps": 2, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1,
               "latent_cache": str(tmp_path / "latents"), "mixed_precision": "no",
               "output_dir": str(tmp_path / "runs"), "seed": 1},
    )  # fmt: skip
    out = cache_latents(recipe)
    index = json.loads((out / "index.json").read_text())
    assert index["variants"] == 2  # the clip and its mirror: flipping stays an augmentation

    def no_decoding(*args, **kwargs):
        raise AssertionError("a training step decoded video")

    monkeypatch.setattr(video_data, "read_frames", no_decoding)
    run = train(recipe, run_dir=tmp_path / "run")
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_joint_image_video_training_samples_clips(tmp_path, monkeypatch):
    import decord

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    data = {"name": "moving-digits", "root": str(tmp_path / "clips"), "num_frames": 4, "size": 24,
            "num_clips_train": 12, "num_clips_test": 10, "image_frames": 2}  # fmt: skip
    recipe = tiny(
        tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 4, 4]},
        model={"depth": 2, "hidden_size": 32, "num_heads": 2, "layout": "spatial-temporal"},
    )
    run = train(recipe, run_dir=tmp_path / "run")
    state = json.loads((run / "checkpoints" / "step_00000002" / "ema" / "config.json").read_text())["metadata"]
    assert state["data_shape"] == [3, 4, 24, 24]  # the model generates clips; images only join training
    out = sample_from(run, num=1, out=tmp_path / "samples")
    assert len(decord.VideoReader(str(out / "sample_00000_class0.mp4"))) == 4
