"""Image reading of every kind the datasets hold, the albumentations pipeline, scans and the Dataset's bad-file path."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.images import (
    UnreadableImageError,
    XRayDataset,
    build_transform,
    check_header,
    read_gray,
    read_mask,
)
from datamodules.scan import UnreadableFilesError, enforce, scan_files
from tests.fixtures_real_data import encode, gray, truncated, write

PIXELS = gray(20, 16)
EXPECTED = PIXELS.astype(np.float32) / 255


def _save(path, image: Image.Image):
    image.save(path)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(PIXELS),  # 8-bit L
        lambda: Image.fromarray(np.repeat(PIXELS[..., None], 3, 2)),  # RGB
        lambda: Image.fromarray(np.dstack([np.repeat(PIXELS[..., None], 3, 2), np.zeros_like(PIXELS)])),  # RGBA
        lambda: Image.fromarray(np.dstack([PIXELS, np.full_like(PIXELS, 255)])),  # LA
        lambda: Image.fromarray(PIXELS).convert("P"),  # palette
        lambda: Image.fromarray(PIXELS.astype(np.uint16) * 257),  # 16-bit I;16
    ],
    ids=["L", "RGB", "RGBA", "LA", "P", "I;16"],
)
def test_every_pixel_format_reads_as_the_same_grey(tmp_path, make):
    image = make()
    path = _save(tmp_path / "x.png", image)
    out = read_gray(path)
    assert out.dtype == np.float32 and out.shape == PIXELS.shape
    np.testing.assert_allclose(out, EXPECTED, atol=1.5 / 255)  # alpha dropped, never blended


def test_sixteen_bit_scales_by_bit_depth_not_image_max(tmp_path):
    dark = np.full((8, 8), 1000, np.uint16)
    dark[0, 0] = 4000
    path = _save(tmp_path / "dark16.png", Image.fromarray(dark))
    assert Image.open(path).mode.startswith("I")
    out = read_gray(path)
    assert out.max() == pytest.approx(4000 / 65535) and out[1, 1] == pytest.approx(1000 / 65535)


def test_jpeg_and_mask_resize(tmp_path):
    path = write(tmp_path / "x.jpg", encode(PIXELS, "JPEG"))
    assert np.abs(read_gray(path) - EXPECTED).mean() < 0.02  # lossy
    mask = np.zeros((10, 8), np.uint8)
    mask[:5] = 1
    for stored in (mask, mask * 255):  # both conventions of binary masks
        resized = read_mask(write(tmp_path / "m.png", encode(stored)), (20, 16))
        assert resized.shape == (20, 16) and resized[:10].all() and not resized[10:].any()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_named_by_path(tmp_path, fmt):
    data = encode(gray(64, 64), fmt)
    half = write(tmp_path / f"half.{fmt.lower()}", truncated(data))
    with pytest.raises(UnreadableImageError, match="half") as err:
        read_gray(half)
    assert err.value.path == str(half)
    end_cut = write(tmp_path / f"end.{fmt.lower()}", data[:-12])  # header intact: only the end check sees it
    with pytest.raises(UnreadableImageError, match="truncated") as err:
        check_header(end_cut)
    assert err.value.path == str(end_cut)


def test_missing_empty_and_non_image_files(tmp_path):
    for path in (tmp_path / "missing.png", write(tmp_path / "empty.png", b""), write(tmp_path / "t.png", b"text")):
        with pytest.raises(UnreadableImageError, match=path.name):
            read_gray(path)
        with pytest.raises(UnreadableImageError):
            check_header(path)


def test_scan_modes_and_policies(tmp_path, caplog):
    good = write(tmp_path / "good.png", encode(PIXELS))
    cut = write(tmp_path / "cut.png", encode(PIXELS)[:-12])
    paths = [good, cut, tmp_path / "missing.png"]
    assert scan_files(paths, "none") == []
    for mode in ("header", "full"):
        assert [b.path for b in scan_files(paths, mode)] == [str(cut), str(tmp_path / "missing.png")]
    bad = scan_files(paths, "header")
    with pytest.raises(UnreadableFilesError, match="2 unreadable") as err:
        enforce(bad, "error", "tiny")
    assert str(cut) in str(err.value) and "on_bad_file=skip" in str(err.value)
    with caplog.at_level(logging.WARNING):
        enforce(bad, "skip", "tiny")
    assert "leaving out 2" in caplog.text and str(cut) in caplog.text
    with pytest.raises(ValueError):
        scan_files(paths, "quick")


def test_transforms_resize_letterbox_and_augment_masks_together():
    image = np.random.default_rng(0).random((40, 20), dtype=np.float32)
    mask = np.ones((40, 20), np.uint8)
    out = build_transform(16)(image=image, masks=[mask])
    assert out["image"].shape == (16, 16) and out["image"].dtype == np.float32 and out["masks"][0].shape == (16, 16)
    out = build_transform(16, "letterbox")(image=image, masks=[mask])
    assert out["image"].shape == (16, 16) and out["masks"][0][:, :4].sum() == 0 and out["masks"][0][:, 6:10].all()
    affine = [{"name": "Affine", "rotate": [20, 20], "p": 1.0}]
    out = build_transform(16, augmentations=affine, seed=0)(image=image, masks=[mask])
    assert out["masks"][0].sum() < 16 * 16  # rotated together with the image
    with pytest.raises(ValueError, match="albumentations transform"):
        build_transform(16, augmentations=[{"name": "NoSuchFlip"}])
    with pytest.raises(ValueError, match="unknown argument"):
        build_transform(16, augmentations=[{"name": "Affine", "scal": [0.9, 1.1]}])
    with pytest.raises(ValueError, match="resize"):
        build_transform(16, "crop")


def _dataset(tmp_path, on_bad_file="skip", random_prompt=False):
    for i in range(4):
        write(tmp_path / f"{i}.png", encode(gray(12, 10, seed=i)))
    write(tmp_path / "1.png", encode(gray(12, 10))[:40])  # goes bad after any scan
    ids = [f"{i}.png" for i in range(4)]
    return XRayDataset(
        tmp_path,
        ids,
        np.eye(4, 2, dtype=np.float32),
        lambda i, rng: f"p{i}-{rng.integers(1000)}",
        build_transform(8),
        on_bad_file=on_bad_file,
        random_prompt=random_prompt,
    )


def test_dataset_replaces_a_file_gone_bad_and_names_it(tmp_path, caplog):
    ds = _dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        sample = ds[1]
    assert sample["id"] == "2.png" and "1.png" in caplog.text and ds.bad_files.keys() == {"1.png"}
    assert sample["image"].shape == (1, 8, 8) and -1 <= sample["image"].min() and sample["image"].max() <= 1
    assert torch.equal(sample["mask"], torch.zeros(1, 8, 8)) and "has_mask" not in sample
    assert ds[1]["id"] == "2.png" and ds[0]["prompt"] == ds[0]["prompt"]  # fixed phrasing per sample
    with pytest.raises(RuntimeError, match="1.png"):
        _dataset(tmp_path, on_bad_file="error")[1]
    random = _dataset(tmp_path, random_prompt=True)  # a phrasing per (epoch, sample): resumed runs draw the same
    assert len({random[(epoch, 0)]["prompt"] for epoch in range(20)}) > 1
    assert random[(3, 0)]["prompt"] == random[(3, 0)]["prompt"]


def test_augmentation_is_drawn_per_epoch_and_sample_the_same_in_any_worker(tmp_path):
    """Keys (epoch, index) seed the augmentation: 2 workers draw what the main process draws, epochs differ."""
    from torch.utils.data import DataLoader

    for i in range(4):
        write(tmp_path / f"{i}.png", encode(gray(24, 24, seed=i)))
    affine = [{"name": "Affine", "rotate": [-20, 20], "translate_percent": [-0.1, 0.1], "p": 1.0}]
    ds = XRayDataset(
        tmp_path,
        [f"{i}.png" for i in range(4)],
        np.eye(4, 2),
        lambda i, rng: "p",
        build_transform(16, augmentations=affine),
    )
    keys = [(epoch, i) for epoch in (0, 1) for i in range(4)]
    here = torch.stack([ds[key]["image"] for key in keys])
    workers = torch.cat([b["image"] for b in DataLoader(ds, batch_size=2, sampler=keys, num_workers=2)])
    assert torch.equal(here, workers)
    assert not torch.equal(here[:4], here[4:])  # epoch 1 draws other augmentations than epoch 0


def _with_sbit(png: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk after IHDR (8-byte signature + 25-byte IHDR record), as a DICOM converter writes it."""
    import zlib

    chunk = b"sBIT" + bytes([bits])
    record = len(chunk[4:]).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
    return png[:33] + record + png[33:]


