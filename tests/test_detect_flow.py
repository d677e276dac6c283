"""SD3 / SD3.5 and FLUX.1 checkpoints end to end with tiny random models: detection from the shapes, loading
through `load_denoiser` from Stability's / Black Forest Labs' tensor names, diffusers single files, folders and
in-memory models, and the errors of damaged files.

The original-layout writer (tiny_models.original_state_dict) inverts the loader's key map; here it is checked
against diffusers' own SD3 converter tensor for tensor, and test_detect_full_size.py checks both maps against
diffusers' SD3 and FLUX converters at full size, so the round trips are not circular.
"""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY_CONFIGS, original_state_dict, tiny_denoiser, write_checkpoint

from postdiff_compile.errors import PostDiffError
from postdiff_compile.models.detect import detect
from postdiff_compile.models.key_maps import LDM_PREFIX
from postdiff_compile.models.load import load_denoiser

# SD3.5 in small: q/k RMS norms (SD3.5-large and -medium) and a second image attention in some blocks
# (SD3.5-medium's dual_attention_layers). The q norm gives the head width, so the head split is known.
SD35 = dict(TINY_CONFIGS["sd3"], qk_norm="rms_norm", dual_attention_layers=(0, 2))


@functools.lru_cache(maxsize=None)
def _model(family: str) -> torch.nn.Module:
    """A cached tiny model ("sd35": the SD3.5 variant above); tests must not modify it."""
    if family != "sd35":
        return tiny_denoiser(family)
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD35).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _forward(module: torch.nn.Module, family: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    config = module.config
    text = torch.randn(2, 7, config.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=gen)
    if family.startswith("flux"):   # packed latent tokens, rotary ids for 3x4 image tokens and 7 text tokens
        rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
        kw = dict(hidden_states=torch.randn(2, 12, config.in_channels, generator=gen),
                  timestep=torch.tensor([1.0, 0.3]),
                  img_ids=torch.stack([torch.zeros(12), rows.flatten(), cols.flatten()], dim=1),
                  txt_ids=torch.zeros(7, 3), guidance=torch.tensor([3.5, 3.5]) if config.guidance_embeds else None)
    else:
        kw = dict(hidden_states=torch.randn(2, config.in_channels, 16, 16, generator=gen),
                  timestep=torch.tensor([999.0, 17.0]))
    with torch.no_grad():
        return module(encoder_hidden_states=text, pooled_projections=pooled, return_dict=False, **kw)[0]


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def _assert_same_module(loaded: torch.nn.Module, original: torch.nn.Module, family: str) -> None:
    _assert_same_weights(loaded, original)
    assert torch.equal(_forward(loaded, family), _forward(original, family))


# --- the writer against diffusers' converter ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "sd35"])
def test_sd3_writer_agrees_with_the_diffusers_converter(family):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = _model(family)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original_state_dict(model, "sd3_original", LDM_PREFIX))
    reference = model.state_dict()
    assert set(converted) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(converted[key], tensor), key


# --- single files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,layout,prefix", [
    ("sd3", "sd3_original", LDM_PREFIX), ("sd3", "sd3_original", ""), ("sd3", "diffusers", ""),
    ("sd35", "sd3_original", LDM_PREFIX), ("sd35", "diffusers", ""),
    ("flux", "flux_original", ""), ("flux", "flux_original", LDM_PREFIX), ("flux", "diffusers", ""),
    ("flux_schnell", "flux_original", ""), ("flux_schnell", "diffusers", ""),
])
def test_single_file_round_trip(tmp_path, family, layout, prefix):
    model = _model(family)
    path = tmp_path / "model.safetensors"
    save_file(original_state_dict(model, layout, prefix), str(path))
    loaded = load_denoiser(path)
    det = loaded.detection
    assert (det.family, det.layout, det.prefix) == ("sd3" if family == "sd35" else family, layout, prefix)
    assert det.prediction_type == "flow"
    assert loaded.files == [path] and loaded.dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.module.parameters())
    for key in ("num_layers", "in_channels", "joint_attention_dim", "pooled_projection_dim", "num_single_layers",
                "guidance_embeds", "qk_norm", "pos_embed_max_size", "caption_projection_dim", "out_channels"):
        assert det.config.get(key) == model.config.get(key), key
    assert tuple(det.config.get("dual_attention_layers", ())) == tuple(model.config.get("dual_attention_layers", ()))
    if family == "sd3":
        # Without q/k norms a head split leaves no trace in the weights; detection assumes the released 64-wide
        # heads, and for this 16-wide model one head: the same weights, another computation.
        assert (det.config["num_attention_heads"], det.config["attention_head_dim"]) == (1, 16)
        _assert_same_weights(loaded.module, model)
    else:
        assert (det.config["num_attention_heads"], det.config["attention_head_dim"]) == \
            (model.config.num_attention_heads, model.config.attention_head_dim)
        _assert_same_module(loaded.module, model, family)


