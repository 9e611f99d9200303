"""Frame conditioning (image-to-video, extension, interpolation): clean frames under a time mask
in the backbone, the objectives' losses and the sampler."""

import math
from statistics import NormalDist

import pytest
import torch
from test_dit import randomize

from ditx.diffusion.objectives import DDPMObjective, RectifiedFlowObjective, VPredictionObjective
from ditx.diffusion.sampling import class_errors, sample
from ditx.dit import DiT
from ditx.tokenizer import PatchTokenizer

VIDEO = ("time", "height", "width")


def video_dit(patch=(1, 2, 2), **kw):
    tok = PatchTokenizer(VIDEO, patch, in_channels=3, hidden_size=32)
    return randomize(DiT(tok, depth=2, num_heads=4, num_classes=3, **kw), seed=3).eval()


def test_clean_frames_are_modulated_at_timestep_zero():
    """No clean frame = no mask; every frame clean = the model at t = 0; a clean first frame
    changes the output (it reaches every frame through attention over time)."""
    model = video_dit()
    x, t, y = torch.randn(2, 3, 4, 8, 8), torch.tensor([500.0, 300.0]), torch.tensor([0, 1])
    with torch.no_grad():
        plain = model(x, t, y)
        torch.testing.assert_close(model(x, t, y, frame_mask=torch.zeros(2, 4, dtype=torch.bool)), plain)
        torch.testing.assert_close(model(x, t, y, frame_mask=torch.ones(2, 4, dtype=torch.bool)), model(x, t * 0, y))
        first = torch.tensor([[True, False, False, False]] * 2)
        assert (model(x, t, y, frame_mask=first) - plain)[:, :, 1:].abs().amax() > 1e-3


def test_clean_frames_keep_the_caption_condition():
    """With a pooled caption in the condition (context_pool), every frame clean = the model at t = 0
    with the same caption: the clean frames' condition keeps the caption, only the timestep changes."""
    model = video_dit(context_dim=8, context_pool=True)
    x, t, y = torch.randn(2, 3, 4, 8, 8), torch.tensor([500.0, 300.0]), torch.tensor([0, 1])
    context, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        all_clean = model(x, t, y, context=context, context_mask=mask, frame_mask=torch.ones(2, 4, dtype=torch.bool))
        torch.testing.assert_close(all_clean, model(x, t * 0, y, context=context, context_mask=mask))


