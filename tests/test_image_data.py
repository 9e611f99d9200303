"""ImageFolderDataset: layouts and labels, ADM center crop, deterministic flips, bad files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from ditx.modalities.image.data import ImageFolderDataset
from PIL import Image

from ditx.data import deterministic_choice

rng = np.random.default_rng(0)


def noise_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=None if mode == "RGB" else mode)


def save(image: Image.Image, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def as_expected(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> the dataset's (3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture
def class_tree(tmp_path):
    """root/cat (2 images, one in a sub-folder), root/dog (1), plus things to ignore."""
    root = tmp_path / "pets"
    save(noise_image(40, 30), root / "cat" / "b.png")
    save(noise_image(20, 20), root / "cat" / "deeper" / "a.jpg")
    save(noise_image(30, 50), root / "dog" / "C.PNG")
    save(noise_image(20, 20), root / ".cache" / "thumb.png")  # hidden folder: not a class
    save(noise_image(20, 20), root / "dog" / ".hidden.png")  # hidden file: skipped
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("not an image either")
    return root


def test_class_folders_give_labels_by_sorted_folder_name(class_tree):
    ds = ImageFolderDataset(str(class_tree), size=16)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.num_classes == 2 and ds.data_shape == (3, 16, 16)
    files = [p[len(str(class_tree)) + 1 :] for p, _ in ds.samples]
    assert files == ["cat/b.png", "cat/deeper/a.jpg", "dog/C.PNG"]  # recursive, sorted, case-blind extensions
    assert [ds[i]["y"] for i in range(len(ds))] == [0, 0, 1]


def test_a_flat_folder_is_unconditional(tmp_path):
    for i, (w, h) in enumerate([(16, 16), (48, 20), (20, 64)]):
        save(noise_image(w, h), tmp_path / "imgs" / f"{i}.png")
    save(noise_image(30, 30), tmp_path / "imgs" / "more" / "x.jpeg")  # found recursively
    ds = ImageFolderDataset(str(tmp_path / "imgs"), size=16)
    assert len(ds) == 4 and ds.num_classes == 0 and ds.classes == []
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"x"}
        assert item["x"].shape == (3, 16, 16) and item["x"].dtype == torch.float32
        assert -1 <= item["x"].min() and item["x"].max() <= 1


def test_class_folders_false_takes_every_image_unconditionally(class_tree):
    ds = ImageFolderDataset(str(class_tree), size=8, class_folders=False)
    assert len(ds) == 3 and ds.num_classes == 0 and "y" not in ds[0]


def test_one_sub_folder_is_read_as_a_flat_folder_unless_asked(tmp_path):
    save(noise_image(20, 20), tmp_path / "only" / "photos" / "a.png")
    assert ImageFolderDataset(str(tmp_path / "only"), size=8).num_classes == 0
    assert ImageFolderDataset(str(tmp_path / "only"), size=8, class_folders=True).classes == ["photos"]


def test_class_folders_true_refuses_images_outside_class_folders(class_tree):
    save(noise_image(20, 20), class_tree / "stray.png")
    assert ImageFolderDataset(str(class_tree), size=8).num_classes == 0  # auto: flat
    with pytest.raises(ValueError, match="stray.png"):
        ImageFolderDataset(str(class_tree), size=8, class_folders=True)


def test_extensions_choose_the_files(class_tree):
    ds = ImageFolderDataset(str(class_tree), size=8, extensions=[".JPG"])
    assert [p.rsplit("/", 1)[-1] for p, _ in ds.samples] == ["a.jpg"]


def test_a_small_image_is_bicubic_resized_then_center_cropped(tmp_path):
    # short side 20 < 2 * 16: no halving; PIL bicubic to short side 16 (24x20 -> 19x16), centre crop
    image = noise_image(24, 20)
    ds = ImageFolderDataset(save(image, tmp_path / "a" / "x.png").rsplit("/", 1)[0], size=16, flip=False)
    expected = np.asarray(image.resize((19, 16), Image.BICUBIC))[:, 1:17]
    torch.testing.assert_close(ds[0]["x"], as_expected(expected), atol=1e-6, rtol=0)


def test_large_images_are_halved_with_a_box_filter(tmp_path):
    # 64x64 at size 16: two exact halvings are 4x4 block means, then the crop is the whole image
    image = noise_image(64, 64)
    ds = ImageFolderDataset(save(image, tmp_path / "a" / "x.png").rsplit("/", 1)[0], size=16, flip=False)
    blocks = np.asarray(image, dtype=np.float64).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    torch.testing.assert_close(ds[0]["x"], as_expected(blocks), atol=2.01 / 127.5, rtol=0)  # PIL rounds per pass


@pytest.mark.parametrize("tall", [False, True])
def test_the_crop_keeps_the_centre_square_of_a_non_square_image(tmp_path, tall):
    # 200x100: red side bands; the centre 100x100 square is blue on top, green below
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :50] = pixels[:, 150:] = (255, 0, 0)
    pixels[:50, 50:150] = (0, 0, 255)
    pixels[50:, 50:150] = (0, 255, 0)
    if tall:  # 100x200: bands above and below, the centre square's halves left and right
        pixels = pixels.transpose(1, 0, 2)
    ds = ImageFolderDataset(save(Image.fromarray(pixels), tmp_path / "a" / "x.png").rsplit("/", 1)[0], size=16)
    x = (ds.cache_variants(0)[0]["x"].permute(1, 2, 0) + 1) * 127.5  # (16, 16, 3) in [0, 255], unflipped
    if tall:
        x = x.transpose(0, 1)
    # away from the resampling kernels' reach of the edges: no red, blue above, green below
    assert x[1:15, 3:13, 0].max() < 20
    assert x[:5, 3:13, 2].min() > 235 and x[:5, 3:13, 1].max() < 20
    assert x[11:, 3:13, 1].min() > 235 and x[11:, 3:13, 2].max() < 20


def test_grey_rgba_palette_and_16_bit_images_become_rgb(tmp_path):
    root = tmp_path / "modes"
    save(Image.new("L", (8, 8), 100), root / "0_grey.png")
    save(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), root / "1_rgba.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 50, 0])
    palette.info["transparency"] = 0  # a transparent palette entry (not used by the pixels)
    save(palette, root / "2_palette.png")
    save(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), root / "3_grey16.png")
    save(Image.new("L", (8, 8), 0), root / "4_black.jpg")
    ds = ImageFolderDataset(str(root), size=8, flip=False)
    colours = [tuple(((ds[i]["x"][:, 4, 4] + 1) * 127.5).round().int().tolist()) for i in range(len(ds))]
    assert colours == [(100, 100, 100), (10, 20, 30), (200, 50, 0), (255, 255, 255), (0, 0, 0)]
    assert ds[4]["x"].min() == -1 and ds[3]["x"].max() == 1


def test_flips_depend_only_on_seed_epoch_and_index(tmp_path):
    root = tmp_path / "flat"
    for i in range(8):
        save(noise_image(12, 12), root / f"{i}.png")
    ds, again = ImageFolderDataset(str(root), size=12, seed=5), ImageFolderDataset(str(root), size=12, seed=5)
    flipped_per_epoch = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        flags = []
        for i in range(len(ds)):
            plain, mirror = ds.cache_variants(i)
            torch.testing.assert_close(mirror["x"], plain["x"].flip(-1), atol=0, rtol=0)
            x = ds[i]["x"]
            torch.testing.assert_close(x, again[i]["x"], atol=0, rtol=0)  # another instance (worker, process)
            flipped = torch.equal(x, mirror["x"])
            assert flipped or torch.equal(x, plain["x"])
            assert flipped == (deterministic_choice(5, epoch, i) == 1)
            flags.append(flipped)
        flipped_per_epoch.append(flags)
    assert any(any(f) for f in flipped_per_epoch) and not all(all(f) for f in flipped_per_epoch)
    assert len({tuple(f) for f in flipped_per_epoch}) > 1  # the flips change from epoch to epoch

    off = ImageFolderDataset(str(root), size=12, flip=False)
    off.set_epoch(1)
    assert len(off.cache_variants(0)) == 1
    assert all(torch.equal(off[i]["x"], off.cache_variants(i)[0]["x"]) for i in range(len(off)))


def test_workers_read_the_same_items(tmp_path):
    root = tmp_path / "flat"
    for i in range(4):
        save(noise_image(20, 14), root / f"{i}.jpg")
    ds = ImageFolderDataset(str(root), size=8)
    ds.set_epoch(3)
    loaded = torch.cat([b["x"] for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)])
    torch.testing.assert_close(loaded, torch.stack([ds[i]["x"] for i in range(4)]), atol=0, rtol=0)


def test_an_unreadable_file_raises_an_error_naming_it(tmp_path):
    root = tmp_path / "flat"
    save(noise_image(16, 16), root / "a_good.png")
    (root / "b_garbage.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    save(noise_image(64, 64), root / "c_cut.png")
    data = (root / "c_cut.png").read_bytes()
    (root / "c_cut.png").write_bytes(data[: len(data) // 2])  # truncated
    ds = ImageFolderDataset(str(root), size=8)
    assert ds[0]["x"].shape == (3, 8, 8)
    for i, name in [(1, "b_garbage.jpg"), (2, "c_cut.png")]:
        with pytest.raises(OSError, match="cannot read image .*" + name):
            ds[i]
        with pytest.raises(OSError, match=name):
            ds.cache_variants(i)


def test_a_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no images.*jpg, jpeg, png"):
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "texts" / "sub").mkdir(parents=True)
    (tmp_path / "texts" / "sub" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="texts.*no images"):
        ImageFolderDataset(str(tmp_path / "texts"))
    with pytest.raises(FileNotFoundError, match="missing.*not a directory"):
        ImageFolderDataset(str(tmp_path / "missing"))


def test_cache_key_names_what_the_pixels_depend_on(class_tree):
    key = ImageFolderDataset(str(class_tree), size=16).cache_key()
    assert key["size"] == 16 and key["flip"] is True and key["num_files"] == 3 and str(class_tree) in key["root"]
    assert "crop" in key
    assert ImageFolderDataset(str(class_tree), size=8, flip=False).cache_key() != key


@pytest.fixture
def image_folder_name():
    from ditx.registry import datasets

    datasets.register("test-image-folder", ImageFolderDataset, replace=True)
    yield "test-image-folder"
    datasets.unregister("test-image-folder")


def test_recipe_arguments_are_checked(tiny_recipe, class_tree, image_folder_name):
    from ditx.recipe import RecipeError

    recipe = tiny_recipe(data={"name": image_folder_name, "root": str(class_tree), "class_folders": None,
                               "extensions": ["png", "jpg"]})  # fmt: skip
    assert recipe.data.args["root"] == str(class_tree)
    with pytest.raises(RecipeError, match="data.flip"):
        tiny_recipe(data={"name": image_folder_name, "root": str(class_tree), "flip": "sometimes"})


def test_training_logs_and_skips_a_corrupt_image(tiny_recipe, tmp_path, image_folder_name, caplog):
    from ditx.train import train

    root = tmp_path / "shapes"
    for label in ("circles", "squares"):
        for i in range(4):
            save(noise_image(20, 24), root / label / f"{i}.png")
    bad = root / "squares" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    recipe = tiny_recipe(
        data={"name": image_folder_name, "root": str(root), "size": 16},
        tokenizer={"name": "patch2d", "patch_size": 4},
        model={"depth": 1, "hidden_size": 32, "num_heads": 2},
        train={"steps": 2, "batch_size": 4, "max_bad_samples": 5, "checkpoint_every": 2},
        sample={"num_samples": 2, "num_steps": 2, "batch_size": 2},
    )
    with caplog.at_level(logging.WARNING, logger="ditx"):
        run = train(recipe, run_dir=tmp_path / "run")  # 2 steps x 4 = all 8 items of epoch 0
    assert str(bad) in caplog.text
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()
