"""load_denoiser end to end on tiny random models: every family and layout, dtypes, diffusers folders, in-memory
objects, SD2's prediction-type rule and the errors a user sees.

Round trips compare the loaded module with the module the checkpoint was written from: the same tensor names,
bit-identical tensors and an identical forward output, so the config inferred from shapes (heads, block types,
projections, patch size) is the one the weights were trained with.
"""
from __future__ import annotations

import functools
import json
import types

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY_CONFIGS, ldm_extras, original_state_dict, tiny_denoiser, write_checkpoint

from postdiff_compile.errors import PostDiffError
from postdiff_compile.models.key_maps import LDM_PREFIX
from postdiff_compile.models.load import load_denoiser

ROUND_TRIPS = [
    ("sd15", "ldm"), ("sd15", "diffusers"),
    ("sd2", "ldm"), ("sd2", "diffusers"),
    ("sdxl", "ldm"), ("sdxl", "diffusers"),
    ("pixart_alpha", "pixart_original"), ("pixart_alpha", "diffusers"),
    ("lcm_sd15", "ldm"), ("lcm_sd15", "diffusers"), ("lcm_sdxl", "ldm"),
]
CONTEXT = {"sd15": 768, "sd2": 1024, "sdxl": 2048, "lcm_sd15": 768, "lcm_sdxl": 2048}
PIXART_DEFAULT_SAMPLE = 64  # what detection assumes for a PixArt file without a positional table or micro-conditions


# --- helpers -----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _model(family: str, sample_size: int | None = None) -> torch.nn.Module:
    """A cached tiny model; tests must not modify it. `sample_size` rebuilds PixArt with another training size."""
    if sample_size is None:
        return tiny_denoiser(family)
    from diffusers import PixArtTransformer2DModel

    assert family == "pixart_alpha"
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**{**TINY_CONFIGS[family], "sample_size": sample_size}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _round_trip_model(family: str) -> torch.nn.Module:
    # A PixArt single file without a positional table cannot say its training size, so detection assumes the
    # released 512 px model's; the tiny PixArt is rebuilt at that size for the plain round trip (the
    # positional-table case has its own test below).
    return _model(family, PIXART_DEFAULT_SAMPLE if family == "pixart_alpha" else None)


def _inputs(family: str) -> dict:
    gen = torch.Generator().manual_seed(1234)
    timestep = torch.tensor([999.0, 17.0])
    if family == "pixart_alpha":
        return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=gen),
                    encoder_hidden_states=torch.randn(2, 8, 4096, generator=gen), timestep=timestep,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    kw = dict(sample=torch.randn(2, 4, 16, 16, generator=gen), timestep=timestep,
              encoder_hidden_states=torch.randn(2, 77, CONTEXT[family], generator=gen))
    if family.endswith("sdxl"):
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(2, 1280, generator=gen),
                                       time_ids=torch.randn(2, 6, generator=gen))
    if family.startswith("lcm"):
        kw["timestep_cond"] = torch.randn(2, 256, generator=gen)
    return kw


def _forward(module: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return module(**_inputs(family), return_dict=False)[0]


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module, dtype: torch.dtype | None = None):
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        expected = tensor if dtype is None else tensor.to(dtype)
        assert got[key].dtype == expected.dtype, key
        assert torch.equal(got[key], expected), key


def _assert_same_module(loaded: torch.nn.Module, original: torch.nn.Module, family: str):
    _assert_same_weights(loaded, original)
    out, ref = _forward(loaded, family), _forward(original, family)
    assert out.shape == ref.shape
    assert torch.equal(out, ref), f"max difference {(out - ref).abs().max().item()}"


def _state(family: str, layout: str) -> dict[str, torch.Tensor]:
    prefix = LDM_PREFIX if layout == "ldm" else ""
    return original_state_dict(_model(family), layout, prefix)


