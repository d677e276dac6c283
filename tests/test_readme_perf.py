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
