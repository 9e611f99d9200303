"""Video files: MP4 (H.264) and GIF round trips, grids, the sample writer, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditx.modalities.image.io import images_to_uint8
from ditx.modalities.video.clips import read_frames
from ditx.modalities.video.io import make_video_grid, videos_to_uint8, write_video, write_video_samples
from PIL import Image

decord = pytest.importorskip("decord")
av = pytest.importorskip("av")


def moving_pattern(num_frames: int = 10, height: int = 48, width: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8: smooth ramps, the red one sliding 6 pixels a frame."""
    yy, xx = np.mgrid[:height, :width]
    frames = [
        np.stack([(xx * 3 + 6 * t) % 256, np.clip(yy * 4, 0, 255), np.full_like(xx, 90)], axis=-1)
        for t in range(num_frames)
    ]
    return np.stack(frames).astype(np.uint8)


def read_mp4(path) -> np.ndarray:
    """Every frame, decoded by decord (through the video datasets' reader, which works around decord's row padding)."""
    reader = decord.VideoReader(str(path))
    n = len(reader)
    del reader
    return read_frames(str(path), list(range(n)))


def read_gif(path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
        return np.stack(frames), dict(gif.info)


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_an_mp4_reads_back_close_to_the_frames(tmp_path):
    frames = moving_pattern()
    path = write_video(frames, tmp_path / "clip.mp4", fps=8)
    assert path == tmp_path / "clip.mp4"
    decoded = read_mp4(path)
    assert decoded.shape == frames.shape
    assert mean_abs_error(decoded, frames) < 8
    # the motion survived: each decoded frame is nearest to its own input frame
    nearest = [int(np.argmin([mean_abs_error(d, f) for f in frames])) for d in decoded]
    assert nearest == list(range(len(frames)))
    assert decord.VideoReader(str(path)).get_avg_fps() == pytest.approx(8)


def test_a_gif_reads_back_close_to_the_frames_and_loops(tmp_path):
    frames = moving_pattern()
    write_video(frames, tmp_path / "clip.gif", fps=10)
    decoded, info = read_gif(tmp_path / "clip.gif")
    assert decoded.shape == frames.shape
    assert mean_abs_error(decoded, frames) < 8
    assert info["loop"] == 0 and info["duration"] == 100


def test_a_still_gif_keeps_its_length_in_time(tmp_path):
    still = np.full((5, 8, 8, 3), 77, np.uint8)
    write_video(still, tmp_path / "still.gif", fps=10)
    with Image.open(tmp_path / "still.gif") as gif:  # identical frames are merged into one longer frame
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert sum(durations) == 500


@pytest.mark.parametrize("shape", [(6, 16, 24), (6, 16, 24, 1)])
def test_grey_frames_are_written_as_rgb(tmp_path, shape):
    grey = np.broadcast_to(np.arange(6, dtype=np.uint8)[:, None, None] * 40, (6, 16, 24)).reshape(shape)
    write_video(grey, tmp_path / "grey.mp4")
    write_video(grey, tmp_path / "grey.gif")
    for decoded in (read_mp4(tmp_path / "grey.mp4"), read_gif(tmp_path / "grey.gif")[0]):
        assert decoded.shape == (6, 16, 24, 3)
        assert np.abs(decoded[..., 0].astype(int) - decoded[..., 2]).max() <= 2  # still grey
        assert mean_abs_error(decoded[..., 1], grey.reshape(6, 16, 24)) < 3


def test_odd_sizes_are_padded_to_even_in_mp4_and_kept_in_gif(tmp_path):
    frames = moving_pattern(4, height=33, width=47)
    decoded = read_mp4(write_video(frames, tmp_path / "odd.mp4"))
    assert decoded.shape == (4, 34, 48, 3)  # yuv420p needs even sizes: last row/column repeated
    assert mean_abs_error(decoded[:, :33, :47], frames) < 8
    assert mean_abs_error(decoded[:, 33, :47], frames[:, 32]) < 10
    assert read_gif(write_video(frames, tmp_path / "odd.gif"))[0].shape == (4, 33, 47, 3)


def test_bad_arguments_are_clear_errors(tmp_path):
    frames = moving_pattern(2, 8, 8)
    with pytest.raises(ValueError, match=r"'\.avi'.*\.mp4, \.gif"):
        write_video(frames, tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="uint8.*float32.*videos_to_uint8"):
        write_video(frames.astype(np.float32), tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\).*\(2, 8, 8, 4\)"):
        write_video(np.zeros((2, 8, 8, 4), np.uint8), tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="fps.*0"):
        write_video(frames, tmp_path / "clip.gif", fps=0)
    assert list(tmp_path.iterdir()) == []


def test_writes_are_atomic(tmp_path, monkeypatch):
    old = moving_pattern(3, 16, 16)
    write_video(old, tmp_path / "clip.mp4")
    write_video(old, tmp_path / "clip.gif")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["clip.gif", "clip.mp4"]  # no temporary files left behind

    calls = {"n": 0}
    real_from_ndarray = av.VideoFrame.from_ndarray

    def fail_on_third_frame(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real_from_ndarray(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_on_third_frame)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_video(moving_pattern(6, 16, 16), tmp_path / "clip.mp4")
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_video(moving_pattern(6, 16, 16), tmp_path / "new.mp4")
    monkeypatch.undo()

    def save_half_then_fail(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"GIF89a")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_video(moving_pattern(6, 16, 16), tmp_path / "clip.gif")
    # the earlier files are untouched, no partial new file and no temporary file remain
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_videos_to_uint8_rounds_like_images_and_moves_channels_last():
    videos = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)  # (B, C, T, H, W)
    out = videos_to_uint8(videos)
    assert out.shape == (2, 4, 5, 6, 3) and out.dtype == np.uint8
    frames = videos.permute(0, 2, 1, 3, 4).reshape(8, 3, 5, 6)  # every frame as an image
    expected = images_to_uint8(frames).permute(0, 2, 3, 1).reshape(2, 4, 5, 6, 3).numpy()
    np.testing.assert_array_equal(out, expected)
    assert out.min() == 0 and out.max() == 255
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        videos_to_uint8(videos[0])


def test_make_video_grid_tiles_each_frame():
    clips = np.stack([np.full((3, 4, 5, 3), 10 * (i + 1), np.uint8) for i in range(5)])  # (B=5, T=3, 4, 5, 3)
    clips[:, 1] += 1  # frame 1 differs from frame 0
    grid = make_video_grid(clips, rows=2, pad=1)  # 3 columns
    assert grid.shape == (3, 2 * 5 + 1, 3 * 6 + 1, 3)
    for t in range(3):
        for i in range(5):
            r, c = divmod(i, 3)
            np.testing.assert_array_equal(grid[t, 1 + r * 5 : 1 + r * 5 + 4, 1 + c * 6 : 1 + c * 6 + 5], clips[i, t])
        assert (grid[t, 6:10, 13:18] == 255).all()  # the sixth cell is empty (white)
        assert (grid[t, 0] == 255).all() and (grid[t, :, 0] == 255).all()


def solid_samples(levels: list[float], frames: int = 4, size: int = 8) -> torch.Tensor:
    """(B, 3, T, size, size) in [-1, 1], clip i a solid grey ``levels[i]``."""
    return torch.tensor(levels).view(-1, 1, 1, 1, 1).expand(-1, 3, frames, size, size).contiguous()


def test_write_video_samples_rows_per_class(tmp_path):
    samples = solid_samples([-0.5, 0.0, 0.5])  # grey 64, 128, 191
    labels = torch.tensor([1, 0, 1])
    written = write_video_samples(samples, tmp_path / "out", labels)
    names = sorted(p.name for p in written)
    assert names == sorted(["grid.mp4", "grid.gif"] + [f"sample_0000{i}_class{y}.{ext}" for i, y in
                                                        enumerate([1, 0, 1]) for ext in ("mp4", "gif")])  # fmt: skip
    assert all(p.is_file() for p in written) and sorted(p.name for p in (tmp_path / "out").iterdir()) == names

    sample = read_mp4(tmp_path / "out" / "sample_00001_class0.mp4")
    assert sample.shape == (4, 8, 8, 3) and abs(sample.mean() - 128) < 2  # own resolution
    gif, _ = read_gif(tmp_path / "out" / "sample_00001_class0.gif")
    assert gif.shape[1:3] == (256, 256)  # 8x8 upscaled for viewing

    grid, _ = read_gif(tmp_path / "out" / "grid.gif")
    cell = 10 * (256 // 22)  # 2 rows x 2 columns of 8 + 2 pixels, + 2, upscaled 11x
    assert grid.shape[1:3] == (22 * 11, 22 * 11)
    centres = [[grid[0, cell * r + cell // 2 + 11, cell * c + cell // 2 + 11, 0] for c in range(2)] for r in range(2)]
    # row 0 is class 0 (sample 1) then white padding; row 1 is class 1 (samples 0 and 2)
    assert np.abs(np.array(centres, dtype=int) - [[128, 255], [64, 191]]).max() <= 2
    mp4_grid = read_mp4(tmp_path / "out" / "grid.mp4")
    assert mp4_grid.shape == (4, 242, 242, 3)


def test_write_video_samples_unconditional_and_upscale(tmp_path):
    written = write_video_samples(solid_samples([0.0] * 4, size=6)[:, :1], tmp_path, individual=False, upscale=3)
    assert [p.name for p in written] == ["grid.mp4", "grid.gif"]
    grid, _ = read_gif(tmp_path / "grid.gif")
    assert grid.shape[1:] == (3 * (2 * 8 + 2), 3 * (2 * 8 + 2), 3)  # 2x2 grid of grey 6x6 clips, upscaled 3x
    with pytest.raises(ValueError, match="labels must be"):
        write_video_samples(solid_samples([0.0, 0.5]), tmp_path, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B >= 1, C = 1 or 3, T, H, W\)"):
        write_video_samples(torch.zeros(2, 3, 8, 8), tmp_path)
