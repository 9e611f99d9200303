"""Text encoders through transformers' real classes: a tiny T5 and a tiny CLIP text tower with a
tokenizer built locally (``tokenizers``), saved with ``save_pretrained`` and loaded back
through the same ``from_pretrained`` path as real weights (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ditx.registry import text_encoders  # noqa: E402
from ditx.text import TextEncoder, word_level_tokenizer  # noqa: E402

WORDS = ["<pad>", "</s>", "<unk>", "a", "7", "2", "moving", "left", "and", "right", "going", "round", "in", "circle"]


def word_tokenizer():
    """A word-level tokenizer that ends every caption with ``</s>``, as T5's and CLIP's do."""
    return word_level_tokenizer(WORDS)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    T5EncoderModel(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_t5_encodes_captions_like_transformers_itself(tiny_t5):
    from transformers import AutoTokenizer, T5EncoderModel

    encoder = text_encoders.build("hf-text", pretrained=str(tiny_t5), kind="t5", max_length=8)
    assert isinstance(encoder, TextEncoder) and encoder.dim == 16 and encoder.pooled_dim is None
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen
    encoder.train()
    assert not encoder.training  # stays in eval mode whatever wraps it asks
    captions = ["a 7 moving left and right", "a 2 going round in a circle", ""]
    out = encoder.encode(captions)
    assert out.tokens.shape == (3, 8, 16) and out.mask.dtype == torch.bool and out.pooled is None
    assert out.mask.sum(1).tolist() == [7, 8, 1]  # words + </s>; the empty caption is </s> alone
    # the independent reference: the same files through transformers directly
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_t5), T5EncoderModel.from_pretrained(tiny_t5).eval()
    batch = tokenizer(captions, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    torch.testing.assert_close(out.tokens, expected, rtol=0, atol=0)
    # a caption's real tokens do not depend on the other captions of its batch
    alone = encoder.encode(["a 2 going round in a circle"])
    torch.testing.assert_close(alone.tokens[0][alone.mask[0]], out.tokens[1][out.mask[1]])


def test_clip_gives_a_pooled_embedding(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, projection_dim=12,
                            pad_token_id=0, bos_token_id=1, eos_token_id=1)  # fmt: skip
    CLIPTextModelWithProjection(config).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    encoder = text_encoders.build("hf-text", pretrained=str(tmp_path), kind="clip", max_length=10)
    out = encoder.encode(["a 7 moving left", "a 2"])
    assert out.tokens.shape == (2, 10, 16) and out.pooled.shape == (2, 12) and encoder.pooled_dim == 12
    assert torch.isfinite(out.pooled).all() and not torch.equal(out.pooled[0], out.pooled[1])


def test_bad_settings_say_what_is_allowed(tiny_t5):
    with pytest.raises(ValueError, match="kind must be one of t5, umt5, clip, got 'bert'"):
        text_encoders.build("hf-text", pretrained=str(tiny_t5), kind="bert")
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        text_encoders.build("hf-text", pretrained=str(tiny_t5), max_length=0)
    encoder = text_encoders.build("hf-text", pretrained=str(tiny_t5), max_length=4)
    with pytest.raises(TypeError, match="captions must be a list of strings"):
        encoder.encode("a 7")


def test_the_tiny_t5_is_written_once_and_loaded_through_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, T5EncoderModel

    monkeypatch.setenv("DITX_CACHE", str(tmp_path))
    words = ["a", "7", "moving", "left", "and", "right"]
    first = text_encoders.build("tiny-t5", words=words, max_length=8, dim=16, heads=2)
    (folder,) = (tmp_path / "text-encoders").iterdir()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = text_encoders.build("tiny-t5", words=list(reversed(words)), max_length=8, dim=16, heads=2)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # the same settings: not rewritten
    out = first.encode(["a 7 moving left", "A 7 Moving LEFT", "a 7, moving", "a 9"])
    torch.testing.assert_close(out.tokens[0], out.tokens[1])  # lower-cased
    assert out.mask.sum(1).tolist() == [5, 5, 5, 3]  # "," is split off (a token of its own); "9" is <unk>
    torch.testing.assert_close(again.encode(["a 7 moving left"]).tokens[0], out.tokens[0])
    # the folder is an ordinary transformers model
    batch = AutoTokenizer.from_pretrained(folder)(["a 7 moving left"], padding="max_length", max_length=8,
                                                  return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = T5EncoderModel.from_pretrained(folder)(**batch).last_hidden_state
    torch.testing.assert_close(out.tokens[:1], expected, rtol=0, atol=0)
