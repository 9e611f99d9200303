"""reuse_freed_memory: freed blocks stay mapped, counted by the kernel's own page-fault counter."""

import os
import platform
import subprocess
import sys

import pytest

from ditx.cpu_allocator import ENV, reuse_freed_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc's malloc"
)

# In a fresh process: set up the allocator as asked, warm up a small DiT's training step
# (bf16 where the CPU's bf16 is fast, else fp32: on an AVX2-only CPU bf16 is emulated and
# the test took minutes; the activations are 0.1 to 12 MB, alive together, freed in backward), then print
# the minor page faults (fresh pages the kernel maps and zeroes) of the median of 8 steps.
PROBE = """
import resource, sys, torch
how = sys.argv[1]
if how == "reuse":
    from ditx.cpu_allocator import reuse_freed_memory
    assert reuse_freed_memory(True)
elif how == "cli":
    from ditx.cli import main
    assert main(["recipes"]) == 0
from ditx import build_dit
from ditx.precision import cpu_bf16_is_fast
fast = cpu_bf16_is_fast()
torch.manual_seed(0)
model = build_dit("DiT-S/2", in_channels=4, num_classes=10, depth=2)
x, t, y = torch.randn(8, 4, 32, 32), torch.rand(8) * 999, torch.randint(0, 10, (8,))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
        out = model(x, t, y)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
for _ in range(6):  # the heap grows to its working size over the first steps
    step()
counts = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(counts)[4])  # the median step: a one-off heap extension does not count
"""


def faults(how: str, env: dict[str, str] | None = None) -> float:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, how], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


@glibc
def test_reuse_keeps_freed_pages_mapped():
    default, reuse = faults("default"), faults("reuse")
    # glibc's default unmaps or trims the freed activations and faults them in again each step
    assert default > 1000, default
    assert reuse < 0.05 * default, (reuse, default)


@glibc
def test_the_ditx_command_applies_it_unless_told_not_to():
    on, off = faults("cli", {ENV: "reuse"}), faults("cli", {ENV: "default"})
    assert off > 1000 and on < 0.05 * off, (on, off)


def test_off_and_bad_values(monkeypatch):
    assert reuse_freed_memory(False) is False
    monkeypatch.setenv(ENV, "default")
    assert reuse_freed_memory() is False
    monkeypatch.setenv(ENV, "jemalloc")
    with pytest.raises(ValueError, match=f"{ENV}='jemalloc' is not one of reuse, default"):
        reuse_freed_memory()
