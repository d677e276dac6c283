"""`postdiff-compile explain`: FLOPs counted from the variant graphs of full-size architectures on meta."""
import json
from pathlib import Path

import pytest

from postdiff_compile.cli import main

HEADERS = Path(__file__).parent / "fixtures" / "headers"


def _explain(capsys, *argv):
    assert main(["explain", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sd15_reproduces_the_papers_flops(capsys):
    # paper-numbers.md Table A/B: SD1.5, 768x768, 20 steps: baseline 30.420 T, DeepCache ablation 17.787 T,
    # Mix 19.035 T, Mix + Cache 11.129 T ("FLOPs" there = conv+linear MACs x CFG batch, attention excluded).
    base = ["--family", "sd15", "--resolution", "768x768", "--steps", "20"]
    none = _explain(capsys, *base, "--preset", "none")
    deepcache = _explain(capsys, *base, "--preset", "none", "--cache-interval", "2", "--cache-branch", "1")
    quality = _explain(capsys, *base, "--preset", "quality")
    balanced = _explain(capsys, *base, "--preset", "balanced")
    # The issues ask for 0.5%; we are within 0.1% (30.400, 17.773, 19.022 and 11.121 T) and hold that.
    assert none["total_flops_paper"] == pytest.approx(30.420e12, rel=0.001)
    assert deepcache["total_flops_paper"] == pytest.approx(17.787e12, rel=0.001)
    assert quality["total_flops_paper"] == pytest.approx(19.035e12, rel=0.001)
    assert balanced["total_flops_paper"] == pytest.approx(11.129e12, rel=0.001)
    assert none["total_flops_true"] > 2 * none["total_flops_paper"]   # 2 per MAC, plus attention
    assert deepcache["total_flops_true"] < none["total_flops_true"]
    assert [s["variant"] for s in deepcache["plan"][:2]] == ["full+write_dc", "shallow"]
    assert sum(s["flops_paper"] for s in deepcache["plan"]) == deepcache["total_flops_paper"]
    # Mixed resolution: 10 steps on the 48x48 latent, then 10 on 96x96.
    assert quality["switch_step"] == 10 and quality["low_res_latent_size"] == [48, 48]
    assert [s["resolution"] for s in quality["plan"]] == ["low"] * 10 + ["full"] * 10
    low, full = quality["variants"]["full@b2_48x48"], quality["variants"]["full@b2_96x96"]
    assert low["flops_paper"] / full["flops_paper"] == pytest.approx(0.25148, rel=0.002)  # paper-numbers.md 4


def test_explain_same_flags_as_compile_and_a_checkpoint_header(capsys):
    # A header-only SD1.5 checkpoint gives the same architecture as --family sd15.
    by_file = _explain(capsys, str(HEADERS / "sd15_ldm_full.safetensors"), "--steps", "4", "--preset", "none",
                       "--cache-interval", "2", "--cache-branch", "0", "--resolution", "256x256")
    by_family = _explain(capsys, "--family", "sd15", "--steps", "4", "--preset", "none",
                         "--cache-interval", "2", "--cache-branch", "0", "--resolution", "256x256")
    assert by_file["total_flops_paper"] == by_family["total_flops_paper"]
    assert by_file["config"]["cache_interval"] == 2 and by_file["family"] == "sd15"
    assert by_file["fraction_paper"] < 0.6


# Slow tier (20 s of the default tier's 600, 8 Dec): the CFG gate's plan is test_plan.py's
# (test_cross_attn_cache_gates_cfg), and fast's place among the presets test_all_presets'.
@pytest.mark.slow
def test_fast_preset_plan(capsys):
    fast = _explain(capsys, "--family", "sd15", "--resolution", "256x256", "--steps", "20", "--preset", "fast")
    m = fast["config"]["cross_attn_cache_step"]
    assert [s["cfg"] for s in fast["plan"]] == [i < m for i in range(20)]
    # After m the batch is 1: the same variant costs half as much in the paper's convention.
    assert fast["variants"]["full+write_dc+read_ca@b1_32x32"]["flops_paper"] < fast["variants"]["full@b2_32x32"][
        "flops_paper"] / 2
    assert fast["total_flops_true"] < _explain(capsys, "--family", "sd15", "--resolution", "256x256", "--steps", "20",
                                               "--preset", "balanced")["total_flops_true"]


def test_all_presets(capsys):
    # The paper test's size and steps: explain memoizes captures per process, and this file runs in one worker, so
    # only fast's own variants are captured here (at 256x256 every preset's were: 29 s of the default tier, 8 Dec).
    rows = _explain(capsys, "--family", "sd15", "--resolution", "768x768", "--steps", "20", "--all-presets")
    assert list(rows) == ["none", "quality", "balanced", "fast"]
    fractions = [rows[name]["fraction_paper"] for name in rows]
    assert fractions[0] == 1.0 and fractions == sorted(fractions, reverse=True)
    assert rows["quality"]["switch_step"] == 10
    # Overrides apply to every preset.
    rows = _explain(capsys, "--family", "pixart_alpha", "--resolution", "256x256", "--steps", "4", "--all-presets",
                    "--low-res-fraction", "0")
    assert all(rows[name]["switch_step"] == 0 for name in rows)
    assert rows["balanced"]["fraction_paper"] < 1.0     # the block cache alone


@pytest.mark.slow   # full-size SDXL and PixArt-alpha on meta: about a minute; the SD1.5 paper test is the default's
def test_sdxl_and_pixart_reproduce_the_papers_flops(capsys):
    # paper-numbers.md: 20 steps at 1024x1024, conv+linear MACs x CFG batch: SDXL 119.641 T, PixArt-alpha
    # 85.640 T; PixArt's "Mix + Cache" 54.718 T is beta 3/4 for 10 steps with the cross-attention cache (Cond)
    # from step 15, which is our `quality` plus that cache.
    base = ["--resolution", "1024x1024", "--steps", "20", "--preset"]
    sdxl = _explain(capsys, "--family", "sdxl", *base, "none")
    pixart = _explain(capsys, "--family", "pixart_alpha", *base, "none")
    pixart_mix_cache = _explain(capsys, "--family", "pixart_alpha", *base, "quality", "--cross-attn-cache", "cond",
                                "--cross-attn-cache-step", "15")
    # Held to what the README and benchmarks/results/paper_tables.md claim: SDXL within 0.08% (119.55 T),
    # PixArt-alpha within 0.02% (85.63 T and 54.708 T).
    assert sdxl["total_flops_paper"] == pytest.approx(119.641e12, rel=0.001)
    assert pixart["total_flops_paper"] == pytest.approx(85.640e12, rel=0.00025)
    assert pixart_mix_cache["total_flops_paper"] == pytest.approx(54.718e12, rel=0.00025)


@pytest.mark.parametrize("family", ["pixart_alpha", "lcm_sd15", *(pytest.param(f, marks=pytest.mark.slow)
                                                                   for f in ("sdxl", "lcm_sdxl", "sd2"))])
def test_every_family_prints_its_presets(capsys, tmp_path, family):
    # Tiny single-file checkpoints of each family's layout, so that capturing every preset's variants takes
    # seconds (full-size architectures: benchmarks/preset_flops.py, and the paper test above).
    from tiny_models import tiny_denoiser, write_checkpoint

    model = tiny_denoiser("pixart_alpha_deep" if family == "pixart_alpha" else family)
    path = write_checkpoint(model, tmp_path / f"{family}.safetensors",
                            "pixart_original" if family == "pixart_alpha" else "ldm")
    assert main(["explain", str(path), "--resolution", "128x128", "--all-presets"]) == 0
    table = capsys.readouterr().out
    steps = 4 if family.startswith("lcm") else 20       # the family's default step count
    assert f"{family}, {steps} steps" in table
    for name in ("none", "quality", "balanced", "fast"):
        assert name in table
    rows = _explain(capsys, str(path), "--resolution", "128x128", "--all-presets")
    fractions = [rows[name]["fraction_paper"] for name in ("none", "quality", "balanced", "fast")]
    assert fractions[0] == 1.0 and all(f < 1.0 for f in fractions[1:])
    assert fractions[2] < fractions[1]          # balanced caches on top of quality
    assert all(len(rows[name]["plan"]) == steps for name in rows)
    # LCM pipelines never batch CFG: every step is batch 1.
    assert all(s["cfg"] != family.startswith("lcm") for s in rows["none"]["plan"])


def test_explain_errors(capsys):
    assert main(["explain", "--preset", "none"]) == 2
    assert "exactly one of --family" in capsys.readouterr().err
    assert main(["explain", "--family", "pixart_alpha", "--preset", "balanced", "--cache-branch", "14"]) == 2
    assert "cache_branch 14 does not exist for a transformer of 28 blocks" in capsys.readouterr().err
    assert main(["explain", str(HEADERS / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
