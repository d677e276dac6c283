"""Detect a U-Net: its block structure from LDM/SGM or diffusers tensor names, its family from the
text-conditioning widths (and the input channels, where two families share them), and the diffusers config that
builds it."""
from __future__ import annotations

from dataclasses import dataclass

from .families import consistency_distilled, get_family
from .shape_evidence import CheckedShapes, Detection, NotMatched, Shapes, bounded, count_blocks

# (cross-attention context width, linear transformer projections, added conditioning width) -> base families.
# The two reference models share their text encoder, so their conditioning is the same; what sets them apart is
# the space they denoise: scenes32 takes 3-channel pixels, scenes64 4-channel VAE latents (families.py), and that
# is what their settings depend on (VAE factor, prediction type, the pixel-space x0 clamp). Their block widths
# (32/64/96, 32/64/128) are a size choice and are read from the weights like any other family's.
_SIGNATURES = {(768, False, None): ("sd15",), (1024, True, None): ("sd2",), (2048, True, 2816): ("sdxl",),
               (128, False, None): ("scenes32", "scenes64")}


@dataclass
class _Level:
    channels: int
    resnets: int
    attention_depth: int  # transformer blocks per attention; 0 = no attention at this level


@dataclass
class UNetView:
    """A U-Net's structure as read from one checkpoint layout's tensor names."""
    in_channels: int
    out_channels: int
    levels: list[_Level]
    context_dim: int | None
    linear_projection: bool
    adm_channels: int | None
    mid_attention: bool
    guidance_embedding: int = 0   # LCM: width of the w-embedding (time_embedding.cond_proj), 0 = none


@dataclass(frozen=True)
class _Names:
    """The tensors that give a view's fields, in one checkpoint layout."""
    conv_in: str
    conv_out: str
    added_embedding: str
    mid_attention: str


_LDM = _Names("input_blocks.0.0.weight", "out.2.weight", "label_emb.0.0.weight", "middle_block.1.proj_in.weight")
_DIFFUSERS = _Names("conv_in.weight", "conv_out.weight", "add_embedding.linear_1.weight",
                    "mid_block.attentions.0.proj_in.weight")


def _view(s: Shapes, levels: list[_Level], names: _Names) -> UNetView:
    return UNetView(
        in_channels=s[names.conv_in][1],
        out_channels=s[names.conv_out][0] if names.conv_out in s else s[names.conv_in][1],
        levels=levels,
        context_dim=_context_dim(s),
        linear_projection=_linear_projection(s),
        adm_channels=s[names.added_embedding][1] if names.added_embedding in s else None,
        mid_attention=names.mid_attention in s,
        guidance_embedding=_guidance_width(s),
    )


