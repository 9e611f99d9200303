"""CI's rule for skips (tests/conftest.py): with DITX_STRICT_SKIPS=1 a skip fails the run unless
it is for hardware this machine lacks (CUDA); without it, skips stay skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SKIPPING = """
import pytest

def test_package_missing():
    pytest.skip("torch-fidelity is not installed")

def test_hardware_missing():
    pytest.skip("xformers kernels need a CUDA device")
"""


def _pytest(folder: Path, strict: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DITX_STRICT_SKIPS"}
    if strict:
        env["DITX_STRICT_SKIPS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=120)  # fmt: skip


def test_strict_mode_fails_a_package_skip_and_keeps_a_cuda_skip(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(SKIPPING)
    strict = _pytest(tmp_path, strict=True)
    assert strict.returncode == 1, strict.stdout
    assert "1 failed, 1 skipped" in strict.stdout and "torch-fidelity is not installed" in strict.stdout
    relaxed = _pytest(tmp_path, strict=False)
    assert relaxed.returncode == 0 and "2 skipped" in relaxed.stdout, relaxed.stdout


def test_strict_mode_fails_a_module_level_importorskip(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_module.py").write_text(
        "import pytest\npytest.importorskip('a_package_nobody_installed')\n\ndef test_x():\n    pass\n"
    )
    strict = _pytest(tmp_path, strict=True)
    assert strict.returncode != 0 and "a_package_nobody_installed" in strict.stdout, strict.stdout