def test_per_sample_masks_and_the_context_pool_reach_clean_tokens():
    """Each sample's own mask: sample 0's output does not depend on sample 1's mask."""
    model = video_dit()
    x, t, y = torch.randn(2, 3, 4, 8, 8), torch.tensor([500.0, 300.0]), torch.tensor([0, 1])
    a = torch.tensor([[True, False, False, False], [False, False, False, False]])
    b = torch.tensor([[True, False, False, False], [True, True, False, True]])
    with torch.no_grad():
        out_a, out_b = model(x, t, y, frame_mask=a), model(x, t, y, frame_mask=b)
    torch.testing.assert_close(out_a[0], out_b[0])
    assert (out_a[1] - out_b[1]).abs().max() > 1e-3


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_clean_frames_selected_per_time_slice_equal_the_per_token_selection(patch, monkeypatch):
    """With time the grid's first axis, the blocks choose adaLN values per time slice of tokens
    (B, T, 1, D); the outputs and gradients equal choosing them token by token (the mask
    written out for each token, which the blocks also take)."""
    model = video_dit(patch=patch).train()
    x, t, y = torch.randn(3, 3, 4, 8, 8), torch.tensor([500.0, 300.0, 20.0]), torch.tensor([0, 1, 2])
    mask = torch.tensor([[True, True, False, False], [False, False, False, False], [False, False, True, True]])

    def run():
        model.zero_grad()
        out = model(x, t, y, frame_mask=mask, force_drop=torch.zeros(3, dtype=torch.bool))
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    per_slice, grads = run()
    runs = model._clean_tokens(mask, (4 // patch[0], 4, 4), 3)
    assert runs.shape == (3, 4 // patch[0])  # one value per time slice, not per token
    by_hand = mask[:, :: patch[0]][:, torch.arange(runs.shape[1] * 16) // 16]  # (B, N): a token's frame, 16 a slice
    monkeypatch.setattr(model, "_clean_tokens", lambda *a: by_hand)
    per_token, token_grads = run()
    torch.testing.assert_close(per_slice, per_token)
    for a, b in zip(grads, token_grads):
        torch.testing.assert_close(a, b)


def test_frame_masks_must_fit_the_frames_and_the_temporal_patches():
    model = video_dit(patch=(2, 2, 2))
    x, t = torch.randn(1, 3, 4, 8, 8), torch.tensor([10.0])
    model(x, t, frame_mask=torch.tensor([[True, True, False, False]]))  # whole 2-frame tokens
    with pytest.raises(ValueError, match=r"frame_mask splits a token: the tokenizer patches 2 frames together"):
        model(x, t, frame_mask=torch.tensor([[True, False, False, False]]))
    with pytest.raises(ValueError, match=r"frame_mask must be \(B, frames\) = \(1, 4\) bool, got \(1, 3\)"):
        model(x, t, frame_mask=torch.ones(1, 3, dtype=torch.bool))
    images = randomize(DiT(PatchTokenizer(("height", "width"), (2, 2), 3, 32), depth=1, num_heads=4))
    with pytest.raises(ValueError, match=r"frame_mask needs a tokenizer with a 'time' axis"):
        images(torch.randn(1, 3, 8, 8), t, frame_mask=torch.ones(1, 8, dtype=torch.bool))


class Recorder(torch.nn.Module):
    """Returns a fixed output and records what it was called with."""

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, t, y=None, **kwargs):
        self.calls.append((x.clone(), t.clone(), kwargs))
        return self.out.clone()


@pytest.mark.parametrize("objective", [RectifiedFlowObjective(), VPredictionObjective(),
                                       DDPMObjective(learn_sigma=True)], ids=["flow", "v", "ddpm"])  # fmt: skip
def test_losses_see_clean_frames_and_cover_only_generated_ones(objective):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, 4, generator=g)
    out = torch.randn(2, objective.out_channels(3), 4, 4, 4, generator=g)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    t = objective.sample_t(2, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=g)
    model = Recorder(out)
    masked = objective.loss(model, x0, model_kwargs={"frame_mask": mask}, noise=noise, t=t)["loss"]
    x_seen = model.calls[-1][0]
    assert torch.equal(x_seen[0, :, [0, 3]], x0[0, :, [0, 3]])  # clean frames enter as they are
    assert (x_seen[0, :, 1] - x0[0, :, 1]).abs().max() > 1e-2 and torch.equal(model.calls[-1][2]["frame_mask"], mask)
    # the clean frames' outputs do not count: changing them leaves the loss; changing a generated one moves it
    changed = out.clone()
    changed[0, :, [0, 3]] += 5.0
    assert torch.allclose(objective.loss(Recorder(changed), x0, model_kwargs={"frame_mask": mask}, noise=noise,
                                         t=t)["loss"], masked)  # fmt: skip
    changed[0, :, 1] += 5.0
    assert not torch.allclose(objective.loss(Recorder(changed), x0, model_kwargs={"frame_mask": mask}, noise=noise,
                                             t=t)["loss"][0], masked[0])  # fmt: skip
    # sample 1 has no clean frame: its loss is the plain one
    plain = objective.loss(Recorder(out), x0, noise=noise, t=t)["loss"]
    torch.testing.assert_close(masked[1], plain[1])


def test_flow_loss_over_generated_frames_is_their_mean():
    """Closed form: the masked loss is the mean squared velocity error over the generated frames only."""
    objective = RectifiedFlowObjective()
    g = torch.Generator().manual_seed(2)
    x0, noise, out = (torch.randn(1, 2, 4, 3, 3, generator=g) for _ in range(3))
    mask = torch.tensor([[True, False, True, False]])
    loss = objective.loss(Recorder(out), x0, model_kwargs={"frame_mask": mask}, noise=noise, t=torch.tensor([0.4]))
    expected = ((noise - x0 - out)[:, :, [1, 3]] ** 2).mean()
    torch.testing.assert_close(loss["loss"], expected.reshape(1))


def test_sampler_keeps_given_frames_clean_and_tells_the_model():
    objective = RectifiedFlowObjective()
    g = torch.Generator().manual_seed(4)
    clean = torch.randn(2, 3, 4, 4, 4, generator=g)
    mask = torch.tensor([[True, False, False, False], [True, False, False, True]])
    model = Recorder(torch.randn(4, 3, 4, 4, 4, generator=g))
    out = sample(model, objective, (2, 3, 4, 4, 4), scheduler="flow-euler", num_steps=5, y=torch.tensor([0, 1]),
                 null_class=3, guidance_scale=3.0, frames=(clean, mask), generator=g)  # fmt: skip
    frames_of = lambda v, m: v.transpose(1, 2)[m]  # noqa: E731  (frames picked by a (B, T) mask)
    assert torch.equal(frames_of(out, mask), frames_of(clean, mask))
    assert (frames_of(out, ~mask) - frames_of(clean, ~mask)).abs().max() > 1e-2
    for x, _, kwargs in model.calls:  # every step: clean frames in both halves, the mask doubled for guidance
        assert torch.equal(kwargs["frame_mask"], torch.cat([mask, mask]))
        both = torch.cat([mask, mask])
        assert torch.equal(frames_of(x, both), frames_of(torch.cat([clean, clean]), both))
    with pytest.raises(ValueError, match=r"frames must be \(clean data of shape \(2, 3, 4, 4, 4\), a \(2, 4\) bool"):
        sample(model, objective, (2, 3, 4, 4, 4), scheduler="flow-euler", num_steps=2, frames=(clean, mask[:, :3]))


# --- masks a recipe mixes in training ---------------------------------------------------


def test_mask_kinds():
    from ditx.diffusion.frames import frame_mask

    assert frame_mask("image-to-video", 6).tolist() == [1, 0, 0, 0, 0, 0]
    assert frame_mask("extension", 6, given=3).tolist() == [1, 1, 1, 0, 0, 0]
    assert frame_mask("interpolation", 6).tolist() == [1, 0, 0, 0, 0, 1]
    assert frame_mask("interpolation", 8, patch=2).tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"extension keeps 1 .. 4 frames in whole patches of 2, got 3"):
        frame_mask("extension", 6, given=3, patch=2)
    with pytest.raises(ValueError, match=r"unknown frame mask kind 'outpainting'; allowed: image-to-video, extension"):
        frame_mask("outpainting", 6)


def test_drawn_masks_follow_the_mix_in_whole_patches():
    from ditx.diffusion.frames import draw_frame_masks

    mix = {"image-to-video": 0.3, "extension": 0.2, "interpolation": 0.1}
    masks = draw_frame_masks(mix, 6000, 8, patch=2, generator=torch.Generator().manual_seed(0))
    first, last, count = masks[:, 0], masks[:, -1], masks.sum(1)
    i2v = first & ~last & (count == 2)
    interp = first & last & (count == 4)
    extension = first & ~last & (count > 2)
    assert abs(i2v.float().mean() - (0.3 + 0.2 / 2)) < 0.03  # extension keeps 1 patch half of the time (T/2 = 2)
    assert abs(extension.float().mean() - 0.2 / 2) < 0.02
    assert abs(interp.float().mean() - 0.1) < 0.02
    assert abs((count == 0).float().mean() - 0.4) < 0.03
    assert torch.equal(masks.view(6000, 4, 2).any(2), masks.view(6000, 4, 2).all(2))  # whole patches
    again = draw_frame_masks(mix, 6000, 8, patch=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_bad_mixes_are_named():
    from ditx.diffusion.frames import check_frame_mask_mix

    with pytest.raises(ValueError, match=r"frame_masks: unknown mask kind\(s\) \['i2v'\]; allowed: image-to"):
        check_frame_mask_mix({"i2v": 0.5})
    with pytest.raises(ValueError, match=r"probabilities must be in \[0, 1\] and sum to at most 1"):
        check_frame_mask_mix({"image-to-video": 0.7, "interpolation": 0.5})


def test_training_passes_each_samples_mask_to_the_loss(tmp_path, monkeypatch, capsys):
    """A tiny video recipe with train.frame_masks: every micro-batch's loss gets (B, T) masks of
    the recipe's kinds (here image-to-video only: the first frame), and training runs end to end."""
    from test_modality_jobs import tiny

    from ditx.diffusion.objectives import RectifiedFlowObjective
    from ditx.pipeline import train_recipe

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    seen = []
    original = RectifiedFlowObjective.loss

    def spy(self, model, x0, **kwargs):
        seen.append((kwargs["model_kwargs"] or {}).get("frame_mask"))
        return original(self, model, x0, **kwargs)

    monkeypatch.setattr(RectifiedFlowObjective, "loss", spy)
    data = {"name": "moving-digits", "root": str(tmp_path / "clips"), "num_frames": 4, "size": 24,
            "num_clips_train": 10, "num_clips_test": 10}  # fmt: skip
    recipe = tiny(tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 4, 4]},
                  train={"steps": 2, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1,
                         "mixed_precision": "no", "output_dir": str(tmp_path / "runs"), "seed": 1,
                         "frame_masks": {"image-to-video": 1.0}})  # fmt: skip
    run = train_recipe(recipe, run_dir=tmp_path / "run")
    assert len(seen) == 2
    for mask in seen:
        assert mask.shape == (4, 4) and mask.tolist() == [[True, False, False, False]] * 4
    check_sampling_from_given_frames(run, tmp_path, capsys)
    check_reading_the_class_of_given_frames(run, tmp_path)
    with pytest.raises(ValueError, match=r"train.frame_masks: unknown mask kind"):
        bad = tiny(tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 4, 4]},
                   train={"steps": 1, "output_dir": str(tmp_path / "runs2"), "frame_masks": {"first": 1.0}})
        train_recipe(bad, run_dir=tmp_path / "run2")


