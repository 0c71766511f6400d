"""Every config composes and instantiates: each entry point (configs/*.yaml) with every data, model and trainer choice
that applies builds its datamodule, modules, trainer, callbacks and settings objects, so a bad YAML value fails here
and not in the middle of a run. Shrunk by ``experiment=smoke``; nothing is trained."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf

from configs import CONFIG_DIR, ConfigError, choices, compose, instantiate
from datamodules.base import CXRDataModule
from tests.fixtures_real_data import make_chexpert_tree, make_covid_tree, make_csv_tree, make_mimic_tree
from tests.helpers import SMOKE

ENTRY_POINTS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
#: entry points with data, model and trainer groups (they train, or time training)
TRAINING = ("benchmark", "train", "train_autoencoder", "train_classifier")
#: entry points with a data group only: the model comes with a checkpoint
SAMPLING = ("attribution", "evaluate", "induction")
#: entry points that run other scripts in their own processes, or serve (the web app)
STANDALONE = ("app", "reproducibility")
#: the model each YAML's settings default to when it names none (a stage-2 checkpoint stores model.sampling)
CHECKPOINT_SAMPLING = compose("train").model.sampling
#: `experiment=smoke` shrinks the CPU model's widths as lists whose length is the CPU model's depth; the GPU model
#: has more levels, so it is shrunk to the same widths at its own depth
SHRINK = {
    "cpu": [],
    "gpu": ["model.autoencoder.network.block_out_channels=[8,8,8,8]", "model.unet.block_out_channels=[32,32,32]"],
}


def test_every_entry_point_is_tested():
    assert sorted((*TRAINING, *SAMPLING, *STANDALONE)) == ENTRY_POINTS


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("group", ["data", "model", "trainer", "experiment"])
def test_every_group_choice_composes_with_every_entry_point(name, group):
    for choice in choices(group):
        cfg = compose(name, [f"{group}={choice}"])
        assert cfg[group] == choice if group == "experiment" else cfg[group].name == choice


@pytest.mark.parametrize("choice", choices("data"))
def test_smoke_experiment_composes_with_every_data_config(choice):
    assert compose("train", ["experiment=smoke", f"data={choice}"]).data.batch_size == 8


# ---- data -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, list[str]]:
    """The overrides that point each data config at a dataset on disk (small copies of the real layouts)."""
    base = tmp_path_factory.mktemp("datasets")
    return {
        "synthetic": [],
        "covid_radiography": [f"data.root={make_covid_tree(base)}"],
        "chexpert": [f"data.root={make_chexpert_tree(base)}"],
        "csv": [f"data.root={make_csv_tree(base)}", "data.split_column=split", "data.prompt_column=report"],
        "mimic_cxr": [f"data.{k}={v}" for k, v in zip(("root", "reports_root"), make_mimic_tree(base), strict=True)],
    }


@pytest.mark.parametrize("data", choices("data"))
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_instantiates_every_data_choice(name, data, data_roots):
    cfg = compose(name, [*SMOKE, f"data={data}", *data_roots[data]])
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, CXRDataModule) and datamodule.image_size == cfg.data.image_size
    assert datamodule.batch_size == cfg.data.batch_size
    split = cfg.get("split") or "train"  # the split the script reads; training reads train (and val)
    dataset = datamodule.dataset(split)
    sample = dataset[0]
    assert len(dataset) > 0 and sample["image"].shape == (1, cfg.data.image_size, cfg.data.image_size)
    assert isinstance(sample["prompt"], str) and sample["prompt"]
    assert datamodule.normal_prompt and len(datamodule.finding_names) > 0


# ---- model ------------------------------------------------------------------------------------------------------
def _training_config(name: str, tmp_path, *overrides: str) -> DictConfig:
    where = f"output_dir={tmp_path}" if name == "benchmark" else f"log_dir={tmp_path}"
    return compose(name, [*SMOKE, where, *overrides])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("model", choices("model"))
@pytest.mark.parametrize("name", TRAINING)
def test_every_training_entry_point_instantiates_every_model_choice(name, model, tmp_path):
    """The modules each script builds, run once forward on a batch of the data (no step is trained)."""
    from lightning_modules.autoencoder import AutoencoderModule
    from lightning_modules.classifier import FindingClassifier
    from lightning_modules.runs.training import build_latent_diffusion

    cfg = _training_config(name, tmp_path, f"model={model}", *SHRINK[model])
    datamodule = instantiate(cfg.data)
    batch = next(iter(torch.utils.data.DataLoader(datamodule.dataset("train"), batch_size=2)))
    size = cfg.data.image_size
    if name == "train_autoencoder":
        module = AutoencoderModule(**OmegaConf.to_container(cfg.model.autoencoder), total_steps=cfg.trainer.max_steps)
        assert module.reconstruct(batch["image"]).shape == (2, 1, size, size)
    elif name == "train_classifier":
        module = FindingClassifier(
            finding_names=list(datamodule.finding_names),
            total_steps=cfg.trainer.max_steps,
            **OmegaConf.to_container(cfg.model.classifier),
        )
        assert module.eval()(batch["image"]).shape == (2, len(datamodule.finding_names) + 1)
    else:  # stage 2, on a VAE exported from this model config's autoencoder (as stage 1 would export it)
        vae = AutoencoderKL(**OmegaConf.to_container(cfg.model.autoencoder.network))
        vae.save_pretrained(tmp_path / "vae")
        module = build_latent_diffusion(cfg, datamodule, vae={"path": str(tmp_path / "vae")}).eval()
        factor = 2 ** (len(cfg.model.autoencoder.network.block_out_channels) - 1)
        assert module.unet.config.sample_size == size // factor
        assert module.hparams.sampling["normal_prompt"] == datamodule.normal_prompt
        with torch.no_grad():
            latents = module.latents(batch, sample=False)
            assert latents.shape == (2, module.vae.config.latent_channels, size // factor, size // factor)
            loss = module._common_step(batch, "val")
        assert math.isfinite(loss.item())
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) > 0
    module.configure_optimizers()  # the optimizer block is valid AdamW + schedule arguments


@pytest.mark.parametrize("model", [pytest.param("cpu"), pytest.param("gpu", marks=pytest.mark.slow)])
def test_every_model_config_builds_its_full_size_networks(model):
    """The unshrunk networks (a 100M-parameter UNet for model=gpu) fit together: VAE latents feed the UNet, whose
    output has their shape; run on small inputs, the VAE round trip keeps the image shape."""
    cfg = compose("train", [f"model={model}"]).model
    vae = AutoencoderKL(**OmegaConf.to_container(cfg.autoencoder.network)).eval()
    factor = 2 ** (len(cfg.autoencoder.network.block_out_channels) - 1)
    latent_size = 2 ** len(cfg.unet.block_out_channels)  # a small latent the UNet's levels halve to 2 x 2
    images = torch.rand(1, 1, latent_size * factor, latent_size * factor) * 2 - 1
    unet = UNet2DConditionModel(
        **OmegaConf.to_container(cfg.unet),
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        cross_attention_dim=384,
    ).eval()
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        assert latents.shape == (1, vae.config.latent_channels, latent_size, latent_size)
        assert vae.decode(latents).sample.shape == images.shape
        prompts = torch.randn(1, cfg.prompt_encoder.max_length, 384)
        assert unet(latents, 10, encoder_hidden_states=prompts).sample.shape == latents.shape
    assert vae.config.in_channels == vae.config.out_channels == 1


def test_smoke_is_the_cpu_model_shrunk():
    """`experiment=smoke` lists widths for the CPU model's depth: with model=gpu the networks need SHRINK too."""
    cpu = compose("train", [*SMOKE, "model=cpu"]).model
    assert len(cpu.unet.block_out_channels) == len(cpu.unet.down_block_types)
    assert len(cpu.autoencoder.network.block_out_channels) == len(cpu.autoencoder.network.down_block_types)
    gpu = compose("train", [*SMOKE, "model=gpu", *SHRINK["gpu"]]).model
    assert len(gpu.unet.block_out_channels) == len(gpu.unet.down_block_types)
    assert len(gpu.autoencoder.network.block_out_channels) == len(gpu.autoencoder.network.down_block_types)


