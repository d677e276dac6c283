"""AOTInductor packages and the C++ runner (runtimes/cpp): built here with CMake against the torch wheel's
libtorch, run on artifacts of the tiny model, compared with the Python runtime, and fed bad input.

The Python reference is the torch backend (the .pt2 programs, whose runner is checked against diffusers and
optimize(pipe) in test_artifact.py); the aoti backend and the C++ runner both execute the .aoti.pt2 packages.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from tiny_models import runner_inputs, text_embeddings, tiny_pipeline

import postdiff_compile
from postdiff_compile.verification import rel_l2
from postdiff_compile.compile import compile_artifact
from postdiff_compile.config import ConfigRequest
from postdiff_compile.exporters.manifest import CHECKSUM, MANIFEST
from postdiff_compile.lab.reference_models import LAB_FAMILIES, shipped_folder

ROOT = Path(__file__).parent.parent
RESOLUTION = (128, 128)


# The C++ runner is the slow tier's: a CMake build against libtorch (3-6 minutes here) and AOTInductor compiles.
pytestmark = pytest.mark.slow

# A fixed folder (ignored by git): a second test run reuses the objects, CMake rebuilding what changed.
BUILD = ROOT / "build" / "cpp-tests"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:   # an untouched file keeps its time: no rebuild
        path.write_text(text)


@pytest.fixture(scope="module")
def cpp_build() -> dict[str, Path]:
    """docs/embedding.md's example project, as printed there, built with CMake against the torch wheel's libtorch.
    It adds runtimes/cpp as a subdirectory, so the one build compiles the library once and yields both the
    example (`embed`) and the runner (`postdiff-run`). Needs cmake, a C++17 compiler and nlohmann-json (.ci/run
    installs them); a missing tool fails here rather than skipping the C++ tests."""
    import re

    doc = (ROOT / "docs" / "embedding.md").read_text()
    source = re.search(r"```cpp\n(// embed.cpp.*?)```", doc, re.S).group(1)
    cmake = re.search(r"```cmake\n(.*?)```", doc, re.S).group(1)
    project = BUILD / "embed"
    project.mkdir(parents=True, exist_ok=True)
    _write_if_changed(project / "embed.cpp", source)
    _write_if_changed(project / "CMakeLists.txt", cmake.replace("/path/to/postdiff-compile", str(ROOT)))
    prefix = subprocess.run([sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = BUILD / "build"
    # Two workers (test_cpp_runner_flow.py shares this fixture) building one folder at once compiled everything twice
    # (CI, 7 Dec: 460 s and 191 s of setup): the second waits, then finds the build up to date.
    # Unoptimized (-O0): the runner's own work is small tensor arithmetic around the AOTInductor packages (compiled
    # by torch, not by this build), and parsing libtorch's headers is what costs: 37 s against 52 s for Release,
    # measured side by side here (2 cores, quiet), 8 Dec. Without -ffast-math both give the same IEEE arithmetic.
    flags = ["-DCMAKE_BUILD_TYPE=None", "-DCMAKE_CXX_FLAGS=-O0"]
    with FileLock(str(BUILD / "build.lock")):
        for command in (["cmake", "-S", str(project), "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={prefix}",
                         *flags],
                        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
            done = subprocess.run(command, capture_output=True, text=True)
            assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    binaries = {"runner": build / "postdiff" / "postdiff-run", "embed": build / "embed"}
    assert all(path.is_file() for path in binaries.values()), binaries
    return binaries


@pytest.fixture(scope="module")
def runner_binary(cpp_build) -> Path:
    return cpp_build["runner"]


def run_cpp(binary: Path, artifact: Path, embeddings: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(artifact), "--embeddings", str(embeddings), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600)


def write_embeddings(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# `none` and `fast`: fast's plan has every mechanism the other presets have (both resolutions and the transition,
# DeepCache full and shallow steps, the cross-attention cache written, resized and read, CFG dropped at m), so
# quality and balanced add AOTInductor compiles (7 here), not cases for the C++ loop.
CPP_PRESETS = ["none", "fast"]


@pytest.fixture(scope="module")
def artifacts(tiny_artifact):
    """The tiny SD1.5-layout U-Net (DDIM, 20 steps) with .pt2 programs and AOTInductor packages (conftest.py).
    `none` with ONNX as well: test_refit's AOTInductor refit asks for that artifact, and one compile serves both."""
    return {name: tiny_artifact(name, "pt2,onnx,aoti" if name == "none" else "pt2,aoti") for name in CPP_PRESETS}


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    cond, uncond = text_embeddings(1, 77, 768, seed=5)
    path = write_embeddings(tmp_path_factory.mktemp("emb") / "embeddings.safetensors",
                            {"prompt_embeds": cond, "negative_prompt_embeds": uncond})
    return path, cond, uncond


