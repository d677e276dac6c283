"""optimize(pipe) on a pipeline with a LoRA loaded through diffusers (issue: One copy of the weights): the same
result as diffusers' own pipeline with that LoRA, and as DeepCache's own helper with it; set_adapters and fuse_lora
after optimize take effect (the runtime captures again when the adapters change: runtime/adapters.py)."""
from __future__ import annotations

import DeepCache  # installed by the README's test command with pip --no-deps
import pytest
import torch
from tiny_models import lora_adapted, text_embeddings, tiny_sd_pipeline, write_lora

from postdiff_compile import optimize, restore
from postdiff_compile.config import PRESETS
from postdiff_compile.verification import rel_l2

ARGS = dict(num_inference_steps=10, guidance_scale=7.5, output_type="latent", height=96, width=96)
BALANCED = PRESETS["balanced"].for_family("sd15")  # its DeepCache branch and interval, run at full resolution


def _run(pipe) -> torch.Tensor:
    cond, uncond = text_embeddings(1)
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, **ARGS,
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    unet = tiny_sd_pipeline("sd15_deep").unet
    return write_lora(lora_adapted(unet), tmp_path_factory.mktemp("lora") / "style.safetensors")


def _with_lora(lora_file):
    pipe = tiny_sd_pipeline("sd15_deep")
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="style")
    return pipe


def test_optimize_with_a_lora_loaded_equals_diffusers(lora_file):
    theirs, ours = _with_lora(lora_file), optimize(_with_lora(lora_file), preset="none")
    expected = _run(theirs)
    assert rel_l2(_run(ours), expected) <= 1e-5
    assert rel_l2(_run(tiny_sd_pipeline("sd15_deep")), expected) > 1e-3   # the LoRA changed the result


def test_optimize_with_a_lora_matches_deepcache_helper_with_it(lora_file):
    theirs = _with_lora(lora_file)
    helper = DeepCache.DeepCacheSDHelper(pipe=theirs)
    helper.set_params(cache_interval=BALANCED.cache_interval, cache_branch_id=BALANCED.cache_branch)
    helper.enable()
    try:
        expected = _run(theirs)
    finally:
        helper.disable()
    ours = optimize(_with_lora(lora_file), preset="none", cache_interval=BALANCED.cache_interval,
                    cache_branch=BALANCED.cache_branch)
    assert rel_l2(_run(ours), expected) <= 1e-5
    assert any(step.variant == "shallow" for step in ours._postdiff.last_plan)


def _half_adapter(lora_file):
    """(diffusers' pipeline, ours, our latents) after set_adapters at half weight, checked against diffusers."""
    theirs, ours = _with_lora(lora_file), optimize(_with_lora(lora_file), preset="none")
    full = _run(ours)
    for pipe in (theirs, ours):
        pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = _run(ours)
    assert rel_l2(half, _run(theirs)) <= 1e-5 and rel_l2(half, full) > 1e-3
    return theirs, ours, half


def test_set_adapters_after_optimize_takes_effect(lora_file):
    _half_adapter(lora_file)


# fuse_lora after set_adapters: the slow tier's (the default tier's budget, 7 Dec); set_adapters above is the
# default tier's test of a change of adapters after optimize
@pytest.mark.slow
def test_fuse_lora_after_optimize_takes_effect(lora_file):
    theirs, ours, half = _half_adapter(lora_file)
    for pipe in (theirs, ours):
        pipe.fuse_lora(lora_scale=1.0)   # into the base weights, at the adapters' current weight
    fused = _run(ours)
    assert rel_l2(fused, _run(theirs)) <= 1e-5 and rel_l2(fused, half) <= 1e-4   # applied once, not twice
    restore(ours)
    assert rel_l2(_run(ours), fused) <= 1e-5
