"""Inpainting through optimize(pipe): `none` against diffusers' StableDiffusionInpaintPipeline on the same
components, with an inpainting U-Net (9 input channels: latents, mask, masked image latents) and a plain one
(4 channels: the known region blended back after each step); mixed resolution on the 9-channel one."""
import pytest
import torch
from tiny_models import TINY_CONFIGS, text_embeddings, tiny_sd_pipeline

from postdiff_compile import PostDiffError, optimize, restore
from postdiff_compile.verification import rel_l2

STEPS = 8
SIZE = 96


def _pipe(channels: int):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    components = tiny_sd_pipeline("sd15", "ddim").components
    if channels == 9:
        torch.manual_seed(2)
        components["unet"] = UNet2DConditionModel(**dict(TINY_CONFIGS["sd15"], in_channels=9))
    pipe = StableDiffusionInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint9():
    return _pipe(9)


@pytest.fixture(scope="module")
def inpaint4():
    return _pipe(4)


def _run(pipe, strength=1.0, seed=0, **kw):
    cond, uncond = text_embeddings(1)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 1.0   # repaint the middle
    return pipe(image=image, mask_image=mask, strength=strength, prompt_embeds=cond, negative_prompt_embeds=uncond,
                num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw).images


def _ours(pipe, preset="none", **kw):
    optimize(pipe, preset)
    try:
        return _run(pipe, **kw), list(pipe._postdiff.last_plan)
    finally:
        restore(pipe)


@pytest.mark.parametrize("channels,strength", [(9, 1.0), (9, 0.6), (4, 0.6)])
def test_none_reproduces_diffusers_inpainting(inpaint9, inpaint4, channels, strength):
    pipe = inpaint9 if channels == 9 else inpaint4
    theirs = _run(pipe, strength)
    ours, plan = _ours(pipe, strength=strength)
    assert len(plan) == int(STEPS * strength)
    assert ours.shape == theirs.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert rel_l2(ours, theirs) <= 1e-5
    assert rel_l2(_run(pipe, strength, seed=1), theirs) > 1e-3


def test_the_mask_reaches_the_inpainting_unet_at_both_resolutions(inpaint9):
    full, _ = _ours(inpaint9, "none")
    mixed, plan = _ours(inpaint9, "quality")
    assert [s.low_res for s in plan] == [True] * 4 + [False] * 4
    assert torch.isfinite(mixed).all() and rel_l2(mixed, full) > 1e-3


def test_a_plain_unet_keeps_the_unmasked_region(inpaint4):
    """After the last step the blend puts back the clean image latents where the mask is 0 (latent rows and
    columns 0-2 and 9-11 here): the encoded image, its one draw the first of the generator's."""
    # balanced: DeepCache; its window (steps 4-7 of 8) starts at the switch, so no low-resolution step is refused
    ours, _ = _ours(inpaint4, "balanced", strength=0.6)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    clean = inpaint4.vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(0))
    clean = clean * inpaint4.vae.config.scaling_factor
    assert rel_l2(ours[..., :3, :], clean[..., :3, :]) <= 1e-5 and rel_l2(ours[..., 9:, :], clean[..., 9:, :]) <= 1e-5
    assert rel_l2(ours[..., 3:9, 3:9], clean[..., 3:9, 3:9]) > 1e-2   # the masked middle was repainted


def test_what_inpainting_refuses_is_named(inpaint4):
    optimize(inpaint4, "quality")
    try:
        with pytest.raises(PostDiffError, match="mixed resolution needs an inpainting U-Net"):
            _run(inpaint4)
        with pytest.raises(PostDiffError, match="padding_mask_crop"):
            _run(inpaint4, padding_mask_crop=8)
    finally:
        restore(inpaint4)


@pytest.fixture(scope="module")
def inpaint_artifact(inpaint9, tmp_path_factory):
    """artifact(formats) -> the inpainting U-Net's `quality` artifact (8 steps, 96x96), built once per formats."""
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest

    built = {}

    def artifact(formats: str):
        if formats not in built:
            built[formats] = compile_artifact(inpaint9.unet, ConfigRequest("quality"),
                                              tmp_path_factory.mktemp("inpaint") / formats.replace(",", "-"),
                                              resolution=(SIZE, SIZE), steps=STEPS, formats=formats).out
        return built[formats]
    return artifact


