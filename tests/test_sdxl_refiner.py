"""SDXL base + refiner through optimize(pipe): the base stops at `denoising_end`, StableDiffusionXLImg2ImgPipeline
(a refiner U-Net conditioned on aesthetic scores) starts at `denoising_start` from the base's latents; and the
img2img pipeline with an image and `strength`. `none` against diffusers on the same components."""
import pytest
import torch
from tiny_models import TINY_CONFIGS, pipeline_embeds, tiny_pipeline

from postdiff_compile import PostDiffError, optimize, restore
from postdiff_compile.verification import rel_l2

STEPS = 10
SPLIT = 0.7   # the base runs the timesteps >= 300 (7 of 10 with Euler's 901..1), the refiner the rest
SIZE = 128


@pytest.fixture(scope="module")
def pipes():
    return make_pipes()


def make_pipes():
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = tiny_pipeline("sdxl")
    torch.manual_seed(1)
    # A refiner's time ids: original size, crop and the aesthetic score (5 numbers, not 6)
    unet = UNet2DConditionModel(**dict(TINY_CONFIGS["sdxl"], projection_class_embeddings_input_dim=1280 + 5 * 256))
    refiner = StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=base.scheduler,
                                               requires_aesthetics_score=True, add_watermarker=False)
    refiner.set_progress_bar_config(disable=True)
    return base, refiner


def _args(seed=0, **kw):
    return dict(pipeline_embeds("sdxl"), num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw)


def _both(base, refiner, seed=0):
    latents = base(height=SIZE, width=SIZE, denoising_end=SPLIT, **_args(seed)).images
    return latents, refiner(image=latents, denoising_start=SPLIT, **_args(seed)).images


