"""Tiny random denoisers of each family and writers for the checkpoint layouts people download.

The original-layout writers invert the loader's key map; tests check that map against diffusers' own
converter and against literal names from the original repositories, so the round trip is not circular.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from postdiff_compile.models.key_maps import RELEASED_PREFIX, original_source

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


# LCM U-Nets: the base layout plus the guidance embedding (time_cond_proj_dim), as LCM_Dreamshaper_v7 has.
TINY_CONFIGS["lcm_sd15"] = dict(TINY_CONFIGS["sd15"], time_cond_proj_dim=256)
TINY_CONFIGS["lcm_sdxl"] = dict(TINY_CONFIGS["sdxl"], time_cond_proj_dim=256)
# PixArt with enough blocks for the block cache to keep 1 or 2 at each end and cache the middle.
TINY_CONFIGS["pixart_alpha_deep"] = dict(TINY_CONFIGS["pixart_alpha"], num_layers=6)
# PixArt with the resolution and aspect-ratio conditioning of the released 1024 model: use_additional_conditions,
# which diffusers' pipeline feeds only when sample_size is 128; the size embedding takes a third of the inner
# width, so the width is a multiple of 3. Six blocks, as pixart_alpha_deep, so every preset's block cache fits.
TINY_CONFIGS["pixart_alpha_sized"] = dict(TINY_CONFIGS["pixart_alpha_deep"], attention_head_dim=48,
                                          cross_attention_dim=48, sample_size=128, use_additional_conditions=True)
# The same with two blocks, for `none` (no block cache to fit): the six blocks only add capture and export time.
TINY_CONFIGS["pixart_alpha_sized_shallow"] = dict(TINY_CONFIGS["pixart_alpha_sized"], num_layers=2)
# SDXL with two levels (an attention level of one transformer layer): its added conditioning and Euler's sigma space
# at a third of the three-level model's graph, for tests that compile AOTInductor packages.
TINY_CONFIGS["sdxl_shallow"] = dict(TINY_CONFIGS["sdxl"], block_out_channels=(32, 64),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[1, 1],
                                    transformer_layers_per_block=[1, 1])
# SDXL layout with 3 resnets per up block (layers_per_block 2, as the released SDXL), for DeepCache's branches.
TINY_CONFIGS["sdxl_deep"] = dict(TINY_CONFIGS["sdxl"], layers_per_block=2)
# Flow-matching transformers: SD3 (joint blocks, the last one context_pre_only) and FLUX (double-stream then
# single-stream blocks, rotary positions; dev with the guidance embedding, schnell without). Six SD3 blocks and
# 4 + 5 FLUX blocks, so every preset's block cache (branch 2 and 4) keeps blocks at each end and caches at least
# one, and FLUX's cached range spans both block kinds.
TINY_CONFIGS["sd3"] = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                           pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32)
TINY_CONFIGS["flux"] = dict(patch_size=1, in_channels=16, num_layers=4, num_single_layers=5, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                            guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_CONFIGS["flux_schnell"] = dict(TINY_CONFIGS["flux"], guidance_embeds=False)
# FLUX-dev with one block of each kind: for tests of what surrounds the blocks (sigmas, shift, ids, guidance, the
# flow transition), where nine blocks only add capture and export time.
TINY_CONFIGS["flux_shallow"] = dict(TINY_CONFIGS["flux"], num_layers=1, num_single_layers=1)


def base_family(family: str) -> str:
    """The family a tiny variant config belongs to: "pixart_alpha_deep" -> "pixart_alpha"."""
    return family.removesuffix("_shallow").removesuffix("_deep").removesuffix("_sized")


def tiny_denoiser(family: str, seed: int = 0) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    cls = PixArtTransformer2DModel if family.startswith("pixart_alpha") else SD3Transformer2DModel \
        if family.startswith("sd3") else FluxTransformer2DModel if family.startswith("flux") else UNet2DConditionModel
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
        if src.swap:   # exchanging the halves is its own inverse
            tensor = tensor.roll(tensor.shape[0] // 2, 0)
        groups.setdefault(src.name, {})[src.chunk] = tensor   # parts in row order (FLUX's MLP part spans 4)
    return {name: torch.cat([parts[i] for i in sorted(parts)], dim=0).contiguous() for name, parts in groups.items()}


def write_checkpoint(model: torch.nn.Module, path: Path, layout: str, extra: dict | None = None,
                     dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    prefix = RELEASED_PREFIX.get(layout, "")
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


def _scheduler(family: str, scheduler: str):
    import diffusers

    from postdiff_compile.models.families import get_family

    sched_config = get_family(base_family(family)).scheduler()
    default = sched_config.pop("_class_name")
    name = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp": "DPMSolverMultistepScheduler",
            "lcm": "LCMScheduler", "default": default}[scheduler]
    if scheduler == "dpmpp":
        sched_config.update(algorithm_type="dpmsolver++", solver_order=2)
    return getattr(diffusers, name).from_config(sched_config)


def _tiny_vae(seed: int, flow: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # SD3 and FLUX VAEs shift as well as scale their latents (shift_factor)
    extra = dict(shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=32, **extra).eval()


def tiny_sd_pipeline(family: str = "sd15", scheduler: str = "ddim", seed: int = 0):
    """A StableDiffusionPipeline around a tiny denoiser, without text encoder (tests pass embeddings)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=_tiny_vae(seed), text_encoder=None, tokenizer=None,
                                   unet=tiny_denoiser(family, seed), scheduler=_scheduler(family, scheduler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(family: str, scheduler: str = "default", seed: int = 0):
    """The diffusers pipeline class each family ships with, around a tiny denoiser, without text encoders."""
    import diffusers

    base = base_family(family)
    vae, denoiser = _tiny_vae(seed, base in ("sd3", "flux", "flux_schnell")), tiny_denoiser(family, seed)
    sched = _scheduler(family, scheduler)
    if base in ("sd15", "sd2"):
        return tiny_sd_pipeline(family, "ddim" if scheduler == "default" else scheduler, seed)
    if base == "lcm_sd15":
        pipe = diffusers.LatentConsistencyModelPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=denoiser,
                                                        scheduler=sched, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    elif base in ("sdxl", "lcm_sdxl"):
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=denoiser, scheduler=sched,
                                                   add_watermarker=False)
    elif base == "pixart_alpha":
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=denoiser,
                                             scheduler=sched)
    elif base == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(transformer=denoiser, scheduler=sched, vae=vae, text_encoder=None,
                                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                                  text_encoder_3=None, tokenizer_3=None)
    elif base.startswith("flux"):
        pipe = diffusers.FluxPipeline(transformer=denoiser, scheduler=sched, vae=vae, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None)
    else:
        raise ValueError(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_embeds(family: str, seed: int = 0) -> dict:
    """Random prompt embeddings (and added conditioning) for one image, as the family's pipeline takes them."""
    gen = torch.Generator().manual_seed(seed)
    base = base_family(family)
    if base.startswith("pixart_alpha"):
        length, width = 8, TINY_CONFIGS["pixart_alpha"]["caption_channels"]
        mask = torch.ones(1, length, dtype=torch.int64)
        mask[:, 6:] = 0     # padding, as T5 prompts shorter than the sequence length have
        negative_mask = torch.ones(1, length, dtype=torch.int64)
        negative_mask[:, 2:] = 0
        return dict(prompt_embeds=torch.randn(1, length, width, generator=gen), prompt_attention_mask=mask,
                    negative_prompt_embeds=torch.randn(1, length, width, generator=gen),
                    negative_prompt_attention_mask=negative_mask, negative_prompt=None)
    if base in ("sd3", "flux", "flux_schnell"):   # T5 (+ CLIP for SD3) tokens and pooled CLIP embeddings
        config = TINY_CONFIGS[base]
        length, width, pooled = (12 if base == "sd3" else 10), config["joint_attention_dim"], \
            config["pooled_projection_dim"]
        embeds = dict(prompt_embeds=torch.randn(1, length, width, generator=gen),
                      pooled_prompt_embeds=torch.randn(1, pooled, generator=gen))
        if base == "sd3":
            embeds.update(negative_prompt_embeds=torch.randn(1, length, width, generator=gen),
                          negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=gen))
        return embeds
    width = TINY_CONFIGS[base]["cross_attention_dim"]
    embeds = dict(prompt_embeds=torch.randn(1, 77, width, generator=gen))
    if not base.startswith("lcm"):
        embeds["negative_prompt_embeds"] = torch.randn(1, 77, width, generator=gen)
    if "sdxl" in base:
        embeds["pooled_prompt_embeds"] = torch.randn(1, 1280, generator=gen)
        if not base.startswith("lcm"):
            embeds["negative_pooled_prompt_embeds"] = torch.randn(1, 1280, generator=gen)
    return embeds


