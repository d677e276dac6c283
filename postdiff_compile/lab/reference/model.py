"""The reference model's parts and how they make a real diffusers StableDiffusionPipeline.

Pixel space, 32x32 RGB: the "VAE" is the identity (`PixelSpace`), so the pipeline's latents are the image
in [-1, 1] and every step of the pipeline (prompt encoding, CFG, scheduler, decode, postprocess) is
diffusers' own. The text encoder is a small `CLIPTextModel` behind a word-level tokenizer; the denoiser is
a `UNet2DConditionModel` built from SD1.5's block types at toy width. On disk the model is a diffusers
pipeline folder, so `load_denoiser` and the CLI read it like any other folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...models.families import get_family
from ..scenes import vocabulary

FAMILY = "scenes32"       # its UNet and scheduler configs are the family's bundled JSON files
TEXT_LENGTH = get_family(FAMILY).text_length       # 24: BOS + longest caption (21 words and commas) + EOS, + 1
CONTEXT_DIM = get_family(FAMILY).context_dim
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")

TEXT_CONFIG = {
    "hidden_size": CONTEXT_DIM, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": TEXT_LENGTH, "projection_dim": CONTEXT_DIM,
}


@dataclass
class ReferenceParts:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module


def make_tokenizer():
    """A word-level tokenizer over the scene vocabulary: one token per word and per comma."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, ",", *vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()          # splits "left," into "left" ","
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", model_max_length=TEXT_LENGTH)


def make_parts(seed: int = 0) -> ReferenceParts:
    """Freshly initialised parts (what training starts from)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **TEXT_CONFIG)
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel.from_config(get_family(FAMILY).config())
    return ReferenceParts(tokenizer, text_encoder, unet)


def pixel_space():
    """The identity "autoencoder" of a pixel-space model, with the config fields diffusers' pipelines read."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_utils import ModelMixin

    class PixelSpace(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, block_out_channels: tuple = (3,), latent_channels: int = 3, scaling_factor: float = 1.0,
                     force_upcast: bool = False):
            super().__init__()
            # ModelMixin reads its dtype and device from a tensor; an empty buffer gives it one to read.
            self.register_buffer("_anchor", torch.zeros(0), persistent=False)

        def decode(self, z, return_dict: bool = True, generator=None):
            return DecoderOutput(sample=z) if return_dict else (z,)

    return PixelSpace()


def make_pipeline(parts: ReferenceParts, scheduler=None):
    """A real StableDiffusionPipeline over the parts (no safety checker: these are coloured shapes)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = scheduler or DDIMScheduler.from_config(get_family(FAMILY).scheduler())
    # StableDiffusionPipeline's constructor turns clip_sample off (right for latents, with a warning); a pixel-space
    # DDIM needs it, so the pipeline is built around a copy without it and then given the real scheduler.
    stand_in = scheduler.__class__.from_config(scheduler.config, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=pixel_space(), text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=stand_in, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.scheduler = scheduler
    return pipe


def save_folder(parts: ReferenceParts, folder: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the parts as a diffusers pipeline folder (weights as safetensors, fp16 to stay small)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "postdiff_family": FAMILY,
        "note": "postdiff-compile's reference model: pixel space (identity VAE), load with "
                "postdiff_compile.lab.reference.load_pipeline"}, indent=2))
    (folder / "unet" / "config.json").write_text(json.dumps(dict(parts.unet.config), indent=2, default=list))
    save_file({k: v.detach().half().contiguous() for k, v in parts.unet.state_dict().items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"), metadata=metadata)
    parts.text_encoder.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    save_file({k: v.detach().half().contiguous() for k, v in parts.text_encoder.state_dict().items()},
              str(folder / "text_encoder" / "model.safetensors"), metadata=metadata)
    parts.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(get_family(FAMILY).scheduler(), indent=2))


def load_parts(folder: Path, dtype: torch.dtype = torch.float32) -> ReferenceParts:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    folder = Path(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True,
                                                 torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True, torch_dtype=dtype,
                                                low_cpu_mem_usage=False)
    return ReferenceParts(tokenizer, text_encoder.eval(), unet.eval())
