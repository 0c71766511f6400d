"""Stage 1's posterior (mean and std) of every training and validation image, encoded once to disk and read
memory-mapped by every rank of every later run.

The in-memory cache (``model.cache_latents``) is rebuilt by each run and grows on each rank with the dataset
(CheXpert at 32x32x4: about 7 GB of mean and std per rank). The store is written once by ``Trainer.predict``: each
rank encodes its contiguous share one image at a time (so an image's latent has the same bits whatever the number of
processes, and equals the in-memory cache's) into its own shard; ``meta.json``, written last, marks the store
complete. Its folder is named by a hash of the VAE's fingerprint and of the data settings that change pixels, so a
changed VAE, image size or transform finds another, empty store, never a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from lightning_modules.components import vae_scale_factor
from lightning_modules.vae import posterior

#: data settings that never change a pixel: a store is shared across them
NOT_PIXELS = ("batch_size", "eval_batch_size", "num_workers", "scan", "on_bad_file", "random_prompt", "prompt_bank")
#: the splits a stage-2 run encodes (training loss and validation loss)
SPLITS = ("train", "val")


#: raised when the code that turns files into pixels changes (decoding, resizing, intensity): older stores go stale
PIPELINE_VERSION = 1


def store_path(root: str | Path, vae_fingerprint: str, data: dict, files: str = "") -> Path:
    """``root/<hash of the VAE fingerprint, the pixel-changing data settings, the files and the pixel code>``."""
    pixels = {k: v for k, v in sorted(data.items()) if k not in NOT_PIXELS}
    signature = {"vae": vae_fingerprint, "splits": SPLITS, "data": pixels, "files": files, "code": PIPELINE_VERSION}
    return Path(root) / hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_signature(datamodule) -> str:
    """A hash of every stored image's id, size and modification time: images re-exported at the same paths make
    another store. Generated data (no files) is described by its settings and length alone."""
    digest = hashlib.sha256()
    for split in SPLITS:
        dataset = datamodule.dataset(split)
        root, ids = getattr(dataset, "root", None), getattr(dataset, "ids", None)
        digest.update(f"{split}:{len(dataset)}\n".encode())
        for key in ids if root is not None and ids is not None else ():
            try:
                stat = (Path(root) / key).stat()
                digest.update(f"{key}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{key}\0missing\n".encode())
    return digest.hexdigest()[:16]


class LatentStore:
    """A complete store, memory-mapped: ``get(ids)`` copies just those rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.means = [np.load(self.path / shard["mean"], mmap_mode="r") for shard in meta["shards"]]
        self.stds = [np.load(self.path / shard["std"], mmap_mode="r") for shard in meta["shards"]]
        self.rows: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(meta["shards"]):
            ids = json.loads((self.path / shard["ids"]).read_text())
            self.rows.update({key: (s, row) for row, key in enumerate(ids)})

    @staticmethod
    def complete(path: str | Path) -> bool:
        return (Path(path) / "meta.json").is_file()

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) posterior mean and std of ``ids``."""
        missing = [key for key in ids if key not in self.rows]
        if missing:
            raise KeyError(
                f"{missing[0]} (and {len(missing) - 1} more) not in the latent store {self.path}: it was written "
                "for other data; delete the folder to encode it again"
            )
        where = [self.rows[key] for key in ids]
        mean = np.stack([self.means[s][row] for s, row in where])
        std = np.stack([self.stds[s][row] for s, row in where])
        return torch.from_numpy(mean), torch.from_numpy(std)


def shard(length: int, num_replicas: int, rank: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``range(length)``, unpadded: every image is encoded exactly once."""
    return np.array_split(np.arange(length), num_replicas)[rank].tolist()


class ShardSampler(DistributedSampler):
    """``shard`` as a sampler (a DistributedSampler, so Lightning does not put its own, padded one in its place)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = shard(len(dataset), num_replicas, rank)
        self.num_samples = len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class LatentEncoder(L.LightningModule):
    """The frozen VAE as a predictor: one image at a time, so that a latent never depends on its batch-mates."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae.eval()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        mean, std = encode_batch(self.vae, batch["image"])
        return {"id": list(batch["id"]), "mean": mean, "std": std}


class Shard:
    """One rank's shard: ``mean``/``std`` rows in memory-mapped ``.npy.part`` files, renamed when ``close``d, and its
    ids; a shard is whole or absent."""

    def __init__(self, path: Path, shape: tuple[int, int, int], rank: int, count: int):
        self.path, self.rank, self.count, self.ids = path, rank, count, []
        self.names = {k: f"{k}-{rank:03d}.npy" for k in ("mean", "std")}
        self.arrays = {
            k: np.lib.format.open_memmap(path / f"{name}.part", "w+", np.float32, (count, *shape))
            for k, name in self.names.items()
        }

    def write(self, ids: Sequence[str], mean: torch.Tensor, std: torch.Tensor) -> None:
        rows = slice(len(self.ids), len(self.ids) + len(ids))
        self.arrays["mean"][rows], self.arrays["std"][rows] = mean.numpy(), std.numpy()
        self.ids.extend(ids)

    def close(self) -> None:
        if len(self.ids) != self.count:
            raise RuntimeError(f"rank {self.rank} encoded {len(self.ids)} images for a shard of {self.count}")
        for key, array in self.arrays.items():
            array.flush()
            os.replace(self.path / f"{self.names[key]}.part", self.path / self.names[key])
        (self.path / f"ids-{self.rank:03d}.json").write_text(json.dumps(self.ids))


