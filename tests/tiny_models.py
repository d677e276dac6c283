"""Tiny random denoisers of each family and writers for the checkpoint layouts people download.

The original-layout writers invert the loader's key map; tests check that map against diffusers' own
converter and against literal names from the original repositories, so the round trip is not circular.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from postdiff_compile.models.key_maps import LDM_PREFIX, original_source

TINY_CONFIGS = {
    "sd15": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                 norm_num_groups=32, attention_head_dim=8),
    # SD1.5 layout with 3 resnets per up block, as DeepCache's branch numbering assumes, and three levels
    # so that branches 0..5 cover two up blocks and the deepest one is cached whole.
    "sd15_deep": dict(block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                      out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=768, norm_num_groups=32, attention_head_dim=8),
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                norm_num_groups=32, attention_head_dim=[1, 1], use_linear_projection=True),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=2048, norm_num_groups=32, attention_head_dim=[1, 1, 1],
                 transformer_layers_per_block=[1, 1, 2], use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "pixart_alpha": dict(num_attention_heads=1, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                         caption_channels=4096, cross_attention_dim=32, sample_size=16, patch_size=2,
                         norm_type="ada_norm_single", use_additional_conditions=False, attention_bias=True,
                         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
                         norm_eps=1e-6),
}


def tiny_denoiser(family: str, seed: int = 0) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(seed)
    cls = PixArtTransformer2DModel if family == "pixart_alpha" else UNet2DConditionModel
    model = cls(**TINY_CONFIGS[family]).eval()
    # Random init leaves some tensors at exactly zero or one; make every tensor distinct so a misrouted
    # key cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def original_state_dict(model: torch.nn.Module, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of `model` renamed (and re-fused) into an original checkpoint layout."""
    config = dict(model.config)
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in model.state_dict().items():
        src = original_source(layout, key, config, prefix)
        groups.setdefault(src.name, {})[src.chunk] = tensor
    return {name: torch.cat([parts[i] for i in sorted(parts)], dim=0).contiguous() for name, parts in groups.items()}


def write_checkpoint(model: torch.nn.Module, path: Path, layout: str, extra: dict | None = None,
                     dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    prefix = LDM_PREFIX if layout == "ldm" else ""
    state = original_state_dict(model, layout, prefix)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state.update(extra or {})
    save_file(state, str(path), metadata=metadata)
    return path


def ldm_extras() -> dict[str, torch.Tensor]:
    """A few VAE and text-encoder tensors, as full SD checkpoints carry them beside the UNet."""
    return {
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
    }


def tiny_sd_pipeline(family: str = "sd15", scheduler: str = "ddim", seed: int = 0):
    """A StableDiffusionPipeline around a tiny denoiser, without text encoder (tests pass embeddings)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline)

    from postdiff_compile.models.families import get_family

    sched_config = get_family(family.removesuffix("_deep")).scheduler()
    sched_config.pop("_class_name")
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp": DPMSolverMultistepScheduler}[scheduler]
    if scheduler == "dpmpp":
        sched_config.update(algorithm_type="dpmsolver++", solver_order=2)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=tiny_denoiser(family, seed),
                                   scheduler=cls.from_config(sched_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_embeddings(batch: int = 1, length: int = 77, width: int = 768, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, width, generator=gen), torch.randn(batch, length, width, generator=gen)