def check_sampling_from_given_frames(run, tmp_path, capsys):
    """From the run above (pixel space): an image as first frame, first + last, a clip's start; the
    given frames come out as given (resized and cropped like training clips), through the CLI too."""
    import decord
    import numpy as np
    from ditx.modalities.video.clips import read_frames, resize_center_crop
    from ditx.modalities.video.io import read_given_frames, write_video
    from PIL import Image

    from ditx.build import load_for_sampling
    from ditx.cli import main
    from ditx.diffusion.frames import given_frames
    from ditx.generation import generate

    rng = np.random.default_rng(0)
    first_png, last_png = tmp_path / "first.png", tmp_path / "last.png"
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(first_png)  # not square: cropped
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(last_png)
    clip = tmp_path / "clip.mp4"
    write_video(rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), clip)

    first = read_given_frames(first_png, 1, 24)
    expected = resize_center_crop(np.asarray(Image.open(first_png).convert("RGB"))[None], 24)
    assert first.shape == (3, 1, 24, 24) and torch.equal(first, expected)
    start = read_given_frames(clip, 2, 24)
    torch.testing.assert_close(start, resize_center_crop(read_frames(str(clip), [0, 1]), 24))

    recipe, parts, model = load_for_sampling(run)
    assert parts.data_shape == (3, 4, 24, 24)
    last = read_given_frames(last_png, 1, 24)
    for given, mask in (given_frames(4, first=first), given_frames(4, first=first, last=last),
                        given_frames(4, start=start)):  # fmt: skip
        samples, _ = generate(parts, model, 2, frames=(given, mask))
        assert torch.allclose(samples[:, :, mask], given[None, :, mask].expand(2, -1, -1, -1, -1), atol=1e-6)
        assert (samples[:, :, ~mask].abs() > 0).any()

    out = tmp_path / "i2v"
    assert main(["sample", str(run), "--first-frame", str(first_png), "--last-frame", str(last_png), "--num", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert len(decord.VideoReader(str(out / "sample_00000_class0.mp4"))) == 4
    capsys.readouterr()
    assert main(["sample", str(run), "--extend", str(clip), "--out", str(tmp_path / "x")]) == 2
    assert "extension needs both --extend CLIP and --frames N" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"clip.mp4 has 6 frames, fewer than the 8 to keep"):
        read_given_frames(clip, 8, 24)
    assert main(["sample", str(run), "--extend", str(clip), "--frames", "4", "--out", str(tmp_path / "y")]) == 2
    assert "4 given frames leave none of the 4 to generate" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"first.png is an image: it gives 1 frame, 2 were asked for"):
        read_given_frames(first_png, 2, 24)


