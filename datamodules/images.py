"""Chest X-ray files of every kind as one grey channel, the albumentations pipeline, and the Dataset real data share.

The public datasets mix 8-bit grey, 16-bit grey, RGB, RGBA and palette PNGs and 8-bit JPEGs of any size. Everything
becomes float32 (H, W) in [0, 1], is resized by albumentations together with its masks, and is served in the batch
contract of ``datamodules.base``. A file that cannot be decoded raises ``UnreadableImageError`` naming the path, so a
scan can report it and a Dataset can replace it instead of killing a run hours in.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call from a training job
import albumentations as A  # noqa: E402

from datamodules.base import to_model_range  # noqa: E402
from datamodules.dicom import DICOM_SUFFIXES, check_dicom_header, is_dicom, read_dicom  # noqa: E402
from datamodules.sampling import SampleKey, key_rng, sample_key  # noqa: E402
from datamodules.zones import binarize  # noqa: E402

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)
RESIZE_MODES = ("stretch", "letterbox")
BAD_FILE_POLICIES = ("skip", "error")
# 16-bit grey PNGs open as 'I;16*' (older Pillow: 'I'). The PNG standard stores fewer significant bits scaled up to
# the full 16-bit range (sBIT records the original depth), but many converters write 12-bit values unscaled: see
# ``intensity_scale``.
#: how 16-bit images reach [0, 1] (``data.intensity``): auto | bits:<n> | minmax | percentile
INTENSITY_POLICIES = ("auto", "bits:<n>", "minmax", "percentile")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's convert("L"); exact for grey-as-RGB
_MAX_CONSECUTIVE_BAD_READS = 32


class UnreadableImageError(OSError):
    """``path`` could not be decoded; ``reason`` says why (missing, truncated, not an image, unsupported mode)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _is_sixteen_bit(im: Image.Image) -> bool:
    return im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and im.format == "PNG")


def check_mode(im: Image.Image, path: str | Path) -> None:
    """Reject pixel formats ``read_gray`` would have to guess the range of (float, 32-bit integer)."""
    if im.mode in ("F", "I") and not _is_sixteen_bit(im):
        raise UnreadableImageError(path, f"unsupported pixel mode {im.mode!r} ({im.format})")


def check_intensity(policy: str) -> str:
    valid = policy in ("auto", "minmax", "percentile") or (
        policy.startswith("bits:") and policy[5:].isdigit() and 1 <= int(policy[5:]) <= 16
    )
    if not valid:
        raise ValueError(f"data.intensity must be one of {', '.join(INTENSITY_POLICIES)} (n in 1..16), got {policy!r}")
    return policy


@functools.cache  # read once per file, not once per epoch
def png_significant_bits(path: str | Path) -> int | None:
    """The grey depth a PNG's sBIT chunk records (None without one). Pillow does not expose sBIT, so the chunks
    before the pixel data are walked here: 8-byte signature, then (length, type, data, CRC) records."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while len(head := fh.read(8)) == 8:
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"sBIT":
                data = fh.read(length)
                return data[0] if data else None
            if kind in (b"IDAT", b"IEND"):
                return None
            fh.seek(length + 4, os.SEEK_CUR)
    return None


def intensity_scale(values: np.ndarray, path: str | Path, policy: str = "auto") -> np.ndarray:
    """16-bit grey values -> [0, 1] by ``policy``, never silently guessed.

    ``auto``: by the recorded depth when the values fit under it (a converter that stored 12-bit values unscaled and
    said so in sBIT), else by 65535 as the PNG standard says; values that fill less than 12 bits of a file without
    sBIT are scaled by 65535 too, with a warning naming the policies that would read them right. ``bits:<n>``:
    divided by 2^n - 1. ``minmax`` and ``percentile`` (0.5-99.5): stretched per image."""
    if policy == "minmax":
        low, high = float(values.min()), float(values.max())
    elif policy == "percentile":
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    else:
        bits = int(policy[5:]) if policy.startswith("bits:") else None
        if bits is None and str(path).lower().endswith(".png"):
            recorded = png_significant_bits(path)
            bits = recorded if recorded and values.max() < 2**recorded else None
        if bits is None and values.max() < 2**12 and not _warned_depth:
            _warned_depth.append(path)  # once per process: a whole 12-bit dataset would flood the log
            log.warning(
                "%s (and maybe more): 16-bit image with values up to %d and no recorded depth, scaled by 65535 "
                "(data.intensity=auto) and so nearly black: set data.intensity=bits:12 (or the real depth), minmax "
                "or percentile",
                path,
                int(values.max()),
            )
        low, high = 0.0, float(2 ** (bits or 16) - 1)
    return (values - low) / max(high - low, 1e-6)


_warned_depth: list = []


def _to_gray01(im: Image.Image, path: str | Path = "", intensity: str = "auto") -> np.ndarray:
    if _is_sixteen_bit(im):
        return intensity_scale(np.asarray(im, dtype=np.float32), path, intensity)
    if im.mode == "L":
        return np.asarray(im, dtype=np.float32) / 255.0
    if im.mode == "LA":
        return np.asarray(im.getchannel("L"), dtype=np.float32) / 255.0
    if im.mode in ("P", "PA"):  # via RGBA: palette transparency would otherwise warn
        im = im.convert("RGBA")
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # RGBA/LA: alpha dropped; 48-bit RGB: Pillow keeps 8 bits
    return rgb @ (_LUMA / 255.0)


def read_gray(path: str | Path, intensity: str = "auto") -> np.ndarray:
    """Decode ``path`` to float32 (H, W) in [0, 1] (16-bit images by the ``intensity`` policy); any failure becomes
    ``UnreadableImageError`` with the path. DICOM goes through its grey-scale pipeline (datamodules/dicom.py)."""
    try:
        if is_dicom(path):
            return np.clip(read_dicom(path, intensity), 0.0, 1.0)
        with Image.open(path) as im:
            check_mode(im, path)
            im.load()
            return np.clip(_to_gray01(im, path, intensity), 0.0, 1.0)
    except UnreadableImageError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt files make decoders raise anything (OSError, SyntaxError, ...)
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A binary uint8 mask (0/1, 0/255 or soft) resized (nearest) to ``shape``, as lung masks differ in resolution."""
    mask = binarize(read_gray(path)).astype(np.uint8)
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask


def check_header(path: str | Path) -> None:
    """Cheap validity check without decoding pixels: the header parses, the mode is supported, the file is complete.

    Completeness is read from the last kilobyte: a PNG ends with its IEND chunk and a JPEG with the end-of-image
    marker, so a truncated download is caught at the cost of one short read. DICOM: ``check_dicom_header``.
    """
    try:
        if is_dicom(path):
            return check_dicom_header(path)
        with Image.open(path) as im:
            check_mode(im, path)
            fmt = im.format
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 1024))
            tail = fh.read()
    except UnreadableImageError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err
    if fmt == "PNG" and b"IEND" not in tail:
        raise UnreadableImageError(path, "truncated PNG (no IEND chunk at the end of the file)")
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise UnreadableImageError(path, "truncated JPEG (no end-of-image marker at the end of the file)")


def _augmentation(spec: Mapping) -> A.BasicTransform:
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    cls = getattr(A, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise ValueError(f"augmentation {spec!r}: 'name' must be an albumentations transform (e.g. Affine)")
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:  # albumentations 2 only warns; a typo in a config must not silently disable an augmentation
        raise ValueError(f"augmentation {name}: unknown argument(s) {unknown}; valid: {sorted(params)}")
    if name == "HorizontalFlip":
        log.warning("HorizontalFlip moves the heart to the right side of the chest: an anatomically wrong image")
    return cls(**kwargs)


def build_transform(
    image_size: int,
    resize: str = "stretch",
    augmentations: Sequence[Mapping] | None = None,
    seed: int | None = None,
) -> A.Compose:
    """Resize to ``image_size`` squared, then augment; masks passed as ``masks=`` follow the image.

    ``stretch`` resizes to exactly that size; ``letterbox`` keeps the aspect ratio and pads with black.
    ``augmentations`` is a list of ``{name: <albumentations class>, **kwargs}`` applied after the resize.
    """
    if resize == "stretch":
        geometry = [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")]
    elif resize == "letterbox":
        geometry = [
            A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
            A.PadIfNeeded(image_size, image_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        ]
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return A.Compose([*geometry, *(_augmentation(spec) for spec in augmentations or ())], seed=seed)


PromptFn = Callable[[int, np.random.Generator], str]


class XRayDataset(Dataset):
    """Images under ``root`` by relative path (the ``id``) with labels, prompts and optional masks.

    ``prompt(index, rng)`` builds sample ``index``'s prompt. With ``random_prompt`` the rng is drawn from (seed,
    epoch, index) (a new phrasing every epoch, for training); otherwise from (seed, id), so a sample's prompt is the
    same in every epoch. Augmentations are seeded by (seed, epoch, index) too: the same in every worker, rank and
    resumed run (keys are ``(epoch, index)`` from datamodules/sampling.py; a plain index is epoch 0).

    A file that fails to decode raises under ``on_bad_file='error'``; under ``'skip'`` it is reported once with its
    path and the next readable sample (index + 1, ...) is served instead, so the batch and the run go on.
    """

    def __init__(
        self,
        root: str | Path,
        ids: Sequence[str],
        labels: np.ndarray,
        prompt: PromptFn,
        transform: A.Compose,
        *,
        label_mask: np.ndarray | None = None,
        lung_masks: Sequence[str | None] | None = None,
        lesion_masks: Sequence[str | None] | None = None,
        on_bad_file: str = "skip",
        seed: int = 0,
        random_prompt: bool = False,
        intensity: str = "auto",
    ):
        self.intensity = check_intensity(intensity)
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")
        self.root = Path(root)
        self.ids = list(ids)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.label_mask = None if label_mask is None else np.asarray(label_mask, dtype=np.float32)
        self.prompt = prompt
        self.transform = transform
        self.lung_masks = lung_masks
        self.lesion_masks = lesion_masks
        self.on_bad_file = on_bad_file
        self.seed = seed
        self.random_prompt = random_prompt
        #: files that failed to decode in this process: id -> reason
        self.bad_files: dict[str, str] = {}
        #: False once ``without_pixels``: samples carry no image (stage 2 reads its latents from the latent store)
        self.pixels = True

    def without_pixels(self, stored: set[str]) -> None:
        """Serve prompts, labels and ids only, for images whose latents ``stored`` holds: the files are not opened.
        An image the store lacks (it failed to decode when the store was written) is skipped like a bad file."""
        self.pixels = False
        missing = [key for key in self.ids if key not in stored]
        if missing and self.on_bad_file == "error":
            raise ValueError(
                f"the latent store lacks {len(missing)} images of this split (first: {missing[0]}, unreadable when "
                "it was written): set data.on_bad_file=skip to train without them"
            )
        self.bad_files.update(dict.fromkeys(missing, "not in the latent store"))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | SampleKey) -> dict:
        index = sample_key(key)[1]
        rng = key_rng(self.seed, key)
        self.transform.set_random_seed(int(rng.integers(2**32)))
        failures = 0
        for step in range(len(self)):
            i = (index + step) % len(self)
            if self.ids[i] in self.bad_files:
                continue
            try:
                return self._load(i, rng)
            except UnreadableImageError as err:
                if self.on_bad_file == "error":
                    raise RuntimeError(
                        f"cannot read {err.path} ({err.reason}); set data.on_bad_file=skip to serve another image "
                        "instead, or data.scan=full to find every such file before training"
                    ) from err
                self.bad_files[self.ids[i]] = err.reason
                log.warning(
                    "unreadable image %s (%s): serving the next sample instead (%d unreadable in this process)",
                    err.path,
                    err.reason,
                    len(self.bad_files),
                )
                failures += 1
                if failures == _MAX_CONSECUTIVE_BAD_READS:
                    break
        raise RuntimeError(
            f"no readable image found from sample {self.root / self.ids[index]} on ({failures} failed reads in a "
            "row); is the dataset storage still mounted?"
        )

    def _load(self, i: int, rng: np.random.Generator) -> dict:
        if not self.random_prompt:
            rng = np.random.default_rng([self.seed, zlib.crc32(self.ids[i].encode())])
        if not self.pixels:
            return {"prompt": self.prompt(i, rng), "label": torch.from_numpy(self.labels[i]), "id": self.ids[i]}
        image = read_gray(self.root / self.ids[i], self.intensity)
        masks = {}
        for key, paths in (("lung_mask", self.lung_masks), ("mask", self.lesion_masks)):
            if paths is not None:
                found = paths[i] is not None
                masks[key] = read_mask(self.root / paths[i], image.shape) if found else np.zeros(image.shape, np.uint8)
        out = self.transform(image=image, masks=list(masks.values())) if masks else self.transform(image=image)
        image = torch.from_numpy(np.clip(out["image"], 0.0, 1.0)).float()[None]
        masks = {k: torch.from_numpy(np.asarray(m)).float()[None] for k, m in zip(masks, out.get("masks", []))}
        sample = {
            "image": to_model_range(image),
            "prompt": self.prompt(i, rng),
            "label": torch.from_numpy(self.labels[i]),
            "mask": torch.zeros_like(image),
            "id": self.ids[i],
            **masks,
        }
        if self.lesion_masks is not None:
            sample["has_mask"] = self.lesion_masks[i] is not None
        if self.label_mask is not None:
            sample["label_mask"] = torch.from_numpy(self.label_mask[i])
        return sample
