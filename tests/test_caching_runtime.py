"""The caching runtime against a readable eager reference, and its call-to-call hygiene.

The reference is diffusers' own UNet with forward hooks on every attn2 (return the cached output, or
record it), driven by a plain loop that writes the paper's equations: CFG before step m, the cache
written at m - 1 in the chosen mode, batch 1 on the negative embeddings after it.
"""
import pytest
import torch
from tiny_models import text_embeddings, tiny_sd_pipeline

from postdiff_compile import PostDiffError, optimize
from postdiff_compile.verification import rel_l2

TOLERANCE = 1e-5
STEPS, SIZE, GUIDANCE = 8, 96, 7.5


def _call(pipe, seed=0, steps=STEPS, **kw):
    cond, uncond = text_embeddings(1)
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                guidance_scale=GUIDANCE, output_type="latent", height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(seed), **kw).images


@torch.no_grad()
def reference_cross_attn_cache(pipe, mode: str, m: int, seed: int = 0, images: int = 1,
                               cfg: bool = True) -> torch.Tensor:
    unet, scheduler = pipe.unet, pipe.scheduler
    cond, uncond = (e.repeat(images, 1, 1) for e in text_embeddings(1))
    if not cfg:
        uncond = cond   # without CFG, T-GATE runs the positive embeddings after the gate
    scheduler.set_timesteps(STEPS)
    latents = pipe.prepare_latents(images, 4, SIZE, SIZE, torch.float32, torch.device("cpu"),
                                   torch.Generator().manual_seed(seed), None)
    cache, state = {}, {"phase": "compute"}

    def hook(name):
        def fn(module, args, output):
            if state["phase"] == "read":
                return cache[name]
            if state["phase"] == "write" and not cfg:
                cache[name] = output
            elif state["phase"] == "write":
                u, c = output.chunk(2)
                cache[name] = {"cond": c, "ave": (u + c) / 2, "cfg": u + GUIDANCE * (c - u)}[mode]
            return None
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in unet.named_modules() if name.endswith("attn2")]
    try:
        for i, t in enumerate(scheduler.timesteps):
            if i < m and not cfg:
                state["phase"] = "write" if i == m - 1 else "compute"
                eps = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=cond).sample
            elif i < m:
                state["phase"] = "write" if i == m - 1 else "compute"
                x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                u, c = unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = u + GUIDANCE * (c - u)
            else:
                state["phase"] = "read"
                eps = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=uncond).sample
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    finally:
        for h in handles:
            h.remove()
    return latents


@pytest.mark.parametrize("mode", ["cond", "ave", "cfg"])
def test_cross_attn_cache_modes_match_the_reference(mode):
    pipe = tiny_sd_pipeline("sd15", "ddim")
    expected = reference_cross_attn_cache(pipe, mode, m=3)
    got = _call(optimize(pipe, preset="none", cross_attn_cache=mode, cross_attn_cache_step=3))
    err = rel_l2(got, expected)
    print(f"{mode}: rel L2 {err:.2e}")
    assert err <= TOLERANCE


def test_modes_differ():
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"))
    out = {mode: _call(optimize(pipe, preset="none", cross_attn_cache=mode, cross_attn_cache_step=3))
           for mode in ("cond", "ave", "cfg")}
    assert rel_l2(out["cond"], out["ave"]) > 10 * TOLERANCE and rel_l2(out["cfg"], out["cond"]) > 10 * TOLERANCE


def test_no_state_leaks_between_calls():
    """DeepCacheSDHelper keeps its cache and step offset across calls (peers.md 1.7); we must not."""
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="fast", cross_attn_cache_step=4)
    first = _call(pipe, seed=0)
    other = _call(pipe, seed=1)
    again = _call(pipe, seed=0)
    # A second pipeline's first call has 5 steps (fresh), its second 20 steps right after the shorter one.
    fresh = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="fast", cross_attn_cache_step=4)
    fresh_short = _call(fresh, seed=0, steps=5)
    assert torch.equal(first, again) and torch.equal(other, _call(fresh, seed=1))
    # A call with fewer steps right after a longer one plans afresh and matches a fresh pipeline.
    short = _call(pipe, seed=0, steps=5)
    assert len(pipe._postdiff.last_plan) == 5
    assert torch.equal(short, fresh_short)


def test_two_images_per_prompt_and_no_cfg_match_the_reference():
    pipe = tiny_sd_pipeline("sd15", "ddim")
    expected = reference_cross_attn_cache(pipe, "cond", m=4, images=2)
    optimize(pipe, preset="none", cross_attn_cache="cond", cross_attn_cache_step=4)
    got = _call(pipe, num_images_per_prompt=2)
    assert got.shape == (2, 4, 12, 12) and rel_l2(got, expected) <= TOLERANCE
    assert {b.batch for b in pipe._postdiff.store.captured} == {4, 2}   # 2 images x CFG, then 2 images
    expected = reference_cross_attn_cache(pipe, "cond", m=4, cfg=False)
    got = pipe(prompt_embeds=text_embeddings(1)[0], num_inference_steps=STEPS, guidance_scale=1.0,
               output_type="latent", height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0)).images
    assert not any(step.cfg for step in pipe._postdiff.last_plan)
    assert rel_l2(got, expected) <= TOLERANCE


def test_second_order_schedulers_and_unread_caches():
    from diffusers import HeunDiscreteScheduler

    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="balanced")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(PostDiffError, match="second-order scheduler"):
        _call(pipe)
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="none", cross_attn_cache="cond",
                    cross_attn_cache_step=STEPS)
    with pytest.warns(UserWarning, match="never be read"):
        _call(pipe)
    assert all(step.variant == "full" for step in pipe._postdiff.last_plan)


@pytest.mark.slow   # inductor compiles C++ for the variant: about a minute here
def test_compiled_variants_give_the_eager_latents():
    """optimize(compile=True) runs the same rewritten graphs through torch.compile: same latents as eager,
    and the variant really is compiled (a store that ignored the flag would leave `compiled` unset)."""
    # `none` has one variant, and each variant compiles for ~40 s on 2 cores.
    eager = _call(optimize(tiny_sd_pipeline("sd15", "ddim"), preset="none"))
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="none", compile=True)
    compiled = _call(pipe)
    variants = list(pipe._postdiff.store._variants.values())
    assert len(variants) == 1 and variants[0].compiled is not None
    assert rel_l2(compiled, eager) < 1e-4
    # Re-optimizing without compile must not keep running the compiled graphs.
    assert optimize(pipe, preset="none")._postdiff.store.compile is False
