"""Text as a condition: the backbone's cross-attention and pooled embedding, guidance against a
negative caption, caption tables, prompt slugs. (Training, caching and sampling from prompts
end to end: ``test_text_training.py``.)"""

from __future__ import annotations

import pytest
import torch

from ditx.dit import DiT
from ditx.text import CaptionTable, TextEmbedding
from ditx.writers import caption_slug, sample_stem


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    model = DiT({"name": "patch2d", "in_channels": 1, "out_channels": 1, "patch_size": 2}, depth=2, num_heads=2,
                hidden_size=16, context_dim=8, **kwargs)  # fmt: skip
    for p in model.parameters():  # zero-initialised projections would hide the condition
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_padding_tokens_never_change_the_output_and_the_mask_decides_which_are_padding():
    model = tiny_dit()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    out = model(x, t, context=context, context_mask=mask)
    changed = context.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8) * 10  # padding made different
    torch.testing.assert_close(model(x, t, context=changed, context_mask=mask), out)
    # the reference: a caption given only its real tokens (no padding at all) gives the same output
    first = model(x[:1], t[:1], context=context[:1, :2], context_mask=None)
    torch.testing.assert_close(first, out[:1], atol=1e-5, rtol=1e-5)
    changed[mask] += 1.0  # real tokens do matter
    assert not torch.allclose(model(x, t, context=changed, context_mask=mask), out)


@pytest.mark.parametrize("backend", ["sdpa", "math", "eager"])
def test_a_caption_whose_mask_is_all_padding_attends_to_every_token_instead_of_giving_nan(backend):
    model = tiny_dit(attention_backend=backend)
    out = model(torch.randn(1, 1, 8, 8), torch.tensor([3.0]), context=torch.randn(1, 4, 8),
                context_mask=torch.zeros(1, 4, dtype=torch.bool))  # fmt: skip
    assert torch.isfinite(out).all()


def test_the_pooled_embedding_joins_the_timestep_condition_and_is_required_when_declared():
    model = tiny_dit(pooled_dim=6)
    assert model.config["pooled_dim"] == 6
    x, t, context = torch.randn(1, 1, 8, 8), torch.tensor([7.0]), torch.randn(1, 3, 8)
    pooled = torch.randn(1, 6)
    out = model(x, t, context=context, pooled=pooled)
    # independent reference: c = t_embedder(t) + pooled projection, computed by hand
    c = model.t_embedder(t) + model.pooled_embedder.fc2(torch.nn.functional.silu(model.pooled_embedder.fc1(pooled)))
    torch.testing.assert_close(model.embed_condition(t, None, pooled=pooled), c)
    assert not torch.allclose(model(x, t, context=context, pooled=pooled + 1), out)
    with pytest.raises(ValueError, match="pooled_dim is set"):
        model(x, t, context=context)
    with pytest.raises(ValueError, match="pooled_dim=None"):
        tiny_dit()(x, t, context=context, pooled=pooled)
    assert "pooled_dim" not in tiny_dit().config  # models without one keep their old config


def test_guidance_is_against_the_negative_caption_context():
    from ditx.diffusion import objectives
    from ditx.diffusion.sampling import sample

    calls = []

    def model(x, t, y=None, context=None, context_mask=None):
        calls.append((context.clone(), context_mask.clone()))
        return context.mean((1, 2))[:, None, None, None].expand_as(x).clone()  # depends on the context only

    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    obj = objectives.RectifiedFlowObjective()
    x = sample(model, obj, (2, 1, 2, 2), scheduler="flow-euler", num_steps=1, guidance_scale=3.0,
               model_kwargs={"context": cond, "context_mask": mask},
               uncond_model_kwargs={"context": uncond, "context_mask": mask},
               noise=torch.zeros(2, 1, 2, 2))  # fmt: skip
    context, _ = calls[0]
    assert context.shape == (4, 3, 4)  # one batch of [cond; uncond]
    assert torch.equal(context[:2], cond) and torch.equal(context[2:], uncond)
    # one Euler step from x=0 over sigma 1 -> 0 with velocity -1 + 3 * (2 - (-1)) = 8: x = 0 - 1 * 8
    torch.testing.assert_close(x, torch.full((2, 1, 2, 2), -8.0))
    with pytest.raises(ValueError, match="no conditional value"):
        sample(model, obj, (2, 1, 2, 2), scheduler="flow-euler", num_steps=1, guidance_scale=3.0,
               model_kwargs={}, uncond_model_kwargs={"context": uncond})  # fmt: skip


