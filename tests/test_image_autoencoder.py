"""sd-vae (diffusers' AutoencoderKL behind the Autoencoder protocol) and training an autoencoder.

Every VAE here is small and random (or trained for a few dozen steps on scikit-learn's
digits): nothing is downloaded.
"""

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL
from ditx.modalities.image.autoencoder import SDVAE
from PIL import Image

from ditx.autoencoder import Autoencoder
from ditx.cli import main
from ditx.recipe import RecipeError, recipe_from_dict
from ditx.registry import autoencoders
from ditx.train_autoencoder import train_autoencoder

autoencoders.register("sd-vae", SDVAE)  # a no-op once ditx.modalities.image registers it too

SMALL_KL = {  # f = 4, like SD's VAE but a few thousand parameters
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
}


@pytest.fixture(scope="module")
def saved_kl(tmp_path_factory):
    """(the diffusers model, its save_pretrained folder, a pipeline-like folder with it under vae/)."""
    torch.manual_seed(0)
    kl = AutoencoderKL(**SMALL_KL).eval()
    root = tmp_path_factory.mktemp("vae")
    kl.save_pretrained(root / "vae-only")
    kl.save_pretrained(root / "pipeline" / "vae")
    return kl, root / "vae-only", root / "pipeline"


@pytest.fixture
def one_thread():
    """Convolutions this small gain nothing from threads, and OpenMP's spinning threads make
    them several times slower when the CPU is shared; training tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n=5, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def digits_recipe(tmp_path, **autoencoder_train):
    return recipe_from_dict(
        {
            "description": "latent digits",
            "modality": "image",
            "data": {"name": "digits", "size": 16, "channels": 3},
            "tokenizer": {"name": "patch2d", "patch_size": 2},
            "objective": {"name": "ddpm"},
            "autoencoder": {"name": "sd-vae", "config": "tiny"},
            "train": {"output_dir": str(tmp_path / "runs")},
            "autoencoder_train": {"batch_size": 16, "lr": 2.0e-3, "log_every": 10, **autoencoder_train},
        },
        source="latent.yaml",
        name="test/latent",
    )


# --------------------------------------------------------------------------------------
# loading and the protocol
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "subfolder"])
def test_pretrained_gives_the_diffusers_models_latents_and_images(saved_kl, where):
    kl, folder, pipeline = saved_kl
    ae = SDVAE(pretrained=str(folder)) if where == "folder" else SDVAE(pretrained=str(pipeline), subfolder="vae")
    assert isinstance(ae, Autoencoder)
    assert ae.scaling_factor == pytest.approx(0.18215)  # SD-VAE's, as in DiT
    x = images()
    with torch.no_grad():
        expected_z = kl.encode(x).latent_dist.mean * 0.18215
        z = ae.encode(x)
        torch.testing.assert_close(z, expected_z)
        assert z.shape == (5, *ae.latent_shape((3, 16, 16))) == (5, 4, 4, 4)
        torch.testing.assert_close(ae.decode(z), kl.decode(z / 0.18215).sample)


def test_an_explicit_scaling_factor_replaces_the_configs(saved_kl):
    kl, folder, _ = saved_kl
    ae = SDVAE(pretrained=str(folder), scaling_factor=0.5)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x), kl.encode(x).latent_dist.mean * 0.5)
        z = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(ae.decode(z), kl.decode(z / 0.5).sample)


def test_vae_is_frozen_for_diffusion_training(saved_kl):
    ae = SDVAE(pretrained=str(saved_kl[1]))
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    z = ae.encode(images(2))
    assert not z.requires_grad  # no autograd graph through the VAE
    ae.trainable()
    assert ae.training and all(p.requires_grad for p in ae.parameters())


def test_chunked_encode_and_decode_equal_whole_batches(saved_kl):
    whole = SDVAE(pretrained=str(saved_kl[1]), chunk_size=32)
    chunked = SDVAE(pretrained=str(saved_kl[1]), chunk_size=2)
    x = images(7)
    with torch.no_grad():
        z = whole.encode(x)
        torch.testing.assert_close(chunked.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked.decode(z), whole.decode(z), atol=1e-5, rtol=1e-5)
        sampled = [ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3)) for ae in (whole, chunked)]
        torch.testing.assert_close(sampled[1], sampled[0], atol=1e-5, rtol=1e-5)


def test_sample_posterior_draws_from_the_posterior(saved_kl):
    kl, folder, _ = saved_kl
    ae = SDVAE(pretrained=str(folder), sample_posterior=True)
    x = images(16, size=32)
    with torch.no_grad():
        posterior = kl.encode(x).latent_dist
        first = ae.encode(x, generator=torch.Generator().manual_seed(0))
        again = ae.encode(x, generator=torch.Generator().manual_seed(0))
        other = ae.encode(x, generator=torch.Generator().manual_seed(1))
    mean = posterior.mean * 0.18215
    assert not torch.allclose(first, mean, atol=1e-3)
    torch.testing.assert_close(first, again)  # the generator decides the sample
    assert not torch.allclose(first, other)
    # standardized by the posterior's mean and std, the sample is N(0, 1) (4096 values)
    eps = (first / 0.18215 - posterior.mean) / posterior.std
    assert abs(eps.mean().item()) < 0.1
    assert abs(eps.std().item() - 1) < 0.1
    # without sample_posterior, encode(sample=True) samples and encode() is the mean
    plain = SDVAE(pretrained=str(folder))
    torch.testing.assert_close(plain.encode(x), mean)
    torch.testing.assert_close(plain.encode(x, sample=True, generator=torch.Generator().manual_seed(0)), first)


def test_latent_shape_divides_by_the_downsampling_factor():
    ae = SDVAE(config="tiny")  # f = 2
    assert ae.latent_shape((3, 16, 16)) == (4, 8, 8)
    assert ae.latent_shape((3, 16, 24)) == (4, 8, 12)  # not only squares
    with pytest.raises(ValueError, match=r"15x16 is not divisible by 2"):
        ae.latent_shape((3, 15, 16))
    with pytest.raises(ValueError, match=r"3-channel images, the data has 1 channels"):
        ae.latent_shape((1, 16, 16))
    assert SDVAE(config=dict(SMALL_KL)).latent_shape((3, 32, 64)) == (4, 8, 16)  # f = 4


def test_tiny_config_builds_an_untrained_vae():
    ae = SDVAE(config="tiny")
    x = images(3)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (3, 4, 8, 8)
        assert ae.decode(z).shape == x.shape
    assert sum(p.numel() for p in ae.parameters()) < 2_000_000


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        SDVAE()
    with pytest.raises(ValueError, match="exactly one of `pretrained`.*autoencoder.config=null"):
        SDVAE(pretrained=str(tmp_path), config="tiny")
    with pytest.raises(ValueError, match="unknown config 'huge'; named configs: tiny, tiny-f4, sd"):
        SDVAE(config="huge")
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16"):
        SDVAE(config="tiny", dtype="float64")


def test_missing_pretrained_path_names_it_and_says_how_to_load_offline(tmp_path, saved_kl):
    missing = tmp_path / "no" / "such-vae"
    with pytest.raises(FileNotFoundError) as err:
        SDVAE(pretrained=str(missing))
    message = str(err.value)
    assert str(missing) in message and "network" in message and "HF_HUB_OFFLINE" in message
    # an existing folder without a VAE, and a wrong subfolder
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        SDVAE(pretrained=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"subfolder 'unet'.*no config\.json"):
        SDVAE(pretrained=str(saved_kl[2]), subfolder="unet")


def test_bfloat16_weights_take_and_return_the_callers_dtype(saved_kl):
    ae = SDVAE(pretrained=str(saved_kl[1]), dtype="bfloat16")
    assert next(ae.parameters()).dtype == torch.bfloat16
    x = images(2)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.dtype == torch.float32 and ae.decode(z).dtype == torch.float32
        torch.testing.assert_close(z, SDVAE(pretrained=str(saved_kl[1])).encode(x), atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------


def test_recipe_with_sd_vae_and_autoencoder_train_validates(tmp_path):
    recipe = digits_recipe(tmp_path, steps=7, lr="3e-4")
    assert recipe.autoencoder.args == {"config": "tiny"}
    assert recipe.autoencoder_train.steps == 7 and recipe.autoencoder_train.lr == 3e-4
    assert recipe.autoencoder_train.kl_weight == 1e-6 and recipe.autoencoder_train.out is None
    assert recipe.to_dict()["autoencoder_train"]["steps"] == 7
    with pytest.raises(RecipeError, match=r"unknown key 'autoencoder_train.stepz'.*allowed keys in autoencoder_train"):
        digits_recipe(tmp_path, stepz=7)
    with pytest.raises(RecipeError, match=r"'autoencoder_train.mixed_precision' must be 'no' \| 'bf16' \| 'fp16'"):
        digits_recipe(tmp_path, mixed_precision="fp8")
    data = digits_recipe(tmp_path).to_dict()
    data["autoencoder"]["chunk"] = 4
    with pytest.raises(RecipeError, match=r"unknown key 'autoencoder.chunk' for autoencoder 'sd-vae'"):
        recipe_from_dict(data, source="latent.yaml")


# --------------------------------------------------------------------------------------
# training from scratch
# --------------------------------------------------------------------------------------


def test_train_autoencoder_on_digits_writes_a_loadable_vae(tmp_path, one_thread):
    recipe = digits_recipe(tmp_path, steps=30)
    out = train_autoencoder(recipe)
    assert out == tmp_path / "runs" / "test-latent-autoencoder"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mse"] < 0.25 * metrics["initial_mse"]  # the held-out reconstruction error drops
    assert metrics["psnr"] > metrics["initial_psnr"] + 6
    assert len(metrics["held_out"]) == 16  # one batch
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["reconstruction"] < 0.5 * log[0]["reconstruction"]

    # the folder loads through the recipe's pretrained path and gives the trained weights' outputs
    from ditx.build import build_dataset

    vae = SDVAE(pretrained=str(out))
    assert vae.scaling_factor == pytest.approx(metrics["scaling_factor"])
    data = build_dataset(recipe)
    x = torch.stack([data[i]["x"] for i in metrics["held_out"]])
    with torch.no_grad():
        z = vae.encode(x)
        mse = (vae.decode(z) - x).pow(2).mean().item()
        assert mse == pytest.approx(metrics["mse"], rel=1e-4)
        assert z.std().item() == pytest.approx(1.0, rel=1e-3)  # rescaled to unit variance on held-out data
        # data it never saw: much better than the same VAE untrained
        test = build_dataset(recipe, split="test").images[:64]
        torch.manual_seed(0)
        untrained = SDVAE(config="tiny")
        trained_mse = (vae.decode(vae.encode(test)) - test).pow(2).mean()
        untrained_mse = (untrained.decode(untrained.encode(test)) - test).pow(2).mean()
        assert trained_mse < 0.25 * untrained_mse

    # preview: 8 held-out digits then their reconstructions
    grid = Image.open(out / "preview" / "grid.png")
    assert grid.width > 0 and len(list((out / "preview").glob("0*.png"))) == 16

    # the folder is never overwritten by accident, and nothing else sits next to it
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_autoencoder(recipe)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_lr_lambda_warms_up_then_holds_or_follows_the_cosine():
    from ditx.build import lr_lambda

    constant = lr_lambda(4)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_lambda(0)(0) == 1.0
    cosine = lr_lambda(2, 12, "cosine")  # warmup 2, then 10 steps of 0.5 (1 + cos(pi k / 10))
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]
    assert [cosine(s) for s in range(13)] == pytest.approx(expected)
    assert cosine(7) == pytest.approx(0.5) and cosine(12) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="'constant' or 'cosine', got 'linear'"):
        lr_lambda(0, 10, "linear")
    with pytest.raises(ValueError, match="needs the number of steps"):
        lr_lambda(10, None, "cosine")
    short = lr_lambda(20, 1, "cosine")  # one step of a recipe that warms up over 20: the ramp's first step
    assert short(0) == pytest.approx(1 / 20)


def test_train_autoencoder_follows_its_lr_schedule(tmp_path, one_thread):
    recipe = digits_recipe(tmp_path, steps=20, lr_schedule="cosine", warmup_steps=5, log_every=5)
    out = train_autoencoder(recipe)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # the rate after each logged step: 2e-3 at the warmup's end, half way down the cosine, then zero
    cosine = [0.5 * (1 + math.cos(math.pi * k / 15)) for k in (0, 5, 10, 15)]
    assert [r["lr"] for r in log] == pytest.approx([2e-3 * c for c in cosine], abs=1e-12)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["autoencoder_train"]["lr_schedule"] == "cosine" and metrics["autoencoder_train"]["warmup_steps"] == 5
    with pytest.raises(RecipeError, match=r"'autoencoder_train.lr_schedule' must be 'constant' \| 'cosine'"):
        digits_recipe(tmp_path, lr_schedule="step")


def test_train_autoencoder_needs_a_trainable_autoencoder(tmp_path):
    recipe = digits_recipe(tmp_path)
    recipe.autoencoder = type(recipe.autoencoder)("identity")
    with pytest.raises(
        ValueError, match=r"autoencoder 'identity' \(IdentityAutoencoder\) cannot be trained.*training_loss"
    ):
        train_autoencoder(recipe, out=tmp_path / "ae")
    assert not (tmp_path / "ae").exists()


def test_cli_train_autoencoder_prints_the_output_folder(tmp_path, capsys, one_thread):
    recipe = tmp_path / "latent.yaml"
    recipe.write_text(digits_recipe(tmp_path).to_yaml())
    out = tmp_path / "vae"
    argv = ["train-autoencoder", str(recipe), "autoencoder_train.steps=2", "autoencoder_train.batch_size=8"]
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "config.json").is_file() and (out / "metrics.json").is_file()
    assert main([*argv, "--out", str(out)]) == 2  # exists: a one-line error, not a traceback
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0  # says so, then replaces it
    assert f"--overwrite: {out} will be replaced" in capsys.readouterr().err
    assert main([*argv, "autoencoder_train.stepz=2", "--out", str(out)]) == 2
    assert "autoencoder_train.stepz" in capsys.readouterr().err


def test_a_dit_trains_and_samples_in_sd_vae_latents(tiny_recipe, saved_kl, one_thread):
    from ditx.train import train

    recipe = tiny_recipe(
        data={"size": 16, "channels": 3},
        autoencoder={"name": "sd-vae", "pretrained": str(saved_kl[1])},
        train={"steps": 2, "checkpoint_every": 2},
    )
    run = train(recipe)
    samples = sorted((run / "samples" / "step_00000002").glob("0*.png"))
    assert len(samples) == 4
    image = Image.open(samples[0])
    assert image.size == (16, 16) and image.mode == "RGB"  # decoded from 4x4x4 latents
