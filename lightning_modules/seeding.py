"""Per-image random generators: an image's noise depends on its id and the seed only, never on the batch it is in,
the order of the data or the DDP rank that draws it."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch


def image_generators(ids: Sequence[str], seed: int) -> list[torch.Generator]:
    """One generator per image, seeded by its id: the same noise whatever the batch, the order or the DDP rank."""
    return [torch.Generator("cpu").manual_seed(seed + zlib.crc32(i.encode())) for i in ids]
