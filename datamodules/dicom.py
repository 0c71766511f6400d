"""DICOM radiographs as one grey channel in [0, 1], the way a reading workstation displays them.

pydicom decodes the pixel data (native, RLE and deflated itself; JPEG baseline and JPEG 2000 through Pillow; JPEG
lossless, JPEG-LS and JPEG 2000 through GDCM). Then, in the order of the DICOM grey-scale pipeline (PS3.3 C.11):
the modality LUT or rescale slope/intercept, the VOI LUT or window centre/width when the file has one, and scaling by
the range those leave: the ``BitsStored`` of the data, never the 16 bits of its container. ``MONOCHROME1`` (white
is zero) is inverted last. What no installed decoder reads (12-bit lossy JPEG, for one) and what is not a single
grey radiograph (several frames, a colour palette) is an ``UnreadableImageError`` with the reason: a listed skip.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

#: what a DICOM file is called (the magic ``DICM`` at byte 128 identifies one whatever its name)
DICOM_SUFFIXES = (".dcm", ".dicom")
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


#: names that are never DICOM: no need to open the file to look for its marker
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_dicom(path: str | Path) -> bool:
    name = str(path).lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if name.endswith(_RASTER_SUFFIXES):
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _named_dicom(path: str | Path) -> bool:
    return str(path).lower().endswith(DICOM_SUFFIXES)


def check_radiograph(ds: Dataset) -> str | None:
    """Why ``ds`` is not one grey (or RGB) image VALD can read; None when it is."""
    if len(ds) == 0:  # what pydicom returns when a file ends inside its first undefined-length element
        return "truncated DICOM (no data element could be read whole)"
    if "PixelData" not in ds and "Rows" not in ds:
        return f"DICOM without an image ({ds.get('Modality', 'no modality')}, {ds.get('SOPClassUID', '?')})"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame DICOM ({frames} frames): VALD reads single radiographs"
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "PALETTE COLOR":
        return "DICOM with a colour palette (PALETTE COLOR): not a radiograph"
    return None


def stored_range(ds: Dataset) -> tuple[float, float]:
    """The values a pixel can hold after the modality LUT or rescale: from ``BitsStored`` and the sign."""
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1)
    else:
        bits = int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return low, high


def read_dicom(path: str | Path, intensity: str = "auto") -> np.ndarray:
    """float32 (H, W) in [0, 1]. ``intensity``: ``auto`` scales by the range the grey-scale pipeline leaves;
    ``bits:<n>`` by 2^n - 1 (a file whose ``BitsStored`` is wrong); ``minmax`` / ``percentile`` stretch per image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about a cut-off file: check_radiograph gives the reason
        ds = pydicom.dcmread(path, force=_named_dicom(path))  # a .dcm without the 128-byte preamble is still one
    reason = check_radiograph(ds)
    if reason:
        raise ValueError(reason)
    try:
        pixels = ds.pixel_array  # decoded; YBR converted to RGB
    except (RuntimeError, NotImplementedError) as err:  # no plugin decodes this transfer syntax (or this variant)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        detail = str(err).strip().splitlines()[-1].strip()
        name = syntax.name if syntax else "unknown"
        raise ValueError(f"{name} pixel data that no installed decoder reads ({detail})") from err
    except ValueError as err:  # fewer bytes than the header's rows x columns x bits
        raise ValueError(f"truncated DICOM or a wrong header: {str(err).split(' - ')[0]}") from err
    if pixels.ndim == 3:  # RGB secondary capture: luma, as PIL's convert("L")
        return (pixels.astype(np.float32) @ _LUMA) / float(2 ** int(ds.BitsStored) - 1)
    values = apply_modality_lut(pixels, ds)
    low, high = stored_range(ds)
    if ds.get("VOILUTSequence") or "WindowCenter" in ds:
        values = apply_voi_lut(values, ds)  # a window keeps (low, high); a VOI LUT maps to its own output depth
        if ds.get("VOILUTSequence"):
            low, high = 0.0, float(2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
    values = np.asarray(values, dtype=np.float32)
    if intensity == "minmax":
        low, high = float(values.min()), float(values.max())
    elif intensity == "percentile":
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    elif intensity.startswith("bits:"):
        low, high = 0.0, float(2 ** int(intensity[5:]) - 1)
    gray = (values - low) / max(high - low, 1e-6)
    return 1.0 - gray if ds.get("PhotometricInterpretation") == "MONOCHROME1" else gray


def check_dicom_header(path: str | Path) -> None:
    """Without decoding: the header parses, the image is one VALD reads, and the pixel data is all there (its
    element ends inside the file, holds the bytes native pixels need, or, compressed, ends with its delimiter; the
    pixel data itself is skipped over, not read). Raises ValueError with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about a cut-off file: the reason is raised below instead
        ds = pydicom.dcmread(path, defer_size=256, force=_named_dicom(path))
    reason = check_radiograph(ds)
    if reason:
        raise ValueError(reason)
    if _PIXEL_DATA not in ds:
        raise ValueError("truncated DICOM (the file ends before its pixel data is complete)")
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    length = getattr(raw, "length", None)
    if length is None or length == _UNDEFINED_LENGTH:
        return  # encapsulated: pydicom found the delimiter, or the pixel data would be missing above
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_deflated:
        return  # the dataset is zlib-compressed: offsets are not file offsets, and only a decode can tell
    if raw.value_tell is not None and raw.value_tell + length > Path(path).stat().st_size:
        raise ValueError(f"truncated DICOM (pixel data of {length} bytes runs past the end of the file)")
    needed = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    if length < needed:
        raise ValueError(f"DICOM pixel data of {length} bytes, short of the {needed} its header describes")
