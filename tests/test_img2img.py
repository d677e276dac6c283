"""Image-to-image through optimize(pipe): `none` against diffusers' StableDiffusionImg2ImgPipeline on the same
components, and the presets' plans over the strength's window of the schedule (plan.build_plan's `window`)."""
import pytest
import torch
from tiny_models import text_embeddings, tiny_sd_pipeline

from postdiff_compile import PostDiffError, optimize, restore
from postdiff_compile.config import PRESETS, PostDiffConfig
from postdiff_compile.plan import build_plan, check_plan
from postdiff_compile.verification import rel_l2

STEPS = 10
SIZE = 96   # a 12x12 latent; quality's low resolution is 6x6


@pytest.fixture(scope="module")
def img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline("sd15", "ddim").components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed=1):
    # Smooth, in [0, 1] as diffusers takes an image tensor: a layout the low-resolution steps can keep.
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(SIZE, SIZE),
                                           mode="bilinear")


def _run(pipe, strength, seed=0, **kw):
    cond, uncond = text_embeddings(1)
    return pipe(image=_image(), strength=strength, prompt_embeds=cond, negative_prompt_embeds=uncond,
                num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_none_reproduces_diffusers_img2img(img2img, strength):
    recorded = []

    def record(pipe, i, t, kwargs):
        recorded.append((i, int(t)))
        return kwargs
    theirs = _run(img2img, strength, callback_on_step_end=record)
    expected_steps = list(recorded)
    recorded.clear()
    optimize(img2img, "none")
    try:
        ours = _run(img2img, strength, callback_on_step_end=record)
        other_seed = _run(img2img, strength, seed=1)
    finally:
        restore(img2img)
    assert len(expected_steps) == int(STEPS * strength) and recorded == expected_steps
    assert ours.shape == theirs.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert rel_l2(ours, theirs) <= 1e-5
    assert rel_l2(other_seed, theirs) > 1e-3


def test_strength_picks_whether_the_low_resolution_steps_run(img2img):
    """quality at 10 steps switches at step 5: strength 0.8 starts at step 2 (3 low-resolution steps, then the
    transition), strength 0.3 at step 7 (full resolution only, the image encoded and noised as diffusers does)."""
    optimize(img2img, "quality")
    try:
        high = _run(img2img, 0.8)
        high_plan = img2img._postdiff.last_plan
        low = _run(img2img, 0.3)
        low_plan = img2img._postdiff.last_plan
    finally:
        restore(img2img)
    assert [s.low_res for s in high_plan] == [True] * 3 + [False] * 5
    assert not any(s.low_res for s in low_plan) and len(low_plan) == 3
    optimize(img2img, "none")
    try:
        reference = _run(img2img, 0.8), _run(img2img, 0.3)
    finally:
        restore(img2img)
    assert high.shape == low.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(high).all()
    # quality at 0.3 runs every step as `none` does except the caches' approximations (quality has none): equal.
    assert rel_l2(low, reference[1]) <= 1e-5
    assert rel_l2(high, reference[0]) > 1e-3   # at 0.8 the low-resolution steps change the result


def test_a_low_resolution_start_is_the_encoded_image_averaged_down_then_noised(img2img):
    from types import SimpleNamespace

    from postdiff_compile.runtime.pipeline_img2img import noised_image_latents

    image = img2img.image_processor.preprocess(_image())
    timesteps = torch.tensor([801, 701])
    a = SimpleNamespace(image=image, height=SIZE, width=SIZE, prompt=None, prompt_embeds=torch.zeros(1, 77, 768),
                        num_images_per_prompt=1,
                        generator=torch.Generator().manual_seed(3))
    img2img.scheduler.set_timesteps(STEPS)
    got = noised_image_latents(img2img, a, 1, torch.float32)((6, 6), timesteps)
    g = torch.Generator().manual_seed(3)
    clean = img2img.vae.encode(image).latent_dist.sample(g) * img2img.vae.config.scaling_factor
    noise = torch.randn(1, 4, 6, 6, generator=g)
    abar = img2img.scheduler.alphas_cumprod[801]
    expected = abar ** 0.5 * torch.nn.functional.avg_pool2d(clean, 2) + (1 - abar) ** 0.5 * noise
    assert got.shape == (1, 4, 6, 6) and rel_l2(got, expected) <= 1e-6


def test_fast_runs_its_caches_inside_the_window(img2img):
    optimize(img2img, "fast", cross_attn_cache_step=6)
    try:
        out = _run(img2img, 0.5)
        plan = img2img._postdiff.last_plan
    finally:
        restore(img2img)
    assert torch.isfinite(out).all() and len(plan) == 5
    assert plan[0].variant.startswith("full") and plan[0].cfg


def test_a_window_is_the_whole_plan_s_steps_with_a_restart_at_its_start():
    config = PRESETS["fast"].for_family("sd15")
    whole = build_plan(config, 20, timesteps=list(range(999, 0, -50)))
    for start in range(1, 19):
        part = build_plan(config, 20, timesteps=list(range(999, 0, -50)), window=(start, 20))
        check_plan(part)
        assert [s.index for s in part] == list(range(20 - start))
        assert part[0].variant.startswith("full") and not part[0].reads
        assert [s.low_res for s in part] == [s.low_res for s in whole[start:]]
    # DeepCache alone: after the restart the full steps fall every cache_interval steps from the start
    deepcache = PostDiffConfig(cache_interval=3)
    part = build_plan(deepcache, 12, window=(4, 12))
    assert [s.variant.startswith("full") for s in part] == [i % 3 == 0 for i in range(8)]
    head = build_plan(deepcache, 12, window=(0, 7))
    assert [s.variant for s in head] == [s.variant for s in build_plan(deepcache, 12)[:6]] + [head[6].variant]
    assert not head[-1].writes   # nothing after it reads


def test_a_window_that_ends_at_low_resolution_is_refused():
    with pytest.raises(PostDiffError, match="all run at low resolution"):
        build_plan(PRESETS["quality"].for_family("sd15"), 10, window=(0, 4))


def test_a_strength_that_runs_no_step_is_one_error(img2img):
    optimize(img2img, "none")
    try:
        with pytest.raises(PostDiffError, match="run no step of the 10-step schedule \\(strength 0.05"):
            _run(img2img, 0.05)
    finally:
        restore(img2img)
