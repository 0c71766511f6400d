"""Performance benchmark: training and counterfactual throughput of ours against the references, in one process.

Every network has random weights and every input is fixed random data, so it runs on a fresh clone. Lines:

* training images/s of ``LatentDiffusionModule`` as Lightning runs it, with the prompt-embedding and latent caches on
  and off (and on with ``compile``), against the same UNet trained by a plain loop that encodes every image with the
  VAE and every prompt with the prompt encoder on every step, as diffusers'
  ``examples/text_to_image/train_text_to_image.py`` does;
* counterfactual images/s of our ``sdedit`` (eager and compiled) against diffusers' ``StableDiffusionImg2ImgPipeline``
  on the same components and settings (outputs asserted equal), and of our ``inversion``;
* with ``compile`` on, what compilation costs once (timed cold: an empty inductor cache) and how many training steps
  or sdedit calls repay it;
* peak memory of each line, and the UNet's achieved FLOP rate (forward + backward) as a fraction of this machine's
  float32 matrix-multiply peak measured in the same run.

The measuring tools are in ``lightning_modules.runs.timing``; the module is built as training builds it
(``runs.training.build_latent_diffusion``); the counterfactual settings are ``configs/attribution.yaml``'s.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from configs import compose, instantiate
from datamodules.base import CXRDataModule
from datamodules.prompts import PromptBank
from datamodules.synthetic import SyntheticCXRDataset
from lightning_modules import inpainting as inpaint
from lightning_modules.compiled_unet import compile_unet
from lightning_modules.latent_diffusion import LatentDiffusionModule, drop_prompts
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.prompt_encoder import NULL_PROMPT, PromptEncoder
from lightning_modules.runs.environment import environment
from lightning_modules.runs.prompt_bench import prompt_lines
from lightning_modules.runs.scaling_bench import attribution_scaling
from lightning_modules.runs.store_bench import store_lines
from lightning_modules.runs.timing import (
    Call,
    Line,
    Measured,
    PeakMemory,
    cold_compile_caches,
    matmul,
    measure,
    memory_method,
    stopwatch,
    synchronize,
)
from lightning_modules.runs.training import build_latent_diffusion
from lightning_modules.settings import (
    COUNTERFACTUAL_METHODS,
    CounterfactualSettings,
    SamplingSettings,
    counterfactual_settings,
)

#: --quick: the smoke-sized networks and batches, a few repeats, one thread (immune to a busy machine), nothing compiled
QUICK = [
    "experiment=smoke",
    "repeats=3",
    "warmup=1",
    "train_steps_per_repeat=1",
    "counterfactual.batch_size=2",
    "matmul_size=256",
    "counterfactual.sdedit.num_inference_steps=10",
    "counterfactual.inversion.num_inference_steps=2",
    "num_threads=1",
    "compile=false",
    "store.images=8",
    "store.batch_size=4",
    "store.memory_counts=[500,4000]",
    "scaling.images=4",
    "scaling.batch_size=1",
    "prompts.batch_size=8",
    "model.prompt_encoder.cache_size=64",
]

#: UNet variants timed beside the plain float32 forward + backward: what `make bench` says before we turn one on
VARIANTS = {
    "channels_last": "channels-last memory format",
    "bf16_autocast": "bfloat16 autocast (weights float32)",
    "compile": "torch.compile (compilation in the warm-up calls)",
    "compile_math_attention": "torch.compile, attention as matmul-softmax-matmul (ours: compile_unet)",
}


# 1. settings, checked before anything is built ----------------------------------------------------------------------
def benchmark_settings(cfg: DictConfig) -> dict[str, CounterfactualSettings]:
    """Checks ``cfg`` and returns the counterfactual settings: configs/attribution.yaml's (what `make demo` scores),
    under the benchmark's own non-null ``counterfactual.<method>`` values (--quick shortens the runs). Raises
    ValueError on a bad value."""
    if cfg.warmup < 1 or cfg.repeats < 1:
        raise ValueError("warmup and repeats must be >= 1 (the first call fills the caches)")
    unknown = [name for name in cfg.unet_variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown unet_variants {unknown}; valid: {', '.join(VARIANTS)}")
    attribution = compose("attribution")
    defaults = SamplingSettings.from_hparams(cfg.model.sampling)  # the random model's, as a checkpoint stores them
    settings = {}
    for method in COUNTERFACTUAL_METHODS:
        given = {k: v for k, v in OmegaConf.to_container(cfg.counterfactual[method]).items() if v is not None}
        values = {**OmegaConf.to_container(attribution[method], resolve=True), **given}
        settings[method] = counterfactual_settings(method, defaults, **values)
    return settings


# 2. fixed random inputs and random-weight components ----------------------------------------------------------------
class RandomImages(Dataset):
    """Fixed random images in [-1, 1] with ids and report-style prompts from the data's prompt bank."""

    def __init__(self, length: int, image_size: int, prompt_bank: str, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(length, 1, image_size, image_size, generator=generator) * 2 - 1
        reports = SyntheticCXRDataset("train", length, PromptBank.load(prompt_bank), image_size, seed)
        self.prompts = [reports.prompt(i) for i in range(length)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "prompt": self.prompts[i], "id": f"bench-{i:06d}"}


def random_vae(cfg: DictConfig, directory: str) -> str:
    """The stage-1 architecture with random weights, exported as stage 1 exports it."""
    vae = AutoencoderKL(**OmegaConf.to_container(cfg.model.autoencoder.network))
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(directory, safe_serialization=True)
    return directory


@dataclass
class Bench:
    """What every line shares: the config, the device, the random VAE on disk and the configured data module
    (instantiated, never set up: it gives the image size and normal prompt; the inputs are ``RandomImages``)."""

    cfg: DictConfig
    device: torch.device
    vae_dir: str
    datamodule: CXRDataModule

    def module(self, caches: bool, compile: bool = False) -> LatentDiffusionModule:
        """Our module as training builds it, with random UNet weights (the same for every line: seeded), both caches
        on or off, and its training step compiled or not."""
        torch.manual_seed(self.cfg.seed)
        prompt_encoder = OmegaConf.to_container(self.cfg.model.prompt_encoder, resolve=True)
        return build_latent_diffusion(
            self.cfg,
            self.datamodule,
            vae={"path": self.vae_dir},
            prompt_encoder={**prompt_encoder, "cache": caches},
            cache_latents=caches,
            compile=compile,
        )

    def measure(self, calls: dict[str, Call]) -> dict[str, Measured]:
        cfg = self.cfg
        return measure(calls, self.device, cfg.warmup, cfg.repeats, cfg.memory_interval)

    def images(self, length: int, seed: int) -> RandomImages:
        return RandomImages(length, self.cfg.data.image_size, self.cfg.data.prompt_bank, seed)


# 3. training lines --------------------------------------------------------------------------------------------------
class StepTimer(L.Callback):
    """The time at the end of every training batch, and the peak memory of the second, the one timed (the first
    allocates what a fit allocates once: optimizer state, Lightning's loops)."""

    def __init__(self, device: torch.device, memory: PeakMemory | None):
        self.device, self.memory, self.ends = device, memory, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 1 and self.memory is not None:
            self.memory.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        if batch_idx == 1 and self.memory is not None:
            self.memory.__exit__(None, None, None)


def lightning_steps(bench: Bench, module: LatentDiffusionModule, data: Dataset) -> Call:
    """Ours as ``fit`` runs it (the trainer profile's precision and gradient clipping, EMA, logging): each call fits
    1 + ``train_steps_per_repeat`` steps, one per batch of ``data``, and returns the wall time from the end of the
    first to the end of the last (loading, steps, optimizer, EMA, Lightning). The first call fills the caches; the
    module keeps them across calls."""
    cfg, device = bench.cfg, bench.device
    profile = {key: cfg.trainer[key] for key in ("precision", "gradient_clip_val")}
    loader = DataLoader(data, batch_size=cfg.data.batch_size, shuffle=False)
    steps = cfg.train_steps_per_repeat

    def call(memory: PeakMemory | None = None) -> float:
        timer = StepTimer(device, memory)
        trainer = L.Trainer(
            **profile,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=1 + steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module, loader)
        return timer.ends[steps] - timer.ends[0]

    return call


def plain_steps(bench: Bench, module: LatentDiffusionModule, data: Dataset) -> Call:
    """diffusers' ``train_text_to_image.py`` step on a copy of the module's UNet: every step encodes the images with
    the VAE (a posterior sample) and the prompts with the frozen encoder, then noise, UNet, MSE, backward, gradient
    clipping, AdamW and its schedule, EMA; our optimizer, EMA and clipping settings, with that script's kernels
    (its ``torch.optim.AdamW`` with the default per-parameter loop on the CPU, and ``--foreach_ema`` off)."""
    cfg, device = bench.cfg, bench.device
    model = OmegaConf.to_container(cfg.model, resolve=True)
    unet = copy.deepcopy(module.unet).to(device).train()
    vae, encoder, scheduler = module.vae.to(device), module.prompt_encoder.to(device), module.noise_scheduler
    optim = model["optimizer"]
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=optim["lr"],
        weight_decay=optim.get("weight_decay", 0.0),
        betas=tuple(optim.get("betas", (0.9, 0.999))),
    )
    lr_scheduler = get_scheduler(optim["schedule"], optimizer, num_warmup_steps=optim["warmup_steps"])
    ema = EMAModel(unet.parameters(), **{**model["ema"], "foreach": False})
    ema.to(device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=str(cfg.trainer.precision).startswith("bf16"))
    batches = itertools.cycle(DataLoader(data, batch_size=cfg.data.batch_size, shuffle=False))
    p_region = (model.get("inpainting") or {}).get("p_region", 0.0)

    def step() -> None:
        batch = next(batches)
        with autocast:
            latents = vae.encode(batch["image"].to(device)).latent_dist.sample() * vae.config.scaling_factor
            encoder_hidden_states = encoder(drop_prompts(batch["prompt"], cfg.model.p_uncond))  # (B, L, D)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            if module.inpainting:  # as diffusers' inpainting training: the mask and the masked latent concatenated
                masks = inpaint.random_masks(len(latents), latents.shape[-2:], p_region, device=device)
                noisy_latents = torch.cat([noisy_latents, inpaint.condition(masks, latents)], dim=1)
            prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())

    def steps() -> None:
        for _ in range(cfg.train_steps_per_repeat):
            step()

    return stopwatch(steps, device)


