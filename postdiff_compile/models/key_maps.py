"""Where each diffusers state-dict tensor lives in a checkpoint of the original (LDM/SGM/PixArt) layout.

`original_source(layout, key, config)` maps one diffusers key to a `Source`: the original tensor name and,
for tensors the original code fuses (PixArt's qkv and kv projections), which chunk of it. Loading walks
the keys the diffusers model expects, so a missing tensor is reported by its original name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    chunk: int = 0
    chunks: int = 1


# Prefixes that the original training code puts in front of the denoiser in a full checkpoint.
LDM_PREFIX = "model.diffusion_model."
_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
    "time_embedding.cond_proj": "time_embedding.cond_proj",   # LCM's guidance embedding: no LDM name exists
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_ldm_name(key: str, config: dict) -> str:
    """diffusers UNet2DConditionModel key -> LDM/SGM `model.diffusion_model.` key (without the prefix)."""
    per = config["layers_per_block"] + 1  # LDM counts each level's downsampler (or extra up resnet) as a block
    for top, ldm in _UNET_TOP.items():
        if key.startswith(top + "."):
            return ldm + key[len(top):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * per + per - 1}.0.op.{rest.removeprefix('conv.')}"
        sub = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"input_blocks.{1 + b * per + i}.{sub}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config["up_block_types"][b]
            return f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.{rest}"
        sub = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"output_blocks.{b * per + i}.{sub}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * i}.{_resnet(rest)}"
    raise KeyError(f"no LDM name known for diffusers key {key!r}")


_PIXART_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
    "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
    "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "proj_out": "final_layer.linear",
}
_PIXART_BLOCK = {
    "attn1.to_q": ("attn.qkv", 0, 3), "attn1.to_k": ("attn.qkv", 1, 3), "attn1.to_v": ("attn.qkv", 2, 3),
    "attn1.to_out.0": ("attn.proj", 0, 1),
    "attn2.to_q": ("cross_attn.q_linear", 0, 1),
    "attn2.to_k": ("cross_attn.kv_linear", 0, 2), "attn2.to_v": ("cross_attn.kv_linear", 1, 2),
    "attn2.to_out.0": ("cross_attn.proj", 0, 1),
    "ff.net.0.proj": ("mlp.fc1", 0, 1), "ff.net.2": ("mlp.fc2", 0, 1),
}


def pixart_original_source(key: str) -> Source:
    """diffusers PixArtTransformer2DModel key -> PixArt (original repository) checkpoint tensor."""
    if key == "scale_shift_table":
        return Source("final_layer.scale_shift_table")
    for top, orig in _PIXART_TOP.items():
        if key.startswith(top + "."):
            return Source(orig + key[len(top):])
    m = re.match(r"transformer_blocks\.(\d+)\.(.*)", key)
    if m:
        n, rest = m[1], m[2]
        if rest == "scale_shift_table":
            return Source(f"blocks.{n}.scale_shift_table")
        module, _, param = rest.rpartition(".")
        if module in _PIXART_BLOCK:
            name, chunk, chunks = _PIXART_BLOCK[module]
            return Source(f"blocks.{n}.{name}.{param}", chunk, chunks)
    raise KeyError(f"no PixArt original name known for diffusers key {key!r}")


def original_source(layout: str, key: str, config: dict, prefix: str = "") -> Source:
    """Where diffusers `key` lives in a checkpoint of `layout` whose denoiser tensors start with `prefix`."""
    if layout == "ldm":
        source = Source(unet_ldm_name(key, config))
    elif layout == "pixart_original":
        source = pixart_original_source(key)
    elif layout == "diffusers":
        source = Source(key)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return Source(prefix + source.name, source.chunk, source.chunks)