def moved_by_hand(clip, down, right):
    """(..., H, W) with pixel (y, x) taken from (y - down, x - right), the edge repeated."""
    H, W = clip.shape[-2:]
    out = torch.empty_like(clip)
    for y in range(H):
        for x in range(W):
            out[..., y, x] = clip[..., min(max(y - down, 0), H - 1), min(max(x - right, 0), W - 1)]
    return out


def check_reading_the_class_of_given_frames(run, tmp_path):
    """sample.frame_class_levels: the null-class samples given frames take the class the model reads
    from their frames held still (the nearest given frame at every frame), each on its own seeded
    noise, whatever the batch size; with frame_class_views, from the held clip as given and moved by
    frame_class_shift pixels (right, left, down), the edge repeated; samples asked for a class keep
    it; ``ditx sample --first-frame`` names its files by the class read."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from ditx.build import load_for_sampling
    from ditx.cli import main
    from ditx.generation import generate, infer_frame_classes

    recipe, parts, model = load_for_sampling(run)
    null, levels, classes = model.null_class, 3, parts.num_classes
    assert classes == 10
    g = torch.Generator().manual_seed(2)
    clips = torch.rand(3, 3, 4, 24, 24, generator=g) * 2 - 1
    masks = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    nearest = {0: [0, 0, 0, 0], 2: [0, 1, 1, 1]}  # the given frame nearest each frame, by hand
    read = []  # what the classifier was given and what it answered, per call

    def spy(*args, **kwargs):
        errors = class_errors(*args, **kwargs)
        read.append((torch.stack(list(args[2])), kwargs["noise"].clone(), errors))  # views (V, B, ...)
        return errors

    import ditx.diffusion

    for batch_size, views in ((1, 1), (3, 3)):
        read.clear()
        config = dataclasses.replace(recipe.sample, frame_class_levels=levels, batch_size=batch_size, seed=5,
                                     frame_class_views=views, frame_class_shift=2)  # fmt: skip
        stats = {}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ditx.diffusion, "class_errors", spy)
            _, labels = generate(parts, model, 3, labels=torch.tensor([null, 7, null]), config=config,
                                 frames=(clips, masks), stats=stats)  # fmt: skip
        x0, noise, errors = (torch.cat(v, dim=1 if k == 0 else 0) for k, v in enumerate(zip(*read)))
        assert len(read) == (2 if batch_size == 1 else 1)  # only the null-class samples, in batches
        # pixel space: the clips held still at their nearest given frames, each on noise seeded by its index
        held = torch.stack([clips[i][:, nearest[i]] for i in (0, 2)])
        expected = [held, moved_by_hand(held, 0, 2), moved_by_hand(held, 0, -2)][:views]
        torch.testing.assert_close(x0, torch.stack(expected))
        for row, i in enumerate((0, 2)):
            seeded = torch.Generator().manual_seed(5 + i)
            assert torch.equal(noise[row], torch.randn(levels, 3, 4, 24, 24, generator=seeded))
        assert errors.shape == (2, classes)
        assert labels.tolist() == [int(errors[0].argmin()), 7, int(errors[1].argmin())]
        assert stats["class_evaluations"] == levels * classes
    with pytest.raises(ValueError, match=r"frame_class_levels=3 reads the class of given frames: it needs a "
                                         r"class-conditional model"):  # fmt: skip
        infer_frame_classes(parts, model, (clips, masks), None, config, "cpu")
    with pytest.raises(ValueError, match=r"frame_class_levels=-1: allowed a number of noise levels >= 1, or 0"):
        generate(parts, model, 3, config=dataclasses.replace(config, frame_class_levels=-1), frames=(clips, masks))

    png = tmp_path / "given.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(png)
    out = tmp_path / "read"
    assert main(["sample", str(run), "--first-frame", str(png), "--num", "2", "--out", str(out),
                 f"sample.frame_class_levels={levels}"]) == 0  # fmt: skip
    from ditx.modalities.video.clips import resize_center_crop

    first = resize_center_crop(np.asarray(Image.open(png).convert("RGB"))[None], 24)  # (3, 1, 24, 24)
    noise = torch.randn(levels, 3, 4, 24, 24, generator=torch.Generator().manual_seed(recipe.sample.seed))
    label = int(class_errors(model, parts.objective, first[None].expand(1, 3, 4, 24, 24), classes, levels,
                             noise=noise[None]).argmin(1))  # fmt: skip
    assert sorted(p.name for p in out.glob("sample_*.mp4")) == [f"sample_0000{i}_class{label}.mp4" for i in (0, 1)]


def test_frame_masks_map_onto_latent_frames():
    """Framewise VAEs keep frames; a causal VAE (9 frames -> 3 latent frames, r = 4) encodes the
    first frame alone, so image-to-video is its first latent frame, and a later latent frame is
    given only when all four of its frames are."""
    from ditx.diffusion.frames import frame_mask, latent_frame_mask

    assert torch.equal(latent_frame_mask(frame_mask("interpolation", 8), 8), frame_mask("interpolation", 8))
    assert latent_frame_mask(frame_mask("image-to-video", 9), 3).tolist() == [True, False, False]
    assert latent_frame_mask(frame_mask("extension", 9, given=5), 3).tolist() == [True, True, False]
    assert latent_frame_mask(frame_mask("extension", 9, given=4), 3).tolist() == [True, False, False]
    batch = torch.stack([frame_mask("image-to-video", 9), frame_mask("extension", 9, given=5)])
    assert latent_frame_mask(batch, 3).tolist() == [[True, False, False], [True, True, False]]
    with pytest.raises(ValueError, match=r"cannot map 10 frames onto 3 latent frames"):
        latent_frame_mask(torch.zeros(10, dtype=torch.bool), 3)


def test_image_to_video_through_a_causal_vae_keeps_the_first_frames_own_latent(tmp_path, monkeypatch):
    """Latent space with a causal 3D VAE (a tiny Wan VAE, saved and loaded back): 9 frames are 3
    latent frames and frame 0 is encoded alone, so a given first frame fixes latent frame 0 only,
    equal to the VAE's encoding of that image by itself (the causal reference), and the decoded
    clip starts with that image's reconstruction."""
    pytest.importorskip("diffusers")
    from ditx.modalities.video.autoencoder import CONFIGS, _model_class
    from test_modality_jobs import tiny

    from ditx import generation
    from ditx.build import load_for_sampling
    from ditx.diffusion.frames import given_frames
    from ditx.pipeline import train_recipe

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    _model_class("wan")(**CONFIGS["wan"]["tiny"]).save_pretrained(tmp_path / "wan" / "vae")
    data = {"name": "moving-digits", "root": str(tmp_path / "clips"), "num_frames": 9, "size": 24,
            "num_clips_train": 10, "num_clips_test": 10}  # fmt: skip
    recipe = tiny(tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 2, 2]},
                  autoencoder={"name": "video-vae", "kind": "wan", "pretrained": str(tmp_path / "wan"),
                               "subfolder": "vae"},
                  train={"steps": 1, "batch_size": 2, "checkpoint_every": 1, "mixed_precision": "no",
                         "output_dir": str(tmp_path / "runs"), "frame_masks": {"image-to-video": 1.0}},
                  sample={"scheduler": "flow-euler", "num_steps": 3, "num_samples": 2, "batch_size": 2})  # fmt: skip
    run = train_recipe(recipe, run_dir=tmp_path / "run")
    _, parts, model = load_for_sampling(run)
    assert parts.data_shape == (3, 9, 24, 24) and parts.latent_shape == (4, 3, 6, 6)

    first = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    seen = []
    sample = generation.diffusion_sample

    def spy(*args, **kwargs):
        z = sample(*args, **kwargs)
        seen.append((kwargs["frames"], z))
        return z

    monkeypatch.setattr(generation, "diffusion_sample", spy)
    samples, _ = generation.generate(parts, model, 2, frames=given_frames(9, first=first))
    (given, mask), z = seen[0]
    assert mask.tolist() == [[True, False, False]] * 2  # only latent frame 0 is the image's
    with torch.no_grad():
        alone = parts.autoencoder.encode(first[None])  # the image by itself: one latent frame
        reconstruction = parts.autoencoder.decode(alone)
    assert alone.shape == (1, 4, 1, 6, 6)
    torch.testing.assert_close(z[:, :, :1], alone.expand(2, -1, -1, -1, -1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(z[:, :, 1:], alone.expand(2, -1, 2, -1, -1), atol=1e-2)  # the rest is generated
    assert samples.shape == (2, 3, 9, 24, 24)
    torch.testing.assert_close(samples[:, :, :1], reconstruction.expand(2, -1, -1, -1, -1), atol=1e-4, rtol=1e-4)


def test_frame_mask_condition_dropout_drops_the_class_of_the_samples_given_frames(tmp_path, monkeypatch):
    """train.frame_mask_condition_dropout redraws the class dropout of the samples given frames
    (1.0: all of them generate for the null class, 0.0: none) and leaves every other sample's
    dropout as it is without the option (drawn after the other step randomness)."""
    from test_modality_jobs import tiny

    from ditx.diffusion.objectives import RectifiedFlowObjective
    from ditx.pipeline import train_recipe

    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "cache"))
    seen = []
    original = RectifiedFlowObjective.loss

    def spy(self, model, x0, **kwargs):
        mk = kwargs["model_kwargs"]
        seen.append((mk["frame_mask"].any(1), mk["force_drop"]))
        return original(self, model, x0, **kwargs)

    monkeypatch.setattr(RectifiedFlowObjective, "loss", spy)
    data = {"name": "moving-digits", "root": str(tmp_path / "clips"), "num_frames": 4, "size": 24,
            "num_clips_train": 16, "num_clips_test": 10}  # fmt: skip

    def drops(name, p):
        seen.clear()
        train = {"steps": 3, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1, "seed": 3,
                 "mixed_precision": "no", "output_dir": str(tmp_path / "runs"), "frame_masks": {"image-to-video": 0.5},
                 "frame_mask_condition_dropout": p}  # fmt: skip
        recipe = tiny(tmp_path, "video", data, {"name": "tubelet", "patch_size": [1, 4, 4]}, train=train,
                      model={"depth": 2, "hidden_size": 32, "num_heads": 2, "layout": "joint",
                             "class_dropout_prob": 0.3})  # fmt: skip
        train_recipe(recipe, run_dir=tmp_path / name)
        return torch.cat([g for g, _ in seen]), torch.cat([d for _, d in seen])

    given, base = drops("none", None)
    assert 0 < given.sum() < len(given) and 0 < base.sum() < len(base)  # both kinds of sample, some dropped
    for p, want in [(1.0, True), (0.0, False)]:
        given_p, drop_p = drops(f"p{p}", p)
        assert torch.equal(given_p, given)  # the same masks
        assert bool(drop_p[given].all() if want else not drop_p[given].any())
        assert torch.equal(drop_p[~given], base[~given])
    with pytest.raises(ValueError, match=r"frame_mask_condition_dropout=1.5: allowed a probability in \[0, 1\]"):
        drops("bad", 1.5)


