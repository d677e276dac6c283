"""ControlNet through optimize(pipe): `none` against diffusers' StableDiffusionControlNetPipeline (one ControlNet and
two), DeepCache against DeepCacheSDHelper on the same ControlNet pipeline, and the presets' mixed resolution and
cross-attention cache with the ControlNet's residuals as variant inputs."""
import DeepCache
import pytest
import torch
from tiny_models import text_embeddings, tiny_pipeline, tiny_sd_pipeline

from postdiff_compile import optimize, restore
from postdiff_compile.verification import rel_l2

STEPS = 8
SIZE = 96


def _controlnet(unet, seed):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # a trained ControlNet's zero convolutions are not zero any more
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    return net


@pytest.fixture(scope="module")
def pipes():
    return make_pipes()


def make_pipes():
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    components = tiny_sd_pipeline("sd15", "ddim").components
    first, second = _controlnet(components["unet"], 1), _controlnet(components["unet"], 2)
    made = []
    for controlnet in (first, MultiControlNetModel([first, second])):
        pipe = StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        made.append(pipe)
    return made


def make_sdxl_pipe():
    """StableDiffusionXLControlNetPipeline on the tiny SDXL U-Net with a ControlNet made from it (no text encoders:
    embeddings are given)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    base = tiny_pipeline("sdxl")
    pipe = StableDiffusionXLControlNetPipeline(vae=base.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=base.unet, controlnet=_controlnet(base.unet, 3),
                                               scheduler=base.scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(count):
    g = torch.Generator().manual_seed(7)
    images = [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in range(count)]
    return images[0] if count == 1 else images


def _run(pipe, seed=0, **kw):
    cond, uncond = text_embeddings(1)
    count = len(getattr(pipe.controlnet, "nets", [0]))
    return pipe(image=_images(count), prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                guidance_scale=7.5, output_type="latent", generator=torch.Generator().manual_seed(seed),
                **kw).images


def _ours(pipe, preset="none", overrides=None, **kw):
    optimize(pipe, preset, **(overrides or {}))
    try:
        return _run(pipe, **kw), list(pipe._postdiff.last_plan)
    finally:
        restore(pipe)


@pytest.mark.parametrize("which", ["single", "multi"])
def test_none_reproduces_diffusers_controlnet(pipes, which):
    pipe = pipes[0] if which == "single" else pipes[1]
    kw = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.1, control_guidance_end=0.8)
    if which == "multi":
        kw = dict(controlnet_conditioning_scale=[0.7, 0.4], control_guidance_start=[0.1, 0.0],
                  control_guidance_end=[0.8, 0.6])
    theirs = _run(pipe, **kw)
    ours, _ = _ours(pipe, **kw)
    assert ours.shape == theirs.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert rel_l2(ours, theirs) <= 1e-5
    # the residuals change the result: without them (scale 0) it is another image
    without, _ = _ours(pipe, **dict(kw, controlnet_conditioning_scale=0.0 if which == "single" else [0.0, 0.0]))
    assert rel_l2(without, ours) > 1e-3


def test_guess_mode_reproduces_diffusers(pipes):
    theirs = _run(pipes[0], guess_mode=True)
    ours, _ = _ours(pipes[0], guess_mode=True)
    assert rel_l2(ours, theirs) <= 1e-5


@pytest.mark.parametrize("branch", [0, 3])
def test_deepcache_equals_deepcache_sd_helper_on_a_controlnet_pipeline(pipes, branch):
    """DeepCacheSDHelper runs on StableDiffusionControlNetPipeline (it wraps the U-Net's blocks; the pipeline feeds
    the ControlNet's residuals to the U-Net at every step, the helper's retrieve steps included)."""
    pipe = pipes[0]
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        theirs = _run(pipe)
    finally:
        helper.disable()
    ours, plan = _ours(pipe, "none", dict(cache_interval=3, cache_branch=branch))
    assert sum(s.variant.startswith("shallow") for s in plan) == 5
    assert rel_l2(ours, theirs) <= 1e-5


def test_a_shallow_variant_takes_only_the_residuals_of_its_layers(pipes):
    pipe = pipes[0]
    optimize(pipe, "none", cache_interval=3, cache_branch=0)
    try:
        _run(pipe)
        variants = pipe._postdiff.store._variants
    finally:
        restore(pipe)
    full = next(v for (name, _, _), v in variants.items() if name.startswith("full"))
    shallow = next(v for (name, _, _), v in variants.items() if name.startswith("shallow"))
    residuals = [n for n in full.inputs if n.startswith("controlnet.")]
    # conv_in; the first block's resnet and downsampler; the second (last) block's resnet; the middle block
    assert residuals == [f"controlnet.down.{i}" for i in range(4)] + ["controlnet.mid"]
    # branch 0 recomputes the outermost up layer only, whose skip connection is conv_in's output
    assert [n for n in shallow.inputs if n.startswith("controlnet.")] == ["controlnet.down.0"]


# fast has quality's mixed resolution and adds the caches: quality alone is the slow tier's
@pytest.mark.parametrize("preset", [pytest.param("quality", marks=pytest.mark.slow), "fast"])
def test_presets_run_with_the_controlnet(pipes, preset):
    reference, _ = _ours(pipes[1], "none")
    out, plan = _ours(pipes[1], preset, dict(cross_attn_cache_step=6) if preset == "fast" else None)
    assert any(s.low_res for s in plan) and torch.isfinite(out).all()
    assert out.shape == reference.shape and rel_l2(out, reference) > 1e-3


def test_sdxl_controlnet_none_reproduces_diffusers():
    """StableDiffusionXLControlNetPipeline: the ControlNet also takes SDXL's pooled text embedding and time ids."""
    from tiny_models import pipeline_embeds

    pipe = make_sdxl_pipe()

    def run(**kw):
        return pipe(image=_images(1), **pipeline_embeds("sdxl"), num_inference_steps=6, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images
    theirs = run()
    optimize(pipe, "none")
    try:
        ours = run()
        without = run(controlnet_conditioning_scale=0.0)
    finally:
        restore(pipe)
    assert ours.shape == theirs.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert rel_l2(ours, theirs) <= 1e-5 and rel_l2(without, ours) > 1e-3
