"""Every config composes, and every data/model/trainer choice instantiates what it names."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from configs import CONFIG_DIR, ConfigError, choices, compose, instantiate

ENTRY_POINTS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("group", ["data", "model", "trainer", "experiment"])
def test_every_group_choice_composes_with_every_entry_point(name, group):
    for choice in choices(group):
        cfg = compose(name, [f"{group}={choice}"])
        assert cfg[group] == choice if group == "experiment" else cfg[group].name == choice


@pytest.mark.parametrize("choice", choices("data"))
def test_every_data_config_names_a_datamodule_with_matching_arguments(choice):
    cfg = compose("train", [f"data={choice}"]).data
    module_name, attr = cfg._target_.rsplit(".", 1)
    cls = getattr(__import__(module_name, fromlist=[attr]), attr)
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in cfg if k not in ("_target_", "name") and k not in accepted]
    assert not unknown, f"{choice}: {cls.__name__} takes no {unknown}"
    assert "image_size" in cfg


@pytest.mark.parametrize("choice", choices("data"))
def test_smoke_experiment_composes_with_every_data_config(choice):
    assert compose("train", ["experiment=smoke", f"data={choice}"]).data.batch_size == 8


def test_synthetic_data_instantiates():
    dm = instantiate(compose("train", ["experiment=smoke"]).data)
    dm.setup("fit")
    assert len(dm.dataset("train")) == dm.hparams.num_train
    assert next(iter(dm.train_dataloader()))["image"].shape == (8, 1, 64, 64)


@pytest.mark.parametrize("model", choices("model"))
def test_every_model_config_builds_its_networks(model):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = compose("train", [f"model={model}"]).model
    AutoencoderKL(**OmegaConf.to_container(cfg.autoencoder.network))
    UNet2DConditionModel(**OmegaConf.to_container(cfg.unet), cross_attention_dim=384)


@pytest.mark.parametrize("trainer", choices("trainer"))
def test_every_trainer_config_is_valid_trainer_arguments(trainer):
    import lightning as L

    cfg = OmegaConf.to_container(compose("train", [f"trainer={trainer}"]).trainer)
    cfg.pop("name")
    accepted = inspect.signature(L.Trainer.__init__).parameters
    assert not [k for k in cfg if k not in accepted]


def test_overrides_apply_and_experiment_shrinks():
    cfg = compose("train", ["experiment=smoke", "trainer.max_steps=100", "model.unet.block_out_channels=[64,128]"])
    assert cfg.trainer.max_steps == 100 and list(cfg.model.unet.block_out_channels) == [64, 128]
    assert cfg.data.batch_size == 8 and cfg.experiment == "smoke"


@pytest.mark.parametrize("override, message", [
    ("data=imagenet", "unknown data 'imagenet'; valid choices: .*synthetic"),
    ("experiment=nope", "unknown experiment 'nope'; valid choices: .*smoke"),
    ("model.unet.channelz=3", "unknown key 'model.unet.channelz'; valid keys at 'model.unet': .*block_out_channels"),
    ("learning_rate=1", "unknown key 'learning_rate'; valid keys at the top level"),
    ("seed", "not of the form key=value"),
])
def test_unknown_choices_and_keys_name_the_valid_ones(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("train", [override])
