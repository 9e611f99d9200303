"""The measuring pieces of benchmarks/: FLOP counts, the GEMM-only ceiling, the sampling extrapolation.

Checked against closed forms: 2·m·k·n FLOPs per product, 4·B·H·N²·d for attention, and a
call whose cost is exactly ``fixed + steps × per_step``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

common = pytest.importorskip("common")


def test_count_flops_includes_cpu_sdpa():
    b, h, n, d = 2, 3, 64, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    # torch's own counter leaves the CPU flash kernel at 0; ours adds the two products
    assert common.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * b * h * n * n * d


def test_gemm_ceiling_replays_every_product_in_the_dtype_it_ran():
    a, w, bias = torch.randn(64, 32), torch.randn(48, 32), torch.randn(48)
    x, y = torch.randn(4, 8, 16), torch.randn(4, 16, 8)

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(a, w, bias)  # addmm, with a transposed weight
            x @ y  # bmm
            a @ a.T  # mm

    recorder = common._RecordGemms()
    with recorder:
        fn()
    assert [str(op).split(".")[1] for op, _, _ in recorder.calls] == ["addmm", "bmm", "mm"]
    assert all(spec[2] == torch.bfloat16 for _, args, _ in recorder.calls for spec in args if isinstance(spec, tuple))
    transposed = recorder.calls[0][1][2]  # the weight's layout is kept: (32, 48) with strides (1, 32)
    assert transposed[0] == (32, 48) and transposed[1] == (1, 32)

    result = common.gemm_ceiling(fn, repeats=1)
    expected = 2 * 64 * 32 * 48 + 2 * 4 * 8 * 16 * 8 + 2 * 64 * 32 * 64
    assert result["calls"] == 3
    assert result["gflop"] == pytest.approx(expected / 1e9)
    assert result["seconds"] > 0


def test_sampling_extrapolation_is_exact_for_a_linear_cost():
    sampling = pytest.importorskip("bench_sampling")
    fixed, per_step = 3.0, 0.7
    cost = lambda k: fixed + k * per_step  # noqa: E731
    assert sampling.extrapolate(cost(10), cost(1), 10, 50) == pytest.approx(cost(50))
    assert sampling.extrapolate(cost(4), cost(1), 4, 4) == pytest.approx(cost(4))


def test_gpu_benchmark_reference_dit_is_the_same_function_as_ditx():
    """benchmarks/gpu.py times ditx against an official-DiT-style model: with ditx's weights
    loaded (official key names), it must compute the same outputs, or the rows compare different models."""
    from ditx import build_dit

    gpu = pytest.importorskip("gpu")
    torch.manual_seed(0)
    ours = build_dit(depth=2, hidden_size=64, num_heads=4, patch_size=2, in_channels=4, num_classes=1000).eval()
    with torch.no_grad():  # off adaLN-Zero's identity, so every block and the final layer compute
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = gpu.ReferenceDiT(depth=2, dim=64, heads=4, latent=8).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 7, 1000])
    with torch.no_grad():
        expected = ours(x, t, y)
        torch.testing.assert_close(ref(x, t, y), expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("script", ["gpu.py", "bench_sequence_parallel.py"])
def test_benchmark_smoke_mode_runs_and_writes_its_results(script, tmp_path):
    """The GPU benchmark and the sequence-parallel one in their CPU smoke modes (tiny sizes), as CI runs them."""
    import json
    import subprocess

    out = tmp_path / "results.json"
    flag = "--out" if script == "gpu.py" else "--results"
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    proc = subprocess.run([sys.executable, str(here / script), "--smoke", flag, str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    if script == "gpu.py":
        image, video, attn = doc["image"][0], doc["video"][0], doc["attention"]
        assert set(image["ms"]) == {"ditx", "ditx compiled", "official-style", "diffusers"}
        assert all(v > 0 for v in image["ms"].values()) and image["tflop_per_step"] > 0
        assert set(video["ms"]) == {"ditx", "diffusers Latte"}
        assert [r["tokens"] for r in attn] == [64, 256] and all({"sdpa", "math"} <= set(r["ms"]) for r in attn)
        assert "| ditx ms |" in proc.stdout
    else:
        for layout in ("joint", "spatial-temporal"):
            r = doc["results"][layout]
            assert r["max_abs_diff"] < 1e-4  # the split run computes the whole run's output
            assert 0 < r["sp2"]["activation_mb"] < r["sp1"]["activation_mb"]


def test_dit_pipeline_row_samples_the_same_model_as_ditx():
    """bench_steps.py's DiTPipeline row: a ditx DiT with 10 classes in diffusers' layout (its null
    label moved to row 1000, where DiTPipeline looks for it) and an identity "VAE" for pixel space.
    DiTPipeline's 3-step DDIM with guidance from the same noise gives ditx's samples."""
    from diffusers import DDIMScheduler, DiTPipeline

    from ditx import build_dit
    from ditx.diffusion import DDPMObjective, sample

    steps = pytest.importorskip("bench_steps")
    torch.manual_seed(0)
    ours = build_dit(depth=2, hidden_size=64, num_heads=4, patch_size=2, in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    peer = steps.diffusers_dit(ours, (1, 8, 8))
    objective = DDPMObjective()
    scale = 100.0  # the "VAE" divides by it, so an untrained model's samples are not all clamped to 0 or 1
    pipe = DiTPipeline(transformer=peer, vae=steps.pixel_space(scale),
                       scheduler=DDIMScheduler.from_config(objective.make_scheduler("ddim", 3).config))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 3, 9]
    theirs = pipe(class_labels=labels, guidance_scale=3.0, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images  # fmt: skip
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    mine = sample(ours, objective, (3, 1, 8, 8), scheduler="ddim", num_steps=3, y=torch.tensor(labels),
                  null_class=ours.null_class, guidance_scale=3.0, noise=noise)  # fmt: skip
    mine = (mine / scale / 2 + 0.5).clamp(0, 1)
    assert 0.2 < ((theirs > 0) & (theirs < 1)).float().mean()  # not all clamped
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_steps_benchmark_keeps_a_row_only_within_the_measured_tolerance():
    steps = pytest.importorskip("bench_steps")
    keys = [("fid", "lower"), ("class_accuracy", "higher")]
    reference, seed1 = {"fid": 1.0, "class_accuracy": 0.95}, {"fid": 1.2, "class_accuracy": 0.948}
    tol = steps.tolerances(reference, seed1, keys)
    assert tol == pytest.approx({"fid": 0.4, "class_accuracy": 0.005})  # 2 x 0.2; 2 x 0.002 floored at 0.005
    assert steps.keeps({"fid": 1.39, "class_accuracy": 0.946}, reference, tol, keys)
    assert not steps.keeps({"fid": 1.41, "class_accuracy": 0.99}, reference, tol, keys)
    assert not steps.keeps({"fid": 0.5, "class_accuracy": 0.944}, reference, tol, keys)
    row = {"overrides": steps.overrides_for("flow-unipc", 8, [0.2, 0.8])}
    assert steps.sampler_name(row) == ("flow-unipc", 8, [0.2, 0.8])