def write_meta(path: Path, world_size: int, shape: tuple[int, int, int]) -> None:
    """``meta.json``, last, once every shard is closed: the store is complete."""
    shards = [
        {"mean": f"mean-{r:03d}.npy", "std": f"std-{r:03d}.npy", "ids": f"ids-{r:03d}.json"} for r in range(world_size)
    ]
    (path / "meta.json.part").write_text(json.dumps({"shape": list(shape), "shards": shards}, indent=1))
    os.replace(path / "meta.json.part", path / "meta.json")


@torch.no_grad()
def encode_batch(vae: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) -> posterior mean and std on the CPU, one image at a time (bits independent of batch-mates)."""
    dists = [posterior(vae, image[None]) for image in images]
    return torch.cat([d.mean for d in dists]).float().cpu(), torch.cat([d.std for d in dists]).float().cpu()


def latent_shape(vae: torch.nn.Module, image_size: int) -> tuple[int, int, int]:
    return (vae.config.latent_channels, *(image_size // vae_scale_factor(vae),) * 2)


class ShardWriter(BasePredictionWriter):
    """Each rank writes its rows into its own shard as batches come; rank zero writes ``meta.json`` after every
    rank has finished."""

    def __init__(self, path: Path, shape: tuple[int, int, int]):
        super().__init__(write_interval="batch")
        self.path, self.shape = path, shape

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        count = len(shard(len(trainer.predict_dataloaders.dataset), trainer.world_size, rank))
        self.shard = Shard(self.path, self.shape, rank, count)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.shard.write(prediction["id"], prediction["mean"], prediction["std"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shard.close()
        trainer.strategy.barrier("latent store shards")
        if trainer.is_global_zero:
            write_meta(self.path, trainer.world_size, self.shape)


class StoreWriter(L.Callback):
    """A DDP fit whose store is missing writes it as it starts: in ``setup`` (the process group exists, no data has
    loaded yet) every rank encodes its share into its shard, rank zero writes ``meta.json``, and every rank then
    trains from the store. The same shards as ``make encode-latents`` on as many devices."""

    def __init__(self, path: Path, datamodule):
        self.path, self.datamodule = path, datamodule

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        with writing_lock(self.path):
            if not LatentStore.complete(self.path):  # every rank sees the same: none has written yet
                self.encode(trainer, pl_module.vae)
        attach(pl_module, self.datamodule, self.path)

    def encode(self, trainer: L.Trainer, vae: torch.nn.Module) -> None:
        data, rank, world = self.datamodule, trainer.global_rank, trainer.world_size
        self.path.mkdir(parents=True, exist_ok=True)
        splits = ConcatDataset([data.dataset(s) for s in SPLITS])
        indices = shard(len(splits), world, rank)
        shape = latent_shape(vae, data.image_size)
        out = Shard(self.path, shape, rank, len(indices))
        vae = vae.to(trainer.strategy.root_device).eval()
        for batch in DataLoader(Subset(splits, indices), batch_size=data.eval_batch_size, num_workers=data.num_workers):
            out.write(list(batch["id"]), *encode_batch(vae, batch["image"].to(vae.device)))
        out.close()
        trainer.strategy.barrier("latent store shards")
        if trainer.is_global_zero:
            write_meta(self.path, world, shape)
        trainer.strategy.barrier("latent store complete")


def attach(module: L.LightningModule, datamodule, path: Path) -> None:
    """Stage 2 reads its latents from the store at ``path``; the training split then serves no pixels."""
    module.latent_store = LatentStore(path)
    datamodule.stored_ids = set(module.latent_store.rows)


class _Splits(L.LightningDataModule):
    """The splits a store holds, served to ``predict`` in rank shards (known only once the trainer runs)."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int):
        super().__init__()
        self.data, self.batch_size, self.num_workers = dataset, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardSampler(self.data, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(self.data, sampler=sampler, batch_size=self.batch_size, num_workers=self.num_workers)


@contextlib.contextmanager
def writing_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<store>.lock`` while the store is written, taken by the launching process (the
    other ranks of its run start later, or are not rank zero): a second run asked to write the same store is refused,
    not let to write the same files. The kernel releases the lock when its holder dies, so none goes stale."""
    if rank_zero_only.rank != 0 or os.environ.get("NODE_RANK", "0") not in ("", "0"):
        yield
        return
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise ValueError(
                f"another run ({fh.read().strip() or 'starting'}) is writing the latent store {path}: wait for it to "
                "finish, then start this one"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{socket.gethostname()} pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def encode(path: Path, vae: torch.nn.Module, datamodule, trainer_args: dict) -> Path:
    """Write the store of ``datamodule``'s train and val splits at ``path`` with a predict-only Trainer built from
    ``trainer_args`` (accelerator, devices, strategy, num_nodes: every rank encodes its share), under
    ``writing_lock``."""
    with writing_lock(path):
        if LatentStore.complete(path):  # written by the run that held the lock before us
            return path
        return _encode(path, vae, datamodule, trainer_args)


def _encode(path: Path, vae: torch.nn.Module, datamodule, trainer_args: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shape = latent_shape(vae, datamodule.image_size)
    splits = _Splits(
        ConcatDataset([datamodule.dataset(s) for s in SPLITS]), datamodule.eval_batch_size, datamodule.num_workers
    )
    trainer = L.Trainer(
        **trainer_args,
        precision="32-true",  # the store holds what the fp32 VAE gives, whatever the training precision
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ShardWriter(path, shape)],
    )
    trainer.predict(LatentEncoder(vae), datamodule=splits, return_predictions=False)
    return path