# --- frame guidance: towards the given frames, against the model without them -------------


def frame_guidance_model(null):
    """Velocity 2 where the row is given frames, plus 1 for a real label: each branch's own constant."""
    calls = []

    def model(x, t, y=None, frame_mask=None):
        calls.append((x.clone(), t.clone(), None if y is None else y.clone(), frame_mask.clone()))
        v = 2.0 * frame_mask.any(1).float() + (0.0 if y is None else (y != null).float())
        return v.view(-1, 1, 1, 1, 1).expand_as(x).clone()

    return model, calls


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_frame_guidance_against_the_model_without_the_given_frames(guidance_scale):
    """Flow Euler over σ = 1 .. 0: the generated frames move by the guided velocity in all. Frame
    guidance alone: without frames (0 + label) + s_f·(2 + label − label); with class guidance too
    (InstructPix2Pix's order): without frames and label (0) + s_f·(2 − 0) + s·(3 − 2). The branch
    without frames sees no mask and its given frames noised to the step's σ with the initial noise."""
    null, s_f, steps = 5, 4.0, 4
    model, calls = frame_guidance_model(null)
    g = torch.Generator().manual_seed(7)
    clean, noise = torch.randn(2, 1, 3, 2, 2, generator=g), torch.randn(2, 1, 3, 2, 2, generator=g)
    mask = torch.tensor([[True, False, False], [True, False, True]])
    y = torch.tensor([1, 2])
    stats = {}
    out = sample(model, RectifiedFlowObjective(), noise.shape, scheduler="flow-euler", num_steps=steps, y=y,
                 null_class=null, guidance_scale=guidance_scale, frame_guidance_scale=s_f, noise=noise,
                 frames=(clean, mask), stats=stats)  # fmt: skip
    guided = 1 + s_f * 2 if guidance_scale == 1.0 else s_f * 2 + guidance_scale * 1
    frames_of = lambda v, m: v.transpose(1, 2)[m]  # noqa: E731
    torch.testing.assert_close(frames_of(out, ~mask), frames_of(noise - guided, ~mask))
    assert torch.equal(frames_of(out, mask), frames_of(clean, mask))
    branches = 2 if guidance_scale == 1.0 else 3
    assert stats["network_evaluations"] == branches * steps
    for x, t, labels, frame_mask in calls:
        assert len(x) == 2 * branches
        expected_labels = [1, 2, 1, 2] if guidance_scale == 1.0 else [1, 2, null, null, null, null]
        assert labels.tolist() == expected_labels
        assert torch.equal(frame_mask[: 2 * branches - 2], mask.repeat(branches - 1, 1)) and not frame_mask[-2:].any()
        sigma = t[0] / 1000
        free = x[-2:]
        torch.testing.assert_close(frames_of(free, mask), frames_of((1 - sigma) * clean + sigma * noise, mask))
        assert torch.equal(frames_of(x[:2], mask), frames_of(clean, mask))
    with pytest.raises(ValueError, match="frame_guidance_scale=4.0 guides towards given frames: pass frames"):
        sample(model, RectifiedFlowObjective(), noise.shape, scheduler="flow-euler", num_steps=1,
               frame_guidance_scale=4.0)


