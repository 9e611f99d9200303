"""Captions of image, video and shape folders: sidecar name.txt files or a manifest's caption column, all or none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from ditx.data import Dataset, PackedStrings, captions_fingerprint, data_extensions

# --------------------------------------------------------------------------------------
# One small real file per item, and the dataset over a folder or manifest, per modality
# --------------------------------------------------------------------------------------


def write_image(folder: Path, stem: str, i: int) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.full((12, 10, 3), 20 * i, dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"{stem}.png")
    return f"{stem}.png"


def write_clip(folder: Path, stem: str, i: int) -> str:
    from ditx.modalities.video.io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    write_video(np.full((4, 8, 8, 3), 20 * i, dtype=np.uint8), folder / f"{stem}.mp4")
    return f"{stem}.mp4"


def write_mesh(folder: Path, stem: str, i: int) -> str:
    import trimesh

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.obj").write_text(trimesh.creation.box(extents=(0.3 + 0.1 * i, 0.4, 0.5)).export(file_type="obj"))
    return f"{stem}.obj"


def image_dataset(root: Path, tmp_path: Path, **kwargs) -> Dataset:
    from ditx.modalities.image.data import ImageFolderDataset

    return ImageFolderDataset(str(root), size=8, flip=False, **kwargs)


def video_dataset(root: Path, tmp_path: Path, **kwargs) -> Dataset:
    from ditx.modalities.video.data import VideoFolderDataset

    return VideoFolderDataset(str(root), num_frames=2, size=8, cache_dir=str(tmp_path / "cache"), **kwargs)


def shape_dataset(root: Path, tmp_path: Path, **kwargs) -> Dataset:
    from ditx.modalities.shape3d.data import ShapeFolderDataset

    kwargs.setdefault("split", "all")
    return ShapeFolderDataset(
        str(root), n_surface=32, n_volume=64, n_near=64, uniform_points=0, cache_dir=str(tmp_path / "cache"), **kwargs
    )


MODALITIES = {
    "image": (write_image, image_dataset, "images", ("PIL",)),
    "video": (write_clip, video_dataset, "videos", ("decord", "av")),
    "shape3d": (write_mesh, shape_dataset, "meshes", ("trimesh",)),
}


@pytest.fixture(params=list(MODALITIES))
def modality(request):
    """(write a data file, build the dataset, the noun of its errors) of one modality."""
    write, build, noun, packages = MODALITIES[request.param]
    for package in packages:
        pytest.importorskip(package)
    return write, build, noun


CAPTIONS = ["a red square", "  two blue circles\n", "ein grünes Dreieck, langsam"]


def captioned_folder(root: Path, write, captions=CAPTIONS) -> list[str]:
    """``root/item_<i>`` data files, each with ``item_<i>.txt`` holding ``captions[i]`` (None: no sidecar)."""
    names = []
    for i, caption in enumerate(captions):
        names.append(write(root, f"item_{i}", i))
        if caption is not None:
            (root / f"item_{i}.txt").write_text(caption, encoding="utf-8")
    return names


# --------------------------------------------------------------------------------------
# Folders: sidecar captions
# --------------------------------------------------------------------------------------


def test_sidecar_captions_are_read_and_carried_in_items(modality, tmp_path):
    write, build, _ = modality
    root = tmp_path / "data"
    captioned_folder(root, write)
    (root / "notes.txt").write_text("a text file of no data file: neither an item nor a caption")
    ds = build(root, tmp_path)
    expected = [c.strip() for c in CAPTIONS]
    assert len(ds) == 3 and ds.captions == expected  # .txt files are never items
    assert [ds[i]["caption"] for i in range(len(ds))] == expected
    batch = default_collate([ds[0], ds[2]])
    assert batch["caption"] == [expected[0], expected[2]] and batch["x"].shape[0] == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=0)
    assert next(iter(loader))["caption"] == expected


def test_sidecars_sit_next_to_files_in_class_folders(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "pets"
    for cls, stems in {"cat": ["a", "b"], "dog": ["c"]}.items():
        for i, stem in enumerate(stems):
            write_image(root / cls, stem, i)
            (root / cls / f"{stem}.txt").write_text(f"a {cls} called {stem}")
    ds = image_dataset(root, tmp_path)
    assert ds.num_classes == 2
    assert [(ds[i]["y"], ds[i]["caption"]) for i in range(3)] == [(0, "a cat called a"), (0, "a cat called b"),
                                                                  (1, "a dog called c")]  # fmt: skip


# --------------------------------------------------------------------------------------
# Manifests: a caption column or key
# --------------------------------------------------------------------------------------


def test_manifest_captions_are_carried_in_items(modality, tmp_path):
    write, build, _ = modality
    root = tmp_path / "data"
    a, b = write(root / "files", "a", 0), write(root / "files", "b", 1)
    elsewhere = tmp_path / "elsewhere" / write(tmp_path / "elsewhere", "c", 2)  # an absolute path in the manifest
    manifest = root / "train.csv"
    manifest.write_text(
        "path,label,caption\n"
        f"files/{a},walk,a person walks\n"
        f'{elsewhere},run,"someone runs, fast"\n'
        f"files/{b},jump,  a jump  \n"
    )
    ds = build(manifest, tmp_path)
    assert ds.classes == ["jump", "run", "walk"]
    assert ds.captions == ["a person walks", "someone runs, fast", "a jump"]
    assert [(ds[i]["y"], ds[i]["caption"]) for i in range(3)] == [(2, "a person walks"), (1, "someone runs, fast"),
                                                                  (0, "a jump")]  # fmt: skip
    assert Path(ds.path(1)) == elsewhere
    assert default_collate([ds[0], ds[1]])["caption"] == ["a person walks", "someone runs, fast"]

    jsonl = root / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": f"files/{n}", "caption": f"caption {n}"}) for n in (a, b)))
    ds = build(jsonl, tmp_path)
    assert ds.num_classes == 0 and "y" not in ds[0]
    assert ds.captions == [f"caption {a}", f"caption {b}"] and ds[1]["caption"] == f"caption {b}"


def test_a_shape_manifest_splits_by_the_path_relative_to_its_folder(tmp_path):
    pytest.importorskip("trimesh")
    from ditx.modalities.shape3d.data import held_out

    root = tmp_path / "meshes"
    names = [write_mesh(root, f"m{i}", i % 4) for i in range(8)]
    manifest = root / "all.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": n, "caption": f"shape {n}"}) for n in names))
    parts = {s: shape_dataset(manifest, tmp_path, split=s, test_fraction=0.4) for s in ("train", "test", "all")}
    assert sorted(parts["train"].files + parts["test"].files) == parts["all"].files == names
    assert all(held_out(f, 0.4) for f in parts["test"].files)
    assert not any(held_out(f, 0.4) for f in parts["train"].files)
    for ds in parts.values():
        assert ds.captions == [f"shape {f}" for f in ds.files]


# --------------------------------------------------------------------------------------
# All or none
# --------------------------------------------------------------------------------------


def test_some_sidecars_missing_is_a_clear_error(modality, tmp_path):
    write, build, noun = modality
    root = tmp_path / "data"
    names = captioned_folder(root, write, ["a caption", None, "another"])
    with pytest.raises(ValueError) as error:
        build(root, tmp_path)
    message = str(error.value)
    assert str(root) in message and f"2 of 3 {noun} have a caption, 1 has none" in message
    assert names[1] in message and "item_1.txt" in message and "remove the .txt files" in message

    (root / "item_1.txt").write_text("  \n")  # an empty caption is no caption
    with pytest.raises(ValueError, match=f"2 of 3 {noun} have a caption.*{names[1]}"):
        build(root, tmp_path)


def test_some_manifest_captions_missing_is_a_clear_error(modality, tmp_path):
    write, build, noun = modality
    names = [write(tmp_path / "data", f"v{i}", i) for i in range(3)]
    manifest = tmp_path / "data" / "m.csv"
    manifest.write_text(f"path,caption\n{names[0]},one\n{names[1]},\n{names[2]},three\n")  # an empty cell is missing
    with pytest.raises(ValueError) as error:
        build(manifest, tmp_path)
    message = str(error.value)
    assert str(manifest) in message and f"2 of 3 {noun} have a caption, 1 has none" in message
    assert names[1] in message and "fill the 'caption' column" in message

    jsonl = tmp_path / "data" / "m.jsonl"
    jsonl.write_text(json.dumps({"path": names[0], "caption": "one"}) + "\n" + json.dumps({"path": names[1]}))
    with pytest.raises(ValueError, match=f"m.jsonl.*1 of 2 {noun} has a caption, 1 has none.*{names[1]}"):
        build(jsonl, tmp_path)


def test_without_captions_items_carry_none(modality, tmp_path):
    write, build, _ = modality
    root = tmp_path / "data"
    captioned_folder(root, write, [None, None])
    ds = build(root, tmp_path)
    assert ds.captions is None and "caption" not in ds[0] and "captions" not in ds.cache_key()

    manifest = root / "m.csv"
    manifest.write_text("path,caption\nitem_0" + Path(ds.path(0)).suffix + ",\n")  # an empty column: no captions
    ds = build(manifest, tmp_path)
    assert ds.captions is None and "caption" not in ds[0]


# --------------------------------------------------------------------------------------
# Cache identity
# --------------------------------------------------------------------------------------


def test_cache_key_changes_when_a_caption_changes(modality, tmp_path):
    write, build, _ = modality
    root = tmp_path / "data"
    captioned_folder(root, write)
    key = build(root, tmp_path).cache_key()
    assert build(root, tmp_path).cache_key() == key  # stable

    (root / "item_1.txt").write_text("two blue circles, slowly")
    changed = build(root, tmp_path).cache_key()
    assert {k for k in key if changed[k] != key[k]} == {"captions"}  # the data files did not change

    for name in ("item_0.txt", "item_1.txt", "item_2.txt"):
        (root / name).unlink()
    uncaptioned = build(root, tmp_path).cache_key()
    assert "captions" not in uncaptioned and uncaptioned != key

    manifest = root / "m.csv"
    manifest.write_text("path,caption\nitem_0" + Path(build(root, tmp_path).path(0)).suffix + ",first\n")
    first = build(manifest, tmp_path).cache_key()
    manifest.write_text("path,caption\nitem_0" + Path(build(root, tmp_path).path(0)).suffix + ",second\n")
    assert build(manifest, tmp_path).cache_key()["captions"] != first["captions"]


# --------------------------------------------------------------------------------------
# The shared pieces
# --------------------------------------------------------------------------------------


def test_txt_is_never_a_data_extension():
    assert data_extensions([".PNG", "png", "jpg"], "image-folder") == ("png", "jpg")
    with pytest.raises(ValueError, match="image-folder extensions must not include 'txt'.*captions"):
        data_extensions(["png", ".TXT"], "image-folder")


def test_packed_strings_read_back_every_string():
    strings = ["", "a caption", "ünïcödé ✓", "x" * 1000, "\udcff raw byte name"]  # a non-UTF-8 file name round-trips
    packed = PackedStrings(strings)
    assert len(packed) == 5 and list(packed) == strings and packed[-1] == strings[-1] and packed[1:3] == strings[1:3]
    with pytest.raises(IndexError):
        packed[5]
    assert captions_fingerprint(["a", "b"]) != captions_fingerprint(["b", "a"]) != captions_fingerprint(["ab"])


def test_uncaptioned_datasets_keep_the_default():
    pytest.importorskip("sklearn")
    from ditx.modalities.image.data import DigitsDataset

    assert Dataset.captions is None and DigitsDataset(size=8).captions is None
