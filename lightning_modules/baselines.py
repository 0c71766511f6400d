"""Baselines our counterfactual attributions are scored against (the classifier's saliency is ``classifier.saliency``).

* ``mean_healthy_image``: the difference to the mean healthy training image, the crudest "what should be here";
* ``reconstruct``: the same pipeline with guidance 0 (null prompt): an unconditional reconstruction whose residual is
  the AnoDDPM-style anomaly map. It isolates what the healthy prompt adds;
* ``diffedit_map``: DiffEdit's mask (Couairon et al. 2022), |eps(abnormal prompt) - eps(healthy prompt)| averaged
  over noise draws at a mid strength, as diffusers' ``StableDiffusionDiffEditPipeline.generate_mask`` computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_modules.pipeline import CounterfactualOutput, CounterfactualPipeline


def mean_healthy_image(dataset: Dataset, num_images: int = 512) -> torch.Tensor:
    """(1, H, W) mean of the first ``num_images`` samples of ``dataset`` without findings (label all zero)."""
    total, count = None, 0
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample["label"].any():
            continue
        total = sample["image"].clone() if total is None else total + sample["image"]
        count += 1
        if count == num_images:
            break
    if total is None:
        raise ValueError("no healthy image (label all zero) in the dataset: cannot build the mean healthy image")
    return total / count


def reconstruct(pipeline: CounterfactualPipeline, images: torch.Tensor, method: str = "inversion",
                **settings) -> CounterfactualOutput:
    """The pipeline's ``method`` with the null prompt and no guidance: the input as the model would redraw it."""
    return pipeline(images, method=method, **{**settings, "guidance_scale": 0.0})


@torch.no_grad()
def diffedit_latent_map(pipeline: CounterfactualPipeline, images: torch.Tensor, abnormal_prompts: list[str],
                        healthy_prompt: str | None = None, strength: float = 0.5, guidance_scale: float = 7.5,
                        num_maps: int = 10, num_inference_steps: int = 50,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 1, H, W) images in [-1, 1] -> (B, 1, h, w) DiffEdit guidance maps on the latent grid, before DiffEdit's
    clamp and threshold (the map stays continuous, so it can be ranked).

    Mirrors ``generate_mask``: ``num_maps`` posterior samples of each latent, each noised to the first timestep of
    ``strength`` (as img2img), one guided noise prediction under the source (abnormal) and one under the target
    (healthy) prompt, |difference| averaged over draws and latent channels.
    """
    if guidance_scale == 0.0:
        raise ValueError("diffedit needs the prompts: guidance_scale 0 would replace both by the null prompt")
    batch = images.shape[0]
    healthy_prompt = healthy_prompt or pipeline.normal_prompt
    # 1. encode prompts, one copy per draw
    source = pipeline.encode_prompt([p for p in abnormal_prompts for _ in range(num_maps)], guidance_scale)
    target = pipeline.encode_prompt([healthy_prompt] * batch * num_maps, guidance_scale)
    # 2. encode the image (one posterior sample per draw) and noise it at the strength's first timestep
    latents = pipeline.encode_image(images.repeat_interleave(num_maps, 0), generator, sample=True)  # (B*n, C, h, w)
    timestep = pipeline.timesteps(num_inference_steps, strength)[0]
    latents = pipeline.q_sample(latents, timestep, generator)
    # 3. predict the noise under both prompts
    noise_source = pipeline.predict_noise(latents, timestep, source, guidance_scale)
    noise_target = pipeline.predict_noise(latents, timestep, target, guidance_scale)
    # 4. |difference|, averaged over draws and channels
    difference = (noise_target - noise_source).abs().reshape(batch, num_maps, *latents.shape[1:])
    return difference.mean((1, 2))[:, None]  # (B, 1, h, w)


def diffedit_map(pipeline: CounterfactualPipeline, images: torch.Tensor, abnormal_prompts: list[str],
                 **kwargs) -> torch.Tensor:
    """``diffedit_latent_map`` upsampled bilinearly to the image grid: (B, 1, H, W)."""
    latent_map = diffedit_latent_map(pipeline, images, abnormal_prompts, **kwargs)
    return F.interpolate(latent_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