def test_noised_is_the_training_noise_level():
    """The frames without a mask see what training shows at that level: (1 − σ)·x0 + σ·ε for rectified
    flow, and for the DDPM family what diffusers' DDPMScheduler.add_noise gives at the same step."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0.0, 420.0, 999.0])
    sigma = (t / 1000).view(3, 1, 1)
    torch.testing.assert_close(RectifiedFlowObjective().noised(x0, eps, t), (1 - sigma) * x0 + sigma * eps)
    objective = DDPMObjective()
    reference = DDPMScheduler(**objective.scheduler_config).add_noise(x0, eps, t.long())
    torch.testing.assert_close(objective.noised(x0, eps, t), reference)


@pytest.mark.parametrize("objective", [RectifiedFlowObjective(logit_mean=-0.5, shift=3.0, shift_reference=[2, 4, 4]),
                                       DDPMObjective(learn_sigma=False)], ids=["flow", "ddpm"])  # fmt: skip
def test_levels_are_quantiles_of_the_training_draws(objective):
    """The k-th of ``num`` levels has (k + 1/2) / num of the training timesteps below it, for the
    data's size (the flow shift grows with it)."""
    shape = (3, 4, 8, 8)
    draws = objective.sample_t(200_000, shape=shape, generator=torch.Generator().manual_seed(0)).double()
    levels = objective.levels(8, shape=shape).double()
    below = (draws[None, :] < levels[:, None]).double().mean(1)
    torch.testing.assert_close(below, (torch.arange(8) + 0.5).double() / 8, atol=0.004, rtol=0)


