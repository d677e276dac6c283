"""The CLI end to end: a good run writes a verified artifact; each bad input gives one clear line and exit 2."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from artifact_checks import variant_errors
from tiny_models import ldm_extras, original_state_dict, tiny_denoiser, write_checkpoint

from postdiff_compile.cli import main
from postdiff_compile.exporters.manifest import sha256_file
from postdiff_compile.models.key_maps import LDM_PREFIX
from postdiff_compile.plan import quad_center_steps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"
    return write_checkpoint(tiny_denoiser("sd15"), path, "ldm", extra=ldm_extras())


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_compile_writes_a_verified_artifact(ckpt, tmp_path, capsys):
    out = tmp_path / "art"
    code, stdout, _ = run_cli(capsys, ckpt, "--out", out, "--resolution", "128x96", "--steps", "5",
                              "--cache-branch", "2")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["family"] == "sd15" and manifest["source"]["layout"] == "ldm"
    assert manifest["source"]["files"][0]["sha256"] == sha256_file(ckpt)
    assert manifest["config"]["cache_branch"] == 2  # the flag overrode the preset
    assert manifest["resolution"] == {"height": 128, "width": 96, "latent_height": 16, "latent_width": 12}
    assert len(manifest["plan"]) == 5 and all(s["variant"] == "full" and s["cfg"] for s in manifest["plan"])
    (variant,) = manifest["variants"]
    assert manifest["formats"] == ["pt2"] and manifest["weights"]["file"] == "weights.safetensors"   # every format's
    file = variant["files"]["pt2"]["file"]
    assert variant["files"]["pt2"]["sha256"] == sha256_file(out / file)
    assert [i["name"] for i in variant["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert variant["inputs"][0]["shape"] == [2, 4, 16, 12]
    assert "full" in stdout and str(out) in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "manifest.sha256", file, "weights.safetensors"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    # The saved program computes what the checkpoint's model does (run outside the compiler).
    assert variant_errors(out, tiny_denoiser("sd15")) == {variant["id"]: pytest.approx(0.0, abs=1e-6)}


@pytest.mark.slow   # 30 s; the default tier checks fast's variant kinds and programs in test_artifact.py
def test_compile_fast_preset_writes_every_variant(ckpt, tmp_path, capsys):
    out = tmp_path / "fast"
    code, stdout, _ = run_cli(capsys, ckpt, "--out", out, "--resolution", "64x64", "--steps", "6", "--preset", "fast",
                              "--cross-attn-cache-step", "3", "--low-res-fraction", "0")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["variant"] for s in manifest["plan"]] == [
        "full+write_dc", "shallow", "full+write_ca", "full+write_dc+read_ca", "shallow+read_ca", "full+read_ca"]
    assert [s["cfg"] for s in manifest["plan"]] == [True] * 3 + [False] * 3
    by_name = {v["name"]: v for v in manifest["variants"]}
    # One variant per computation and batch: the CFG full steps run one writing both caches, the batch-1 full steps
    # one writing the deep feature (variant_build.served_keys); the plan keeps each step's own name.
    assert set(by_name) == {"full+write_dc+write_ca", "shallow", "full+write_dc+read_ca", "shallow+read_ca"}
    assert {v["batch"] for v in manifest["variants"]} == {1, 2}
    for v in manifest["variants"]:
        assert v["files"]["pt2"]["sha256"] == sha256_file(out / v["files"]["pt2"]["file"])
    shallow = by_name["shallow+read_ca"]
    assert [i["name"] for i in shallow["inputs"]][3] == "deepcache"
    assert all(i["name"].startswith("cross_attn:") for i in shallow["inputs"][4:]) and len(shallow["inputs"]) > 4
    outputs = [o["name"] for o in by_name["full+write_dc+write_ca"]["outputs"]]
    assert outputs[:2] == ["noise_pred", "deepcache"] and len(outputs) > 2
    assert all(name.startswith("cross_attn:") for name in outputs[2:])
    # Every saved program, the shallow and cache-reading ones given their caches, computes what the checkpoint's
    # model does, checked outside the compiler.
    errors = variant_errors(out, tiny_denoiser("sd15"))
    assert set(errors) == {v["id"] for v in manifest["variants"]} and max(errors.values()) <= 1e-5, errors
    assert "shallow+read_ca" in stdout


def test_compile_mixed_resolution_writes_both_resolutions(ckpt, tmp_path, capsys):
    out = tmp_path / "mix"
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--resolution", "128x192", "--steps", "4",
                           "--low-res-scale", "0.5", "--low-res-fraction", "0.5")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["resolution"] for s in manifest["plan"]] == ["low", "low", "full", "full"]
    sizes = sorted(tuple(v["latent_size"]) for v in manifest["variants"])
    assert sizes == [(8, 12), (16, 24)]
    for v in manifest["variants"]:
        assert v["inputs"][0]["shape"] == [2, 4, *v["latent_size"]]
    errors = variant_errors(out, tiny_denoiser("sd15"))
    assert len(errors) == 2 and max(errors.values()) <= 1e-5, errors
    transition = manifest["transition"]
    assert transition["switch_step"] == 2 and transition["low_latent_size"] == [8, 12]
    assert transition["full_latent_size"] == [16, 24] and transition["renoise"] == "fresh"
    assert transition["prediction_type"] == "epsilon" and transition["upsample"]["align_corners"] is False
    # The numbers of the artifact's own scheduler (DDIM, 4 steps): the switch re-noises to a less noisy level.
    assert transition["timestep_t"] > transition["timestep_next"] and transition["latent_space"] == "vp"
    assert 0 < transition["alpha_bar_t"] < transition["alpha_bar_next"] < 1


def test_mixed_resolution_too_small_is_one_error(ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, ckpt, "--out", tmp_path / "small", "--resolution", "64x64", "--preset", "quality")
    assert_one_error(code, err, "low_res_scale 0.5", "8x8")
    assert not (tmp_path / "small").exists()


def test_config_file_and_flags(ckpt, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"cache_branch": 4}))
    code, _, _ = run_cli(capsys, ckpt, "--out", tmp_path / "a", "--config", cfg, "--steps", "2",
                         "--resolution", "64x64")
    assert code == 0
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["cache_branch"] == 4
    cfg.write_text(json.dumps({"cache_brunch": 4}))
    code, _, err = run_cli(capsys, ckpt, "--out", tmp_path / "b", "--config", cfg)
    assert_one_error(code, err, "cache_brunch", str(cfg))
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_force_and_failure_keeps_it(ckpt, tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--resolution", "64x64")
    assert_one_error(code, err, "already exists", "--force", str(out))
    # A failing forced run (bad resolution) leaves the old folder untouched.
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--resolution", "100x64", "--force")
    assert_one_error(code, err, "cannot take height 100")
    assert (out / "keep.txt").read_text() == "precious"
    code, _, _ = run_cli(capsys, ckpt, "--out", out, "--resolution", "64x64", "--steps", "1", "--force")
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def _write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_inputs(tmp: Path, ckpt: Path):
    """(name, source, extra args, words the error must contain); the file's path is always required."""
    empty = tmp / "empty_folder"
    empty.mkdir()
    good = ckpt.read_bytes()
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    unknown = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4)}
    sd = original_state_dict(tiny_denoiser("sd15"), "ldm", LDM_PREFIX)
    sd[LDM_PREFIX + "input_blocks.1.0.in_layers.2.weight"] = sd[LDM_PREFIX + "input_blocks.1.0.in_layers.2.weight"].to(
        torch.int32)
    save_file(unknown, str(tmp / "vae_only.safetensors"))
    save_file(sd, str(tmp / "int32.safetensors"))
    return [
        ("missing file", tmp / "nope.safetensors", [], ["not found"]),
        ("folder without a model", empty, [], ["no model found"]),
        ("not safetensors", _write_raw(tmp / "notes.safetensors", b"these are my notes, not weights\n" * 4), [],
         ["not a valid safetensors file"]),
        ("pickle checkpoint", _write_raw(tmp / "model.ckpt", b"PK\x03\x04" + b"\x00" * 64), [], ["pickle"]),
        ("truncated", _write_raw(tmp / "truncated.safetensors", good[: len(good) // 2]), [], ["truncated"]),
        ("header longer than file", _write_raw(tmp / "long.safetensors", struct.pack("<Q", 10_000) + header), [],
         ["header length 10000 is larger than the file"]),
        ("malformed header", _write_raw(tmp / "json.safetensors", struct.pack("<Q", 12) + b'{"a": [1, 2' + b" " * 8),
         [], ["malformed header JSON"]),
        ("unknown architecture", tmp / "vae_only.safetensors", [], ["unknown architecture", "Closest family",
                                                                     "missing:"]),
        ("unsupported dtype", tmp / "int32.safetensors", [], ["unsupported dtype I32"]),
        ("resolution", ckpt, ["--resolution", "500x512"], ["sd15 cannot take height 500", "multiples of 8"]),
    ]


def test_bad_inputs(ckpt, tmp_path, capsys):
    cases = bad_inputs(tmp_path, ckpt)
    assert len(cases) == 10
    for name, source, extra, needles in cases:
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        code, _, err = run_cli(capsys, source, "--out", out, *extra)
        assert_one_error(code, err, *needles, str(source))
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unparseable_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--resolution", "big"])
    assert exc.value.code == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_console_script_and_debug(ckpt, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "postdiff_compile.cli", str(tmp_path / "nope.safetensors"), "--out",
           str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "PostDiffError" in proc.stderr


def test_embedded_default_is_the_reference_model(tmp_path, capsys):
    from postdiff_compile.lab.reference2 import shipped_folder

    # none: one variant (the embedded default with quality and its transition: test_cli_artifact.py, reference_artifact)
    code, _, err = run_cli(capsys, "--out", tmp_path / "demo", "--steps", "3", "--preset", "none")
    assert code == 0, err
    assert "reference model" in err
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["source"]["family"] == "scenes64"
    assert manifest["source"]["path"] == str(shipped_folder())
    assert manifest["denoiser"]["dtype"] == "float32"        # shipped in float16, compiled in float32
    assert (manifest["resolution"]["height"], manifest["resolution"]["width"]) == (64, 64)


def test_dtype_and_prediction_type_flags(ckpt, tmp_path, capsys):
    """--dtype and --prediction-type reach the artifact: a bfloat16 graph verified on its float32 twin, and the
    scheduler told what the flag says rather than what detection found (epsilon for this SD1.5 file)."""
    out = tmp_path / "bf16"
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--resolution", "64x64", "--steps", "2", "--dtype",
                           "bfloat16", "--prediction-type", "v_prediction")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    (variant,) = manifest["variants"]
    assert manifest["denoiser"]["dtype"] == "bfloat16" and variant["inputs"][0]["dtype"] == "bfloat16"
    assert "float32 twin of the bfloat16 weights" in variant["verification"]["reference"]
    assert manifest["source"]["prediction_type"] == manifest["scheduler"]["prediction_type"] == "v_prediction"
    program = torch.export.load(str(out / variant["files"]["pt2"]["file"]))
    weights = [t for t in program.state_dict.values() if t.is_floating_point()]
    assert weights and all(t.dtype == torch.bfloat16 for t in weights)


def test_every_config_flag_reaches_the_config(ckpt, capsys):
    """The flags no other test sets, through `explain` (the same parser as compilation): each lands in the config,
    and the quad_center schedule and --no-cfg change the plan as documented."""
    code, out, err = run_cli(capsys, "explain", ckpt, "--resolution", "128x128", "--steps", "10", "--json",
                             "--preset", "quality", "--renoise", "predicted", "--clamp-x0", "1.5", "--cache-interval",
                             "3", "--cache-schedule", "quad_center", "--cache-center", "4", "--cache-pow", "1.2",
                             "--no-cfg")
    assert code == 0, err
    data = json.loads(out)
    config = data["config"]
    assert (config["renoise"], config["clamp_x0"], config["cache_interval"]) == ("predicted", 1.5, 3)
    assert (config["cache_schedule"], config["cache_center"], config["cache_pow"]) == ("quad_center", 4, 1.2)
    assert not any(step["cfg"] for step in data["plan"])
    full = {step["index"] for step in data["plan"] if step["variant"].startswith("full")}
    # 10 steps at interval 3: ceil(10 / 3) = 4 full steps dense around step 4 (the schedule test_plan.py checks
    # against DeepCache's code), and the switch step 5; not the uniform 0, 3, 5, 8.
    assert full == set(quad_center_steps(10, 4, 4, 1.2)) | {5} != {0, 3, 5, 8}


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "--steps must be at least 1, got 0"),
    ("--cache-schedule", "bogus", "cache_schedule must be one of uniform, quad_center, got 'bogus'"),
    ("--renoise", "nope", "renoise must be one of fresh, predicted, got 'nope'"),
    ("--clamp-x0", "-1", "clamp_x0 must be a finite number >= 0"),
    ("--cache-pow", "0", "cache_pow must be in (1, 10], got 0.0"),
    # issue 20 item 2: these hung (inf, 1e17) or passed validation (nan) in plan.quad_center_steps
    ("--cache-pow", "inf", "cache_pow must be in (1, 10], got inf"),
    ("--cache-pow", "1e17", "cache_pow must be in (1, 10], got 1e+17"),
    ("--cache-pow", "nan", "cache_pow must be in (1, 10], got nan"),
    # item 10: above the scheduler's 1000 training timesteps the artifact could never run
    ("--steps", "1001", "--steps must be in [1, 1000] (the sd15 scheduler has 1000 training timesteps), got 1001"),
    ("--low-res-fraction", "2", "low_res_fraction must be in [0, 1), got 2.0"),
    ("--preset", "turbo", "turbo"),
])
def test_bad_config_flags_are_one_error(ckpt, tmp_path, capsys, flag, value, message):
    for command in ([], ["explain"]):
        args = [*command, ckpt, flag, value, "--resolution", "64x64"]
        if not command:
            args += ["--out", tmp_path / "never"]
        code, _, err = run_cli(capsys, *args)
        assert_one_error(code, err, message)
    assert not (tmp_path / "never").exists()
