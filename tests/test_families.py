"""Every family through `optimize(pipe)`: SDXL, PixArt-alpha, LCM (SD1.5 and SDXL layouts) and SD2 v-prediction.

Each runs in the diffusers pipeline class it ships with (tiny random denoisers, no text encoders: the tests
pass embeddings). Preset `none` must reproduce the pipeline's own loop; the peers' own packages
(DeepCacheSDHelper, TgateSDXLLoader, TgatePixArtAlphaLoader) must agree with us where the meaning is the
same; the transformer block cache is checked against a plain hook-based reference.
"""
import DeepCache  # the peers' own packages, installed by the README's test command with pip --no-deps
import pytest
import tgate
import torch
from tiny_models import pipeline_embeds, tiny_pipeline

from postdiff_compile import optimize, restore
from postdiff_compile.verification import rel_l2
from postdiff_compile.config import PRESETS
from postdiff_compile.errors import PostDiffError

TOLERANCE = 1e-5
SIZE = dict(height=64, width=64)
MIXED_SIZE = dict(height=128, width=128)   # the low-resolution latent (8) stays at the families' minimum side
FAMILIES = ["sdxl", "pixart_alpha", "lcm_sd15", "lcm_sdxl", "sd2"]
SLOW = pytest.mark.slow
# How far the caching presets may move the latents from `quality` (measured: 0.01-0.04, SD2's fast 0.25 where
# dropping CFG from step m matters most); noise would be over 1.
CACHING_BOUND = 0.4


def _args(family, steps, size=SIZE, seed=0, **extra):
    args = dict(**pipeline_embeds(family), num_inference_steps=steps, output_type="latent", **size, **extra)
    if family.startswith("pixart_alpha"):
        args["use_resolution_binning"] = False   # the tiny transformer has no bin table (sample size 16)
    return args


def _run(pipe, args, seed=0):
    return pipe(**args, generator=torch.Generator().manual_seed(seed)).images


def _assert_same_as_peer(label, got, expected, baseline):
    """Ours equals the peer's (or the reference's) result, and the feature changed the result by far more
    than the tolerance, so the comparison is not vacuous."""
    err, effect = rel_l2(got, expected), rel_l2(got, baseline)
    print(f"{label}: rel L2 {err:.2e} (the feature changed the result by {effect:.2e})")
    assert err <= TOLERANCE
    assert effect > 100 * TOLERANCE


# pixart_alpha_sized: the resolution and aspect-ratio conditioning of the released 1024 model, which the
# pipeline feeds from the requested size.
@pytest.mark.parametrize("family", [*FAMILIES, "pixart_alpha_sized"])
def test_none_reproduces_the_pipeline(family):
    pipe = tiny_pipeline(family)
    steps = 4 if family.startswith("lcm") else 6
    args = _args(family, steps)
    expected = _run(pipe, args)
    other_seed = _run(pipe, args, seed=1)
    optimize(pipe, preset="none")
    got = _run(pipe, args)
    err = rel_l2(got, expected)
    print(f"{family}: rel L2 {err:.2e}")
    assert err <= TOLERANCE
    assert rel_l2(other_seed, expected) > 1e-2      # the comparison is not between constants
    assert torch.isfinite(got).all()
    restore(pipe)
    assert rel_l2(_run(pipe, args), expected) == 0.0


def test_lcm_unet_in_a_stable_diffusion_pipeline():
    """An LCM U-Net in StableDiffusionPipeline with LCMScheduler: diffusers turns CFG off and feeds the
    guidance embedding; so does the runtime."""
    from tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("lcm_sd15", "lcm")
    args = dict(prompt_embeds=pipeline_embeds("lcm_sd15")["prompt_embeds"], num_inference_steps=4,
                guidance_scale=6.0, output_type="latent", **SIZE)
    expected = _run(pipe, args)
    optimize(pipe, preset="none")
    assert rel_l2(_run(pipe, args), expected) <= TOLERANCE
    assert rel_l2(_run(pipe, dict(args, guidance_scale=2.0)), expected) > 1e-3   # the guidance embedding matters
    assert not any(step.cfg for step in pipe._postdiff.last_plan)


