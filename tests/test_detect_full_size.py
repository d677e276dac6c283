"""Detection of full-size checkpoints from header-only fixtures, and independent checks of the key maps.

The fixtures under tests/fixtures/headers/ (written by tests/make_header_fixtures.py) hold the header of a
full-size checkpoint and no tensor data. The LDM, SD3 and FLUX mappings are cross-checked against diffusers'
own converters, and the PixArt, SD3 and FLUX names against literal shapes of the released checkpoints, so
these tests do not merely invert the key map that wrote the fixtures.
"""
from __future__ import annotations

import math
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


# --- SD3 and FLUX.1 full-size fixtures ---------------------------------------------------------------------

SD3_ORIGINAL = HEADERS / "sd3_medium_original_full.safetensors"
SD3_DIFFUSERS = HEADERS / "sd3_medium_diffusers_full.safetensors"
FLUX_DEV = HEADERS / "flux1_dev_original_full.safetensors"
FLUX_SCHNELL = HEADERS / "flux1_schnell_original_full.safetensors"
FLUX_DEV_FOLDER = HEADERS / "flux1_dev_diffusers"   # a pipeline folder, its transformer in three shards

# Published sizes of the denoisers. FLUX.1 dev and schnell: "12B" on the model cards, 11.9 B transformer
# parameters. SD3-medium: "2B" on the model card; 2.028e9 is what diffusers' SD3Transformer2DModel counts for
# the SD3-medium config (sum of .parameters()), 1.4% over the rounded 2.0e9. Its files also hold the
# 192x192 positional table (56.6 M values, a fixed sin-cos buffer, not a parameter): 2.085e9 with it.
SD3_PARAMETERS, FLUX_PARAMETERS = 2.028e9, 11.9e9
SD3_POSITIONS = 192 * 192 * 1536

# fixture -> (family, layout, prefix, dtype of the released file, published parameters)
FLOW_EXPECTED = {
    SD3_ORIGINAL: ("sd3", "sd3_original", LDM_PREFIX, "F16", SD3_PARAMETERS),
    SD3_DIFFUSERS: ("sd3", "diffusers", "", "F16", SD3_PARAMETERS),
    FLUX_DEV: ("flux", "flux_original", "", "BF16", FLUX_PARAMETERS),
    FLUX_SCHNELL: ("flux_schnell", "flux_original", "", "BF16", FLUX_PARAMETERS),
}


def _folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} over a sharded diffusers folder's shards, as the loader reads them (through the index)."""
    from postdiff_compile.models.load import _folder_weights

    shapes = {}
    for shard in _folder_weights(folder / "transformer"):
        shapes.update(read_header(shard).shapes)
    return shapes


