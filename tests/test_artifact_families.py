"""Every preset of the U-Net families with their own conditioning (SDXL, LCM, SD2 v-prediction): compiled, run
on torch and onnxruntime, and checked against optimize(pipe) on the family's diffusers pipeline
(family_artifacts.py)."""
import pytest
from family_artifacts import check_family_artifact, family_cases


@pytest.mark.parametrize("family, preset", family_cases(["sdxl", "lcm_sd15", "lcm_sdxl", "sd2"]))
def test_every_family_and_preset_runs_on_both_backends(tmp_path, family, preset):
    check_family_artifact(tmp_path, family, preset)