def text_embeddings(batch: int = 1, length: int = 77, width: int = 768, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, width, generator=gen), torch.randn(batch, length, width, generator=gen)


def runner_inputs(runner) -> tuple:
    """(cond, uncond, added, negative_added) for an artifact runner: prompt embeddings and the added conditioning
    the runner cannot derive itself: SDXL's, SD3's and FLUX's pooled embeddings, PixArt's attention masks (padding
    at the end, the negative prompt shorter, as T5 prompts are). No negative half without CFG (LCM, FLUX)."""
    spec = runner.text["shape"]
    cond, uncond = text_embeddings(1, spec[1], spec[2], seed=2)
    added, negative_added = {}, {}
    if "text_embeds" in runner.added_inputs:
        gen = torch.Generator().manual_seed(1)
        added["text_embeds"], negative_added["text_embeds"] = torch.randn(1, 1280, generator=gen), \
            torch.randn(1, 1280, generator=gen)
    if "pooled_projections" in runner.added_inputs:   # SD3, FLUX: the pooled CLIP embeddings
        gen = torch.Generator().manual_seed(3)
        width = runner.input_shapes["pooled_projections"][1]
        added["pooled_projections"], negative_added["pooled_projections"] = torch.randn(1, width, generator=gen), \
            torch.randn(1, width, generator=gen)
    if "encoder_attention_mask" in runner.added_inputs:
        mask, negative_mask = torch.zeros(1, spec[1]), torch.zeros(1, spec[1])
        mask[:, :12], negative_mask[:, :1] = 1, 1
        added["encoder_attention_mask"], negative_added["encoder_attention_mask"] = mask, negative_mask
    if not runner.cfg:
        return cond, None, added or None, None
    return cond, uncond, added or None, negative_added or None


def lora_adapted(denoiser: torch.nn.Module, seed: int = 2, rank: int = 4) -> torch.nn.Module:
    """A copy of `denoiser` with a random PEFT LoRA on every attention projection (lora_B random, so that it changes
    the output); alpha = rank, as kohya files store it."""
    import copy

    from peft import LoraConfig

    adapted = copy.deepcopy(denoiser)
    adapted.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                   init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return adapted


def write_lora(adapted: torch.nn.Module, path: Path, layout: str = "diffusers") -> Path:
    """The LoRA of `adapted` as people download it: diffusers' save_lora_weights layout or kohya/A1111 names."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(adapted)
    path = Path(path)
    if layout == "kohya":
        save_file(convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()}), str(path))
    else:
        StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
                                                  weight_name=path.name)
    return path


def merged(adapted: torch.nn.Module) -> torch.nn.Module:
    """`adapted` with its LoRA merged by PEFT itself (merge_and_unload), as plain weights."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(adapted)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model
