"""Data-pipeline speed: clip decoding, DataLoader workers, and training from the latent cache.

Three measurements, each timed in this process, alternating the candidates after warm-up
(``common.alternate``), medians reported:

a. **Clip loading.** The script first writes its own H.264 MP4 files with PyAV into a
   temporary folder (default 24 clips of 320×240, 96-104 frames at 25 fps, a keyframe
   every 25 frames, x264 ``crf 23``, B-frames on; a smooth random texture drifting
   diagonally plus fine grain, so the encoder and decoder do real work). Then one pass
   over all clips, per candidate:

   - **ditx**: ``VideoFolderDataset(...)[i]`` for every item (16 frames, frame stride 3,
     short side resized to 256 with antialiased bilinear, centre crop 256²; decord opens
     a reader per item, ``get_batch`` of the sorted frames);
   - **PyAV seek**: the same frame indices (``dataset.clip_indices(i)``) read with PyAV:
     seek to the keyframe at or before the first needed frame, decode forward until the
     last one, convert the needed frames to RGB, then ditx's resize/crop (the readers differ
     only in decoding);
   - **PyAV decode everything**: PyAV decoding every frame of the file from the start
     (only the needed ones converted to RGB), same resize/crop: the naive reference.

   All decoders use one thread (decord's ``num_threads=1`` in ditx; PyAV ``thread_count=1``),
   as a DataLoader worker would. Reported: clips/s and the ratio of ditx's clips/s to each.

b. **DataLoader workers.** One epoch of four passes over the same dataset (batch 4, a fresh DataLoader per
   epoch as ``ditx.train`` builds one, so worker start-up is included) with
   ``num_workers=2`` and ``num_workers=0``: clips/s and the speed-up (goal ≥ 1.7× on 2 cores).

c. **Training from the latent cache.** The moving-digits recipe (``recipes/video/moving-digits.yaml``:
   a 6-block, 192-wide spatial-temporal video DiT on 4×8×8×8 latents of its ``tiny-f4``
   framewise VAE, here untrained since only speed matters; rectified flow, bf16 autocast)
   with its clips written to a temporary folder and encoded by ``ditx.cache.cache_latents``;
   the cache is then opened through ``maybe_cached_dataset`` as training does. Per epoch
   of the cache (``len // batch`` steps), per candidate:

   - **backbone step alone**: the batches are already in memory; each step draws its
     noise, timesteps and label dropout (``step_generator``, as ``ditx.train``), runs the
     model under bf16 autocast, the objective's loss, backward, ``zero_grad``;
   - **from cache**: the same steps, each batch fetched through ``ditx.train``'s loader:
     ``DataLoader(SkipBadSamples(CachedLatents), batch_sampler=GlobalBatchSampler,
     collate_fn=collate_skipping_errors)``, built fresh for the epoch, in-process as
     ``ditx.train`` reads cached latents (``num_workers`` also when the recipe sets one).

   No optimizer step, EMA, gradient clipping or logging in either (the same in both).
   Reported: ms per step and the ratio from-cache ÷ backbone (goal ≤ 1.1×).

    python benchmarks/bench_data.py            # the sizes above (~3 min on 2 cores)
    python benchmarks/bench_data.py --quick    # fewer clips, cache items and repeats (~1 min)

Writes benchmarks/results/data.json. Everything written to disk goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, markdown_table, run_mode, use_ditx_allocator, write_results  # noqa: E402


@dataclass
class Sizes:
    clips: int = 24
    width: int = 320
    height: int = 240
    frames: int = 100  # per clip, ±4
    gop: int = 25
    num_frames: int = 16
    stride: int = 3
    size: int = 256
    loader_batch: int = 4
    repeats: int = 2
    cache_items: int = 256  # moving-digits training clips cached
    cache_batch: int = 32  # the recipe's train.batch_size
    step_repeats: int = 2


QUICK = Sizes(clips=12, repeats=2, cache_items=96, cache_batch=16, step_repeats=2)
SMOKE = Sizes(clips=3, width=160, height=120, frames=30, gop=10, num_frames=4, stride=3, size=64, loader_batch=1,
              repeats=1, cache_items=20, cache_batch=4, step_repeats=1)  # fmt: skip


# --------------------------------------------------------------------------------------
# Writing the test clips
# --------------------------------------------------------------------------------------


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3): smooth random colour blobs plus fine grain."""
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, height // 16 + 2, width // 16 + 2))).float()
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    grain = torch.from_numpy(rng.normal(0, 12, size=(3, height, width))).float()
    return (smooth + grain).clamp(0, 255).byte().permute(1, 2, 0).numpy()