def _message(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert str(path) in message, message
    return message


# --- 1. single files, every family and layout --------------------------------------------------------------

@pytest.mark.parametrize("family,layout", ROUND_TRIPS)
def test_single_file_round_trip(tmp_path, family, layout):
    model = _round_trip_model(family)
    extra = ldm_extras() if layout == "ldm" else None
    path = write_checkpoint(model, tmp_path / "model.safetensors", layout, extra=extra)
    loaded = load_denoiser(path)
    assert (loaded.detection.family, loaded.detection.layout) == (family, layout)
    assert loaded.detection.prefix == (LDM_PREFIX if layout == "ldm" else "")
    assert loaded.files == [path]
    assert loaded.dtype == torch.float32
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    _assert_same_module(loaded.module, model, family)


def test_lcm_guidance_embedding_under_its_single_file_name(tmp_path):
    # Original-layout LCM files keep the diffusers name of the guidance embedding under the LDM prefix (the
    # LDM code has no such module): "model.diffusion_model.time_embedding.cond_proj.weight", as checkpoint
    # readers such as stable-diffusion.cpp list it. Spelled out here, not taken from the key map.
    model = _model("lcm_sd15")
    state = _state("lcm_sd15", "ldm")
    name = "model.diffusion_model.time_embedding.cond_proj.weight"
    assert name in state
    marker = torch.full_like(state[name], 0.125)
    path = tmp_path / "lcm.safetensors"
    save_file({**state, name: marker}, str(path))
    loaded = load_denoiser(path)
    assert loaded.detection.family == "lcm_sd15"
    assert loaded.module.config.time_cond_proj_dim == 256
    assert torch.equal(loaded.module.time_embedding.cond_proj.weight, marker)
    assert any("LCM" in line for line in loaded.detection.evidence)
    # Without that tensor the same file is a plain SD1.5 U-Net.
    del state[name]
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert load_denoiser(tmp_path / "plain.safetensors").detection.family == "sd15"
    assert model.config.time_cond_proj_dim == 256


# The writer above uses the loader's own key map, so a mistake made the same way in both would round-trip.
# These names are spelled out by hand from the original repositories' module trees (for the tiny configs:
# one resnet per level, so LDM block i+1 is level i's resnet and block 2 its downsampler), and a marker put
# under each must come out in the stated diffusers parameter.
LITERAL_NAMES = {
    ("sd15", "ldm"): [
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
        ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
        ("input_blocks.2.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("input_blocks.3.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
        ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
        ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
        ("output_blocks.1.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("output_blocks.3.1.proj_out.weight", "up_blocks.1.attentions.1.proj_out.weight"),
        ("output_blocks.2.0.emb_layers.1.weight", "up_blocks.1.resnets.0.time_emb_proj.weight"),
        ("time_embed.2.weight", "time_embedding.linear_2.weight"),
        ("out.0.weight", "conv_norm_out.weight"),
        ("out.2.weight", "conv_out.weight"),
    ],
    ("sdxl", "ldm"): [
        ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
        ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
        ("input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight",
         "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k.weight"),
        ("output_blocks.1.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),  # after an attention
        ("output_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
         "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2.weight"),
    ],
    ("pixart_alpha", "pixart_original"): [
        ("blocks.0.attn.qkv.weight", ("transformer_blocks.0.attn1.to_q.weight",
                                      "transformer_blocks.0.attn1.to_k.weight",
                                      "transformer_blocks.0.attn1.to_v.weight")),
        ("blocks.1.cross_attn.kv_linear.bias", ("transformer_blocks.1.attn2.to_k.bias",
                                                "transformer_blocks.1.attn2.to_v.bias")),
        ("blocks.1.cross_attn.q_linear.weight", "transformer_blocks.1.attn2.to_q.weight"),
        ("blocks.0.mlp.fc2.weight", "transformer_blocks.0.ff.net.2.weight"),
        ("blocks.1.scale_shift_table", "transformer_blocks.1.scale_shift_table"),
        ("final_layer.scale_shift_table", "scale_shift_table"),
        ("final_layer.linear.weight", "proj_out.weight"),
        ("t_block.1.weight", "adaln_single.linear.weight"),
        ("t_embedder.mlp.0.weight", "adaln_single.emb.timestep_embedder.linear_1.weight"),
        ("y_embedder.y_proj.fc2.weight", "caption_projection.linear_2.weight"),
        ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    ],
}


@pytest.mark.parametrize("family,layout", list(LITERAL_NAMES))
def test_original_names_reach_the_right_parameters(tmp_path, family, layout):
    prefix = LDM_PREFIX if layout == "ldm" else ""
    state = dict(_state(family, layout))
    gen = torch.Generator().manual_seed(99)
    markers = {}
    for name, targets in LITERAL_NAMES[(family, layout)]:
        name = prefix + name
        assert name in state, name
        state[name] = torch.randn(state[name].shape, generator=gen) + 10.0  # far from any real weight
        targets = (targets,) if isinstance(targets, str) else targets
        for target, part in zip(targets, state[name].chunk(len(targets), dim=0)):
            markers[target] = part
    path = tmp_path / "marked.safetensors"
    save_file(state, str(path))
    got = load_denoiser(path).module.state_dict()
    for target, marker in markers.items():
        assert torch.equal(got[target], marker), target


def test_pixart_original_positional_table_gives_the_training_size(tmp_path):
    # Original PixArt checkpoints carry `pos_embed` [1, tokens, width]; its length fixes sample_size, which the
    # positional embedding of every other input size depends on (base_size = sample_size / patch).
    model = _model("pixart_alpha")
    assert model.config.sample_size != PIXART_DEFAULT_SAMPLE
    table = model.pos_embed.pos_embed.detach().clone()
    path = write_checkpoint(model, tmp_path / "pixart.safetensors", "pixart_original", extra={"pos_embed": table})
    loaded = load_denoiser(path)
    assert loaded.module.config.sample_size == model.config.sample_size
    assert any("positional table" in line for line in loaded.detection.evidence)
    _assert_same_module(loaded.module, model, "pixart_alpha")


def test_pixart_without_positional_table_assumes_released_size(tmp_path):
    model = _model("pixart_alpha")  # trained (built) at sample_size 16
    path = write_checkpoint(model, tmp_path / "pixart.safetensors", "diffusers")
    loaded = load_denoiser(path)
    assert loaded.module.config.sample_size == PIXART_DEFAULT_SAMPLE
    assert any("assuming training latent 64" in line for line in loaded.detection.evidence)
    _assert_same_weights(loaded.module, model)


# --- 2. dtypes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("file_dtype,requested,expected", [
    (torch.float16, None, torch.float16),
    (torch.float16, "float32", torch.float32),
    (torch.float16, "bfloat16", torch.bfloat16),
    (torch.float32, "fp16", torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, None, torch.bfloat16),
])
def test_dtype(tmp_path, file_dtype, requested, expected):
    model = _model("sd15")
    path = write_checkpoint(model, tmp_path / "model.safetensors", "ldm", extra=ldm_extras(), dtype=file_dtype)
    loaded = load_denoiser(path, dtype=requested)
    assert loaded.dtype == expected
    assert {p.dtype for p in loaded.module.state_dict().values()} == {expected}
    # Values are the file's, cast once: fp32 -> fp16 -> fp32 loses what fp16 cannot hold and nothing else.
    reference = {k: v.to(file_dtype).to(expected) for k, v in model.state_dict().items()}
    got = loaded.module.state_dict()
    assert set(got) == set(reference)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


@pytest.mark.parametrize("majority,minority", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_dtype_file_loads_in_the_majority_dtype(tmp_path, majority, minority):
    model = _model("sd15")
    state = {k: v.to(majority) for k, v in _state("sd15", "ldm").items()}
    odd = [f"{LDM_PREFIX}out.0.weight", f"{LDM_PREFIX}middle_block.1.norm.bias"]
    for name in odd:
        state[name] = state[name].to(minority)
    state.update(ldm_extras())  # fp32 VAE/text-encoder tensors do not count: they are not the denoiser's
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    loaded = load_denoiser(path)
    assert loaded.dtype == majority
    got = loaded.module.state_dict()
    assert {v.dtype for v in got.values()} == {majority}
    assert torch.equal(got["conv_norm_out.weight"], state[odd[0]].to(majority))
    assert torch.equal(got["mid_block.attentions.0.norm.bias"], state[odd[1]].to(majority))
    want = model.state_dict()
    assert all(torch.equal(got[k], want[k].to(majority)) for k in want if k not in
               ("conv_norm_out.weight", "mid_block.attentions.0.norm.bias"))


# --- 3. diffusers folders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart_alpha"])
def test_diffusers_model_folder(tmp_path, family):
    model = _model(family)  # PixArt at sample_size 16: the folder's config.json says so, no guessing
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    loaded = load_denoiser(tmp_path / "model")
    assert (loaded.detection.family, loaded.detection.layout) == (family, "diffusers")
    assert loaded.files == [tmp_path / "model" / "diffusion_pytorch_model.safetensors"]
    assert loaded.module.config.sample_size == model.config.sample_size
    assert any("config.json" in line for line in loaded.detection.evidence)
    _assert_same_module(loaded.module, model, family)


def test_diffusers_model_folder_fp16_variant(tmp_path):
    model = _model("sd15")
    model.to(torch.float16).save_pretrained(tmp_path / "model", safe_serialization=True, variant="fp16")
    model.to(torch.float32)  # the cached model is shared; put it back
    assert (tmp_path / "model" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = load_denoiser(tmp_path / "model")
    assert loaded.dtype == torch.float16
    _assert_same_weights(loaded.module, model, torch.float16)


def _pipeline_folder(root, model, subfolder: str, scheduler: dict | None):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       subfolder: ["diffusers", type(model).__name__]}))
    model.save_pretrained(root / subfolder, safe_serialization=True)
    if scheduler is not None:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


def test_diffusers_pipeline_folder_takes_prediction_type_from_scheduler(tmp_path):
    model = _model("sd2")
    root = _pipeline_folder(tmp_path / "pipe", model, "unet",
                            {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"})
    # The weights alone say epsilon (small norm1 spread in the tiny model); the scheduler overrides them.
    assert load_denoiser(root / "unet").detection.prediction_type == "epsilon"
    loaded = load_denoiser(root)
    assert (loaded.detection.family, loaded.detection.layout) == ("sd2", "diffusers")
    assert loaded.detection.prediction_type == "v_prediction"
    assert any("scheduler" in line for line in loaded.detection.evidence)
    assert loaded.files == [root / "unet" / "diffusion_pytorch_model.safetensors"]
    _assert_same_module(loaded.module, model, "sd2")


def test_diffusers_pipeline_folder_with_transformer(tmp_path):
    model = _model("pixart_alpha")
    root = _pipeline_folder(tmp_path / "pipe", model, "transformer", None)
    loaded = load_denoiser(root)
    assert loaded.detection.family == "pixart_alpha"
    assert loaded.detection.prediction_type == "epsilon"
    _assert_same_module(loaded.module, model, "pixart_alpha")


def test_sharded_diffusers_weights(tmp_path):
    model = _model("sd15")
    model.save_pretrained(tmp_path / "model", safe_serialization=True, max_shard_size="50KB")
    index = tmp_path / "model" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file()
    assert not (tmp_path / "model" / "diffusion_pytorch_model.safetensors").exists()
    shards = sorted(tmp_path.glob("model/diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    assert set(json.loads(index.read_text())["weight_map"].values()) == {s.name for s in shards}
    loaded = load_denoiser(tmp_path / "model")
    assert loaded.files == shards
    _assert_same_module(loaded.module, model, "sd15")


# --- 4. in-memory objects ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family,attr", [("sd15", "unet"), ("sdxl", "unet"), ("pixart_alpha", "transformer")])
def test_in_memory(family, attr):
    model = _model(family)
    direct = load_denoiser(model)
    assert direct.module is model
    assert (direct.detection.family, direct.detection.layout) == (family, "diffusers")
    assert direct.files == []
    pipe = types.SimpleNamespace(**{attr: model})
    via_pipe = load_denoiser(pipe)
    assert via_pipe.module is model
    assert via_pipe.detection.family == family
    assert via_pipe.detection.config["sample_size"] == model.config.sample_size  # the module's own config


def test_in_memory_pipeline_scheduler_sets_prediction_type():
    pipe = types.SimpleNamespace(unet=_model("sd2"), scheduler=types.SimpleNamespace(
        config={"prediction_type": "v_prediction"}))
    loaded = load_denoiser(pipe)
    assert loaded.detection.family == "sd2"
    assert loaded.detection.prediction_type == "v_prediction"


def test_in_memory_rejects_other_objects():
    with pytest.raises(PostDiffError, match="expected a path, a diffusers pipeline or a denoiser module"):
        load_denoiser(42)


# --- 5. SD2 prediction type --------------------------------------------------------------------------------

def _sd2_tell(layout: str) -> str:
    """The tensor ComfyUI's rule reads: norm1.bias of the first transformer block in the last up attention."""
    config = TINY_CONFIGS["sd2"]
    levels, per = len(config["block_out_channels"]), config["layers_per_block"] + 1
    if layout == "ldm":
        return f"{LDM_PREFIX}output_blocks.{levels * per - 1}.1.transformer_blocks.0.norm1.bias"
    return f"up_blocks.{levels - 1}.attentions.{per - 1}.transformer_blocks.0.norm1.bias"


def _sd2_file(tmp_path, layout: str, std: float, metadata: dict | None = None):
    state = dict(_state("sd2", layout))
    name = _sd2_tell(layout)
    assert name in state
    values = torch.randn(state[name].shape, generator=torch.Generator().manual_seed(7))
    state[name] = ((values - values.mean()) / values.std() * std).contiguous()
    path = tmp_path / f"sd2_{layout}_{std}.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path, name, state[name]


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
@pytest.mark.parametrize("std,expected", [(0.5, "v_prediction"), (0.1, "v_prediction"),
                                          (0.08, "epsilon"), (0.01, "epsilon")])
def test_sd2_prediction_type_from_weight_spread(tmp_path, layout, std, expected):
    path, name, tell = _sd2_file(tmp_path, layout, std)
    loaded = load_denoiser(path)
    assert loaded.detection.family == "sd2"
    assert loaded.detection.prediction_type == expected
    assert any(name in line for line in loaded.detection.evidence)
    # The statistic was read from the tensor that was loaded into the model.
    assert torch.equal(loaded.module.state_dict()["up_blocks.1.attentions.1.transformer_blocks.0.norm1.bias"], tell)


@pytest.mark.parametrize("metadata,std,expected", [
    ({"modelspec.prediction_type": "v"}, 0.01, "v_prediction"),
    ({"modelspec.prediction_type": "epsilon"}, 0.5, "epsilon"),
    ({"prediction_type": "v_prediction"}, 0.01, "v_prediction"),
])
def test_sd2_metadata_wins_over_weight_spread(tmp_path, metadata, std, expected):
    path, _, _ = _sd2_file(tmp_path, "ldm", std, metadata)
    loaded = load_denoiser(path)
    assert loaded.detection.prediction_type == expected
    assert any("metadata" in line for line in loaded.detection.evidence)


@pytest.mark.parametrize("given", ["epsilon", "v_prediction", "sample"])
def test_prediction_type_argument_wins_over_everything(tmp_path, given):
    spread = 0.5 if given == "epsilon" else 0.01
    declared = "v" if given == "epsilon" else "epsilon"
    path, _, _ = _sd2_file(tmp_path, "ldm", spread, {"modelspec.prediction_type": declared})
    loaded = load_denoiser(path, prediction_type=given)
    assert loaded.detection.prediction_type == given
    assert "given by the caller" in loaded.detection.evidence[-1]


def test_unknown_prediction_type_argument(tmp_path):
    path, _, _ = _sd2_file(tmp_path, "ldm", 0.01)
    with pytest.raises(PostDiffError, match="unknown prediction type 'x0'"):
        load_denoiser(path, prediction_type="x0")


# --- 6. errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,layout,name", [
    ("sd15", "ldm", f"{LDM_PREFIX}middle_block.0.in_layers.2.bias"),
    ("sd15", "ldm", f"{LDM_PREFIX}out.2.bias"),
    ("sdxl", "ldm", f"{LDM_PREFIX}label_emb.0.2.weight"),
    ("pixart_alpha", "pixart_original", "blocks.1.attn.qkv.weight"),  # fused: feeds three diffusers tensors
])
def test_missing_tensor(tmp_path, family, layout, name):
    state = dict(_state(family, layout))
    del state[name]
    if layout == "ldm":
        state.update(ldm_extras())
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path))
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path)
    message = _message(err, path)
    assert "missing" in message
    assert name in message
    assert "1 of its tensors are missing" in message
    assert family in message


