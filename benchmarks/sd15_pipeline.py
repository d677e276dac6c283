"""The SD1.5-architecture pipeline the benchmarks time: bundled config, random weights, no text encoder.

Only the denoising loop is timed: callers pass prompt embeddings and ask for latents, so the VAE is never
run. It is a tiny one whose 4 levels still make the pipeline's vae_scale_factor 8, as SD's VAE.
"""
from __future__ import annotations

import torch


def random_sd15_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    from postdiff_compile.models.families import get_family

    config = {k: v for k, v in get_family("sd15").config().items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):   # initialised where it runs: 860M parameters take a while on a CPU
        unet = UNet2DConditionModel.from_config(config)
    if dtype != torch.float32:   # diffusers warns about any .to(dtype), even a no-op one
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


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
