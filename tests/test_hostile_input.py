"""Hostile input (issue 20): each numbered finding of the probe, as a test that failed before the fix.

Artifacts here are the shipped reference model (scenes64) compiled for 4 steps (pt2), once per module; every
test copies it before tampering. "Tampered" means the attacker rewrote every hash to match: the file's sha256 and
size in the manifest, and manifest.sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from postdiff_compile.cli import main
from postdiff_compile.errors import PostDiffError
from postdiff_compile.exporters.manifest import CHECKSUM, MANIFEST, read_manifest
from postdiff_compile.runtime.artifact import load

ROOT = Path(__file__).resolve().parent.parent


# ---- shared artifact and helpers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_artifact(tmp_path_factory) -> Path:
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest
    from postdiff_compile.cli.default_model import embedded_default_path

    out = tmp_path_factory.mktemp("hostile") / "ref"
    compile_artifact(str(embedded_default_path()), ConfigRequest("none"), out, steps=4, dtype="float32")
    return out


@pytest.fixture
def art(reference_artifact, tmp_path) -> Path:
    copy = tmp_path / "art"
    shutil.copytree(reference_artifact, copy)
    return copy


def rewrite_manifest(folder: Path, edit=None, raw: bytes | None = None) -> None:
    """Apply `edit(manifest)` (or write `raw` bytes) and make manifest.sha256 match, as an attacker would."""
    if raw is None:
        manifest = json.loads((folder / MANIFEST).read_text())
        edit(manifest)
        raw = json.dumps(manifest, indent=2).encode()
    (folder / MANIFEST).write_bytes(raw)
    (folder / CHECKSUM).write_text(f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST}\n")


def rehash(folder: Path, name: str) -> None:
    """The manifest entry of file `name` made to match its current bytes."""
    data = (folder / name).read_bytes()

    def edit(m):
        for v in m["variants"]:
            for entry in v["files"].values():
                if entry["file"] == name:
                    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        if m["weights"] and m["weights"]["file"] == name:
            m["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    rewrite_manifest(folder, edit)


def pt2_file(folder: Path) -> Path:
    return next(folder.glob("*.pt2"))


def cli(*args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one stderr line, the project's `error:` line, containing every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def refused_everywhere(folder: Path, capsys, *needles: str, public_key=None) -> None:
    """load(), `run` and `inspect` all refuse the artifact with one error naming `needles`."""
    with pytest.raises(PostDiffError) as info:
        load(folder, public_key=public_key)
    for needle in needles:
        assert needle in str(info.value)
    key = ["--public-key", public_key] if public_key else []
    code, out, err = cli("run", folder, "--out", folder.parent / "run-out", *key, capsys=capsys)
    assert_one_line(code, err, *needles)
    assert not (folder.parent / "run-out").exists()
    code, out, err = cli("inspect", folder, *key, capsys=capsys)
    assert_one_line(code, err, *needles)
    assert out == ""


def test_the_untampered_artifact_loads_runs_and_inspects(art, capsys):
    """The baseline every refusal below is measured against: the same artifact, untouched, is accepted."""
    runner = load(art)
    assert runner(**_reference_embeds(runner), seed=0).shape == (1, 4, 32, 32)
    code, out, err = cli("inspect", art, capsys=capsys)
    assert code == 0 and "scenes64" in out, err
    code, out, err = cli("run", art, "--out", art.parent / "r", capsys=capsys)
    assert code == 0, err
    assert (art.parent / "r" / "image.png").is_file()


def _reference_embeds(runner):
    shape = runner.text["shape"]
    return {"prompt_embeds": torch.zeros(1, *shape[1:]), "negative_prompt_embeds": torch.zeros(1, *shape[1:])}


# ---- 1. nothing is unpickled from an artifact ---------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file: the proof that code from the artifact ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def _rewrite_pt2(path: Path, change) -> None:
    """Rewrite the archive's members through change(members: dict[str, bytes], root) (in place)."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    root = next(iter(members)).split("/")[0]
    change(members, root)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _json_member(members, name, edit):
    data = json.loads(members[name])
    edit(data)
    members[name] = json.dumps(data).encode()


