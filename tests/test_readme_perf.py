"""The README's performance section is what benchmarks/readme_perf.py makes of benchmarks/results/."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_perf", ROOT / "benchmarks" / "readme_perf.py")
readme_perf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_perf)


def test_the_readme_section_is_generated_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert readme_perf.replace_section(readme, readme_perf.render()) == readme, \
        "README.md's performance section is stale: run python benchmarks/readme_perf.py"


def test_a_row_off_the_paper_is_shown_as_such(tmp_path):
    row = {"model": "SD v1.5", "label": "20 steps", "resolution": [768, 768], "steps": 20, "ours_paper_T": 31.0,
           "paper_T": 30.42, "ratio": 31.0 / 30.42, "within_0.5%": False, "config_known": True, "note": "why"}
    (tmp_path / "paper_tables.json").write_text(json.dumps({"rows": [row], "sdxl_mix_cache_search": []}))
    text = readme_perf.render(tmp_path)
    assert "| 31.000 | 30.420 | 1.0191 | **no** | yes |" in text
    assert "within 0.5%: 0 of 1." in text and "- SD v1.5 20 steps: ratio 1.019. why" in text
    assert "No `latency_cpu_*.json` yet" in text and "No GPU results yet" in text