def write_clip(path: Path, rng: np.random.Generator, num_frames: int, height: int, width: int, gop: int) -> None:
    """An H.264 MP4 of a texture drifting by (2, 3) pixels per frame, written with PyAV."""
    import av

    big = texture(rng, height + 2 * num_frames + 8, width + 3 * num_frames + 8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "g": str(gop)}
        for t in range(num_frames):
            frame = np.ascontiguousarray(big[2 * t : 2 * t + height, 3 * t : 3 * t + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_clips(folder: Path, s: Sizes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(s.clips):
        path = folder / f"clip_{i:03d}.mp4"
        write_clip(path, rng, s.frames - 4 + i % 9, s.height, s.width, s.gop)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------
# The PyAV peers
# --------------------------------------------------------------------------------------


def resize_crop(frames: list[np.ndarray], size: int) -> Tensor:
    """uint8 (H, W, 3) frames -> (3, T, size, size) in [-1, 1] with ditx's own resize and crop, so
    the readers differ only in how they decode."""
    from ditx.modalities.video.clips import resize_center_crop

    return resize_center_crop(np.stack(frames), size)


def pyav_frames(path: str, indices: list[int], seek: bool) -> list[np.ndarray]:
    """Frames ``indices`` (RGB uint8) of a video; with ``seek`` from the keyframe before the first
    needed frame up to the last, else every frame of the file from the start."""
    import av

    wanted = set(indices)
    first, last = min(wanted), max(wanted)
    found: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        rate, base = stream.average_rate, stream.time_base
        origin = stream.start_time or 0
        if seek and first > 0:
            container.seek(origin + int(first / rate / base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            i = round((frame.pts - origin) * base * rate)
            if i in wanted and i not in found:
                found[i] = frame.to_ndarray(format="rgb24")
            if seek and i >= last:
                break
    if len(found) != len(wanted):
        raise RuntimeError(f"{path}: PyAV found frames {sorted(found)}, wanted {wanted}")
    return [found[i] for i in indices]


# --------------------------------------------------------------------------------------
# a. clip loading, b. DataLoader workers
# --------------------------------------------------------------------------------------


def bench_clips(root: Path, s: Sizes) -> tuple[dict[str, Any], dict[str, Any]]:
    from ditx.modalities.video.data import VideoFolderDataset
    from torch.utils.data import ConcatDataset, DataLoader

    tic = time.perf_counter()
    write_clips(root / "clips", s)
    written = time.perf_counter() - tic
    ds = VideoFolderDataset(str(root / "clips"), num_frames=s.num_frames, frame_stride=s.stride, size=s.size,
                            split="train", cache_dir=str(root / "index"))  # fmt: skip
    n = len(ds)
    plan = [(ds.path(i), ds.clip_indices(i)) for i in range(n)]

    # the peers read the same frames: check every clip once
    max_diff = max(float((ds[i]["x"] - resize_crop(pyav_frames(path, indices, seek=True), s.size)).abs().max())
                   for i, (path, indices) in enumerate(plan))  # fmt: skip

    def run_ditx() -> None:
        for i in range(n):
            ds[i]

    def run_pyav(seek: bool) -> Callable[[], None]:
        def run() -> None:
            for path, indices in plan:
                resize_crop(pyav_frames(path, indices, seek), s.size)

        return run

    med = alternate({"ditx": run_ditx, "pyav_seek": run_pyav(True), "pyav_all": run_pyav(False)}, s.repeats)
    clips = {
        "clips": n, "frames_per_video": [s.frames - 4, s.frames + 4], "video": f"{s.width}x{s.height} H.264, "
        f"keyframe every {s.gop}, 25 fps", "clip": f"{s.num_frames} frames, stride {s.stride}, to {s.size}x{s.size}",
        "write_s": written, "max_abs_diff_ditx_vs_pyav": max_diff,
        "clips_per_s": {k: n / v for k, v in med.items()},
        "ratio_ditx_speed_over": {k: v / med["ditx"] for k, v in med.items() if k != "ditx"},
    }  # fmt: skip

    epoch_data = ConcatDataset([ds] * 4)  # an epoch of 4 passes, so worker start-up weighs as in real epochs

    def epoch(workers: int) -> Callable[[], None]:
        def run() -> None:
            loader = DataLoader(epoch_data, batch_size=s.loader_batch, shuffle=False, num_workers=workers)
            for _ in loader:
                pass

        return run

    med = alternate({"workers_2": epoch(2), "workers_0": epoch(0)}, s.repeats)
    loader = {
        "clips": len(epoch_data), "batch_size": s.loader_batch,
        "clips_per_s": {k: len(epoch_data) / v for k, v in med.items()},
        "speedup_2_over_0": med["workers_0"] / med["workers_2"], "goal": ">= 1.7",
    }  # fmt: skip
    return clips, loader


# --------------------------------------------------------------------------------------
# c. training from the latent cache
# --------------------------------------------------------------------------------------


def bench_cache(root: Path, s: Sizes) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from ditx.build import build_components
    from ditx.cache import CachedLatents, cache_latents, maybe_cached_dataset
    from ditx.data import GlobalBatchSampler, SkipBadSamples, collate_skipping_errors, step_generator
    from ditx.recipe import load_recipe

    recipe = load_recipe("video/moving-digits", [
        f"data.root={root / 'digits'}", f"data.num_clips_train={s.cache_items}", "data.num_clips_test=10",
        f"data.cache_dir={root / 'index'}", f"train.latent_cache={root / 'latents'}",
        f"train.batch_size={s.cache_batch}",
    ])  # fmt: skip
    cfg = recipe.train
    tic = time.perf_counter()
    cache_latents(recipe, batch_size=64, device="cpu")
    cache_s = time.perf_counter() - tic
    torch.manual_seed(cfg.seed)
    parts = build_components(recipe)
    tic = time.perf_counter()
    cached = maybe_cached_dataset(recipe, parts)
    open_s = time.perf_counter() - tic
    if not isinstance(cached, CachedLatents):
        raise RuntimeError(f"expected the latent cache, got {type(cached).__name__}")
    model, objective = parts.model.train(), parts.objective
    bf16 = cfg.mixed_precision == "bf16"
    batch, shape, p_drop = cfg.batch_size, parts.latent_shape, recipe.model.class_dropout_prob
    data = SkipBadSamples(cached)
    steps = GlobalBatchSampler(len(data), batch, 0, 1, cfg.seed, 0).batches_per_epoch()

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(*args, **kwargs)

    def train_step(x: Tensor, y: Tensor, step: int) -> None:
        g = step_generator(cfg.seed, step)
        noise = torch.randn(len(x), *shape, generator=g)
        t = objective.sample_t(len(x), generator=g)
        drop = torch.rand(len(x), generator=g) < p_drop
        terms = objective.loss(forward, x, y=y, model_kwargs={"force_drop": drop}, noise=noise, t=t)
        terms["loss"].mean().backward()
        model.zero_grad(set_to_none=True)

    def loader(workers: int) -> DataLoader:
        return DataLoader(data, batch_sampler=GlobalBatchSampler(len(data), batch, 0, 1, cfg.seed, 0),
                          num_workers=workers, collate_fn=collate_skipping_errors,
                          generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip

    in_memory = [(b["x"], b["y"]) for b in loader(0)]

    def backbone() -> None:
        for k, (x, y) in enumerate(in_memory):
            train_step(x, y, k)

    def from_cache(workers: int) -> Callable[[], None]:
        def run() -> None:
            for k, b in enumerate(loader(workers)):
                train_step(b["x"], b["y"], k)

        return run

    worker_counts = sorted({0, cfg.num_workers})
    candidates = {"backbone": backbone, **{f"cache_workers_{w}": from_cache(w) for w in worker_counts}}
    med = alternate(candidates, s.step_repeats)
    return {
        "recipe": "video/moving-digits", "latent_shape": list(shape), "batch_size": batch, "cached_items": len(cached),
        "steps_per_epoch": steps, "mixed_precision": cfg.mixed_precision, "cache_write_s": cache_s,
        "cache_open_s": open_s, "ms_per_step": {k: 1e3 * v / steps for k, v in med.items()},
        "ratio_over_backbone": {k: v / med["backbone"] for k, v in med.items() if k != "backbone"},
        "goal": "<= 1.1",
    }  # fmt: skip


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 clips, 96 cached items, fewer repeats (~1 min)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes: checks it runs
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/data.json)")
    args = parser.parse_args()
    s = SMOKE if args.smoke else QUICK if args.quick else Sizes()
    use_ditx_allocator()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="ditx-bench-data-") as tmp:
        clips, loader = bench_clips(Path(tmp), s)
        cache = bench_cache(Path(tmp), s)

    print(f"\na. clip loading: {clips['clips']} videos {clips['video']}; clip {clips['clip']} "
          f"(ditx vs PyAV max |diff| {clips['max_abs_diff_ditx_vs_pyav']:.3g})\n")  # fmt: skip
    names = {"ditx": "ditx VideoFolderDataset (decord)", "pyav_seek": "PyAV, seek to keyframe + decode forward",
             "pyav_all": "PyAV, decode everything"}  # fmt: skip
    rows = [[names[k], f"{v:.1f}", f"{1e3 / v:.0f}",
             "1.00" if k == "ditx" else f"{clips['ratio_ditx_speed_over'][k]:.2f}"]
            for k, v in clips["clips_per_s"].items()]  # fmt: skip
    print(markdown_table(["reader", "clips/s", "ms/clip", "ditx speed ÷ this"], rows))

    print(f"\nb. DataLoader over the same dataset, batch {loader['batch_size']}, fresh loader per epoch\n")
    speedup = f"{loader['speedup_2_over_0']:.2f}"
    rows = [["num_workers=2", f"{loader['clips_per_s']['workers_2']:.1f}", speedup, loader["goal"]],
            ["num_workers=0", f"{loader['clips_per_s']['workers_0']:.1f}", "1.00", ""]]  # fmt: skip
    print(markdown_table(["loader", "clips/s", "speed-up", "goal"], rows))

    print(f"\nc. training step, {cache['recipe']} model, batch {cache['batch_size']}, {cache['mixed_precision']}, "
          f"{cache['steps_per_epoch']} steps per epoch of {cache['cached_items']} cached latents "
          f"(cache written in {cache['cache_write_s']:.1f} s, "
          f"opened in {1e3 * cache['cache_open_s']:.0f} ms)\n")  # fmt: skip
    rows = []
    for k, v in cache["ms_per_step"].items():
        if k == "backbone":
            rows.append(["backbone step alone (batch in memory)", f"{v:.1f}", "1.00", ""])
        else:
            workers = k.rsplit("_", 1)[1]
            rows.append([f"from the latent cache, DataLoader num_workers={workers}", f"{v:.1f}",
                         f"{cache['ratio_over_backbone'][k]:.2f}", cache["goal"]])  # fmt: skip
    print(markdown_table(["step", "ms/step", "÷ backbone", "goal"], rows))

    doc = {"mode": run_mode(args), "clip_loading": clips, "dataloader": loader, "latent_cache": cache}
    if path := write_results("data", doc, args.out):
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
