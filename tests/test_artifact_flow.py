"""Artifacts of the flow-matching transformers (SD3, FLUX.1-dev, FLUX.1-schnell), on tiny random models.

Each preset is compiled and run by `load(artifact, backend)`, and the torch runner is compared with
optimize(pipe) on the family's own diffusers pipeline (same weights, embeddings and generator): that checks what
the runner fills in as the pipelines do (FLUX's sigmas, shift mu, rotary positions and guidance; SD3's CFG batch
with pooled embeddings) and the manifest's flow transition. onnxruntime is compared with the torch runner here;
AOTInductor and the C++ runner in tests/test_cpp_runner_flow.py. The default tier runs FLUX-dev `quality` (one block
of each kind) on torch (the sigmas, mu, ids, guidance and the flow transition in one artifact); the slow tier SD3's
and FLUX-dev's fast preset and FLUX-schnell's quality, SD3's and schnell's with onnxruntime too (`SLOW_CASES`).
"""
import json

import pytest
import torch
from tiny_models import base_family, runner_inputs, tiny_pipeline

import postdiff_compile
from postdiff_compile.capture import unpack_latent
from postdiff_compile.compile import compile_artifact
from postdiff_compile.config import PRESETS, ConfigRequest
from postdiff_compile.errors import PostDiffError
from postdiff_compile.verification import rel_l2

SIZE = 128   # a 16x16 latent; quality's low-resolution steps run at 12x12
STEPS = {"sd3": 6, "flux": 6, "flux_schnell": 4}
# The default tier's case on FLUX-dev with one block of each kind (tiny_models' flux_shallow): quality has no block
# cache, and the nine blocks of the tiny FLUX made it 36 s of the default tier (8 Dec).
DEFAULT_CASES = {("flux_shallow", "quality")}


def compile_flow(tmp_path, family: str, preset: str, formats: str = "pt2"):
    pipe = tiny_pipeline(family)
    out = compile_artifact(pipe.transformer, ConfigRequest(preset), tmp_path / f"{family}_{preset}",
                           resolution=(SIZE, SIZE), steps=STEPS[base_family(family)], formats=formats).out
    return pipe, out


def pipeline_result(pipe, preset: str, runner, cond, uncond, added, negative_added, seed: int, guidance: float):
    """optimize(pipe, preset) with the runner's inputs, as [1, C, H, W] latents (FLUX returns packed ones)."""
    kwargs = dict(prompt_embeds=cond, pooled_prompt_embeds=added["pooled_projections"], height=SIZE, width=SIZE,
                  num_inference_steps=runner.steps, guidance_scale=guidance, output_type="latent",
                  generator=torch.Generator().manual_seed(seed))
    if uncond is not None:
        kwargs.update(negative_prompt_embeds=uncond, negative_pooled_prompt_embeds=negative_added["pooled_projections"])
    images = postdiff_compile.optimize(pipe, preset=preset)(**kwargs).images
    latent = runner.manifest["resolution"]
    return unpack_latent(images, latent["latent_height"], latent["latent_width"]) if images.dim() == 3 else images


