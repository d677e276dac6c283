"""Detect a PixArt transformer, in the original repository's tensor names or diffusers', and its config."""
from __future__ import annotations

from .families import get_family
from .shape_evidence import Detection, NotMatched, Shapes, bounded, count_blocks

_NAMES = {   # patch embedding, caption projection, final layer, blocks, micro-conditioning (size embedder)
    "pixart_original": ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight",
                        "blocks.", "csize_embedder.mlp.0.weight"),
    "diffusers": ("pos_embed.proj.weight", "caption_projection.linear_1.weight", "proj_out.weight",
                  "transformer_blocks.", "adaln_single.emb.resolution_embedder.linear_1.weight"),
}


def detect_pixart(s: Shapes, layout: str) -> Detection:
    patch_w, caption_w, final_w, blocks, csize = _NAMES[layout]
    inner, in_channels, patch = s[patch_w][0], s[patch_w][1], s[patch_w][2]
    caption_channels = s[caption_w][1]
    evidence = [f"layout {layout}", f"caption width {caption_channels}", f"hidden width {inner}, patch {patch}"]
    if caption_channels != get_family("pixart_alpha").context_dim:
        raise NotMatched(evidence)
    bounded(evidence, channels=inner, in_channels=in_channels, patch_size=patch, num_layers=count_blocks(s, blocks),
            out_channels=s[final_w][0] // (patch * patch) if patch else None)
    additional = csize in s
    if "pos_embed" in s:  # the original checkpoints carry the positional-embedding table at training size
        sample_size = int(round(s["pos_embed"][1] ** 0.5)) * patch
        if not 1 <= sample_size <= 1024:
            raise NotMatched(evidence + [f"positional table of {s['pos_embed'][1]} tokens"])
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
        num_layers=count_blocks(s, blocks),
        num_attention_heads=inner // 72 if inner % 72 == 0 else 1,  # the released models use 72-wide heads
        attention_head_dim=72 if inner % 72 == 0 else inner,
        cross_attention_dim=inner,
        caption_channels=caption_channels,
        sample_size=sample_size,
        use_additional_conditions=additional,
    )
    evidence.append("family pixart_alpha: matched by PixArt tensor names and T5-XXL caption width")
    return Detection("pixart_alpha", layout, "", config, "epsilon", evidence)
