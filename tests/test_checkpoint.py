"""Official DiT import (same outputs as the published model), the ditx checkpoint format, the CLI."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ditx.checkpoint import CheckpointError, load_model, save_model
from ditx.cli import main
from ditx.dit import DiT, build_dit
from ditx.files import atomic_write
from ditx.official import inspect_official_dit, load_official_dit, official_dit_keys, read_state_dict
from ditx.positions import sincos_nd

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, including adaLN and the final layer (zero at init, which
    would make every block the identity and the output 0: a vacuous comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embedding_table.weight"):
                p.normal_(0, 1.0, generator=g)
            elif p.ndim >= 2:  # unit-gain weights keep activations O(1) through the blocks
                p.normal_(0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.normal_(0, 0.2, generator=g)
    return model


def official_state_dict(model: DiT, input_size: int, patch: int) -> dict[str, torch.Tensor]:
    """The model's weights in the official layout: ditx names plus the frozen (1, N, D) pos_embed."""
    side = input_size // patch
    pos = torch.from_numpy(sincos_nd(model.hidden_size, (side, side))).float()[None]
    return {"pos_embed": pos, **{k: v.clone() for k, v in model.state_dict().items()}}


def official_forward(sd, x, t, y, num_heads):
    """facebookresearch/DiT's forward, written from the paper's equations with functional ops only."""

    def linear(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    w = sd["x_embedder.proj.weight"]
    d, p = w.shape[0], w.shape[2]
    b = x.shape[0]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p)  # (B, D, H/p, W/p)
    gh, gw = h.shape[2:]
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, N, D)
    n = h.shape[1]

    half = 128  # 256 frequencies, [cos, sin], max period 10000
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)
    t_emb = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]  # (B, D)

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hd = d // num_heads
    for i in range(depth):
        blk = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), f"{blk}.adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (d,), eps=1e-6), shift1, scale1)
        q, k, v = linear(a, f"{blk}.attn.qkv").reshape(b, n, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)  # (B, heads, N, N)
        a = (weights @ v).transpose(1, 2).reshape(b, n, d)
        h = h + gate1[:, None] * linear(a, f"{blk}.attn.proj")
        m = modulate(F.layer_norm(h, (d,), eps=1e-6), shift2, scale2)
        m = linear(F.gelu(linear(m, f"{blk}.mlp.fc1"), approximate="tanh"), f"{blk}.mlp.fc2")
        h = h + gate2[:, None] * m

    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(F.layer_norm(h, (d,), eps=1e-6), shift, scale), "final_layer.linear")  # (B, N, p*p*C)
    out_c = h.shape[-1] // (p * p)
    h = h.reshape(b, gh, gw, p, p, out_c)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, out_c, gh * p, gw * p)


@pytest.fixture(scope="module")
def dit_s2():
    """A random official-layout DiT-S/2 state dict (32x32 latents, 1000 classes)."""
    torch.manual_seed(0)
    model = randomize(build_dit("DiT-S/2", num_classes=1000), seed=1)
    return official_state_dict(model, input_size=32, patch=2)


@pytest.fixture(scope="module")
def tiny():
    """A small official-layout state dict of a size no preset has (depth 2, hidden 64)."""
    model = randomize(build_dit(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_classes=10), seed=2)
    return official_state_dict(model, input_size=8, patch=2)


