"""Cost tables: reading them, predicting a plan's latency from one, choosing a preset's configuration for a device,
ranking tune's candidates by predicted latency, and `profile` writing them (issue: Measure, don't count)."""
from __future__ import annotations

import json

import pytest

from postdiff_compile.config import PRESETS, PostDiffConfig, resolve_config
from postdiff_compile.costs import CostTable, DevicePeak
from postdiff_compile.errors import PostDiffError
from postdiff_compile.explain import explain
from postdiff_compile.fastest import fastest_in_class
from postdiff_compile.models.families import get_family
from postdiff_compile.plan import build_plan

FAMILY = get_family("scenes32")
RES = (32, 32)


def synthetic_ms(variant_id: str, batch1_factor: float) -> float:
    """A device where a whole denoiser call costs 100 ms at 32x32 and a shallow one 30, a quarter of that at 16x16
    (24x24: half), and batch 1 costs `batch1_factor` times batch 2."""
    name, tag = variant_id.split("@")
    batch, size = tag.split("_")
    ms = (30.0 if name.startswith("shallow") else 100.0) * {"32x32": 1.0, "24x24": 0.5, "16x16": 0.25}[size]
    return ms * (batch1_factor if batch == "b1" else 1.0)


def synthetic_table(configs, batch1_factor: float, peak: DevicePeak | None = None) -> CostTable:
    ids = {v for c in configs for v in explain(FAMILY, c, resolution=RES).variant_ids}
    ids.add("full@b2_32x32")   # the baseline's
    return CostTable(device="synthetic", backend="eager", family="scenes32", dtype="float32", cache_branch=1,
                     variants_ms={v: synthetic_ms(v, batch1_factor) for v in sorted(ids)}, step_overhead_ms=1.0,
                     peak=peak)


def test_prediction_is_the_sum_of_the_steps_variants_and_the_overhead():
    fast = resolve_config("fast", family="scenes32")
    table = synthetic_table([fast], 1.0)
    ex = explain(FAMILY, fast, resolution=RES, costs=table)
    # The readable reference: walk the plan and add up each step's synthetic cost.
    expected = 0.0
    for step in build_plan(fast, 20):
        size = "16x16" if step.low_res else "32x32"
        expected += synthetic_ms(f"{step.variant}@b{2 if step.cfg else 1}_{size}", 1.0) + 1.0
    assert ex.latency.total_ms == pytest.approx(expected)
    assert all(ex.latency.measured)
    assert ex.baseline_latency.total_ms == pytest.approx(20 * (100.0 + 1.0))


def test_preset_fast_with_costs_drops_cfg_off_steps_where_batch_1_saves_nothing():
    candidates = PRESETS["fast"].candidates("scenes32")
    assert candidates[0].cross_attn_cache == "cond"
    same = fastest_in_class("fast", FAMILY, synthetic_table(candidates, 1.0), steps=20, resolution=RES)
    assert same.config.cross_attn_cache == "off", same.ranking
    assert same.config in candidates[1:]
    assert [ms for _, ms in same.ranking] == sorted(ms for _, ms in same.ranking)
    # Where batch 1 does cost half, fast's own CFG-off steps win: the choice follows the table, not a rule.
    half = fastest_in_class("fast", FAMILY, synthetic_table(candidates, 0.5), steps=20, resolution=RES)
    assert half.config == candidates[0]


