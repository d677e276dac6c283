"""Every preset of SDXL and LCM-SDXL (added conditioning: pooled text embeddings and time ids): compiled, run on
torch and onnxruntime, and checked against optimize(pipe) on the family's diffusers pipeline
(family_artifacts.py). The costliest families of the matrix, in a file of their own so that the slow tier's
two workers share the matrix."""
import pytest
from family_artifacts import check_family_artifact, family_cases


@pytest.mark.parametrize("family, preset", family_cases(["sdxl", "lcm_sdxl"]))
def test_every_family_and_preset_runs_on_both_backends(tmp_path, family, preset):
    check_family_artifact(tmp_path, family, preset)