@pytest.mark.parametrize("family,layout,name", [
    ("sd15", "ldm", f"{LDM_PREFIX}middle_block.0.in_layers.2.bias"),
    ("sd2", "diffusers", "mid_block.resnets.1.conv2.weight"),
    ("pixart_alpha", "pixart_original", "blocks.0.cross_attn.proj.weight"),
])
def test_tensor_with_wrong_shape(tmp_path, family, layout, name):
    state = dict(_state(family, layout))
    good = tuple(state[name].shape)
    state[name] = torch.zeros((good[0] + 1,) + good[1:])
    path = tmp_path / "bad_shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path)
    message = _message(err, path)
    assert name in message
    assert f"has shape {(good[0] + 1,) + good[1:]}" in message
    assert f"needs {good}" in message


def _int32_file(tmp_path):
    state = dict(_state("sd15", "ldm"))
    name = f"{LDM_PREFIX}middle_block.0.in_layers.2.bias"
    state[name] = (state[name] * 1000).to(torch.int32)
    path = tmp_path / "int32.safetensors"
    save_file(state, str(path))
    return path, name


def test_unsupported_tensor_dtype(tmp_path):
    path, name = _int32_file(tmp_path)
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path)
    message = _message(err, path)
    assert "unsupported dtype" in message
    assert "I32" in message
    assert name in message