@pytest.mark.parametrize("preset", CPP_PRESETS)
def test_cpp_runner_equals_the_python_runtime(runner_binary, artifacts, embeddings, preset, tmp_path):
    path, cond, uncond = embeddings
    expected = postdiff_compile.load(artifacts[preset], "torch")(cond, uncond, seed=3, guidance_scale=6.0)
    by_aoti = postdiff_compile.load(artifacts[preset], "aoti")(cond, uncond, seed=3, guidance_scale=6.0)
    done = run_cpp(runner_binary, artifacts[preset], path, tmp_path / "latents.safetensors", "--seed", "3",
                   "--guidance-scale", "6.0")
    assert done.returncode == 0, done.stderr
    got = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    assert got.shape == expected.shape == (1, 4, 16, 16) and torch.isfinite(got).all()
    print(f"{preset}: C++ vs Python (torch) rel L2 {rel_l2(got, expected):.2e}, aoti backend "
          f"{rel_l2(by_aoti, expected):.2e}")
    # docs/embedding.md: float32 artifacts agree with the Python runner to about 1e-6 (measured 1.2e-6 to 1.6e-6).
    assert rel_l2(got, expected) <= 1e-5
    assert rel_l2(by_aoti, expected) <= 1e-5
    # Seed and guidance scale reach the C++ loop: each changes the result.
    for extra in (["--seed", "4", "--guidance-scale", "6.0"], ["--seed", "3", "--guidance-scale", "2.0"]):
        done = run_cpp(runner_binary, artifacts[preset], path, tmp_path / "other.safetensors", *extra)
        assert done.returncode == 0, done.stderr
        assert rel_l2(load_file(str(tmp_path / "other.safetensors"))["latents"], got) > 1e-2


def test_cpp_runner_runs_a_controlnet_artifact(runner_binary, tmp_path):
    """A ControlNet (test_controlnet.py's) with `none`: its graph, the scale and the guidance window. The C++ runner
    equals the Python runner, which equals optimize(pipe) (test_controlnet_artifact.py). Each graph is an
    AOTInductor compile: `quality` (the low-resolution steps' nearest resize of the control image) passed here with
    one ControlNet (4 compiles, 234 s beside training) and with two (6, 311 s), 7 Dec, and is not kept for CI's 45
    minutes: the C++ resize is this test with "quality"."""
    from test_controlnet import SIZE, _images, make_pipes

    pipe = make_pipes()[0]
    out = compile_artifact(pipe.unet, ConfigRequest("none"), tmp_path / "cn", resolution=(SIZE, SIZE), steps=8,
                           formats="pt2,aoti", controlnets=[pipe.controlnet]).out
    cond, uncond = text_embeddings(1, 77, 768, seed=5)
    image = _images(1)
    kw = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.1, control_guidance_end=0.8)
    expected = postdiff_compile.load(out, "torch")(cond, uncond, seed=3, guidance_scale=6.0, control_image=image, **kw)
    path = write_embeddings(tmp_path / "in.safetensors", {"prompt_embeds": cond, "negative_prompt_embeds": uncond,
                                                          "control_image": image})
    flags = ["--seed", "3", "--guidance-scale", "6.0", "--control-guidance-start", "0.1", "--control-guidance-end",
             "0.8"]
    done = run_cpp(runner_binary, out, path, tmp_path / "latents.safetensors", *flags, "--controlnet-scale", "0.7")
    assert done.returncode == 0, done.stderr
    got = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    assert got.shape == expected.shape and rel_l2(got, expected) <= 1e-5, rel_l2(got, expected)
    # the scale reaches the C++ loop; a missing control image and a scale per missing ControlNet are one error each
    done = run_cpp(runner_binary, out, path, tmp_path / "other.safetensors", *flags, "--controlnet-scale", "0")
    assert done.returncode == 0, done.stderr
    assert rel_l2(load_file(str(tmp_path / "other.safetensors"))["latents"], got) > 1e-3
    done = run_cpp(runner_binary, out, path, tmp_path / "x.safetensors", "--controlnet-scale", "0.7,0.4")
    assert done.returncode == 2 and "one per ControlNet (1), got 2" in done.stderr, done.stderr
    bare = write_embeddings(tmp_path / "bare.safetensors", {"prompt_embeds": cond, "negative_prompt_embeds": uncond})
    done = run_cpp(runner_binary, out, bare, tmp_path / "x.safetensors")
    assert done.returncode == 2 and "compiled with 1 ControlNet(s): it needs control_image of shape [1, 3, 96, 96]" \
        in done.stderr, done.stderr