def _pickle_in_sample_inputs(members, root, marker):
    members[f"{root}/data/sample_inputs/model.pt"] = _torch_pickle(marker)


def _pickle_as_weight(members, root, marker):
    config = f"{root}/data/weights/model_weights_config.json"
    data = json.loads(members[config])
    fqn, meta = next(iter(data["config"].items()))
    meta["use_pickle"] = True
    members[f"{root}/data/weights/{meta['path_name']}"] = _torch_pickle(marker)
    members[config] = json.dumps(data).encode()


def _pickle_as_constant(members, root, marker):
    def edit(data):
        data["config"]["evil"] = {"path_name": "tensor_99", "is_param": False, "use_pickle": True, "tensor_meta": None}
    _json_member(members, f"{root}/data/constants/model_constants_config.json", edit)
    members[f"{root}/data/constants/tensor_99"] = _torch_pickle(marker)


def _custom_object_in_config_only(members, root, marker):
    def edit(data):
        data["config"]["evil"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False,
                                  "tensor_meta": None}
    _json_member(members, f"{root}/data/constants/model_constants_config.json", edit)


def _pickle_as_custom_object(members, root, marker):
    _custom_object_in_config_only(members, root, marker)
    members[f"{root}/data/constants/custom_obj_0"] = pickle.dumps(_Payload(marker))


def _pickle_as_opaque_object(members, root, marker):
    def edit(data):
        data["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}
    _json_member(members, f"{root}/data/constants/model_constants_config.json", edit)
    members[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))


def _legacy_pickled_weights(members, root, marker):
    members[f"{root}/data/weights/model.pt"] = _torch_pickle(marker)


def _code_in_guards(members, root, marker):
    _json_member(members, f"{root}/models/model.json",
                 lambda m: m.__setitem__("guards_code", [f"open({str(marker)!r}, 'w')"]))


def _code_in_symbolic_shape(members, root, marker):
    def edit(m):
        m["graph_module"]["graph"]["sym_int_values"] = {
            "s0": {"as_expr": {"expr_str": f"__import__('builtins').open({str(marker)!r}, 'w')"}}}
    _json_member(members, f"{root}/models/model.json", edit)


def _operator_outside_aten(members, root, marker):
    def edit(m):
        m["graph_module"]["graph"]["nodes"][0]["target"] = "torch.hub.load"
    _json_member(members, f"{root}/models/model.json", edit)


def _code_in_node_name(members, root, marker):
    def edit(m):
        node = m["graph_module"]["graph"]["nodes"][0]
        node["outputs"][0]["as_tensor"]["name"] = f"x = open({str(marker)!r}, 'w'); y"
    _json_member(members, f"{root}/models/model.json", edit)


PAYLOADS = {
    "sample inputs pickle": (_pickle_in_sample_inputs, "sample inputs"),
    "weight stored as pickle": (_pickle_as_weight, "stored as a pickle"),
    "constant stored as pickle": (_pickle_as_constant, "stored as a pickle"),
    "custom object (torchbind pickle)": (_pickle_as_custom_object, "unexpected member"),
    "custom object named by the config only": (_custom_object_in_config_only, "not a tensor file"),
    "opaque object (pickle.loads)": (_pickle_as_opaque_object, "unexpected member"),
    "legacy pickled weights file": (_legacy_pickled_weights, "unexpected member"),
    "guard code": (_code_in_guards, "guard code"),
    "symbolic shape expression (sympify)": (_code_in_symbolic_shape, "sym_int_values"),
    "operator outside ATen": (_operator_outside_aten, "not an ATen operator"),
    "code in a node name": (_code_in_node_name, "not an identifier"),
}


