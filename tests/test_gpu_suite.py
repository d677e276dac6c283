"""The GPU script's CPU rehearsal: benchmarks/gpu_suite.py --tiny runs the denoise and prediction sections on the
tiny U-Net, so that the script a lent GPU runs in one call cannot rot between GPUs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_suite_rehearses_on_a_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--budget-s", "400"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    denoise = result["denoise"]
    assert "failed" not in denoise, denoise.get("traceback")
    rows = {(r["config"], r["backend"]) for r in denoise["rows"]}
    assert {("diffusers", "eager"), ("none", "eager"), ("fast", "eager"), ("DeepCacheSDHelper", "eager")} <= rows
    assert all(r["finite"] for r in denoise["rows"])
    assert denoise["skipped"] == {} or set(denoise["skipped"]) <= {"cuda-graphs", "reduce-overhead"}
    prediction = result["prediction"]
    assert {r["config"] for r in prediction["rows"]} == {"none", "quality", "balanced", "fast"}
    assert all(r["predicted_s"] > 0 and r["measured_s"] > 0 for r in prediction["rows"])
    assert set(result["targets"]) >= {"fast_over_balanced", "balanced_vs_diffusers_eager"}
    assert not any(t["met"] for t in result["targets"].values())   # no cuda-graphs rows on a CPU: nothing is met
