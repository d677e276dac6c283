"""Detect an SD3 / SD3.5 MMDiT, in Stability's tensor names (`joint_blocks.N.x_block...`, as in
sd3_medium.safetensors, under `model.diffusion_model.` or not) or diffusers', and its config from the shapes."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .families import get_family
from .shape_evidence import CheckedShapes, Detection, NotMatched, Shapes, bounded, count_blocks

# All released SD3 / SD3.5 models have 64-wide heads; with the SD3.5 q/k norms the width is in the weights.
_HEAD_WIDTH = 64


@dataclass(frozen=True)
class _Names:
    """The tensors that give the config, in one layout (block tensors follow `blocks` and the block number)."""
    patch: str          # patch embedding: [inner, in_channels, patch, patch]
    context: str        # context embedder: [caption projection width, joint attention width]
    pooled: str         # first layer of the pooled-text embedder: [inner, pooled width]
    final: str          # final projection: [patch * patch * out_channels, inner]
    positions: str      # positional table: [1, max_size ** 2, inner]
    blocks: str
    image_q: str        # image-stream q projection (fused with k and v in the original layout)
    text_q: str         # text-stream q projection
    q_norm: str         # SD3.5's q norm of the image stream: [head width]
    second_q: str       # SD3.5-medium's second image attention (dual_attention_layers)
    fused: int          # rows of image_q / text_q per hidden channel: 3 where q, k and v are one tensor


_NAMES = {
    "sd3_original": _Names("x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight",
                           "final_layer.linear.weight", "pos_embed", "joint_blocks.", "x_block.attn.qkv.weight",
                           "context_block.attn.qkv.weight", "x_block.attn.ln_q.weight", "x_block.attn2.qkv.weight", 3),
    "diffusers": _Names("pos_embed.proj.weight", "context_embedder.weight",
                        "time_text_embed.text_embedder.linear_1.weight", "proj_out.weight", "pos_embed.pos_embed",
                        "transformer_blocks.", "attn.to_q.weight", "attn.add_q_proj.weight", "attn.norm_q.weight",
                        "attn2.to_q.weight", 1),
}


def detect_sd3(shapes: Shapes, layout: str, prefix: str) -> Detection:
    s = CheckedShapes({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    n = _NAMES[layout]
    inner, in_channels, patch = s[n.patch][0], s[n.patch][1], s[n.patch][2]
    caption, joint = s[n.context][0], s[n.context][1]
    layers = count_blocks(s, n.blocks)
    evidence = [f"layout {layout}" + (f" (tensor prefix {prefix!r})" if prefix else ""),
                f"hidden width {inner}, patch {patch}", f"text width {joint}", f"{layers} joint blocks"]
    bounded(evidence, channels=[inner, caption, joint, s[n.pooled][1]], in_channels=in_channels, patch_size=patch,
            num_layers=layers)
    if caption != inner:   # the blocks run both streams at the hidden width
        raise NotMatched(evidence + [f"caption projection width {caption} is not the hidden width {inner}"])
    _check_blocks(s, n, layers, inner, evidence)
    head, heads_evidence = _head_width(s, n, inner)
    evidence.append(heads_evidence)
    table = s[n.positions][1]
    max_size = math.isqrt(table)
    if max_size * max_size != table:
        raise NotMatched(evidence + [f"positional table of {table} tokens is not a square"])
    bounded(evidence, pos_embed_max_size=max_size)
    config = get_family("sd3").config()
    config.update(
        in_channels=in_channels, out_channels=s[n.final][0] // (patch * patch), patch_size=patch, num_layers=layers,
        attention_head_dim=head, num_attention_heads=inner // head, joint_attention_dim=joint,
        caption_projection_dim=caption, pooled_projection_dim=s[n.pooled][1], pos_embed_max_size=max_size,
    )
    # SD3.5 extras, set only when present so that an SD3-medium config equals the bundled one.
    if f"{n.blocks}0.{n.q_norm}" in s:
        config["qk_norm"] = "rms_norm"
        evidence.append("q/k RMS norms (SD3.5)")
    dual = tuple(i for i in range(layers) if f"{n.blocks}{i}.{n.second_q}" in s)
    if dual:
        config["dual_attention_layers"] = dual
        evidence.append(f"second image attention in blocks {list(dual)} (SD3.5-medium)")
    bounded(evidence, out_channels=config["out_channels"])
    evidence.append(f"positional table {max_size}x{max_size}; sample size {config['sample_size']} from the "
                    "bundled config (all released SD3 / SD3.5 models: 1024 px)")
    evidence.append("family sd3: matched by MMDiT joint-block tensor names")
    return Detection("sd3", layout, prefix, config, get_family("sd3").prediction_type, evidence)


def _check_blocks(s: CheckedShapes, n: _Names, layers: int, inner: int, evidence: list[str]) -> None:
    # The block count is the highest block number; every block must have both streams' projections at the
    # hidden width, or a damaged file would be found only when loading (and a header-only file never loads).
    for i in range(layers):
        for name in (n.image_q, n.text_q):
            full = f"{n.blocks}{i}.{name}"
            if tuple(s[full]) != (n.fused * inner, inner):
                raise NotMatched(evidence + [f"tensor {full} has shape {list(s[full])}, expected "
                                             f"{[n.fused * inner, inner]}"])


def _head_width(s: CheckedShapes, n: _Names, inner: int) -> tuple[int, str]:
    norm = f"{n.blocks}0.{n.q_norm}"
    if norm in s:   # SD3.5: the q norm normalises one head
        head = s[norm][0]
        if not 1 <= head <= inner or inner % head:
            raise NotMatched([f"q norm width {head} does not divide the hidden width {inner}"])
        return head, f"heads {head} wide (from {norm})"
    if inner % _HEAD_WIDTH == 0:
        return _HEAD_WIDTH, f"heads {_HEAD_WIDTH} wide (as all released SD3 models)"
    # Not a released width: head count and width do not change any shape, so one head of the whole width.
    return inner, f"hidden width {inner} not a multiple of {_HEAD_WIDTH}: one head"
