"""Where each diffusers state-dict tensor lives in a checkpoint of the original (LDM/SGM, PixArt, SD3, FLUX) layout.

`original_source(layout, key, config)` maps one diffusers key to a `Source`: the original tensor name and,
for tensors the original code fuses (PixArt's, SD3's and FLUX's qkv projections, FLUX's linear1), which rows
of it. Loading walks the keys the diffusers model expects, so a missing tensor is reported by its original
name. The SD3 and FLUX maps are checked against diffusers' own converters (tests/test_detect_full_size.py at
full size, tests/test_detect_flow.py on tiny SD3 models): those convert whole state dicts and cannot say which
original tensor is missing, and the FLUX one assumes the full-size width (3072), so loading uses this map and
the converters are the independent check.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """Rows [chunk, chunk + span) of the original tensor `name` cut into `chunks` equal parts (a fused projection;
    FLUX's linear1 holds q, k, v and the 4x wider MLP input: chunks 7, the MLP's span 4), with its two halves
    exchanged when `swap` (SD3's and FLUX's final adaLN emits shift then scale, diffusers' scale then shift)."""
    name: str
    chunk: int = 0
    chunks: int = 1
    span: int = 1
    swap: bool = False

    def stored_rows(self, rows: int) -> int:
        """Rows of the original tensor that holds this diffusers tensor of `rows` rows."""
        return rows * self.chunks // self.span

    def take(self, stored):
        """This diffusers tensor out of the original tensor `stored` (exact: a slice, its halves exchanged)."""
        part = stored.shape[0] // self.chunks
        tensor = stored.narrow(0, self.chunk * part, self.span * part) if self.chunks > 1 else stored
        return tensor.roll(tensor.shape[0] // 2, 0) if self.swap else tensor


# Prefixes that the original training code puts in front of the denoiser in a full checkpoint.
LDM_PREFIX = "model.diffusion_model."
# The prefix the released single files of a layout carry (SD1.x/SDXL and sd3_medium.safetensors; the BFL
# FLUX files and PixArt's .pth have none). Detection accepts either; this is what fixtures and the
# reference table use.
RELEASED_PREFIX = {"ldm": LDM_PREFIX, "sd3_original": LDM_PREFIX}
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


# SD3 (Stability's MMDiT code, sd3_medium.safetensors): each joint block is an x_block (image) and a
# context_block (text). The last block's context_block is "pre only": no projection out, no MLP, and its adaLN
# emits shift and scale, which diffusers orders scale, shift (as the final layer's).
_SD3_TOP = {
    "pos_embed.pos_embed": Source("pos_embed"), "pos_embed.proj": Source("x_embedder.proj"),
    "time_text_embed.timestep_embedder.linear_1": Source("t_embedder.mlp.0"),
    "time_text_embed.timestep_embedder.linear_2": Source("t_embedder.mlp.2"),
    "time_text_embed.text_embedder.linear_1": Source("y_embedder.mlp.0"),
    "time_text_embed.text_embedder.linear_2": Source("y_embedder.mlp.2"),
    "context_embedder": Source("context_embedder"), "proj_out": Source("final_layer.linear"),
    "norm_out.linear": Source("final_layer.adaLN_modulation.1", swap=True),
}
_SD3_BLOCK = {
    "norm1.linear": Source("x_block.adaLN_modulation.1"),
    "norm1_context.linear": Source("context_block.adaLN_modulation.1"),
    "attn.to_q": Source("x_block.attn.qkv", 0, 3), "attn.to_k": Source("x_block.attn.qkv", 1, 3),
    "attn.to_v": Source("x_block.attn.qkv", 2, 3),
    "attn.add_q_proj": Source("context_block.attn.qkv", 0, 3),
    "attn.add_k_proj": Source("context_block.attn.qkv", 1, 3),
    "attn.add_v_proj": Source("context_block.attn.qkv", 2, 3),
    "attn.norm_q": Source("x_block.attn.ln_q"), "attn.norm_k": Source("x_block.attn.ln_k"),
    "attn.norm_added_q": Source("context_block.attn.ln_q"), "attn.norm_added_k": Source("context_block.attn.ln_k"),
    "attn.to_out.0": Source("x_block.attn.proj"), "attn.to_add_out": Source("context_block.attn.proj"),
    # SD3.5-medium's second image self-attention (dual_attention_layers)
    "attn2.to_q": Source("x_block.attn2.qkv", 0, 3), "attn2.to_k": Source("x_block.attn2.qkv", 1, 3),
    "attn2.to_v": Source("x_block.attn2.qkv", 2, 3), "attn2.norm_q": Source("x_block.attn2.ln_q"),
    "attn2.norm_k": Source("x_block.attn2.ln_k"), "attn2.to_out.0": Source("x_block.attn2.proj"),
    "ff.net.0.proj": Source("x_block.mlp.fc1"), "ff.net.2": Source("x_block.mlp.fc2"),
    "ff_context.net.0.proj": Source("context_block.mlp.fc1"), "ff_context.net.2": Source("context_block.mlp.fc2"),
}

# FLUX.1 (Black Forest Labs' code, flux1-dev.safetensors): double blocks (image and text streams), then
# single blocks whose linear1 fuses q, k, v and the MLP input. The RMS norms' weights are called `scale`.
_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": Source("time_in.in_layer"),
    "time_text_embed.timestep_embedder.linear_2": Source("time_in.out_layer"),
    "time_text_embed.text_embedder.linear_1": Source("vector_in.in_layer"),
    "time_text_embed.text_embedder.linear_2": Source("vector_in.out_layer"),
    "time_text_embed.guidance_embedder.linear_1": Source("guidance_in.in_layer"),
    "time_text_embed.guidance_embedder.linear_2": Source("guidance_in.out_layer"),
    "context_embedder": Source("txt_in"), "x_embedder": Source("img_in"), "proj_out": Source("final_layer.linear"),
    "norm_out.linear": Source("final_layer.adaLN_modulation.1", swap=True),
}
_FLUX_DOUBLE = {
    "norm1.linear": Source("img_mod.lin"), "norm1_context.linear": Source("txt_mod.lin"),
    "attn.to_q": Source("img_attn.qkv", 0, 3), "attn.to_k": Source("img_attn.qkv", 1, 3),
    "attn.to_v": Source("img_attn.qkv", 2, 3),
    "attn.add_q_proj": Source("txt_attn.qkv", 0, 3), "attn.add_k_proj": Source("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": Source("txt_attn.qkv", 2, 3),
    "attn.norm_q.weight": Source("img_attn.norm.query_norm.scale"),
    "attn.norm_k.weight": Source("img_attn.norm.key_norm.scale"),
    "attn.norm_added_q.weight": Source("txt_attn.norm.query_norm.scale"),
    "attn.norm_added_k.weight": Source("txt_attn.norm.key_norm.scale"),
    "attn.to_out.0": Source("img_attn.proj"), "attn.to_add_out": Source("txt_attn.proj"),
    "ff.net.0.proj": Source("img_mlp.0"), "ff.net.2": Source("img_mlp.2"),
    "ff_context.net.0.proj": Source("txt_mlp.0"), "ff_context.net.2": Source("txt_mlp.2"),
}
_FLUX_SINGLE = {
    "norm.linear": Source("modulation.lin"),
    "attn.to_q": Source("linear1", 0, 7), "attn.to_k": Source("linear1", 1, 7), "attn.to_v": Source("linear1", 2, 7),
    "proj_mlp": Source("linear1", 3, 7, span=4),   # diffusers' FluxSingleTransformerBlock: mlp_ratio 4
    "attn.norm_q.weight": Source("norm.query_norm.scale"), "attn.norm_k.weight": Source("norm.key_norm.scale"),
    "proj_out": Source("linear2"),
}
# diffusers block list -> (original block list, map of what follows the block number), per layout
_STACKS = {
    "sd3_original": {"transformer_blocks": ("joint_blocks", _SD3_BLOCK)},
    "flux_original": {"transformer_blocks": ("double_blocks", _FLUX_DOUBLE),
                      "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE)},
}
_TOPS = {"sd3_original": _SD3_TOP, "flux_original": _FLUX_TOP}


def _in_table(table: dict[str, Source], rest: str, prefix: str = "") -> Source | None:
    # An entry names a module (its weight and bias follow it) or, where the parameter is renamed, one tensor.
    if rest in table:
        return dataclasses.replace(table[rest], name=prefix + table[rest].name)
    module, _, param = rest.rpartition(".")
    if module in table:
        return dataclasses.replace(table[module], name=f"{prefix}{table[module].name}.{param}")
    return None


def mmdit_original_source(layout: str, key: str, config: dict) -> Source:
    """diffusers SD3Transformer2DModel / FluxTransformer2DModel key -> tensor in Stability's / BFL's names."""
    source = _in_table(_TOPS[layout], key)
    m = re.match(r"([a-z_]+)\.(\d+)\.(.*)", key)
    if source is None and m and m[1] in _STACKS[layout]:
        stack, table = _STACKS[layout][m[1]]
        source = _in_table(table, m[3], f"{stack}.{m[2]}.")
        if source is not None and layout == "sd3_original" and m[3].startswith("norm1_context.linear") \
                and int(m[2]) == config["num_layers"] - 1:
            source = dataclasses.replace(source, swap=True)   # the pre-only context block's shift, scale
    if source is None:
        raise KeyError(f"no {layout} name known for diffusers key {key!r}")
    return source


def original_source(layout: str, key: str, config: dict, prefix: str = "") -> Source:
    """Where diffusers `key` lives in a checkpoint of `layout` whose denoiser tensors start with `prefix`."""
    if layout == "ldm":
        source = Source(unet_ldm_name(key, config))
    elif layout == "pixart_original":
        source = pixart_original_source(key)
    elif layout in _TOPS:
        source = mmdit_original_source(layout, key, config)
    elif layout == "diffusers":
        source = Source(key)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return dataclasses.replace(source, name=prefix + source.name)