@pytest.mark.parametrize("case", list(PAYLOADS))
def test_pickle_or_code_in_a_pt2_is_refused_and_never_runs(art, capsys, case):
    change, needle = PAYLOADS[case]
    marker = art.parent / "PAYLOAD_RAN"
    pt2 = pt2_file(art)
    _rewrite_pt2(pt2, lambda members, root: change(members, root, marker))
    rehash(art, pt2.name)
    read_manifest(art)   # every hash matches: only reading the archive as data can tell
    refused_everywhere(art, capsys, "refused .pt2 program", needle, pt2.name)
    assert not marker.exists()


def test_plain_torch_export_load_runs_the_sample_inputs_payload(art):
    """Why the archive is read as data first: torch.export.load executes this payload (weights_only=False
    fallback for the sample inputs), so the refusals above are not vacuous."""
    marker = art.parent / "PAYLOAD_RAN"
    pt2 = pt2_file(art)
    _rewrite_pt2(pt2, lambda members, root: _pickle_in_sample_inputs(members, root, marker))
    with pytest.raises(Exception):
        torch.export.load(str(pt2))
    assert marker.exists()


def test_saved_programs_hold_no_pickle(art):
    from postdiff_compile.exporters.pt2_archive import check_pt2

    for pt2 in art.glob("*.pt2"):
        with zipfile.ZipFile(pt2) as z:
            sample = [i for i in z.infolist() if i.filename.endswith("sample_inputs/model.pt")]
            configs = [json.loads(z.read(i)) for i in z.infolist() if i.filename.endswith("_config.json")]
        assert all(i.file_size == 0 for i in sample)
        assert all(meta["use_pickle"] is False for c in configs for meta in c["config"].values())
        check_pt2(pt2.read_bytes(), pt2)


def test_onnx_external_data_outside_the_weights_file_is_refused(tmp_path):
    """A graph whose initializer reads `../secret.bin`: onnxruntime would read it; the check refuses it (load and
    inspect run this check on every ONNX graph before a session is made)."""
    import onnx
    from onnx import TensorProto, helper

    from postdiff_compile.exporters.onnx_export import check_file

    folder = tmp_path / "art"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    model = helper.make_model(graph)
    for location, refused in (("weights.bin", False), ("../secret.bin", True), ("/etc/passwd", True)):
        weight = model.graph.initializer[0]
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        del weight.external_data[:]
        weight.external_data.add(key="location", value=location)
        path = folder / "g.onnx"
        onnx.save(model, str(path))
        if refused:
            with pytest.raises(PostDiffError, match=f"reads its data from '{location}'"):
                check_file(path)
        else:
            check_file(path)


# ---- signatures ---------------------------------------------------------------------------------------------

def test_signed_artifact_accepted_tampered_and_unsigned_refused(art, tmp_path, capsys):
    key = tmp_path / "builder"
    code, out, err = cli("keygen", "--out", key, capsys=capsys)
    assert code == 0, err
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    public = Path(f"{key}.pub")

    unsigned = tmp_path / "unsigned"
    shutil.copytree(art, unsigned)
    refused_everywhere(unsigned, capsys, "not signed", public_key=public)

    code, out, err = cli("sign", art, "--key", key, capsys=capsys)
    assert code == 0, err
    assert (art / "manifest.sig").stat().st_size == 64
    load(art, public_key=public)
    load(art, public_key=public.read_bytes())
    code, out, err = cli("inspect", art, "--public-key", public, capsys=capsys)
    assert code == 0, err

    other = tmp_path / "other"
    cli("keygen", "--out", other, capsys=capsys)
    refused_everywhere(art, capsys, "signature does not match", public_key=Path(f"{other}.pub"))

    # A tampered file with every hash rewritten passes the checksum chain; only the signature catches it.
    tampered = tmp_path / "tampered"
    shutil.copytree(art, tampered)
    weights = tampered / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF   # a byte of the last tensor
    weights.write_bytes(bytes(data))
    rehash(tampered, weights.name)
    load(tampered)   # no key: the chain is consistent and a raw weight is data
    refused_everywhere(tampered, capsys, "signature does not match", public_key=public)


