"""Every preset of PixArt-alpha, with and without resolution conditioning: compiled, run on torch and
onnxruntime, and checked against optimize(pipe) on the family's diffusers pipeline (family_artifacts.py)."""
import pytest
from family_artifacts import check_family_artifact, family_cases


@pytest.mark.parametrize("family, preset", family_cases(["pixart_alpha", "pixart_alpha_sized"]))
def test_every_family_and_preset_runs_on_both_backends(tmp_path, family, preset):
    check_family_artifact(tmp_path, family, preset)