def ldm_view(shapes: Shapes, prefix: str) -> UNetView:
    s = CheckedShapes({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    levels, current, i = [], None, 1
    while f"input_blocks.{i}.0.op.weight" in s or f"input_blocks.{i}.0.in_layers.0.weight" in s:
        if f"input_blocks.{i}.0.op.weight" in s:
            if current is None:   # found by the fuzzer: a downsample with no resnet before it
                raise NotMatched([f"input_blocks.{i} downsamples a level that has no resnet"])
            levels.append(current)
            current = None
        else:
            channels = s[f"input_blocks.{i}.0.out_layers.3.weight"][0]
            depth = count_blocks(s, f"input_blocks.{i}.1.transformer_blocks.")
            if current is None:
                current = _Level(channels, 0, depth)
            current.resnets += 1
        i += 1
    if current is not None:
        levels.append(current)
    return _view(s, levels, _LDM)


def diffusers_view(s: Shapes) -> UNetView:
    levels, b = [], 0
    while f"down_blocks.{b}.resnets.0.conv1.weight" in s:
        resnets = sum(1 for r in range(64) if f"down_blocks.{b}.resnets.{r}.conv1.weight" in s)
        channels = s[f"down_blocks.{b}.resnets.0.conv2.weight"][0]
        levels.append(_Level(channels, resnets, count_blocks(s, f"down_blocks.{b}.attentions.0.transformer_blocks.")))
        b += 1
    return _view(s, levels, _DIFFUSERS)


def _guidance_width(s: Shapes) -> int:
    # LCM checkpoints converted to the original layout keep the diffusers name of this one tensor (the LDM
    # code has no guidance embedding, so the converters leave it as it is): the same key in both views.
    return s["time_embedding.cond_proj.weight"][1] if "time_embedding.cond_proj.weight" in s else 0


def _context_dim(s: Shapes) -> int | None:
    for k, v in s.items():
        if k.endswith("attn2.to_k.weight"):
            return v[1]
    return None


def _linear_projection(s: Shapes) -> bool:
    return any(k.endswith("proj_in.weight") and len(v) == 2 for k, v in s.items())


def _by_input_channels(candidates: tuple[str, ...], view: UNetView, evidence: list[str]) -> str:
    """The one candidate, or of several the one whose bundled U-Net takes the file's input channels. One
    candidate takes any count (SD1.5 inpainting U-Nets take 9)."""
    if len(candidates) == 1:
        return candidates[0]
    takes = {name: get_family(name).config()["in_channels"] for name in candidates}
    matching = [name for name, channels in takes.items() if channels == view.in_channels]
    if len(matching) != 1:
        shown = ", ".join(f"{name} takes {channels}" for name, channels in takes.items())
        raise NotMatched(evidence + [f"{view.in_channels} input channels ({shown})"])
    return matching[0]


def _closest(view: UNetView) -> tuple[tuple[str, ...], list[str]]:
    """A custom U-Net's closest family by its kind of conditioning (added or not; linear or convolutional
    projections, as SD2 and SD1.x), and what differs from that family's widths."""
    family = "sdxl" if view.adm_channels else ("sd2" if view.linear_projection else "sd15")
    config = get_family(family).config()
    differs = [f"context width {view.context_dim} ({family}: {config['cross_attention_dim']})"]
    if view.adm_channels and view.adm_channels != config.get("projection_class_embeddings_input_dim"):
        differs.append(f"added conditioning width {view.adm_channels} ({family}: "
                       f"{config.get('projection_class_embeddings_input_dim')})")
    return (family,), differs


def detect_unet(view: UNetView, layout: str, prefix: str, allow_custom: bool = False) -> Detection:
    evidence = [
        f"layout {layout}" + (f" (tensor prefix {prefix!r})" if prefix else ""),
        f"cross-attention context width {view.context_dim}",
        f"{'linear' if view.linear_projection else 'convolutional'} transformer projections",
        f"added conditioning width {view.adm_channels}" if view.adm_channels else "no added conditioning",
        f"{len(view.levels)} levels with channels {[lv.channels for lv in view.levels]}",
    ]
    bounded(evidence, levels=len(view.levels), channels=[lv.channels for lv in view.levels],
            layers_per_block=[lv.resnets for lv in view.levels],
            attention_depth=[lv.attention_depth for lv in view.levels], in_channels=view.in_channels,
            out_channels=view.out_channels, context_dim=view.context_dim, adm_channels=view.adm_channels,
            guidance_embedding=view.guidance_embedding)
    candidates = _SIGNATURES.get((view.context_dim, view.linear_projection, view.adm_channels))
    differs: list[str] = []
    if candidates is None and allow_custom and view.levels and view.context_dim:
        candidates, differs = _closest(view)
    if candidates is None or not view.levels:
        raise NotMatched(evidence)
    family = _by_input_channels(candidates, view, evidence)
    spec = get_family(family)
    if view.guidance_embedding:   # an LCM: its base family's U-Net plus the guidance embedding
        spec = consistency_distilled(spec)
        if spec is None:
            raise NotMatched(evidence + [f"a guidance embedding (LCM) on a {family} U-Net, which no known LCM has"])
        evidence.append(f"guidance embedding of width {view.guidance_embedding} (time_embedding.cond_proj): "
                        "consistency-distilled (LCM)")
    config = spec.config()
    if view.guidance_embedding:
        config["time_cond_proj_dim"] = view.guidance_embedding
    resnets = {lv.resnets for lv in view.levels}
    if len(resnets) != 1:
        raise NotMatched(evidence + [f"levels have different resnet counts {sorted(resnets)}"])
    channels = [lv.channels for lv in view.levels]
    config.update(
        in_channels=view.in_channels,
        out_channels=view.out_channels,
        block_out_channels=channels,
        layers_per_block=resnets.pop(),
        down_block_types=["CrossAttnDownBlock2D" if lv.attention_depth else "DownBlock2D" for lv in view.levels],
        up_block_types=["CrossAttnUpBlock2D" if lv.attention_depth else "UpBlock2D" for lv in reversed(view.levels)],
    )
    if spec.head_width:
        # Heads of a fixed width (the config field counts heads, a diffusers legacy name); otherwise a fixed
        # head count at every level, as in the bundled config.
        config["attention_head_dim"] = [max(1, c // spec.head_width) for c in channels]
    if spec.depth_per_level:
        config["transformer_layers_per_block"] = [max(1, lv.attention_depth) for lv in view.levels]
    if not view.mid_attention:
        config["mid_block_type"] = "UNetMidBlock2D"
    if differs:
        config["cross_attention_dim"] = view.context_dim
        if view.adm_channels:
            config["projection_class_embeddings_input_dim"] = view.adm_channels
        evidence.append(f"custom U-Net, closest family {spec.name}: {'; '.join(differs)}")
    else:
        evidence.append(f"family {spec.name}: matched by context width, projection kind and added conditioning"
                        + (f", and {view.in_channels} input channels" if len(candidates) > 1 else ""))
    return Detection(spec.name, layout, prefix, config, spec.prediction_type, evidence, differs)