def test_none_reproduces_diffusers_base_and_refiner(pipes):
    base, refiner = pipes
    theirs = _both(base, refiner)
    optimize(base, "none")
    optimize(refiner, "none")
    try:
        ours = _both(base, refiner)
        steps = len(base._postdiff.last_plan), len(refiner._postdiff.last_plan)
    finally:
        restore(base)
        restore(refiner)
    assert steps == (7, 3)
    for mine, reference in zip(ours, theirs):
        assert mine.shape == (1, 4, SIZE // 8, SIZE // 8) and rel_l2(mine, reference) <= 1e-5
    assert rel_l2(theirs[1], theirs[0]) > 1e-3   # the refiner changed the base's latents


# slow tier (15 s of the default tier's budget, 7 Dec): every preset on base + refiner also runs in
# test_pipeline_presets.py (slow); the default tier runs `none` against diffusers above
@pytest.mark.slow
def test_a_preset_splits_its_plan_between_base_and_refiner(pipes):
    """balanced (SDXL: mixed resolution at 3/4 scale for half the steps, DeepCache) at 10 steps switches at step 5:
    the base runs 5 low-resolution steps, the transition and 2 full ones; the refiner's 3 are at full resolution,
    from the base's full-resolution latents, its first a full DeepCache step."""
    base, refiner = pipes
    optimize(base, "balanced")
    optimize(refiner, "balanced")
    try:
        latents, refined = _both(base, refiner)
        base_plan, refiner_plan = base._postdiff.last_plan, refiner._postdiff.last_plan
    finally:
        restore(base)
        restore(refiner)
    assert [s.low_res for s in base_plan] == [True] * 5 + [False] * 2
    assert not any(s.low_res for s in refiner_plan) and refiner_plan[0].variant.startswith("full")
    assert latents.shape == refined.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(refined).all()


def test_a_base_that_would_stop_at_low_resolution_is_refused(pipes):
    base, _ = pipes
    optimize(base, "quality")
    try:
        with pytest.raises(PostDiffError, match="all run at low resolution"):
            base(height=SIZE, width=SIZE, denoising_end=0.3, **_args())
    finally:
        restore(base)


# SD1.5's img2img runs both strengths in the default tier (test_img2img.py); SDXL's 0.3 is the slow tier's
@pytest.mark.parametrize("strength", [pytest.param(0.3, marks=pytest.mark.slow), 0.8])
def test_none_reproduces_diffusers_sdxl_img2img(pipes, strength):
    _, refiner = pipes
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    theirs = refiner(image=image, strength=strength, **_args()).images
    optimize(refiner, "none")
    try:
        ours = refiner(image=image, strength=strength, **_args()).images
    finally:
        restore(refiner)
    assert rel_l2(ours, theirs) <= 1e-5


@pytest.mark.slow   # an SDXL compile (about 25 s here); the default tier runs artifact windows on SD1.5 (img2img)
def test_a_base_artifact_stops_at_denoising_end_as_optimize_pipe_does(pipes, tmp_path):
    """An SDXL artifact run with denoising_end (the base's share for a refiner) = optimize(pipe) with it: balanced
    at 10 steps, 7 of them, the switch at step 5 inside."""
    import postdiff_compile
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest

    base, _ = pipes
    out = compile_artifact(base.unet, ConfigRequest("balanced"), tmp_path / "base", resolution=(SIZE, SIZE),
                           steps=STEPS).out
    embeds = pipeline_embeds("sdxl")
    runner = postdiff_compile.load(out, "torch")
    got = runner(embeds["prompt_embeds"], embeds["negative_prompt_embeds"], seed=0, guidance_scale=5.0,
                 added_cond={"text_embeds": embeds["pooled_prompt_embeds"]},
                 negative_added_cond={"text_embeds": embeds["negative_pooled_prompt_embeds"]}, denoising_end=SPLIT)
    optimize(base, "balanced")
    try:
        expected = base(height=SIZE, width=SIZE, denoising_end=SPLIT, **_args()).images
    finally:
        restore(base)
    assert got.shape == expected.shape and rel_l2(got, expected) <= 1e-5


# A refiner artifact: its U-Net takes 5 time ids (the aesthetic score, 6.0 and 2.5 for the negative half, filled in
# by the runner as the img2img pipeline does), and `denoising_start` continues the base's noisy latents without
# noising them. Against optimize(pipe) on StableDiffusionXLImg2ImgPipeline given the same latents: the window (steps
# 7-9 of 10) is after every preset's switch, so a preset runs full resolution with its caches there (each preset
# passed, 7 Dec, about 100 s each here, most of it low-resolution variants the window never runs; at 10 steps fast's
# cross-attention cache is off). So the refiner is compiled with what runs in its window: DeepCache. Slow tier (an
# SDXL compile with ONNX); the default tier checks the refiner's inputs
# (test_the_refiners_time_ids_are_told_from_the_pooled_width).
@pytest.mark.slow
def test_a_refiner_artifact_continues_the_base_as_optimize_pipe_does(pipes, tmp_path):
    import postdiff_compile
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest
    from postdiff_compile.schedulers import make_scheduler

    base, refiner = pipes
    formats = "pt2,onnx"
    deepcache = {"cache_interval": 2, "cache_branch": 0}
    out = compile_artifact(refiner.unet, ConfigRequest("none", overrides=deepcache), tmp_path / "refiner",
                           resolution=(SIZE, SIZE), steps=STEPS, formats=formats).out
    runner = postdiff_compile.load(out, "torch")
    assert runner.input_shapes["time_ids"] == [2, 5] and runner.input_shapes["text_embeds"] == [2, 1280]
    assert any(v["name"] == "shallow" for v in runner.manifest["variants"])
    latents = base(height=SIZE, width=SIZE, denoising_end=SPLIT, **_args()).images
    scheduler = refiner.scheduler
    refiner.scheduler = make_scheduler(runner.manifest["scheduler"])
    optimize(refiner, "none", **deepcache)
    try:
        expected = refiner(image=latents, denoising_start=SPLIT, **_args()).images
    finally:
        restore(refiner)
        refiner.scheduler = scheduler
    embeds = pipeline_embeds("sdxl")
    for backend in formats.replace("pt2", "torch").replace("onnx", "onnxruntime").split(","):
        got = postdiff_compile.load(out, backend)(
            embeds["prompt_embeds"], embeds["negative_prompt_embeds"], seed=0, guidance_scale=5.0,
            added_cond={"text_embeds": embeds["pooled_prompt_embeds"]},
            negative_added_cond={"text_embeds": embeds["negative_pooled_prompt_embeds"]}, image_latents=latents,
            denoising_start=SPLIT)
        assert got.shape == expected.shape == (1, 4, SIZE // 8, SIZE // 8)
        assert rel_l2(got, expected) <= (1e-5 if backend == "torch" else 1e-4), backend
    assert rel_l2(expected, latents) > 1e-3   # the refiner's steps ran
    # SDXL image-to-image on the same artifact: an image's latents noised to strength 0.5 (steps 5-9)
    refiner.scheduler = make_scheduler(runner.manifest["scheduler"])
    optimize(refiner, "none", **deepcache)
    try:
        expected = refiner(image=latents, strength=0.5, **_args(seed=4)).images
    finally:
        restore(refiner)
        refiner.scheduler = scheduler
    got = runner(embeds["prompt_embeds"], embeds["negative_prompt_embeds"], seed=4, guidance_scale=5.0,
                 added_cond={"text_embeds": embeds["pooled_prompt_embeds"]},
                 negative_added_cond={"text_embeds": embeds["negative_pooled_prompt_embeds"]}, image_latents=latents,
                 strength=0.5)
    assert rel_l2(got, expected) <= 1e-5 and rel_l2(got, latents) > 1e-3


def test_the_refiners_time_ids_are_told_from_the_pooled_width(pipes):
    """The added embedding's input is the pooled text (SDXL's 1280) and the time ids: 6 for a base, 5 for a refiner."""
    from postdiff_compile.capture import time_text_specs
    from postdiff_compile.models.families import get_family

    base, refiner = pipes
    sdxl = get_family("sdxl")
    for unet, ids in ((base.unet, 6), (refiner.unet, 5)):
        text, time = time_text_specs(unet.config, sdxl, 2, torch.float32)
        assert (text.shape, time.shape) == ((2, 1280), (2, ids))
    with pytest.raises(PostDiffError, match="not sdxl's pooled text \\(1280\\) and whole time ids of 256"):
        time_text_specs(dict(refiner.unet.config, projection_class_embeddings_input_dim=1280 + 5 * 256 + 8), sdxl, 2,
                        torch.float32)
