"""Tests run what users run, shrunk: the real configs with ``experiment=smoke``, tiny networks, a few steps, on CPU.

Shared fixtures. The session ones (``tiny_vae_dir``, ``tiny_ldm``, ``tiny_pipeline``) are read-only: a test that
changes a model (training mode, weights, EMA, caches, hyper-parameters, compilation, monkeypatched methods) asks for
its own with ``make_tiny_ldm()``, so no result depends on which tests ran before. ``_session_models_unchanged``
checks it after every test that uses the shared model. Helpers shared by several files live in ``tests/helpers.py``.

Markers (setup.cfg): ``slow`` (roughly > 10 s on 2 cores: training runs, compilation, 2-process DDP; ``make
test-fast`` leaves them out) and ``ddp`` (spawns 2 gloo processes).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from configs import compose  # noqa: E402
from tests.helpers import SMOKE, build_tiny_ldm, model_fingerprint, pipeline_of, smoke_config  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _torch_threads():
    """Two cores on CI: keep every test on one thread pool size so timings and results are stable."""
    torch.set_num_threads(2)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> str:
    """An (untrained) smoke-sized 1-channel VAE exported in diffusers format, as stage 1 exports it."""
    cfg = compose("train_autoencoder", SMOKE)
    torch.manual_seed(0)
    vae = AutoencoderKL(**OmegaConf.to_container(cfg.model.autoencoder.network))
    vae.register_to_config(scaling_factor=1.0)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_ldm(tiny_vae_dir):
    """A smoke-sized LatentDiffusionModule (random UNet) on the tiny VAE and the offline MiniLM, in eval mode.
    Shared by the whole session: read it, never change it (``make_tiny_ldm`` gives a module of one's own)."""
    return build_tiny_ldm(tiny_vae_dir)


@pytest.fixture
def make_tiny_ldm(tiny_vae_dir):
    """A factory of fresh smoke-sized modules, ``make_tiny_ldm(**module_arguments)``: the same weights as
    ``tiny_ldm`` (unless the arguments change the network), free to train, patch or compile."""
    return lambda **overrides: build_tiny_ldm(tiny_vae_dir, **overrides)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_ldm):
    """The LatentDiffusionPipeline on ``tiny_ldm``'s parts (eager; read-only as ``tiny_ldm``)."""
    return pipeline_of(tiny_ldm)


@pytest.fixture(autouse=True)
def _session_models_unchanged(request):
    """A test that uses the shared ``tiny_ldm`` (directly or through ``tiny_pipeline``) must leave it as it found it."""
    if "tiny_ldm" not in request.fixturenames:
        yield
        return
    module = request.getfixturevalue("tiny_ldm")
    before = model_fingerprint(module)
    yield
    after = model_fingerprint(module)
    changed = sorted(key for key in before if before[key] != after[key])
    assert not changed, (
        f"{request.node.nodeid} changed the session fixture tiny_ldm ({', '.join(changed)}): "
        "use make_tiny_ldm() for a module of the test's own"
    )
