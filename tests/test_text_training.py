"""Text recipes end to end: captions from a folder through a tiny T5 (written with
``save_pretrained``, loaded through ``from_pretrained``) into training, the latent cache,
checkpoints, ``ditx sample --prompt`` and ``ditx eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from ditx.recipe import recipe_from_dict  # noqa: E402
from ditx.text import HFTextEncoder  # noqa: E402

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def captioned_digits(tmp_path_factory) -> Path:
    """96 8x8 digit PNGs in class folders, each with a caption beside it ("a seven")."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i in range(96):
        label = int(digits.target[i])
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {NUMBER_WORDS[label]}\n")
    return root


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DITX_CACHE", str(tmp_path / "ditx-cache"))  # where the tiny T5 is written
    return tmp_path / "ditx-cache"


def text_recipe_dict(root: Path, out: Path, **sections) -> dict:
    data = {
        "description": "test: a text-conditional DiT on captioned 8x8 digits",
        "modality": "image",
        "data": {"name": "image-folder", "root": str(root), "size": 8, "flip": False},
        "text_encoder": {"name": "tiny-t5", "words": ["a", *NUMBER_WORDS], "max_length": 4, "dim": 16, "heads": 2},
        "tokenizer": {"name": "patch2d", "patch_size": 2},
        "model": {"depth": 2, "hidden_size": 32, "num_heads": 2, "caption_dropout_prob": 0.5},
        "objective": {"name": "ddpm"},
        "train": {"steps": 4, "batch_size": 16, "lr": 1.0e-3, "checkpoint_every": 2, "log_every": 1,
                  "mixed_precision": "no", "ema_decay": 0.9, "seed": 3, "output_dir": str(out / "runs")},
        "sample": {"num_steps": 4, "num_samples": 4, "batch_size": 4, "guidance_scale": 3.0},
        "eval": {"metrics": ["digits"], "num_samples": 20, "batch_size": 20},
    }  # fmt: skip
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return data