# Families whose runs use what the SD1.5/DDIM artifacts above do not: Euler (input scaling, a sigma-space
# transition) with SDXL's added conditioning; LCM (noise drawn inside the scheduler's step, the guidance
# embedding, no CFG); PixArt (DPM-Solver++ history, attention masks, learned variance); the
# embedded reference model (DDIM with clip_sample: the table's clamp), from its shipped folder at 32x32. LCM's and
# the reference model's own mechanisms are all in `none` (one AOTInductor compile instead of fast's five and
# quality's two: about 100 s each on CI, 7 Dec); every preset's variants and transitions run in the cases above.
# PixArt at `none` (its 2-block model): its block cache is a cache the C++ loop passes on like DeepCache's, which
# the fast case above runs; `balanced` on the 6-block model was 103 s of CI (4 compiles), 8 Dec.
# SDXL on its two-level tiny model (tiny_models' sdxl_shallow): the three-level one's two AOTInductor compiles were
# 155 s of CI (8 Dec).
# The shipped reference models at `none`: model 1's DDIM clips x0 (clip_sample), model 2 (the default model) is
# v-prediction with zero terminal SNR and trailing timesteps, which no other case here runs.
FAMILY_CASES = {"sdxl_shallow": ("quality", 20), "lcm_sd15": ("none", 4), "pixart_alpha": ("none", 20),
                "scenes32": ("none", 20), "scenes64": ("none", 20)}


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_cpp_runner_equals_the_python_runtime_on_other_families(runner_binary, family, tmp_path):
    preset, steps = FAMILY_CASES[family]
    dtype = None
    if family in LAB_FAMILIES:
        # Compiled in float32: the C++ runner does the scheduler's arithmetic in float32 where diffusers does it
        # in the latents' dtype, so a float16 artifact differs by float16 rounding (2.2e-2 measured for `fast`,
        # amplified by clip_sample); float32 compares the logic, and AOTInductor compiles float32 faster on a CPU.
        model, resolution, dtype = shipped_folder(family), None, "float32"
    else:
        pipe = tiny_pipeline(family)
        model, resolution = (pipe.transformer if family.startswith("pixart") else pipe.unet), RESOLUTION
    out = compile_artifact(model, ConfigRequest(preset), tmp_path / "art", resolution=resolution, steps=steps,
                           dtype=dtype, formats="pt2,aoti").out
    python = postdiff_compile.load(out, "torch")
    cond, uncond, added, negative_added = runner_inputs(python)
    tensors = {"prompt_embeds": cond, **(added or {}), **{f"negative_{k}": v for k, v in (negative_added or {}).items()}}
    if uncond is not None:
        tensors["negative_prompt_embeds"] = uncond
    expected = python(cond, uncond, added_cond=added, negative_added_cond=negative_added, seed=9, guidance_scale=4.5)
    embeddings = write_embeddings(tmp_path / "embeddings.safetensors", tensors)
    done = run_cpp(runner_binary, out, embeddings, tmp_path / "latents.safetensors", "--seed", "9",
                   "--guidance-scale", "4.5")
    assert done.returncode == 0, done.stderr
    got = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    table = python.manifest["scheduler_table"]["steps"]
    # docs/embedding.md: about 1e-6 for float32 artifacts; 4e-5 for the reference model, whose DDIM clip_sample
    # amplifies rounding (where x0 sits at the clamp edge, the order of float operations decides a clip). The
    # bound is fixed.
    bound = 1e-4 if family == "scenes32" else 1e-5
    print(f"{family} {preset}: C++ vs Python rel L2 {rel_l2(got, expected):.2e} (bound {bound:g}), "
          f"{len(python.manifest['variants'])} variants, {python.manifest['scheduler']['_class_name']}")
    assert got.shape == expected.shape and rel_l2(got, expected) <= bound
    if family == "lcm_sd15":
        assert any(row["noise_draws"] for row in table)
    if family == "sdxl_shallow":
        assert python.manifest["source"]["family"] == "sdxl"
        assert python.manifest["transition"]["latent_space"] == "sigma"
        assert table[0]["input_scale"] < 1.0
    if family == "scenes32":
        assert all("clip" in row for row in table if not row["transition"])
    if family == "scenes64":
        assert python.manifest["scheduler"]["prediction_type"] == "v_prediction"
        assert python.manifest["scheduler"]["timestep_spacing"] == "trailing"


