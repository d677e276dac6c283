"""Every preset of PixArt-alpha with resolution conditioning: compiled, run on torch and onnxruntime, and checked
against optimize(pipe) on the family's diffusers pipeline (family_artifacts.py). PixArt-alpha without it (the
same transformer less the size and aspect-ratio embeddings) ran here too until 8 Dec (fast: 94-141 s of the slow
tier, = at 1e-5 every run); its block cache and masks are the sized model's, and the C++ runner's PixArt case
(test_cpp_runner.py) is the plain one."""
import pytest
from family_artifacts import check_family_artifact, family_cases


@pytest.mark.parametrize("family, preset", family_cases(["pixart_alpha_sized"]))
def test_every_family_and_preset_runs_on_both_backends(tmp_path, family, preset):
    check_family_artifact(tmp_path, family, preset)
