"""Reference model 2's parts and how they make a real diffusers StableDiffusionPipeline (issue 25).

A latent diffusion model built like Stable Diffusion at toy size: the scenes rendered at 64x64, an
`AutoencoderKL` with factor 2 (latent 4 x 32 x 32, so the `quality` preset's low-resolution steps run on a
16 x 16 latent, where a 3x3 scene's cells are still 5 latent pixels wide), a `UNet2DConditionModel` from
SD1.5's block types with cross-attention at 16x16 and 8x8 only, and the word-level tokenizer and small
`CLIPTextModel` of reference model 1. Scaled-linear betas (SD's), v-prediction and zero terminal SNR with
trailing timesteps (Lin et al. 2024): the last training step is pure noise, as sampling's first is, so a flat
black or beige background is not pulled to the mean brightness; docs/reference2.md has the measurements.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..reference.model import TEXT_CONFIG, TEXT_LENGTH, make_tokenizer
from ..reference.model import load_parts as load_model1_parts

FAMILY = "scenes64"          # model_index.json's postdiff_family (models/families.py)
IMAGE_SIZE = 64
LATENT_SIZE = 32

# No attention in the VAE's mid block: its latent is local (factor 2), and a fully convolutional VAE can train on
# 32x32 crops, 4x cheaper per image (docs/reference2.md: 1.7 s against 5-6 s per step of 16 on this CPU).
VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": IMAGE_SIZE,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "mid_block_add_attention": False,
    "scaling_factor": 1.0,     # replaced by 1 / std of the trained VAE's latents (train_vae), as SD's 0.18215 was
}
UNET_CONFIG = {
    "sample_size": LATENT_SIZE, "in_channels": 4, "out_channels": 4, "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128], "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 32,
}


def scheduler_config(zero_snr: bool = True) -> dict:
    """DDIM over SD's scaled-linear betas, v-prediction; zero terminal SNR with trailing timesteps, or SD2's
    leading timesteps without it. No clipping: latents are not bounded."""
    spacing = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 1} if zero_snr \
        else {"rescale_betas_zero_snr": False, "timestep_spacing": "leading", "steps_offset": 1}
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction", "clip_sample": False,
            "set_alpha_to_one": False, **spacing}


@dataclass
class Model2Parts:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module


def make_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**VAE_CONFIG)


def make_text_encoder(tokenizer, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            **TEXT_CONFIG))


def make_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**UNET_CONFIG)


def make_parts(vae=None, seed: int = 0) -> Model2Parts:
    """Fresh text encoder and U-Net (what U-Net training starts from) around `vae` (a fresh one if None)."""
    tokenizer = make_tokenizer()
    return Model2Parts(tokenizer, make_text_encoder(tokenizer, seed), vae if vae is not None else make_vae(seed),
                       make_unet(seed + 1))


def make_pipeline(parts: Model2Parts, scheduler=None):
    """A real StableDiffusionPipeline over the parts (no safety checker: these are coloured shapes)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = scheduler or DDIMScheduler.from_config(scheduler_config())
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_module(module: torch.nn.Module, folder: Path, weights: str, metadata: dict[str, str] | None = None) -> None:
    """config.json and float16 safetensors (small, and what ships; loading upcasts)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    save_file({k: v.detach().half().contiguous() for k, v in module.state_dict().items()}, str(folder / weights),
              metadata=metadata)


def load_vae(folder: Path, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                         low_cpu_mem_usage=False).eval()


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move a finished folder into place: a reader sees the old folder or the new one, never half of one."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_pipeline_folder(parts: Model2Parts, folder: Path, scheduler: dict, metadata: dict[str, str]) -> Path:
    """Write the parts as a diffusers pipeline folder that StableDiffusionPipeline.from_pretrained reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_module(parts.unet, tmp / "unet", "diffusion_pytorch_model.safetensors", metadata)
    save_module(parts.vae, tmp / "vae", "diffusion_pytorch_model.safetensors", metadata)
    (tmp / "text_encoder").mkdir(parents=True)
    parts.text_encoder.config.to_json_file(str(tmp / "text_encoder" / "config.json"))
    save_file({k: v.detach().half().contiguous() for k, v in parts.text_encoder.state_dict().items()},
              str(tmp / "text_encoder" / "model.safetensors"), metadata=metadata)
    parts.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "postdiff_family": FAMILY,
             "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False,
             "note": "postdiff-compile's reference model 2 (latent, 64x64), trained by postdiff_compile.lab.reference2"}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    replace_folder(tmp, folder)
    return folder


def load_parts(folder: Path, dtype: torch.dtype = torch.float32) -> Model2Parts:
    base = load_model1_parts(folder, dtype)   # tokenizer, text encoder and U-Net folders as model 1 writes them
    return Model2Parts(base.tokenizer, base.text_encoder, load_vae(Path(folder) / "vae", dtype), base.unet)


__all__ = ["FAMILY", "IMAGE_SIZE", "LATENT_SIZE", "TEXT_LENGTH", "Model2Parts", "make_parts", "make_pipeline",
           "load_parts", "save_pipeline_folder", "scheduler_config"]
