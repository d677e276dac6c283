"""Our caching runtime against the peers' own packages on the same tiny SD1.5-layout pipeline.

DeepCache's `DeepCacheSDHelper` and T-GATE's `TgateSDLoader` / `TgateSDDeepCacheLoader` run their own
code (installed with pip --no-deps); we run the plan over rewritten graphs. Same weights, embeddings,
scheduler and generator; the outputs must agree within relative L2 1e-5.
"""
import functools
import itertools

import DeepCache  # the peers' own packages, installed by the README's test command with pip --no-deps
import pytest
import tgate
import torch
from tiny_models import text_embeddings, tiny_sd_pipeline

from postdiff_compile import optimize
from postdiff_compile.verification import rel_l2

TOLERANCE = 1e-5
STEPS = 10
ARGS = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent", height=96, width=96)


def _embeds():
    cond, uncond = text_embeddings(1)
    return dict(prompt_embeds=cond, negative_prompt_embeds=uncond)


@functools.cache
def pipes(scheduler: str):
    """(theirs, ours): two pipelines with identical weights; ours is optimized once, then re-configured."""
    return tiny_sd_pipeline("sd15_deep", scheduler), optimize(tiny_sd_pipeline("sd15_deep", scheduler))


@functools.cache
def baseline(scheduler: str) -> torch.Tensor:
    """Our `none` run, which every comparison below checks caching moved away from (computed once per scheduler)."""
    _, ours = pipes(scheduler)
    return optimize(ours, preset="none")(**_embeds(), **ARGS, generator=torch.Generator().manual_seed(0)).images


def cases(grid, default):
    """Every combination of the grid; the `default` ones run in the default tier, the others in the slow tier."""
    return [pytest.param(*case, marks=() if case in default else pytest.mark.slow) for case in grid]


def _deepcache(pipe, interval, branch):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return pipe(**_embeds(), **ARGS, generator=torch.Generator().manual_seed(0)).images
    finally:
        helper.disable()


# 36 cases; 3 in the default tier: the shallowest and deepest branches and one between, each interval, both
# schedulers.
@pytest.mark.parametrize("scheduler, branch, interval", cases(
    list(itertools.product(["ddim", "euler"], range(6), [2, 3, 5])),
    {("ddim", 0, 2), ("euler", 3, 3), ("ddim", 5, 5)}))
def test_deepcache_matches_helper(scheduler, branch, interval):
    theirs, ours = pipes(scheduler)
    expected = _deepcache(theirs, interval, branch)
    optimize(ours, preset="none", cache_interval=interval, cache_branch=branch)
    got = ours(**_embeds(), **ARGS, generator=torch.Generator().manual_seed(0)).images
    plan = ours._postdiff.last_plan
    assert sum(step.variant == "shallow" for step in plan) == STEPS - len(range(0, STEPS, interval))
    err, effect = rel_l2(got, expected), rel_l2(got, baseline(scheduler))
    print(f"branch {branch} interval {interval}: rel L2 {err:.2e} (caching changed the result by {effect:.2e})")
    assert err <= TOLERANCE
    assert effect > 100 * TOLERANCE   # the comparison is not vacuous: caching did something


def _tgate(pipe, gate_step, deepcache=None):
    if deepcache:
        loaded = tgate.TgateSDDeepCacheLoader(pipe, cache_interval=deepcache[0], cache_branch_id=deepcache[1])
    else:
        loaded = tgate.TgateSDLoader(pipe)
    try:
        return loaded.tgate(**_embeds(), **ARGS, gate_step=gate_step, sp_interval=1, fi_interval=1, warm_up=0,
                            generator=torch.Generator().manual_seed(0)).images
    finally:
        if deepcache:
            loaded.deepcache.disable()


@pytest.mark.parametrize("scheduler, gate_step", cases(list(itertools.product(["ddim", "euler"], [1, 4, 9])),
                                                     {("euler", 4)}))
def test_ave_matches_tgate(scheduler, gate_step):
    theirs, ours = pipes(scheduler)
    expected = _tgate(theirs, gate_step)
    optimize(ours, preset="none", cross_attn_cache="ave", cross_attn_cache_step=gate_step)
    got = ours(**_embeds(), **ARGS, generator=torch.Generator().manual_seed(0)).images
    assert [step.cfg for step in ours._postdiff.last_plan] == [i < gate_step for i in range(STEPS)]
    err, effect = rel_l2(got, expected), rel_l2(got, baseline(scheduler))
    print(f"gate {gate_step}: rel L2 {err:.2e} (the cache changed the result by {effect:.2e})")
    assert err <= TOLERANCE
    # A late gate changes little (4e-5 at gate 9), but more than the tolerance could hide.
    assert effect > TOLERANCE


@pytest.mark.parametrize("scheduler, gate_step, interval, branch", cases(
    [(s, *c) for s in ("ddim", "euler") for c in ((4, 2, 1), (5, 3, 0), (7, 2, 3))], {("ddim", 4, 2, 1)}))
def test_deepcache_with_cross_attn_cache_matches_tgate_deepcache(scheduler, gate_step, interval, branch):
    """Both caches: T-GATE's combined loader forces full steps at m - 1 and m; so does our plan."""
    theirs, ours = pipes(scheduler)
    expected = _tgate(theirs, gate_step, deepcache=(interval, branch))
    optimize(ours, preset="none", cache_interval=interval, cache_branch=branch, cross_attn_cache="ave",
             cross_attn_cache_step=gate_step)
    got = ours(**_embeds(), **ARGS, generator=torch.Generator().manual_seed(0)).images
    plan = ours._postdiff.last_plan
    assert plan[gate_step - 1].variant.startswith("full") and plan[gate_step].variant.startswith("full")
    assert any(step.variant == "shallow+read_ca" for step in plan)
    only_ca = optimize(ours, preset="none", cross_attn_cache="ave", cross_attn_cache_step=gate_step)(
        **_embeds(), **ARGS, generator=torch.Generator().manual_seed(0)).images
    err = rel_l2(got, expected)
    print(f"gate {gate_step} interval {interval} branch {branch}: rel L2 {err:.2e} "
          f"(DeepCache on top changed it by {rel_l2(got, only_ca):.2e})")
    assert err <= TOLERANCE
    assert rel_l2(got, only_ca) > 100 * TOLERANCE
