"""With every feature off, our loop over the captured graph reproduces StableDiffusionPipeline."""
import pytest
import torch
from tiny_models import text_embeddings, tiny_sd_pipeline

from postdiff_compile import PostDiffConfig, PostDiffError, optimize, restore
from postdiff_compile.verification import rel_l2

TOLERANCE = 1e-5


def _run(pipe, seed=0, **kw):
    cond, uncond = text_embeddings(kw.pop("batch", 1))
    args = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=8, guidance_scale=7.5,
                output_type="latent", height=96, width=96)
    args.update(kw)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp"])
def test_none_reproduces_diffusers(scheduler):
    pipe = tiny_sd_pipeline("sd15", scheduler)
    reference = _run(pipe)
    optimize(pipe, preset="none")
    assert type(pipe).__name__ == "PostDiffStableDiffusionPipeline"
    ours = _run(pipe)
    err = rel_l2(ours, reference)
    print(f"{scheduler}: relative L2 error {err:.3g}")
    assert err <= TOLERANCE
    # The runtime really ran: it captured a CFG-batch graph for this latent size.
    assert [bucket.batch for bucket in pipe._postdiff.store.captured] == [2]
    assert len(pipe._postdiff.last_plan) == 8


def test_no_cfg_and_several_images_per_prompt():
    pipe = tiny_sd_pipeline("sd15", "euler")
    kw = dict(guidance_scale=1.0, num_images_per_prompt=2, batch=1)
    reference = _run(pipe, **kw)
    optimize(pipe)
    ours = _run(pipe, **kw)
    assert ours.shape == reference.shape == (2, 4, 12, 12)
    assert rel_l2(ours, reference) <= TOLERANCE
    assert [bucket.batch for bucket in pipe._postdiff.store.captured] == [2]  # 2 images, no CFG half


def test_decoded_images_match_and_restore_gives_diffusers_back():
    pipe = tiny_sd_pipeline("sd15", "ddim")
    reference = _run(pipe, output_type="pt")
    optimize(pipe)
    ours = _run(pipe, output_type="pt")
    assert ours.shape == reference.shape and ours.shape[1] == 3
    assert rel_l2(ours, reference) <= TOLERANCE
    restore(pipe)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and not hasattr(pipe, "_postdiff")


def test_seeds_give_different_latents_and_calls_do_not_share_state():
    pipe = optimize(tiny_sd_pipeline("sd15", "dpmpp"))
    first, other, again = _run(pipe, seed=0), _run(pipe, seed=1), _run(pipe, seed=0)
    assert torch.equal(first, again)
    assert rel_l2(other, first) > 0.1


def test_config_overrides_are_checked():
    pipe = tiny_sd_pipeline("sd15", "ddim")
    with pytest.raises(PostDiffError, match="unknown PostDiffConfig field"):
        optimize(pipe, preset="none", cache_intervall=2)
    with pytest.raises(PostDiffError, match="unknown preset"):
        optimize(pipe, preset="turbo")
    with pytest.raises(PostDiffError, match="low_res_fraction must be in"):
        optimize(pipe, preset="none", low_res_scale=0.5, low_res_fraction=1.0)
    with pytest.raises(PostDiffError, match="cache_branch 6 does not exist.*0..5"):
        optimize(pipe, preset="none", cache_interval=2, cache_branch=6)
    assert type(pipe).__name__ == "StableDiffusionPipeline"  # a refused optimize leaves the pipeline alone
    optimize(pipe, PostDiffConfig())
    assert pipe._postdiff.config.is_identity


def test_unsupported_call_arguments_are_an_error():
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"))
    with pytest.raises(PostDiffError, match="cross_attention_kwargs"):
        _run(pipe, cross_attention_kwargs={"scale": 0.5})
