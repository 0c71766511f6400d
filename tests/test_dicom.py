"""DICOM radiographs (datamodules/dicom.py): each step of the grey-scale pipeline on files written here, the files
pydicom ships, and the listed skips for what cannot be read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from datamodules.folder import ImageFolder
from datamodules.images import UnreadableImageError, check_header, read_gray
from datamodules.scan import scan_files

STORED = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)  # 12 bits used in a 16-bit container


def write_dicom(path: Path, pixels: np.ndarray = STORED, *, bits_stored: int = 12, compress=None, **attributes) -> Path:
    """A single-frame grey DX-like file; ``attributes`` set or override header elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, generate_uid(), "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    if compress is not None:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_bits_stored_not_the_container_sets_the_scale(tmp_path):
    image = read_gray(write_dicom(tmp_path / "a.dcm"))
    np.testing.assert_allclose(image, STORED / 4095, atol=1e-6)  # 12-bit values fill [0, 1], not a 16th of it


def test_monochrome1_is_inverted(tmp_path):
    image = read_gray(write_dicom(tmp_path / "a.dcm", PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(image, 1 - STORED / 4095, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied_with_the_range_they_imply(tmp_path):
    signed = np.array([[-1024, 0], [1000, 2047]], dtype=np.int16)
    path = write_dicom(tmp_path / "a.dcm", signed, RescaleSlope=2, RescaleIntercept=100)
    low, high = -2048 * 2 + 100, 2047 * 2 + 100  # the 12-bit signed range, rescaled
    np.testing.assert_allclose(read_gray(path), (signed * 2 + 100 - low) / (high - low), atol=1e-6)


def test_a_window_is_applied_when_the_file_has_one(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", WindowCenter=2048, WindowWidth=2048)
    image = read_gray(path)
    assert image[0, 0] == 0 and image[1, 1] == 1  # outside the window: clipped to its ends
    assert 0.45 < image[1, 0] < 0.55  # the centre: mid-grey


def test_a_voi_lut_is_applied_and_scaled_by_its_own_depth(tmp_path):
    table = (65535 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # a non-linear, 16-bit output LUT
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 16])
    lut.add_new("LUTData", "US", table.tolist())
    path = write_dicom(tmp_path / "a.dcm", VOILUTSequence=[lut])
    np.testing.assert_allclose(read_gray(path), table[STORED] / 65535, atol=1e-6)


def test_intensity_policies_override_the_header(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", STORED // 16, bits_stored=12)  # a file whose values use 8 of 12 bits
    np.testing.assert_allclose(read_gray(path, "bits:8"), (STORED // 16) / 255, atol=1e-6)
    assert read_gray(path, "minmax").max() == 1 and read_gray(path, "minmax").min() == 0


def test_compressed_pixel_data_decodes_like_the_native_file(tmp_path):
    native = read_gray(write_dicom(tmp_path / "native.dcm"))
    rle = write_dicom(tmp_path / "rle.dcm", compress=RLELossless)
    check_header(rle)
    np.testing.assert_array_equal(read_gray(rle), native)


def test_jpeg_lossless_as_hospitals_store_it_decodes_like_the_native_file(tmp_path):
    """MR_small transcoded by GDCM to JPEG Lossless SV1 (the usual CR/DX archive syntax; Pillow cannot read it)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(get_testdata_file("MR_small.dcm"))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp_path / "lossless.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    check_header(tmp_path / "lossless.dcm")
    np.testing.assert_array_equal(read_gray(tmp_path / "lossless.dcm"), read_gray(get_testdata_file("MR_small.dcm")))


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm",
     "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "image_dfl.dcm"],
)  # fmt: skip
def test_the_files_pydicom_ships_read_as_one_grey_plane_in_range(name):
    path = get_testdata_file(name)
    check_header(path)
    image = read_gray(path)
    assert image.ndim == 2 and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1


def test_same_pixels_in_every_transfer_syntax_pydicom_ships():
    native = read_gray(get_testdata_file("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_allclose(read_gray(get_testdata_file(name)), native, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("JPGExtended.dcm", "JPEG Extended .* no installed decoder reads"),
        ("examples_palette.dcm", "colour palette"),
        ("examples_ybr_color.dcm", "multi-frame DICOM \\(30 frames\\)"),
        ("rtplan.dcm", "DICOM without an image"),
        ("MR_truncated.dcm", "truncated DICOM"),
    ],
)
def test_what_cannot_be_read_is_one_reason(name, reason):
    with pytest.raises(UnreadableImageError, match=reason):
        read_gray(get_testdata_file(name))


def test_the_header_scan_catches_cut_files_without_decoding(tmp_path):
    whole = write_dicom(tmp_path / "whole.dcm", np.zeros((64, 64), np.uint16))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-100])
    rle = write_dicom(tmp_path / "rle.dcm", np.arange(4096, dtype=np.uint16).reshape(64, 64), compress=RLELossless)
    cut_rle = tmp_path / "cut_rle.dcm"
    cut_rle.write_bytes(rle.read_bytes()[:-100])
    bad = {Path(b.path).name: b.reason for b in scan_files([whole, cut, rle, cut_rle], "header")}
    assert set(bad) == {"cut.dcm", "cut_rle.dcm"} and all("truncated DICOM" in r for r in bad.values())


def test_an_attribution_folder_takes_dicom_by_suffix_or_by_its_magic(tmp_path):
    write_dicom(tmp_path / "a.dcm")
    write_dicom(tmp_path / "b.DICOM")
    folder = ImageFolder(tmp_path, image_size=8)
    assert sorted(folder.ids) == ["a", "b"] and not folder.skipped and folder[0]["image"].shape == (1, 8, 8)


def test_a_dicom_file_without_a_dicom_name_is_known_by_its_marker(tmp_path):
    path = write_dicom(tmp_path / "a.dcm").rename(tmp_path / "1.2.840.113619")  # as PACS exports often name them
    np.testing.assert_allclose(read_gray(path), STORED / 4095, atol=1e-6)


def test_a_dcm_without_the_preamble_is_still_read(tmp_path):
    """Older writers omit the 128-byte preamble and DICM marker; a .dcm name is enough to read it."""
    whole = write_dicom(tmp_path / "a.dcm")
    ds = pydicom.dcmread(whole)
    bare = tmp_path / "bare.dcm"
    ds.preamble = None
    pydicom.dcmwrite(bare, ds, enforce_file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    check_header(bare)
    np.testing.assert_allclose(read_gray(bare), STORED / 4095, atol=1e-6)