def test_signing_refuses_a_damaged_artifact_and_bad_keys(art, tmp_path, capsys):
    key = tmp_path / "k"
    cli("keygen", "--out", key, capsys=capsys)
    code, _, err = cli("keygen", "--out", key, capsys=capsys)
    assert_one_line(code, err, "already exists")
    code, _, err = cli("sign", art, "--key", Path(f"{key}.pub"), capsys=capsys)
    assert_one_line(code, err, "private key")
    (art / pt2_file(art).name).write_bytes(b"damaged")
    code, _, err = cli("sign", art, "--key", key, capsys=capsys)
    assert_one_line(code, err, pt2_file(art).name)
    assert not (art / "manifest.sig").exists()


# ---- 4. manifests that pass the checksum ----------------------------------------------------------------------

def _nested(m):
    m["config"]["x"] = json.loads("[" * 200 + "]" * 200)


MANIFEST_CASES = {
    "steps disagree with the plan": (lambda m: m.__setitem__("steps", 5), "plan: 4 steps, but steps is 5"),
    "steps above the scheduler's": (lambda m: (m.__setitem__("steps", 1001),
                                               m.__setitem__("plan", [dict(m["plan"][0], index=i)
                                                                      for i in range(1001)])),
                                    "more than the scheduler's 1000 training timesteps"),
    "switch step out of range": (lambda m: m.__setitem__("transition", {**_fake_transition(), "switch_step": 9}),
                                 "transition/switch_step"),
    "scheduler class not a scheduler": (lambda m: m["scheduler"].__setitem__("_class_name", "UNet2DConditionModel"),
                                        "not a diffusers scheduler class"),
    "300-character file name": (lambda m: m["variants"][0]["files"]["pt2"].__setitem__("file", "a" * 300 + ".pt2"),
                                "variants/0/files/pt2/file"),
    "file name leaving the folder": (lambda m: m["variants"][0]["files"]["pt2"].__setitem__("file", "../x.pt2"),
                                     "variants/0/files/pt2/file"),
    "plan step naming no variant": (lambda m: m["plan"][1].__setitem__("variant_id", "nothing@b9_1x1"),
                                    "names no variant"),
    "plan step run by a variant that does not compute it": (lambda m: m["plan"][0].__setitem__("variant", "shallow"),
                                                          "which does not run it"),
    # Format 2: a program that does not name the weights file would open with the zeros it holds in their place.
    "pt2 file not naming the weights file": (lambda m: m["variants"][0]["files"]["pt2"].pop("weights"),
                                             "variants/0/files/pt2/weights"),
    "weights file of another name": (lambda m: m["weights"].__setitem__("file", "weights.bin"),
                                     "keeps its weights in weights.safetensors"),
    "boolean as an integer": (lambda m: m.__setitem__("steps", True), "at steps"),
    "config with a cache_pow that hung": (lambda m: m["config"].__setitem__("cache_pow", 1e17),
                                                   "cache_pow must be in (1, 10]"),
    "deep nesting": (_nested, "nested 202 levels deep"),
}


def _fake_transition():
    return {"switch_step": 1, "low_latent_size": [16, 16], "full_latent_size": [32, 32], "timestep_t": 1,
            "timestep_next": 0, "alpha_bar_t": 0.5, "alpha_bar_next": 0.9, "latent_space": "vp",
            "prediction_type": "epsilon", "clamp_x0": 0.0, "renoise": "fresh", "upsample": {}}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_that_passes_the_checksum_is_one_error(art, capsys, case):
    edit, needle = MANIFEST_CASES[case]
    rewrite_manifest(art, edit)
    refused_everywhere(art, capsys, needle, MANIFEST)


@pytest.mark.parametrize("raw, needle", [
    (b'{"steps": 1' + b"0" * 5000 + b"}", "integer of 5001 digits"),
    (b'{"format": "postdiff-artifact", "x": "\xff\xfe"}', "not UTF-8"),
])
def test_manifest_bytes_that_python_json_mishandles(art, capsys, raw, needle):
    rewrite_manifest(art, raw=raw)
    refused_everywhere(art, capsys, needle, MANIFEST)


