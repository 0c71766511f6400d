"""The latent store (lightning_modules/latent_store.py): the posterior on disk equals the encoder's, bit for bit, in
one process or two; its folder changes with the VAE and the pixels; training reads it instead of encoding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from configs import compose
from datamodules.synthetic import SyntheticCXRDataModule
from experiments import encode_latents
from lightning_modules.checkpoints import frozen_fingerprint
from lightning_modules.latent_store import LatentStore, encode, files_signature, store_path
from lightning_modules.runs.training import latent_store
from lightning_modules.vae import load_vae, posterior
from tests.helpers import SMOKE

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CPU = {"accelerator": "cpu", "devices": 1}


def _data(**kwargs) -> SyntheticCXRDataModule:
    return SyntheticCXRDataModule(num_train=6, num_val=3, num_test=2, batch_size=4, **kwargs)


def test_the_store_holds_each_images_posterior_bit_for_bit_and_the_cache_agrees(tiny_vae_dir, make_tiny_ldm, tmp_path):
    vae, dm = load_vae(tiny_vae_dir), _data()
    store = LatentStore(encode(tmp_path / "store", vae, dm, CPU))
    assert len(store) == 9  # train and val
    images = [dm.dataset("val")[i] for i in range(3)]
    mean, std = store.get([image["id"] for image in images])
    for i, image in enumerate(images):
        dist = posterior(vae, image["image"][None])
        assert torch.equal(mean[i], dist.mean[0]) and torch.equal(std[i], dist.std[0])
    module = make_tiny_ldm()  # the in-memory cache encodes one image at a time too: the same bits
    batch = {"image": torch.stack([i["image"] for i in images]), "id": [i["id"] for i in images]}
    cached = module.latents(batch, sample=False)
    module.latent_store = store
    assert torch.equal(module.latents(batch, sample=False), cached)
    with pytest.raises(KeyError, match="test-000000 .* not in the latent store"):
        store.get(["test-000000"])


def test_the_folder_changes_with_the_vae_and_the_pixels_only(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    data = OmegaConf.to_container(compose("train", SMOKE).data, resolve=True)
    key = frozen_fingerprint(vae=vae)["vae"]
    assert store_path("r", key, data) == store_path("r", key, {**data, "batch_size": 3, "num_workers": 2})
    assert store_path("r", key, data) != store_path("r", key, {**data, "image_size": 32})
    torch.nn.init.zeros_(next(vae.parameters()))  # a retrained VAE
    assert store_path("r", frozen_fingerprint(vae=vae)["vae"], data) != store_path("r", key, data)


def test_images_changed_on_disk_make_another_store(tmp_path):
    from datamodules.csv_folder import CSVDataModule
    from tests.fixtures_real_data import encode, gray, make_csv_tree, write

    root = make_csv_tree(tmp_path)
    csv = lambda: CSVDataModule(str(root), image_size=8, split_column="split")  # noqa: E731
    before = files_signature(csv())
    assert files_signature(csv()) == before
    write(root / "p1" / "a.png", encode(gray(30, 30, seed=9)))  # re-exported at the same path
    assert files_signature(csv()) != before


def test_with_the_store_the_train_split_serves_no_pixels_and_never_opens_a_file(tmp_path, monkeypatch):
    """The same prompt, label and id as with pixels; an image the store lacks is skipped as a bad file."""
    import datamodules.images
    from datamodules.csv_folder import CSVDataModule
    from tests.fixtures_real_data import make_csv_tree

    data = CSVDataModule(str(make_csv_tree(tmp_path)), image_size=8, split_column="split")
    dataset = data.dataset("train")
    with_pixels = [dataset[i] for i in range(len(dataset))]
    assert all("image" in sample for sample in with_pixels)
    absent = dataset.ids[0]
    dataset.without_pixels(set(dataset.ids) - {absent})
    monkeypatch.setattr(datamodules.images, "read_gray", lambda *a, **k: pytest.fail("a file was opened"))
    served = [dataset[i] for i in range(len(dataset))]
    assert [s["id"] for s in served] == [dataset.ids[1], *dataset.ids[1:]]  # index 0 serves the next sample
    for sample, full in zip(served[1:], with_pixels[1:], strict=True):
        assert set(sample) == {"prompt", "label", "id"}
        assert sample["prompt"] == full["prompt"] and torch.equal(sample["label"], full["label"])


def test_synthetic_without_pixels_renders_nothing_and_agrees():
    dataset = _data().dataset("train")
    full = [dataset[i] for i in range(len(dataset))]
    with pytest.raises(ValueError, match="the latent store lacks 1 phantoms"):
        dataset.without_pixels({s["id"] for s in full[1:]})
    dataset.without_pixels({s["id"] for s in full})
    for i, sample in enumerate(full):
        assert dataset[i].keys() == {"prompt", "label", "id"} and dataset[i]["prompt"] == sample["prompt"]
        assert torch.equal(dataset[i]["label"], sample["label"]) and dataset[i]["id"] == sample["id"]


def test_a_store_being_written_is_not_written_by_a_second_run(tmp_path):
    from lightning_modules.latent_store import writing_lock

    path = tmp_path / "store"
    holder = [
        sys.executable,
        "-c",
        f"from pathlib import Path; from lightning_modules.latent_store import writing_lock; import time\n"
        f"with writing_lock(Path({str(path)!r})):\n    print('held', flush=True); time.sleep(60)",
    ]
    other = subprocess.Popen(holder, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"another run .*pid {other.pid}.* is writing the latent store"):
            with writing_lock(path):
                pass
    finally:
        other.kill()
        other.wait()
    with writing_lock(path):  # its holder is gone: the kernel released the lock
        pass


def test_augmentation_and_a_store_are_refused_together(tiny_vae_dir, tmp_path):
    cfg = compose("train", [*SMOKE, f"log_dir={tmp_path}", "latent_store.enabled=true"])
    dm = _data()
    dm.has_random_augmentation = True
    with pytest.raises(ValueError, match="augmentations change the pixels every epoch"):
        latent_store(cfg, dm, load_vae(tiny_vae_dir))
    path = latent_store(cfg, _data(), load_vae(tiny_vae_dir), write=False)  # several ranks write it as they start
    assert not LatentStore.complete(path)


def _store_args(vae_dir: str) -> list[str]:
    """The arguments of `make encode-latents` / `make train` for a 7 + 3 image store."""
    return [*SMOKE, f"model.vae.path={vae_dir}", "data.num_train=7", "data.num_val=3"]


@pytest.fixture(scope="module")
def one_process_store(tiny_vae_dir, tmp_path_factory) -> LatentStore:
    """`make encode-latents` on one process, run in this one (a fresh interpreter's imports cost ~15 s): the
    reference the 2-process stores must equal row for row."""
    path = encode_latents.main([*_store_args(tiny_vae_dir), f"log_dir={tmp_path_factory.mktemp('one')}"])
    store = LatentStore(path)
    assert len(store.means) == 1 and len(store) == 10
    return store


def _same_rows(one: LatentStore, two: LatentStore) -> None:
    assert len(two.means) == 2 and one.rows.keys() == two.rows.keys()
    assert sum(len(m) for m in two.means) == 10  # no image twice, none missing
    ids = sorted(one.rows)
    for a, b in zip(one.get(ids), two.get(ids), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
def test_a_ddp_fit_writes_its_missing_store_on_every_rank_and_trains_from_it(tiny_vae_dir, one_process_store, tmp_path):
    """`make train GPUS=2 ACCELERATOR=cpu ARGS=latent_store.enabled=true` with no store yet: the 2 ranks encode their
    shards as the fit starts (the shards `make encode-latents` would write), then train from it."""
    two = [
        sys.executable,
        "experiments/train.py",
        *_store_args(tiny_vae_dir),
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "latent_store.enabled=true",
        f"log_dir={tmp_path}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    done = subprocess.run(two, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_rows(one_process_store, LatentStore(next(p for p in (tmp_path / "latents").iterdir() if p.is_dir())))
    assert (tmp_path / "ldm" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_two_processes_write_the_store_one_process_writes(tiny_vae_dir, one_process_store, tmp_path):
    """`make encode-latents GPUS=2 ACCELERATOR=cpu`: 2 DDP ranks over gloo, each its shard; the same rows by id."""
    two = [
        sys.executable,
        "experiments/encode_latents.py",
        *_store_args(tiny_vae_dir),
        f"log_dir={tmp_path}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    subprocess.run(two, cwd=ROOT, check=True, capture_output=True)
    _same_rows(one_process_store, LatentStore(next(p for p in (tmp_path / "latents").iterdir() if p.is_dir())))
