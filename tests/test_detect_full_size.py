"""Detection of full-size checkpoints from header-only fixtures, and an independent check of the LDM key map.

The fixtures under tests/fixtures/headers/ (written by tests/make_header_fixtures.py) hold the header of a
full-size checkpoint and no tensor data. The LDM mapping is cross-checked against diffusers' own converter,
and the PixArt names against literal shapes of the released PixArt-XL-2-1024-MS checkpoint, so these tests
do not merely invert the key map that wrote the fixtures.
"""
from __future__ import annotations

import re
import struct
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from tiny_models import original_state_dict, tiny_denoiser  # noqa: E402

from postdiff_compile.errors import PostDiffError  # noqa: E402
from postdiff_compile.models.build import build_denoiser  # noqa: E402
from postdiff_compile.models.detect import detect  # noqa: E402
from postdiff_compile.models.families import get_family  # noqa: E402
from postdiff_compile.models.key_maps import LDM_PREFIX  # noqa: E402
from postdiff_compile.models.safetensors_header import read_header, write_header_only  # noqa: E402

HEADERS = TESTS / "fixtures" / "headers"
SD15 = HEADERS / "sd15_ldm_full.safetensors"
SDXL = HEADERS / "sdxl_sgm_full.safetensors"
PIXART = HEADERS / "pixart_alpha_original_full.safetensors"

# fixture -> (family, layout, prefix)
EXPECTED = {
    SD15: ("sd15", "ldm", LDM_PREFIX),
    SDXL: ("sdxl", "ldm", LDM_PREFIX),
    PIXART: ("pixart_alpha", "pixart_original", ""),
}
UNET_STRUCTURE = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                  "cross_attention_dim", "in_channels", "out_channels")


@lru_cache(maxsize=None)
def meta_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """diffusers {key: shape} of the full-size bundled config, built on the meta device."""
    spec = get_family(family)
    model = build_denoiser(spec.denoiser_class, spec.config(), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _no_data_reads(name):
    raise AssertionError(f"detection tried to read tensor data ({name})")


# --- detection of the full-size fixtures -------------------------------------------------------------------

@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: p.stem)
def test_full_size_fixture_detected(path):
    family, layout, prefix = EXPECTED[path]
    header = read_header(path)
    det = detect(header.shapes, source=str(path), metadata=header.metadata, read_tensor=_no_data_reads)
    assert (det.family, det.layout, det.prefix) == (family, layout, prefix)
    assert det.prediction_type == get_family(family).prediction_type
    bundled = get_family(family).config()
    if family == "pixart_alpha":
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels",
                    "out_channels", "caption_channels", "cross_attention_dim"):
            assert det.config[key] == bundled[key], key
        assert det.config["num_layers"] == 28
        assert det.config["sample_size"] == 128
        assert det.config["use_additional_conditions"] is True
    else:
        for key in UNET_STRUCTURE:
            assert _plain(det.config[key]) == _plain(bundled[key]), key
        assert det.config.get("use_linear_projection", False) == bundled.get("use_linear_projection", False)
        assert det.config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
        if family == "sdxl":
            assert list(det.config["transformer_layers_per_block"]) == [1, 2, 10]
            assert list(det.config["transformer_layers_per_block"]) == list(bundled["transformer_layers_per_block"])
            assert det.config["projection_class_embeddings_input_dim"] == 2816
            assert det.config["addition_embed_type"] == "text_time"
    # The inferred config builds the same model as the bundled one (every key and shape).
    spec = get_family(family)
    built = build_denoiser(spec.denoiser_class, det.config, device="meta")
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == meta_shapes(family)


@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: p.stem)
def test_fixture_is_header_only(path):
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert len(raw) == 8 + header_len  # no tensor data at all
    assert path.stat().st_size < 1_000_000
    header = read_header(path)
    assert header.data_start == header.file_size == 8 + header_len
    assert all(info.dtype == "F16" for info in header.tensors.values())
    # The header promises gigabytes of data that are not there.
    assert max(info.end for info in header.tensors.values()) > 1_000_000_000
    with pytest.raises(PostDiffError, match="truncated"):
        header.check_data_present()


