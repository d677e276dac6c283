"""Mixed-resolution denoising end to end, against an eager loop that writes the equations itself.

The reference below does not call the library's transition, resize or plan: diffusers' UNet and
scheduler, torch.randn and F.interpolate, and the paper's equations (paper-numbers.md section 1).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import text_embeddings, tiny_sd_pipeline

from postdiff_compile import PostDiffError, optimize
from postdiff_compile.verification import rel_l2

TOLERANCE = 1e-5
STEPS, GUIDANCE = 8, 7.5


def _call(pipe, height, width, seed=0, steps=STEPS, generator=True, **kw):
    cond, uncond = text_embeddings(1, width=pipe.unet.config.cross_attention_dim)
    gen = torch.Generator().manual_seed(seed) if generator else None
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                guidance_scale=GUIDANCE, output_type="latent", height=height, width=width, generator=gen,
                **kw).images


def _grid(latent, tokens):
    """The token grid of a block at `latent`: sides halved (rounding up) until the count matches."""
    h, w = latent
    halvings = 0
    while h * w != tokens:
        h, w, halvings = -(-h // 2), -(-w // 2), halvings + 1
    return halvings, (h, w)


@torch.no_grad()
def eager_mixed(pipe, height, width, scale, fraction, seed=0, cache_step=None, prediction="epsilon",
                renoise="fresh", clamp=0.0, images=1, deepcache=None, full_steps=None):
    """Low resolution for round(fraction * N) steps, then x0 -> bilinear up -> re-noise, then full resolution.

    With `cache_step` m, the Cond cross-attention cache (attn2 outputs of step m - 1, positive half) is
    read from step m on without CFG, resized at the switch when it was written at low resolution. With
    `deepcache` (k, branch) the UNet runs under DeepCacheSDHelper (full every k-th step by step index, or at
    exactly the steps in `full_steps`).
    A sigma-space scheduler (Euler) gets the k-diffusion form: x0 = x - sigma * eps, x' = up(x0) + sigma' * noise.
    """
    unet = pipe.unet
    make = lambda: type(pipe.scheduler).from_config(pipe.scheduler.config)  # noqa: E731
    scheduler = make()
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps
    euler = type(scheduler).__name__ == "EulerDiscreteScheduler"
    cond, uncond = (e.repeat(images, 1, 1) for e in text_embeddings(1, width=unet.config.cross_attention_dim))
    channels, factor = unet.config.in_channels, pipe.vae_scale_factor   # the reference model: 3 and 1 (pixels)
    full = (height // factor, width // factor)
    low = (round(full[0] * scale), round(full[1] * scale))
    switch = math.floor(fraction * STEPS + 0.5)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((images, channels, *low), generator=gen) * scheduler.init_noise_sigma

    cache, phase = {}, {"now": "compute"}

    def hook(name):
        def fn(module, args, output):
            if phase["now"] == "read":
                return cache[name]
            if phase["now"] == "write":
                cache[name] = output.chunk(2)[1]
            return None
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in unet.named_modules() if n.endswith("attn2")]
    helper = None
    if deepcache is not None:
        from DeepCache import DeepCacheSDHelper

        pipe.scheduler.set_timesteps(STEPS)      # the helper finds the step index in the pipe's scheduler
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=deepcache[0], cache_branch_id=deepcache[1],
                          skip_mode="uniform" if full_steps is None else "explicit")
        if full_steps is not None:
            # The helper's own block-position rule decides what a cached step skips; which steps are full is
            # given (its "uniform" mode would only know "every k-th step").
            position_rule = helper.is_skip_step
            helper.is_skip_step = lambda *a, **k: helper.cur_timestep not in full_steps and position_rule(*a, **k)
        helper.enable()
    try:
        for i, t in enumerate(timesteps):
            if cache_step is not None and i >= cache_step:
                phase["now"] = "read"
                eps = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=uncond).sample
            else:
                phase["now"] = "write" if cache_step is not None and i == cache_step - 1 else "compute"
                x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                u, c = unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = u + GUIDANCE * (c - u)
            if i != switch - 1:
                latents = scheduler.step(eps, t, latents, **({"generator": gen} if euler else {})).prev_sample
                continue
            if euler:
                sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
                x0 = latents - sigma * eps
            else:
                a = scheduler.alphas_cumprod[t]
                a_next = scheduler.alphas_cumprod[timesteps[i + 1]]
                if prediction == "epsilon":
                    x0 = (latents - (1 - a).sqrt() * eps) / a.sqrt()
                else:   # v_prediction
                    x0 = a.sqrt() * latents - (1 - a).sqrt() * eps
            if clamp:
                x0 = x0.clamp(-clamp, clamp)
            x0 = F.interpolate(x0, size=full, mode="bilinear", align_corners=False)
            if renoise == "fresh":
                noise = torch.randn((images, channels, *full), generator=gen)
            else:   # the predicted noise (epsilon prediction: the guided output itself), upsampled
                noise = F.interpolate(eps, size=full, mode="bilinear", align_corners=False)
            if euler:
                latents = x0 + sigma_next * noise
            else:
                latents = a_next.sqrt() * x0 + (1 - a_next).sqrt() * noise
            for name, value in cache.items():
                halvings, (h, w) = _grid(low, value.shape[1])
                dst = full
                for _ in range(halvings):
                    dst = (-(-dst[0] // 2), -(-dst[1] // 2))
                grid = value.permute(0, 2, 1).reshape(images, -1, h, w)
                cache[name] = F.interpolate(grid, size=dst, mode="bilinear",
                                            align_corners=False).flatten(2).permute(0, 2, 1)
            scheduler = make()          # a multistep solver starts its history afresh
            scheduler.set_timesteps(STEPS)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(switch)
    finally:
        for h in handles:
            h.remove()
        if helper is not None:
            helper.disable()
    return latents


# Each scheduler once in the default tier (two sizes between them), the other three pairs in the slow tier.
@pytest.mark.parametrize("scheduler, size", [
    ("ddim", (128, 192)), ("dpmpp", (128, 128)), ("euler", (128, 192)),
    *(pytest.param(s, z, marks=pytest.mark.slow) for s, z in (("ddim", (128, 128)), ("dpmpp", (128, 192)),
                                                              ("euler", (128, 128))))])
def test_mixed_resolution_matches_eager(scheduler, size):
    pipe = tiny_sd_pipeline("sd15", scheduler)
    expected = eager_mixed(pipe, *size, scale=0.5, fraction=0.5)
    got = _call(optimize(pipe, preset="none", low_res_scale=0.5, low_res_fraction=0.5), *size)
    assert got.shape == (1, 4, size[0] // 8, size[1] // 8)
    err = rel_l2(got, expected)
    print(f"{scheduler} {size}: rel L2 {err:.2e}")
    assert err <= TOLERANCE
    # Not vacuous: the switch changes the result against full resolution throughout.
    assert rel_l2(_call(optimize(pipe, preset="none"), *size), expected) > 0.05


def test_two_images_per_prompt():
    pipe = tiny_sd_pipeline("sd15", "dpmpp")
    expected = eager_mixed(pipe, 128, 128, scale=0.5, fraction=0.5, images=2)
    got = _call(optimize(pipe, preset="quality"), 128, 128, num_images_per_prompt=2)
    assert got.shape == (2, 4, 16, 16) and rel_l2(got, expected) <= TOLERANCE
    assert rel_l2(got[0], got[1]) > 0.05


def test_deepcache_across_the_switch_matches_deepcache_sd_helper():
    # balanced's shape: DeepCache k=2 with the switch at step 4, a full step, so no low-resolution feature is read
    # at full resolution. The reference runs the UNet under the DeepCache package's own helper.
    pipe = tiny_sd_pipeline("sd15", "ddim")
    expected = eager_mixed(pipe, 128, 128, scale=0.5, fraction=0.5, deepcache=(2, 1))
    got = _call(optimize(pipe, preset="balanced"), 128, 128)
    assert [s.variant for s in pipe._postdiff.last_plan[3:5]] == ["shallow", "full+write_dc"]
    assert rel_l2(got, expected) <= TOLERANCE
    assert rel_l2(_call(optimize(pipe, preset="quality"), 128, 128), expected) > 1e-3   # DeepCache did something


def test_v_prediction_and_three_quarter_scale():
    pipe = tiny_sd_pipeline("sd2", "ddim")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    expected = eager_mixed(pipe, 128, 128, scale=0.75, fraction=0.375, prediction="v_prediction")
    got = _call(optimize(pipe, preset="none", low_res_scale=0.75, low_res_fraction=0.375), 128, 128)
    assert rel_l2(got, expected) <= TOLERANCE


def test_predicted_noise_and_clamped_x0():
    pipe = tiny_sd_pipeline("sd15", "ddim")
    expected = eager_mixed(pipe, 128, 128, scale=0.5, fraction=0.5, renoise="predicted", clamp=1.0)
    got = _call(optimize(pipe, preset="quality", renoise="predicted", clamp_x0=1.0), 128, 128)
    assert rel_l2(got, expected) <= TOLERANCE
    assert rel_l2(_call(optimize(pipe, preset="quality"), 128, 128), expected) > 0.05


@pytest.mark.parametrize("m", [3, 4])   # written at a low-resolution step before the last, and at the last
def test_cross_attention_cache_written_at_low_resolution_is_resized(m):
    pipe = tiny_sd_pipeline("sd15", "ddim")
    expected = eager_mixed(pipe, 128, 192, scale=0.5, fraction=0.5, cache_step=m)
    got = _call(optimize(pipe, preset="none", low_res_scale=0.5, low_res_fraction=0.5, cross_attn_cache="cond",
                         cross_attn_cache_step=m), 128, 192)
    assert rel_l2(got, expected) <= TOLERANCE
    plan = pipe._postdiff.last_plan
    assert [s.low_res for s in plan] == [True] * 4 + [False] * 4
    assert "cross_attn" in plan[m - 1].writes and all("cross_attn" in s.reads for s in plan[m:])


def test_cross_attention_cache_on_odd_grids():
    # 144x208 px: latent 18x26 -> 9x13 at low resolution; attn2 runs at levels 0 and 1 (9x13 and 5x7 grids).
    pipe = tiny_sd_pipeline("sd15_deep", "ddim")
    expected = eager_mixed(pipe, 144, 208, scale=0.5, fraction=0.5, cache_step=4)
    got = _call(optimize(pipe, preset="none", low_res_scale=0.5, low_res_fraction=0.5, cross_attn_cache="cond",
                         cross_attn_cache_step=4), 144, 208)
    assert got.shape == (1, 4, 18, 26) and rel_l2(got, expected) <= TOLERANCE


def test_reproducible_with_a_generator_and_runs_without_one():
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="quality")
    first, second = _call(pipe, 128, 128, seed=3), _call(pipe, 128, 128, seed=3)
    assert torch.equal(first, second)
    assert rel_l2(_call(pipe, 128, 128, seed=4), first) > 0.05
    torch.manual_seed(0)
    unseeded = _call(pipe, 128, 128, generator=False)
    assert unseeded.shape == first.shape and torch.isfinite(unseeded).all()


def test_fast_matches_an_eager_reference_with_every_technique():
    """`fast`: mixed resolution, DeepCache and the Cond cross-attention cache together, against the eager loop
    with DeepCacheSDHelper and attn2 hooks. Which steps are full is the documented rule (plan.py, README):
    every k-th step counted from the last restart, the restarts being step 0, the switch L, and m - 1 and m."""
    m, k, steps = 6, 2, STEPS
    switch = 4                                   # round(0.5 * 8)
    restarts = [0, switch, m - 1, m]
    full = {i for i in range(steps) if (i - max(r for r in restarts if r <= i)) % k == 0}
    assert full == {0, 2, 4, 5, 6}
    pipe = tiny_sd_pipeline("sd15_deep", "ddim")
    expected = eager_mixed(pipe, 128, 128, scale=0.5, fraction=0.5, cache_step=m, deepcache=(k, 1), full_steps=full)
    without_caches = eager_mixed(pipe, 128, 128, scale=0.5, fraction=0.5)   # what quality equals (tests above)
    got = _call(optimize(pipe, preset="fast", cross_attn_cache_step=m), 128, 128)
    plan = pipe._postdiff.last_plan
    assert {s.index for s in plan if s.variant.startswith("full")} == full
    assert pipe._postdiff.config.cache_interval == k and pipe._postdiff.config.cache_branch == 1
    err = rel_l2(got, expected)
    print(f"fast against the eager reference: rel L2 {err:.2e}")
    assert err <= TOLERANCE
    # Each technique matters to the result: without the caches (quality) it moves by far more than the tolerance.
    assert rel_l2(without_caches, expected) > 1e-3


# Slow tier (8 s of the default tier, 8 Dec): the default tier's test of fast with mixed resolution is exact
# (test_fast_matches_an_eager_reference_with_every_technique); this one bounds the caches' drift from the cacheless run.
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["balanced", "fast"])
def test_presets_with_caches_run_mixed_resolution(preset):
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset=preset, cross_attn_cache_step=3)
    out = _call(pipe, 128, 128)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    plan = pipe._postdiff.last_plan
    switch = sum(s.low_res for s in plan)
    assert switch == 4 and plan[switch].variant.startswith("full")
    # Near the same run without caches (measured: 0.036 balanced, 0.044 fast); finite noise would be ~1.
    err = rel_l2(out, eager_mixed(tiny_sd_pipeline("sd15", "ddim"), 128, 128, scale=0.5, fraction=0.5))
    assert 1e-4 < err < 0.15, err


def test_initial_latents_must_be_low_resolution():
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="quality")
    with pytest.raises(PostDiffError, match="low-resolution 8x8"):
        _call(pipe, 128, 128, latents=torch.randn(1, 4, 16, 16))
    assert _call(pipe, 128, 128, latents=torch.randn(1, 4, 8, 8)).shape == (1, 4, 16, 16)


def test_pndm_is_refused_when_optimizing():
    from diffusers import PNDMScheduler

    pipe = tiny_sd_pipeline("sd15", "ddim")
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)   # SD1.5's default scheduler
    with pytest.raises(PostDiffError, match="PNDMScheduler cannot start mid-schedule.*DDIMScheduler.from_config"):
        optimize(pipe, preset="quality")
    optimize(pipe, preset="quality", low_res_fraction=0)   # the caches alone are fine with it


def test_alpha_bars_follow_the_schedulers_own_sigmas():
    from diffusers import DPMSolverMultistepScheduler

    from postdiff_compile.schedulers import alpha_bars

    pipe = tiny_sd_pipeline("sd15", "dpmpp")
    plain = pipe.scheduler
    plain.set_timesteps(20)
    got = alpha_bars(plain, plain.timesteps, 9)
    assert got == pytest.approx([float(plain.alphas_cumprod[int(plain.timesteps[i])]) for i in (9, 10)], rel=1e-5)
    karras = DPMSolverMultistepScheduler.from_config(plain.config, use_karras_sigmas=True)
    karras.set_timesteps(20)
    got = alpha_bars(karras, karras.timesteps, 9)
    # The scheduler's own conversion of its sigma, not alphas_cumprod at the rounded timestep.
    own = [float(karras._sigma_to_alpha_sigma_t(karras.sigmas[i])[0] ** 2) for i in (9, 10)]
    assert got == pytest.approx(own, rel=1e-6)
    assert got[0] != pytest.approx(float(karras.alphas_cumprod[int(karras.timesteps[9])]), rel=1e-5)
