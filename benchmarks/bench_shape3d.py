"""3D-shape speed: occupancy labels from a mesh, and marching cubes from a decoder.

a. **Occupancy labels.** A torus of 20,480 faces (``trimesh.creation.torus``, 160 × 64
   sections) normalised into the unit cube; query points as the shape recipes sample them,
   half uniform in ``[-0.5, 0.5]³`` and half near the surface (surface samples + N(0, 0.01²)),
   shuffled. ditx's ``occupancy`` (generalised winding numbers, hierarchical, ``beta=2``;
   the tree is built inside every call) labels 100k points; trimesh's ``mesh.contains``
   (ray parity; embree when ``embreex`` is importable, else trimesh's own ray-triangle
   engine, which needs ``rtree``; the mesh's ray engine and tree are kept warm across
   calls, as they are cached on the mesh) labels the first 5k. Both alternate, after
   warm-up; reported: points/s, the ratio, and how often the two labels agree.

b. **Marching cubes from a decoder.** A ``triplane-ae`` with the ``shape3d/triplane-shapenet``
   recipe's sizes (32² planes of 8 channels, decoder width 128) and random weights; a random
   latent. The field handed to ``extract_mesh`` is the decoder's occupancy logit at every
   grid point (decoder planes computed once per call, then ``query`` on each chunk of 16,384
   points), scaled to ±0.1 and added to a torus's signed distance, so that the surface is one
   closed, slightly rough torus (a random decoder alone gives no meaningful surface); the
   decoder does all of its work. ``extract_mesh`` is ``evaluate_grid`` (the chunked queries)
   then ``mesh_from_grid`` (padding, skimage's Lewiner marching cubes, trimesh's vertex merge,
   outward orientation); the two phases are timed separately, at 128³ and 256³:

   - per resolution, a fresh child process (``common.peak_memory_mb``, with glibc's default
     malloc settings, as a user's process) runs the two calls once and reports the peak
     memory growth of the whole extraction, the phases' times and the grid;
   - the queries at 128³ are also timed in this process (median of 2, after a 32³ warm-up);
     those at 256³ (about half a minute) only in the child, once;
   - ``mesh_from_grid`` and the reference, ``skimage.measure.marching_cubes`` alone, alternate
     in this process on the child's grid (median of 3, after warm-up); the reference's
     peak memory growth on the largest grid is measured in another fresh child.

    python benchmarks/bench_shape3d.py            # 100k vs 5k points; 128³ and 256³ (~1.5 min on 2 cores)
    python benchmarks/bench_shape3d.py --quick    # 20k vs 1k points; 64³ and 128³ (~1 min)

Writes benchmarks/results/shape3d.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    alternate,
    markdown_table,
    measure_growth,
    peak_memory_mb,
    run_mode,
    use_ditx_allocator,
    write_results,
)
from ditx.modalities.shape3d.extract import DEFAULT_CHUNK  # noqa: E402

# the triplane-shapenet recipe's autoencoder sizes
AE_ARGS = {"resolution": 32, "latent_channels": 8, "width": 128, "decoder_width": 128, "variational": True}
CHUNK = DEFAULT_CHUNK  # extract_mesh's default and the recipe's chunk_size


@dataclass
class Sizes:
    sections: tuple[int, int] = (160, 64)  # torus major × minor sections: 2 · 160 · 64 = 20,480 faces
    ditx_points: int = 100_000
    peer_points: int = 5_000
    occ_repeats: int = 3
    resolutions: tuple[int, ...] = (128, 256)
    grid_repeats: tuple[int, ...] = (2, 0)  # extraction repeats here per resolution (0: timed once in the child)
    mc_repeats: int = 3


QUICK = Sizes(ditx_points=20_000, peer_points=1_000, occ_repeats=2, resolutions=(64, 128), grid_repeats=(2, 0),
              mc_repeats=2)  # fmt: skip
SMOKE = Sizes(sections=(32, 16), ditx_points=2_000, peer_points=100, occ_repeats=1, resolutions=(16, 32),
              grid_repeats=(1, 0), mc_repeats=1)  # fmt: skip


# --------------------------------------------------------------------------------------
# a. occupancy labels
# --------------------------------------------------------------------------------------


def ray_engine() -> str | None:
    """trimesh's ray engine for ``contains``, or None when neither embreex nor rtree is installed."""
    if trimesh.ray.has_embree:
        return "embree (embreex)"
    if importlib.util.find_spec("rtree") is not None:
        return "trimesh ray_triangle (rtree)"
    return None