TRAINING = {  # name: (what, caches, compile, the steps)
    "train_plain": (
        "plain PyTorch loop, VAE + prompt encoder every step (diffusers train_text_to_image)",
        False,
        False,
        plain_steps,
    ),
    "train_ours_caches_off": (
        "ours (Lightning), prompt-embedding and latent caches off",
        False,
        False,
        lightning_steps,
    ),
    "train_ours_caches_on": ("ours (Lightning), prompt-embedding and latent caches on", True, False, lightning_steps),
    "train_ours_compiled": ("ours (Lightning), caches on, model.compile=true", True, True, lightning_steps),
}


def training_lines(bench: Bench) -> list[Line]:
    cfg = bench.cfg
    steps = cfg.train_steps_per_repeat
    data = bench.images((1 + steps) * cfg.data.batch_size, cfg.seed)
    names = [name for name, (_, _, compile, _) in TRAINING.items() if cfg.compile or not compile]
    calls = {name: TRAINING[name][3](bench, bench.module(*TRAINING[name][1:3]), data) for name in names}
    return [
        Line.of(name, TRAINING[name][0], measured, steps * cfg.data.batch_size)
        for name, measured in bench.measure(calls).items()
    ]


# 4. counterfactual lines --------------------------------------------------------------------------------------------
def counterfactual_lines(bench: Bench, settings: dict[str, CounterfactualSettings]) -> tuple[list[Line], dict]:
    """Ours (``sdedit``, ``inversion``) and ``StableDiffusionImg2ImgPipeline`` on the same VAE, UNet, DDIM scheduler
    and prompt encoder. Given prompts, diffusers encodes the prompt and the negative prompt of every image on every
    call (``encode_prompt``); its reference line does exactly that with our frozen encoder, uncached (our encoder
    zeroes padding positions, which diffusers' own ``encode_prompt`` would not, so outputs could not match otherwise).
    A second diffusers line is given the embeddings precomputed: the two pipelines' loops alone."""
    cfg, device, c = bench.cfg, bench.device, bench.cfg.counterfactual
    module = bench.module(caches=True).to(device).eval()
    parts = (module.vae, module.unet, module.noise_scheduler, module.prompt_encoder, module.hparams.sampling)
    pipelines = {"": LatentDiffusionPipeline.from_parts(*parts)}
    if cfg.compile:
        pipelines["_compiled"] = LatentDiffusionPipeline.from_parts(*parts, compile=True)
    ours = pipelines[""]
    peer = StableDiffusionImg2ImgPipeline(
        vae=module.vae,
        text_encoder=None,
        tokenizer=None,
        unet=module.unet,
        scheduler=ours.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    peer.set_progress_bar_config(disable=True)
    uncached = PromptEncoder(**{**cfg.model.prompt_encoder, "cache": False}).to(device)

    images = bench.images(c.batch_size, cfg.seed + 1).images.to(device)
    prompts, null_prompts = [ours.normal_prompt] * c.batch_size, [NULL_PROMPT] * c.batch_size
    given = {"prompt_embeds": uncached(prompts), "negative_prompt_embeds": uncached(null_prompts)}
    sdedit = settings["sdedit"]
    img2img = {
        "strength": sdedit.strength,
        "guidance_scale": sdedit.guidance_scale,
        "num_inference_steps": sdedit.num_inference_steps,
    }
    generator = lambda: torch.Generator("cpu").manual_seed(cfg.seed)  # noqa: E731
    outputs = {}

    def run_ours(method: str, suffix: str = "") -> Call:
        def call() -> None:
            outputs[method + suffix] = pipelines[suffix](
                images, settings[method], target_prompt=ours.normal_prompt, generator=generator()
            ).images  # (B, 1, H, W) in [-1, 1]

        return stopwatch(call, device)

    def run_diffusers(precomputed: bool) -> Call:
        def call() -> None:
            embeddings = (
                given
                if precomputed
                else {"prompt_embeds": uncached(prompts), "negative_prompt_embeds": uncached(null_prompts)}
            )
            outputs["diffusers"] = peer(
                image=(images + 1) / 2, generator=generator(), output_type="pt", **embeddings, **img2img
            ).images  # (B, 1, H, W) in [0, 1]

        return stopwatch(call, device)

    what = {
        "sdedit_diffusers": "diffusers StableDiffusionImg2ImgPipeline, encoding its prompts every call",
        "sdedit_diffusers_given_embeddings": "diffusers StableDiffusionImg2ImgPipeline, embeddings precomputed",
        "sdedit_ours": "ours, sdedit",
        "sdedit_ours_compiled": "ours, sdedit, the UNet compiled",
        "inversion_ours": "ours, DDIM inversion then guided DDIM",
    }
    calls = {
        "sdedit_diffusers": run_diffusers(precomputed=False),
        "sdedit_diffusers_given_embeddings": run_diffusers(precomputed=True),
        **{f"sdedit_ours{suffix}": run_ours("sdedit", suffix) for suffix in pipelines},
        "inversion_ours": run_ours("inversion"),
    }
    lines = [Line.of(name, what[name], measured, c.batch_size) for name, measured in bench.measure(calls).items()]

    checks = {}
    for suffix in pipelines:
        ours01 = (outputs["sdedit" + suffix] + 1) / 2
        differs = f"sdedit{suffix} differs from StableDiffusionImg2ImgPipeline"
        torch.testing.assert_close(
            ours01, outputs["diffusers"], atol=c.atol, rtol=c.rtol, msg=lambda m, differs=differs: f"{differs}: {m}"
        )
        checks[f"sdedit{suffix}_max_abs_difference"] = (ours01 - outputs["diffusers"]).abs().max().item()
    return lines, checks


# 5. FLOP rate of the UNet against the matrix-multiply peak, and the speed-ups we tried on it -----------------------
def unet_variant(
    name: str, unet: torch.nn.Module, latents: torch.Tensor, device: torch.device
) -> tuple[Callable, torch.Tensor, contextlib.AbstractContextManager]:
    """(the UNet to call, its input, the context to call it in) for one of ``VARIANTS``, on a copy of ``unet``."""
    unet = copy.deepcopy(unet)
    if name == "channels_last":
        return (
            unet.to(memory_format=torch.channels_last),
            latents.to(memory_format=torch.channels_last),
            contextlib.nullcontext(),
        )
    if name == "bf16_autocast":
        return unet, latents, torch.autocast(device.type, torch.bfloat16)
    if name == "compile":
        return torch.compile(unet), latents, contextlib.nullcontext()
    if name == "compile_math_attention":
        return compile_unet(unet), latents, contextlib.nullcontext()
    raise ValueError(name)


def flop_lines(bench: Bench) -> list[Line]:
    """The UNet's forward + backward at the training batch (FLOPs counted by ``FlopCounterMode``), the same in each of
    ``unet_variants``, and a float32 ``torch.mm`` of ``matmul_size`` squared matrices, all as FLOP/s."""
    cfg, device = bench.cfg, bench.device
    module = bench.module(caches=True).to(device).train()
    unet, batch = module.unet, cfg.data.batch_size
    latent_size = cfg.data.image_size // module.vae_scale_factor
    generator = torch.Generator().manual_seed(cfg.seed)
    latents = torch.randn(batch, unet.config.in_channels, latent_size, latent_size, generator=generator).to(device)
    timesteps = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (batch,), generator=generator).to(
        device
    )
    embeddings = module.prompt_encoder(bench.images(batch, cfg.seed).prompts)  # (B, L, D)

    def forward_backward(
        net: Callable = unet, x: torch.Tensor = latents, context: contextlib.AbstractContextManager | None = None
    ) -> Callable[[], None]:
        def call() -> None:
            with context or contextlib.nullcontext():
                prediction = net(x, timesteps, encoder_hidden_states=embeddings).sample
            prediction.float().square().mean().backward()
            for p in net.parameters():
                p.grad = None

        return call

    with FlopCounterMode(display=False) as counter:
        forward_backward()()
    unet_flops = counter.get_total_flops()
    calls = {"unet_forward_backward": stopwatch(forward_backward(), device)}
    what = {"unet_forward_backward": f"UNet forward + backward at batch {batch}, {unet_flops / 1e9:.1f} GFLOP"}
    for variant in cfg.unet_variants:
        calls[f"unet_{variant}"] = stopwatch(forward_backward(*unet_variant(variant, unet, latents, device)), device)
        what[f"unet_{variant}"] = f"the same, {VARIANTS[variant]}"
    n = cfg.matmul_size
    calls["matmul_peak"], matmul_flops = matmul(n, device, generator)
    what["matmul_peak"] = f"float32 torch.mm {n} x {n}"
    return [
        Line.of(name, what[name], measured, matmul_flops if name == "matmul_peak" else unet_flops, unit="FLOP/s")
        for name, measured in bench.measure(calls).items()
    ]