def _denoiser_parameters(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    # The denoiser's tensors (the SD3 single file also holds its VAE and text encoders), less the positional
    # table, which is not a parameter.
    return sum(math.prod(shape) for name, shape in shapes.items()
               if name.startswith(prefix) and name.removeprefix(prefix) not in ("pos_embed", "pos_embed.pos_embed"))


@pytest.mark.parametrize("path", list(FLOW_EXPECTED), ids=lambda p: p.stem)
def test_flow_fixture_detected(path):
    family, layout, prefix, _, _ = FLOW_EXPECTED[path]
    header = read_header(path)
    det = detect(header.shapes, source=str(path), metadata=header.metadata, read_tensor=_no_data_reads)
    assert (det.family, det.layout, det.prefix) == (family, layout, prefix)
    assert det.prediction_type == get_family(family).prediction_type == "flow"
    assert det.config == get_family(family).config()   # every field, with the bundled values
    spec = get_family(family)
    built = build_denoiser(spec.denoiser_class, det.config, device="meta")
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == meta_shapes(family)


def test_flux_sharded_pipeline_folder_detected():
    shapes = _folder_shapes(FLUX_DEV_FOLDER)
    det = detect(shapes, source=str(FLUX_DEV_FOLDER), read_tensor=_no_data_reads)
    assert (det.family, det.layout, det.prefix) == ("flux", "diffusers", "")
    assert det.config == get_family("flux").config()
    assert shapes == meta_shapes("flux")
    assert len(list((FLUX_DEV_FOLDER / "transformer").glob("diffusion_pytorch_model-0000?-of-00003.safetensors"))) == 3


@pytest.mark.parametrize("source", [FLUX_DEV_FOLDER, FLUX_DEV_FOLDER / "transformer"], ids=["pipeline", "model"])
def test_flux_sharded_folder_loads_up_to_the_missing_data(source):
    # The loader detects the shards (through the index), checks the folder's config against the shapes, and
    # stops at the first shard whose data is not there: a header-only fixture cannot load further.
    from postdiff_compile.models.load import load_denoiser

    with pytest.raises(PostDiffError, match="file is truncated") as info:
        load_denoiser(source)
    assert "diffusion_pytorch_model-00001-of-00003.safetensors" in str(info.value)


@pytest.mark.parametrize("path", list(FLOW_EXPECTED), ids=lambda p: p.stem)
def test_flow_parameter_counts_match_the_published_sizes(path):
    _, _, prefix, dtype, published = FLOW_EXPECTED[path]
    shapes = read_header(path).shapes
    assert abs(_denoiser_parameters(shapes, prefix) / published - 1) < 0.005
    assert all(info.dtype == dtype for info in read_header(path).tensors.values())
    if path in (SD3_ORIGINAL, SD3_DIFFUSERS):
        assert math.prod(shapes[prefix + ("pos_embed" if path == SD3_ORIGINAL else "pos_embed.pos_embed")]) \
            == SD3_POSITIONS


def test_flux_sharded_parameter_count():
    assert abs(_denoiser_parameters(_folder_shapes(FLUX_DEV_FOLDER), "") / FLUX_PARAMETERS - 1) < 0.005


@pytest.mark.parametrize("path", [*FLOW_EXPECTED, *sorted((FLUX_DEV_FOLDER / "transformer").glob("*.safetensors"))],
                         ids=lambda p: p.stem)
def test_flow_fixture_is_header_only(path):
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert len(raw) == 8 + header_len < 300_000
    with pytest.raises(PostDiffError, match="truncated"):
        read_header(path).check_data_present()


def test_flow_literal_shapes():
    # Shapes of the released files: diffusers' single-file loader tells SD3 by a 9216-wide (6 x 1536) context
    # modulation and SD3-medium by a positional table of 36864 (192 x 192) tokens; BFL's FLUX code has a
    # 3072-wide stream, 24 heads of 128 and an MLP 4x as wide, whose input linear1 fuses with q, k, v.
    sd3 = read_header(SD3_ORIGINAL).shapes
    expected_sd3 = {
        "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 36864, 1536),
        "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536), "joint_blocks.23.x_block.mlp.fc1.weight": (6144, 1536),
        "joint_blocks.23.context_block.adaLN_modulation.1.weight": (3072, 1536),   # the pre-only last block
        "x_embedder.proj.weight": (1536, 16, 2, 2), "context_embedder.weight": (1536, 4096),
        "y_embedder.mlp.0.weight": (1536, 2048), "t_embedder.mlp.0.weight": (1536, 256),
        "final_layer.linear.weight": (64, 1536), "final_layer.adaLN_modulation.1.weight": (3072, 1536),
    }
    for name, shape in expected_sd3.items():
        assert sd3.get(LDM_PREFIX + name) == shape, name
    assert LDM_PREFIX + "joint_blocks.23.context_block.mlp.fc1.weight" not in sd3
    assert sd3["text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"] == (77, 768)
    flux = read_header(FLUX_DEV).shapes
    expected_flux = {
        "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
        "time_in.in_layer.weight": (3072, 256), "guidance_in.in_layer.weight": (3072, 256),
        "double_blocks.0.img_mod.lin.weight": (18432, 3072), "double_blocks.18.txt_attn.qkv.weight": (9216, 3072),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,), "double_blocks.0.img_mlp.0.weight": (12288, 3072),
        "single_blocks.37.linear1.weight": (21504, 3072), "single_blocks.0.linear2.weight": (3072, 15360),
        "single_blocks.0.modulation.lin.weight": (9216, 3072), "final_layer.adaLN_modulation.1.weight": (6144, 3072),
        "final_layer.linear.weight": (64, 3072),
    }
    for name, shape in expected_flux.items():
        assert flux.get(name) == shape, name
    assert "double_blocks.19.img_attn.qkv.weight" not in flux and "single_blocks.38.linear1.weight" not in flux
    assert set(read_header(FLUX_SCHNELL).shapes) == {k for k in flux if not k.startswith("guidance_in.")}


# --- independent cross-check of the SD3 and FLUX key maps with diffusers' converters -----------------------