def test_non_utf8_checksum_file(art, capsys):
    (art / CHECKSUM).write_bytes(b"\xff\xfe\x00garbage")
    refused_everywhere(art, capsys, "sha256 does not match", MANIFEST)


# ---- 5. inspect checks every file ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_inspect_verifies_file_hashes(art, capsys, damage):
    target = pt2_file(art)
    data = bytearray(target.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        target.write_bytes(bytes(data[:-10]))
    else:
        target.unlink()
    code, out, err = cli("inspect", art, capsys=capsys)
    assert_one_line(code, err, target.name, {"flipped": "sha256", "truncated": "bytes", "missing": "missing"}[damage])


# ---- 6. the loader stays inside the artifact folder -----------------------------------------------------------

def test_symlink_inside_an_artifact_is_refused(art, capsys, tmp_path):
    target = pt2_file(art)
    outside = tmp_path / "outside.pt2"
    shutil.move(target, outside)
    target.symlink_to(outside)   # same bytes, same hash: only the link itself is wrong
    refused_everywhere(art, capsys, "symbolic link", target.name)


def test_symlinked_manifest_is_refused(art, capsys, tmp_path):
    outside = tmp_path / "manifest.json"
    shutil.move(art / MANIFEST, outside)
    (art / MANIFEST).symlink_to(outside)
    refused_everywhere(art, capsys, "symbolic link", MANIFEST)


def test_run_does_not_read_the_manifest_source_path(art, capsys, tmp_path):
    """source.path pointed at a folder with a reference model whose files differ: run uses the shipped model
    (checked against the manifest's hashes), never the path an artifact names."""
    from postdiff_compile.cli.default_model import embedded_default_path

    trap = tmp_path / "trap"
    shutil.copytree(embedded_default_path(), trap)
    for f in trap.rglob("*.safetensors"):
        f.write_bytes(b"not weights")
    rewrite_manifest(art, lambda m: m["source"].__setitem__("path", str(trap)))
    code, out, err = cli("run", art, "--out", tmp_path / "r", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "image.png").is_file()
    # Named explicitly, a folder whose denoiser differs from the manifest's hashes is refused.
    code, out, err = cli("run", art, "--out", tmp_path / "r2", "--source", trap, capsys=capsys)
    assert_one_line(code, err, "here is the file the artifact was compiled from")
    code, out, err = cli("run", art, "--out", tmp_path / "r3", "--source", embedded_default_path(), capsys=capsys)
    assert code == 0, err


# ---- 7, 8, 9. atomic output, locks, unusable locations ---------------------------------------------------------

def _compile_command(out: Path) -> list[str]:
    # The shipped reference model, 4 steps of balanced (four variants), pt2: about 10 s, most of it imports; the
    # output folder's lock and partial folder exist from the start, the variants' files appear one by one.
    return [sys.executable, "-m", "postdiff_compile.cli", "--out", str(out), "--steps", "4", "--preset", "balanced"]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGKILL, marks=pytest.mark.slow), signal.SIGTERM])
