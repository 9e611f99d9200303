"""What a bug report needs: versions, usable modalities, attention backends, hardware.

``ditx env`` prints :func:`collect_env` as :func:`format_env` lays it out (``--json`` for
the dict), as ``diffusers-cli env`` and ``accelerate env`` do. Nothing here imports a
modality's components: a modality is usable when its declared packages can be imported,
so the report works in exactly the environments where something is missing.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from ditx import registry
from ditx.attention import BACKENDS, attention, math_attention, resolve_backend, xformers_unavailable_reason
from ditx.registry import package_version

# distributions a report names, core first (pyproject's dependencies and extras)
CORE_PACKAGES = ("torch", "numpy", "einops", "diffusers", "accelerate", "safetensors", "transformers", "xformers")
OPTIONAL_PACKAGES = (
    "scikit-learn", "torchmetrics", "torch-fidelity", "decord", "av", "trimesh", "networkx", "scikit-image", "scipy",
)  # fmt: skip


def modality_report() -> dict[str, dict[str, Any]]:
    """{modality: {"usable", "missing", "install", "plugin"}} for every declared modality.

    Plugins that could not be imported at all (a dependency of their own module missing)
    are listed too, as unusable, with the reason.
    """
    registry.load_plugins()
    out: dict[str, dict[str, Any]] = {}
    for name, modality in sorted(registry.modalities.items()):
        missing = modality.missing()
        out[name] = {
            "usable": not missing,
            "missing": missing,
            "install": modality.install_command(missing) if missing else None,
        }
    for entry_point, why in sorted(registry.unavailable_plugins.items()):
        out[entry_point] = {"usable": False, "missing": [], "install": None, "reason": why}
    return out


def attention_report(device: torch.device) -> dict[str, str]:
    """{backend: "ok" or why it does not run} from a tiny call checked against math attention."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 32, generator=gen).to(device, dtype) for _ in range(3))
    want = math_attention(q, k, v).float()
    out = {"auto": f"picks {resolve_backend('auto', q)} for {dtype} inference here"}
    for backend in BACKENDS:
        if backend == "auto":
            continue
        if backend == "xformers":
            reason = xformers_unavailable_reason(q)
            if reason is not None:
                out[backend] = f"unavailable: {reason}"
                continue
        try:
            got = attention(q, k, v, backend=backend).float()
        except Exception as e:  # a probe: report, never raise
            out[backend] = f"fails: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            continue
        err = (got - want).abs().max().item()
        out[backend] = "ok" if err < 1e-2 else f"wrong: max error {err:.2g} against math attention"
    return out


def _cpuinfo(key: str) -> str:
    """The first ``key: value`` of /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def hardware_report() -> dict[str, Any]:
    flags = set(_cpuinfo("flags").split())
    bf16_isa = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    report: dict[str, Any] = {
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": f"native ({', '.join(bf16_isa)})" if bf16_isa else "emulated (no AMX/AVX512-BF16 here)",
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
    }
    if torch.cuda.is_available():
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return report


def collect_env() -> dict[str, Any]:
    """Everything ``ditx env`` prints, as plain data."""
    import ditx

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plugins = importlib.metadata.entry_points(group=registry.PLUGIN_GROUP)
    return {
        "ditx": ditx.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in CORE_PACKAGES},
        "optional_packages": {name: package_version(name) for name in OPTIONAL_PACKAGES},
        "plugins": sorted(f"{ep.name} = {ep.value}" for ep in plugins),
        "modalities": modality_report(),
        "attention_device": str(device),
        "attention": attention_report(device),
        "hardware": hardware_report(),
    }


def format_env(env: dict[str, Any]) -> str:
    """The report as the aligned text a bug report can paste."""
    rows: list[tuple[str, str]] = [("ditx", env["ditx"]), ("Python", env["python"]), ("Platform", env["platform"])]
    for name, version in {**env["packages"], **env["optional_packages"]}.items():
        rows.append((name, version or "not installed"))
    rows.append(("Plugins", ", ".join(env["plugins"]) or "(none)"))
    for name, m in env["modalities"].items():
        if m["usable"]:
            state = "usable"
        elif m.get("reason"):
            state = f"unusable: {m['reason']}"
        else:
            state = f"unusable: missing {', '.join(m['missing'])} ({m['install']})"
        rows.append((f"Modality {name}", state))
    for backend, verdict in env["attention"].items():
        rows.append((f"Attention {backend} ({env['attention_device']})", verdict))
    hw = env["hardware"]
    rows += [
        ("CPU", f"{hw['cpu']} ({hw['cpu_count']} logical cores, torch threads {hw['torch_threads']})"),
        ("CPU bf16", hw["cpu_bf16"]),
        ("CUDA", f"available, CUDA {hw['cuda_version']}" if hw["cuda_available"] else "not available"),
    ]
    if hw["cuda_available"]:
        rows += [("GPUs", ", ".join(hw["gpus"])), ("GPU bf16", "supported" if hw["gpu_bf16"] else "not supported")]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"- {key + ':':<{width + 1}} {value}" for key, value in rows) + "\n"