def inputs(batch=3, size=32, num_classes=1000, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([0.0, 417.0, 999.0])[:batch]
    y = torch.tensor([1, num_classes // 5 + 5, num_classes])[:batch]  # the last one is the null (unconditional) class
    return x, t, y


# ---------------------------------------------------------------------------------------
# official DiT import
# ---------------------------------------------------------------------------------------


def test_official_dit_outputs_match_the_published_forward(dit_s2):
    model = load_official_dit(dit_s2)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        ref = official_forward(dit_s2, x, t, y, num_heads=6)
        other_label = model(x, t, torch.tensor([2, 3, 4]))
        other_time = model(x, t + 100, y)
    assert out.shape == (3, 8, 32, 32)
    assert ref.std() > 0.1  # the comparison is not between zeros
    assert (out - ref).abs().max().item() <= 1e-5
    # adaLN is live: the condition changes the output
    assert (other_label - out).abs().max() > 1e-2
    assert (other_time - out).abs().max() > 1e-2


def test_inspect_reads_the_architecture_from_shapes(dit_s2):
    spec = inspect_official_dit(dit_s2)
    assert spec.preset == "DiT-S/2"
    assert (spec.depth, spec.hidden_size, spec.num_heads, spec.patch_size) == (12, 384, 6, 2)
    assert (spec.in_channels, spec.out_channels, spec.num_classes, spec.input_size) == (4, 8, 1000, 32)
    assert spec.learn_sigma and spec.grid == (16, 16)
    assert "DiT-S/2" in spec.summary() and "4x32x32" in spec.summary()


def test_official_key_list_is_the_ditx_xl_state_dict_plus_pos_embed():
    with torch.device("meta"):  # the real-sized layout without allocating 675M parameters
        model = build_dit("DiT-XL/2", num_classes=1000)
    keys = official_dit_keys(28)
    assert len(keys) == len(set(keys))
    assert set(keys) == set(model.state_dict()) | {"pos_embed"}
    assert sum(p.numel() for p in model.parameters()) == 675_129_632 - 256 * 1152  # official count has pos_embed


@pytest.mark.parametrize("key", ["blocks.3.mlp.fc2.bias", "y_embedder.embedding_table.weight", "pos_embed"])
def test_missing_key_is_named(dit_s2, key):
    sd = {k: v for k, v in dit_s2.items() if k != key}
    with pytest.raises(CheckpointError, match=rf"missing keys: {key}"):
        load_official_dit(sd)


def test_extra_key_is_named(dit_s2):
    sd = dict(dit_s2, **{"blocks.0.attn.q_norm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.attn\.q_norm\.weight"):
        load_official_dit(sd)
    prefixed = {f"module.{k}": v for k, v in dit_s2.items()}
    with pytest.raises(CheckpointError, match=r"missing keys: pos_embed.*unexpected keys: module\.pos_embed.*strip"):
        load_official_dit(prefixed)


def test_modified_pos_embed_is_rejected(dit_s2):
    learned = dict(dit_s2, pos_embed=dit_s2["pos_embed"] + 0.01 * torch.randn_like(dit_s2["pos_embed"]))
    with pytest.raises(CheckpointError, match=r"pos_embed .*sin-cos.*16x16"):
        load_official_dit(learned)
    not_square = dict(dit_s2, pos_embed=dit_s2["pos_embed"][:, :200])
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(1, 200, 384\)"):
        load_official_dit(not_square)


def test_inconsistent_shapes_are_an_error(dit_s2):
    sd = dict(dit_s2, **{"blocks.5.attn.qkv.weight": torch.zeros(3 * 384, 385)})
    with pytest.raises(CheckpointError, match=r"blocks\.5\.attn\.qkv\.weight"):
        load_official_dit(sd)


def test_sizes_without_a_preset_need_num_heads(tiny):
    with pytest.raises(CheckpointError, match=r"no DiT preset has depth 2 and hidden size 64.*DiT-XL.*num_heads"):
        load_official_dit(tiny)
    model = load_official_dit(tiny, num_heads=4)
    spec = inspect_official_dit(tiny, num_heads=4)
    assert spec.preset is None and spec.input_size == 8 and spec.num_classes == 10
    x, t, y = inputs(size=8, num_classes=10)
    with torch.no_grad():
        assert (model(x, t, y) - official_forward(tiny, x, t, y, num_heads=4)).abs().max() <= 1e-5


def test_reads_pt_files_training_checkpoints_and_safetensors(tmp_path, tiny):
    from safetensors.torch import save_file

    x, t, y = inputs(size=8, num_classes=10)
    expected = official_forward(tiny, x, t, y, num_heads=4)

    torch.save(tiny, tmp_path / "release.pt")
    other = {k: torch.zeros_like(v) for k, v in tiny.items()}
    training = {"model": other, "ema": tiny, "opt": {"state": {}}, "args": argparse.Namespace(model="DiT-S/2")}
    torch.save(training, tmp_path / "0400000.pt")
    save_file(tiny, str(tmp_path / "release.safetensors"))

    for name in ("release.pt", "0400000.pt", "release.safetensors", "in-memory"):
        source = training if name == "in-memory" else tmp_path / name
        model = load_official_dit(source, num_heads=4)
        with torch.no_grad():
            assert (model(x, t, y) - expected).abs().max() <= 1e-5, name  # ema preferred over model

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        read_state_dict(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_state_dict(tmp_path / "missing.pt")


def test_unsupported_suffix_lists_the_allowed_ones(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\.pt, \.pth, \.safetensors"):
        read_state_dict(tmp_path / "weights.ckpt")


# ---------------------------------------------------------------------------------------
# ditx checkpoints and the CLI
# ---------------------------------------------------------------------------------------


def test_save_and_load_model_round_trip(tmp_path):
    model = randomize(build_dit(depth=2, hidden_size=64, num_heads=4, patch_size=4, num_classes=5), seed=4).eval()
    out = save_model(model, tmp_path / "m", metadata={"input_size": 16})
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "ditx-model" and config["metadata"] == {"input_size": 16}
    loaded = load_model(out)
    x = torch.randn(2, 4, 16, 24)  # non-square works too
    t, y = torch.tensor([5.0, 50.0]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert not loaded.training
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporaries left


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing.*config\.json"):
        load_model(tmp_path / "nothing")
    model = build_dit(depth=1, hidden_size=32, num_heads=2, num_classes=3)
    out = save_model(model, tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(out)


def test_cli_convert_round_trip(tmp_path, tiny, capsys):
    torch.save(tiny, tmp_path / "official.pt")
    out = tmp_path / "converted"
    assert main(["convert", "dit-official", str(tmp_path / "official.pt"), str(out), "--num-heads", "4"]) == 0
    summary = capsys.readouterr().out
    assert "4x8x8" in summary and "10 classes" in summary
    converted, direct = load_model(out), load_official_dit(tiny, num_heads=4)
    x, t, y = inputs(size=8, num_classes=10)
    with torch.no_grad():
        assert torch.equal(converted(x, t, y), direct(x, t, y))
    assert json.loads((out / "config.json").read_text())["metadata"]["input_size"] == 8
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode  # not private


def test_cli_failure_is_a_message_and_leaves_no_output(tmp_path, tiny, capsys):
    broken = {k: v for k, v in tiny.items() if k != "final_layer.linear.bias"}
    torch.save(broken, tmp_path / "broken.pt")
    out = tmp_path / "out"
    assert main(["convert", "dit-official", str(tmp_path / "broken.pt"), str(out), "--num-heads", "4"]) == 2
    err = capsys.readouterr().err
    assert "final_layer.linear.bias" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt"]

    # an existing OUT is kept unless --overwrite
    torch.save(tiny, tmp_path / "ok.pt")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "dit-official", str(tmp_path / "ok.pt"), str(out), "--num-heads", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["convert", "dit-official", str(tmp_path / "ok.pt"), str(out), "--num-heads", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "ok.pt", "out"]


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["convert", "dit-official", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: ditx" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# atomic_write
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [False, True])
def test_atomic_write_failure_leaves_nothing(tmp_path, directory):
    target = tmp_path / "target"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, directory=directory) as tmp:
            (tmp / "part" if directory else tmp).write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("directory", [False, True])
def test_atomic_write_failure_keeps_the_old_target(tmp_path, directory):
    target = tmp_path / "target"
    if directory:
        target.mkdir()
        (target / "a").write_text("old")
    else:
        target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, directory=directory) as tmp:
            (tmp / "a" if directory else tmp).write_text("new")
            raise RuntimeError("boom")
    assert (target / "a" if directory else target).read_text() == "old"
    with atomic_write(target, directory=directory) as tmp:
        (tmp / "b" if directory else tmp).write_text("new")
    assert (target / "b" if directory else target).read_text() == "new"
    if directory:  # replaced, not merged
        assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_a_dit_built_from_a_tokenizer_instance_records_its_config(tmp_path):
    """Every DiT records its constructor config, also when given a (registered) tokenizer object:
    save_model/load_model rebuild the same model from config.json alone."""
    from ditx.dit import DiT
    from ditx.registry import tokenizers

    torch.manual_seed(0)
    tokenizer = tokenizers.build("tubelet", patch_size=[1, 2, 2], in_channels=3, hidden_size=32, out_channels=6)
    model = DiT(tokenizer, depth=2, num_heads=2, num_classes=5, layout="spatial-temporal")
    assert model.config["tokenizer"] == {"name": "tubelet", "patch_size": [1, 2, 2], "in_channels": 3,
                                         "out_channels": 6}  # fmt: skip
    loaded = load_model(save_model(model, tmp_path / "model"))
    x, t, y = torch.randn(2, 3, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)
