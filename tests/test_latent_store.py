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


def test_augmentation_and_a_store_are_refused_together(tiny_vae_dir, tmp_path):
    cfg = compose("train", [*SMOKE, f"log_dir={tmp_path}", "latent_store.enabled=true"])
    dm = _data()
    dm.has_random_augmentation = True
    with pytest.raises(ValueError, match="augmentations change the pixels every epoch"):
        latent_store(cfg, dm, load_vae(tiny_vae_dir))
    with pytest.raises(ValueError, match="make encode-latents"):  # several ranks: the store must exist first
        latent_store(cfg, _data(), load_vae(tiny_vae_dir), write=False)


@pytest.mark.slow
def test_two_processes_write_the_store_one_process_writes(tiny_vae_dir, tmp_path):
    """`make encode-latents GPUS=2 ACCELERATOR=cpu`: 2 DDP ranks over gloo, each its shard; the same rows by id."""
    common = [
        sys.executable,
        "experiments/encode_latents.py",
        *SMOKE,
        f"model.vae.path={tiny_vae_dir}",
        "data.num_train=7",
        "data.num_val=3",
    ]
    subprocess.run([*common, f"log_dir={tmp_path / 'one'}"], cwd=ROOT, check=True, capture_output=True)
    two = [*common, f"log_dir={tmp_path / 'two'}", "trainer.devices=2", "trainer.strategy=ddp"]
    subprocess.run(two, cwd=ROOT, check=True, capture_output=True)
    one, two = (LatentStore(next((tmp_path / run / "latents").iterdir())) for run in ("one", "two"))
    assert len(one.means) == 1 and len(two.means) == 2 and one.rows.keys() == two.rows.keys()
    assert sum(len(m) for m in two.means) == 10  # no image twice, none missing
    ids = sorted(one.rows)
    for a, b in zip(one.get(ids), two.get(ids), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