# SDXL's presets are also run by test_mixed_resolution_families.py and test_artifact.py in the default tier.
# SD2 too (9 s, 7 Dec): its v-prediction presets run in test_sd2_v_prediction_presets_use_v_in_the_transition.
@pytest.mark.parametrize("family", [pytest.param(f, marks=SLOW) if f in ("sdxl", "lcm_sdxl", "sd2") else f
                                    for f in FAMILIES])
def test_every_preset_runs(family):
    pipe = optimize(tiny_pipeline("pixart_alpha_deep" if family == "pixart_alpha" else family))
    steps = 4 if family.startswith("lcm") else 20
    args = _args(family, steps, MIXED_SIZE)
    baseline = _run(pipe, args)
    results = {}
    for preset in PRESETS:
        optimize(pipe, preset=preset)
        got = results[preset] = _run(pipe, args)
        plan = pipe._postdiff.last_plan
        config = pipe._postdiff.config
        assert got.shape == baseline.shape and torch.isfinite(got).all()
        assert sum(s.low_res for s in plan) == (steps // 2 if config.mixed_resolution else 0)
        assert any(s.variant.startswith("shallow") for s in plan) == (config.cache_interval > 1)
        assert any("read_ca" in s.variant for s in plan) == (config.cross_attn_cache != "off")
        # LCM pipelines have no CFG batch; the others drop it exactly where the cross-attention cache is read.
        cfg = not family.startswith("lcm")
        assert [s.cfg for s in plan] == [cfg and "read_ca" not in s.variant for s in plan]
        if preset != "none":
            assert rel_l2(got, baseline) > TOLERANCE
        print(f"{family} {preset}: {[s.variant for s in plan]} (changed the result by {rel_l2(got, baseline):.2e}, "
              f"{rel_l2(got, results['quality']) if 'quality' in results else 0:.2e} from quality)")
    # On random tiny denoisers mixed resolution alone moves the latents as far as noise would (rel L2 1.2-1.3
    # from the baseline), so the baseline is no yardstick; `quality` is checked against an eager reference in
    # test_mixed_resolution_families.py, and the caching presets must stay near it.
    for preset in ("balanced", "fast"):
        assert rel_l2(results[preset], results["quality"]) < CACHING_BOUND, preset


def test_sd2_v_prediction_presets_use_v_in_the_transition():
    pipe = tiny_pipeline("sd2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    optimize(pipe, preset="quality")
    v = _run(pipe, _args("sd2", 10, MIXED_SIZE))
    # The same run with the scheduler told epsilon: the transition's x0 (and every step) reads the output
    # differently, so the result must change; a transition that ignored the prediction type would not.
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "epsilon"})
    eps = _run(pipe, _args("sd2", 10, MIXED_SIZE))
    assert rel_l2(v, eps) > 1e-2


# --- peers -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_pipes():
    """(theirs, ours) SDXL pipelines with identical weights, three resnets per up block as the real SDXL."""
    return tiny_pipeline("sdxl_deep", "ddim"), optimize(tiny_pipeline("sdxl_deep", "ddim"))


@pytest.mark.parametrize("interval,branch", [(2, 0), pytest.param(3, 1, marks=SLOW), pytest.param(2, 4, marks=SLOW),
                                             pytest.param(3, 8, marks=SLOW)])
def test_sdxl_deepcache_matches_helper(sdxl_pipes, interval, branch):
    theirs, ours = sdxl_pipes
    args = _args("sdxl", 8)
    helper = DeepCache.DeepCacheSDHelper(pipe=theirs)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        expected = _run(theirs, args)
    finally:
        helper.disable()
    optimize(ours, preset="none", cache_interval=interval, cache_branch=branch)
    got = _run(ours, args)
    baseline = _run(optimize(ours, preset="none"), args)
    _assert_same_as_peer(f"SDXL DeepCache interval {interval} branch {branch}", got, expected, baseline)