def test_released_layout_writer_uses_the_released_prefix(tmp_path):
    path = write_checkpoint(_model("sd3"), tmp_path / "sd3.safetensors", "sd3_original",
                            extra={"first_stage_model.decoder.conv_in.weight": torch.randn(8, 16, 3, 3)})
    loaded = load_denoiser(path)
    assert (loaded.detection.layout, loaded.detection.prefix) == ("sd3_original", LDM_PREFIX)
    _assert_same_weights(loaded.module, _model("sd3"))


def test_bf16_flux_file_loads_in_bf16(tmp_path):
    path = write_checkpoint(_model("flux"), tmp_path / "flux.safetensors", "flux_original", dtype=torch.bfloat16)
    loaded = load_denoiser(path)
    assert loaded.dtype == torch.bfloat16
    want = _model("flux").state_dict()
    assert all(torch.equal(t, want[k].to(torch.bfloat16)) for k, t in loaded.module.state_dict().items())


# --- folders and in-memory models ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sharded_diffusers_folder(tmp_path, family):
    model = _model(family)
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("transformer/diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    loaded = load_denoiser(tmp_path / "transformer")
    assert (loaded.detection.family, loaded.detection.layout) == (family, "diffusers")
    assert loaded.files == shards
    assert loaded.module.config.num_attention_heads == model.config.num_attention_heads   # from config.json
    _assert_same_module(loaded.module, model, family)


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux", "flux_schnell"])
def test_in_memory(family):
    model = _model(family)
    loaded = load_denoiser(model)
    assert loaded.module is model
    assert loaded.detection.family == ("sd3" if family == "sd35" else family)
    assert loaded.detection.prediction_type == "flow"


# --- damaged files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,layout,name", [
    ("flux", "flux_original", "double_blocks.1.img_mlp.0.weight"),
    ("flux", "flux_original", "final_layer.adaLN_modulation.1.bias"),      # swapped halves
    ("sd3", "sd3_original", f"{LDM_PREFIX}joint_blocks.5.context_block.adaLN_modulation.1.weight"),  # pre-only
])
def test_missing_tensor_is_named(tmp_path, family, layout, name):
    state = original_state_dict(_model(family), layout, LDM_PREFIX if name.startswith(LDM_PREFIX) else "")
    del state[name]
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path))
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert f"checkpoint detected as {family} ({layout} layout) but 1 of its tensors are missing: {name}" in message


@pytest.mark.parametrize("name,good,bad", [
    ("single_blocks.2.linear1.weight", (224, 32), (225, 32)),            # fused q, k, v and MLP: 7 x 32 rows
    ("final_layer.adaLN_modulation.1.weight", (64, 32), (64, 31)),
])
def test_flux_tensor_with_wrong_shape(tmp_path, name, good, bad):
    state = original_state_dict(_model("flux"), "flux_original")
    assert tuple(state[name].shape) == good
    state[name] = torch.zeros(bad)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path)
    message = str(err.value)
    assert str(path) in message and name in message and "\n" not in message


@pytest.mark.parametrize("family,layout,drop", [
    ("flux", "flux_original", "single_blocks.1.linear1.weight"),
    ("flux", "diffusers", "transformer_blocks.2.attn.add_q_proj.weight"),
    ("sd3", "sd3_original", "joint_blocks.4.x_block.attn.qkv.weight"),
    ("sd3", "diffusers", "transformer_blocks.0.attn.to_q.weight"),
])
def test_block_without_its_projection_is_unknown(family, layout, drop):
    shapes = {k: tuple(v.shape) for k, v in original_state_dict(_model(family), layout).items() if k != drop}
    with pytest.raises(PostDiffError, match=rf"unknown architecture: .*tensor {drop} is missing"):
        detect(shapes, "tiny.safetensors")


def test_image_conditioned_flux_is_not_taken_for_flux():
    # FLUX.1 Fill / Depth / Canny: conditioning channels concatenated to the latent, so more in than out.
    shapes = {k: tuple(v.shape) for k, v in original_state_dict(_model("flux"), "flux_original").items()}
    shapes["img_in.weight"] = (32, 48)
    with pytest.raises(PostDiffError, match="48 input channels but 16 output channels"):
        detect(shapes, "fill.safetensors")


def test_flux_rotary_axes_for_unreleased_head_widths():
    det = detect({k: tuple(v.shape) for k, v in original_state_dict(_model("flux"), "flux_original").items()})
    assert list(det.config["axes_dims_rope"]) == list(TINY_CONFIGS["flux"]["axes_dims_rope"]) == [4, 6, 6]
    assert any("rotary axes [4, 6, 6]" in line for line in det.evidence)
