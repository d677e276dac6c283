"""Capture a denoiser into an ATen FX graph with torch.export, one graph per resolution bucket.

Shapes are static: a graph is exported for one CFG batch, one latent size and one text length. That is a
choice, not a shortcut. diffusers' UNet picks its upsampling code from the latent size
(`forward_upsample_size` when a side is not a multiple of 2**num_upsamplers), so a graph traced at one size
is only correct for sizes that take the same path (prior-art-compilers.md 1.2, 4.2). With one graph per
size the path baked in is always the one eager would take, and `upsample_path` records which it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import PostDiffError
from .models.families import FamilySpec, kind_of

# Input names of the ControlNet residuals: CONTROLNET_DOWN + index for each down-path output, and the middle one.
CONTROLNET_DOWN = "controlnet.down."
CONTROLNET_MID = "controlnet.mid"
# The conditioning image input of an artifact's ControlNet graphs: [B, 3, H, W] in [0, 1] at the step's pixel size.
CONTROLNET_COND = "controlnet_cond"
TIMESTEP_DTYPE = torch.float32  # diffusers casts timesteps to float inside the time projection anyway


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}


@dataclass(frozen=True)
class Bucket:
    """What a captured graph is specialised to."""
    batch: int
    latent_height: int
    latent_width: int
    text_length: int
    dtype: torch.dtype

    @property
    def tag(self) -> str:
        return f"b{self.batch}_{self.latent_height}x{self.latent_width}"


class DenoiserCall(torch.nn.Module):
    """The denoiser with positional tensor inputs and one tensor output.

    ExportedProgram.module() replays keyword arguments exactly as exported, so the export boundary takes
    plain positional tensors; the family decides which (`input_specs`), the denoiser's kind how they are passed.
    """

    def __init__(self, denoiser: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.denoiser = denoiser
        self.input_names = input_names
        self.kind = kind_of(denoiser)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs))
        latent = named.pop(self.kind.latent_input)
        down = [named.pop(name) for name in self.input_names if name.startswith(CONTROLNET_DOWN)]
        if down:   # ControlNet residuals, added by the U-Net to its skip connections and middle block output
            named["down_block_additional_residuals"] = tuple(down)
            named["mid_block_additional_residual"] = named.pop(CONTROLNET_MID)
        if self.kind.added_conditions:
            added = {k: named.pop(k) for k in self.kind.added_conditions if k in named}
            if not added:
                added = dict.fromkeys(self.kind.added_conditions) if self.kind.added_conditions_required else None
            named["added_cond_kwargs"] = added
        if self.kind.timestep_divisor != 1.0:
            named["timestep"] = named["timestep"] / self.kind.timestep_divisor   # as the pipeline divides it
        if self.kind.packed_latent:
            out = self.denoiser(pack_latent(latent), return_dict=False, **named)[0]
            return unpack_latent(out, latent.shape[2], latent.shape[3])
        # The rest (timestep, encoder_hidden_states, timestep_cond, encoder_attention_mask, pooled_projections)
        # are forward's own keyword arguments.
        return self.denoiser(latent, return_dict=False, **named)[0]


def pack_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], each 2x2 patch one token, as FluxPipeline._pack_latents."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latent(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latent for a latent of `height` x `width`."""
    b, _, channels = tokens.shape
    grid = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, channels // 4, height, width)


