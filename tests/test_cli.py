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
from tiny_models import ldm_extras, original_state_dict, tiny_denoiser, write_checkpoint

from postdiff_compile.cli import main
from postdiff_compile.exporters.manifest import sha256_file
from postdiff_compile.models.key_maps import LDM_PREFIX


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
    assert manifest["formats"] == ["pt2"] and manifest["weights"] is None
    file = variant["files"]["pt2"]["file"]
    assert variant["files"]["pt2"]["sha256"] == sha256_file(out / file)
    assert variant["verification"]["rel_l2_error"] <= 1e-6
    assert [i["name"] for i in variant["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert variant["inputs"][0]["shape"] == [2, 4, 16, 12]
    assert "full" in stdout and str(out) in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "manifest.sha256", file])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    # The saved program loads and computes the same as the checkpoint's model.
    program = torch.export.load(str(out / file))
    from postdiff_compile.capture import example_inputs, TensorSpec
    specs = [TensorSpec(i["name"], tuple(i["shape"]), getattr(torch, i["dtype"])) for i in variant["inputs"]]
    args = example_inputs(specs, seed=3)
    model = tiny_denoiser("sd15")
    with torch.no_grad():
        expected = model(args[0], args[1], encoder_hidden_states=args[2]).sample
        (got,) = program.module()(*args)
        assert torch.allclose(got, expected, atol=1e-5)


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
    assert set(by_name) == {s["variant"] for s in manifest["plan"]}
    assert {v["batch"] for v in manifest["variants"]} == {1, 2}
    for v in manifest["variants"]:
        assert v["verification"]["rel_l2_error"] <= 1e-6, v["name"]
        assert v["files"]["pt2"]["sha256"] == sha256_file(out / v["files"]["pt2"]["file"])
    shallow = by_name["shallow+read_ca"]
    assert [i["name"] for i in shallow["inputs"]][3] == "deepcache"
    assert all(i["name"].startswith("cross_attn:") for i in shallow["inputs"][4:]) and len(shallow["inputs"]) > 4
    assert [o["name"] for o in by_name["full+write_dc"]["outputs"]] == ["noise_pred", "deepcache"]
    # A saved shallow program takes its cache inputs and runs.
    program = torch.export.load(str(out / by_name["shallow"]["files"]["pt2"]["file"]))
    from postdiff_compile.capture import TensorSpec, example_inputs
    specs = [TensorSpec(i["name"], tuple(i["shape"]), getattr(torch, i["dtype"])) for i in by_name["shallow"]["inputs"]]
    with torch.no_grad():
        (noise,) = program.module()(*example_inputs(specs))
    assert noise.shape == (2, 4, 8, 8)
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
        assert v["verification"]["rel_l2_error"] <= 1e-6 and (out / v["files"]["pt2"]["file"]).is_file()
        assert v["inputs"][0]["shape"] == [2, 4, *v["latent_size"]]
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
    from postdiff_compile.reference import reference_folder

    code, _, err = run_cli(capsys, "--out", tmp_path / "demo", "--steps", "3", "--preset", "fast")
    assert code == 0, err
    assert "reference model" in err
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["source"]["family"] == "scenes32"
    assert manifest["source"]["path"] == str(reference_folder())
    assert manifest["denoiser"]["dtype"] == "float32"        # shipped in float16, compiled in float32
    assert (manifest["resolution"]["height"], manifest["resolution"]["width"]) == (32, 32)
    assert manifest["transition"] is not None