# ---- trainer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", choices("trainer"))
@pytest.mark.parametrize("name", TRAINING)
def test_every_training_entry_point_instantiates_every_trainer_choice(name, trainer, tmp_path):
    """A lightning.Trainer from each profile; the GPU profile on this CPU machine with only the device swapped."""
    from lightning_modules.runs.training import build_trainer

    on_cpu = ["trainer.accelerator=cpu", "trainer.devices=1"] if trainer == "gpu" else []
    cfg = _training_config(name, tmp_path, f"trainer={trainer}", *on_cpu)
    if name == "benchmark":  # the benchmark builds its own short fits from these keys
        args = OmegaConf.to_container(cfg.trainer)
        args.pop("name")
        built = L.Trainer(**args, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    else:
        built = build_trainer(cfg, [])
    assert built.precision == str(cfg.trainer.precision)
    assert built.gradient_clip_val == cfg.trainer.gradient_clip_val
    assert built.max_steps == (cfg.trainer.max_steps if cfg.trainer.max_steps is not None else -1)


# ---- settings blocks --------------------------------------------------------------------------------------------
def build_settings(name: str, cfg: DictConfig) -> dict:
    """Every settings object and callback an entry point builds from its YAML blocks, as the script does, with the
    defaults a checkpoint of ``model`` stores (``model.sampling``; the demo model's when the config has no model)."""
    from lightning_modules.attribution import attribution_map
    from lightning_modules.image_callbacks import CounterfactualGridLogger, ReconstructionLogger, SampleGridLogger
    from lightning_modules.metric_callbacks import GenerationMetricsLogger
    from lightning_modules.regions import RegionSpec
    from lightning_modules.settings import (
        COUNTERFACTUAL_METHODS,
        InductionSettings,
        SamplingSettings,
        counterfactual_settings,
    )

    def block(node: DictConfig) -> dict:
        return OmegaConf.to_container(node, resolve=True)

    defaults = SamplingSettings.from_hparams(block(cfg.model.sampling if "model" in cfg else CHECKPOINT_SAMPLING))
    built: dict = {}
    if name == "train":
        callbacks = cfg.callbacks
        built["samples"] = SampleGridLogger(**callbacks.samples)
        built["counterfactuals"] = CounterfactualGridLogger(**block(callbacks.counterfactuals))
        built["generation_metrics"] = GenerationMetricsLogger(**block(callbacks.generation_metrics))
        grid = {
            k: v
            for k, v in block(callbacks.counterfactuals).items()
            if k not in ("every_n_validations", "num_images", "seed", "attribution_sigma")
        }
        built["counterfactuals/settings"] = counterfactual_settings(defaults=defaults, **grid)
        built["generation_metrics/generation"] = SamplingSettings.build(
            defaults, **block(callbacks.generation_metrics.generation)
        )
        built["generation_metrics/counterfactual"] = counterfactual_settings(
            defaults=defaults, **block(callbacks.generation_metrics.counterfactual)
        )
    elif name == "train_autoencoder":
        built["reconstructions"] = ReconstructionLogger(**cfg.callbacks.reconstructions)
    elif name == "evaluate":
        built["generation"] = SamplingSettings.build(defaults, **block(cfg.generation))
        built["counterfactual"] = counterfactual_settings(defaults=defaults, **block(cfg.counterfactual))
    elif name == "attribution":
        for method in COUNTERFACTUAL_METHODS:
            built[method] = counterfactual_settings(method, defaults, **block(cfg[method]))
            grid = block(cfg.tune[method])  # every point of the tuning grid is a valid setting too
            fraction, guidance = built[method].fraction_name, "guidance_scale"
            for value in grid[fraction]:
                for scale in grid[guidance]:
                    counterfactual_settings(method, built[method], **{fraction: value, guidance: scale})
        assert cfg.baselines.reconstruction.method in COUNTERFACTUAL_METHODS
        assert set(cfg.overlays.methods) <= set(cfg.methods)
        for kind in [cfg.map.kind, *cfg.tune.map.kind]:
            for sigma in [cfg.map.sigma, cfg.map.refined_sigma, *cfg.tune.map.sigma]:
                attribution_map(torch.zeros(1, 1, 64, 64), kind, sigma)
    elif name == "induction":
        built["induction"] = InductionSettings.build(defaults, **block(cfg.induction))
        built["region"] = RegionSpec.parse(cfg.data.image_size, cfg.zone, cfg.box, cfg.mask_path)
    elif name == "benchmark":
        for method in COUNTERFACTUAL_METHODS:
            built[method] = counterfactual_settings(method, defaults, **block(cfg.counterfactual[method]))
    return built


EXPECTED_SETTINGS = {
    "train": {
        "samples",
        "counterfactuals",
        "generation_metrics",
        "counterfactuals/settings",
        "generation_metrics/generation",
        "generation_metrics/counterfactual",
    },
    "train_autoencoder": {"reconstructions"},
    "train_classifier": set(),
    "evaluate": {"generation", "counterfactual"},
    "attribution": {"sdedit", "inversion"},
    "induction": {"induction", "region"},
    "benchmark": {"sdedit", "inversion"},
    "reproducibility": set(),
    "app": set(),  # its settings are attribution.yaml's and induction.yaml's, read when it starts
}
#: the entries of EXPECTED_SETTINGS that are settings objects (the rest are callbacks and the induction region)
SETTINGS_KEYS = {
    "counterfactuals/settings",
    "generation_metrics/generation",
    "generation_metrics/counterfactual",
    "generation",
    "counterfactual",
    "sdedit",
    "inversion",
    "induction",
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_settings_block_builds_its_settings(name):
    from lightning_modules.settings import SamplingSettings

    for overrides in ([], SMOKE):
        built = build_settings(name, compose(name, overrides))
        assert set(built) == EXPECTED_SETTINGS[name]
        for key, value in built.items():
            if key in SETTINGS_KEYS:
                assert isinstance(value, SamplingSettings), key


def test_null_settings_take_the_checkpoint_defaults_and_given_ones_win():
    from lightning_modules.settings import SDEditSettings

    overrides = ["counterfactual.guidance_scale=4.5", "generation.guidance_scale=null"]
    built = build_settings("evaluate", compose("evaluate", overrides))
    assert built["generation"].num_inference_steps == CHECKPOINT_SAMPLING.num_inference_steps
    assert built["generation"].guidance_scale == CHECKPOINT_SAMPLING.guidance_scale
    assert isinstance(built["counterfactual"], SDEditSettings) and built["counterfactual"].guidance_scale == 4.5
    assert built["counterfactual"].strength == SDEditSettings.strength  # null: the class default
    attribution = build_settings("attribution", compose("attribution"))
    assert attribution["sdedit"].asdict() == {"num_inference_steps": 50, "guidance_scale": 20.0, "strength": 0.1}


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("train", "callbacks.counterfactuals.strength=0", "strength must be in"),
        ("train", "callbacks.generation_metrics.generation.guidance_scale=-1", "guidance_scale must be"),
        ("train", "callbacks.generation_metrics.counterfactual.method=magic", "unknown counterfactual method"),
        ("evaluate", "generation.num_inference_steps=0", "num_inference_steps must be"),
        ("evaluate", "counterfactual.strength=2", "strength must be in"),
        ("attribution", "sdedit.strength=0.01", "runs no denoising step"),
        ("attribution", "tune.inversion.inversion_depth=[0.5,0]", "inversion_depth must be in"),
        ("attribution", "map.kind=signedd", "unknown map kind"),
        ("induction", "induction.feather=-1", "feather must be"),
        ("induction", "induction.paste=maybe", "paste must be true or false"),
        ("induction", "zone=left-basal", "unknown zone"),
        ("benchmark", "counterfactual.inversion.inversion_depth=0", "inversion_depth must be in"),
    ],
)
def test_a_bad_settings_value_fails_before_any_model_loads(name, override, message):
    with pytest.raises(ValueError, match=message):
        build_settings(name, compose(name, [override]))


