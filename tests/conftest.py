"""Shared fixtures: tiny recipes and a clean accelerate state per test."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

# CI sets DITX_STRICT_SKIPS=1: a skipped test fails unless it is skipped for hardware this
# machine lacks (its reason names CUDA), so a missing package can never hide a test in CI.
STRICT_SKIPS_ENV = "DITX_STRICT_SKIPS"
HARDWARE_REASONS = ("CUDA",)


def _forbidden_skip(report) -> str | None:
    """The reason of a skip that strict mode turns into a failure (None if allowed or no skip)."""
    if not report.skipped or os.environ.get(STRICT_SKIPS_ENV) != "1" or hasattr(report, "wasxfail"):
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return None if any(word in reason for word in HARDWARE_REASONS) else reason


def _fail_forbidden_skip(outcome, what: str) -> None:
    report = outcome.get_result()
    reason = _forbidden_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"{what} skipped, which {STRICT_SKIPS_ENV}=1 forbids (not a hardware skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _fail_forbidden_skip((yield), "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _fail_forbidden_skip((yield), "module")


TINY_RECIPE = {
    "description": "test recipe: a 2-block DiT on 8x8 digits",
    "modality": "image",
    "data": {"name": "digits", "size": 8},
    "tokenizer": {"name": "patch2d", "patch_size": 2},
    "model": {"depth": 2, "hidden_size": 32, "num_heads": 2},
    "objective": {"name": "ddpm"},
    "train": {
        "steps": 6, "batch_size": 16, "lr": 1.0e-3, "checkpoint_every": 2, "log_every": 1,
        "mixed_precision": "no", "ema_decay": 0.9, "seed": 3,
    },
    "sample": {"num_steps": 4, "num_samples": 4, "batch_size": 4},
}  # fmt: skip


def tiny_recipe_dict(tmp_path, **sections):
    data = copy.deepcopy(TINY_RECIPE)
    data["train"]["output_dir"] = str(tmp_path / "runs")
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    return data


@pytest.fixture
def tiny_recipe(tmp_path):
    """A function returning a validated tiny ``Recipe`` with section updates applied."""
    from ditx.recipe import recipe_from_dict

    def make(**sections):
        return recipe_from_dict(tiny_recipe_dict(tmp_path, **sections), source="tiny.yaml", name="test/tiny")

    return make


@pytest.fixture
def tiny_recipe_file(tmp_path):
    """A function writing the tiny recipe (with updates) to a YAML file and returning its path."""

    def make(name="tiny.yaml", **sections):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path, **sections)))
        return path

    return make


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; tests that train in-process start clean."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
