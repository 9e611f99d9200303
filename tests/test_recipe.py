"""Recipes: schema validation with useful errors, YAML quirks, dotted overrides, round trips."""

import textwrap

import pytest
import yaml

from ditx import recipe as recipe_module
from ditx.recipe import (
    Component,
    Recipe,
    RecipeError,
    find_recipe,
    list_recipes,
    load_recipe,
    parse_override,
    recipe_from_dict,
)

TINY = """\
description: Tiny test recipe
modality: image
data: {name: digits, size: 16}
tokenizer: {name: patch2d, patch_size: 2}
objective: {name: ddpm}
model: {depth: 2, hidden_size: 32, num_heads: 2}
train: {batch_size: 4, steps: 10}
"""


def write(tmp_path, text: str, name: str = "tiny.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def tiny_dict() -> dict:
    return yaml.safe_load(TINY)


@pytest.fixture
def tiny(tmp_path):
    return write(tmp_path, TINY)


@pytest.fixture
def fake_shipped(tmp_path, monkeypatch):
    """A stand-in for the shipped ``recipes`` package: recipes/<modality>/<name>.yaml."""
    root = tmp_path / "shipped"
    (root / "image").mkdir(parents=True)
    (root / "video").mkdir()
    (root / "image" / "tiny.yaml").write_text(TINY)
    (root / "video" / "clips.yaml").write_text("description: |\n  First line.\n  Second line.\nmodality: video\n")
    monkeypatch.setattr(recipe_module, "recipes_root", lambda: root)
    return root


# --------------------------------------------------------------------------------------
# shipped recipes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_loads_and_round_trips(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()), recipe.source, name=recipe.name)
    assert again == recipe


# --------------------------------------------------------------------------------------
# schema validation
# --------------------------------------------------------------------------------------


def test_minimal_recipe_gets_the_documented_defaults(tiny):
    recipe = load_recipe(tiny)
    assert isinstance(recipe, Recipe)
    assert recipe.data == Component("digits", {"size": 16})
    assert recipe.autoencoder == Component("identity")  # pixel space unless a recipe says otherwise
    assert (recipe.train.batch_size, recipe.train.steps, recipe.train.lr) == (4, 10, 1.0e-4)
    assert recipe.model.layout == "joint" and recipe.model.num_classes is None
    assert recipe.sample.scheduler == "ddim" and recipe.eval.metrics == []


def test_unknown_top_level_key_names_key_file_and_allowed_keys(tmp_path):
    path = write(tmp_path, TINY + "trian: {steps: 3}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert "'trian'" in message and str(path) in message
    assert "allowed keys: description, modality, data, tokenizer, objective" in message


def test_unknown_train_key_names_key_file_and_allowed_keys(tmp_path):
    path = write(tmp_path, TINY.replace("train: {batch_size: 4", "train: {batch_sise: 4"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert "'train.batch_sise'" in message and str(path) in message
    assert "allowed keys in train:" in message
    assert all(key in message for key in ("batch_size", "lr", "mixed_precision", "ema_decay"))


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    path = write(tmp_path, TINY.replace("batch_size: 4", 'batch_size: "eight"'))
    with pytest.raises(RecipeError, match=r"'train\.batch_size' must be int, got 'eight'"):
        load_recipe(path)


def test_booleans_are_not_numbers(tmp_path):
    path = write(tmp_path, TINY.replace("batch_size: 4", "batch_size: true"))
    with pytest.raises(RecipeError, match=r"'train\.batch_size' must be int, got True"):
        load_recipe(path)


def test_literal_lists_the_allowed_values(tmp_path):
    path = write(tmp_path, TINY.replace("steps: 10", "steps: 10, mixed_precision: fp8"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "'train.mixed_precision'" in str(e.value) and "fp8" in str(e.value)
    assert all(repr(v) in str(e.value) for v in ("no", "bf16", "fp16"))


def test_yaml_no_is_read_as_the_word_where_a_literal_allows_it(tmp_path):
    # YAML 1.1 reads a bare `no` as false; `mixed_precision: no` means the string
    path = write(tmp_path, TINY.replace("steps: 10", "steps: 10, mixed_precision: no"))
    assert load_recipe(path).train.mixed_precision == "no"
    assert load_recipe(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("section", ["data", "tokenizer", "objective", "description", "modality"])
def test_missing_required_section_is_named(tmp_path, section):
    data = tiny_dict()
    del data[section]
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=rf"{tmp_path}.*missing required key\(s\) {section}"):
        load_recipe(path)


def test_empty_file_lists_every_missing_section(tmp_path):
    with pytest.raises(RecipeError, match="missing required key.*description, modality, data, tokenizer, objective"):
        load_recipe(write(tmp_path, ""))


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, TINY.replace("train: {batch_size: 4, steps: 10}", "train: 5"))
    with pytest.raises(RecipeError, match="'train' must be a mapping, got int"):
        load_recipe(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, TINY + "model: {depth: [\n")
    with pytest.raises(RecipeError, match=rf"{path}: not valid YAML"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "5\n"])
def test_top_level_that_is_not_a_mapping_is_a_recipe_error(tmp_path, text):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, text))


# --------------------------------------------------------------------------------------
# components: names and arguments are checked against the registries
# --------------------------------------------------------------------------------------


def test_unknown_component_lists_registered_names(tmp_path):
    path = write(tmp_path, TINY.replace("name: digits", "name: mnist"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert str(path) in message and "data.name" in message
    assert "unknown dataset 'mnist'" in message and "digits" in message


def test_unknown_objective_lists_registered_objectives(tiny):
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny, ["objective=eps"])
    assert all(name in str(e.value) for name in ("ddpm", "v-prediction", "rectified-flow"))


def test_component_needs_a_name(tmp_path):
    path = write(tmp_path, TINY.replace("{name: digits, size: 16}", "{size: 16}"))
    with pytest.raises(RecipeError, match="'data' needs a registered 'name'"):
        load_recipe(path)


def test_unknown_component_argument_lists_the_factory_arguments(tmp_path):
    path = write(tmp_path, TINY.replace("size: 16", "sizee: 16"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert "'data.sizee'" in message and "'digits'" in message and str(path) in message
    assert "allowed keys: name, size, channels, split, flip, seed" in message


def test_tokenizer_width_comes_from_the_model_not_the_recipe(tiny):
    with pytest.raises(RecipeError, match=r"unknown key 'tokenizer\.hidden_size'"):
        load_recipe(tiny, ["tokenizer.hidden_size=64"])
    assert load_recipe(tiny, ["tokenizer.in_channels=1"]).tokenizer.args == {"patch_size": 2, "in_channels": 1}


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.size=big", r"'data\.size' must be int, got 'big'"),
        ("data.flip=maybe", r"'data\.flip' must be bool, got 'maybe'"),
        ("tokenizer.patch_size=two", r"'tokenizer\.patch_size' must be int \| tuple, got 'two'"),
        ("autoencoder.scaling_factor=large", r"'autoencoder\.scaling_factor' must be float, got 'large'"),
    ],
)
def test_wrong_component_argument_type(tiny, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny, ["autoencoder=identity", override])  # the file leaves the autoencoder implicit


def test_component_shorthand_and_tuple_arguments(tiny):
    recipe = load_recipe(tiny, ["autoencoder=identity", "tokenizer.patch_size=[1, 2]"])
    assert recipe.autoencoder == Component("identity")
    assert recipe.tokenizer.args["patch_size"] == [1, 2]


# --------------------------------------------------------------------------------------
# YAML number quirks
# --------------------------------------------------------------------------------------


def test_yaml_exponent_strings_and_integers_become_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 (no dot) as the string "1e-4"
    text = TINY.replace("steps: 10}", "steps: 10, lr: 1e-4, grad_clip: 5e-1, ema_decay: 1}")
    text = text.replace("{name: ddpm}", "{name: ddpm, beta_start: 1e-5}")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.train.lr == 1e-4 and type(recipe.train.lr) is float
    assert recipe.train.grad_clip == 0.5 and type(recipe.train.grad_clip) is float  # float | None
    assert recipe.train.ema_decay == 1.0 and type(recipe.train.ema_decay) is float
    assert recipe.objective.args["beta_start"] == 1e-5 and type(recipe.objective.args["beta_start"]) is float


def test_exponent_string_is_not_truncated_into_an_int(tmp_path):
    path = write(tmp_path, TINY.replace("steps: 10", "steps: 1e3"))
    with pytest.raises(RecipeError, match=r"'train\.steps' must be int, got '1e3'"):
        load_recipe(path)


# --------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------


def test_dotted_overrides_are_parsed_as_yaml_and_validated(tiny):
    recipe = load_recipe(
        tiny,
        [
            "train.batch_size=8",
            "sample.guidance_scale=4.0",
            "model.layout=[[height, width], all]",
            "train.lr=3e-4",
            "train.grad_clip=",  # empty: null
            "eval.metrics=[digits]",
        ],
    )
    assert recipe.train.batch_size == 8
    assert recipe.sample.guidance_scale == 4.0
    assert recipe.model.layout == [["height", "width"], "all"]
    assert recipe.train.lr == 3e-4 and recipe.train.grad_clip is None
    assert recipe.eval.metrics == ["digits"]


def test_later_overrides_win(tiny):
    assert load_recipe(tiny, ["train.batch_size=8", "train.batch_size=16"]).train.batch_size == 16


def test_override_of_a_whole_component_replaces_it(tiny):
    recipe = load_recipe(tiny, ["data=digits"])
    assert recipe.data == Component("digits")  # the file's size: 16 goes with the old component
    recipe = load_recipe(tiny, ["data={name: digits, size: 8, split: test}"])
    assert recipe.data == Component("digits", {"size": 8, "split": "test"})


def test_override_into_a_shorthand_component(tmp_path):
    path = write(tmp_path, TINY.replace("data: {name: digits, size: 16}", "data: digits"))
    assert load_recipe(path, ["data.size=32"]).data == Component("digits", {"size": 32})


def test_override_may_create_a_section_the_file_leaves_out(tiny):
    recipe = load_recipe(tiny, ["sample.num_steps=10"])
    assert recipe.sample.num_steps == 10 and recipe.sample.scheduler == "ddim"


def test_overridden_values_are_validated_like_the_file(tiny):
    with pytest.raises(RecipeError, match=r"'sample\.guidance_scale' must be float, got 'high'"):
        load_recipe(tiny, ["sample.guidance_scale=high"])
    with pytest.raises(RecipeError, match=r"unknown key 'train\.bs'; allowed keys in train: steps, batch_size"):
        load_recipe(tiny, ["train.bs=1"])


def test_parse_override():
    assert parse_override("train.batch_size=8") == (["train", "batch_size"], 8)
    assert parse_override("data=digits") == (["data"], "digits")
    assert parse_override("description=a=b") == (["description"], "a=b")  # only the first '=' splits


@pytest.mark.parametrize("text", ["train.batch_size", "=8", "train..lr=1", ".lr=1", "train.=1"])
def test_malformed_override_shows_the_expected_form(tiny, text):
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny, [text])
    assert repr(text) in str(e.value)
    assert "section.key=value (e.g. train.batch_size=8)" in str(e.value)


def test_override_through_a_value_that_is_not_a_section(tiny):
    with pytest.raises(RecipeError, match=r"'train\.batch_size' is not a section"):
        load_recipe(tiny, ["train.batch_size.x=1"])


def test_overrides_leave_the_callers_data_alone():
    data = tiny_dict()
    recipe_from_dict(data, overrides=["train.batch_size=99"])
    assert data == tiny_dict()


# --------------------------------------------------------------------------------------
# round trip, finding and listing
# --------------------------------------------------------------------------------------


def test_to_yaml_round_trips(tiny):
    recipe = load_recipe(tiny, ["model.layout=[[height, width], all]", "train.lr=3e-4", "objective.learn_sigma=false"])
    data = yaml.safe_load(recipe.to_yaml())
    assert "name" not in data and "source" not in data  # bookkeeping, not config
    assert data["train"]["mixed_precision"] == "no"  # quoted, so it stays a string
    again = recipe_from_dict(data, recipe.source, name=recipe.name)
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()


def test_path_loading_names_the_recipe_after_the_file(tiny, monkeypatch):
    recipe = load_recipe(tiny)
    assert (recipe.name, recipe.source) == ("tiny", str(tiny))
    monkeypatch.chdir(tiny.parent)
    assert load_recipe("tiny.yaml") == Recipe(**{**vars(recipe), "source": "tiny.yaml"})


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file '.*nope\.yaml' does not exist"):
        find_recipe(tmp_path / "nope.yaml")


def test_shipped_name_is_found_and_names_the_recipe(fake_shipped):
    assert find_recipe("image/tiny") == fake_shipped / "image" / "tiny.yaml"
    recipe = load_recipe("image/tiny", ["train.steps=3"])
    assert recipe.name == "image/tiny" and recipe.train.steps == 3


def test_unknown_name_lists_shipped_recipes(fake_shipped):
    with pytest.raises(RecipeError) as e:
        find_recipe("image/tinyy")
    message = str(e.value)
    assert "unknown recipe 'image/tinyy'" in message
    assert "image/tiny, video/clips" in message and ".yaml" in message


def test_list_recipes_gives_first_line_of_each_description(fake_shipped):
    assert list_recipes() == {"image/tiny": "Tiny test recipe", "video/clips": "First line."}


def test_override_of_an_omitted_optional_component_keeps_its_default(tmp_path):
    recipe = recipe_from_dict(tiny_dict(), overrides=["autoencoder.scaling_factor=0.5"])
    assert recipe.autoencoder.name == "identity" and recipe.autoencoder.args == {"scaling_factor": 0.5}