def check_flow_artifact(tmp_path, family: str, preset: str, backends: tuple[str, ...] = ()) -> None:
    formats = ",".join(["pt2", *({"onnxruntime": "onnx", "aoti": "aoti"}[b] for b in backends)])
    pipe, out = compile_flow(tmp_path, family, preset, formats)
    tiny, family = family, base_family(family)
    runner = postdiff_compile.load(out, "torch")
    manifest = runner.manifest
    assert manifest["config"] == PRESETS[preset].for_family(family).to_dict()
    assert manifest["scheduler_table"]["reason"] is None   # FlowMatchEuler is linear: the C++ runner's table
    if family == "flux":   # dev: FluxPipeline's linspace sigmas, shifted by the final size's 64 tokens
        n = STEPS[family]
        assert manifest["set_timesteps"]["sigmas"] == pytest.approx([1 - i / n for i in range(n)])
        # mu linear in the tokens: base_shift 0.5 at 256, max_shift 1.15 at 4096; here 64 tokens
        assert manifest["set_timesteps"]["mu"] == pytest.approx(0.5 - (1.15 - 0.5) * (256 - 64) / (4096 - 256))
    if manifest["transition"] is not None:
        transition = manifest["transition"]
        assert transition["prediction_type"] == "flow" and 0 < transition["sigma_next"] < transition["sigma_t"] < 1
    cond, uncond, added, negative_added = runner_inputs(runner)
    assert (uncond is not None) == (family == "sd3")   # FLUX has no CFG batch
    guidance = 4.0
    got = runner(cond, uncond, added_cond=added, negative_added_cond=negative_added, seed=7, guidance_scale=guidance)
    expected = pipeline_result(pipe, preset, runner, cond, uncond, added, negative_added, 7, guidance)
    assert got.shape == expected.shape == (1, runner.latent_channels, SIZE // 8, SIZE // 8)
    err = rel_l2(got, expected)
    print(f"{family} {preset}: torch runner vs optimize(pipe) rel L2 {err:.2e}")
    assert err <= 1e-5
    if family == "flux":   # the guidance input is used: another scale, another image
        other = runner(cond, added_cond=added, seed=7, guidance_scale=1.0)
        assert rel_l2(other, got) > 1e-3
    if (tiny, preset) in DEFAULT_CASES:
        check_refusals(out, runner, cond)
    for backend in backends:
        result = postdiff_compile.load(out, backend)(cond, uncond, added_cond=added, negative_added_cond=negative_added,
                                                     seed=7, guidance_scale=guidance)
        err = rel_l2(result, got)
        print(f"{family} {preset}: {backend} vs torch rel L2 {err:.2e}")
        assert err <= 1e-4


# The slow tier's cases, with onnxruntime. SD3's and FLUX-dev's fast presets hold what their quality and balanced
# presets do (mixed resolution and the flow transition, the block cache; SD3's cross-attention cache at step 14
# is past these 6 steps, so its fast equals balanced here) and the full-resolution variant `none` is made of;
# FLUX-schnell (FLUX-dev's architecture without the guidance input) at quality: its 4 steps, shift 1 and
# transition. The other cases were run when this file was written and when the slow tier was trimmed to CI's
# budget (torch = optimize(pipe) <= 1e-5, onnxruntime = torch <= 1e-4): flux-quality (also the default tier's, on
# torch), flux-balanced, sd3-quality, sd3-balanced, schnell's none, balanced and fast (7 Dec), and sd3-none and
# flux-none (one variant each; 8 Dec, 154 s of the tier beside training).
# FLUX-dev's fast runs on torch alone: FLUX's graphs on onnxruntime are schnell's (the same blocks, rotary ids and
# packed latents) and SD3 fast's (the block cache's inputs and outputs); its ONNX exports were about 80 s of CI's
# 138 for that case (8 Dec).
SLOW_CASES = {("sd3", "fast"): ("onnxruntime",), ("flux", "fast"): (), ("flux_schnell", "quality"): ("onnxruntime",)}


def flow_cases():
    """The slow tier's cases (with onnxruntime where SLOW_CASES says), and the default tier's on torch alone."""
    cases = [pytest.param(family, preset, backends, marks=pytest.mark.slow, id=f"{family}-{preset}")
             for (family, preset), backends in SLOW_CASES.items()]
    return cases + [pytest.param(family, preset, (), id=f"{family}-{preset}-torch") for family, preset in DEFAULT_CASES]


@pytest.mark.parametrize("family, preset, backends", flow_cases())
def test_every_flow_preset_equals_optimize_pipe(tmp_path, family, preset, backends):
    check_flow_artifact(tmp_path, family, preset, backends)


def check_refusals(out, runner, cond) -> None:
    """What only the text encoders know must be given; a manifest whose sigmas miss a step is refused."""
    with pytest.raises(PostDiffError, match="the artifact needs pooled_projections"):
        runner(cond, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["set_timesteps"]["sigmas"] = manifest["set_timesteps"]["sigmas"][:-1]
    from postdiff_compile.exporters.manifest_rules import check_consistency

    with pytest.raises(PostDiffError, match="set_timesteps/sigmas: 5 sigmas for 6 steps"):
        check_consistency(manifest, out / "manifest.json")
