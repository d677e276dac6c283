"""Flow-matching transformers (SD3, FLUX.1-dev, FLUX.1-schnell) through optimize(pipe), on tiny random models.

- `none` reproduces diffusers' StableDiffusion3Pipeline and FluxPipeline (output_type="latent").
- Mixed resolution equals an eager loop written here from the equations: the diffusers transformer called as its
  pipeline calls it, FlowMatchEulerDiscreteScheduler's sigmas, F.interpolate; x0 = x - sigma v at the last
  low-resolution step, re-noised to (1 - sigma') up(x0) + sigma' noise. Nothing of the library's transition,
  plan or resolution code is called.
- The block cache equals the same loop with the cached blocks' residual reused, and changes the result.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import pipeline_embeds, tiny_pipeline

from postdiff_compile import optimize
from postdiff_compile.errors import PostDiffError
from postdiff_compile.runtime.pipeline import restore

STEPS = 6
SIZE = 128          # pixels: a 16x16 latent; the low-resolution steps run at 12x12 (beta 3/4)
LOW = 12


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(pipe, family, generator_seed=0, **kwargs):
    args = dict(pipeline_embeds(family), num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                generator=torch.Generator().manual_seed(generator_seed))
    if family == "sd3":
        args["guidance_scale"] = 5.0
    args.update(kwargs)
    return pipe(**args).images


@pytest.fixture(scope="module", params=["sd3", "flux", "flux_schnell"])
def family_pipe(request):
    return request.param, tiny_pipeline(request.param)


def test_none_reproduces_the_diffusers_pipeline(family_pipe):
    family, pipe = family_pipe
    expected = run(pipe, family)
    optimize(pipe, "none")
    try:
        got = run(pipe, family)
    finally:
        restore(pipe)
    assert got.shape == expected.shape
    assert rel(got, expected) <= 1e-5, family   # measured 0.0 (bit-exact) for all three


# --- the eager loop from the equations ----------------------------------------------------------------------

def _pack(x):   # FluxPipeline._pack_latents, written out
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x, h, w):
    b, _, c = x.shape
    return x.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, h, w)


def _sigmas(pipe, family):
    """The schedule the pipeline uses: SD3 its static shift; FLUX sigmas linspace(1, 1/N, N) shifted by mu of the
    final image's token count (m, b of FLUX's calculate_shift written out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if family == "sd3":
        scheduler.set_timesteps(STEPS)
    else:
        c = scheduler.config
        tokens = (SIZE // 16) ** 2
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = tokens * m + c.base_shift - m * c.base_image_seq_len
        scheduler.set_timesteps(STEPS, sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    return scheduler.sigmas.float(), scheduler.timesteps.float()


def _velocity(pipe, family, x, t, embeds, cached=None):
    """The transformer's output for latent x at timestep t, called as the family's pipeline calls it."""
    model = pipe.transformer
    if family == "sd3":
        cond, uncond = embeds["prompt_embeds"], embeds["negative_prompt_embeds"]
        pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
        out = model(hidden_states=torch.cat([x, x]), timestep=t.expand(2), encoder_hidden_states=torch.cat([uncond, cond]),
                    pooled_projections=pooled, return_dict=False)[0]
        u, c = out.chunk(2)
        return u + 5.0 * (c - u)
    h, w = x.shape[2:]
    ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, x.device, x.dtype)   # the grid's own positions
    guidance = torch.full([1], 3.5) if model.config.guidance_embeds else None
    out = model(hidden_states=_pack(x), timestep=t.expand(1) / 1000, guidance=guidance,
                pooled_projections=embeds["pooled_prompt_embeds"], encoder_hidden_states=embeds["prompt_embeds"],
                txt_ids=torch.zeros(embeds["prompt_embeds"].shape[1], 3), img_ids=ids, return_dict=False)[0]
    return _unpack(out, h, w)


@torch.no_grad()
def eager_mixed_resolution(pipe, family, switch: int) -> torch.Tensor:
    """Steps < switch at LOW x LOW, then the transition, then full resolution; final latent as the pipeline returns."""
    embeds = pipeline_embeds(family)
    sigmas, timesteps = _sigmas(pipe, family)
    generator = torch.Generator().manual_seed(0)
    channels = pipe.transformer.config.in_channels // (4 if family != "sd3" else 1)
    x = torch.randn((1, channels, LOW, LOW), generator=generator)
    full = SIZE // 8
    for i in range(STEPS):
        v = _velocity(pipe, family, x, timesteps[i], embeds)
        if i == switch - 1:
            x0 = x - sigmas[i] * v
            noise = torch.randn((1, channels, full, full), generator=generator)
            x = (1 - sigmas[i + 1]) * F.interpolate(x0, size=(full, full), mode="bilinear", align_corners=False) \
                + sigmas[i + 1] * noise
        else:
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return _pack(x) if family != "sd3" else x


# Switch steps 2 and 3 of 6; the default tier runs one per family (about 12 s each here), the slow tier the others.
@pytest.mark.parametrize("family, fraction", [("sd3", 0.34), ("flux", 0.5),
                                              pytest.param("sd3", 0.5, marks=pytest.mark.slow),
                                              pytest.param("flux", 0.34, marks=pytest.mark.slow)])
def test_mixed_resolution_equals_the_eager_equations(family, fraction):
    pipe = tiny_pipeline(family)
    expected = eager_mixed_resolution(pipe, family, round(fraction * STEPS))
    optimize(pipe, "none", low_res_scale=0.75, low_res_fraction=fraction)
    got = run(pipe, family)
    assert pipe._postdiff.last_plan[0].low_res and sum(s.low_res for s in pipe._postdiff.last_plan) == \
        round(fraction * STEPS)
    restore(pipe)
    assert rel(got, expected) <= 1e-5
    # and it is not the full-resolution run
    assert rel(got, run(pipe, family)) > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux", pytest.param("flux_schnell", marks=pytest.mark.slow)])
def test_presets_run_and_each_feature_changes_the_result(family):
    pipe = tiny_pipeline(family)
    steps = 4 if family == "flux_schnell" else STEPS
    outputs = {}
    for preset in ("none", "quality", "balanced"):
        optimize(pipe, preset)
        outputs[preset] = run(pipe, family, num_inference_steps=steps)
        assert torch.isfinite(outputs[preset]).all()
    restore(pipe)
    assert rel(outputs["quality"], outputs["none"]) > 1e-3
    assert rel(outputs["balanced"], outputs["quality"]) > 1e-3   # the block cache changes the result
    # fast: tests/test_flow_caches.py


def test_flux_refuses_what_it_does_not_run():
    pipe = tiny_pipeline("flux")
    optimize(pipe, "none")
    embeds = pipeline_embeds("flux")
    with pytest.raises(PostDiffError, match="true_cfg_scale"):
        run(pipe, "flux", true_cfg_scale=2.0, negative_prompt_embeds=embeds["prompt_embeds"],
            negative_pooled_prompt_embeds=embeds["pooled_prompt_embeds"])
    with pytest.raises(PostDiffError, match="packed"):
        run(pipe, "flux", latents=torch.zeros(1, 4, 16, 16))
    restore(pipe)


@pytest.mark.slow   # about 30 s: SD3-medium captured on the meta device per variant
def test_explain_counts_the_block_cache_and_the_low_resolution_steps():
    """SD3-medium at 1024 px on the meta device: quality's 14 of 28 steps at 96x96 latent (beta 3/4) and balanced's
    shallow steps each cost less than a full step; the counts are the graphs', not a formula's."""
    from postdiff_compile.config import resolve_config
    from postdiff_compile.explain import explain
    from postdiff_compile.models.families import get_family

    family = get_family("sd3")
    none = explain(family, resolve_config("none", family="sd3"), steps=28, resolution=(1024, 1024))
    quality = explain(family, resolve_config("quality", family="sd3"), steps=28, resolution=(1024, 1024))
    balanced = explain(family, resolve_config("balanced", family="sd3"), steps=28, resolution=(1024, 1024))
    assert quality.low_res_latent == (96, 96) and sum(s.step.low_res for s in quality.steps) == 14
    per_step = none.total.paper / 28
    low = [s.flops.paper for s in quality.steps if s.step.low_res]
    # token count falls to 9/16; the linear layers scale with it, the pooled and timestep paths do not
    assert all(0.5 < f / per_step < 0.6 for f in low)
    shallow = [s.flops.paper for s in balanced.steps if s.step.variant.startswith("shallow")]
    assert shallow and all(f < min(low) for f in shallow)
    assert none.total.paper > quality.total.paper > balanced.total.paper
