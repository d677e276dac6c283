"""ControlNet artifacts (controlnet_build.py, runtime/artifact_controlnet.py): the ControlNet graphs exported beside the
U-Net variants, run by the torch and onnxruntime runners with a conditioning image, against optimize(pipe) on
StableDiffusionControlNetPipeline (one ControlNet and two) and StableDiffusionXLControlNetPipeline, given the same
weights, embeddings, conditioning images and generator. optimize(pipe) equals diffusers (test_controlnet.py)."""
import pytest
import torch
from test_controlnet import SIZE, _images, make_pipes, make_sdxl_pipe
from tiny_models import pipeline_embeds, text_embeddings

import postdiff_compile
from postdiff_compile import optimize, restore
from postdiff_compile.compile import compile_artifact
from postdiff_compile.config import ConfigRequest
from postdiff_compile.errors import PostDiffError
from postdiff_compile.exporters.manifest import read_manifest
from postdiff_compile.schedulers import make_scheduler
from postdiff_compile.verification import rel_l2

STEPS = 8
SCALES = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.1, control_guidance_end=0.8)
MULTI_SCALES = dict(controlnet_conditioning_scale=[0.7, 0.4], control_guidance_start=[0.1, 0.0],
                    control_guidance_end=[0.8, 0.6])
# fast's cross-attention cache from step 6 of 8 (its default step is past 8): the batch-1 steps run a ControlNet graph
# of their own
OVERRIDES = {"fast": {"cross_attn_cache_step": 6}}


@pytest.fixture(scope="module")
def pipes():
    return make_pipes()


def nets_of(pipe) -> list:
    return list(getattr(pipe.controlnet, "nets", [pipe.controlnet]))


def compile_with(pipe, preset, folder, formats="pt2"):
    return compile_artifact(pipe.unet, ConfigRequest(preset, overrides=OVERRIDES.get(preset, {})), folder,
                            resolution=(SIZE, SIZE), steps=STEPS, formats=formats, controlnets=nets_of(pipe)).out


