"""The C++ runner (runtimes/cpp) on artifacts of the flow-matching transformers: tiny FLUX.1-dev and SD3
AOTInductor artifacts, compared with the Python `aoti` runner on the same packages.

What these artifacts add to the C++ loop: the flow transition (sigma_t, sigma_next), the pooled projections
(required, with a negative one under CFG: SD3), FLUX-dev's guidance input and its txt_ids/img_ids made per latent
size (the low grid's own positions at low resolution), the families' default guidance scales, and SD3's
cross-attention cache whose text entries are kept at the transition. The binary is the one test_cpp_runner.py
builds (same fixture, same build folder: a second module only re-checks it). Slow tier, as every C++ test.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cpp_runner import cpp_build, refused, rewrite_manifest, run_cpp, runner_binary, write_embeddings  # noqa: F401
from tiny_models import runner_inputs, tiny_pipeline

import postdiff_compile
from postdiff_compile.compile import compile_artifact
from postdiff_compile.config import ConfigRequest
from postdiff_compile.exporters.manifest import MANIFEST
from postdiff_compile.verification import rel_l2

pytestmark = pytest.mark.slow

SIZE = 128   # a 16x16 latent; quality's low-resolution steps run at 12x12 (tests/test_artifact_flow.py)
STEPS = {"sd3": 6, "flux": 6}
# Two artifacts, every test of this file on them. FLUX-dev `quality`: both resolutions and the flow transition, the
# guidance input, txt_ids/img_ids made per latent size. SD3 `fast` with its CFG gate at step 2 (28 steps' 14 is past
# these 6): the CFG batch with pooled projections, the block cache, and the joint blocks' text entries of the
# cross-attention cache written on a low-resolution CFG step, kept across the switch and read without CFG.
# What the C++ loop does with caches is the same for every kind but the cross-attention cache's CFG halves, so
# FLUX's fast (block cache + attention broadcast: 460 s here, 224 s of CI) and the two `none` artifacts (one
# variant each, a subset of these) were dropped for CI's 45 minutes (8 Dec); each passed (C++ = Python aoti <= 1e-5)
# in every run until then, and FLUX fast still runs on torch (test_artifact_flow.py).
CASES = {"flux-quality": ("flux", "quality", {}), "sd3-fast-m2": ("sd3", "fast", {"cross_attn_cache_step": 2})}
ARTIFACT = {family: (preset, overrides) for family, preset, overrides in CASES.values()}


@pytest.fixture(scope="module")
def flow_artifact(tmp_path_factory):
    """artifact(family, preset) -> folder, compiled once per module with .pt2 programs and AOTInductor packages.
    Tests must copy a folder before changing it."""
    root = tmp_path_factory.mktemp("flow-artifacts")
    built: dict[str, Path] = {}

    def artifact(family: str, preset: str, **overrides) -> Path:
        name = "_".join([family, preset, *(f"{k}{v}" for k, v in sorted(overrides.items()))])
        if name not in built:
            request = ConfigRequest(preset, overrides=overrides)
            built[name] = compile_artifact(tiny_pipeline(family).transformer, request, root / name,
                                           resolution=(SIZE, SIZE), steps=STEPS[family], formats="pt2,aoti").out
        return built[name]

    return artifact


def caches_written(manifest: dict, kind: str) -> set[str]:
    return {o["name"] for v in manifest["variants"] for o in v["outputs"][1:] if o["name"].startswith(kind + ":")}


def embeddings_for(runner, path: Path) -> tuple[Path, tuple]:
    """The runner's inputs (tiny_models.runner_inputs) and the same tensors in a safetensors file for postdiff-run."""
    cond, uncond, added, negative_added = inputs = runner_inputs(runner)
    tensors = {"prompt_embeds": cond, **(added or {}),
               **{f"negative_{k}": v for k, v in (negative_added or {}).items()}}
    if uncond is not None:
        tensors["negative_prompt_embeds"] = uncond
    return write_embeddings(path, tensors), inputs