def final_weights(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (last,) = sorted((run / "checkpoints").glob("step_*"))[-1:]
    return load_file(str(last / ("ema/model.safetensors" if name == "ema" else "model.safetensors")))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_training_reads_captions_drops_them_apart_from_labels_and_keeps_the_encoder_out_of_checkpoints(
    captioned_digits, tmp_path, cache_home, monkeypatch
):
    from ditx.dit import DiT
    from ditx.train import train

    seen = []
    forward = DiT.forward

    def recording(self, x, t, y=None, context=None, context_mask=None, force_drop=None, **kw):
        if self.training:
            seen.append((context_mask.sum(1).tolist(), force_drop.tolist()))
        return forward(self, x, t, y, context, context_mask, force_drop, **kw)

    monkeypatch.setattr(DiT, "forward", recording)
    recipe = recipe_from_dict(text_recipe_dict(captioned_digits, tmp_path, train={"steps": 8},
                                               model={"class_dropout_prob": 0.5}), name="test/text")  # fmt: skip
    run = train(recipe, run_dir=tmp_path / "run")
    lengths = [n for step_lengths, _ in seen for n in step_lengths]
    label_drops = [d for _, drops in seen for d in drops]
    caption_drops = [n == 1 for n in lengths]  # "" is </s> alone; every caption here is "a <word>" </s>
    assert set(lengths) == {1, 3} and len(caption_drops) == 8 * 16
    assert 0.35 < sum(caption_drops) / len(caption_drops) < 0.65  # caption_dropout_prob 0.5
    assert 0.35 < sum(label_drops) / len(label_drops) < 0.65  # class_dropout_prob 0.5, drawn apart:
    agree = sum(a == b for a, b in zip(caption_drops, label_drops)) / len(label_drops)
    assert 0.3 < agree < 0.7  # independent draws agree about half the time (the same draw: always)
    # the frozen encoder never enters the checkpoint: only the DiT's weights, with cross-attention
    weights = final_weights(run)
    assert all(not k.startswith(("encoder.", "shared.", "text")) for k in weights)
    assert "blocks.0.cross_attn.kv.weight" in weights and "context_embedder.fc1.weight" in weights
    config = json.loads((sorted((run / "checkpoints").glob("step_*"))[-1] / "ema/config.json").read_text())
    assert config["context_dim"] == 16 and "pooled_dim" not in config
    previews = sorted(p.name for p in (run / "samples" / "step_00000008").glob("*.png") if p.name != "grid.png")
    assert previews[:2] == ["00000_a-zero.png", "00001_a-one.png"]  # the first distinct training captions
    recipe = recipe_from_dict(text_recipe_dict(captioned_digits, tmp_path, model={"caption_dropout_prob": 0.0}))
    seen.clear()
    train(recipe, run_dir=tmp_path / "never")
    assert all(n == 3 for step_lengths, _ in seen for n in step_lengths)  # no dropout: never the empty caption


def test_cached_training_never_runs_the_encoder_and_equals_encoding_on_the_fly(
    captioned_digits, tmp_path, cache_home, monkeypatch
):
    from ditx.cache import cache_latents
    from ditx.train import train

    recipe = recipe_from_dict(text_recipe_dict(captioned_digits, tmp_path), name="test/text")
    live = train(recipe, run_dir=tmp_path / "live")
    cached = recipe_from_dict(text_recipe_dict(captioned_digits, tmp_path, train={"latent_cache": str(tmp_path / "c")}),
                              name="test/text")  # fmt: skip
    cache_latents(cached)
    (table,) = (tmp_path / "c").glob("text-*.safetensors")
    # keyed by the encoder's settings: another max_length adds its own file beside the same latents
    longer = recipe_from_dict(text_recipe_dict(captioned_digits, tmp_path, train={"latent_cache": str(tmp_path / "c")},
                                               text_encoder={"max_length": 6}))  # fmt: skip
    cache_latents(longer)
    assert len(list((tmp_path / "c").glob("text-*.safetensors"))) == 2

    def never(*args, **kwargs):
        raise AssertionError("the text encoder ran during cached training")

    monkeypatch.setattr(HFTextEncoder, "encode", never)
    monkeypatch.setattr(HFTextEncoder, "__init__", never)  # not even loaded
    run = train(cached, run_dir=tmp_path / "cached")
    assert_same_weights(final_weights(run), final_weights(live), atol=1e-6)
    assert (run / "samples" / "step_00000004" / "prompts.json").is_file()  # previews from cached captions too


def test_resume_with_text_equals_an_uninterrupted_run(captioned_digits, tmp_path, cache_home):
    from ditx.train import train

    def recipe(steps):
        return recipe_from_dict(text_recipe_dict(captioned_digits, tmp_path, train={"steps": steps}), name="t/text")

    straight = train(recipe(6), run_dir=tmp_path / "straight")
    train(recipe(4), run_dir=tmp_path / "resumed")
    resumed = train(recipe(6), run_dir=tmp_path / "resumed", resume=True)
    assert_same_weights(final_weights(resumed), final_weights(straight))
    assert_same_weights(final_weights(resumed, "ema"), final_weights(straight, "ema"))


def test_two_processes_equal_one_with_text(captioned_digits, tmp_path, cache_home):
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(text_recipe_dict(captioned_digits, tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", DITX_CACHE=str(cache_home))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "ditx.cli", "train", str(path), "--run-dir", str(tmp_path / "two")]  # fmt: skip
    two = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "ditx.cli", "train", str(path), "--run-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), atol=1e-5)


@pytest.fixture
def text_run(captioned_digits, tmp_path, cache_home):
    from ditx.train import train

    recipe = recipe_from_dict(text_recipe_dict(captioned_digits, tmp_path), name="test/text")
    return train(recipe, run_dir=tmp_path / "r")


def test_ditx_sample_prompts_write_slugged_files_and_a_prompts_json(text_run, tmp_path, cache_home):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a two\n\na three\n")
    cmd = [sys.executable, "-m", "ditx.cli", "sample", str(text_run), "--prompt", "a seven", "--prompts", str(prompts),
           "--negative-prompt", "a one", "--num", "6", "--out", str(tmp_path / "s")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DITX_CACHE=str(cache_home)))
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "s").glob("0*.png"))
    assert names == ["00000_a-seven.png", "00001_a-two.png", "00002_a-three.png", "00003_a-seven.png",
                     "00004_a-two.png", "00005_a-three.png"]  # fmt: skip
    doc = json.loads((tmp_path / "s" / "prompts.json").read_text())
    assert doc["prompts"] == ["a seven", "a two", "a three"] * 2 and doc["negative_prompt"] == "a one"
    assert "00000_a-seven.png" in doc["files"]