def optimized(pipe, preset, manifest, **kw):
    """optimize(pipe) with the artifact's scheduler, on the conditioning images the runner gets."""
    scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(manifest["scheduler"])
    optimize(pipe, preset, **OVERRIDES.get(preset, {}))
    try:
        cond, uncond = text_embeddings(1)
        return pipe(image=_images(len(nets_of(pipe))), prompt_embeds=cond, negative_prompt_embeds=uncond,
                    num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        restore(pipe)
        pipe.scheduler = scheduler


def run_artifact(folder, backend, count, **kw):
    cond, uncond = text_embeddings(1)
    runner = postdiff_compile.load(folder, backend)
    return runner(cond, uncond, seed=0, guidance_scale=7.5, control_image=_images(count), **kw)


def test_a_controlnet_artifact_equals_optimize_pipe(pipes, tmp_path):
    """`none`, one ControlNet, torch: the runner's ControlNet graph, scale and guidance window = the pipeline's."""
    folder = compile_with(pipes[0], "none", tmp_path / "none")
    manifest = read_manifest(folder)
    (net,) = manifest["controlnets"]
    assert [g["id"] for g in net["graphs"]] == [f"controlnet0@b2_{SIZE // 8}x{SIZE // 8}"]
    assert any(i["name"] == "controlnet.mid" for i in manifest["variants"][0]["inputs"])
    got = run_artifact(folder, "torch", 1, **SCALES)
    expected = optimized(pipes[0], "none", manifest, **SCALES)
    assert got.shape == expected.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert rel_l2(got, expected) <= 1e-5
    # the residuals reach the U-Net: without them (scale 0) another image
    assert rel_l2(run_artifact(folder, "torch", 1, controlnet_conditioning_scale=0.0), got) > 1e-3
    runner = postdiff_compile.load(folder, "torch")
    cond, uncond = text_embeddings(1)
    with pytest.raises(PostDiffError, match="compiled with 1 ControlNet.*pass control_image"):
        runner(cond, uncond)
    with pytest.raises(PostDiffError, match=r"controlnet_conditioning_scale: one per ControlNet of the artifact \(1\)"):
        runner(cond, uncond, control_image=_images(1), controlnet_conditioning_scale=[0.5, 0.5])
    with pytest.raises(PostDiffError, match="text-to-image only"):
        runner(cond, uncond, control_image=_images(1), image_latents=torch.zeros(1, 4, 12, 12))
    with pytest.raises(PostDiffError, match="one image at a time"):
        runner.run_batch(cond, uncond, seeds=[0])
    # a manifest edited to drop the ControlNet (checksum redone) is refused, and its graphs' files are checked
    from test_hostile_input import rewrite_manifest

    graph_file = folder / net["graphs"][0]["files"]["pt2"]["file"]
    graph_file.write_bytes(graph_file.read_bytes() + b"\0")
    with pytest.raises(PostDiffError, match="pt2 graph of variant controlnet0@b2_12x12 has .* bytes"):
        postdiff_compile.load(folder, "torch")
    rewrite_manifest(folder, lambda m: m.pop("controlnets"))
    with pytest.raises(PostDiffError, match="the variants take ControlNet residuals, but the manifest has no "
                                            "controlnets"):
        postdiff_compile.load(folder, "torch")


def test_a_module_that_is_not_a_controlnet_is_refused(pipes, tmp_path):
    with pytest.raises(PostDiffError, match=r"controlnets\[0\] is a UNet2DConditionModel, not a diffusers "
                                            "ControlNetModel"):
        compile_artifact(pipes[0].unet, ConfigRequest("none"), tmp_path / "x", resolution=(SIZE, SIZE), steps=STEPS,
                         controlnets=[pipes[0].unet])
    assert not (tmp_path / "x").exists()


# `fast` has every kind of variant quality and balanced have (each passed here, one ControlNet and two, 7 Dec: six
# compiles with ONNX, about 12 minutes beside training, too many for CI's budget); two ControlNets with `none` check
# the sum over ControlNets (the same at every size).
@pytest.mark.slow
@pytest.mark.parametrize("preset, which", [("fast", "single"), ("none", "multi")])
def test_presets_on_torch_and_onnxruntime(pipes, tmp_path, preset, which):
    pipe, scales = (pipes[0], SCALES) if which == "single" else (pipes[1], MULTI_SCALES)
    folder = compile_with(pipe, preset, tmp_path / preset, "pt2,onnx")
    manifest = read_manifest(folder)
    expected = optimized(pipe, preset, manifest, **scales)
    by_torch = run_artifact(folder, "torch", len(nets_of(pipe)), **scales)
    by_ort = run_artifact(folder, "onnxruntime", len(nets_of(pipe)), **scales)
    assert rel_l2(by_torch, expected) <= 1e-5 and rel_l2(by_ort, expected) <= 1e-4
    sizes = {tuple(g["latent_size"]) for net in manifest["controlnets"] for g in net["graphs"]}
    assert len(sizes) == (1 if preset == "none" else 2)   # fast runs its first steps at low resolution


@pytest.mark.slow
def test_an_sdxl_controlnet_artifact_equals_optimize_pipe(tmp_path):
    """The SDXL ControlNet also takes the pooled text embedding and the time ids (the runner's defaults for the
    artifact's resolution: what the pipeline makes for an image of that size)."""
    pipe = make_sdxl_pipe()
    # `none`: what is SDXL's here is the ControlNet graph's added inputs, the same in every preset (balanced passed
    # too, 7 Dec)
    folder = compile_artifact(pipe.unet, ConfigRequest("none"), tmp_path / "sdxl", resolution=(SIZE, SIZE),
                              steps=6, formats="pt2,onnx", controlnets=[pipe.controlnet]).out
    embeds = pipeline_embeds("sdxl")
    pipe.scheduler = make_scheduler(read_manifest(folder)["scheduler"])
    optimize(pipe, "none")
    try:
        expected = pipe(image=_images(1), **embeds, num_inference_steps=6, guidance_scale=5.0, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images
    finally:
        restore(pipe)
    for backend, tolerance in (("torch", 1e-5), ("onnxruntime", 1e-4)):
        runner = postdiff_compile.load(folder, backend)
        got = runner(embeds["prompt_embeds"], embeds["negative_prompt_embeds"], seed=0, guidance_scale=5.0,
                     added_cond={"text_embeds": embeds["pooled_prompt_embeds"]},
                     negative_added_cond={"text_embeds": embeds["negative_pooled_prompt_embeds"]},
                     control_image=_images(1))
        assert rel_l2(got, expected) <= tolerance, backend
