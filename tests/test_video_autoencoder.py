"""Video autoencoders: framewise-vae (SD's VAE per frame) and video-vae (diffusers' CogVideoX and
Wan 3D causal VAEs) behind the Autoencoder protocol.

Every VAE here is small and random (or trained for a few steps): nothing is downloaded.
"""

import json

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan
from ditx.modalities.image.autoencoder import SDVAE
from ditx.modalities.video.autoencoder import CONFIGS, FramewiseVAE, VideoVAE

from ditx.autoencoder import Autoencoder
from ditx.recipe import Component, RecipeError, check_component_args
from ditx.registry import autoencoders

autoencoders.register("framewise-vae", FramewiseVAE)  # no-ops once ditx.modalities.video registers them too
autoencoders.register("video-vae", VideoVAE)

SMALL_KL = {  # f = 4, like SD's VAE but a few thousand parameters
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
}

# the video VAEs the tests load: the tiny configs, with CogVideoX-2b's scaling factor and a
# Wan normalisation that is not the identity, so that getting either wrong shows
VIDEO_CONFIGS = {
    "cogvideox": {**CONFIGS["cogvideox"]["tiny"], "scaling_factor": 0.7},
    "wan": {**CONFIGS["wan"]["tiny"], "latents_mean": [0.5, -0.25, 0.0, 1.0], "latents_std": [2.0, 0.5, 1.0, 4.0]},
}
MODEL_CLASSES = {"cogvideox": AutoencoderKLCogVideoX, "wan": AutoencoderKLWan}
VALID_T = {"cogvideox": [1, 9, 17], "wan": [1, 5, 9, 13]}  # 1 + k·8 and 1 + k·4


