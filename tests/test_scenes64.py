"""Reference model 2 as its own family, scenes64 (issue 25): its bundled configs are the lab's, detection tells it
from model 1 (scenes32, same text encoder) by the weights alone, and the compiler runs it under its own settings
(latent space: no pixel-space x0 clamp). The shipped model 2 (the package's default model, lab/reference2/weights):
what is checked is structure and agreement with readable references and the peers, not image quality."""
import json

import pytest
import torch

import postdiff_compile
from postdiff_compile.compile import compile_artifact
from postdiff_compile.config import PRESETS, ConfigRequest
from postdiff_compile.errors import PostDiffError
from postdiff_compile.lab.reference import model as model1
from postdiff_compile.lab.reference2 import load_pipeline as load_model2
from postdiff_compile.lab.reference2 import model as model2
from postdiff_compile.models.detect import detect
from postdiff_compile.models.families import get_family
from postdiff_compile.models.load import load_denoiser
from postdiff_compile.models.reference_shapes import reference_table
from postdiff_compile.resolution import low_res_latent
from postdiff_compile.runtime.pipeline import restore
from postdiff_compile.verification import rel_l2

FAMILY = get_family("scenes64")


def _unets():
    return {"scenes32": model1.make_parts(seed=0).unet, "scenes64": model2.make_unet(seed=1)}


def test_bundled_configs_are_the_labs():
    assert FAMILY.config() == {"_class_name": "UNet2DConditionModel", **model2.UNET_CONFIG}
    assert FAMILY.scheduler() == model2.scheduler_config()
    assert FAMILY.prediction_type == FAMILY.scheduler()["prediction_type"] == "v_prediction"
    assert FAMILY.text_length == get_family("scenes32").text_length == model1.TEXT_LENGTH
    assert FAMILY.default_resolution == (model2.IMAGE_SIZE, model2.IMAGE_SIZE)
    assert FAMILY.check_resolution(64, 64) == (32, 32)
    assert low_res_latent(FAMILY, (32, 32), 0.5) == (16, 16)
    with pytest.raises(PostDiffError, match="multiples of 8"):   # VAE factor 2 x two downsamples
        FAMILY.check_resolution(60, 64)


@pytest.mark.parametrize("family", ["scenes32", "scenes64"])
@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_shapes_alone_tell_the_reference_models_apart(family, layout):
    detection = detect(reference_table()[f"{family}/{layout}"])
    assert detection.family == family
    assert detection.prediction_type == get_family(family).prediction_type
    assert detection.config["in_channels"] == get_family(family).config()["in_channels"]


def test_detected_from_a_diffusers_folder_and_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    for family, unet in _unets().items():
        model2.save_module(unet, tmp_path / family, "diffusion_pytorch_model.safetensors")
        file = tmp_path / f"{family}.safetensors"
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(file))
        for source in (tmp_path / family, file):
            loaded = load_denoiser(source)
            assert loaded.detection.family == family, source
            assert loaded.detection.prediction_type == get_family(family).prediction_type
            assert any("input channels" in line for line in loaded.detection.evidence)


def test_model2_pipeline_folder_and_object_are_scenes64(tmp_path):
    parts = model2.make_parts(seed=0)
    folder = model2.save_pipeline_folder(parts, tmp_path / "model", model2.scheduler_config(), {})
    for source in (folder, model2.make_pipeline(parts)):
        loaded = load_denoiser(source)
        assert (loaded.detection.family, loaded.detection.prediction_type) == ("scenes64", "v_prediction")


def test_a_near_miss_names_the_closest_family():
    shapes = dict(reference_table()["scenes64/diffusers"])
    shapes["conv_in.weight"] = (32, 5, 3, 3)   # neither 3 pixel channels nor 4 latent ones
    with pytest.raises(PostDiffError) as err:
        detect(shapes, "x.safetensors")
    message = str(err.value)
    assert "\n" not in message and "Closest family: scenes64" in message
    assert "5 input channels (scenes32 takes 3, scenes64 takes 4)" in message


def test_presets_have_no_pixel_space_clamp():
    for name, preset in PRESETS.items():
        config, pixel = preset.for_family("scenes64"), preset.for_family("scenes32")
        assert config.clamp_x0 == 0
        assert config == pixel.replace(clamp_x0=0.0), name


@pytest.fixture(scope="module")
def pipe():
    pipe = load_model2()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_model_is_small_float16_and_loads_offline_in_float32(pipe):
    from safetensors import safe_open

    from postdiff_compile.lab.reference2 import shipped_folder
    from postdiff_compile.lab.reference2.ship import LIMIT_BYTES, folder_bytes

    folder = shipped_folder()
    assert load_denoiser(folder).detection.family == "scenes64"
    assert folder_bytes(folder) <= LIMIT_BYTES == 15 * 2**20
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert 0 < int(f.metadata()["postdiff.step"]) <= json.loads(f.metadata()["postdiff.train"])["steps"]
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float32