def test_hold_given_frames_takes_the_nearest_given_frame():
    """Against a loop over frames: each frame becomes the given frame nearest in time, the earlier of
    two as near; a first frame alone makes a still clip; a clip without a given frame is refused."""
    from ditx.diffusion.frames import hold_given_frames

    g = torch.Generator().manual_seed(0)
    clip = torch.randn(5, 2, 7, 3, 4, generator=g)
    masks = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 1, 0],
                          [1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)  # fmt: skip
    held = hold_given_frames(clip, masks)
    for b in range(5):
        given = masks[b].nonzero().flatten().tolist()
        for t in range(7):
            nearest = min(given, key=lambda s: (abs(s - t), s))
            assert torch.equal(held[b, :, t], clip[b, :, nearest])
    assert torch.equal(hold_given_frames(clip[0], masks[0]), clip[0, :, :1].expand(-1, 7, -1, -1))
    with pytest.raises(ValueError, match="a clip has no given frame to hold"):
        hold_given_frames(clip[:1], torch.zeros(1, 7, dtype=torch.bool))


@pytest.mark.parametrize("objective", [RectifiedFlowObjective(), DDPMObjective(learn_sigma=False)],
                         ids=["flow", "ddpm"])  # fmt: skip
def test_class_errors_are_each_class_loss_on_the_same_noise_at_even_levels(objective):
    """A diffusion classifier: each class's error is the geometric mean over the levels (the
    objective's quantiles) of the objective's own loss (checked against the loss written out),
    every class on the same noise; a model that denoises exactly under one class per sample is read
    as that class, and one level's loss scale does not rule the others."""
    model = video_dit()
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 5, 3, 4, 8, 8, generator=g)
    errors = class_errors(model, objective, x0, 3, 5, noise=noise)
    levels = objective.levels(5, shape=x0.shape[1:])
    if isinstance(objective, RectifiedFlowObjective):  # quantiles of the logit-normal σ: sigmoid(Φ⁻¹(q))
        expected = [1 / (1 + math.exp(-NormalDist().inv_cdf(q))) for q in (0.1, 0.3, 0.5, 0.7, 0.9)]
        torch.testing.assert_close(levels, torch.tensor(expected))
    else:
        assert levels.tolist() == [100, 300, 500, 700, 900]
    losses = torch.zeros(5, 2, 3)  # (level, sample, class)
    with torch.no_grad():
        for i, level in enumerate(levels):
            eps = noise[:, i]
            if isinstance(objective, RectifiedFlowObjective):
                x_t, target = (1 - level) * x0 + level * eps, eps - x0
                t_model = level * 1000
            else:
                a = objective.alphas_cumprod[int(level)]
                x_t, target, t_model = a**0.5 * x0 + (1 - a) ** 0.5 * eps, eps, level.float()
            for c in range(3):
                out = model(x_t.float(), t_model.float().expand(2), torch.full((2,), c))
                losses[i, :, c] = ((out - target) ** 2).mean((1, 2, 3, 4))
    torch.testing.assert_close(errors, losses.prod(0) ** (1 / 5), rtol=1e-4, atol=1e-6)

    truth = torch.tensor([2, 0])

    def oracle(x_t, t, y, **_):  # the exact velocity under each sample's own class, zeros under the others
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        exact = (x_t - x0) / sigma
        return torch.where((y == truth).view(-1, 1, 1, 1, 1), exact, torch.zeros_like(exact))

    read = class_errors(oracle, RectifiedFlowObjective(), x0, 3, 4, generator=torch.Generator().manual_seed(0))
    assert read.argmin(1).tolist() == [2, 0] and read[[0, 1], [2, 0]].abs().max() < 1e-8