def test_a_counterfactual_block_serves_either_method():
    """One block holds both fractions: the chosen method's applies, the other is ignored (even out of range)."""
    from lightning_modules.settings import InversionSettings, SDEditSettings

    sdedit = build_settings(
        "evaluate", compose("evaluate", ["counterfactual.inversion_depth=1.5", "counterfactual.strength=0.3"])
    )["counterfactual"]
    assert isinstance(sdedit, SDEditSettings) and sdedit.strength == 0.3
    inversion = build_settings(
        "evaluate", compose("evaluate", ["counterfactual.method=inversion", "counterfactual.strength=7"])
    )["counterfactual"]
    assert isinstance(inversion, InversionSettings) and inversion.inversion_depth == InversionSettings.inversion_depth


# ---- overrides --------------------------------------------------------------------------------------------------
def test_overrides_apply_and_experiment_shrinks():
    cfg = compose("train", ["experiment=smoke", "trainer.max_steps=100", "model.unet.block_out_channels=[64,128]"])
    assert cfg.trainer.max_steps == 100 and list(cfg.model.unet.block_out_channels) == [64, 128]
    assert cfg.data.batch_size == 8 and cfg.experiment == "smoke"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data=imagenet", "unknown data 'imagenet'; valid choices: .*synthetic"),
        ("experiment=nope", "unknown experiment 'nope'; valid choices: .*smoke"),
        (
            "model.unet.channelz=3",
            "unknown key 'model.unet.channelz'; valid keys at 'model.unet': .*block_out_channels",
        ),
        ("learning_rate=1", "unknown key 'learning_rate'; valid keys at the top level"),
        ("seed", "not of the form key=value"),
        (  # YAML reads "{a:[1]}" as no mapping at all: the override is named, with how to write one
            "model.inpainting={p_region:[0.5]}",
            r"override 'model.inpainting=\{p_region:\[0.5\]\}' is not a YAML value .*a space after each colon",
        ),
    ],
)
def test_unknown_choices_and_keys_name_the_valid_ones(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("train", [override])


@pytest.mark.parametrize(
    ("variables", "model"),
    [
        ([], None),
        (["GPUS=4"], "model=gpu"),
        (["GPUS=4", "ARGS=model=cpu"], "model=cpu"),
        (["GPUS=2", "ACCELERATOR=cpu"], None),
    ],
)
def test_make_train_on_gpus_trains_the_gpu_model_unless_told_otherwise(variables, model):
    import subprocess

    for target in ("train-autoencoder", "train-classifier", "train"):
        command = ["make", "--no-print-directory", "-n", target, *variables, "STAMP=/dev/null"]
        words = subprocess.run(
            command, cwd=CONFIG_DIR.parent, capture_output=True, text=True, check=True
        ).stdout.split()
        assert [w for w in words if w.startswith("model=")] == ([model] if model else [])


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ([], ["device=cpu", "devices=1"]),
        (["GPUS=4"], ["device=cuda", "devices=4"]),
        (
            ["GPUS=2", "ACCELERATOR=cpu", "DATA=csv", "DATA_ROOT=/data/my films"],
            ["device=cpu", "devices=2", "data=csv"],
        ),
    ],
)
def test_make_attribute_and_induce_spread_over_the_devices_asked_for(variables, expected):
    """The arguments make passes are valid overrides of the scripts' configs, with the device settings asked for."""
    import shlex
    import subprocess

    for target, config in (("attribute", "attribution"), ("induce", "induction"), ("evaluate", "evaluate")):
        line = subprocess.run(
            ["make", "--no-print-directory", "-n", target, *variables, "STAMP=/dev/null"],
            cwd=CONFIG_DIR.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        overrides = shlex.split(line.splitlines()[-1])[2:]
        assert set(expected) <= set(overrides)
        cfg = compose(config, overrides)
        assert cfg.devices == int(expected[1].split("=")[1])
        if "DATA_ROOT=/data/my films" in variables:
            assert cfg.data.root == "/data/my films"