def _numbered(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """One int64 value per row, distinct across all tensors: a converter that moves rows shows where they went."""
    return {name: torch.arange(shape[0], dtype=torch.int64) + i * 1_000_000 for i, (name, shape) in
            enumerate(shapes.items())}


@pytest.mark.parametrize("path,family", [(SD3_ORIGINAL, "sd3"), (FLUX_DEV, "flux"), (FLUX_SCHNELL, "flux_schnell")],
                         ids=["sd3", "flux", "flux_schnell"])
def test_diffusers_converter_agrees_full_size_rows(path, family):
    # diffusers' converters split and swap rows only (dim 0), so one number per row at full size checks which
    # rows of each fused tensor feed each diffusers tensor, including FLUX's 3072-wide linear1 split (its
    # converter hard-codes that width, so no tiny FLUX can go through it).
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    from postdiff_compile.models.key_maps import original_source

    _, layout, prefix, _, _ = FLOW_EXPECTED[path]
    stored = _numbered({k: v for k, v in read_header(path).shapes.items() if k.startswith(prefix)})
    convert = convert_sd3_transformer_checkpoint_to_diffusers if family == "sd3" else \
        convert_flux_transformer_checkpoint_to_diffusers
    converted = convert(dict(stored))
    expected = meta_shapes(family)
    assert set(converted) == set(expected)
    config = get_family(family).config()
    for key, shape in expected.items():
        src = original_source(layout, key, config, prefix)
        assert torch.equal(src.take(stored[src.name]), converted[key]), key
        assert converted[key].shape[0] == shape[0], key


def test_unknown_flux_names_closest_family(tmp_path):
    shapes = dict(read_header(FLUX_DEV).shapes)
    del shapes["double_blocks.0.img_attn.qkv.weight"]
    broken = tmp_path / "flux-broken.safetensors"
    write_header_only(broken, shapes, dtype="BF16")
    with pytest.raises(PostDiffError) as info:
        detect(read_header(broken).shapes, source=str(broken), read_tensor=_no_data_reads)
    message = str(info.value)
    assert "\n" not in message and str(broken) in message
    assert "unknown architecture" in message
    assert "Closest family: flux in flux_original layout (779/780 of its tensors present)" in message
    assert message.endswith("missing: double_blocks.0.img_attn.qkv.weight")


def test_flux_with_a_changed_shape_names_it(tmp_path):
    shapes = dict(read_header(FLUX_SCHNELL).shapes)
    shapes["single_blocks.20.linear1.weight"] = (21504, 3000)
    with pytest.raises(PostDiffError) as info:
        detect(shapes, source="schnell.safetensors", read_tensor=_no_data_reads)
    message = str(info.value)
    assert "Closest family: flux_schnell in flux_original layout" in message
    assert "single_blocks.20.linear1.weight has shape [21504, 3000], expected [21504, 3072]" in message
    assert message.endswith("(776/776 of its tensors present); other shapes: single_blocks.20.linear1.weight")


@pytest.mark.parametrize("prefix", [LDM_PREFIX, ""], ids=["released", "prefix-stripped"])
def test_unknown_sd3_names_closest_family(tmp_path, prefix):
    shapes = {k.replace(LDM_PREFIX, prefix): v for k, v in read_header(SD3_ORIGINAL).shapes.items()
              if k != LDM_PREFIX + "joint_blocks.3.context_block.attn.qkv.weight"}
    with pytest.raises(PostDiffError) as info:
        detect(shapes, source="sd3.safetensors", read_tensor=_no_data_reads)
    message = str(info.value)
    assert "Closest family: sd3 in sd3_original layout (490/491 of its tensors present)" in message
    assert message.endswith(f"missing: {prefix}joint_blocks.3.context_block.attn.qkv.weight")


def test_comfyui_prefixed_flux_is_detected_and_diagnosed():
    shapes = {LDM_PREFIX + k: v for k, v in read_header(FLUX_DEV).shapes.items()}
    det = detect(shapes, source="comfy.safetensors", read_tensor=_no_data_reads)
    assert (det.family, det.layout, det.prefix) == ("flux", "flux_original", LDM_PREFIX)
    del shapes[LDM_PREFIX + "single_blocks.7.linear1.weight"]
    with pytest.raises(PostDiffError, match=r"Closest family: flux in flux_original layout .*missing: "
                                            r"model\.diffusion_model\.single_blocks\.7\.linear1\.weight$"):
        detect(shapes, source="comfy.safetensors", read_tensor=_no_data_reads)