def test_mesh(sections: tuple[int, int]) -> trimesh.Trimesh:
    from ditx.modalities.shape3d.mesh import normalize_mesh

    torus = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=sections[0],
                                   minor_sections=sections[1])  # fmt: skip
    return normalize_mesh(torus)[0]


def query_points(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> np.ndarray:
    """(n, 3): half uniform in the unit cube, half near the surface (sigma 0.01), shuffled."""
    rng = np.random.default_rng(seed)
    near = trimesh.sample.sample_surface(mesh, n - n // 2, seed=rng)[0] + rng.normal(0, 0.01, size=(n - n // 2, 3))
    points = np.concatenate([rng.uniform(-0.5, 0.5, size=(n // 2, 3)), near])
    return points[rng.permutation(n)]


def bench_occupancy(s: Sizes) -> dict[str, Any]:
    from ditx.modalities.shape3d.mesh import occupancy

    mesh = test_mesh(s.sections)
    points = query_points(mesh, s.ditx_points)
    few = points[: s.peer_points]
    engine = ray_engine()
    candidates: dict[str, Callable[[], Any]] = {"ditx": lambda: occupancy(mesh, points)}
    if engine is not None:
        candidates["trimesh"] = lambda: mesh.contains(few)
    med = alternate(candidates, s.occ_repeats)
    row: dict[str, Any] = {
        "mesh": f"torus, {len(mesh.faces)} faces, watertight {mesh.is_watertight}", "faces": len(mesh.faces),
        "points": {"ditx": s.ditx_points, "trimesh": s.peer_points}, "query": "half uniform, half near surface",
        "ditx_method": "winding number, beta=2 (tree built per call)", "trimesh_engine": engine or "unavailable",
        "points_per_s": {"ditx": s.ditx_points / med["ditx"]},
    }  # fmt: skip
    if engine is not None:
        row["points_per_s"]["trimesh"] = s.peer_points / med["trimesh"]
        row["ratio_ditx_speed_over_trimesh"] = row["points_per_s"]["ditx"] / row["points_per_s"]["trimesh"]
        row["label_agreement"] = float((occupancy(mesh, few) == np.asarray(mesh.contains(few), dtype=bool)).mean())
    return row


# --------------------------------------------------------------------------------------
# b. marching cubes from a decoder
# --------------------------------------------------------------------------------------


def decoder_field() -> Callable[[], Callable[[Tensor], Tensor]]:
    """A factory of occupancy functions (see the module doc); each call computes the decoder planes."""
    from ditx.modalities.shape3d.autoencoder import TriplaneAutoencoder

    torch.manual_seed(0)
    ae = TriplaneAutoencoder(**AE_ARGS).freeze()
    z = torch.randn(1, AE_ARGS["latent_channels"], 3, AE_ARGS["resolution"], AE_ARGS["resolution"])
    with torch.no_grad():
        probe = ae.occupancy_logits(z, torch.rand(1, 4096, 3) - 0.5)
    scale = 0.1 / float(probe.abs().max().clamp_min(1e-6))

    def make() -> Callable[[Tensor], Tensor]:
        planes = ae.decoder_features(z)

        def fn(points: Tensor) -> Tensor:  # (n, 3) -> (n,) signed value, inside > 0
            ring = torch.linalg.vector_norm(points[:, :2], dim=1) - 0.3
            torus = 0.12 - torch.sqrt(ring**2 + points[:, 2] ** 2)
            return torus + scale * ae.query(planes, points[None])[0]

        return fn

    return make


def extract_phases(make: Callable[[], Callable[[Tensor], Tensor]], r: int, out: dict[str, Any]) -> None:
    """``extract_mesh``'s two calls (``evaluate_grid``, then ``mesh_from_grid``), each timed into ``out``."""
    from ditx.modalities.shape3d.extract import evaluate_grid, mesh_from_grid

    tic = time.perf_counter()
    values = evaluate_grid(make(), r, chunk_size=CHUNK)
    out["evaluate_grid_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    mesh_from_grid(values, level=0.0)
    out["mesh_from_grid_s"] = time.perf_counter() - tic
    out["values"] = values


def bench_extract(s: Sizes, tmp: Path) -> list[dict[str, Any]]:
    from ditx.modalities.shape3d.extract import evaluate_grid, mesh_from_grid
    from skimage.measure import marching_cubes

    script = str(Path(__file__).resolve())
    make = decoder_field()
    rows = []
    for r, repeats in zip(s.resolutions, s.grid_repeats):
        # a fresh child: peak memory of the whole extraction, its phase times, and the grid
        grid_file, times_file = tmp / f"grid_{r}.npy", tmp / f"times_{r}.json"
        # default malloc: the child also times the 256³ queries, as a user's process would run them
        peak = peak_memory_mb(script, ["--memory-of", "extract", "--resolution", str(r), "--grid", str(grid_file),
                                       "--times", str(times_file)], tight_malloc=False)  # fmt: skip
        child = json.loads(times_file.read_text())
        values = np.load(grid_file)
        row: dict[str, Any] = {"resolution": r, "points": r**3, "chunk_size": CHUNK, "extract_mesh_peak_mb": peak}
        if repeats:  # the queries timed here too, median of ``repeats`` (warmed up by a 32³ grid first)
            evaluate_grid(make(), 32, chunk_size=CHUNK)
            t = alternate({"q": lambda r=r: evaluate_grid(make(), r, chunk_size=CHUNK)}, repeats, warmup=0)
            row["evaluate_grid_s"] = t["q"]
            row["evaluate_grid_timed_in"] = f"this process, median of {repeats}"
        else:  # the largest grid is evaluated once, in the memory child, and timed there
            row["evaluate_grid_s"] = child["evaluate_grid_s"]
            row["evaluate_grid_timed_in"] = "the memory child, once"
        mesh = mesh_from_grid(values, level=0.0)
        med = alternate({"mesh_from_grid": lambda values=values: mesh_from_grid(values, level=0.0),
                         "skimage": lambda values=values: marching_cubes(values, level=0.0)}, s.mc_repeats)  # fmt: skip
        row.update({
            "mesh_from_grid_s": med["mesh_from_grid"], "extract_mesh_s": row["evaluate_grid_s"] + med["mesh_from_grid"],
            "skimage_marching_cubes_s": med["skimage"], "faces": len(mesh.faces), "watertight": mesh.is_watertight,
        })  # fmt: skip
        rows.append(row)
    largest = tmp / f"grid_{s.resolutions[-1]}.npy"
    rows[-1]["skimage_marching_cubes_peak_mb"] = peak_memory_mb(script, ["--memory-of", "skimage", "--grid",
                                                                         str(largest)])  # fmt: skip
    return rows


def memory_of(what: str, resolution: int, grid_file: str | None, times_file: str | None) -> None:
    """The hidden child mode: print ``PEAK_MB <growth>`` of one candidate, set up (and warmed up) beforehand.

    ``extract``: ``evaluate_grid`` + ``mesh_from_grid`` at ``resolution``; with ``grid_file``
    and ``times_file`` the grid and the two phases' times are saved. ``skimage``:
    ``marching_cubes`` alone on the grid in ``grid_file`` (loaded before measuring).
    """
    if grid_file is None:
        raise SystemExit("--memory-of needs --grid")
    axis = np.linspace(-1, 1, 8, dtype=np.float32)
    ball = 0.5 - np.sqrt(sum(a**2 for a in np.meshgrid(axis, axis, axis)))
    if what == "extract":
        from ditx.modalities.shape3d.extract import mesh_from_grid

        make = decoder_field()
        make()(torch.zeros(16, 3))  # first-call allocations
        mesh_from_grid(ball, level=0.0)
        out: dict[str, Any] = {}
        growth = measure_growth(lambda: extract_phases(make, resolution, out))
        np.save(grid_file, out.pop("values"))
        if times_file:
            Path(times_file).write_text(json.dumps(out))
    elif what == "skimage":
        from skimage.measure import marching_cubes

        values = np.load(grid_file)
        marching_cubes(ball, level=0.0)
        growth = measure_growth(lambda: marching_cubes(values, level=0.0))
    else:
        raise SystemExit(f"unknown --memory-of {what!r}")
    print(f"PEAK_MB {growth:.1f}")


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k vs 1k points, 64³ and 128³ (~1 min)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes: checks it runs
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/shape3d.json)")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # child mode: extract | skimage
    parser.add_argument("--resolution", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--grid", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--times", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of != "skimage":  # the extraction child times ditx as a user runs it
        use_ditx_allocator()
    if args.memory_of:
        memory_of(args.memory_of, args.resolution, args.grid, args.times)
        return
    s = SMOKE if args.smoke else QUICK if args.quick else Sizes()

    tic = time.perf_counter()
    occ = bench_occupancy(s)
    with tempfile.TemporaryDirectory(prefix="ditx-bench-shape3d-") as tmp:
        mc = bench_extract(s, Path(tmp))
    elapsed = time.perf_counter() - tic

    print(f"\na. occupancy labels, {occ['mesh']}; queries {occ['query']}\n")
    rows = [["ditx occupancy (winding number, beta=2)", occ["points"]["ditx"], f"{occ['points_per_s']['ditx']:,.0f}",
             "1.00", ""]]  # fmt: skip
    if "trimesh" in occ["points_per_s"]:
        rows.append([f"trimesh mesh.contains ({occ['trimesh_engine']})", occ["points"]["trimesh"],
                     f"{occ['points_per_s']['trimesh']:,.0f}", f"{occ['ratio_ditx_speed_over_trimesh']:.1f}",
                     f"{100 * occ['label_agreement']:.2f}%"])  # fmt: skip
    else:
        rows.append(["trimesh mesh.contains: unavailable (needs embreex or rtree)", "", "", "", ""])
    print(markdown_table(["labeller", "points", "points/s", "ditx speed ÷ this", "labels agree"], rows))

    print(f"\nb. marching cubes from a triplane-ae decoder (random weights, torus-shaped field), chunks of {CHUNK:,}\n")
    rows = []
    for r in mc:
        once = "" if r["evaluate_grid_timed_in"].startswith("this process") else " (child, once)"
        rows.append([f"ditx extract_mesh {r['resolution']}³", f"{r['evaluate_grid_s']:.2f}{once}",
                     f"{r['mesh_from_grid_s']:.2f}", f"{r['extract_mesh_s']:.2f}", f"{r['extract_mesh_peak_mb']:.0f}",
                     f"{r['faces']:,}"])  # fmt: skip
    for r in mc:
        peak = r.get("skimage_marching_cubes_peak_mb")
        rows.append([f"skimage marching_cubes alone {r['resolution']}³ (precomputed grid)", "", "",
                     f"{r['skimage_marching_cubes_s']:.2f}", "" if peak is None else f"{peak:.0f}", ""])  # fmt: skip
    print(markdown_table(["candidate", "queries s", "meshing s", "total s", "peak growth MB", "faces"], rows))

    doc = {"mode": run_mode(args), "occupancy": occ, "marching_cubes": mc, "elapsed_s": elapsed}
    if path := write_results("shape3d", doc, args.out):
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