def test_the_minimal_program_of_the_docs_builds_and_runs(cpp_build, artifacts, embeddings, tmp_path):
    """docs/embedding.md's embed.cpp and CMakeLists.txt, as printed there (built by the cpp_build fixture), run."""
    done = subprocess.run([str(cpp_build["embed"]), str(artifacts["none"]), str(embeddings[0])],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    got = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    _, cond, uncond = embeddings
    expected = postdiff_compile.load(artifacts["none"], "torch")(cond, uncond, seed=42, guidance_scale=7.5)
    assert rel_l2(got, expected) <= 1e-5
    done = subprocess.run([str(cpp_build["embed"]), str(tmp_path / "nowhere"), str(embeddings[0])],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no such artifact folder" in done.stderr


# ---- bad input: one error line naming the problem and the file, exit status 2 --------------------------------


@pytest.fixture
def copy(artifacts, tmp_path):
    """A private copy of the one-variant `none` artifact."""
    target = tmp_path / "artifact"
    shutil.copytree(artifacts["none"], target)
    return target


def rewrite_manifest(folder: Path, text: str) -> None:
    """Replace manifest.json's bytes and its checksum, as a careless tool would."""
    import hashlib

    (folder / MANIFEST).write_text(text)
    (folder / CHECKSUM).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST}\n")


def refused(binary, artifact, embeddings, tmp_path, *messages):
    out = tmp_path / "latents.safetensors"
    done = run_cpp(binary, artifact, embeddings, out)
    assert done.returncode == 2, (done.returncode, done.stderr)
    error = [line for line in done.stderr.splitlines() if line.startswith("postdiff-run: error:")]
    assert len(error) == 1, done.stderr
    for message in messages:
        assert message in error[0], error[0]
    assert not out.exists() and not Path(str(out) + ".tmp").exists()
    return error[0]


def test_malformed_manifests_are_refused(runner_binary, copy, embeddings, tmp_path):
    text = (copy / MANIFEST).read_text()
    rewrite_manifest(copy, text[: len(text) // 2])
    refused(runner_binary, copy, embeddings[0], tmp_path, "malformed manifest: not JSON", str(copy / MANIFEST))
    manifest = json.loads(text)
    del manifest["plan"][3]["variant_id"]
    rewrite_manifest(copy, json.dumps(manifest))
    refused(runner_binary, copy, embeddings[0], tmp_path, "field /plan/3/variant_id", str(copy / MANIFEST))
    manifest = json.loads(text)
    manifest["scheduler_table"]["steps"][2]["update"] = "x"
    rewrite_manifest(copy, json.dumps(manifest))
    refused(runner_binary, copy, embeddings[0], tmp_path, "field /scheduler_table/steps/2/update")
    # Consistency the loop relies on is checked before anything runs, not found out mid-generation.
    for edit, message in (
            (lambda m: m["scheduler_table"]["steps"][3].update(transition=True), "scheduler table row 3"),
            (lambda m: m["scheduler_table"]["steps"][5].update(update=[[99, 1.0]]), "reads tensor 99 of"),
            (lambda m: m["plan"][4].update(index=7), "plan step 4 has index 7"),
            (lambda m: m["variants"][0].update(inputs=[]), "needs the latent, timestep and text inputs"),
            (lambda m: m.update(config=[1, 2]), "malformed manifest"),
            (lambda m: m["scheduler_table"].update(steps={"a": 1}), "malformed manifest")):
        manifest = json.loads(text)
        edit(manifest)
        rewrite_manifest(copy, json.dumps(manifest))
        refused(runner_binary, copy, embeddings[0], tmp_path, message, str(copy / MANIFEST))
    manifest = json.loads(text)
    manifest["format_version"] = 3
    rewrite_manifest(copy, json.dumps(manifest))
    refused(runner_binary, copy, embeddings[0], tmp_path, "format_version 3", "versions 1 and 2")


def test_an_edited_manifest_is_refused(runner_binary, copy, embeddings, tmp_path):
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text.replace('"steps": 20', '"steps": 19'))
    refused(runner_binary, copy, embeddings[0], tmp_path, "does not match manifest.sha256", str(copy / MANIFEST))


def test_links_and_deep_nesting_are_refused(runner_binary, copy, embeddings, tmp_path):
    """As the Python loader (test_hostile_input.py): no link is followed, the manifest's nesting is bounded before
    nlohmann's recursive parser sees it."""
    text = (copy / MANIFEST).read_text()
    manifest = json.loads(text)
    manifest["config"]["x"] = json.loads("[" * 100 + "]" * 100)
    rewrite_manifest(copy, json.dumps(manifest))
    refused(runner_binary, copy, embeddings[0], tmp_path, "nested 102 levels deep", str(copy / MANIFEST))
    rewrite_manifest(copy, text)
    package = next(copy.glob("*.aoti.pt2"))
    outside = tmp_path / "outside.aoti.pt2"
    shutil.move(package, outside)
    package.symlink_to(outside)
    refused(runner_binary, copy, embeddings[0], tmp_path, "symbolic link", str(package))


def test_a_missing_or_damaged_package_is_refused(runner_binary, copy, embeddings, tmp_path):
    package = next(copy.glob("*.aoti.pt2"))
    data = bytearray(package.read_bytes())
    data[-100] ^= 0xFF
    package.write_bytes(bytes(data))
    refused(runner_binary, copy, embeddings[0], tmp_path, "sha256 differs", str(package))
    package.unlink()
    refused(runner_binary, copy, embeddings[0], tmp_path, "the AOTInductor package is missing", str(package))


def test_wrong_or_missing_inputs_are_refused(runner_binary, copy, embeddings, tmp_path):
    _, cond, uncond = embeddings
    short = write_embeddings(tmp_path / "short.safetensors",
                             {"prompt_embeds": cond[:, :76], "negative_prompt_embeds": uncond[:, :76]})
    refused(runner_binary, copy, short, tmp_path, "prompt_embeds must have shape [1, 77, 768]",
            "got [1, 76, 768]", str(short))
    positive_only = write_embeddings(tmp_path / "positive.safetensors", {"prompt_embeds": cond})
    refused(runner_binary, copy, positive_only, tmp_path, "needs negative_prompt_embeds of shape [1, 77, 768]")
    refused(runner_binary, copy, tmp_path / "absent.safetensors", tmp_path, "cannot be read")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    refused(runner_binary, copy, tmp_path / "garbage.safetensors", tmp_path, "not a safetensors file")
    # A header whose offsets point past the end (or wrap around) must not hand back uninitialised memory.
    header = json.dumps({"prompt_embeds": {"dtype": "F32", "shape": [1, 77, 768],
                                           "data_offsets": [2**64 - 16 - 4 * 77 * 768, 2**64 - 16]}}).encode()
    (tmp_path / "offsets.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4 * 77 * 768)
    refused(runner_binary, copy, tmp_path / "offsets.safetensors", tmp_path, "data_offsets do not match")


def test_artifacts_the_runner_cannot_run_are_refused(runner_binary, copy, embeddings, tmp_path):
    manifest = json.loads((copy / MANIFEST).read_text())
    table = manifest["scheduler_table"]
    manifest["scheduler_table"] = {**table, "steps": None, "reason": "DDIMScheduler with this configuration is not "
                                                                     "linear"}
    rewrite_manifest(copy, json.dumps(manifest))
    refused(runner_binary, copy, embeddings[0], tmp_path, "cannot run this artifact's scheduler", "not linear")
    manifest["scheduler_table"] = table
    manifest["toolchain"]["torch"] = "1.13.1"
    rewrite_manifest(copy, json.dumps(manifest))
    refused(runner_binary, copy, embeddings[0], tmp_path, "compiled with torch 1.13.1")
    manifest["toolchain"]["torch"] = torch.__version__
    manifest["formats"] = ["pt2"]
    rewrite_manifest(copy, json.dumps(manifest))
    refused(runner_binary, copy, embeddings[0], tmp_path, "no AOTInductor packages", "--format aoti")
    refused(runner_binary, tmp_path / "nowhere", embeddings[0], tmp_path, "no such artifact folder")


def test_bad_arguments_exit_2(runner_binary, copy, embeddings, tmp_path):
    for args in ([str(copy)], [str(copy), "--embeddings", str(embeddings[0]), "--out", "x", "--seed", "abc"],
                 [str(copy), "--bogus"]):
        done = subprocess.run([str(runner_binary), *args], capture_output=True, text=True)
        assert done.returncode == 2 and "usage: postdiff-run" in done.stderr, done.stderr
