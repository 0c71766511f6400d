"""ImageFolder: the one Dataset behind every script's ``input=<file or folder>``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.base import to_model_range
from datamodules.folder import ImageFolder, collate_readable
from datamodules.images import build_transform, read_gray
from tests.fixtures_real_data import encode, gray, truncated, write

SIZE = 16


def expected(path, resize="stretch") -> torch.Tensor:
    """What attribution's folder loop made of ``path``: read_gray, the transform, [-1, 1]."""
    out = build_transform(SIZE, resize)(image=read_gray(path))["image"]
    return to_model_range(torch.from_numpy(np.ascontiguousarray(out, np.float32))[None])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # to the last bit, -0.0 included


def corrupt_idat(data: bytes) -> bytes:
    """Scramble the middle of the first IDAT chunk's data; header and IEND stay intact."""
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    mid = start + length // 4
    return data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + length // 2]) + data[mid + length // 2 :]


def test_single_file(tmp_path):
    path = write(tmp_path / "in" / "scan.one.png", encode(gray(30, 24)))
    folder = ImageFolder(path, SIZE)
    assert len(folder) == 1 and folder.ids == ["scan.one"] and folder.skipped == [] and folder.notes == []
    sample = folder[0]
    assert sample["id"] == "scan.one" and sample["path"] == str(path)
    assert sample["image"].shape == (1, SIZE, SIZE)
    assert_bitwise(sample["image"], expected(path))


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_nested_folder_ids_and_values(tmp_path, resize):
    write(tmp_path / "b" / "deep" / "x.JPG", encode(gray(40, 20, seed=1), "JPEG"))
    write(tmp_path / "a.jpeg", encode(gray(20, 40, seed=2), "JPEG"))
    write(tmp_path / "b" / "y.png", encode(gray(seed=3)))
    write(tmp_path / "notes.txt", b"not an image")
    (tmp_path / "dir.png").mkdir()  # a folder with an image suffix is not a file
    folder = ImageFolder(tmp_path, SIZE, resize)
    assert folder.ids == ["a", "b/deep/x", "b/y"] and folder.skipped == [] and folder.notes == []
    loader = DataLoader(folder, batch_size=2, collate_fn=collate_readable)
    batches = list(loader)
    assert [b["id"] for b in batches] == [["a", "b/deep/x"], ["b/y"]]
    assert all(b["skipped"] == [] for b in batches)
    images = torch.cat([b["image"] for b in batches])
    for image, path in zip(images, [p for b in batches for p in b["path"]], strict=True):
        assert_bitwise(image, expected(path, resize))


def test_clashing_names_keep_their_suffix(tmp_path):
    for name in ("a.png", "a.jpg", "COVID-1.png", "COVID-1.PNG", "sub/c.png"):
        write(tmp_path / name, encode(gray(), "JPEG" if name.endswith("jpg") else "PNG"))
    folder = ImageFolder(tmp_path, SIZE)
    ids = dict(zip((p.relative_to(tmp_path).as_posix() for p in folder.files), folder.ids, strict=True))
    # COVID-1_PNG and COVID-1_png would still overwrite each other on a case-insensitive disk: the second gets _2
    assert ids == {
        "a.png": "a_png",
        "a.jpg": "a_jpg",
        "COVID-1.PNG": "COVID-1_PNG",
        "COVID-1.png": "COVID-1_png_2",
        "sub/c.png": "sub/c",
    }
    assert len(folder.notes) == 2 and any("COVID-1.PNG -> COVID-1_PNG" in n for n in folder.notes)


def test_ids_unique_case_insensitively_with_counter(tmp_path):
    # a.png / A.png differ only in case (one file on a case-insensitive FS); a_png.png already owns 'a_png'
    for name in ("a.png", "A.png", "a_png.png"):
        write(tmp_path / name, encode(gray()))
    folder = ImageFolder(tmp_path, SIZE)
    assert len({i.casefold() for i in folder.ids}) == len(folder) == 3
    ids = dict(zip((p.name for p in folder.files), folder.ids, strict=True))
    assert ids["a_png.png"] == "a_png"
    assert (ids["A.png"], ids["a.png"]) == ("A_png_2", "a_png_3")  # sorted order: A.png first
    assert len(folder.notes) == 1


def test_truncated_file_left_out_at_construction(tmp_path):
    good = write(tmp_path / "good.png", encode(gray()))
    cut = write(tmp_path / "cut.png", truncated(encode(gray(64, 64))))
    folder = ImageFolder(tmp_path, SIZE)
    assert folder.files == [good] and folder.ids == ["good"]
    assert [p for p, _ in folder.skipped] == [str(cut)]


def test_file_that_fails_to_decode_is_skipped_per_batch(tmp_path):
    good = write(tmp_path / "a.png", encode(gray(64, 64, seed=1)))
    bad = write(tmp_path / "b.png", corrupt_idat(encode(gray(64, 64, seed=2))))
    folder = ImageFolder(tmp_path, SIZE)  # the header check passes: IEND is still there
    assert folder.skipped == [] and folder.ids == ["a", "b"]
    sample = folder[1]
    assert "image" not in sample and sample["id"] == "b" and sample["path"] == str(bad) and sample["error"]
    batch = collate_readable([folder[0], folder[1]])
    assert batch["id"] == ["a"] and batch["path"] == [str(good)] and batch["skipped"] == [(str(bad), sample["error"])]
    assert_bitwise(batch["image"][0], expected(good))
    empty = collate_readable([folder[1]])  # a batch of only unreadable files
    assert empty["image"].shape == (0, 1, SIZE, SIZE) and empty["id"] == [] and len(empty["skipped"]) == 1


def test_no_readable_file_names_the_reasons(tmp_path):
    write(tmp_path / "cut.png", truncated(encode(gray(64, 64))))
    with pytest.raises(ValueError, match="no readable image.*cut.png"):
        ImageFolder(tmp_path, SIZE)


def test_empty_folder_and_missing_path(tmp_path):
    write(tmp_path / "readme.txt", b"no images here")
    with pytest.raises(ValueError, match=r"no image file under .*\.png, \.jpg, \.jpeg"):
        ImageFolder(tmp_path, SIZE)
    with pytest.raises(ValueError, match=r"no such file or folder: .*missing.*\.png"):
        ImageFolder(tmp_path / "missing", SIZE)


def test_sixteen_bit_grey_decoded_as_read_gray(tmp_path):
    pixels = (gray(30, 30).astype(np.uint16) * 257) - np.arange(30, dtype=np.uint16)[None]  # all 16 bits used
    path = tmp_path / "deep16.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith("I")
    folder = ImageFolder(path, SIZE)
    assert_bitwise(folder[0]["image"], expected(path))
    full = ImageFolder(path, 30)[0]["image"][0]  # no resize: exactly read_gray in [-1, 1]
    assert torch.equal(full, to_model_range(torch.from_numpy(read_gray(path))))