def test_quality_on_the_shipped_model_equals_the_eager_loop(pipe):
    """Latent space, v-prediction, zero terminal SNR with trailing DDIM: `quality` equals the readable eager
    mixed-resolution loop of test_mixed_resolution.py, with no clamp."""
    from test_mixed_resolution import _call, eager_mixed

    try:
        expected = eager_mixed(pipe, 64, 64, scale=0.5, fraction=0.5, prediction="v_prediction")
        assert rel_l2(_call(_optimized(pipe, "quality"), 64, 64), expected) <= 1e-5
    finally:
        restore(pipe)


def _latents(pipe, steps, cond, uncond, seed=7):
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=4.5,
                height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="latent").images


def _optimized(pipe, preset):
    return postdiff_compile.optimize(pipe, preset=preset)


def _embeddings(pipe):
    ids = pipe.tokenizer(["small red circle top left, on grey", ""], padding="max_length",
                         max_length=FAMILY.text_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond, uncond = pipe.text_encoder(ids)[0].chunk(2)
    return cond, uncond


@pytest.mark.filterwarnings("ignore:cross_attn_cache_step 10 >= 4 steps")   # fast's m is tuned for 20 steps
def test_every_preset_runs_under_scenes64(pipe):
    cond, uncond = _embeddings(pipe)
    try:
        for preset in PRESETS:
            latents = _latents(_optimized(pipe, preset), 4, cond, uncond)
            assert pipe._postdiff.family.name == "scenes64" and pipe._postdiff.config.clamp_x0 == 0
            assert latents.shape == (1, 4, 32, 32) and torch.isfinite(latents).all(), preset
            # every preset but none runs the first half on the 16x16 latent
            assert sum(step.low_res for step in pipe._postdiff.last_plan) == (0 if preset == "none" else 2)
    finally:
        restore(pipe)


@pytest.mark.slow   # 22 s here (export and verification of the 4.2 M-parameter U-Net), over the default tier's 15 s
def test_compiled_unet_runs_as_optimize(pipe, tmp_path):
    """Compiled from the U-Net alone, the artifact takes the family's bundled scheduler; its torch runner equals
    optimize(pipe) on the pipeline with the lab's scheduler, so the two agree."""
    steps = 3
    out = compile_artifact(pipe.unet, ConfigRequest("none"), tmp_path / "a", resolution=(64, 64), steps=steps).out
    runner = postdiff_compile.load(out, "torch")
    assert runner.manifest["source"]["family"] == "scenes64"
    cond, uncond = _embeddings(pipe)
    got = runner(cond, uncond, seed=7, guidance_scale=4.5)
    try:
        expected = _latents(_optimized(pipe, "none"), steps, cond, uncond)
    finally:
        restore(pipe)
    assert got.shape == expected.shape == (1, 4, 32, 32)
    assert rel_l2(got, expected) <= 1e-5


@pytest.mark.slow   # 21 s here; the default tier runs the same peers on model 1 (tests/test_reference_model.py)
def test_peers_run_unchanged_on_model2(pipe):
    """DeepCacheSDHelper and T-GATE on the latent-space model 2 (v-prediction, zero terminal SNR, trailing DDIM)
    equal our runtime's deepcache and cross-attention cache, as on model 1 (tests/test_reference_model.py)."""
    import DeepCache
    import tgate

    cond, uncond = _embeddings(pipe)
    steps = 6
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    helper.enable()
    try:
        theirs = _latents(pipe, steps, cond, uncond)
    finally:
        helper.disable()
    try:
        ours = _latents(postdiff_compile.optimize(pipe, preset="none", cache_interval=2, cache_branch=1), steps, cond,
                        uncond)
        plain = _latents(postdiff_compile.optimize(pipe, preset="none"), steps, cond, uncond)
    finally:
        restore(pipe)
    assert rel_l2(ours, theirs) < 1e-5 and rel_l2(ours, plain) > 1e-4    # the cache changed the result

    # T-GATE replaces the attention forwards for good: it gets a pipeline of its own, the same weights.
    own = load_model2()                                         # the fixture's weights
    own.set_progress_bar_config(disable=True)
    gated = tgate.TgateSDLoader(own).tgate(prompt_embeds=cond, negative_prompt_embeds=uncond, gate_step=3,
                                           sp_interval=1, fi_interval=1, warm_up=0, num_inference_steps=steps,
                                           guidance_scale=4.5, height=64, width=64,
                                           generator=torch.Generator().manual_seed(7), output_type="latent").images
    try:
        ours = _latents(postdiff_compile.optimize(pipe, preset="none", cross_attn_cache="ave", cross_attn_cache_step=3),
                        steps, cond, uncond)
    finally:
        restore(pipe)
    assert rel_l2(ours, gated) < 1e-5 and rel_l2(ours, plain) > 1e-4
