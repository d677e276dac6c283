"""postdiff-compile serve's checks before Ray starts, and its cluster config (no Ray is started here)."""
import shutil
from pathlib import Path

import pytest

from postdiff_compile.cli import main

ARTIFACT = Path(__file__).parent / "fixtures" / "artifact_v1" / "none"


def test_a_damaged_artifact_is_refused_before_ray_starts(tmp_path, capsys):
    copy = tmp_path / "a"
    shutil.copytree(ARTIFACT, copy)
    program = next(copy.glob("*.pt2"))
    program.write_bytes(program.read_bytes()[:-1] + b"x")
    assert main(["serve", str(copy), "--backend", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and program.name in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--port", "70000"], "--port must be at most 65535"),
    (["--backend", "nope"], "nope"),
])
def test_bad_flags_are_one_error_line(argv, message, capsys):
    assert main(["serve", str(ARTIFACT), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_print_config_writes_a_serve_deploy_file(capsys):
    import yaml

    assert main(["serve", str(ARTIFACT), "--backend", "torch", "--replicas", "3", "--gpus", "1",
                 "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    app = config["applications"][0]
    assert app["import_path"] == "postdiff_compile.serve.app:app_from_args"
    assert app["args"]["artifact"] == str(ARTIFACT.resolve()) and app["args"]["replicas"] == 3
    assert app["deployments"][0]["ray_actor_options"] == {"num_gpus": 1}
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
