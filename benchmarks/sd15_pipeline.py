"""The SD1.5-architecture pipeline the benchmarks time: bundled config, random weights, no text encoder.

Only the denoising loop is timed: callers pass prompt embeddings and ask for latents, so the VAE is never
run. It is a tiny one whose 4 levels still make the pipeline's vae_scale_factor 8, as SD's VAE.
"""
from __future__ import annotations

import torch

from common import random_denoiser   # benchmarks/ is on sys.path when a script runs


def random_sd15_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The SD1.5 U-Net (bundled config), seeded random weights, on `device` in `dtype`."""
    return random_denoiser("sd15", device, dtype)


def pipeline_factory(unet, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """make(own_unet=None): a new StableDiffusionPipeline with DDIM over `unet` (or `own_unet`) on each call."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from postdiff_compile.models.families import get_family

    vae = AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32).eval()
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        vae = vae.to(device, dtype)
    scheduler = {k: v for k, v in get_family("sd15").scheduler().items() if not k.startswith("_")}

    def make(own_unet=None):
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None,
                                       unet=unet if own_unet is None else own_unet,
                                       scheduler=DDIMScheduler.from_config(scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make
