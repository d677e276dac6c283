"""The step plan: which variant each step runs, the caches it reads and writes, CFG on or off."""
import pytest

from postdiff_compile import PostDiffConfig, PostDiffError
from postdiff_compile.plan import Step, build_plan, check_plan, quad_center_steps


def _variants(plan):
    return [s.variant for s in plan]


def test_identity_plan():
    plan = build_plan(PostDiffConfig(), 4)
    assert _variants(plan) == ["full"] * 4 and all(s.cfg and not s.reads and not s.writes for s in plan)
    assert not any(s.cfg for s in build_plan(PostDiffConfig(), 3, cfg=False))


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_uniform_deepcache(interval):
    plan = build_plan(PostDiffConfig(cache_interval=interval), 11)
    full = [s.index for s in plan if s.variant.startswith("full")]
    assert full == list(range(0, 11, interval))
    for s in plan:
        assert s.reads == (("deepcache",) if s.variant == "shallow" else ())
        feeds_a_shallow_step = s.index in full and s.index + 1 < 11 and s.index + 1 not in full
        assert s.writes == (("deepcache",) if feeds_a_shallow_step else ())


def test_quad_center_matches_the_deepcache_paper_code():
    # Full-step sets of DeepCache's sample_from_quad_center for N = 50, center 15, pow 1.4, as recomputed
    # in ../shared/reference/peers.md 1.5 (interval 5: the paper's SD script; interval 3).
    assert quad_center_steps(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert quad_center_steps(50, 17, 15, 1.4) == [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46]
    plan = build_plan(PostDiffConfig(cache_interval=5, cache_schedule="quad_center"), 50)
    assert [s.index for s in plan if s.variant.startswith("full")] == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    with pytest.raises(PostDiffError, match="quad_center schedule finds no 15 full steps out of 20"):
        quad_center_steps(20, 15, 3, 1.4)


def test_cross_attn_cache_gates_cfg():
    plan = build_plan(PostDiffConfig(cross_attn_cache="cond", cross_attn_cache_step=3), 6)
    assert _variants(plan) == ["full", "full", "full+write_ca"] + ["full+read_ca"] * 3
    assert [s.cfg for s in plan] == [True, True, True, False, False, False]
    assert plan[2].writes == ("cross_attn",) and all(s.reads == ("cross_attn",) for s in plan[3:])
    # m at or past the last step: the cache would never be read, so the plan is the plain one.
    assert _variants(build_plan(PostDiffConfig(cross_attn_cache="ave", cross_attn_cache_step=6), 6)) == ["full"] * 6


def test_both_caches_force_full_steps_around_the_gate():
    plan = build_plan(PostDiffConfig(cache_interval=3, cross_attn_cache="cond", cross_attn_cache_step=5), 12)
    assert _variants(plan) == [
        "full+write_dc", "shallow", "shallow", "full", "full+write_ca",   # 4 = m - 1: CFG, writes CA
        "full+write_dc+read_ca", "shallow+read_ca", "shallow+read_ca",           # 5 = m: restart at batch 1
        "full+write_dc+read_ca", "shallow+read_ca", "shallow+read_ca", "full+read_ca"]


def test_check_plan_rejects_reads_without_a_matching_write():
    with pytest.raises(PostDiffError, match="before any step writes it"):
        check_plan([Step(0, "shallow", True, ("deepcache",))])
    with pytest.raises(PostDiffError, match="different batch"):
        check_plan([Step(0, "full+write_dc", True, (), ("deepcache",)), Step(1, "shallow", False, ("deepcache",))])


def test_step_count():
    with pytest.raises(PostDiffError, match="at least 1"):
        build_plan(PostDiffConfig(), 0)


def test_variant_names():
    from postdiff_compile.variant_spec import VariantSpec

    for name in ("full", "full+write_dc", "shallow", "full+write_ca", "full+read_ca", "full+write_dc+read_ca",
                 "shallow+read_ca"):
        assert VariantSpec.parse(name).name == name
    for bad in ("shallow+write_dc", "full+write_ca+read_ca", "half", "full+turbo"):
        with pytest.raises(PostDiffError, match="not a variant name"):
            VariantSpec.parse(bad)


def test_without_cfg_only_the_writing_step_is_forced_full():
    # With CFG steps m - 1 and m are full (T-GATE's DeepCache loaders); without CFG (LCM) the batch does not
    # change at m, so m may read the deep feature written at m - 1.
    config = PostDiffConfig(cache_interval=2, cross_attn_cache="cond", cross_attn_cache_step=3)
    with_cfg = [s.variant for s in build_plan(config, 6, cfg=True)]
    without = [s.variant for s in build_plan(config, 6, cfg=False)]
    assert with_cfg[2].startswith("full") and with_cfg[3].startswith("full")
    assert without[2].startswith("full+write_dc") and without[3] == "shallow+read_ca"