def flux_position_ids(latent: tuple[int, int], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """FLUX's img_ids for a latent of `latent` = (h, w): one row (0, row, column) per packed token, as
    FluxPipeline._prepare_latent_image_ids."""
    rows, cols = latent[0] // 2, latent[1] // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=torch.float32)
    ids[..., 1] = torch.arange(rows, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(rows * cols, 3).to(dtype)


def residual_specs(config: Any, batch: int, height: int, width: int, dtype: torch.dtype) -> list[TensorSpec]:
    """The ControlNet residuals a U-Net takes: one per down-path output (conv_in, every resnet and downsampler of
    every down block) at that output's size, then one for the middle block."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    shapes = [(channels[0], height, width)]
    for i, c in enumerate(channels):
        shapes += [(c, height, width)] * layers[i]
        if i < len(channels) - 1:   # every down block but the last halves the size (stride-2 conv, padding 1)
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((c, height, width))
    return [TensorSpec(f"{CONTROLNET_DOWN}{i}", (batch, *s), dtype) for i, s in enumerate(shapes)] + \
        [TensorSpec(CONTROLNET_MID, (batch, channels[-1], height, width), dtype)]


def time_text_specs(config: Any, family: FamilySpec, batch: int, dtype: torch.dtype) -> list[TensorSpec]:
    """SDXL's text_embeds (the pooled text) and time_ids: 6 for a base, 5 for a refiner (its aesthetic score), told
    apart by the added embedding's input width less the family's pooled width (6 ids without one)."""
    total, per_id = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
    pooled = family.pooled_text_width or total - 6 * per_id
    ids, rest = divmod(total - pooled, per_id)
    if rest or ids < 1:
        raise PostDiffError(f"the added embedding takes {total} values: not {family.name}'s pooled text ({pooled}) and "
                            f"whole time ids of {per_id}")
    return [TensorSpec("text_embeds", (batch, pooled), dtype), TensorSpec("time_ids", (batch, ids), dtype)]


def input_specs(denoiser: torch.nn.Module, family: FamilySpec, bucket: Bucket,
                controlnet: bool = False) -> list[TensorSpec]:
    """The denoiser's inputs for one bucket, in export order; optional ones as its config asks for them, and the
    ControlNet residuals when `controlnet`."""
    config = denoiser.config
    b, h, w, dt = bucket.batch, bucket.latent_height, bucket.latent_width, bucket.dtype
    channels = config["in_channels"] // 4 if family.kind.packed_latent else config["in_channels"]
    specs = [TensorSpec(family.latent_input, (b, channels, h, w), dt),
             TensorSpec("timestep", (b,), TIMESTEP_DTYPE),
             TensorSpec("encoder_hidden_states", (b, bucket.text_length, config[family.text_width_key]), dt)]
    if family.kind.text_mask:
        # 1 = a real token, 0 = padding; the T5 prompts PixArt is trained on are padded to 120 tokens
        specs.append(TensorSpec("encoder_attention_mask", (b, bucket.text_length), dt))
    if config.get("addition_embed_type") == "text_time":   # SDXL's pooled text and size conditioning
        specs += time_text_specs(config, family, b, dt)
    if config.get("time_cond_proj_dim"):   # LCM: the embedding of the guidance scale w
        specs.append(TensorSpec("timestep_cond", (b, config["time_cond_proj_dim"]), dt))
    if config.get("use_additional_conditions"):   # PixArt's resolution and aspect-ratio conditioning
        specs += [TensorSpec("resolution", (b, 2), dt), TensorSpec("aspect_ratio", (b, 1), dt)]
    if config.get("pooled_projection_dim"):       # SD3 and FLUX: pooled CLIP text embeddings
        specs.append(TensorSpec("pooled_projections", (b, config["pooled_projection_dim"]), dt))
    if family.kind.packed_latent:                 # FLUX: rotary positions of the text and image tokens
        specs += [TensorSpec("txt_ids", (bucket.text_length, 3), dt), TensorSpec("img_ids", (h * w // 4, 3), dt)]
        if config.get("guidance_embeds"):         # FLUX-dev: the distilled guidance scale
            # in the latent dtype, as the other inputs: the transformer casts it to that dtype first thing anyway
            specs.append(TensorSpec("guidance", (b,), dt))
    if controlnet:
        if family.kind.packed_latent or "block_out_channels" not in config:
            raise PostDiffError(f"ControlNet residuals are U-Net inputs; {family.name}'s denoiser is not a U-Net")
        specs += residual_specs(config, b, h, w, dt)
    return specs


def upsample_path(denoiser: torch.nn.Module, bucket: Bucket) -> str:
    """Which upsampling code diffusers' UNet takes at this latent size (see the module docstring)."""
    ups = denoiser.num_upsamplers if kind_of(denoiser).size_dependent_upsampling else 0
    if not ups:
        return "none"
    exact = bucket.latent_height % 2**ups == 0 and bucket.latent_width % 2**ups == 0
    return "scale_factor" if exact else "size"


def example_inputs(specs: list[TensorSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fixed random inputs; timesteps are spread over the training range, other tensors are N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        if spec.name == "timestep":
            out.append(torch.randint(0, 1000, spec.shape, generator=gen).to(spec.dtype))
        elif spec.name in ("resolution", "time_ids"):
            out.append(torch.randint(256, 1024, spec.shape, generator=gen).to(spec.dtype))
        elif spec.name == "aspect_ratio":
            out.append(torch.ones(spec.shape, dtype=spec.dtype))
        elif spec.name == "txt_ids":
            out.append(torch.zeros(spec.shape, dtype=spec.dtype))
        elif spec.name == "img_ids":   # positions; any values exercise the rotary embedding
            out.append(torch.randint(0, 64, spec.shape, generator=gen).to(spec.dtype))
        elif spec.name == "guidance":
            out.append(torch.rand(spec.shape, generator=gen).mul(5).to(spec.dtype))
        elif spec.name == "encoder_attention_mask":
            # Real tokens first, the last quarter padding: the masked path is exercised, no row is all padding.
            mask = torch.ones(spec.shape, dtype=spec.dtype)
            mask[:, spec.shape[1] - spec.shape[1] // 4:] = 0
            out.append(mask)
        else:
            out.append(torch.randn(spec.shape, generator=gen).to(spec.dtype))
    return tuple(out)


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    bucket: Bucket
    inputs: list[TensorSpec]
    upsample_path: str
    seconds: float
    family: FamilySpec

    def module(self) -> torch.nn.Module:
        return self.program.module()


def capture(denoiser: torch.nn.Module, family: FamilySpec, bucket: Bucket, controlnet: bool = False) -> Captured:
    """torch.export (non-strict) of the denoiser for one bucket; node metadata keeps nn_module_stack.

    A denoiser on the meta device (no weights) exports too: that is how `explain` counts FLOPs of
    full-size architectures without a checkpoint.
    """
    specs = input_specs(denoiser, family, bucket, controlnet)
    wrapper = DenoiserCall(denoiser, tuple(s.name for s in specs)).eval()
    device = next(denoiser.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(specs))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, args, strict=False)
    except Exception as err:  # torch.export reports many error types; the user needs to know which stage
        raise PostDiffError(f"torch.export failed for {family.name} at {bucket.tag}: {type(err).__name__}: {err}")
    return Captured(program, bucket, specs, upsample_path(denoiser, bucket),
                    time.perf_counter() - start, family)