def test_class_errors_weigh_every_level_alike():
    """At a low level class 0's loss is half class 1's; at a high level, with losses 100 times
    larger, class 1's is 3% less. An arithmetic mean would follow the loud level (51.5 vs 51);
    the geometric mean reads class 0 (sqrt(1 * 103) vs sqrt(2 * 100))."""

    class TwoLevels:
        table = torch.tensor([[1.0, 2.0], [103.0, 100.0]])  # (level, class) losses

        def levels(self, num, shape):
            return torch.arange(num, dtype=torch.float32)

        def loss(self, model, x0, *, y, model_kwargs, noise, t):
            return {"mse": self.table[t.long(), y]}

    errors = class_errors(None, TwoLevels(), torch.zeros(1, 3, 2, 4, 4), 2, 2, noise=torch.zeros(1, 2, 3, 2, 4, 4))
    torch.testing.assert_close(errors, torch.tensor([[103.0**0.5, 200.0**0.5]]))
    assert errors.argmin(1).tolist() == [0]


def test_class_errors_share_the_levels_among_views():
    """Given views of the same samples, level i noises view i mod V (each view read at levels spread
    over the range), on that level's noise, and the errors are the geometric mean over all levels."""
    seen = []

    class Record:
        def levels(self, num, shape):
            return torch.arange(num, dtype=torch.float32)

        def loss(self, model, x0, *, y, model_kwargs, noise, t):
            seen.append((int(t[0]), int(x0[0, 0, 0, 0]), int(noise[0, 0, 0, 0]), int(y[0])))
            return {"mse": x0[:, 0, 0, 0] + 10 * t + y}  # which view and level and class it was given

    views = [torch.full((1, 1, 2, 2), float(v)) for v in range(3)]
    noise = torch.arange(5.0).view(1, 5, 1, 1, 1).expand(1, 5, 1, 2, 2)
    errors = class_errors(None, Record(), views, 2, 5, noise=noise)
    assert [(t, view, n) for t, view, n, c in seen if c == 0] == [(i, i % 3, i) for i in range(5)]
    for c in range(2):
        losses = torch.tensor([i % 3 + 10 * i + c for i in range(5)], dtype=torch.float32)
        torch.testing.assert_close(errors[0, c], losses.log().mean().exp())
    with pytest.raises(ValueError, match="x0 .* or views of one shape"):
        class_errors(None, Record(), [views[0], torch.zeros(1, 1, 3, 3)], 2, 5, noise=noise)


def test_shifted_views_move_the_frames_with_the_edge_repeated():
    from ditx.diffusion.frames import shifted_views

    clip = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)  # (..., H=5, W=7)
    offsets = [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)]  # (down, right)
    views = shifted_views(clip, 9, 2)
    for view, (down, right) in zip(views, offsets):
        assert torch.equal(view, moved_by_hand(clip, 2 * down, 2 * right))
    assert torch.equal(shifted_views(clip, 1, 0)[0], clip)
    with pytest.raises(ValueError, match=r"frame_class_views=10: allowed 1 to 9 views"):
        shifted_views(clip, 10, 2)
    with pytest.raises(ValueError, match=r"frame_class_shift=5: allowed a whole number of pixels from 1 to 4"):
        shifted_views(clip, 2, 5)