def test_cli_resolves_a_preset_for_the_device_of_a_cost_table(tmp_path, capsys):
    from postdiff_compile.cli import main

    table = synthetic_table(PRESETS["fast"].candidates("scenes32"), 1.0)
    path = table.write(tmp_path / "costs.json")
    assert main(["explain", "--family", "scenes32", "--resolution", "32x32", "--preset", "fast", "--costs", str(path),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["cross_attn_cache"] == "off"
    assert out["latency"]["total_ms"] < 20 * 101 and out["predicted_speedup"] > 1
    # Without --costs the preset is what it always was.
    assert main(["explain", "--family", "scenes32", "--resolution", "32x32", "--preset", "fast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["cross_attn_cache"] == "cond"


def test_tune_objective_latency_ranks_by_predicted_latency(monkeypatch, capsys, tmp_path):
    from postdiff_compile.cli import main
    from postdiff_compile.lab import tune
    from postdiff_compile.lab.reference import reference_folder

    mix = dict(low_res_scale=0.5, low_res_fraction=0.5, clamp_x0=1.0)
    grid = [PostDiffConfig(),
            PostDiffConfig(**mix),
            PostDiffConfig(**mix, cache_interval=2, cache_branch=1),
            PostDiffConfig(**mix, cache_interval=3, cache_branch=1),
            PostDiffConfig(**mix, cache_interval=2, cache_branch=1, cross_attn_cache="cond", cross_attn_cache_step=10)]
    monkeypatch.setattr(tune, "grid", lambda steps, clamp_x0=0.0: grid)
    path = synthetic_table(grid, 1.0).write(tmp_path / "costs.json")
    model1 = str(reference_folder())      # the table is scenes32's; the default model is scenes64
    assert main(["tune", model1, "--objective", "latency", "--costs", str(path), "--speedup", "1.2",
                 "--rank-only"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    predicted = [float(r[3]) for r in rows]
    assert predicted == sorted(predicted) and len(rows) == 4    # `none` is 1.0x: it does not fit
    assert all(float(r[4].strip().rstrip("x")) >= 1.2 for r in rows)
    # By hand from synthetic_ms (+1 ms per step): DeepCache k3 over the mix 725 + 20 ms, k2 812.5 + 20, the
    # CFG-off configuration 830 + 20, the mix alone 1250 + 20. FLOPs rank the CFG-off one first.
    assert [r[1].strip() for r in rows] == ["mix b0.5 s0.5, deepcache k3 b1", "mix b0.5 s0.5, deepcache k2 b1",
                                            "mix b0.5 s0.5, deepcache k2 b1, ca cond m10", "mix b0.5 s0.5"]
    assert predicted == pytest.approx([745, 832.5, 850, 1270], abs=0.1)
    flops_order = [r["name"] for r in tune.ranking(FAMILY, tune.TuneSettings(flops_budget=1.0), RES)]
    assert flops_order[0] == "mix b0.5 s0.5, deepcache k2 b1, ca cond m10"


def test_an_unmeasured_variant_costs_its_roofline_scaled_to_the_measured_ones():
    peak = DevicePeak(matmul_gflops=50, copy_gbs=8, op_us=10)
    table = synthetic_table([PostDiffConfig()], 1.0, peak)          # full@b2_32x32 only, 100 ms
    ex = explain(FAMILY, resolve_config("quality", family="scenes32"), resolution=RES, costs=table)
    low = [ms for ms, measured, step in zip(ex.latency.step_ms, ex.latency.measured, ex.steps) if step.step.low_res]
    assert not any(m for m, s in zip(ex.latency.measured, ex.steps) if s.step.low_res)
    assert all(m for m, s in zip(ex.latency.measured, ex.steps) if not s.step.low_res)
    # A quarter of the pixels: cheaper than the measured full-size step, dearer than a quarter of it (fixed costs).
    assert 25 < low[0] < 100 and len(set(low)) == 1
    assert ex.latency.calibration > 0


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(costs_version=7), "not a cost table of version 1"),
    (lambda d: d.update(bogus=1), "unknown field(s) bogus"),
    (lambda d: d["variants_ms"].update({"full@b2_32x32": -1}), "positive milliseconds"),
    (lambda d: d.update(variants_ms={}), "no variant times"),
])
def test_a_bad_cost_table_is_one_error_naming_the_file(tmp_path, edit, message, capsys):
    from postdiff_compile.cli import main

    data = synthetic_table([PostDiffConfig()], 1.0).to_json()
    edit(data)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PostDiffError) as err:
        CostTable.read(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert main(["explain", "--family", "scenes32", "--costs", str(path)]) == 2
    assert capsys.readouterr().err.count("error:") == 1


def test_a_cost_table_of_another_family_is_refused(tmp_path, capsys):
    from postdiff_compile.cli import main

    table = CostTable(device="d", backend="eager", family="sd15", dtype="float32", cache_branch=0,
                      variants_ms={"full@b2_64x64": 10.0}, step_overhead_ms=0.1)
    path = table.write(tmp_path / "sd15.json")
    assert main(["explain", "--family", "scenes32", "--costs", str(path)]) == 2
    assert "measured on a sd15 denoiser" in capsys.readouterr().err


def test_an_unmeasured_variant_without_a_probe_is_named():
    table = synthetic_table([PostDiffConfig()], 1.0)
    with pytest.raises(PostDiffError, match=r"no time for variant full@b2_16x16 and no device probe"):
        explain(FAMILY, resolve_config("quality", family="scenes32"), resolution=RES, costs=table)


def test_profile_refuses_a_backend_for_a_source(capsys, tmp_path):
    from postdiff_compile.cli import main

    assert main(["profile", "--backend", "onnxruntime"]) == 2
    assert "the reference model is a source; compile it first" in capsys.readouterr().err
    assert main(["profile", str(tmp_path), "--backend", "aoti"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: not an artifact folder (no manifest.json)") and err.count("error:") == 1