def cpp_latents(binary, artifact, embeddings, out, *extra) -> torch.Tensor:
    done = run_cpp(binary, artifact, embeddings, out, *extra)
    assert done.returncode == 0, done.stderr
    return load_file(str(out))["latents"]


@pytest.mark.parametrize("case", list(CASES))
def test_cpp_runner_equals_the_python_aoti_runner_on_flow_artifacts(runner_binary, flow_artifact, case, tmp_path):
    family, preset, overrides = CASES[case]
    folder = flow_artifact(family, preset, **overrides)
    python = postdiff_compile.load(folder, "aoti")
    manifest = python.manifest
    embeddings, (cond, uncond, added, negative_added) = embeddings_for(python, tmp_path / "embeddings.safetensors")
    assert (uncond is not None) == (family == "sd3")   # SD3 has CFG steps; FLUX-dev's guidance is an input
    expected = python(cond, uncond, added_cond=added, negative_added_cond=negative_added, seed=9, guidance_scale=4.5)
    # The Python aoti runner against the torch one on the .pt2 programs (which equals optimize(pipe) for every
    # preset: tests/test_artifact_flow.py), so the chain reaches diffusers.
    torch_runner = postdiff_compile.load(folder, "torch")
    programs = torch_runner(cond, uncond, added_cond=added, negative_added_cond=negative_added, seed=9,
                            guidance_scale=4.5)
    assert rel_l2(expected, programs) <= 1e-4
    got = cpp_latents(runner_binary, folder, embeddings, tmp_path / "latents.safetensors", "--seed", "9",
                      "--guidance-scale", "4.5")
    assert got.shape == expected.shape == (1, python.latent_channels, SIZE // 8, SIZE // 8)
    assert torch.isfinite(got).all()
    err = rel_l2(got, expected)
    transition = manifest["transition"]
    caches = sorted({name.partition(":")[0] for v in manifest["variants"] for name in
                     (o["name"] for o in v["outputs"][1:])})
    print(f"{case}: C++ vs Python aoti rel L2 {err:.2e}, {len(manifest['variants'])} variants, "
          f"transition {transition and (transition['sigma_t'], transition['sigma_next'])}, caches {caches}")
    # The bound of tests/test_cpp_runner.py (docs/embedding.md: float32 artifacts agree to about 1e-6).
    assert err <= 1e-5
    if preset != "none":   # every preset but none switches resolution here
        assert transition["prediction_type"] == "flow" and transition["latent_space"] == "flow"
    if overrides:   # SD3's text entries of the cross-attention cache cross the switch unresized
        step = manifest["plan"][transition["switch_step"]]
        assert "cross_attn" in step["reads"] and not step["cfg"]
        assert any(not name.endswith(".attn2") for name in caches_written(manifest, "cross_attn"))
    if family == "flux":   # FLUX-dev: the guidance input reaches the C++ loop
        other = cpp_latents(runner_binary, folder, embeddings, tmp_path / "other.safetensors", "--seed", "9",
                            "--guidance-scale", "1.0")
        assert rel_l2(other, got) > 1e-3


@pytest.mark.parametrize("family", list(STEPS))
def test_the_default_guidance_is_the_familys(runner_binary, flow_artifact, family, tmp_path):
    """Without --guidance-scale the C++ runner takes the family's pipeline default, as the Python runner does
    (FamilySpec.default_guidance: SD3 7.0, FLUX 3.5)."""
    preset, overrides = ARTIFACT[family]
    folder = flow_artifact(family, preset, **overrides)
    python = postdiff_compile.load(folder, "aoti")
    assert python.default_guidance_scale == {"sd3": 7.0, "flux": 3.5}[family]
    embeddings, (cond, uncond, added, negative_added) = embeddings_for(python, tmp_path / "embeddings.safetensors")
    expected = python(cond, uncond, added_cond=added, negative_added_cond=negative_added, seed=2)
    got = cpp_latents(runner_binary, folder, embeddings, tmp_path / "latents.safetensors", "--seed", "2")
    assert rel_l2(got, expected) <= 1e-5
    explicit = cpp_latents(runner_binary, folder, embeddings, tmp_path / "explicit.safetensors", "--seed", "2",
                           "--guidance-scale", str(python.default_guidance_scale))
    assert torch.equal(explicit, got)


# ---- what the C++ runner refuses in flow artifacts: one error line naming the field or the input ------------


@pytest.fixture
def flux_copy(flow_artifact, tmp_path):
    """A private copy of the FLUX-dev `quality` artifact (a flow transition, two latent sizes)."""
    target = tmp_path / "artifact"
    shutil.copytree(flow_artifact("flux", "quality"), target)
    return target


def test_malformed_flow_fields_are_refused(runner_binary, flux_copy, tmp_path):
    python = postdiff_compile.load(flux_copy, "torch")
    embeddings, _ = embeddings_for(python, tmp_path / "embeddings.safetensors")
    text = (flux_copy / MANIFEST).read_text()
    n = json.loads(text)["steps"]

    def edit_variant_input(m, name, shape):
        for spec in m["variants"][0]["inputs"]:
            if spec["name"] == name:
                spec["shape"] = shape

    for edit, message in (
            (lambda m: m["transition"].pop("sigma_t"), "field /transition/sigma_t"),
            (lambda m: m["transition"].update(sigma_next=m["transition"]["sigma_t"]),
             "sigma_next in [0, sigma_t)"),
            (lambda m: m["transition"].update(sigma_t=1.5), "sigma_t must be in (0, 1]"),
            (lambda m: m["transition"].update(latent_space="vp"), "latent_space vp with prediction_type flow"),
            (lambda m: m["transition"].update(prediction_type="epsilon"),
             "latent_space flow with prediction_type epsilon"),
            (lambda m: m["set_timesteps"].update(sigmas=m["set_timesteps"]["sigmas"][:-1]),
             f"/set_timesteps/sigmas: {n - 1} sigmas for {n} steps"),
            (lambda m: m["set_timesteps"].update(sigmas="x"), "field /set_timesteps/sigmas"),
            (lambda m: m.update(set_timesteps=[1]), "/set_timesteps is not an object"),
            (lambda m: edit_variant_input(m, "img_ids", [65, 3]), "img_ids is not ["),
            (lambda m: edit_variant_input(m, "txt_ids", [3]), "txt_ids is not ["),
            (lambda m: edit_variant_input(m, "guidance", [1, 1]), "guidance is not 1-D"),
            (lambda m: edit_variant_input(m, "pooled_projections", [1]), "pooled_projections is not 2-D")):
        manifest = json.loads(text)
        edit(manifest)
        rewrite_manifest(flux_copy, json.dumps(manifest))
        refused(runner_binary, flux_copy, embeddings, tmp_path, message, str(flux_copy / MANIFEST))


def test_the_pooled_projections_are_required(runner_binary, flow_artifact, tmp_path):
    """What only the text encoders know must be given: FLUX's pooled projections; SD3's negative ones under CFG.
    Guidance and the rotary positions are not: the runner makes them."""
    flux = flow_artifact("flux", "quality")
    python = postdiff_compile.load(flux, "torch")
    cond = runner_inputs(python)[0]
    width = python.input_shapes["pooled_projections"][1]
    only_text = write_embeddings(tmp_path / "text.safetensors", {"prompt_embeds": cond})
    refused(runner_binary, flux, only_text, tmp_path, f"needs pooled_projections of shape [1, {width}]",
            str(only_text))
    sd3 = flow_artifact("sd3", "fast", **ARTIFACT["sd3"][1])
    python = postdiff_compile.load(sd3, "torch")
    cond, uncond, added, _ = runner_inputs(python)
    positive = write_embeddings(tmp_path / "positive.safetensors",
                                {"prompt_embeds": cond, "negative_prompt_embeds": uncond, **added})
    refused(runner_binary, sd3, positive, tmp_path, "needs negative_pooled_projections")