def test_unsupported_tensor_dtype_with_explicit_dtype(tmp_path):
    path, _ = _int32_file(tmp_path)
    with pytest.raises(PostDiffError, match="unsupported dtype"):
        load_denoiser(path, dtype="float32")


@pytest.mark.parametrize("dtype", ["int8", "float64", "half"])
def test_unsupported_requested_dtype(tmp_path, dtype):
    path = write_checkpoint(_model("sd15"), tmp_path / "model.safetensors", "ldm")
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path, dtype=dtype)
    assert f"unsupported dtype {dtype!r}" in str(err.value)
    assert "float32, float16, bfloat16" in str(err.value)


def test_unsupported_requested_torch_dtype(tmp_path):
    path = write_checkpoint(_model("sd15"), tmp_path / "model.safetensors", "ldm")
    with pytest.raises(PostDiffError, match="unsupported dtype"):
        load_denoiser(path, dtype=torch.int8)


def test_folder_with_pickle_weights_and_config(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(_model("sd15").config)))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PostDiffError) as err:
        load_denoiser(folder)
    message = _message(err, folder)
    assert "safetensors" in message
    assert "pickle" in message


def test_folder_with_only_a_pickle_file(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PostDiffError) as err:
        load_denoiser(folder)
    message = _message(err, folder)
    assert "safetensors" in message
    assert "no model found" in message


def test_pickle_file_given_directly(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path)
    message = _message(err, path)
    assert "not a safetensors file" in message
    assert "pickle" in message


def test_empty_folder(tmp_path):
    with pytest.raises(PostDiffError) as err:
        load_denoiser(tmp_path)
    assert "no model found" in _message(err, tmp_path)


def test_path_not_found(tmp_path):
    with pytest.raises(PostDiffError) as err:
        load_denoiser(tmp_path / "nope.safetensors")
    assert "not found" in _message(err, tmp_path / "nope.safetensors")


def test_pipeline_folder_without_denoiser(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(PostDiffError) as err:
        load_denoiser(tmp_path)
    assert "no unet/ or transformer/ subfolder" in _message(err, tmp_path)


def test_truncated_checkpoint(tmp_path):
    path = write_checkpoint(_model("sd15"), tmp_path / "model.safetensors", "ldm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(PostDiffError) as err:
        load_denoiser(path)
    assert "truncated" in _message(err, path)