def test_a_caption_table_gives_back_what_was_encoded_and_names_a_caption_it_lacks(tmp_path):
    class Recording(torch.nn.Module):
        dim, max_length, pooled_dim = 4, 3, 2

        def __init__(self):
            super().__init__()
            self.seen = []

        def encode(self, captions):
            self.seen += list(captions)
            codes = torch.tensor([float(len(c)) for c in captions])
            return TextEmbedding(codes[:, None, None].expand(-1, 3, 4).clone(),
                                 torch.ones(len(captions), 3, dtype=torch.bool), codes[:, None].expand(-1, 2).clone())

    encoder = Recording()
    table = CaptionTable.build(encoder, ["a 7", "a 12 x", "a 7"], batch_size=2, key={"k": 1})
    assert sorted(encoder.seen) == ["", "a 12 x", "a 7"]  # each distinct caption once, and the empty one
    path = table.save(tmp_path / "text.safetensors")
    loaded = CaptionTable.load(path)
    assert loaded.key == {"k": 1} and (loaded.dim, loaded.max_length, loaded.pooled_dim) == (4, 3, 2)
    got, want = loaded.encode(["a 12 x", "", "a 7"]), encoder.encode(["a 12 x", "", "a 7"])
    for a, b in ((got.tokens, want.tokens), (got.mask, want.mask), (got.pooled, want.pooled)):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="'a 9'.*ditx cache-latents"):
        loaded.encode(["a 9"])


def test_prompt_slugs_are_short_safe_file_names():
    assert caption_slug("A 7 moving left, and right!") == "a-7-moving-left-and-right"
    assert caption_slug("Ünïcode  café /etc/passwd") == "unicode-cafe-etc-passwd"
    assert caption_slug("") == "empty" and caption_slug("!!!") == "empty"
    long = caption_slug("word " * 30)
    assert len(long) <= 40 and long.endswith("word")
    stem = sample_stem(3, torch.tensor([0, 0, 0, 7]), ["", "", "", "a 7 circling"])
    assert stem == "sample_00003_class7_a-7-circling"


def test_context_pooling_adds_the_mean_of_the_real_tokens_to_the_condition():
    from ditx.dit import attendable, masked_mean

    tokens = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert attendable(mask).tolist() == [[True, True, False], [True, True, True]]
    expected = torch.stack([tokens[0, :2].mean(0), tokens[1].mean(0)])
    torch.testing.assert_close(masked_mean(tokens, attendable(mask)), expected)
    model = tiny_dit(context_pool=True)
    assert model.config["context_pool"] is True and "context_pool" not in tiny_dit().config
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([5.0])
    context, mask = torch.randn(1, 3, 8), torch.tensor([[True, True, False]])
    out = model(x, t, context=context, context_mask=mask)
    for block in model.blocks:  # without cross-attention, the caption reaches the output only through c
        block.cross_attn.proj.weight.data.zero_()
        block.cross_attn.proj.bias.data.zero_()
    changed = context.clone()
    changed[0, 2] += 5.0  # padding: ignored by the mean too
    torch.testing.assert_close(model(x, t, context=changed, context_mask=mask), model(x, t, context=context,
                                                                                      context_mask=mask))  # fmt: skip
    changed[0, 0] += 1.0
    assert not torch.allclose(model(x, t, context=changed, context_mask=mask), out)
    with pytest.raises(ValueError, match="context_pool needs context tokens"):
        DiT({"name": "patch2d", "in_channels": 1, "out_channels": 1, "patch_size": 2}, depth=1, num_heads=2,
            hidden_size=16, context_pool=True)  # fmt: skip
