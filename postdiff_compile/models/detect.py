"""Detect the family, layout and diffusers config of a denoiser from tensor names and shapes alone.

The input is {name: shape}, as read from a safetensors header (no tensor data), a diffusers folder's
weights, or an in-memory state dict. Rules follow ComfyUI's model_detection and diffusers'
single_file_utils (../shared/reference/prior-art-compilers.md section 6): the layout from sentinel keys,
the block structure from counting blocks (detect_unet.py, detect_pixart.py, detect_sd3.py, detect_flux.py),
the family from the text-conditioning widths (U-Nets) or the tensor names (transformers). When nothing
matches, the error names the closest family (closest_family.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import PostDiffError
from .closest_family import unknown_architecture
from .detect_flux import detect_flux
from .detect_pixart import detect_pixart
from .detect_sd3 import detect_sd3
from .detect_unet import detect_unet, diffusers_view, ldm_view
from .families import get_family
from .key_maps import LDM_PREFIX
from .shape_evidence import CheckedShapes, Detection, NotMatched, Shapes

if TYPE_CHECKING:
    import torch


def detect(shapes: Shapes, source: str | None = None, metadata: dict[str, str] | None = None,
           read_tensor: Callable[[str], "torch.Tensor"] | None = None, allow_custom: bool = False) -> Detection:
    """Family, layout and config of the denoiser in `shapes`, or a PostDiffError saying what came closest.

    `read_tensor(name)` may read one small tensor: SD2's epsilon and v-prediction checkpoints have the same
    shapes, and without metadata the only tell is a weight statistic (ComfyUI's rule). `allow_custom`: a U-Net
    whose widths match no family is taken as its closest family (detect_unet.py); for sources whose own config
    builds the model (folders, in-memory modules).
    """
    try:
        detection = _match(shapes, allow_custom)
    except NotMatched as err:
        raise unknown_architecture(shapes, source, "the tensor shapes match no known family", err.evidence) from None
    if detection is None:
        raise unknown_architecture(shapes, source,
                                   "no known denoiser layout found (LDM/SGM, diffusers, PixArt, SD3 or FLUX "
                                   "tensor names)")
    declared = _prediction_from_metadata(metadata)
    if declared:
        detection.prediction_type = declared
        detection.evidence.append(f"prediction type {declared} from the file's metadata")
    elif get_family(detection.family).prediction_from_weights:
        _prediction_from_weights(detection, shapes, read_tensor)
    return detection


def _match(shapes: Shapes, allow_custom: bool = False) -> Detection | None:
    shapes = CheckedShapes(shapes)
    for prefix in (LDM_PREFIX, ""):   # SD3 and FLUX files saved by ComfyUI also carry the LDM prefix
        if f"{prefix}input_blocks.0.0.weight" in shapes:
            return detect_unet(ldm_view(shapes, prefix), "ldm", prefix, allow_custom)
        if f"{prefix}x_embedder.proj.weight" in shapes and f"{prefix}context_embedder.weight" in shapes:
            return detect_sd3(shapes, "sd3_original", prefix)   # PixArt's original names have no context embedder
        if f"{prefix}img_in.weight" in shapes and f"{prefix}txt_in.weight" in shapes:
            return detect_flux(shapes, "flux_original", prefix)
    if "conv_in.weight" in shapes and "down_blocks.0.resnets.0.conv1.weight" in shapes:
        return detect_unet(diffusers_view(shapes), "diffusers", "", allow_custom)
    if "t_block.1.weight" in shapes and "x_embedder.proj.weight" in shapes:
        return detect_pixart(shapes, "pixart_original")
    if "adaln_single.linear.weight" in shapes and "pos_embed.proj.weight" in shapes:
        return detect_pixart(shapes, "diffusers")
    if "pos_embed.proj.weight" in shapes and "context_embedder.weight" in shapes:
        return detect_sd3(shapes, "diffusers", "")
    if "x_embedder.weight" in shapes and "context_embedder.weight" in shapes:
        return detect_flux(shapes, "diffusers", "")
    return None


def _prediction_from_weights(detection: Detection, shapes: Shapes, read_tensor) -> None:
    # SD2's v-prediction models have a much larger spread in the first norm bias of the last up attention
    # (ComfyUI model_detection: std > 0.09 means v). Name it in whichever layout the file uses.
    levels = len(detection.config["block_out_channels"])
    per = detection.config["layers_per_block"] + 1
    if detection.layout == "ldm":
        name = f"{detection.prefix}output_blocks.{levels * per - 1}.1.transformer_blocks.0.norm1.bias"
    else:
        name = f"up_blocks.{levels - 1}.attentions.{per - 1}.transformer_blocks.0.norm1.bias"
    if read_tensor is None or name not in shapes:
        detection.evidence.append(f"prediction type {detection.prediction_type}: the family default (no metadata)")
        return
    try:
        std = float(read_tensor(name).float().std())
    except PostDiffError:
        detection.evidence.append(f"prediction type {detection.prediction_type}: the family default "
                                  f"({name} could not be read)")
        return
    detection.prediction_type = "v_prediction" if std > 0.09 else "epsilon"
    detection.evidence.append(f"prediction type {detection.prediction_type}: std({name}) = {std:.3f} "
                              f"{'>' if std > 0.09 else '<='} 0.09")


def _prediction_from_metadata(metadata: dict[str, str] | None) -> str | None:
    value = (metadata or {}).get("modelspec.prediction_type") or (metadata or {}).get("prediction_type")
    return {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}.get(
        (value or "").lower())
