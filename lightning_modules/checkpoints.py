"""Checkpoints that say what they are, are written whole or not at all, and are read without executing code.

* ``read_checkpoint(path, kind)``: ``torch.load(weights_only=True)`` with one clear ``CheckpointError`` for a missing,
  empty, truncated or foreign file, a refused pickle, or a checkpoint of another kind (stage 1, classifier, stage 2).
* ``frozen_fingerprint``: stage-2 checkpoints record a hash of the frozen VAE and prompt encoder they were trained
  with; sampling refuses other ones unless told to go on (retraining stage 1 into the same folder would otherwise
  leave every stage-2 checkpoint decoding through a VAE it never saw).
* ``AtomicCheckpointIO``: a checkpoint goes to a temporary file in the same folder and is renamed over the old one
  only once complete, so a full disk or a kill leaves the previous checkpoint intact.
* ``newest_readable``: what ``ckpt_path=last`` falls back to when ``last.ckpt`` is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("vald")

#: the kinds of checkpoint, each recognised by a hyper-parameter only it has
KINDS = {
    "stage-1 autoencoder": "kl_weight",
    "finding classifier": "finding_names",
    "stage-2 latent diffusion": "unet",
}
#: where a checkpoint of each kind comes from, for the message when another kind is given
MAKERS = {
    "stage-1 autoencoder": "make train-autoencoder (logs/autoencoder/checkpoints/)",
    "finding classifier": "make train-classifier (logs/classifier/checkpoints/)",
    "stage-2 latent diffusion": "make train (logs/ldm/checkpoints/)",
}


class CheckpointError(ValueError):
    """A checkpoint the user gave cannot be used: the message says why and what to give instead."""


def read_checkpoint(
    path: str | Path, kind: str | None = None, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """A Lightning checkpoint of ``kind`` (a key of ``KINDS``; None: any), loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        want = f": train one with {MAKERS[kind]}" if kind else ""
        raise CheckpointError(f"checkpoint: no file at {path}{want}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted write?): give another checkpoint")
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy format cannot be memory-mapped
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load's errors for a file that is not a checkpoint vary by format and version
        refused = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if refused:  # weights_only blocked an import: loading it would run code
            raise CheckpointError(
                f"checkpoint {path} refused: loading it would import {refused.group(1)} (code, not weights); "
                "VALD loads tensors and plain data only"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch checkpoint (truncated, or another format: "
            f"{type(err).__name__}): give a complete .ckpt file"
        ) from None
    found = checkpoint_kind(checkpoint)
    if found is None:
        raise CheckpointError(
            f"checkpoint {path} is not a VALD Lightning checkpoint (no hyper-parameters naming a stage): "
            f"give one written by {MAKERS[kind] if kind else 'make train*'}"
        )
    if kind is not None and found != kind:
        raise CheckpointError(f"checkpoint {path} is a {found} checkpoint, not a {kind} one: give {MAKERS[kind]}")
    return checkpoint


def checkpoint_kind(checkpoint: Any) -> str | None:
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        return None
    return next((kind for kind, key in KINDS.items() if key in hparams), None)


def read_hparams(path: str | Path, kind: str | None = None) -> dict:
    """A checkpoint's hyper-parameters without reading its weights into memory."""
    return read_checkpoint(path, kind, mmap=True)["hyper_parameters"]


# ------------------------------------------------------------------------------------------- frozen fingerprint


def frozen_fingerprint(**modules: torch.nn.Module) -> dict[str, str]:
    """name -> sha256 of the module's config (if it has one) and every tensor of its state dict, in key order."""
    prints = {}
    for name, module in modules.items():
        digest = hashlib.sha256()
        config = getattr(module, "config", None)
        if config is not None:
            digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
        for key, tensor in module.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        prints[name] = digest.hexdigest()[:16]
    return prints


def check_frozen(path: str | Path, recorded: dict[str, str] | None, current: dict[str, str], allow: bool) -> None:
    """Refuse (or with ``allow``, warn) when the frozen parts loaded now differ from those stage 2 trained with."""
    if not recorded:
        log.warning("checkpoint %s records no fingerprint of its frozen VAE and prompt encoder: not checked", path)
        return
    changed = sorted(name for name in current if recorded.get(name) != current[name])
    if not changed:
        return
    message = (
        f"checkpoint {path} was trained with another {' and '.join(changed)} than the one at its recorded path "
        f"(retrained or replaced since): its samples would decode wrongly. Retrain stage 2, or set "
        f"allow_frozen_mismatch=true to go on anyway"
    )
    if not allow:
        raise CheckpointError(message)
    log.warning("%s (going on: allow_frozen_mismatch=true)", message)


# ------------------------------------------------------------------------------------------- writing and resuming


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<name>.tmp-<pid>`` in the same folder, flush to disk, then rename over ``<name>``: readers see the
    old checkpoint or the new one, never half of one."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any | None = None) -> None:
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(partial, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def newest_readable(folder: str | Path, preferred: str = "last.ckpt") -> Path | None:
    """``preferred`` if it loads, else the newest other ``*.ckpt`` in ``folder`` that does (with a warning)."""
    folder = Path(folder)
    candidates = [folder / preferred] + sorted(
        (p for p in folder.glob("*.ckpt") if p.name != preferred), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            read_checkpoint(candidate, mmap=True)
        except CheckpointError as err:
            log.warning("skipping %s", err)
            continue
        if candidate.name != preferred:
            log.warning("%s is missing or unreadable: resuming from %s instead", folder / preferred, candidate)
        return candidate
    return None
