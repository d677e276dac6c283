"""Detect the family, layout and diffusers config of a denoiser from tensor names and shapes alone.

The input is {name: shape}, as read from a safetensors header (no tensor data), a diffusers folder's
weights, or an in-memory state dict. Rules follow ComfyUI's model_detection and diffusers'
single_file_utils (../shared/reference/prior-art-compilers.md section 6): the layout from sentinel keys,
the block structure from counting blocks, the family from the text-conditioning widths.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import PostDiffError
from .families import FAMILIES, get_family
from .key_maps import LDM_PREFIX

if TYPE_CHECKING:
    import torch

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Detection:
    family: str
    layout: str                 # "ldm" (also SGM), "diffusers", "pixart_original"
    prefix: str                 # what the denoiser's tensor names start with in the file
    config: dict                # diffusers config of the denoiser, inferred from the shapes
    prediction_type: str
    evidence: list[str] = field(default_factory=list)


def detect(shapes: Shapes, source: str | None = None, metadata: dict[str, str] | None = None,
           read_tensor: Callable[[str], "torch.Tensor"] | None = None) -> Detection:
    """Family, layout and config of the denoiser in `shapes`, or a PostDiffError saying what came closest.

    `read_tensor(name)` may read one small tensor: SD2's epsilon and v-prediction checkpoints have the same
    shapes, and without metadata the only tell is a weight statistic (ComfyUI's rule).
    """
    try:
        detection = _match(shapes)
    except _NotMatched as err:
        raise _unknown(shapes, source, "the tensor shapes match no known family", err.evidence) from None
    if detection is None:
        raise _unknown(shapes, source, "no known denoiser layout found (LDM/SGM, diffusers or PixArt tensor names)")
    declared = _prediction_from_metadata(metadata)
    if declared:
        detection.prediction_type = declared
        detection.evidence.append(f"prediction type {declared} from the file's metadata")
    elif detection.family == "sd2":
        _sd2_prediction(detection, shapes, read_tensor)
    return detection


def _match(shapes: Shapes) -> Detection | None:
    shapes = _Checked(shapes)
    for prefix in (LDM_PREFIX, ""):
        if f"{prefix}input_blocks.0.0.weight" in shapes:
            return _detect_unet(_ldm_view(shapes, prefix), "ldm", prefix)
    if "conv_in.weight" in shapes and "down_blocks.0.resnets.0.conv1.weight" in shapes:
        return _detect_unet(_diffusers_view(shapes), "diffusers", "")
    if "t_block.1.weight" in shapes and "x_embedder.proj.weight" in shapes:
        return _detect_pixart(shapes, "pixart_original")
    if "adaln_single.linear.weight" in shapes and "pos_embed.proj.weight" in shapes:
        return _detect_pixart(shapes, "diffusers")
    return None


def _sd2_prediction(detection: Detection, shapes: Shapes, read_tensor) -> None:
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


# --- UNets -------------------------------------------------------------------------------------------------

@dataclass
class _Level:
    channels: int
    resnets: int
    attention_depth: int  # transformer blocks per attention; 0 = no attention at this level


@dataclass
class _UNetView:
    in_channels: int
    out_channels: int
    levels: list[_Level]
    context_dim: int | None
    linear_projection: bool
    adm_channels: int | None
    mid_attention: bool
    guidance_embedding: int = 0   # LCM: width of the w-embedding (time_embedding.cond_proj), 0 = none


def _ldm_view(shapes: Shapes, prefix: str) -> _UNetView:
    s = _Checked({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    levels, current, i = [], None, 1
    while f"input_blocks.{i}.0.op.weight" in s or f"input_blocks.{i}.0.in_layers.0.weight" in s:
        if f"input_blocks.{i}.0.op.weight" in s:
            if current is None:   # found by the fuzzer: a downsample with no resnet before it
                raise _NotMatched([f"input_blocks.{i} downsamples a level that has no resnet"])
            levels.append(current)
            current = None
        else:
            channels = s[f"input_blocks.{i}.0.out_layers.3.weight"][0]
            depth = _count(s, f"input_blocks.{i}.1.transformer_blocks.")
            if current is None:
                current = _Level(channels, 0, depth)
            current.resnets += 1
        i += 1
    if current is not None:
        levels.append(current)
    return _UNetView(
        in_channels=s["input_blocks.0.0.weight"][1],
        out_channels=s["out.2.weight"][0] if "out.2.weight" in s else s["input_blocks.0.0.weight"][1],
        levels=levels,
        context_dim=_context_dim(s),
        linear_projection=_linear_projection(s),
        adm_channels=s["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in s else None,
        mid_attention="middle_block.1.proj_in.weight" in s,
        guidance_embedding=_guidance_width(s),
    )


def _diffusers_view(s: Shapes) -> _UNetView:
    levels, b = [], 0
    while f"down_blocks.{b}.resnets.0.conv1.weight" in s:
        resnets = sum(1 for r in range(64) if f"down_blocks.{b}.resnets.{r}.conv1.weight" in s)
        channels = s[f"down_blocks.{b}.resnets.0.conv2.weight"][0]
        levels.append(_Level(channels, resnets, _count(s, f"down_blocks.{b}.attentions.0.transformer_blocks.")))
        b += 1
    return _UNetView(
        in_channels=s["conv_in.weight"][1],
        out_channels=s["conv_out.weight"][0] if "conv_out.weight" in s else s["conv_in.weight"][1],
        levels=levels,
        context_dim=_context_dim(s),
        linear_projection=_linear_projection(s),
        adm_channels=s["add_embedding.linear_1.weight"][1] if "add_embedding.linear_1.weight" in s else None,
        mid_attention="mid_block.attentions.0.proj_in.weight" in s,
        guidance_embedding=_guidance_width(s),
    )


def _guidance_width(s: Shapes) -> int:
    # LCM checkpoints converted to the original layout keep the diffusers name of this one tensor (the LDM
    # code has no guidance embedding, so the converters leave it as it is): the same key in both views.
    return s["time_embedding.cond_proj.weight"][1] if "time_embedding.cond_proj.weight" in s else 0


def _count(s: Shapes, prefix: str) -> int:
    number = re.compile(r"([0-9]{1,9})\.")
    found = {int(m[1]) for k in s if k.startswith(prefix) and (m := number.match(k, len(prefix)))}
    return max(found) + 1 if found else 0


def _context_dim(s: Shapes) -> int | None:
    for k, v in s.items():
        if k.endswith("attn2.to_k.weight"):
            return v[1]
    return None


def _linear_projection(s: Shapes) -> bool:
    return any(k.endswith("proj_in.weight") and len(v) == 2 for k, v in s.items())


def _detect_unet(view: _UNetView, layout: str, prefix: str) -> Detection:
    evidence = [
        f"layout {layout}" + (f" (tensor prefix {prefix!r})" if prefix else ""),
        f"cross-attention context width {view.context_dim}",
        f"{'linear' if view.linear_projection else 'convolutional'} transformer projections",
        f"added conditioning width {view.adm_channels}" if view.adm_channels else "no added conditioning",
        f"{len(view.levels)} levels with channels {[lv.channels for lv in view.levels]}",
    ]
    _bounded(evidence, levels=len(view.levels), channels=[lv.channels for lv in view.levels],
             layers_per_block=[lv.resnets for lv in view.levels],
             attention_depth=[lv.attention_depth for lv in view.levels], in_channels=view.in_channels,
             out_channels=view.out_channels, context_dim=view.context_dim, adm_channels=view.adm_channels,
             guidance_embedding=view.guidance_embedding)
    key = (view.context_dim, view.linear_projection, view.adm_channels)
    family = {(768, False, None): "sd15", (1024, True, None): "sd2", (2048, True, 2816): "sdxl",
              (128, False, None): "scenes32"}.get(key)
    if family is None or not view.levels:
        raise _NotMatched(evidence)
    name = family   # the architecture decisions below are the base family's; LCM only adds the embedding
    if view.guidance_embedding:
        if family not in ("sd15", "sdxl"):
            raise _NotMatched(evidence + [f"a guidance embedding (LCM) on a {family} U-Net, which no known LCM has"])
        name = f"lcm_{family}"
        evidence.append(f"guidance embedding of width {view.guidance_embedding} (time_embedding.cond_proj): "
                        "consistency-distilled (LCM)")
    spec = get_family(name)
    config = spec.config()
    if view.guidance_embedding:
        config["time_cond_proj_dim"] = view.guidance_embedding
    resnets = {lv.resnets for lv in view.levels}
    if len(resnets) != 1:
        raise _NotMatched(evidence + [f"levels have different resnet counts {sorted(resnets)}"])
    channels = [lv.channels for lv in view.levels]
    config.update(
        in_channels=view.in_channels,
        out_channels=view.out_channels,
        block_out_channels=channels,
        layers_per_block=resnets.pop(),
        down_block_types=["CrossAttnDownBlock2D" if lv.attention_depth else "DownBlock2D" for lv in view.levels],
        up_block_types=["CrossAttnUpBlock2D" if lv.attention_depth else "UpBlock2D" for lv in reversed(view.levels)],
    )
    if family in ("sd2", "sdxl"):
        # 64-channel heads (the config field counts heads, a diffusers legacy name); SD1.x and the reference
        # model have a fixed head count at every level, as in their bundled configs.
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
    if family == "sdxl":
        config["transformer_layers_per_block"] = [max(1, lv.attention_depth) for lv in view.levels]
    if not view.mid_attention:
        config["mid_block_type"] = "UNetMidBlock2D"
    evidence.append(f"family {name}: matched by context width, projection kind and added conditioning")
    return Detection(name, layout, prefix, config, spec.prediction_type, evidence)


# --- PixArt ------------------------------------------------------------------------------------------------

def _detect_pixart(s: Shapes, layout: str) -> Detection:
    names = {
        "pixart_original": ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight",
                            "blocks.", "csize_embedder.mlp.0.weight"),
        "diffusers": ("pos_embed.proj.weight", "caption_projection.linear_1.weight", "proj_out.weight",
                      "transformer_blocks.", "adaln_single.emb.resolution_embedder.linear_1.weight"),
    }[layout]
    patch_w, caption_w, final_w, blocks, csize = names
    inner, in_channels, patch = s[patch_w][0], s[patch_w][1], s[patch_w][2]
    caption_channels = s[caption_w][1]
    evidence = [f"layout {layout}", f"caption width {caption_channels}", f"hidden width {inner}, patch {patch}"]
    if caption_channels != get_family("pixart_alpha").context_dim:
        raise _NotMatched(evidence)
    _bounded(evidence, channels=inner, in_channels=in_channels, patch_size=patch, num_layers=_count(s, blocks),
             out_channels=s[final_w][0] // (patch * patch) if patch else None)
    additional = csize in s
    if "pos_embed" in s:  # the original checkpoints carry the positional-embedding table at training size
        sample_size = int(round(s["pos_embed"][1] ** 0.5)) * patch
        if not 1 <= sample_size <= 1024:
            raise _NotMatched(evidence + [f"positional table of {s['pos_embed'][1]} tokens"])
        evidence.append(f"positional table of {s['pos_embed'][1]} tokens: trained at latent {sample_size}")
    else:
        sample_size = 128 if additional else 64
        evidence.append(f"no positional table; {'micro-conditioning present' if additional else 'no micro-conditioning'}"
                        f": assuming training latent {sample_size}")
    config = get_family("pixart_alpha").config()
    config.update(
        in_channels=in_channels,
        out_channels=s[final_w][0] // (patch * patch),
        patch_size=patch,
        num_layers=_count(s, blocks),
        num_attention_heads=inner // 72 if inner % 72 == 0 else 1,  # the released models use 72-wide heads
        attention_head_dim=72 if inner % 72 == 0 else inner,
        cross_attention_dim=inner,
        caption_channels=caption_channels,
        sample_size=sample_size,
        use_additional_conditions=additional,
    )
    evidence.append("family pixart_alpha: matched by PixArt tensor names and T5-XXL caption width")
    return Detection("pixart_alpha", layout, "", config, "epsilon", evidence)


# --- shared ------------------------------------------------------------------------------------------------

class _NotMatched(Exception):
    def __init__(self, evidence: list[str]):
        self.evidence = evidence


class _Dims(tuple):
    """A tensor's shape whose missing dimension is a detection miss, not an IndexError."""
    name = ""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except IndexError:
            raise _NotMatched([f"tensor {self.name} has shape {list(self)}, too few dimensions"]) from None


class _Checked(dict):
    """Shapes as detection reads them: a missing sibling tensor or dimension ends detection with evidence
    (a hostile or damaged header must give the unknown-architecture error, never a KeyError)."""

    def __init__(self, shapes: Shapes):
        super().__init__()
        for name, shape in shapes.items():
            dims = _Dims(shape)
            dims.name = name
            self[name] = dims

    def __missing__(self, key: str):
        raise _NotMatched([f"tensor {key} is missing"])


# Plausibility bounds: a header can claim any count, and building a model of a million blocks (even on the
# meta device) would hang; every released checkpoint is far inside these.
_BOUNDS = {"levels": (1, 8), "layers_per_block": (1, 16), "attention_depth": (0, 64), "channels": (1, 1 << 16),
           "num_layers": (1, 256), "patch_size": (1, 16), "in_channels": (1, 1024), "out_channels": (1, 1024),
           "context_dim": (1, 1 << 16), "guidance_embedding": (0, 1 << 16), "adm_channels": (1, 1 << 16)}


def _bounded(evidence: list[str], **values: int | list[int] | None) -> None:
    for name, value in values.items():
        low, high = _BOUNDS[name]
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not low <= v <= high:
                raise _NotMatched(evidence + [f"{name.replace('_', ' ')} {v} outside [{low}, {high}]"])


def _prediction_from_metadata(metadata: dict[str, str] | None) -> str | None:
    value = (metadata or {}).get("modelspec.prediction_type") or (metadata or {}).get("prediction_type")
    return {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}.get(
        (value or "").lower())


def closest_family(shapes: Shapes) -> tuple[str, str, str, list[str]]:
    """(family, layout, "present/total", missing names) for the best-matching full-size family.

    Names alone do not separate SD1.x from SD2.x (same names, other widths), so a name only counts as
    present when its shape matches too; ties go to the family with more names present.
    """
    from .reference_shapes import layouts_of, reference_table

    best, best_key = None, None
    for family in FAMILIES:   # in the families' order: the first of equal scores wins
        for layout in layouts_of(family):
            ref = reference_table()[f"{family}/{layout}"]
            named = sum(1 for n in ref if n in shapes)
            exact = sum(1 for n, shape in ref.items() if tuple(shapes.get(n, ())) == shape)
            key = (exact / len(ref), named / len(ref))
            if best_key is None or key > best_key:
                best_key = key
                best = (family, layout, f"{named}/{len(ref)}", sorted(n for n in ref if n not in shapes))
    assert best is not None
    return best


def _unknown(shapes: Shapes, source: str | None, why: str, evidence: list[str] | None = None) -> PostDiffError:
    family, layout, present, missing = closest_family(shapes)
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    seen = f" (found: {'; '.join(evidence)})" if evidence else ""
    return PostDiffError(
        f"unknown architecture: {why}{seen}. Closest family: {family} in {layout} layout "
        f"({present} of its tensors present); missing: {shown}",
        source,
    )
