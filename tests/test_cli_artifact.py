"""`postdiff-compile --format`, `run DIR` and `inspect DIR` end to end."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_one_error, run_cli
from tiny_models import text_embeddings, tiny_denoiser, write_checkpoint

import postdiff_compile
from postdiff_compile.verification import rel_l2
from postdiff_compile.cli import main
from postdiff_compile.exporters.tensorrt_export import unavailable_reason

TRT_MISSING = unavailable_reason()


@pytest.fixture(scope="module")
def reference_artifact(tmp_path_factory):
    """The embedded default (the reference model) compiled with `quality` (two variants and the transition) into
    .pt2 programs; `run --backend onnxruntime` is the slow tier's (its own compile with ONNX: exporting the two
    variants was 20 of this fixture's 36 s here)."""
    out = tmp_path_factory.mktemp("ref") / "quality"
    assert main(["--preset", "quality", "--format", "pt2", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_run_on_onnxruntime_writes_what_torch_writes(tmp_path, capsys):
    art = tmp_path / "quality"
    assert main(["--preset", "quality", "--format", "pt2,onnx", "--out", str(art)]) == 0
    check_run(art, tmp_path, capsys, ("torch", "onnxruntime"))


def test_run_writes_latents_and_an_image(reference_artifact, tmp_path, capsys):
    check_run(reference_artifact, tmp_path, capsys, ("torch",))


def check_run(reference_artifact, tmp_path, capsys, backends):
    results = {}
    for backend in backends:
        out = tmp_path / backend
        code, stdout, err = run_cli(capsys, "run", reference_artifact, "--backend", backend, "--seed", "7", "--out", out)
        assert code == 0, err
        assert "latents.safetensors, image.png" in stdout and "20 steps" in stdout
        results[backend] = load_file(str(out / "latents.safetensors"))["latents"]
        from PIL import Image

        assert Image.open(out / "image.png").size == (64, 64)
    assert results["torch"].shape == (1, 4, 32, 32)
    if "onnxruntime" in results:
        assert rel_l2(results["onnxruntime"], results["torch"]) <= 1e-4
    # Another prompt gives another image.
    code, _, err = run_cli(capsys, "run", reference_artifact, "--seed", "7", "--out", tmp_path / "p",
                           "--prompt", "large green triangle bottom right, on beige")
    assert code == 0, err
    assert rel_l2(load_file(str(tmp_path / "p" / "latents.safetensors"))["latents"], results["torch"]) > 0.05


def test_inspect_prints_plan_flops_and_verification(reference_artifact, capsys):
    code, stdout, _ = run_cli(capsys, "inspect", reference_artifact)
    assert code == 0
    manifest = json.loads((reference_artifact / "manifest.json").read_text())
    for v in manifest["variants"]:
        assert v["id"] in stdout
    assert "transition after step 9" in stdout and "total" in stdout
    step_lines = [line for line in stdout.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(step_lines) == 20
    total = sum(next(v for v in manifest["variants"] if v["id"] == s["variant_id"])["flops"]["paper"]
                for s in manifest["plan"])
    assert f"{total / 1e9:.3f}" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", reference_artifact, "--json")
    assert code == 0 and json.loads(stdout)["format_version"] == 2


def test_run_on_a_checkpoint_artifact_needs_embeddings(tmp_path, capsys):
    ckpt = write_checkpoint(tiny_denoiser("sd15"), tmp_path / "tiny.safetensors", "ldm")
    art = tmp_path / "art"
    code, _, err = run_cli(capsys, ckpt, "--out", art, "--resolution", "64x64", "--steps", "4")
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", art, "--out", tmp_path / "r")
    assert_one_error(code, err, "--embeddings", "[1, 77, 768]")
    cond, uncond = text_embeddings(1, 77, 768)
    save_file({"prompt_embeds": cond, "negative_prompt_embeds": uncond}, str(tmp_path / "e.safetensors"))
    code, stdout, err = run_cli(capsys, "run", art, "--embeddings", tmp_path / "e.safetensors", "--out", tmp_path / "r")
    assert code == 0, err
    assert "latents only" in stdout and sorted(p.name for p in (tmp_path / "r").iterdir()) == ["latents.safetensors"]
    expected = postdiff_compile.load(art)(cond, uncond, seed=0, guidance_scale=7.5)
    assert torch.equal(load_file(str(tmp_path / "r" / "latents.safetensors"))["latents"], expected)
    save_file({"prompt_embeds": cond}, str(tmp_path / "half.safetensors"))
    code, _, err = run_cli(capsys, "run", art, "--embeddings", tmp_path / "half.safetensors", "--out", tmp_path / "r2")
    assert_one_error(code, err, "negative_prompt_embeds", "half.safetensors")


def test_a_prompt_outside_the_reference_vocabulary_is_one_error(reference_artifact, tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", reference_artifact, "--prompt", "a purple cat on plain white",
                           "--out", tmp_path / "r")
    assert_one_error(code, err, "purple", "cat", "vocabulary")
    assert not (tmp_path / "r").exists()


def test_run_into_an_existing_folder_needs_force(reference_artifact, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "run", reference_artifact, "--out", out)
    assert_one_error(code, err, "already exists", "--force", str(out))
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = run_cli(capsys, "run", reference_artifact, "--out", out, "--force", "--guidance-scale", "2.0")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["image.png", "latents.safetensors"]


def test_bad_artifact_folders_are_one_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", tmp_path / "nowhere")
    assert_one_error(code, err, "nowhere")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "inspect", tmp_path / "empty")
    assert_one_error(code, err, "manifest.json", "missing")


def test_unknown_format_is_one_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--format", "pt2,tflite", "--out", tmp_path / "x")
    assert_one_error(code, err, "unknown format tflite")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present: the build test below runs instead")
def test_tensorrt_without_tensorrt_is_one_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--format", "tensorrt", "--out", tmp_path / "x")
    assert_one_error(code, err, "tensorrt", "--format pt2,onnx", TRT_MISSING)
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT engines cannot be built here: {TRT_MISSING}")
def test_tensorrt_engines_build_verify_and_run(tmp_path):
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest

    model = tiny_denoiser("sd15").cuda()
    out = compile_artifact(model, ConfigRequest("fast"), tmp_path / "trt", resolution=(128, 128), steps=20,
                           formats="pt2,tensorrt").out
    assert json.loads((out / "manifest.json").read_text())["formats"] == ["pt2", "onnx", "tensorrt"]
    manifest = json.loads((out / "manifest.json").read_text())
    for v in manifest["variants"]:
        engine = v["files"]["tensorrt"]
        assert engine["file"].endswith(f".trt{engine['tensorrt']}.sm{engine['compute_capability'].replace('.', '')}.engine")
        assert engine["verification"]["rel_l2_error"] <= 1e-3
    cond, uncond = text_embeddings(1, 77, 768)
    by_trt = postdiff_compile.load(out, "tensorrt")(cond, uncond, seed=0).cpu()
    by_torch = postdiff_compile.load(out, "torch", device="cuda")(cond, uncond, seed=0).cpu()   # same CUDA noise
    assert rel_l2(by_trt, by_torch) <= 1e-3


def test_engine_names_and_timing_caches_are_keyed_by_everything_an_engine_depends_on(tmp_path, monkeypatch):
    from postdiff_compile.exporters.tensorrt_export import engine_file_name, timing_cache_path

    monkeypatch.setenv("POSTDIFF_CACHE_DIR", str(tmp_path))
    h100 = {"tensorrt": "10.9.0", "compute_capability": "9.0", "gpu": "NVIDIA H100 80GB HBM3"}
    name = engine_file_name("shallow+read_ca@b1_96x96", "float16", h100)
    assert name == "shallow-read_ca@b1_96x96.float16.trt10.9.0.sm90.engine"
    assert engine_file_name("shallow+read_ca@b1_48x48", "float16", h100) != name          # resolution
    assert engine_file_name("shallow+read_ca@b1_96x96", "bfloat16", h100) != name         # precision
    assert engine_file_name("shallow+read_ca@b1_96x96", "float16", {**h100, "tensorrt": "10.8.0"}) != name
    caches = {timing_cache_path(h100), timing_cache_path({**h100, "gpu": "NVIDIA L4", "compute_capability": "8.9"}),
              timing_cache_path({**h100, "tensorrt": "10.8.0"})}
    assert len(caches) == 3 and all(p.parent == tmp_path / "tensorrt" for p in caches)


# Slow tier (24 s of the default tier's budget, 7 Dec): an LCM artifact against LatentConsistencyModelPipeline runs in
# the default tier (test_artifact_families.py, lcm_sd15-none), LCM checkpoint detection in test_detect_*.
@pytest.mark.slow
def test_lcm_checkpoint_compiles_with_its_own_defaults_and_runs_without_negative_embeddings(tmp_path, capsys):
    """An original-layout LCM single file: detected as lcm_sd15, compiled for its 4 LCMScheduler steps without
    CFG, and run from a prompt embedding alone; the guidance scale reaches the graph as the w-embedding."""
    path = write_checkpoint(tiny_denoiser("lcm_sd15"), tmp_path / "lcm.safetensors", "ldm")
    out = tmp_path / "lcm-fast"
    code, _, err = run_cli(capsys, path, "--preset", "fast", "--resolution", "128x128", "--format", "pt2", "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["family"] == "lcm_sd15" and manifest["steps"] == 4
    assert manifest["scheduler"]["_class_name"] == "LCMScheduler"
    assert not any(step["cfg"] for step in manifest["plan"])
    assert any(step["variant"].endswith("read_ca") for step in manifest["plan"])
    assert "timestep_cond" in [i["name"] for i in manifest["variants"][0]["inputs"]]
    cond, _ = text_embeddings(1, 77, 768, seed=4)
    save_file({"prompt_embeds": cond}, str(tmp_path / "embeds.safetensors"))
    latents = {}
    for scale in ("8.5", "2.0"):
        code, stdout, err = run_cli(capsys, "run", out, "--embeddings", tmp_path / "embeds.safetensors",
                                    "--guidance-scale", scale, "--out", tmp_path / scale)
        assert code == 0, err
        latents[scale] = load_file(str(tmp_path / scale / "latents.safetensors"))["latents"]
    assert torch.isfinite(latents["8.5"]).all()
    assert rel_l2(latents["2.0"], latents["8.5"]) > 1e-3