@pytest.fixture(autouse=True)
def one_thread():
    """Convolutions this small gain nothing from threads, and OpenMP's spinning threads make
    them several times slower when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved_kl(tmp_path_factory):
    """(a diffusers AutoencoderKL, its save_pretrained folder)."""
    torch.manual_seed(0)
    kl = AutoencoderKL(**SMALL_KL).eval()
    folder = tmp_path_factory.mktemp("kl") / "vae"
    kl.save_pretrained(folder)
    return kl, folder


@pytest.fixture(scope="module")
def saved_video_vaes(tmp_path_factory):
    """kind -> (the diffusers model, a pipeline-like folder holding it under vae/)."""
    out = {}
    for i, (kind, config) in enumerate(VIDEO_CONFIGS.items()):
        torch.manual_seed(i)
        model = MODEL_CLASSES[kind](**config).eval()
        root = tmp_path_factory.mktemp(kind)
        model.save_pretrained(root / "vae")
        out[kind] = model, root
    return out


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub client fails at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def videos(b=2, t=3, size=16, seed=1, width=None):
    shape = (b, 3, t, size, width or size)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def moving_waves(b=2, t=3, size=16):
    """Smooth videos (b, 3, t, size, size) of waves drifting over time: a VAE learns them in a few
    steps, unlike noise."""
    grid = torch.linspace(-1, 1, size)
    y, x = grid.view(size, 1), grid.view(1, size)
    i, c, f = (
        torch.arange(b).view(b, 1, 1, 1, 1),
        torch.arange(3).view(1, 3, 1, 1, 1),
        torch.arange(t).view(1, 1, t, 1, 1),
    )
    return torch.sin(3 * x + (c + 1) * y + 0.5 * f + i)


# --------------------------------------------------------------------------------------
# framewise-vae
# --------------------------------------------------------------------------------------


def test_framewise_round_trip_keeps_every_frame():
    ae = FramewiseVAE(config="tiny")  # f = 2
    assert isinstance(ae, Autoencoder) and ae.supports_training
    assert ae.scaling_factor == pytest.approx(0.18215)  # SD-VAE's, as in Latte
    for t in (1, 4):
        x = videos(t=t, width=24)
        with torch.no_grad():
            z = ae.encode(x)
            assert z.shape == (2, *ae.latent_shape((3, t, 16, 24))) == (2, 4, t, 8, 12)
            assert ae.decode(z).shape == x.shape


def test_tiny_f4_config_is_the_moving_digits_latent_space():
    ae = FramewiseVAE(config="tiny-f4")  # the video/moving-digits recipe's VAE
    assert ae.downsample_factor == 4 and ae.latent_channels == 4
    x = videos(b=1, t=2, width=32)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (1, *ae.latent_shape((3, 2, 16, 32))) == (1, 4, 2, 4, 8)
        assert ae.decode(z).shape == x.shape


def test_framewise_is_the_image_vae_applied_to_each_frame(saved_kl):
    kl, folder = saved_kl
    ae = FramewiseVAE(pretrained=str(folder))
    x = videos(b=2, t=3)
    with torch.no_grad():
        z = ae.encode(x)
        recon = ae.decode(z)
        for b in range(2):
            for t in range(3):  # the diffusers model on one frame at a time
                frame = x[b : b + 1, :, t]
                torch.testing.assert_close(z[b : b + 1, :, t], kl.encode(frame).latent_dist.mean * 0.18215)
                torch.testing.assert_close(recon[b : b + 1, :, t], kl.decode(z[b : b + 1, :, t] / 0.18215).sample)


def test_framewise_chunk_size_does_not_change_the_result(saved_kl):
    x = videos(b=2, t=5)
    results = []
    for chunk_size in (1, 3, 64):
        ae = FramewiseVAE(pretrained=str(saved_kl[1]), chunk_size=chunk_size)
        assert ae.chunk_size == chunk_size
        with torch.no_grad():
            z = ae.encode(x)
            sampled = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
            results.append((z, sampled, ae.decode(z)))
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_framewise_sample_draws_from_the_posterior_with_the_generator(saved_kl):
    kl, folder = saved_kl
    ae = FramewiseVAE(pretrained=str(folder))
    x = videos(b=2, t=4, size=32)
    with torch.no_grad():
        mean = ae.encode(x)
        first = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        again = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        other = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        sampling = FramewiseVAE(pretrained=str(folder), sample_posterior=True)
        by_default = sampling.encode(x, generator=torch.Generator().manual_seed(0))
        posterior = kl.encode(x[:, :, 1]).latent_dist  # frame 1 of both videos
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(by_default, first)
    assert not torch.allclose(first, other) and not torch.allclose(first, mean, atol=1e-3)
    eps = (first[:, :, 1] / 0.18215 - posterior.mean) / posterior.std  # standardized: N(0, 1)
    assert abs(eps.mean().item()) < 0.2 and abs(eps.std().item() - 1) < 0.2


def test_framewise_save_pretrained_reloads_identical_outputs(tmp_path, saved_kl):
    ae = FramewiseVAE(pretrained=str(saved_kl[1]))
    ae.scaling_factor = 0.5  # what train_autoencoder does after measuring the latents' std
    assert ae.image_vae.scaling_factor == 0.5
    ae.save_pretrained(tmp_path / "vae")
    reloaded = FramewiseVAE(pretrained=str(tmp_path / "vae"))
    assert reloaded.scaling_factor == 0.5 and SDVAE(pretrained=str(tmp_path / "vae")).scaling_factor == 0.5
    x = videos()
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(reloaded.encode(x), z, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.decode(z), ae.decode(z), rtol=0, atol=0)


def test_tiny_framewise_vae_trains(tmp_path):
    torch.manual_seed(0)
    ae = FramewiseVAE(config="tiny")
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())  # frozen for diffusion
    x = moving_waves(b=2, t=3)
    assert ae.trainable() is ae and ae.training and all(p.requires_grad for p in ae.parameters())
    optimizer = torch.optim.AdamW(ae.parameters(), lr=5e-4)

    def loss():
        return ae.training_loss(x, kl_weight=1e-6, generator=torch.Generator().manual_seed(0))

    before = loss()
    assert set(before) == {"loss", "reconstruction", "kl", "mse"}
    # per frame: sd-vae's loss with the 2·3 frames as a batch of images
    frames = torch.stack([x[b, :, t] for b in range(2) for t in range(3)])
    per_image = ae.image_vae.training_loss(frames, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(before["reconstruction"], per_image["reconstruction"])
    for _ in range(10):
        optimizer.zero_grad()
        loss()["loss"].backward()
        optimizer.step()
    after = loss()
    assert after["loss"].item() < 0.5 * before["loss"].item()
    assert after["mse"].item() < before["mse"].item()
    ae.freeze()
    ae.save_pretrained(tmp_path / "trained")
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(FramewiseVAE(pretrained=str(tmp_path / "trained")).encode(x), z)


def test_framewise_errors_name_the_component_and_what_to_do(tmp_path, offline):
    with pytest.raises(ValueError, match=r"framewise-vae .*exactly one of `pretrained`"):
        FramewiseVAE()
    with pytest.raises(ValueError, match="unknown config 'huge'; named configs: tiny, tiny-f4, sd"):
        FramewiseVAE(config="huge")
    with pytest.raises(ValueError, match=r"videos \(C, T, H, W\); got data shape \(3, 16, 16\)"):
        FramewiseVAE(config="tiny").latent_shape((3, 16, 16))
    with pytest.raises(ValueError, match=r"15x16 is not divisible by 2"):
        FramewiseVAE(config="tiny").latent_shape((3, 4, 15, 16))
    with pytest.raises(FileNotFoundError, match=r"framewise-vae.*no such local directory.*HF_HUB_OFFLINE"):
        FramewiseVAE(pretrained=str(tmp_path / "no" / "such-vae"))
    with pytest.raises(OSError) as err:
        FramewiseVAE(pretrained="ditx-tests/no-such-vae")  # a hub id, offline
    message = str(err.value)
    assert "ditx-tests/no-such-vae" in message and "network" in message and "HF_HUB_OFFLINE" in message


# --------------------------------------------------------------------------------------
# video-vae
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_latent_shape_is_what_encode_returns_and_decode_gives_the_frames_back(kind):
    torch.manual_seed(0)
    ae = VideoVAE(kind, config="tiny")  # spatial f = 4, temporal factor 4
    assert isinstance(ae, Autoencoder)
    assert (ae.downsample_factor, ae.temporal_factor) == (4, 4)
    with torch.no_grad():
        for t in VALID_T[kind]:
            x = videos(b=2, t=t, width=24)
            z = ae.encode(x)
            assert z.shape[1:] == ae.latent_shape(x.shape[1:]) == (4, 1 + (t - 1) // 4, 4, 6)
            assert ae.decode(z).shape == x.shape


@pytest.mark.parametrize(
    ("kind", "bad", "message"),
    [
        (
            "cogvideox",
            5,
            r"\(cogvideox\) takes clips of T = 1 \+ k·8 frames \(1, 9, 17, 25, ...\); got T=5: use T=1 or T=9",
        ),
        ("cogvideox", 13, r"got T=13: use T=9 or T=17"),
        ("wan", 8, r"\(wan\) takes clips of T = 1 \+ k·4 frames \(1, 5, 9, 13, ...\); got T=8: use T=5 or T=9"),
        ("wan", 0, r"got T=0: use T=1 or T=5"),
    ],
)
def test_clip_lengths_that_do_not_round_trip_are_clear_errors(kind, bad, message):
    torch.manual_seed(0)
    ae = VideoVAE(kind, config="tiny")
    with pytest.raises(ValueError, match=message):
        ae.latent_shape((3, bad, 16, 16))
    if bad:  # not silently dropped (Wan) or turned into more frames (CogVideoX)
        with pytest.raises(ValueError, match=message):
            ae.encode(videos(b=1, t=bad))


def test_cogvideox_decodes_an_odd_number_of_latent_frames_only():
    torch.manual_seed(0)
    ae = VideoVAE("cogvideox", config="tiny")
    with pytest.raises(ValueError, match=r"latents of t = 1 \+ k·2 latent frames .*got t=2: use t=1 or t=3"):
        ae.decode(torch.zeros(1, 4, 2, 4, 4))


def test_latent_shape_checks_channels_and_size():
    torch.manual_seed(0)
    ae = VideoVAE("wan", config="tiny")
    with pytest.raises(ValueError, match=r"3-channel videos, the data has 1 channels"):
        ae.latent_shape((1, 5, 16, 16))
    with pytest.raises(ValueError, match=r"frame size 16x18 is not divisible by 4"):
        ae.latent_shape((3, 5, 16, 18))
    with pytest.raises(ValueError, match=r"videos \(C, T, H, W\)"):
        ae.latent_shape((3, 16, 16))


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_scaling_follows_each_models_convention(kind, saved_video_vaes):
    model, root = saved_video_vaes[kind]
    ae = VideoVAE(kind, pretrained=str(root), subfolder="vae")
    x = videos(b=2, t=VALID_T[kind][1])
    with torch.no_grad():
        posterior = model.encode(x).latent_dist.mean
        if kind == "cogvideox":  # latents = z · config.scaling_factor (0.7 for CogVideoX-2b)
            assert ae.scaling_factor == 0.7
            expected = posterior * 0.7
        else:  # latents = (z - latents_mean) / latents_std, per channel, as WanPipeline does
            assert ae.scaling_factor == 1.0
            mean = torch.tensor([0.5, -0.25, 0.0, 1.0]).view(1, 4, 1, 1, 1)
            std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
            expected = (posterior - mean) / std
        z = ae.encode(x)
        torch.testing.assert_close(z, expected)
        unscaled = z / 0.7 if kind == "cogvideox" else z * std + mean
        torch.testing.assert_close(ae.decode(z), model.decode(unscaled).sample)


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_an_explicit_scaling_factor_multiplies_the_normalised_latents(kind, saved_video_vaes):
    model, root = saved_video_vaes[kind]
    default = VideoVAE(kind, pretrained=str(root), subfolder="vae")
    halved = VideoVAE(kind, pretrained=str(root), subfolder="vae", scaling_factor=default.scaling_factor / 2)
    x = videos(b=1, t=VALID_T[kind][1])
    with torch.no_grad():
        z = default.encode(x)
        torch.testing.assert_close(halved.encode(x), z / 2)
        torch.testing.assert_close(halved.decode(z / 2), default.decode(z))


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_sample_draws_from_the_posterior_with_the_generator(kind, saved_video_vaes):
    model, root = saved_video_vaes[kind]
    ae = VideoVAE(kind, pretrained=str(root), subfolder="vae")
    x = videos(b=2, t=VALID_T[kind][1])
    with torch.no_grad():
        first = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        again = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        other = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        sampling = VideoVAE(kind, pretrained=str(root), subfolder="vae", sample_posterior=True)
        by_default = sampling.encode(x, generator=torch.Generator().manual_seed(0))
        posterior = model.encode(x).latent_dist
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(by_default, first)
    assert not torch.allclose(first, other)
    # mean + std · N(0, 1) noise drawn from the generator, then scaled like the mean
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    z = posterior.mean + posterior.std * noise
    if kind == "cogvideox":
        torch.testing.assert_close(first, z * 0.7)
    else:
        mean = torch.tensor(VIDEO_CONFIGS["wan"]["latents_mean"]).view(1, 4, 1, 1, 1)
        std = torch.tensor(VIDEO_CONFIGS["wan"]["latents_std"]).view(1, 4, 1, 1, 1)
        torch.testing.assert_close(first, (z - mean) / std)


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_save_pretrained_reloads_identical_outputs(kind, saved_video_vaes, tmp_path):
    _, root = saved_video_vaes[kind]
    ae = VideoVAE(kind, pretrained=str(root), subfolder="vae", scaling_factor=0.25)
    ae.save_pretrained(tmp_path / "saved")
    reloaded = VideoVAE(kind, pretrained=str(tmp_path / "saved"))
    x = videos(b=1, t=VALID_T[kind][1])
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(reloaded.encode(x), z)
        torch.testing.assert_close(reloaded.decode(z), ae.decode(z))
    # saving does not change the object's own latents
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x), z, rtol=0, atol=0)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    if kind == "cogvideox":
        assert config["scaling_factor"] == 0.25
    else:  # Wan's config has no scaling factor: it goes into latents_std, as WanPipeline reads it
        assert config["latents_std"] == pytest.approx([s / 0.25 for s in VIDEO_CONFIGS["wan"]["latents_std"]])


def test_released_architectures_compress_time_by_4_and_space_by_8():
    """Geometry comes from the config; the models are built on the meta device (no weights)."""
    with torch.device("meta"):
        cog = VideoVAE("cogvideox", config={"scaling_factor": 0.7})  # CogVideoX-2b's architecture
        wan = VideoVAE("wan", config={})  # Wan 2.1's
        wan22 = VideoVAE(  # Wan 2.2 TI2V-5B's layout: 2x2 pixel patches folded into 12 input channels
            "wan",
            config={"base_dim": 8, "z_dim": 48, "is_residual": True, "in_channels": 12, "out_channels": 12,
                    "patch_size": 2, "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48},
        )  # fmt: skip
    assert cog.latent_shape((3, 49, 480, 720)) == (16, 13, 60, 90)
    assert wan.latent_shape((3, 81, 480, 832)) == (16, 21, 60, 104)
    assert wan22.latent_shape((3, 121, 704, 1280)) == (48, 31, 44, 80)
    with pytest.raises(ValueError, match=r"got T=48: use T=41 or T=49"):
        cog.latent_shape((3, 48, 480, 720))


def test_a_wan_vae_with_pixel_patches_round_trips():
    torch.manual_seed(0)
    ae = VideoVAE(
        "wan",
        config={**CONFIGS["wan"]["tiny"], "is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2},
    )
    x = videos(b=1, t=5, width=24)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape[1:] == ae.latent_shape(x.shape[1:]) == (4, 2, 2, 3)  # f = 4 · 2
        assert ae.decode(z).shape == x.shape


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_tiling_turns_on_the_models_tiling_and_slicing(kind):
    torch.manual_seed(0)
    plain = VideoVAE(kind, config="tiny")
    tiled = VideoVAE(kind, config="tiny", tiling=True)
    tiled.load_state_dict(plain.state_dict())
    assert tiled.vae.use_tiling and tiled.vae.use_slicing and not plain.vae.use_tiling
    x = videos(b=2, t=VALID_T[kind][1])
    with torch.no_grad():  # below the tile size, tiling changes nothing; slicing never does
        z = tiled.encode(x)
        torch.testing.assert_close(z, plain.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiled.decode(z), plain.decode(z), atol=1e-5, rtol=1e-5)


def test_video_vae_is_frozen_and_keeps_the_callers_dtype(saved_video_vaes):
    ae = VideoVAE("wan", pretrained=str(saved_video_vaes["wan"][1]), subfolder="vae", dtype="bfloat16")
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    assert next(ae.parameters()).dtype == torch.bfloat16
    x = videos(b=1, t=5)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.dtype == torch.float32 and ae.decode(z).dtype == torch.float32
        full = VideoVAE("wan", pretrained=str(saved_video_vaes["wan"][1]), subfolder="vae")
        torch.testing.assert_close(z, full.encode(x), atol=0.1, rtol=0.1)


def test_video_vae_errors_name_the_value_and_what_to_do(tmp_path, saved_video_vaes, offline):
    with pytest.raises(ValueError, match="unknown kind 'mochi'; kinds: cogvideox, wan"):
        VideoVAE("mochi", config="tiny")
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        VideoVAE("wan")
    with pytest.raises(ValueError, match="unknown config 'huge' for kind 'wan'; named configs: tiny"):
        VideoVAE("wan", config="huge")
    with pytest.raises(ValueError, match="does not build a AutoencoderKLWan"):
        VideoVAE("wan", config={"no_such_argument": 1})
    # a Wan folder loaded as CogVideoX
    with pytest.raises(ValueError, match=r"holds a AutoencoderKLWan, but kind='cogvideox'.*use kind: wan"):
        VideoVAE("cogvideox", pretrained=str(saved_video_vaes["wan"][1]), subfolder="vae")
    with pytest.raises(FileNotFoundError, match=r"subfolder 'transformer'.*no config\.json"):
        VideoVAE("wan", pretrained=str(saved_video_vaes["wan"][1]), subfolder="transformer")
    with pytest.raises(FileNotFoundError, match=r"no such local directory.*HF_HUB_OFFLINE"):
        VideoVAE("wan", pretrained=str(tmp_path / "no" / "such-vae"))
    with pytest.raises(OSError) as err:
        VideoVAE("wan", pretrained="ditx-tests/no-such-video-vae", subfolder="vae")  # a hub id, offline
    message = str(err.value)
    assert "ditx-tests/no-such-video-vae" in message and "network" in message and "HF_HUB_OFFLINE" in message


# --------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------


def test_recipe_arguments_are_checked_against_the_constructors():
    for name, args in [
        ("framewise-vae", {"pretrained": "stabilityai/sd-vae-ft-ema", "chunk_size": 8, "dtype": "bfloat16"}),
        ("video-vae", {"kind": "wan", "pretrained": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "subfolder": "vae"}),
        ("video-vae", {"kind": "cogvideox", "config": "tiny", "scaling_factor": "0.7", "tiling": True}),
    ]:
        check_component_args(Component(name, args), "autoencoder", "video.yaml")
    with pytest.raises(RecipeError, match=r"'autoencoder.kind' must be"):
        check_component_args(Component("video-vae", {"kind": "mochi"}), "autoencoder", "video.yaml")
    with pytest.raises(RecipeError, match=r"unknown key 'autoencoder.chunk' for autoencoder 'framewise-vae'"):
        check_component_args(Component("framewise-vae", {"chunk": 8}), "autoencoder", "video.yaml")


def test_draw_frames_takes_k_distinct_frames_of_each_clip_in_order():
    from ditx.train_autoencoder import draw_frames

    b, t = 6, 8
    # every pixel of clip i's frame j holds 100 i + j: what was drawn can be read back
    clips = (100 * torch.arange(b).view(b, 1, 1, 1, 1) + torch.arange(t).view(1, 1, t, 1, 1)).float()
    clips = clips.expand(b, 3, t, 4, 5).contiguous()
    generator, seen = torch.Generator().manual_seed(0), set()
    for _ in range(20):
        drawn = draw_frames(clips, 3, generator)
        assert drawn.shape == (b, 3, 3, 4, 5)
        for i in range(b):
            values = drawn[i].flatten(2).amin(-1)  # (C, k): one value per channel and frame
            assert torch.equal(values, drawn[i].flatten(2).amax(-1))  # whole frames, not mixed
            frames = (values[0] - 100 * i).long().tolist()
            assert frames == sorted(set(frames)) and all(0 <= f < t for f in frames), frames  # this clip's, in order
            seen.update(frames)
    assert seen == set(range(t))  # every frame gets drawn
    assert draw_frames(clips, t, generator) is clips


def test_frames_per_clip_trains_a_framewise_vae_on_drawn_frames_and_refuses_images(tmp_path, monkeypatch):
    import json

    from test_modality_jobs import tiny

    from ditx.train_autoencoder import train_autoencoder

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    data = {"name": "moving-digits", "root": str(tmp_path / "clips"), "num_frames": 6, "size": 24,
            "num_clips_train": 20, "num_clips_test": 10}  # fmt: skip
    shapes, loss = [], FramewiseVAE.training_loss

    def spy(self, x, **kwargs):
        shapes.append(tuple(x.shape))
        return loss(self, x, **kwargs)

    monkeypatch.setattr(FramewiseVAE, "training_loss", spy)
    stage = {"steps": 3, "batch_size": 4, "frames_per_clip": 2, "mixed_precision": "no"}
    recipe = tiny(tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 2, 2]},
                  autoencoder={"name": "framewise-vae", "config": "tiny"}, autoencoder_train=stage)  # fmt: skip
    out = train_autoencoder(recipe, out=tmp_path / "ae")
    assert shapes == [(4, 3, 2, 24, 24)] * 3  # 2 of each clip's 6 frames
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["autoencoder_train"]["frames_per_clip"] == 2 and metrics["held_out"]  # held out: whole clips

    # images have no frames to draw (and ditx's causal VAEs are not trainable): a clear error
    digits = {"name": "digits", "size": 16, "channels": 1}
    images = tiny(tmp_path, "image", digits, {"name": "patch2d", "patch_size": 4},
                  autoencoder={"name": "sd-vae", "config": "tiny"}, autoencoder_train=stage)  # fmt: skip
    with pytest.raises(ValueError, match=r"frames_per_clip=2: frames drawn from clips need video data .*\(1, 16, 16\)"):
        train_autoencoder(images, out=tmp_path / "ae2")
    negative = tiny(tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 2, 2]},
                    autoencoder={"name": "framewise-vae", "config": "tiny"},
                    autoencoder_train={**stage, "frames_per_clip": -1})  # fmt: skip
    with pytest.raises(ValueError, match=r"frames_per_clip must be an integer >= 0 \(0: every frame\), got -1"):
        train_autoencoder(negative, out=tmp_path / "ae3")
