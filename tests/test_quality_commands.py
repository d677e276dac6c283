"""study, tune and samples: small runs of the real commands on the shipped model, and their bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from postdiff_compile.cli import main
from postdiff_compile.config import PRESETS, PostDiffConfig
from postdiff_compile.explain import explain
from postdiff_compile.lab.classifier import load_classifier
from postdiff_compile.lab.evaluate import MAX_PSNR, PromptSet, Sampler, evaluate, generate, real_features
from postdiff_compile.models.families import get_family
from postdiff_compile.lab.reference import load_pipeline
from postdiff_compile.lab.study import StudySettings, format_table, load_result, run_study, write_results


def _stage(name, total):
    return lambda n: None


def test_study_writes_table_json_and_plot(tmp_path):
    pipe = load_pipeline()
    settings = StudySettings(prompts=4, seed_sets=2, real=64, steps=(4,))
    # Three samplers at 4 steps and a PostDiff config (a dpmsolver++-8 point added nothing the others do not check:
    # cut for the default tier's 10 minutes, 8 Dec).
    points = [Sampler("ddim-4", "ddim", 4), Sampler("dpmsolver++-4", "dpmsolver++", 4), Sampler("euler-4", "euler", 4),
              Sampler("mix", config=PRESETS["quality"].for_family("scenes32"))]
    result = run_study(pipe, get_family("scenes32"), settings, _stage, points)
    rows = {r["name"]: r for r in result.rows}
    assert rows["ddim-4"]["flops_fraction"] == pytest.approx(4 / 20)
    # Half the steps at a quarter of the pixels: the fraction explain counts for this config, exactly.
    family = get_family("scenes32")
    mix = explain(family, PRESETS["quality"].for_family("scenes32"), steps=20, resolution=(32, 32)).total.true
    baseline = explain(family, PostDiffConfig(), steps=20, resolution=(32, 32)).total.true
    assert rows["mix"]["flops_fraction"] == pytest.approx(mix / baseline)
    assert 0.55 < rows["mix"]["flops_fraction"] < 0.7
    assert rows["ddim-20 (baseline)"]["psnr"] == MAX_PSNR and rows["ddim-4"]["psnr"] < MAX_PSNR
    # A row's per-set values are what the metrics give for that sampler on each prompt set, recomputed here from
    # the public pieces (a study that mixed up rows, prompt sets or seeds would differ); its value is their mean
    # and its interval Student's t at 1 degree of freedom (12.706) times the standard error.
    classifier = load_classifier()
    real = real_features(classifier, 64)
    direct = [evaluate(generate(pipe, points[0], PromptSet.make(i, 4), settings.guidance), PromptSet.make(i, 4),
                       classifier, real) for i in range(2)]
    for metric in ("caption_match", "attribute_accuracy", "frechet"):
        assert rows["ddim-4"]["per_set"][metric] == pytest.approx([d[metric] for d in direct], rel=1e-6), metric
        values = np.array([d[metric] for d in direct])
        assert rows["ddim-4"][metric] == pytest.approx(values.mean(), rel=1e-6)
        assert rows["ddim-4"]["ci95"][metric] == pytest.approx(12.706 * values.std(ddof=1) / np.sqrt(2), rel=1e-4)
    assert rows["euler-4"]["frechet"] != pytest.approx(rows["ddim-4"]["frechet"], rel=1e-3)
    # Paired verdicts: against the baseline for every point, against fewer steps at equal FLOPs for PostDiff ones.
    assert set(rows["ddim-4"]["vs_baseline"]) == {"frechet", "caption_match", "acc_colour"}
    assert "vs_fewer_steps" in rows["mix"] and "vs_fewer_steps" not in rows["ddim-4"]
    frechet_vs_base = np.subtract(rows["ddim-4"]["per_set"]["frechet"], rows["ddim-20 (baseline)"]["per_set"]["frechet"])
    assert rows["ddim-4"]["vs_baseline"]["frechet"]["delta"] == pytest.approx(frechet_vs_base.mean())
    assert rows["ddim-4"]["frechet"] != pytest.approx(rows["ddim-20 (baseline)"]["frechet"], rel=1e-3)
    assert set(result.noise) == {"caption_match", "attribute_accuracy", "acc_colour", "acc_shape", "frechet"}
    paths = write_results(result, tmp_path, "s")
    assert json.loads(paths[0].read_text())["rows"][0]["kind"] == "baseline"
    assert "| mix | postdiff |" in paths[1].read_text() and "Noise floor" in format_table(result)
    assert load_result(paths[0]).rows[1]["ci95"] == result.rows[1]["ci95"]
    assert Image.open(paths[2]).size[0] > 500


def test_samples_command_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["samples", "--prompts", "2", "--steps", "3", "--out", str(out)]) == 0
    image = Image.open(out)
    columns = len(PRESETS)            # the baseline and every preset but none
    assert image.size == (30 + columns * (128 + 4), 18 + 2 * (128 + 4))
    assert len(out.with_suffix(".md").read_text().splitlines()) == 4
    # Each tile is a drawn image, and each column (sampler) and row (prompt) drew a different one.
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    tiles = [[pixels[18 + r * 132: 18 + r * 132 + 128, 30 + c * 132: 30 + c * 132 + 128] for c in range(columns)]
             for r in range(2)]
    for r in range(2):
        assert all(tile.std() > 1 for tile in tiles[r])
        for c in range(1, columns):
            assert np.abs(tiles[r][c] - tiles[r][0]).mean() > 1, (r, c)   # the preset changed the image
    assert np.abs(tiles[0][0] - tiles[1][0]).mean() > 1                     # so did the prompt


@pytest.mark.slow   # about 40 s; tune's bad input stays in the default tier (below)
def test_tune_command_small(tmp_path, capsys):
    # 10 candidates under the budget, each drawn for 2 calibration and 2 full prompts at 4 steps (about 40 s).
    code = main(["tune", "--flops-budget", "0.3", "--calibration", "2", "--full", "2", "--steps", "4",
                 "--out", str(tmp_path), "--name", "t"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "t.json").read_text())
    candidates = data["candidates"]
    assert len(candidates) >= 2 and all(c["flops_fraction"] <= 0.3 for c in candidates)
    assert data["best"]["name"] == min(candidates, key=lambda c: c["calibration"]["frechet"])["name"]
    assert data["best_on_full"]["name"] == min(candidates, key=lambda c: c["full"]["frechet"])["name"]
    # Spearman's rank correlation of the calibration and full Frechet distances, recomputed from its definition:
    # Pearson's correlation of the ranks, tied values sharing their mean rank (candidates that differ only in
    # a cache the 4-step plan never reads draw the same images). All tied: undefined, written as null.
    def ranks(values):
        order = sorted(values)
        return [sum(i for i, v in enumerate(order) if v == x) / order.count(x) for x in values]
    cal, full = (ranks([c[part]["frechet"] for c in candidates]) for part in ("calibration", "full"))
    mean_cal, mean_full = sum(cal) / len(cal), sum(full) / len(full)
    cov = sum((a - mean_cal) * (b - mean_full) for a, b in zip(cal, full))
    spread = (sum((a - mean_cal) ** 2 for a in cal) * sum((b - mean_full) ** 2 for b in full)) ** 0.5
    assert data["spearman"] == (pytest.approx(cov / spread, abs=1e-9) if spread else None)
    PostDiffConfig.from_dict(data["best"]["config"])                    # a config the tool can read back
    assert "Spearman" in (tmp_path / "t.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["study", "NOPE"], "not a reference-model folder"),
    (["tune", "--flops-budget", "0"], "--flops-budget"),
    (["tune", "--flops-budget", "0.4", "--metric", "fid"], "--metric"),
    (["study", "--prompts", "0"], "--prompts"),
    (["study", "--steps", "4,x"], "--steps"),
    (["study", "--steps", "0,4"], "--steps"),
    (["study", "--seed-sets", "0"], "--seed-sets"),
    (["samples", "--threads", "0"], "--threads"),
    (["tune", "--flops-budget", "0.4", "--full", "1"], "--full"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.mark.slow   # two small studies on model 2 through the CLI
def test_a_study_run_again_with_its_cache_reuses_every_job(tmp_path):
    """`study --cache DIR` (lab/job_cache.py): the second run computes nothing and writes the same results;
    the cache's resumption after a failure is tests/test_job_cache.py's."""
    cache = tmp_path / "cache"
    args = ["study", "--prompts", "2", "--seed-sets", "2", "--steps", "2", "--out", str(tmp_path),
            "--cache", str(cache)]
    assert main(args + ["--name", "first"]) == 0
    written = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    first = json.loads((tmp_path / "first.json").read_text())
    assert len(written) == 2 * len(first["rows"]) and first["model"] == "scenes64"
    assert main(args + ["--name", "again"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")} == written
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["per_set"] for r in again["rows"]] == [r["per_set"] for r in first["rows"]]
