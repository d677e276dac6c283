"""One spec per model family: the facts about an architecture that loading, capture and passes consult.

Keeping these in one registry keeps `if family == ...` out of the rest of the code (STYLE.md). The facts
about a diffusers denoiser class (U-Net or transformer: its input names, which deep cache it takes) are a
`DenoiserKind`, shared by the families built on that class; code that holds a module and no family looks
its kind up with `kind_of`, and nothing else asks a module what it is.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ..errors import PostDiffError


@dataclass(frozen=True)
class DenoiserKind:
    """What capture, the cache passes and loading need to know about one diffusers denoiser class."""
    denoiser_class: str                 # diffusers class name
    latent_input: str                   # forward's first parameter: "sample" (U-Nets), "hidden_states" (DiTs)
    text_width_key: str                 # the config key holding encoder_hidden_states' width
    text_mask: bool                     # forward takes encoder_attention_mask (T5 prompts are padded)
    added_conditions: tuple[str, ...]   # inputs that travel in forward's added_cond_kwargs
    added_conditions_required: bool     # forward reads added_cond_kwargs even when the model uses none of them
    # "deepcache": DeepCache's deep skip feature (U-Nets, passes/deepcache.py); "block_cache": the residual of
    # the middle transformer blocks (transformers have no skip branches, passes/block_cache.py).
    deep_cache: str
    # forward picks its upsampling code from the latent size (U-Nets: `forward_upsample_size` when a side is
    # not a multiple of 2**num_upsamplers; capture.upsample_path)
    size_dependent_upsampling: bool
    checkpoint_layouts: tuple[str, ...]  # the tensor-name layouts detection reads (models/detect.py)
    pipeline_component: str             # the diffusers pipeline attribute and folder that holds it
    # The block lists the block cache counts, in the order forward runs them (passes/block_cache.py); FLUX runs
    # its double-stream blocks, then its single-stream ones.
    block_stacks: tuple[str, ...] = ("transformer_blocks",)
    # FLUX packs each 2x2 patch of the [B, C, H, W] latent into one token of 4C channels before the transformer
    # and its pipeline steps the scheduler on the packed latent. The capture packs and unpacks inside the graph, so
    # every runtime keeps the latent as [B, C, H, W] (the scheduler step is elementwise: the same numbers).
    packed_latent: bool = False
    # The pipeline passes timestep / timestep_divisor (FLUX: t / 1000; the transformer multiplies it back).
    timestep_divisor: float = 1.0
    # Flow matching (SD3, FLUX): the denoiser predicts the velocity noise - x0 on x_t = (1 - sigma) x0 + sigma noise.
    flow_matching: bool = False
    # The pipeline passes sigmas linspace(1, 1/N, N) to set_timesteps (FluxPipeline; schedulers.timestep_kwargs).
    linspace_sigmas: bool = False


DENOISER_KINDS: dict[str, DenoiserKind] = {
    kind.denoiser_class: kind
    for kind in (
        DenoiserKind("UNet2DConditionModel", "sample", "cross_attention_dim", text_mask=False,
                     added_conditions=("text_embeds", "time_ids"), added_conditions_required=False,
                     deep_cache="deepcache", size_dependent_upsampling=True, checkpoint_layouts=("ldm", "diffusers"),
                     pipeline_component="unet"),
        DenoiserKind("PixArtTransformer2DModel", "hidden_states", "caption_channels", text_mask=True,
                     added_conditions=("resolution", "aspect_ratio"), added_conditions_required=True,
                     deep_cache="block_cache", size_dependent_upsampling=False,
                     checkpoint_layouts=("pixart_original", "diffusers"),
                     pipeline_component="transformer"),
        # SD3 / SD3.5 MMDiT: joint text-image blocks; the pooled CLIP embeddings are a plain forward argument.
        DenoiserKind("SD3Transformer2DModel", "hidden_states", "joint_attention_dim", text_mask=False,
                     added_conditions=(), added_conditions_required=False, deep_cache="block_cache",
                     size_dependent_upsampling=False, checkpoint_layouts=("sd3_original", "diffusers"),
                     pipeline_component="transformer", flow_matching=True),
        # FLUX.1: 19 double-stream then 38 single-stream blocks, rotary positions from img_ids / txt_ids.
        DenoiserKind("FluxTransformer2DModel", "hidden_states", "joint_attention_dim", text_mask=False,
                     added_conditions=(), added_conditions_required=False, deep_cache="block_cache",
                     size_dependent_upsampling=False, checkpoint_layouts=("flux_original", "diffusers"),
                     pipeline_component="transformer",
                     block_stacks=("transformer_blocks", "single_transformer_blocks"), packed_latent=True,
                     timestep_divisor=1000.0, flow_matching=True, linspace_sigmas=True),
    )
}


def kind_of(denoiser: object) -> DenoiserKind:
    """The kind of a denoiser module: its class, or the nearest base class, that DENOISER_KINDS knows."""
    for cls in type(denoiser).__mro__:
        if cls.__name__ in DENOISER_KINDS:
            return DENOISER_KINDS[cls.__name__]
    raise PostDiffError(f"{type(denoiser).__name__} is not a denoiser class postdiff-compile knows "
                        f"({', '.join(DENOISER_KINDS)} or a subclass)")


@dataclass(frozen=True)
class FamilySpec:
    name: str
    denoiser_class: str            # diffusers class name
    denoiser_config: str           # bundled JSON under models/configs/
    scheduler_config: str          # bundled JSON under models/configs/
    prediction_type: str           # the released checkpoints' default
    context_dim: int               # text-embedding width the denoiser attends to
    text_length: int               # text tokens per prompt in the released pipelines
    vae_scale_factor: int = 8      # pixels per latent pixel
    latent_multiple: int = 1       # latent H and W must be multiples of this (patch size for DiTs)
    min_latent: int = 8            # smallest latent side accepted
    max_latent: int = 512          # largest latent side accepted (4096 px)
    # Consistency-distilled (LCM) variants: guidance is an input of the U-Net (the w-embedding of width
    # `guidance_embedding`, diffusers' time_cond_proj_dim), so the pipeline runs one batch per step, no CFG.
    guidance_embedding: int = 0
    default_steps: int = 20        # the step count presets are tuned for and compile uses by default
    # Detection (models/detect_unet.py): U-Nets whose attention heads are `head_width` channels wide at every
    # level (the config's attention_head_dim then counts heads per level; 0: a fixed head count, as bundled),
    # and whose transformer depth differs per level (transformer_layers_per_block).
    head_width: int = 0
    depth_per_level: bool = False
    # Epsilon and v-prediction checkpoints of this family have the same shapes; without metadata one weight's
    # spread tells them apart (models/detect.py).
    prediction_from_weights: bool = False
    # The diffusers pipeline class whose LoRA loader reads this family's LoRA files (kohya names included);
    # empty: LoRA refit is not supported (models/lora.py).
    lora_loader: str = "StableDiffusionPipeline"
    # The pipeline's default latent side where the denoiser config has no sample_size (FLUX); 0: config's.
    default_latent: int = 0
    # The released pipeline's default guidance scale (LatentConsistencyModelPipeline's 8.5; FLUX-dev's guidance
    # embedding takes it as an input); an artifact's runner defaults to it.
    default_guidance: float = 7.5
    # SDXL: the pooled text embedding's width (text_encoder_2's projection); the rest of the U-Net's added
    # embedding input is the time ids, 6 for a base (sizes and crop) and 5 for a refiner (the aesthetic score
    # instead of the target size). 0: no pooled text (capture.input_specs).
    pooled_text_width: int = 0

    def __post_init__(self) -> None:
        if self.denoiser_class not in DENOISER_KINDS:
            raise ValueError(f"family {self.name}: no DenoiserKind for {self.denoiser_class}")

    @property
    def kind(self) -> DenoiserKind:
        return DENOISER_KINDS[self.denoiser_class]

    @property
    def latent_input(self) -> str:
        return self.kind.latent_input

    @property
    def text_width_key(self) -> str:
        return self.kind.text_width_key

    @property
    def deep_cache(self) -> str:
        return self.kind.deep_cache

    @property
    def checkpoint_layouts(self) -> tuple[str, ...]:
        return self.kind.checkpoint_layouts

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether the pipeline batches a negative and a positive half (False for LCM and FLUX, whose guidance
        is distilled into the model: dev takes the scale as an input, schnell none)."""
        return self.guidance_embedding == 0 and not self.kind.packed_latent

    @property
    def flow_matching(self) -> bool:
        return self.kind.flow_matching

    @property
    def default_resolution(self) -> tuple[int, int]:
        side = (self.default_latent or self.config()["sample_size"]) * self.vae_scale_factor
        return side, side

    def config(self) -> dict:
        config = copy.deepcopy(_load_json(self.denoiser_config))
        if self.guidance_embedding:
            config["time_cond_proj_dim"] = self.guidance_embedding
        return config

    def scheduler(self) -> dict:
        return copy.deepcopy(_load_json(self.scheduler_config))

    def check_steps(self, steps: int, scheduler: dict | None = None, source: str | None = None) -> int:
        """`steps` if the family's scheduler can take that many denoising steps (one timestep each)."""
        train = (scheduler or self.scheduler()).get("num_train_timesteps", 1000)
        if not 1 <= steps <= train:
            raise PostDiffError(f"--steps must be in [1, {train}] (the {self.name} scheduler has {train} training "
                                f"timesteps), got {steps}", source)
        return steps

    def check_resolution(self, height: int, width: int, source: str | None = None) -> tuple[int, int]:
        """The latent size for an image size, or a clear error if this family cannot take it."""
        step = self.vae_scale_factor * self.latent_multiple
        for name, value in (("height", height), ("width", width)):
            if value % step:
                raise PostDiffError(
                    f"{self.name} cannot take {name} {value}: image sides must be multiples of {step} "
                    f"(VAE factor {self.vae_scale_factor} x latent multiple {self.latent_multiple})",
                    source,
                )
            latent = value // self.vae_scale_factor
            if not self.min_latent <= latent <= self.max_latent:
                raise PostDiffError(
                    f"{self.name} cannot take {name} {value}: image sides must be between "
                    f"{self.min_latent * self.vae_scale_factor} and {self.max_latent * self.vae_scale_factor}",
                    source,
                )
        return height // self.vae_scale_factor, width // self.vae_scale_factor


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("sd15", "UNet2DConditionModel", "sd15_unet.json", "sd15_scheduler.json", "epsilon", 768, 77),
        FamilySpec("sd2", "UNet2DConditionModel", "sd2_unet.json", "sd2_scheduler.json", "v_prediction", 1024, 77,
                   head_width=64, prediction_from_weights=True),
        FamilySpec("sdxl", "UNet2DConditionModel", "sdxl_unet.json", "sdxl_scheduler.json", "epsilon", 2048, 77,
                   head_width=64, depth_per_level=True, lora_loader="StableDiffusionXLPipeline",
                   pooled_text_width=1280),
        FamilySpec("pixart_alpha", "PixArtTransformer2DModel", "pixart_alpha_transformer.json",
                   "pixart_alpha_scheduler.json", "epsilon", 4096, 120, latent_multiple=2, lora_loader=""),
        # LCM-distilled U-Nets (SimianLuo/LCM_Dreamshaper_v7, latent-consistency/lcm-sdxl): the base family's
        # architecture plus the guidance embedding, LCMScheduler, 4 steps.
        FamilySpec("lcm_sd15", "UNet2DConditionModel", "sd15_unet.json", "lcm_scheduler.json", "epsilon", 768, 77,
                   guidance_embedding=256, default_steps=4, default_guidance=8.5),
        FamilySpec("lcm_sdxl", "UNet2DConditionModel", "sdxl_unet.json", "lcm_scheduler.json", "epsilon", 2048, 77,
                   guidance_embedding=256, default_steps=4, default_guidance=8.5, head_width=64, depth_per_level=True,
                   lora_loader="StableDiffusionXLPipeline", pooled_text_width=1280),
        # The reference model trained here (postdiff_compile/lab/reference): pixel space, 32x32, two downsamples.
        FamilySpec("scenes32", "UNet2DConditionModel", "scenes32_unet.json", "scenes32_scheduler.json", "epsilon",
                   128, 24, vae_scale_factor=1, latent_multiple=4, max_latent=128),
        # Reference model 2 (postdiff_compile/lab/reference2, issue 25): model 1's text encoder on a latent U-Net
        # (4 channels, VAE factor 2, 64x64 images); two downsamples, so latent sides are multiples of 4, and the
        # same latent range as scenes32's U-Net of about the same size. Its scheduler is v-prediction with zero
        # terminal SNR: a single file has no scheduler, so detection takes the prediction type from here.
        FamilySpec("scenes64", "UNet2DConditionModel", "scenes64_unet.json", "scenes64_scheduler.json",
                   "v_prediction", 128, 24, vae_scale_factor=2, latent_multiple=4, max_latent=128),
        # Flow-matching transformers. Text: SD3 joins 77 CLIP tokens and 256 T5 tokens (max_sequence_length 256);
        # FLUX-dev's pipeline pads T5 to 512, schnell's to 256. Both VAEs have 16 channels and factor 8; SD3
        # patchifies 2x2 and FLUX packs 2x2, so latent sides are even. SD3.5-medium and -large are the sd3 family
        # with another config (detected from the checkpoint).
        FamilySpec("sd3", "SD3Transformer2DModel", "sd3_transformer.json", "sd3_scheduler.json", "flow", 4096,
                   333, latent_multiple=2, default_steps=28, lora_loader="", default_guidance=7.0),
        FamilySpec("flux", "FluxTransformer2DModel", "flux_dev_transformer.json", "flux_dev_scheduler.json", "flow",
                   4096, 512, latent_multiple=2, default_steps=28, lora_loader="", default_latent=128,
                   default_guidance=3.5),
        FamilySpec("flux_schnell", "FluxTransformer2DModel", "flux_schnell_transformer.json",
                   "flux_schnell_scheduler.json", "flow", 4096, 256, latent_multiple=2, default_steps=4,
                   lora_loader="", default_latent=128, default_guidance=0.0),
    )
}


def consistency_distilled(base: FamilySpec) -> FamilySpec | None:
    """The LCM family distilled from `base` (the same U-Net plus a guidance embedding), if there is one."""
    return next((spec for spec in FAMILIES.values()
                 if spec.guidance_embedding and spec.denoiser_config == base.denoiser_config), None)


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise PostDiffError(f"unknown family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


@lru_cache(maxsize=None)
def _load_json(filename: str) -> dict:
    return json.loads(resources.files(__package__).joinpath("configs").joinpath(filename).read_text())