def test_sixteen_bit_images_are_scaled_by_their_real_depth_or_the_declared_policy(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("datamodules.images._warned_depth", [])  # the warning comes once per process
    twelve = (PIXELS.astype(np.uint16) * 16).astype(np.uint16)  # 12-bit values, stored unscaled
    plain = write(tmp_path / "plain.png", encode(twelve))
    tagged = write(tmp_path / "tagged.png", _with_sbit(encode(twelve), 12))
    expected = twelve.astype(np.float32) / 4095
    with caplog.at_level(logging.WARNING):
        dark = read_gray(plain)  # no recorded depth: the standard's 65535, and a warning naming the fixes
    np.testing.assert_allclose(dark, twelve / 65535, atol=1e-6)
    assert "no recorded depth" in caplog.text and "data.intensity=bits:12" in caplog.text
    np.testing.assert_allclose(read_gray(tagged), expected, atol=1e-6)  # sBIT says 12
    np.testing.assert_allclose(read_gray(plain, "bits:12"), expected, atol=1e-6)
    stretched = read_gray(plain, "minmax")
    assert stretched.min() == 0 and stretched.max() == 1
    assert 0 <= read_gray(plain, "percentile").min() and read_gray(plain, "percentile").max() == 1
    full = (PIXELS.astype(np.uint16) * 257).astype(np.uint16)  # scaled to the full range, as PNG's standard says
    np.testing.assert_allclose(read_gray(write(tmp_path / "full.png", _with_sbit(encode(full), 8))), full / 65535)
    np.testing.assert_allclose(read_gray(write(tmp_path / "eight.png", encode(PIXELS)), "minmax"), EXPECTED)


@pytest.mark.parametrize("policy", ["bits:0", "bits:17", "bits:x", "max", ""])
def test_an_unknown_intensity_policy_is_refused(policy):
    from datamodules.images import check_intensity

    with pytest.raises(ValueError, match="data.intensity must be one of auto, bits:<n>, minmax, percentile"):
        check_intensity(policy)
