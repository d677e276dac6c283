import json

import pytest

from postdiff_compile import PRESETS, PostDiffConfig, PostDiffError, resolve_config


def test_none_is_identity_and_overrides_apply():
    assert PRESETS["none"].is_identity
    cfg = resolve_config("none", cache_interval="3", cache_branch=1, cross_attn_cache="cond",
                         cross_attn_cache_step=4)
    assert (cfg.cache_interval, cfg.cache_branch, cfg.cross_attn_cache) == (3, 1, "cond")
    assert not cfg.is_identity
    assert not cfg.mixed_resolution
    assert cfg.replace(low_res_scale=0.5, low_res_fraction=0.5).mixed_resolution
    assert not cfg.replace(low_res_scale=0.5).mixed_resolution   # a scale without a fraction switches nothing


def test_presets_per_family():
    # The paper's beta: 1/2 for SD1.5 (and SD2, same U-Net design), 3/4 for SDXL and PixArt-alpha; s = 1/2.
    betas = {"sd15": 0.5, "sd2": 0.5, "sdxl": 0.75, "pixart_alpha": 0.75}
    for family, beta in betas.items():
        mix = PostDiffConfig(low_res_scale=beta, low_res_fraction=0.5)
        assert resolve_config("quality", family=family) == mix
        fast = resolve_config("fast", family=family)
        assert (fast.low_res_scale, fast.low_res_fraction, fast.cross_attn_cache) == (beta, 0.5, "cond")
        assert 5 <= fast.cross_attn_cache_step <= 15   # the paper's range for m
        if family == "pixart_alpha":
            continue
        assert resolve_config("balanced", family=family) == mix.replace(cache_interval=2, cache_branch=1)
        assert (fast.cache_interval, fast.cache_branch) == (2, 1)
    # PixArt-alpha caches its middle blocks (block cache) where the U-Nets use DeepCache: interval 2, two blocks
    # recomputed at each end; fast adds the cross-attention cache at the paper's PixArt m = 15.
    assert resolve_config("balanced", family="pixart_alpha") == mix.replace(cache_interval=2, cache_branch=2)
    pixart = resolve_config("fast", family="pixart_alpha")
    assert (pixart.cache_interval, pixart.cache_branch, pixart.cross_attn_cache_step) == (2, 2, 15)
    # LCM: no CFG, 4 steps; the cross-attention cache read at the last step, on top of DeepCache.
    for family, beta in (("lcm_sd15", 0.5), ("lcm_sdxl", 0.75)):
        lcm = resolve_config("fast", family=family)
        assert (lcm.low_res_scale, lcm.cache_interval, lcm.cross_attn_cache, lcm.cross_attn_cache_step) == \
            (beta, 2, "cond", 3)
    # Overrides apply on top of the family's preset.
    assert resolve_config("fast", family="sd15", cross_attn_cache_step=5).cross_attn_cache_step == 5


@pytest.mark.parametrize("overrides, words", [
    (dict(cache_intervall=2), "unknown PostDiffConfig field"),
    (dict(cache_interval=0), "cache_interval must be >= 1"),
    (dict(cache_interval=2.5), "must be of type int"),
    (dict(low_res_scale=1.5), "low_res_scale"),
    (dict(low_res_fraction=1.0), "low_res_fraction"),
    (dict(renoise="old"), "renoise must be one of"),
    (dict(clamp_x0=-1), "clamp_x0 must be a finite number >= 0"),
    (dict(clamp_x0=float("nan")), "clamp_x0 must be a finite number >= 0"),
    (dict(cross_attn_cache="maybe"), "cross_attn_cache must be one of"),
    (dict(cross_attn_cache="cond"), "cross_attn_cache_step must be >= 1"),
    (dict(cache_schedule="random"), "cache_schedule must be one of"),
    (dict(cache_pow=1.0), r"cache_pow must be in \(1, 10\]"),
])
def test_bad_overrides(overrides, words):
    with pytest.raises(PostDiffError, match=words):
        resolve_config("none", **overrides)


def test_json_round_trip(tmp_path):
    cfg = PostDiffConfig(cache_interval=2, cache_branch=3, cross_attn_cache="ave", cross_attn_cache_step=7)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert PostDiffConfig.from_json_file(path) == cfg
    path.write_text(json.dumps({**cfg.to_dict(), "config_version": 99}))
    with pytest.raises(PostDiffError, match="config_version 99") as err:
        PostDiffConfig.from_json_file(path)
    assert str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(PostDiffError, match="not valid JSON"):
        PostDiffConfig.from_json_file(path)
