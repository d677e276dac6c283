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

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from postdiff_compile.models.build import build_denoiser  # noqa: E402
from postdiff_compile.models.families import get_family  # noqa: E402
from postdiff_compile.models.key_maps import RELEASED_PREFIX, original_source  # noqa: E402
from postdiff_compile.models.safetensors_header import DTYPE_BYTES, write_header_only  # noqa: E402

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

# sd3_medium_incl_clips.safetensors: the MMDiT under model.diffusion_model., its 16-channel VAE (no quant
# convolutions) and the CLIP-L / CLIP-G text encoders under text_encoders. (names as diffusers' single-file
# loader reads them).
SD3_EXTRAS = {
    "first_stage_model.decoder.conv_in.weight": (512, 16, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.encoder.conv_out.weight": (32, 512, 3, 3),
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,),
    "text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.weight": (49408, 1280),
    "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": (77, 1280),
    "text_encoders.clip_g.transformer.text_projection.weight": (1280, 1280),
}

# black-forest-labs/FLUX.1-dev keeps its diffusers transformer in three shards.
FLUX_SHARDS = 3


def denoiser_shapes(family: str, layout: str, config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Original-layout {name: shape} of the full-size denoiser of `family` (its bundled config unless `config`),
    fused tensors concatenated, under the prefix the layout's released files carry."""
    spec = get_family(family)
    config = config or spec.config()
    model = build_denoiser(spec.denoiser_class, config, device="meta")
    prefix = RELEASED_PREFIX.get(layout, "")
    groups: dict[str, dict[int, tuple[int, tuple[int, ...]]]] = {}
    counts: dict[str, int] = {}
    for key, tensor in model.state_dict().items():
        src = original_source(layout, key, config, prefix)
        parts = groups.setdefault(src.name, {})
        if src.chunk in parts:
            raise RuntimeError(f"two diffusers tensors map to chunk {src.chunk} of {src.name}")
        parts[src.chunk] = (src.span, tuple(tensor.shape))
        counts[src.name] = src.chunks
    shapes = {}
    for name, parts in groups.items():
        # The parts tile the fused tensor: chunks 0, 1, ... in span units (FLUX's MLP part spans 4 of 7), each
        # unit the same number of rows.
        starts = [0]
        for chunk in sorted(parts):
            starts.append(starts[-1] + parts[chunk][0])
        if sorted(parts) != starts[:-1] or starts[-1] != counts[name]:
            raise RuntimeError(f"{name}: chunks {sorted(parts)} do not tile {counts[name]}")
        first = parts[0][1]
        if any(s[1:] != first[1:] or s[0] * parts[0][0] != first[0] * span for span, s in parts.values()):
            raise RuntimeError(f"{name}: chunks disagree: {parts}")
        shapes[name] = (sum(s[0] for _, s in parts.values()),) + first[1:]
    return shapes


def write_sharded_pipeline(folder: Path, family: str, shards: int, dtype: str) -> None:
    """A diffusers pipeline folder whose transformer/ holds `shards` header-only shards and their index, as
    from_pretrained finds them (model_index.json, transformer/config.json, scheduler/scheduler_config.json)."""
    spec = get_family(family)
    shapes = denoiser_shapes(family, "diffusers")
    names = list(shapes)
    model_dir = folder / spec.kind.pipeline_component
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        filename = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_header_only(model_dir / filename, {n: shapes[n] for n in part}, dtype=dtype)
        weight_map.update({n: filename for n in part})
        total += sum(math.prod(shapes[n]) * DTYPE_BYTES[dtype] for n in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (model_dir / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler(), indent=2) + "\n")
    components = {"scheduler": ["diffusers", spec.scheduler()["_class_name"]],
                  spec.kind.pipeline_component: ["diffusers", spec.denoiser_class]}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", **components}, indent=2) + "\n")
    print(f"{folder.relative_to(ROOT)}: {len(shapes)} tensors in {shards} shards")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fixtures = {   # file -> (shapes, dtype of the released file)
        "sd15_ldm_full.safetensors": ({**denoiser_shapes("sd15", "ldm"), **SD15_EXTRAS}, "F16"),
        "sdxl_sgm_full.safetensors": ({**denoiser_shapes("sdxl", "ldm"), **SDXL_EXTRAS}, "F16"),
        "pixart_alpha_original_full.safetensors": ({**denoiser_shapes("pixart_alpha", "pixart_original"),
                                                    **PIXART_EXTRAS}, "F16"),
        "sd3_medium_original_full.safetensors": ({**denoiser_shapes("sd3", "sd3_original"), **SD3_EXTRAS}, "F16"),
        "sd3_medium_diffusers_full.safetensors": (denoiser_shapes("sd3", "diffusers"), "F16"),
        "flux1_dev_original_full.safetensors": (denoiser_shapes("flux", "flux_original"), "BF16"),
        "flux1_schnell_original_full.safetensors": (denoiser_shapes("flux_schnell", "flux_original"), "BF16"),
    }
    for filename, (shapes, dtype) in fixtures.items():
        path = OUT / filename
        write_header_only(path, shapes, dtype=dtype)
        print(f"{path.relative_to(ROOT)}: {len(shapes)} tensors, {path.stat().st_size} bytes")
    write_sharded_pipeline(OUT / "flux1_dev_diffusers", "flux", FLUX_SHARDS, "BF16")


if __name__ == "__main__":
    main()
