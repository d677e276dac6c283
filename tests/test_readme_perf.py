"""The performance figures in README.md (a summary) and docs/performance.md (every table) are what
benchmarks/readme_perf.py makes of benchmarks/results/."""
import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_perf", ROOT / "benchmarks" / "readme_perf.py")
readme_perf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_perf)


def test_the_readme_section_is_generated_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert readme_perf.replace_section(readme, readme_perf.summary()) == readme, \
        "README.md's performance summary is stale: run python benchmarks/readme_perf.py"


def test_the_performance_page_is_generated_from_the_committed_results():
    page = (ROOT / "docs" / "performance.md").read_text()
    assert readme_perf.replace_section(page, readme_perf.render()) == page, \
        "docs/performance.md's tables are stale: run python benchmarks/readme_perf.py"


def test_check_fails_when_a_page_disagrees_with_the_results(tmp_path):
    readme, page = tmp_path / "README.md", tmp_path / "performance.md"
    shutil.copy(ROOT / "README.md", readme)
    shutil.copy(ROOT / "docs" / "performance.md", page)
    assert readme_perf.main(["--check", "--readme", str(readme), "--performance", str(page)]) == 0
    text = readme.read_text()
    start = text.index(readme_perf.BEGIN)
    figure = text.index("x |", start) - 4          # the first speedup inside the generated block
    readme.write_text(text[:figure] + "9.99" + text[figure + 4:])
    assert readme_perf.main(["--check", "--readme", str(readme), "--performance", str(page)]) == 1
    assert readme_perf.main(["--readme", str(readme), "--performance", str(page)]) == 0   # rewrites it
    assert readme.read_text() == text


def test_a_changed_result_changes_both_pages(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    path = results / "latency_cpu_reference.json"
    data = json.loads(path.read_text())
    row = next(r for r in data["rows"] if r["row"] == "fast/eager")
    row["speedup"] = 9.87
    row["median_s"] = 0.123
    path.write_text(json.dumps(data))
    assert "| 9.87x |" in readme_perf.summary(results) and "| 9.87x |" not in readme_perf.summary()
    assert "| fast/eager | 0.123 | 9.87x |" in readme_perf.render(results)


def test_a_row_off_the_paper_is_shown_as_such(tmp_path):
    row = {"model": "SD v1.5", "label": "20 steps", "resolution": [768, 768], "steps": 20, "ours_paper_T": 31.0,
           "paper_T": 30.42, "ratio": 31.0 / 30.42, "within_0.5%": False, "config_known": True, "note": "why"}
    (tmp_path / "paper_tables.json").write_text(json.dumps({"rows": [row], "sdxl_mix_cache_search": []}))
    text = readme_perf.render(tmp_path)
    assert "| 31.000 | 30.420 | 1.0191 | **no** | yes |" in text
    assert "within 0.5%: 0 of 1." in text and "- SD v1.5 20 steps: ratio 1.019. why" in text
    assert "No `latency_cpu_*.json` yet" in text and "No GPU results yet" in text
    summary = readme_perf.summary(tmp_path)
    assert "within 0.5% of the paper's for 0 of the 1 rows" in summary
    assert "No latency results yet" in summary and "No GPU results yet" in summary
    assert "TensorRT: no results file records an engine build or run." in summary


def test_a_run_with_fidelity_and_hooks_shows_them(tmp_path):
    """The flux run (latency_cpu.py --model flux): PSNR/SSIM columns, the hooks beside our presets in the README,
    a preset the family does not have as n/a, and a hook that failed named in both pages."""
    rows = [{"row": "diffusers", "median_s": 20.0, "speedup": 1.0, "flops_ideal_speedup": 1.0, "speedup_over_ideal": 1.0,
             "psnr_db": None, "ssim": 1.0},
            {"row": "balanced/eager", "median_s": 10.0, "speedup": 2.0, "flops_ideal_speedup": 2.5,
             "speedup_over_ideal": 0.8, "psnr_db": 21.25, "ssim": 0.5},
            {"row": "TaylorSeer", "median_s": 8.0, "speedup": 2.5, "flops_ideal_speedup": 3.0,
             "speedup_over_ideal": 0.833, "psnr_db": 30.5, "ssim": 0.9}]
    data = {"model": "FLUX.1-dev-architecture transformer reduced (random weights)", "family": "flux", "resolution": 512,
            "steps": 20, "scheduler": "FlowMatchEulerDiscreteScheduler", "guidance_scale": 3.5,
            "guidance": "embedded guidance 3.5, no CFG batch", "architecture": {"overrides": {}}, "rounds": 3,
            "command": "python benchmarks/latency_cpu.py --model flux --rounds 3",
            "machine": {"cpu": "AMD EPYC", "threads": 2, "torch": "2.13"}, "rows": rows,
            "skipped": {"fast/eager": "not available: not built yet", "FasterCache": "failed: IndexError: x"}}
    (tmp_path / "latency_cpu_flux.json").write_text(json.dumps(data))
    page = readme_perf.render(tmp_path)
    assert "embedded guidance 3.5, no CFG batch" in page and "CFG 3.5" not in page
    assert "| balanced/eager | 10.000 | 2.00x | 2.50x | 0.80 | 21.2 | 0.5000 |" in page
    assert "| diffusers | 20.000 | 1.00x | 1.00x | 1.00 | identical | 1.0000 |" in page
    assert "FasterCache: not run (failed: IndexError: x)" in page
    summary = readme_perf.summary(tmp_path)
    assert "| flux 512x512 (reduced width and depth), random weights |" in summary
    assert "| | | `optimize(pipe)` | 1.00x | - | - | 2.00x | n/a | |" in summary
    assert "| TaylorSeer | 2.50x | 3.00x | 30.5 | 0.9000 |" in summary
    assert "| balanced/eager | 2.00x | 2.50x | 21.2 | 0.5000 |" in summary
    assert "Failed at their defaults on this model: FasterCache" in summary