# 6. the run and its report ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without Lightning's banner and its notes on fits without validation and with frozen parts in eval mode."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for message in (
            "does not have many workers",
            "no `val_dataloader`",
            "in eval mode at the start of training",
            "LeafSpec",
        ):
            warnings.filterwarnings("ignore", f".*{message}.*")
        try:
            yield
        finally:
            logger.setLevel(level)


def device_of(cfg: DictConfig) -> torch.device:
    accelerator = cfg.trainer.accelerator
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def run(cfg: DictConfig, settings: dict[str, CounterfactualSettings], quick: bool = False) -> dict:
    """Every line, measured in this process, and the report (``settings`` from ``benchmark_settings(cfg)``)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = device_of(cfg)
    load, start = os.getloadavg(), time.perf_counter()
    with quiet_lightning(), tempfile.TemporaryDirectory() as tmp, cold_compile_caches(tmp):
        bench = Bench(cfg, device, random_vae(cfg, tmp), instantiate(cfg.data))
        lines = training_lines(bench)
        counterfactual, checks = counterfactual_lines(bench, settings)
        lines += counterfactual + flop_lines(bench)
        store, store_memory = store_lines(bench)
        lines += store
        prompts, prompt_cache = prompt_lines(bench)
        lines += prompts
        scaling = attribution_scaling(bench, Path(tmp) / "scaling", settings)
    result = report(cfg, lines, checks, device, (load, os.getloadavg()), time.perf_counter() - start)
    by = {line.name: line for line in lines}
    result["latent_store"] = {
        "speedup_vs_files": by["latents_from_store"].median / by["latents_from_files"].median,
        "memory": store_memory,
    }
    result["attribution_scaling"] = scaling
    result["prompt_cache"] = {
        **prompt_cache,
        "free_text_vs_template": by["prompts_free_text"].median / by["prompts_template"].median,
    }
    result["counterfactual_settings"] = {method: s.asdict() for method, s in settings.items()}
    result["quick"] = quick
    return result


#: --reference: only the UNet's forward + backward at the training batch (no variants) and the matmul peak
REFERENCE = ["unet_variants=[]"]


def reference(cfg: DictConfig) -> dict:
    """This machine's speed in the demo's own unit, measured in seconds: one forward + backward of the configured
    UNet at the training batch (stage 2's step, the demo's largest cost), and the float32 matmul peak. The demo
    states its wall time in these steps, so runs on machines of different speed compare (`make demo`'s report)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = device_of(cfg)
    with quiet_lightning(), tempfile.TemporaryDirectory() as tmp:
        bench = Bench(cfg, device, random_vae(cfg, tmp), instantiate(cfg.data))
        lines = {line.name: line for line in flop_lines(bench)}
    step, matmul_line = lines["unet_forward_backward"], lines["matmul_peak"]
    return {
        "unet_step_seconds": float(np.median(step.seconds)),
        "unet_step": step.what,
        "matmul_peak_flops": float(matmul_line.rates.max()),
        "repeats": len(step.seconds),
        "environment": environment(device),
    }


def compile_cost(eager: Line, compiled: Line, calls_per_repeat: int = 1) -> dict:
    """Compilation's one-time seconds (the compiled line's first call minus the eager line's: both also fill the same
    caches) and the calls (training steps: a repeat makes ``calls_per_repeat``) that repay it (None if compiled calls
    are not faster)."""
    seconds = compiled.first_call_seconds - eager.first_call_seconds
    items = compiled.items / calls_per_repeat
    saved = items / eager.median - items / compiled.median  # seconds per call
    return {"seconds": seconds, "items_per_call": items, "break_even_calls": seconds / saved if saved > 0 else None}


def report(
    cfg: DictConfig, lines: list[Line], checks: dict, device: torch.device, load: tuple[tuple, tuple], wall: float
) -> dict:
    """The ratios of medians measured in this run; ours is the compiled line where ``compile`` timed one."""
    by = {line.name: line for line in lines}
    peak = max(by["matmul_peak"].rates)  # the best repeat: the machine's peak, not its mean under load
    train_ours = by["train_ours_compiled" if cfg.compile else "train_ours_caches_on"]
    sdedit_ours = by["sdedit_ours_compiled" if cfg.compile else "sdedit_ours"]
    return {
        "train_speedup_vs_plain": train_ours.median / by["train_plain"].median,
        "train_speedup_vs_plain_eager": by["train_ours_caches_on"].median / by["train_plain"].median,
        "train_speedup_caches_on_vs_off": by["train_ours_caches_on"].median / by["train_ours_caches_off"].median,
        "sdedit_speedup_vs_diffusers": sdedit_ours.median / by["sdedit_diffusers"].median,
        "sdedit_speedup_vs_diffusers_eager": by["sdedit_ours"].median / by["sdedit_diffusers"].median,
        "sdedit_speedup_vs_diffusers_given_embeddings": by["sdedit_ours"].median
        / by["sdedit_diffusers_given_embeddings"].median,
        "ours": {"train": train_ours.name, "sdedit": sdedit_ours.name},
        "compile": {
            "train_steps": compile_cost(
                by["train_ours_caches_on"], by["train_ours_compiled"], cfg.train_steps_per_repeat
            ),
            "sdedit_calls": compile_cost(by["sdedit_ours"], by["sdedit_ours_compiled"]),
            "timed": "cold: an empty inductor cache",
        }
        if cfg.compile
        else None,
        "unet_peak_fraction": by["unet_forward_backward"].median / peak,
        "unet_variant_speedups": {
            variant: by[f"unet_{variant}"].median / by["unet_forward_backward"].median for variant in cfg.unet_variants
        },
        "matmul_peak_flops": peak,
        "lines": {line.name: line.summary() for line in lines},
        "checks": checks,
        "memory_method": memory_method(device),
        "environment": {
            **environment(device),
            "load_average_before": load[0],
            "load_average_after": load[1],
            "wall_seconds": wall,
        },
        "settings": OmegaConf.to_container(cfg, resolve=True),
    }


def _rate(value: float, unit: str) -> str:
    return f"{value / 1e9:.2f} G" if unit == "FLOP/s" else f"{value:.1f}"


def store_notes(store: dict) -> list[str]:
    memory = store["memory"]
    per_image, projected = memory["bytes_per_image"], memory["projected_chexpert_bytes"]
    return [
        f"- stage-2 latents from the latent store / from 256 px PNG files: **{store['speedup_vs_files']:.1f}x**",
        f"- a rank's own memory per image ({memory['method']}, {memory['counts'][0]} -> {memory['counts'][1]} "
        f"images of {'x'.join(map(str, memory['latent_shape']))} latents): in-memory cache "
        f"{per_image['cache'] / 1024:.1f} KB, store {per_image['store'] / 1024:.2f} KB; projected to CheXpert's "
        f"224,316 images: cache {projected['cache'] / 2**30:.1f} GB, store {projected['store'] / 2**30:.2f} GB"
        + (" (no measurable growth: below the allocator's noise)" if per_image["store"] <= 0 else ""),
    ]


def by_name(result: dict) -> dict:
    return result["lines"]


def prompt_note(cache: dict, lines: dict) -> str:
    return (
        f"- prompt embeddings: free-text reports seen once {lines['prompts_free_text']['median']:.0f} prompts/s, "
        f"template prompts from the cache {lines['prompts_template']['median']:.0f} prompts/s "
        f"({cache['free_text_vs_template']:.3f}x); after more distinct reports than `cache_size` "
        f"{cache['cache_size']}, the cache holds {cache['entries_after']} embeddings, "
        f"{cache['cache_bytes'] / 2**20:.0f} MB ({cache['bytes_per_entry'] / 1024:.0f} KB each; unbounded, MIMIC-CXR's "
        f"227,835 reports would take {cache['unbounded_mimic_bytes'] / 2**30:.1f} GB)"
    )


def scaling_note(scaling: dict) -> str:
    one, two = scaling["processes"]["1"], scaling["processes"]["2"]
    return (
        f"- attribution ({', '.join(scaling['methods'])}; {scaling['images']} images, batch {scaling['batch_size']}) "
        f"on {scaling['cores']} cores: 1 process {one['images_per_second']:.2f} images/s, 2 processes (gloo) "
        f"{two['images_per_second']:.2f} images/s: **{scaling['speedup_2_vs_1']:.2f}x**, scaling efficiency "
        f"{scaling['efficiency']:.0%} ({scaling['method']})"
    )


def compile_notes(compile: dict | None) -> list[str]:
    if compile is None:
        return []

    def repaid(cost: dict, unit: str) -> str:
        calls = cost["break_even_calls"]
        if calls is None:
            return f"{cost['seconds']:.0f} s, never repaid (not faster)"
        return f"{cost['seconds']:.0f} s, repaid after {calls:.0f} {unit} of {cost['items_per_call']:g} images"

    return [
        f"- compilation, timed {compile['timed']}, once per process and input shape: "
        f"training {repaid(compile['train_steps'], 'steps')}; sdedit {repaid(compile['sdedit_calls'], 'calls')}"
    ]


def markdown(result: dict) -> str:
    env = result["environment"]
    settings = result["settings"]
    rows = ["| line | what | median | IQR | min - max | unit | peak memory (MB) |", "|---|---|---|---|---|---|---|"]
    for name, line in result["lines"].items():
        unit = line["unit"]
        rows.append(
            f"| {name} | {line['what']} | {_rate(line['median'], unit)} | {_rate(line['q1'], unit)} - "
            f"{_rate(line['q3'], unit)} | {_rate(line['min'], unit)} - {_rate(line['max'], unit)} | "
            f"{unit} | {line['peak_memory_mb']:.0f} |"
        )
    counterfactual = result["counterfactual_settings"]
    return "\n".join(
        [
            f"Benchmark on {env['device']} ({env['cpu']}, {env['num_threads']} threads, torch {env['torch']}, "
            f"1-min load average {env['load_average_before'][0]:.1f} before, {env['load_average_after'][0]:.1f} after, "
            f"{env['wall_seconds']:.0f} s); each line: "
            f"{settings['repeats']} timed repeats "
            f"(a training repeat: {settings['train_steps_per_repeat']} steps) after "
            f"{settings['warmup']} warm-up, interleaved:",
            "",
            *rows,
            "",
            f"- training, ours ({result['ours']['train']}) / plain loop: **{result['train_speedup_vs_plain']:.2f}x** "
            f"(eager, caches on: {result['train_speedup_vs_plain_eager']:.2f}x; "
            f"caches on / off: {result['train_speedup_caches_on_vs_off']:.2f}x)",
            f"- sdedit, ours ({result['ours']['sdedit']}) / diffusers img2img: "
            f"**{result['sdedit_speedup_vs_diffusers']:.2f}x** "
            f"(eager: {result['sdedit_speedup_vs_diffusers_eager']:.2f}x;"
            f" eager / diffusers given precomputed embeddings: "
            f"{result['sdedit_speedup_vs_diffusers_given_embeddings']:.2f}x); outputs equal to diffusers' to "
            f"{max(result['checks'].values()):.1e}",
            *compile_notes(result["compile"]),
            f"- UNet forward + backward: **{result['unet_peak_fraction']:.1%}** of the measured float32 matmul peak "
            f"({result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, best repeat)",
            *(
                f"- UNet forward + backward, {VARIANTS[variant]} / float32: {speedup:.2f}x"
                for variant, speedup in result["unet_variant_speedups"].items()
            ),
            *store_notes(result["latent_store"]),
            scaling_note(result["attribution_scaling"]),
            prompt_note(result["prompt_cache"], by_name(result)),
            f"- peak memory: {result['memory_method']}, over the last warm-up call",
            f"- training batch {settings['data']['batch_size']}; counterfactual batch "
            f"{settings['counterfactual']['batch_size']}, sdedit {counterfactual['sdedit']}, "
            f"inversion {counterfactual['inversion']}",
            "",
        ]
    )