def test_sampling_depends_on_the_prompt_and_the_negative_prompt(text_run):
    from ditx.build import load_for_sampling
    from ditx.generation import generate

    recipe, parts, model = load_for_sampling(text_run)
    a, _ = generate(parts, model, 2, captions=["a seven", "a seven"])
    again, _ = generate(parts, model, 2, captions=["a seven", "a seven"])
    b, _ = generate(parts, model, 2, captions=["a two", "a two"])
    assert torch.equal(a, again) and not torch.allclose(a, b)
    recipe.sample.negative_prompt = "a one"
    c, _ = generate(parts, model, 2, captions=["a seven", "a seven"])
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="text recipe: give one caption"):
        generate(parts, model, 2)


def test_python_sampling_is_one_call(text_run, tmp_path):
    from ditx.sample import sample_from

    out = sample_from(text_run, prompts=["a four"], num=2, out=tmp_path / "py")
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000_a-four.png", "00001_a-four.png"]
    with pytest.raises(ValueError, match="is a text recipe: give prompts"):
        sample_from(text_run, out=tmp_path / "none")


def test_eval_draws_prompts_from_the_test_split_and_records_them(text_run, tmp_path, cache_home):
    from ditx.evaluate import evaluate_run

    results = evaluate_run(text_run)
    doc = json.loads((text_run / "metrics.json").read_text())
    prompts = doc["protocol"]["prompts"]
    assert len(prompts["captions"]) == 20 and set(prompts["captions"]) <= {f"a {w}" for w in NUMBER_WORDS}
    assert len(set(prompts["items"])) == 20  # 20 different test items, in a seeded order
    assert "class_accuracy" in results  # judged against the labels of the items whose captions were drawn
    again = evaluate_run(text_run, out=tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["protocol"]["prompts"] == prompts and again == results


def test_a_clip_text_tower_adds_its_pooled_embedding_through_training_and_sampling(captioned_digits, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ditx.build import load_for_sampling
    from ditx.generation import generate
    from ditx.text import word_level_tokenizer
    from ditx.train import train

    words = ["a", *NUMBER_WORDS]
    tokenizer = word_level_tokenizer(words)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=12, pad_token_id=0,
                            bos_token_id=1, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    data = text_recipe_dict(captioned_digits, tmp_path, train={"steps": 2})
    data["text_encoder"] = {"name": "hf-text", "pretrained": str(tmp_path / "clip"), "kind": "clip", "max_length": 4}
    recipe = recipe_from_dict(data)
    run = train(recipe, run_dir=tmp_path / "run")
    config = json.loads((run / "checkpoints" / "step_00000002" / "ema" / "config.json").read_text())
    assert config["pooled_dim"] == 12 and config["context_dim"] == 16
    assert "pooled_embedder.fc1.weight" in final_weights(run)
    _, parts, model = load_for_sampling(run)
    a, _ = generate(parts, model, 1, captions=["a seven"])
    torch.nn.init.normal_(model.pooled_embedder.fc2.weight)  # the pooled embedding is used in sampling
    assert not torch.allclose(a, generate(parts, model, 1, captions=["a seven"])[0])