def _tgate_args(args):
    # T-GATE's cross-attention gate only: self-attention is recomputed at every step (sp = fi = 1, no warm-up).
    return dict(args, sp_interval=1, fi_interval=1, warm_up=0)


@pytest.mark.parametrize("gate_step", [2, pytest.param(5, marks=SLOW)])
def test_sdxl_cross_attn_cache_matches_tgate(sdxl_pipes, gate_step):
    theirs, ours = sdxl_pipes
    args = _args("sdxl", 8)
    # The negative half gets its own micro-conditioning, so that switching to it after the gate is visible.
    args.update(negative_original_size=(48, 48), negative_target_size=(64, 64))
    loaded = tgate.TgateSDXLLoader(theirs)
    expected = loaded.tgate(**_tgate_args(args), gate_step=gate_step, generator=torch.Generator().manual_seed(0)).images
    optimize(ours, preset="none", cross_attn_cache="ave", cross_attn_cache_step=gate_step)
    got = _run(ours, args)
    assert [s.cfg for s in ours._postdiff.last_plan] == [i < gate_step for i in range(8)]
    baseline = _run(optimize(ours, preset="none"), args)
    _assert_same_as_peer(f"SDXL gate {gate_step}", got, expected, baseline)


@pytest.fixture(scope="module")
def pixart_pipes():
    return tiny_pipeline("pixart_alpha_deep", "ddim"), optimize(tiny_pipeline("pixart_alpha_deep", "ddim"))


@pytest.mark.parametrize("gate_step", [2, pytest.param(5, marks=SLOW)])
def test_pixart_cross_attn_cache_matches_tgate(pixart_pipes, gate_step):
    theirs, ours = pixart_pipes
    args = _args("pixart_alpha", 8)
    loaded = tgate.TgatePixArtAlphaLoader(theirs)
    expected = loaded.tgate(**_tgate_args(args), gate_step=gate_step, generator=torch.Generator().manual_seed(0)).images
    optimize(ours, preset="none", cross_attn_cache="ave", cross_attn_cache_step=gate_step)
    got = _run(ours, args)
    baseline = _run(optimize(ours, preset="none"), args)
    _assert_same_as_peer(f"PixArt gate {gate_step}", got, expected, baseline)


# --- the transformer block cache against a readable reference --------------------------------------------


def _block_cache_reference(pipe, args, interval, branch):
    """diffusers' own PixArt loop with hooks: every `interval`-th transformer call records the residual the
    middle blocks add; the calls between skip those blocks and add the recorded residual instead."""
    transformer = pipe.transformer
    blocks = transformer.transformer_blocks
    first, last = branch, len(blocks) - branch - 1
    state = {"call": -1, "entering": None, "residual": None}

    def count_calls(module, inputs):
        state["call"] += 1

    def cached():
        return state["call"] % interval != 0

    def record_entering(module, inputs, output):
        if not cached():
            state["entering"] = output

    def record_or_replace_last(module, inputs, output):
        if cached():
            return inputs[0] + state["residual"]
        state["residual"] = output - state["entering"]
        return output

    originals = {}

    def identity_forward(i):
        # On cached calls the middle blocks pass their input through; the last one adds the residual (hook).
        original = blocks[i].forward

        def forward(hidden_states, *a, **k):
            return hidden_states if cached() else original(hidden_states, *a, **k)
        originals[i] = original
        blocks[i].forward = forward

    handles = [transformer.register_forward_pre_hook(count_calls),
               blocks[first - 1].register_forward_hook(record_entering),
               blocks[last].register_forward_hook(record_or_replace_last)]
    for i in range(first, last):   # the last middle block runs, and its hook replaces its output
        identity_forward(i)
    try:
        return _run(pipe, args)
    finally:
        for handle in handles:
            handle.remove()
        for i, original in originals.items():
            del blocks[i].forward