def test_killed_compile_leaves_nothing_the_next_run_does_not_clean(tmp_path, sig):
    out = tmp_path / "art"
    proc = subprocess.Popen(_compile_command(out), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        def midway():   # SIGKILL: the partial folder holds a first variant's file, the manifest is not written
            partials = list(out.parent.glob(f".{out.name}.*.partial"))   # SIGTERM: as soon as it exists
            return bool(partials) and (sig == signal.SIGTERM or any(any(p.iterdir()) for p in partials))
        assert _wait_for(midway, 120), proc.communicate(timeout=60)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    if sig == signal.SIGTERM:   # caught: the writer cleans up itself
        assert proc.returncode == 143, err
        assert b"terminated; no output was written" in err
        assert _leftovers(out) == []
        return
    assert any(n.endswith(".partial") for n in _leftovers(out))   # SIGKILL: nothing could run
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest
    from postdiff_compile.cli.default_model import embedded_default_path

    compile_artifact(str(embedded_default_path()), ConfigRequest("none"), out, steps=2, dtype="float32")
    assert (out / MANIFEST).is_file()
    assert _leftovers(out) == []
    load(out)


def test_a_second_writer_of_a_locked_folder_fails_at_once(tmp_path):
    """The default tier's test of the lock: this process holds it, a CLI compile into the same folder fails with
    exit 2 before loading anything (the slow tier races two whole compiles)."""
    from postdiff_compile.exporters.atomic_dir import atomic_dir

    out = tmp_path / "art"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("first writer")
        result = subprocess.run(_compile_command(out), cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {out}: another process (PID {os.getpid()}) is writing this output folder now; wait "
                     "for it to finish or choose another output folder"], result.stderr
    assert (out / "f").read_text() == "first writer"
    assert _leftovers(out) == []


@pytest.mark.slow
def test_two_concurrent_compiles_into_one_folder_exactly_one_succeeds(tmp_path):
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(_compile_command(out), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env) for _ in range(2)]
    try:
        results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another process (PID" in loser and "is writing this output folder" in loser
    assert len([line for line in loser.splitlines() if line.startswith("error:")]) == 1
    assert _leftovers(out) == []
    load(out)


def _unusable_locations(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return {"under a file": a_file / "out", "in /proc": Path("/proc/postdiff-out"),
            "in /sys": Path("/sys/postdiff-out"), "symlink loop": loop / "out", "a symlink loop itself": loop}


def test_unusable_output_locations_fail_before_any_work(tmp_path, capsys, monkeypatch):
    """Each fails with exit 2 naming the location, and before the checkpoint is even opened."""
    import postdiff_compile.compile as compile_module

    def never(*a, **k):
        raise AssertionError("the source was loaded before the output location was checked")
    monkeypatch.setattr(compile_module, "load_denoiser", never)
    for name, out in _unusable_locations(tmp_path).items():
        code, _, err = cli("--out", out, capsys=capsys)
        line = assert_one_line(code, err)
        assert str(out.parent) in line or str(out) in line, (name, line)


def test_immutable_parent_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import postdiff_compile.compile as compile_module

    parent = tmp_path / "frozen"
    parent.mkdir()
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        # No chattr here (or no FS support): a read-only bind is not available either; say so, do not pass.
        pytest.xfail("chattr +i is not supported on this filesystem; the other unusable locations cover the path")
    try:
        monkeypatch.setattr(compile_module, "load_denoiser", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
        code, _, err = cli("--out", parent / "out", capsys=capsys)
        assert_one_line(code, err, str(parent))
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_a_signal_right_after_the_partial_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM (raised by the CLI as an exception) landing after mkdtemp made the folder but before its name was
    kept: the writer still removes it (once left behind in the default tier, 7 Dec)."""
    import tempfile as tempfile_module

    from postdiff_compile.exporters import atomic_dir as atomic

    real = tempfile_module.mkdtemp

    def interrupted(**kwargs):
        real(**kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(tmp_path / "art"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_partial_of_a_live_process_is_kept(tmp_path):
    """Only folders whose owner is gone are removed: a live PID (ours) keeps its partial folder."""
    from postdiff_compile.exporters.atomic_dir import atomic_dir

    out = tmp_path / "art"
    mine = tmp_path / f".art.{os.getpid()}.abcd.partial"
    mine.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    theirs = tmp_path / f".art.{dead.pid}.efgh.partial"
    theirs.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert mine.exists() and not theirs.exists()
    assert (out / "f").read_text() == "x"


def test_a_run_killed_between_the_renames_gets_its_old_folder_back(tmp_path):
    from postdiff_compile.exporters.atomic_dir import atomic_dir

    out = tmp_path / "art"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".art.{dead.pid}.wxyz.old"
    old.mkdir()
    (old / "kept").write_text("previous artifact")
    with pytest.raises(PostDiffError, match="already exists"):
        with atomic_dir(out):
            pass
    assert (out / "kept").read_text() == "previous artifact"


# ---- 11. --config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("[" * 2000 + "]" * 2000, "nested 2000 levels deep"),
    ('{"cache_interval": 1' + "0" * 5000 + "}", "integer of 5001 digits"),
    ('{"cache_interval": true}', "cache_interval must be of type int, got True"),
    ('{"cache_pow": NaN}', "NaN is not a JSON number"),
    ('{"cache_pow": 1e999}', "out of range"),
    ('{"renoise": ["fresh"]}', "renoise must be of type str"),
])
def test_bad_config_files_are_one_error(tmp_path, capsys, text, needle):
    config = tmp_path / "c.json"
    config.write_text(text)
    for command in ([], ["explain", "--family", "sd15"]):
        code, _, err = cli(*command, "--config", config, "--out", tmp_path / "o", capsys=capsys) if not command \
            else cli(*command, "--config", config, capsys=capsys)
        assert_one_line(code, err, needle, str(config))
    assert not (tmp_path / "o").exists()


def test_quad_center_with_the_largest_power_finishes():
    from postdiff_compile.config import PostDiffConfig
    from postdiff_compile.plan import build_plan

    config = PostDiffConfig(cache_interval=3, cache_schedule="quad_center", cache_center=10, cache_pow=10.0)
    start = time.perf_counter()
    plan = build_plan(config, 50)
    assert len(plan) == 50 and time.perf_counter() - start < 30


def test_json_true_is_not_a_dimension(tmp_path):
    from postdiff_compile.models.safetensors_header import read_header

    path = tmp_path / "bool.safetensors"
    raw = json.dumps({"a": {"dtype": "F16", "shape": [True, 4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
    with pytest.raises(PostDiffError, match=r"tensor 'a' has an invalid shape \[True, 4\]"):
        read_header(path)


def test_embeddings_of_the_wrong_shape_name_their_file(art, capsys, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "e.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 3, 5), "negative_prompt_embeds": torch.zeros(1, 3, 5)}, str(bad))
    code, _, err = cli("run", art, "--embeddings", bad, "--out", tmp_path / "o", capsys=capsys)
    assert_one_line(code, err, "prompt_embeds must have shape", str(bad))


# ---- 12. one line, fast diagnosis -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--bogus"], ["--resolution", "big"], ["run"], ["inspect", "a", "b"],
                                  ["explain", "--family", "nosuch"], ["sign", "x"]])
def test_usage_errors_are_one_line(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: postdiff-compile"), err


def test_run_prints_nothing_before_its_error(art, capsys, tmp_path):
    code, out, err = cli("run", art, "--embeddings", tmp_path / "missing.safetensors", "--out", tmp_path / "o",
                         capsys=capsys)
    assert_one_line(code, err, "missing.safetensors")


def test_unknown_architecture_is_diagnosed_without_building_models(monkeypatch):
    """The closest family comes from the bundled name/shape table: no model is built (that took 12-27 s)."""
    import postdiff_compile.models.build as build
    from postdiff_compile.models.detect import detect
    from postdiff_compile.models.reference_shapes import reference_table

    monkeypatch.setattr(build, "build_denoiser", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    shapes = dict(reference_table()["sdxl/ldm"])
    shapes["model.diffusion_model.input_blocks.4.1.proj_in.weight"] = (640,)   # wrong rank
    del shapes["model.diffusion_model.out.2.weight"]
    shapes = {k: v for k, v in shapes.items() if "label_emb" not in k}
    start = time.perf_counter()
    with pytest.raises(PostDiffError, match="unknown architecture.*Closest family: sdxl in ldm layout"):
        detect(shapes, "x.safetensors")
    assert time.perf_counter() - start < 10   # generous: the bound is for a hang, the figure is in the note


@pytest.mark.slow
def test_bundled_reference_shapes_equal_the_built_models():
    from postdiff_compile.models.reference_shapes import build_table, reference_table

    assert build_table() == reference_table()
