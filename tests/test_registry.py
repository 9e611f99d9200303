"""Registry behaviour and plugin discovery through the ``ditx.plugins`` entry-point group."""

import textwrap

import pytest
import torch

from ditx import registry
from ditx.dit import DiT
from ditx.registry import Registry, RegistryError, tokenizers


def test_register_get_names_and_unknown_name_lists_known():
    reg = Registry("widget")
    reg.register("b", dict)

    @reg.register("a")
    def make_a(x=1):
        return ("a", x)

    assert reg.names() == ["a", "b"]
    assert reg.get("a") is make_a
    assert reg.build("a", x=3) == ("a", 3)
    with pytest.raises(RegistryError, match=r"unknown widget 'c'; registered widgets: a, b"):
        reg.get("c")


def test_taken_name_raises_unless_replacing():
    reg = Registry("widget")
    reg.register("a", dict)
    with pytest.raises(RegistryError, match="'a' is already registered"):
        reg.register("a", list)
    reg.register("a", dict)  # the same factory again is harmless (re-import)
    reg.register("a", list, replace=True)
    assert reg.get("a") is list


def test_every_kind_has_a_registry_and_builtins_are_found():
    assert set(registry.REGISTRIES) == {"tokenizers", "autoencoders", "datasets", "metrics", "objectives", "writers",
                                        "text_encoders", "readers"}  # fmt: skip
    assert "video" in registry.readers.names()  # given frames for image-to-video, from the video plugin
    assert "patch2d" in tokenizers.names()  # from ditx.modalities.image, found as a plugin
    assert "identity" in registry.autoencoders.names()  # core built-in
    assert "hf-text" in registry.text_encoders.names()  # core built-in, imported on first lookup


def _write_plugin_distribution(root, dist, module, entry):
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ditx.plugins]\n{entry} = {module}\n")


@pytest.fixture
def throwaway_plugin(tmp_path, monkeypatch):
    """A distribution that is only a dist-info folder and a module on a temporary sys.path entry."""
    _write_plugin_distribution(tmp_path, "ditx_toy_plugin", "ditx_toy_plugin_mod", "toy")
    (tmp_path / "ditx_toy_plugin_mod.py").write_text(
        textwrap.dedent(
            """
            from ditx.registry import tokenizers
            from ditx.tokenizer import PatchTokenizer

            @tokenizers.register("toy-rows")
            class RowTokenizer(PatchTokenizer):
                '''Each image row (1 x W patch) is one token.'''
                def __init__(self, width=8, in_channels=1, hidden_size=16, out_channels=None):
                    super().__init__(("height",), (1,), in_channels * width, hidden_size,
                                     None if out_channels is None else out_channels * width)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toy-rows"
    tokenizers.unregister("toy-rows")
    registry._loaded_plugins.discard(("toy", "ditx_toy_plugin_mod"))


def test_third_party_tokenizer_is_discovered_through_entry_points(throwaway_plugin):
    assert "toy-rows" in tokenizers.names()
    tok = tokenizers.build("toy-rows", width=8, hidden_size=16)
    tokens, grid = tok.tokenize(torch.randn(2, 8, 5))  # rows as a 1-D sequence of 5 tokens
    assert tokens.shape == (2, 5, 16) and grid == (5,)
    # and it plugs into the shared backbone like a built-in
    model = DiT({"name": "toy-rows", "width": 8}, depth=2, num_heads=2, hidden_size=16)
    assert model(torch.randn(2, 8, 5), torch.tensor([1.0, 500.0])).shape == (2, 8, 5)


def test_broken_plugin_names_the_entry_point(tmp_path, monkeypatch):
    _write_plugin_distribution(tmp_path, "ditx_broken_plugin", "ditx_broken_plugin_mod", "broken")
    (tmp_path / "ditx_broken_plugin_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"plugin 'broken' = 'ditx_broken_plugin_mod'.*boom"):
        registry.load_plugins()


def test_plugin_with_a_wrong_module_fails_loudly_naming_the_entry_point(tmp_path, monkeypatch):
    _write_plugin_distribution(tmp_path, "ditx_typo_plugin", "ditx_typo_plugin_mod_does_not_exist", "typo")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"plugin 'typo' = 'ditx_typo_plugin_mod_does_not_exist'.*failed"):
        registry.load_plugins()
    registry._loaded_plugins.discard(("typo", "ditx_typo_plugin_mod_does_not_exist"))


def test_plugin_with_a_syntax_error_fails_loudly(tmp_path, monkeypatch):
    _write_plugin_distribution(tmp_path, "ditx_syntax_plugin", "ditx_syntax_plugin_mod", "syntax")
    (tmp_path / "ditx_syntax_plugin_mod.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"plugin 'syntax' = 'ditx_syntax_plugin_mod'.*failed to import"):
        registry.load_plugins()


def test_plugin_missing_a_dependency_leaves_the_others_usable(tmp_path, monkeypatch):
    """A third-party plugin importing a package that is not installed: recorded, named in errors, not fatal."""
    _write_plugin_distribution(tmp_path, "ditx_needy_plugin", "ditx_needy_plugin_mod", "needy")
    (tmp_path / "ditx_needy_plugin_mod.py").write_text("import a_package_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "unavailable_plugins", {})
    registry.load_plugins()
    assert "patch2d" in tokenizers.names()
    assert "a_package_nobody_installed" in registry.unavailable_plugins["needy = ditx_needy_plugin_mod"]
    with pytest.raises(RegistryError, match=r"unknown tokenizer 'needy-rows'.*plugin needy = ditx_needy_plugin_mod"):
        tokenizers.get("needy-rows")
    registry._loaded_plugins.discard(("needy", "ditx_needy_plugin_mod"))


def test_lazy_component_checks_its_modality_only_when_asked_for(monkeypatch):
    reg = Registry("widget")
    modality = registry.Modality("toys", {"json": "json", "a_missing_pkg": "a-missing-pkg"}, extra="toys")
    modality.register(reg, "decoder", "json:JSONDecoder")
    assert reg.names() == ["decoder"] and "decoder" in reg  # listing imports nothing
    with pytest.raises(registry.MissingDependencyError) as info:
        reg.get("decoder")
    message = str(info.value)
    assert "widget 'decoder' is part of the 'toys' modality" in message
    assert "a-missing-pkg" in message and 'pip install "ditx[toys]"' in message
    # with the package present, the target is imported and replaces the lazy entry
    monkeypatch.setattr(registry, "package_missing", lambda name: False)
    import json

    assert reg.get("decoder") is json.JSONDecoder
    reg.register("decoder", json.JSONDecoder)  # registering the same object again is harmless


def test_lazy_target_with_a_wrong_attribute_names_it():
    reg = Registry("widget")
    registry.Modality("toys").register(reg, "nope", "json:NoSuchThing")
    with pytest.raises(ImportError, match=r"json:NoSuchThing.*no 'NoSuchThing'"):
        reg.get("nope")