@pytest.mark.parametrize("interval,branch", [(2, 1), pytest.param(3, 2, marks=SLOW)])
def test_pixart_block_cache_matches_hook_reference(pixart_pipes, interval, branch):
    _, ours = pixart_pipes
    theirs = tiny_pipeline("pixart_alpha_deep", "ddim")   # T-GATE's loader leaves its forwards on the other one
    args = _args("pixart_alpha", 8)
    expected = _block_cache_reference(theirs, args, interval, branch)
    optimize(ours, preset="none", cache_interval=interval, cache_branch=branch)
    got = _run(ours, args)
    baseline = _run(optimize(ours, preset="none"), args)
    assert rel_l2(_run(theirs, args), baseline) <= TOLERANCE   # the hooks are gone again
    _assert_same_as_peer(f"PixArt block cache interval {interval} branch {branch}", got, expected, baseline)


def test_block_cache_branch_out_of_range_is_a_clear_error(pixart_pipes):
    _, ours = pixart_pipes
    with pytest.raises(PostDiffError, match="cache_branch 3 does not exist for a transformer of 6 blocks"):
        optimize(ours, preset="none", cache_interval=2, cache_branch=3)


def test_unsupported_pipeline_is_refused():
    class NotAPipeline:
        unet = None

    with pytest.raises(PostDiffError, match="optimize\\(\\) supports the diffusers pipelines"):
        optimize(NotAPipeline())


@pytest.mark.parametrize("name", ["StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline",
                                  "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetImg2ImgPipeline"])
def test_each_pipeline_still_unsupported_is_one_error_naming_it(name):
    """The pipelines of issue 27's families that optimize() does not take yet: refused before anything is loaded,
    by class name (an instance made without its components is enough to be refused)."""
    import diffusers

    pipe = object.__new__(getattr(diffusers, name))
    with pytest.raises(PostDiffError, match=f"supports the diffusers pipelines .*; got {name}$"):
        optimize(pipe)


# --- PixArt-alpha positions at low resolution --------------------------------------------------------------


def test_pixart_low_resolution_tokens_keep_their_place_in_the_image():
    """At another grid size diffusers' PatchEmbed recomputes the sin-cos table over the same extent (scaled
    by base_size / grid), so a low-resolution token carries the position of the full-resolution token at the
    same place in the image, not the position of the top-left corner of a smaller image. The mixed-resolution
    variants are captured at their own size and keep that table (their verification checks them against
    eager at that size); this checks the property itself on the model, with the patch projection zeroed so
    that the embedding is all that comes out."""
    import copy

    model = copy.deepcopy(tiny_pipeline("pixart_alpha").transformer)
    embed = model.pos_embed
    with torch.no_grad():
        embed.proj.weight.zero_()
        embed.proj.bias.zero_()
    full = embed(torch.zeros(1, 4, 16, 16))[0].reshape(8, 8, -1)    # the training grid: 8x8 tokens
    low = embed(torch.zeros(1, 4, 8, 8))[0].reshape(4, 4, -1)       # beta = 1/2: 4x4 tokens
    assert torch.allclose(low, full[::2, ::2], atol=1e-6)           # token (r, c) sits where full (2r, 2c) does
    assert not torch.allclose(low, full[:4, :4], atol=1e-2)          # not the corner of the full grid
    # beta = 3/4 (the paper's for PixArt-alpha): a 6x6 grid spans the same extent; every third token lands on a
    # full-resolution one, the others between.
    three_quarter = embed(torch.zeros(1, 4, 12, 12))[0].reshape(6, 6, -1)
    assert torch.allclose(three_quarter[::3, ::3], full[::4, ::4], atol=1e-6)
