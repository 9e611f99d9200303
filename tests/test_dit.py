"""The shared backbone: official sizes, initialization, layouts, conditioning, training features."""

import copy

import pytest
import torch

from ditx.dit import DIT_PRESETS, Attention, DiT, build_dit, resolve_layout
from ditx.tokenizer import PatchTokenizer

OFFICIAL_PARAMS = {  # 4 latent channels, 32x32, 1000 classes, learned sigma; without the frozen pos_embed
    "DiT-S/2": 32_865_056,
    "DiT-B/2": 130_315_808,
    "DiT-L/2": 457_840_672,
    "DiT-XL/2": 674_834_720,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset", list(OFFICIAL_PARAMS))
def test_preset_parameter_counts_equal_the_official_models(preset):
    with torch.device("meta"):
        model = build_dit(preset, in_channels=4, num_classes=1000, learn_sigma=True)
    assert n_params(model) == OFFICIAL_PARAMS[preset]


def test_all_presets_build_and_patch_size_only_changes_embed_and_head():
    assert len(DIT_PRESETS) == 12
    with torch.device("meta"):
        for size in ("S", "B", "L", "XL"):
            counts = {p: n_params(build_dit(f"DiT-{size}/{p}", num_classes=1000)) for p in (2, 4, 8)}
            d = DIT_PRESETS[f"DiT-{size}/2"]["hidden_size"]
            # patch embed has D*C*p^2 weights, the final linear D*p^2*2C (+ bias p^2*2C)
            for p in (4, 8):
                grow = (d * 4 + d * 8 + 8) * (p * p - 4)
                assert counts[p] - counts[2] == grow


def tiny_video_dit(layout="joint", **kw):
    tok = PatchTokenizer(("time", "height", "width"), (1, 2, 2), in_channels=3, hidden_size=32)
    return DiT(tok, depth=kw.pop("depth", 2), num_heads=4, layout=layout, **kw)


def randomize(model, seed=0):
    """Non-zero weights everywhere (adaLN-Zero makes a fresh model output exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_initialization_is_dits():
    model = build_dit("DiT-S/2", num_classes=10)
    for block in model.blocks:
        assert block.adaLN_modulation[1].weight.abs().sum() == 0
    assert model.final_layer.linear.weight.abs().sum() == 0
    std = model.y_embedder.embedding_table.weight.std().item()
    assert 0.018 < std < 0.022
    fc1 = model.blocks[0].mlp.fc1.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert fc1.abs().max() <= (6 / (384 + 1536)) ** 0.5 and fc1.abs().max() > 0.9 * (6 / (384 + 1536)) ** 0.5
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: the model starts at 0


def test_condition_is_embedded_once_per_forward():
    model = randomize(build_dit(depth=3, hidden_size=32, num_heads=4, num_classes=5))
    calls = []
    model.t_embedder.register_forward_hook(lambda *a: calls.append("t"))
    model.y_embedder.register_forward_hook(lambda *a: calls.append("y"))
    model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 4]))
    assert calls == ["t", "y"]


def test_any_resolution_and_non_square_inputs():
    model = randomize(build_dit(depth=2, hidden_size=32, num_heads=4, num_classes=3))
    for size in [(16, 16), (8, 24), (32, 8)]:
        out = model(torch.randn(2, 4, *size), torch.tensor([3.0, 4.0]), torch.tensor([0, 2]))
        assert out.shape == (2, 8, *size) and torch.isfinite(out).all()


# --- layouts ---------------------------------------------------------------------------


def test_layout_presets():
    axes = ("time", "height", "width")
    assert resolve_layout("joint", 3, axes) == [None] * 3
    assert resolve_layout("spatial-temporal", 4, axes) == [("height", "width"), ("time",)] * 2
    assert resolve_layout("spatial-then-temporal", 4, axes) == [("height", "width")] * 2 + [("time",)] * 2
    assert resolve_layout("plane-cross-plane", 2, ("plane", "height", "width")) == [("height", "width"), None]
    assert resolve_layout([["width", "time"], "all"], 3, axes) == [("time", "width"), None, ("time", "width")]
    with pytest.raises(ValueError, match=r"layout 'spatial-temporal' needs a 'time' axis.*\('height', 'width'\)"):
        resolve_layout("spatial-temporal", 2, ("height", "width"))
    with pytest.raises(ValueError, match=r"not a set of the tokenizer's axes"):
        resolve_layout([["depth"]], 2, axes)
    with pytest.raises(ValueError, match=r"unknown attention layout 'diagonal'; presets: joint, spatial-temporal"):
        resolve_layout("diagonal", 2, axes)


@pytest.mark.parametrize("attend", [(1, 2), (0,), (0, 2), (2,)])
def test_grouped_attention_equals_attention_on_each_group(attend):
    torch.manual_seed(0)
    attn = Attention(32, 4)
    grid = (3, 4, 5)
    x = torch.randn(2, 60, 32)
    out = attn(x, grid, attend)
    # reference: move the attended axes last, run plain (joint) attention per group
    outer = [i for i in range(3) if i not in attend]
    xs = x.reshape(2, *grid, 32).permute(0, *(1 + i for i in outer + list(attend)), 4)
    sizes = xs.shape[1:-1]
    n = 1
    for i in attend:
        n *= grid[i]
    ref = attn(xs.reshape(-1, n, 32), (n,), None).reshape(2, *sizes, 32)
    inverse = sorted(range(3), key=(outer + list(attend)).__getitem__)
    ref = ref.permute(0, *(1 + i for i in inverse), 4).reshape(2, 60, 32)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_spatial_blocks_keep_frames_independent():
    model = randomize(tiny_video_dit(layout=[["height", "width"]], depth=3)).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    t = torch.tensor([500.0])
    base = model(x, t)
    x2 = x.clone()
    x2[:, :, 2] += torch.randn_like(x2[:, :, 2])  # change frame 2 only
    out = model(x2, t)
    changed = (out - base).abs().amax(dim=(0, 1, 3, 4))  # per output frame
    assert changed[2] > 1e-3
    assert torch.equal(changed[[0, 1, 3]], torch.zeros(3))


def test_temporal_blocks_keep_locations_independent_and_joint_mixes_frames():
    model = randomize(tiny_video_dit(layout=[["time"]], depth=2)).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    t = torch.tensor([500.0])
    x2 = x.clone()
    x2[:, :, 1, 0:2, 0:2] += 1.0  # one patch location in frame 1
    diff = (model(x2, t) - model(x, t)).abs().amax(dim=(0, 1))  # (T, H, W)
    assert diff[:, 0:2, 0:2].amax(dim=(1, 2)).min() > 1e-4  # every frame at that location changes
    assert diff[:, 2:, :].abs().max() == 0 and diff[:, :, 2:].abs().max() == 0
    joint = randomize(tiny_video_dit("joint")).eval()
    assert (joint(x2, t) - joint(x, t))[:, :, 3, 4:, 4:].abs().max() > 1e-4


# --- conditioning --------------------------------------------------------------------------


def test_class_dropout_goes_to_the_null_class():
    model = randomize(build_dit(depth=1, hidden_size=32, num_heads=4, num_classes=5, class_dropout_prob=0.999))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 2.0, 3.0])
    null = torch.full((3,), model.null_class)
    assert model.null_class == 5
    model.eval()
    ref = model(x, t, null)
    assert not torch.allclose(model(x, t, torch.tensor([0, 1, 2])), ref)
    torch.manual_seed(0)
    model.train()
    torch.testing.assert_close(model(x, t, torch.tensor([0, 1, 2])), ref)  # dropped with p ~ 1
    model.eval()
    forced = model(x, t, torch.tensor([0, 1, 2]), force_drop=torch.tensor([1, 0, 0]))
    torch.testing.assert_close(forced[0], ref[0])
    assert not torch.allclose(forced[1], ref[1])
    with pytest.raises(ValueError, match=r"class label 7 is out of range: labels are 0..4, 5 is the null"):
        model(x, t, torch.tensor([0, 7, 1]))


def test_unconditional_model():
    model = randomize(build_dit(depth=1, hidden_size=32, num_heads=4, num_classes=0))
    assert model.y_embedder is None and model.null_class is None
    assert model(torch.randn(1, 4, 8, 8), torch.tensor([5.0])).shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.tensor([0]))


def test_context_cross_attention_respects_padding_mask():
    model = randomize(build_dit(depth=2, hidden_size=32, num_heads=4, num_classes=0, context_dim=12)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0])
    ctx = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    base = model(x, t, context=ctx, context_mask=mask)
    padded = ctx.clone()
    padded[0, 3:] = 100.0
    padded[1, 5:] = -50.0
    torch.testing.assert_close(model(x, t, context=padded, context_mask=mask), base)
    visible = ctx.clone()
    visible[:, 0] += 1.0
    assert (model(x, t, context=visible, context_mask=mask) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    with pytest.raises(ValueError, match="pass context"):
        model(x, t)


def test_forward_with_cfg_guides_first_three_channels():
    model = randomize(build_dit(depth=1, hidden_size=32, num_heads=4, num_classes=5)).eval()
    x = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    t = torch.full((4,), 300.0)
    y = torch.tensor([1, 2, 5, 5])
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    cond, uncond = model(x, t, y).chunk(2)
    torch.testing.assert_close(out[:2, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:])
    torch.testing.assert_close(out[2:], out[:2])


# --- training-time features -------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(tiny_video_dit("spatial-temporal", depth=4, num_classes=3))
    x, t, y = torch.randn(2, 3, 2, 4, 4), torch.tensor([10.0, 700.0]), torch.tensor([0, 2])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(ckpt)
        torch.manual_seed(0)  # same label dropout
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_on_cpu_runs_and_stays_close():
    model = randomize(build_dit(depth=2, hidden_size=64, num_heads=4, num_classes=3), seed=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t, y).float().square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = randomize(tiny_video_dit("spatial-temporal", depth=2, num_classes=3)).eval()
    x, t, y = torch.randn(2, 3, 2, 4, 4), torch.tensor([10.0, 700.0]), torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        out = torch.compile(model)(x, t, y)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_training_gradients_match_eager():
    """Regional (compile_blocks, with and without checkpointing) and whole-model compile, backward included.

    Before DiT.forward made the tokens contiguous, torch 2.13's inductor gave gradients
    7-12% off here (the tokenizer's output is a transposed view).
    """
    ref = randomize(tiny_video_dit("spatial-temporal", depth=2, num_classes=3)).train()
    regional = copy.deepcopy(ref).compile_blocks()
    assert list(regional.state_dict()) == list(ref.state_dict())  # compiled in place: same keys
    whole = copy.deepcopy(ref)
    x, t, y = torch.randn(2, 3, 2, 4, 4), torch.tensor([10.0, 700.0]), torch.tensor([0, 2])
    drop = torch.tensor([False, True])
    cases = [(regional, regional, False), (regional, regional, True), (whole, torch.compile(whole), False)]
    for model, call, checkpointing in cases:
        for m, f in ((ref, ref), (model, call)):
            m.gradient_checkpointing = checkpointing
            m.zero_grad(set_to_none=True)
            f(x, t, y, force_drop=drop).square().mean().backward()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_compiled_blocks_with_rope_qk_norm_and_clean_frames_match_eager_across_grids():
    """What video/moving-digits-buckets compiles (model.compile: auto): rotary positions, QK norm and
    clean conditioning frames, one grid after another as buckets change, gradients included."""
    ref = randomize(tiny_video_dit(position="rope", qk_norm=True, num_classes=3)).train()
    compiled = copy.deepcopy(ref).compile_blocks()
    g = torch.Generator().manual_seed(0)
    for frames, width in ((2, 4), (3, 6), (2, 6)):
        x = torch.randn(3, 3, frames, 4, width, generator=g)
        t, y, drop = torch.tensor([10.0, 700.0, 300.0]), torch.tensor([0, 2, 1]), torch.tensor([False, True, False])
        mask = torch.zeros(3, frames, dtype=torch.bool)
        mask[0, 0] = mask[2, -1] = True
        outs = []
        for m in (ref, compiled):
            m.zero_grad(set_to_none=True)
            out = m(x, t, y, force_drop=drop, frame_mask=mask)
            out.square().mean().backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
        for (name, a), b in zip(compiled.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", ["spatial-temporal", "joint"])
def test_image_frames_stay_out_of_attention_over_time(layout):
    """Joint image-video training: the last num_images frames are independent images."""
    model = randomize(tiny_video_dit(layout=layout, depth=2)).eval()
    x = torch.randn(1, 3, 5, 8, 8)  # 3 video frames + 2 images
    t = torch.tensor([500.0])
    base = model(x, t, num_images=2)
    image = x.clone()
    image[:, :, 4] += 1.0
    out = model(image, t, num_images=2)
    torch.testing.assert_close(out[:, :, :4], base[:, :, :4], atol=1e-6, rtol=0)  # clip and other image unchanged
    assert (out[:, :, 4] - base[:, :, 4]).abs().max() > 1e-4
    video = x.clone()
    video[:, :, 0] += 1.0
    out = model(video, t, num_images=2)
    assert (out[:, :, 2] - base[:, :, 2]).abs().max() > 1e-4  # video frames still see each other
    torch.testing.assert_close(out[:, :, 3:], base[:, :, 3:], atol=1e-6, rtol=0)  # images do not
    # without num_images every frame is video
    assert (model(image, t)[:, :, :3] - model(x, t)[:, :, :3]).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"num_images must be in \[1, 4\] for 5 frames"):
        model(x, t, num_images=5)