# strength 1.0: pure noise at the low resolution; 0.9: steps 1-7 of 8, the first three at low resolution
# (0.9 on torch moved to the slow tier for the default tier's budget, 7 Dec: an image's start on an artifact is
# test_artifact.py's image-to-image test)
@pytest.mark.parametrize("strength, backend", [(1.0, "torch"), pytest.param(0.9, "torch", marks=pytest.mark.slow),
                                               pytest.param(0.9, "onnxruntime", marks=pytest.mark.slow)])
def test_inpainting_on_an_artifact_equals_optimize_pipe(inpaint9, inpaint_artifact, strength, backend):
    """Given latents for `image` and `masked_image_latents` (no encoding, in diffusers as in an artifact, which
    holds no VAE) and the pixel mask (the artifact takes it at the latent size)."""
    import postdiff_compile

    g = torch.Generator().manual_seed(4)
    image, masked = torch.randn(1, 4, 12, 12, generator=g), torch.randn(1, 4, 12, 12, generator=g)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 24:72, 24:72] = 1.0
    cond, uncond = text_embeddings(1)
    optimize(inpaint9, "quality")
    try:
        expected = inpaint9(image=image, mask_image=mask, masked_image_latents=masked, strength=strength,
                            prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                            guidance_scale=7.5, height=SIZE, width=SIZE, output_type="latent",
                            generator=torch.Generator().manual_seed(3)).images
    finally:
        restore(inpaint9)
    runner = postdiff_compile.load(inpaint_artifact("pt2,onnx" if backend == "onnxruntime" else "pt2"), backend)
    got = runner(cond, uncond, seed=3, guidance_scale=7.5, image_latents=image, strength=strength,
                 mask=torch.nn.functional.interpolate(mask, size=(12, 12)), masked_image_latents=masked)
    assert got.shape == expected.shape == (1, 4, 12, 12)
    assert rel_l2(got, expected) <= (1e-5 if backend == "torch" else 1e-4)
    with pytest.raises(PostDiffError, match="takes 9 input channels \\(an inpainting U-Net\\): pass mask"):
        runner(cond, uncond)


# A plain U-Net's inpainting on an artifact: `balanced` (DeepCache after the switch) at strength 0.6, whose window
# (steps 4-7 of 8) starts at the switch, as test_a_plain_unet_keeps_the_unmasked_region; pure noise at strength 1
# runs low-resolution steps, which the blend cannot follow: refused as optimize(pipe) refuses it. Slow tier (a
# compile of its own, 20 s); the default tier's case runs `none` on test_artifact.py's artifact.
@pytest.mark.slow
def test_a_plain_unet_inpaints_on_an_artifact_as_optimize_pipe(inpaint4, tmp_path):
    import postdiff_compile
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest

    folder = compile_artifact(inpaint4.unet, ConfigRequest("balanced"), tmp_path / "plain", resolution=(SIZE, SIZE),
                              steps=STEPS, formats="pt2,onnx").out
    image = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 24:72, 24:72] = 1.0
    cond, uncond = text_embeddings(1)
    optimize(inpaint4, "balanced")
    try:
        # masked_image_latents: a 4-channel U-Net does not read them, but given latents for `image`, diffusers
        # cannot mask the image in pixel space without them
        expected = inpaint4(image=image, mask_image=mask, masked_image_latents=image, strength=0.6, prompt_embeds=cond,
                            negative_prompt_embeds=uncond, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                            width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(3)).images
    finally:
        restore(inpaint4)
    small = torch.nn.functional.interpolate(mask, size=(12, 12))
    for backend, tolerance in (("torch", 1e-5), ("onnxruntime", 1e-4)):
        runner = postdiff_compile.load(folder, backend)
        got = runner(cond, uncond, seed=3, guidance_scale=7.5, image_latents=image, strength=0.6, mask=small)
        assert got.shape == expected.shape == (1, 4, 12, 12)
        assert rel_l2(got, expected) <= tolerance, backend
        assert rel_l2(got[..., :3, :], image[..., :3, :]) <= 1e-5   # the blend kept the known rows
    with pytest.raises(PostDiffError, match="mixed resolution needs an inpainting U-Net"):
        runner(cond, uncond, seed=3, image_latents=image, strength=1.0, mask=small)