# --- literal names and counts from the released checkpoints ------------------------------------------------

def test_pixart_original_literal_shapes():
    shapes = read_header(PIXART).shapes
    expected = {
        "blocks.0.attn.qkv.weight": (3456, 1152),
        "blocks.0.attn.qkv.bias": (3456,),
        "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.cross_attn.kv_linear.weight": (2304, 1152),
        "blocks.0.cross_attn.q_linear.weight": (1152, 1152),
        "blocks.0.cross_attn.proj.weight": (1152, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.0.scale_shift_table": (6, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "y_embedder.y_proj.fc1.weight": (1152, 4096),
        "y_embedder.y_proj.fc2.weight": (1152, 1152),
        "y_embedder.y_embedding": (120, 4096),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_block.1.weight": (6912, 1152),
        "csize_embedder.mlp.0.weight": (384, 256),
        "ar_embedder.mlp.2.weight": (384, 384),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.scale_shift_table": (2, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "pos_embed": (1, 4096, 1152),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    blocks = {int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    assert blocks == set(range(28))
    # No diffusers-style names leaked into the original layout.
    assert not any(k.startswith(("transformer_blocks.", "adaln_single.", "caption_projection.")) for k in shapes)


@pytest.mark.parametrize("path,count", [(SD15, 686), (SDXL, 1680)], ids=["sd15", "sdxl"])
def test_released_unet_tensor_counts(path, count):
    names = [k for k in read_header(path).shapes if k.startswith(LDM_PREFIX)]
    assert len(names) == count


def test_fixtures_carry_real_non_denoiser_tensors():
    sd15 = read_header(SD15).shapes
    assert sd15["first_stage_model.decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert sd15["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    sdxl = read_header(SDXL).shapes
    assert sdxl["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] == (1280,)
    assert sdxl[LDM_PREFIX + "label_emb.0.0.weight"] == (1280, 2816)
    assert sdxl[LDM_PREFIX + "input_blocks.0.0.weight"] == (320, 4, 3, 3)


# --- independent cross-check of the LDM key map with diffusers' converter ----------------------------------

@pytest.mark.parametrize("path,family", [(SD15, "sd15"), (SDXL, "sdxl")], ids=["sd15", "sdxl"])
def test_diffusers_converter_agrees_full_size(path, family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    # The whole file (VAE and text-encoder names included), as meta tensors of the header's shapes.
    checkpoint = {name: torch.empty(shape, dtype=torch.float16, device="meta")
                  for name, shape in read_header(path).shapes.items()}
    spec = get_family(family)
    config = dict(build_denoiser(spec.denoiser_class, spec.config(), device="meta").config)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    expected = meta_shapes(family)
    assert set(converted) == set(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_diffusers_converter_agrees_tiny(family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = tiny_denoiser(family)
    checkpoint = original_state_dict(model, "ldm", LDM_PREFIX)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(model.config))
    reference = model.state_dict()
    assert set(converted) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(converted[key], tensor), key


# --- unknown architecture ----------------------------------------------------------------------------------

def test_unknown_architecture_names_closest_family(tmp_path):
    shapes = {k: v for k, v in read_header(SD15).shapes.items()
              if "attn2" not in k and k != LDM_PREFIX + "input_blocks.0.0.weight"}
    assert len(shapes) < len(read_header(SD15).shapes) - 80
    broken = tmp_path / "broken.safetensors"
    write_header_only(broken, shapes)
    with pytest.raises(PostDiffError) as info:
        detect(read_header(broken).shapes, source=str(broken), read_tensor=_no_data_reads)
    message = str(info.value)
    assert "unknown architecture" in message
    assert "Closest family: sd15 in ldm layout" in message
    assert "missing: model.diffusion_model.input_blocks.0.0.weight" in message
    assert re.search(r"model\.diffusion_model\.\S*attn2\.\S+", message)
    assert str(broken) in message
