"""The ``ditx`` command: help, recipes, one-line errors, and the wiring of the job commands.

The jobs themselves (training, sampling, evaluation, caching) are replaced by recorders:
these tests check what the CLI passes on, not what the jobs do.
"""

import inspect
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from ditx import recipe as recipe_module
from ditx.cli import main
from ditx.recipe import Recipe, recipe_from_dict

TINY = """\
description: Tiny test recipe
modality: image
data: {name: digits, size: 16}
tokenizer: {name: patch2d, patch_size: 2}
objective: {name: ddpm}
model: {depth: 2, hidden_size: 32, num_heads: 2}
train: {batch_size: 4, steps: 10}
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def job(monkeypatch):
    """``job("ditx.pipeline", "train_recipe", returns=...)`` puts a recording stand-in module in place."""

    def install(module: str, function: str, returns=None, raises: BaseException | None = None) -> list:
        calls = []

        def record(*args, **kwargs):
            calls.append((args, kwargs))
            if raises is not None:
                raise raises
            return returns

        stub = types.ModuleType(module)
        setattr(stub, function, record)
        monkeypatch.setitem(sys.modules, module, stub)
        return calls

    return install


def one_line_error(capsys, prefix: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"{prefix}: error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, mentions",
    [
        ([], ["recipes", "train", "sample", "eval", "cache-latents", "convert"]),
        (["recipes"], ["list", "show", "ditx recipes show image/digits"]),
        (["recipes", "show"], ["RECIPE", "section.key=value", "YAML"]),
        (["train"], ["RECIPE", "section.key=value", "--run-dir", "--resume", "checkpoints/", "example"]),
        (["sample"], ["CHECKPOINT_OR_RUN", "section.key=value", "--num", "--out", "--recipe", "samples/"]),
        (["eval"], ["RUN", "section.key=value", "--out", "metrics.json"]),
        (["cache-latents"], ["RECIPE", "section.key=value", "--out", "train.latent_cache"]),
    ],
)
def test_help_of_every_command(argv, mentions, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['ditx', *argv])}")
    for word in mentions:
        assert word in out, f"{word!r} missing from `ditx {' '.join(argv)} --help`"


# --------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------


def test_recipes_lists_names_and_descriptions_in_columns(tmp_path, monkeypatch, capsys):
    root = tmp_path / "shipped"
    for name, description in [("image/a", "Short one"), ("video/longer-name", "Another")]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.yaml").write_text(f"description: {description}\nmodality: x\n")
    monkeypatch.setattr(recipe_module, "recipes_root", lambda: root)
    for argv in (["recipes"], ["recipes", "list"]):
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == ["image/a", "video/longer-name"]
        assert lines[0].index("Short one") == lines[1].index("Another") == len("video/longer-name") + 2


def test_recipes_with_nothing_shipped_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe_module, "recipes_root", lambda: tmp_path)
    assert main(["recipes"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no recipes found" in captured.err


def test_recipes_show_prints_the_resolved_recipe_with_overrides(tiny, capsys):
    assert main(["recipes", "show", str(tiny), "train.batch_size=8", "sample.guidance_scale=4.0"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 8" in out and "guidance_scale: 4.0" in out
    data = yaml.safe_load(out)  # the output is itself a recipe
    shown = recipe_from_dict(data)
    assert (shown.train.batch_size, shown.sample.guidance_scale, shown.train.steps) == (8, 4.0, 10)
    assert shown.sample.num_steps == 50  # defaults are filled in


# --------------------------------------------------------------------------------------
# errors: one line, exit code 2
# --------------------------------------------------------------------------------------


def test_unknown_recipe_is_a_one_line_error(capsys):
    assert main(["recipes", "show", "image/no-such-recipe"]) == 2
    err = one_line_error(capsys, "ditx recipes show")
    assert "unknown recipe 'image/no-such-recipe'" in err and "shipped recipes" in err


def test_positional_that_is_not_an_override_is_a_one_line_error(tiny, job, capsys):
    calls = job("ditx.pipeline", "train_recipe")
    assert main(["train", str(tiny), "runs/other"]) == 2
    err = one_line_error(capsys, "ditx train")
    assert "'runs/other'" in err and "section.key=value" in err
    assert calls == []  # rejected before the trainer starts


def test_override_of_an_unknown_key_is_a_one_line_error(tiny, capsys):
    assert main(["recipes", "show", str(tiny), "train.bs=8"]) == 2
    err = one_line_error(capsys, "ditx recipes show")
    assert "'train.bs'" in err and "batch_size" in err


def test_invalid_yaml_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(TINY + "model: {depth: [\n")
    assert main(["recipes", "show", str(path)]) == 2
    assert str(path) in one_line_error(capsys, "ditx recipes show")


def test_unknown_option_is_a_usage_error(tiny, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tiny), "--resume", "--nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ditx train" in err and "unrecognized arguments: --nope" in err


# --------------------------------------------------------------------------------------
# job commands pass on the right arguments
# --------------------------------------------------------------------------------------


def test_train_loads_the_recipe_and_passes_run_dir_and_resume(tiny, tmp_path, job, capsys):
    calls = job("ditx.pipeline", "train_recipe", returns=tmp_path / "run")
    argv = ["train", str(tiny), "train.batch_size=8", "--run-dir", str(tmp_path / "run"), "--resume", "train.steps=5"]
    assert main(argv) == 0
    [(args, kwargs)] = calls
    [recipe] = args
    assert isinstance(recipe, Recipe)
    assert (recipe.train.batch_size, recipe.train.steps, recipe.name) == (8, 5, "tiny")
    assert kwargs == {"run_dir": tmp_path / "run", "resume": True, "overwrite": False}
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "run")


def test_train_defaults(tiny, job):
    calls = job("ditx.pipeline", "train_recipe", returns=Path("runs/tiny-1"))
    assert main(["train", str(tiny)]) == 0
    [(args, kwargs)] = calls
    assert args[0].train.batch_size == 4
    assert kwargs == {"run_dir": None, "resume": False, "overwrite": False}


def test_train_error_is_a_one_line_message(tiny, job, capsys):
    job("ditx.pipeline", "train_recipe", raises=ValueError("train.batch_size=3 must be divisible by 2\nsecond line"))
    assert main(["train", str(tiny)]) == 2
    assert one_line_error(capsys, "ditx train").endswith("divisible by 2 second line")


def test_interrupted_training_says_how_to_resume(tiny, job, capsys):
    job("ditx.pipeline", "train_recipe", raises=KeyboardInterrupt())
    assert main(["train", str(tiny), "train.steps=5", "--run-dir", "runs/x"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert f"ditx train {tiny} train.steps=5 --run-dir runs/x --resume" in err


def test_sample_passes_path_num_out_recipe_and_overrides(tmp_path, job, capsys):
    calls = job("ditx.sample", "sample_from", returns=tmp_path / "out")
    argv = ["sample", str(tmp_path / "run"), "sample.guidance_scale=4.0", "--num", "8", "--out", str(tmp_path / "out")]
    assert main([*argv, "--recipe", "image/digits", "sample.num_steps=10"]) == 0
    assert calls == [
        (
            (tmp_path / "run",),
            {
                "num": 8,
                "out": tmp_path / "out",
                "recipe": "image/digits",
                "overrides": ["sample.guidance_scale=4.0", "sample.num_steps=10"],
                "fmt": None,
                "overwrite": False,
                "prompts": None,
                "negative_prompt": None,
                "first_frame": None,
                "last_frame": None,
                "extend": None,
                "extend_frames": None,
            },
        )
    ]
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")


def test_sample_prompts_from_flags_and_files(tmp_path, job):
    calls = job("ditx.sample", "sample_from", returns=tmp_path)
    (tmp_path / "p.txt").write_text("a two\n\n  a three  \n")
    (tmp_path / "p.json").write_text('["a four"]')
    argv = ["sample", str(tmp_path), "--prompt", "a seven", "--prompts", str(tmp_path / "p.txt"),
            "--negative-prompt", "a one"]  # fmt: skip
    assert main(argv) == 0
    assert calls[0][1]["prompts"] == ["a seven", "a two", "a three"] and calls[0][1]["negative_prompt"] == "a one"
    assert main(["sample", str(tmp_path), "--prompts", str(tmp_path / "p.json")]) == 0
    assert calls[1][1]["prompts"] == ["a four"]
    (tmp_path / "bad.json").write_text('{"a": 1}')
    assert main(["sample", str(tmp_path), "--prompts", str(tmp_path / "bad.json")]) == 2


def test_sample_format_npz(tmp_path, job):
    calls = job("ditx.sample", "sample_from", returns=tmp_path)
    assert main(["sample", str(tmp_path), "--format", "npz"]) == 0
    assert calls[0][1]["fmt"] == "npz"


def test_sample_defaults(tmp_path, job):
    calls = job("ditx.sample", "sample_from", returns=tmp_path)
    assert main(["sample", str(tmp_path)]) == 0
    assert calls == [
        ((tmp_path,), {"num": None, "out": None, "recipe": None, "overrides": [], "fmt": None, "overwrite": False,
                       "prompts": None, "negative_prompt": None, "first_frame": None, "last_frame": None,
                       "extend": None, "extend_frames": None})  # fmt: skip
    ]
    assert main(["sample", str(tmp_path), "--overwrite"]) == 0
    assert calls[-1][1]["overwrite"] is True


@pytest.mark.parametrize("argv", [["--num", "0"], ["not-an-override"]])
def test_sample_rejects_bad_arguments_before_sampling(tmp_path, job, capsys, argv):
    calls = job("ditx.sample", "sample_from")
    assert main(["sample", str(tmp_path), *argv]) == 2
    one_line_error(capsys, "ditx sample")
    assert calls == []


def test_eval_passes_run_overrides_and_out_and_prints_json(tmp_path, job, capsys):
    metrics = {"digits_accuracy": np.float32(0.25), "num_samples": 200, "per_class": np.array([1.0, 0.5])}
    calls = job("ditx.evaluate", "evaluate_run", returns=metrics)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run"), "eval.num_samples=200", "--out", str(out)]) == 0
    assert calls == [((tmp_path / "run",), {"overrides": ["eval.num_samples=200"], "out": out})]
    assert json.loads(capsys.readouterr().out) == {"digits_accuracy": 0.25, "num_samples": 200, "per_class": [1, 0.5]}


def test_cache_latents_loads_the_recipe_and_passes_out(tiny, tmp_path, job, capsys):
    calls = job("ditx.cache", "cache_latents", returns=tmp_path / "cache")
    assert main(["cache-latents", str(tiny), "data.size=32", "--out", str(tmp_path / "cache")]) == 0
    [(args, kwargs)] = calls
    assert isinstance(args[0], Recipe) and args[0].data.args["size"] == 32
    assert kwargs == {"out": tmp_path / "cache", "overwrite": False}
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache")
    assert main(["cache-latents", str(tiny), "--out", str(tmp_path / "cache"), "--overwrite"]) == 0
    assert calls[-1][1]["overwrite"] is True


@pytest.mark.parametrize(
    "module, function, args, kwargs",
    [
        ("ditx.pipeline", "train_recipe", ["recipe"], {"run_dir": None, "resume": False, "overwrite": False}),
        ("ditx.sample", "sample_from", ["run"],
         {"num": None, "out": None, "recipe": None, "overrides": [], "overwrite": False}),
        ("ditx.evaluate", "evaluate_run", ["run"], {"overrides": [], "out": None}),
        ("ditx.cache", "cache_latents", ["recipe"], {"out": None, "overwrite": False}),
    ],
)
def test_jobs_accept_the_arguments_the_cli_passes(module, function, args, kwargs):
    job_module = pytest.importorskip(module, reason=f"{module} is not written yet")
    inspect.signature(getattr(job_module, function)).bind(*args, **kwargs)


def test_env_reports_versions_modalities_backends_and_hardware(capsys):
    import torch

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("ditx:", "Python:", "torch:", "diffusers:", "accelerate:", "CPU bf16:", "CUDA:"):
        assert key in out, key
    assert torch.__version__ in out
    assert f"torch threads {torch.get_num_threads()}" in out
    for modality in ("image", "video", "shape3d"):  # the dev install has every extra
        assert f"Modality {modality}:" in out
    assert "Attention sdpa (" in out and "Attention xformers (" in out
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modalities"]["image"]["usable"] is True
    assert report["attention"]["sdpa"] == "ok" and report["attention"]["eager"] == "ok"
    if not torch.cuda.is_available():
        assert report["attention"]["xformers"].startswith("unavailable")
