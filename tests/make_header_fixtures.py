"""Write header-only safetensors fixtures of full-size checkpoints into tests/fixtures/headers/.

Each file has a valid safetensors header with real tensor names and full-size shapes, and no tensor data,
so detection of a multi-GB checkpoint can be tested from a file of a few hundred KB. The denoiser's names
and shapes come from building the bundled family config on the meta device and mapping every diffusers
key to its original-layout name (fused PixArt tensors are the concatenation of their chunks on dim 0);
the VAE / text-encoder / conditioner names beside the denoiser are real names from the released
checkpoints, added by hand.

Run: python tests/make_header_fixtures.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from postdiff_compile.models.build import build_denoiser  # noqa: E402
from postdiff_compile.models.families import get_family  # noqa: E402
from postdiff_compile.models.key_maps import LDM_PREFIX, original_source  # noqa: E402
from postdiff_compile.models.safetensors_header import write_header_only  # noqa: E402

OUT = Path(__file__).resolve().parent / "fixtures" / "headers"

# Real names and shapes from the released single-file checkpoints (v1-5-pruned-emaonly.safetensors).
SD15_EXTRAS = {
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    "alphas_cumprod": (1000,),
}

# sd_xl_base_1.0.safetensors: CLIP ViT-L (HF layout) and OpenCLIP ViT-bigG (open_clip layout) conditioners.
SDXL_EXTRAS = {
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_fc.weight": (5120, 1280),
}

# PixArt-XL-2-1024-MS.pth: tensors the original model keeps that diffusers drops (the positional table at
# training size, 64x64 patches, and the learned null caption of 120 T5 tokens).
PIXART_EXTRAS = {
    "pos_embed": (1, 4096, 1152),
    "y_embedder.y_embedding": (120, 4096),
}


def denoiser_shapes(family: str, layout: str) -> dict[str, tuple[int, ...]]:
    """Original-layout {name: shape} of the full-size denoiser of `family`, fused tensors concatenated."""
    spec = get_family(family)
    config = spec.config()
    model = build_denoiser(spec.denoiser_class, config, device="meta")
    prefix = LDM_PREFIX if layout == "ldm" else ""
    groups: dict[str, dict[int, tuple[int, ...]]] = {}
    counts: dict[str, int] = {}
    for key, tensor in model.state_dict().items():
        src = original_source(layout, key, config, prefix)
        parts = groups.setdefault(src.name, {})
        if src.chunk in parts:
            raise RuntimeError(f"two diffusers tensors map to chunk {src.chunk} of {src.name}")
        parts[src.chunk] = tuple(tensor.shape)
        counts[src.name] = src.chunks
    shapes = {}
    for name, parts in groups.items():
        if sorted(parts) != list(range(counts[name])):
            raise RuntimeError(f"{name}: chunks {sorted(parts)} of {counts[name]}")
        first = parts[0]
        if any(p[1:] != first[1:] for p in parts.values()):
            raise RuntimeError(f"{name}: chunks disagree beyond dim 0: {parts}")
        shapes[name] = (sum(p[0] for p in parts.values()),) + first[1:]
    return shapes


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fixtures = {
        "sd15_ldm_full.safetensors": {**denoiser_shapes("sd15", "ldm"), **SD15_EXTRAS},
        "sdxl_sgm_full.safetensors": {**denoiser_shapes("sdxl", "ldm"), **SDXL_EXTRAS},
        "pixart_alpha_original_full.safetensors": {**denoiser_shapes("pixart_alpha", "pixart_original"),
                                                   **PIXART_EXTRAS},
    }
    for filename, shapes in fixtures.items():
        path = OUT / filename
        write_header_only(path, shapes, dtype="F16")
        print(f"{path.relative_to(ROOT)}: {len(shapes)} tensors, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
