"""Every preset of the SD1.5/SD2 U-Net families with their own conditioning (LCM's guidance embedding, SD2's
v-prediction): compiled, run on torch and onnxruntime, and checked against optimize(pipe) on the family's
diffusers pipeline (family_artifacts.py). SDXL: test_artifact_sdxl.py; PixArt-alpha: test_artifact_pixart.py."""
import pytest
from family_artifacts import check_family_artifact, family_cases


@pytest.mark.parametrize("family, preset", family_cases(["lcm_sd15", "sd2"]))
def test_every_family_and_preset_runs_on_both_backends(tmp_path, family, preset):
    check_family_artifact(tmp_path, family, preset)
