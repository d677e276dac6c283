"""study, tune and samples: small runs of the real commands on the shipped model, and their bad input."""
import json

import pytest
from PIL import Image

from postdiff_compile.cli import main
from postdiff_compile.config import PRESETS, PostDiffConfig
from postdiff_compile.metrics.evaluate import MAX_PSNR, Sampler
from postdiff_compile.models.families import get_family
from postdiff_compile.reference import load_pipeline
from postdiff_compile.study import StudySettings, format_table, run_study, write_results


def _stage(name, total):
    return lambda n: None


def test_study_writes_table_json_and_plot(tmp_path):
    pipe = load_pipeline()
    settings = StudySettings(prompts=6, seed_sets=2, real=64, steps=(4,))
    points = [Sampler("ddim-4", "ddim", 4), Sampler("dpmsolver++-4", "dpmsolver++", 4),
              Sampler("dpmsolver++-20", "dpmsolver++", 20),
              Sampler("mix", config=PRESETS["quality"].for_family("scenes32"))]
    result = run_study(pipe, get_family("scenes32"), settings, _stage, points)
    rows = {r["name"]: r for r in result.rows}
    assert rows["ddim-4"]["flops_fraction"] == pytest.approx(4 / 20)
    assert 0.55 < rows["mix"]["flops_fraction"] < 0.7            # half the steps at a quarter of the pixels
    assert rows["ddim-20 (baseline)"]["psnr"] == MAX_PSNR and rows["ddim-4"]["psnr"] < MAX_PSNR
    assert all(0 <= r["caption_match"] <= 1 and r["frechet"] >= 0 for r in result.rows)
    assert set(result.noise) == {"caption_match", "attribute_accuracy", "frechet"}
    paths = write_results(result, tmp_path, "s")
    assert json.loads(paths[0].read_text())["rows"][0]["kind"] == "baseline"
    assert "| mix | postdiff |" in paths[1].read_text() and "Noise floor" in format_table(result)
    assert Image.open(paths[2]).size[0] > 500


def test_samples_command_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["samples", "--prompts", "2", "--steps", "3", "--out", str(out)]) == 0
    image = Image.open(out)
    columns = len(PRESETS)            # the baseline and every preset but none
    assert image.size == (30 + columns * (128 + 4), 18 + 2 * (128 + 4))
    assert len(out.with_suffix(".md").read_text().splitlines()) == 4


def test_tune_command_small(tmp_path, capsys):
    code = main(["tune", "--flops-budget", "0.35", "--calibration", "3", "--full", "4", "--steps", "8",
                 "--out", str(tmp_path), "--name", "t"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "t.json").read_text())
    candidates = data["candidates"]
    assert len(candidates) >= 2 and all(c["flops_fraction"] <= 0.35 for c in candidates)
    assert data["best"]["name"] == min(candidates, key=lambda c: c["calibration"]["frechet"])["name"]
    assert data["best_on_full"]["name"] == min(candidates, key=lambda c: c["full"]["frechet"])["name"]
    assert data["spearman"] is None or -1 <= data["spearman"] <= 1      # None: NaN (all tied) in strict JSON
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
