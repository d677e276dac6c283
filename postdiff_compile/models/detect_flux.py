"""Detect a FLUX.1 transformer, in Black Forest Labs' tensor names (`double_blocks.N.img_attn...`, as in
flux1-dev.safetensors, under `model.diffusion_model.` or not) or diffusers', its config from the shapes, and
dev or schnell from the guidance embedder (dev is guidance-distilled and takes the scale as an input)."""
from __future__ import annotations

from dataclasses import dataclass

from .families import get_family
from .shape_evidence import CheckedShapes, Detection, NotMatched, Shapes, bounded, count_blocks

# diffusers' FluxSingleTransformerBlock: an MLP 4x the hidden width, fused in the original linear1 with q, k, v.
_MLP_RATIO = 4


@dataclass(frozen=True)
class _Names:
    """The tensors that give the config, in one layout (block tensors follow a block list and the number)."""
    image_in: str       # [inner, in_channels]
    text_in: str        # [inner, joint attention width]
    pooled_in: str      # first layer of the pooled-text embedder: [inner, pooled width]
    time_in: str        # first layer of the timestep embedder: [inner, 256]
    guidance_in: str    # first layer of the guidance embedder (FLUX.1-dev only)
    final: str          # [out_channels, inner]
    double: str
    single: str
    image_q: str        # double block image-stream q (fused with k and v in the original layout)
    text_q: str         # double block text-stream q
    single_q: str       # single block q (fused with k, v and the MLP input in the original layout)
    q_norm: str         # double block q norm: [head width]
    fused: int          # rows of image_q / text_q per hidden channel
    single_fused: int   # rows of single_q per hidden channel


_NAMES = {
    "flux_original": _Names("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "time_in.in_layer.weight",
                            "guidance_in.in_layer.weight", "final_layer.linear.weight", "double_blocks.",
                            "single_blocks.", "img_attn.qkv.weight", "txt_attn.qkv.weight", "linear1.weight",
                            "img_attn.norm.query_norm.scale", 3, 3 + _MLP_RATIO),
    "diffusers": _Names("x_embedder.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                        "time_text_embed.timestep_embedder.linear_1.weight",
                        "time_text_embed.guidance_embedder.linear_1.weight", "proj_out.weight", "transformer_blocks.",
                        "single_transformer_blocks.", "attn.to_q.weight", "attn.add_q_proj.weight",
                        "attn.to_q.weight", "attn.norm_q.weight", 1, 1),
}


def detect_flux(shapes: Shapes, layout: str, prefix: str) -> Detection:
    s = CheckedShapes({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    n = _NAMES[layout]
    inner, in_channels = s[n.image_in][0], s[n.image_in][1]
    joint, pooled, out_channels = s[n.text_in][1], s[n.pooled_in][1], s[n.final][0]
    double, single = count_blocks(s, n.double), count_blocks(s, n.single)
    evidence = [f"layout {layout}" + (f" (tensor prefix {prefix!r})" if prefix else ""), f"hidden width {inner}",
                f"text width {joint}, pooled width {pooled}", f"{double} double and {single} single blocks"]
    bounded(evidence, channels=[inner, joint, pooled, s[n.time_in][0]], in_channels=in_channels,
            out_channels=out_channels, num_layers=[double, single])
    if in_channels != out_channels:
        # FLUX.1 Fill / Depth / Canny concatenate conditioning-image channels to the latent: another pipeline.
        raise NotMatched(evidence + [f"{in_channels} input channels but {out_channels} output channels "
                                     "(an image-conditioned FLUX: Fill, Depth or Canny)"])
    _check_blocks(s, n, double, single, inner, evidence)
    head = s[f"{n.double}0.{n.q_norm}"][0]   # the q norm normalises one head
    if not 1 <= head <= inner or inner % head:
        raise NotMatched(evidence + [f"q norm width {head} does not divide the hidden width {inner}"])
    guidance = n.guidance_in in s
    family = "flux" if guidance else "flux_schnell"
    config = get_family(family).config()
    config.update(
        in_channels=in_channels, num_layers=double, num_single_layers=single, attention_head_dim=head,
        num_attention_heads=inner // head, joint_attention_dim=joint, pooled_projection_dim=pooled,
        guidance_embeds=guidance, axes_dims_rope=_rope_axes(head, config["axes_dims_rope"], evidence),
    )
    evidence.append(f"heads {head} wide (from the q norm)")
    evidence.append(f"family {family}: FLUX.1 tensor names, " + ("a guidance embedder (dev)" if guidance else
                                                                 "no guidance embedder (schnell)"))
    return Detection(family, layout, prefix, config, get_family(family).prediction_type, evidence)


def _check_blocks(s: CheckedShapes, n: _Names, double: int, single: int, inner: int, evidence: list[str]) -> None:
    # The block counts are the highest block numbers; every block must have its projections at the hidden
    # width, or a damaged file would be found only when loading (and a header-only file never loads).
    wanted = [(f"{n.double}{i}.{name}", n.fused) for i in range(double) for name in (n.image_q, n.text_q)]
    wanted += [(f"{n.single}{i}.{n.single_q}", n.single_fused) for i in range(single)]
    for name, fused in wanted:
        if tuple(s[name]) != (fused * inner, inner):
            raise NotMatched(evidence + [f"tensor {name} has shape {list(s[name])}, expected {[fused * inner, inner]}"])


def _rope_axes(head: int, bundled: list[int], evidence: list[str]) -> list[int]:
    # The rotary axes (position id, row, column) hold no weights; they fill the head. Released FLUX.1 models use
    # the bundled split; another head width gets three even parts, the first the smallest (16 -> 4, 6, 6).
    if sum(bundled) == head:
        return list(bundled)
    if head % 2:
        raise NotMatched(evidence + [f"odd head width {head} (rotary embeddings need an even one)"])
    pairs = head // 2
    axes = [2 * (pairs // 3)] * 3
    for i in range(pairs % 3):
        axes[2 - i] += 2
    evidence.append(f"rotary axes {axes} for heads {head} wide (no released model has them)")
    return axes
