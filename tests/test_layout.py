"""The floor plan (docs/design.md): the dependency rules hold, a violation of them is caught, and no module or
function has outgrown the size rules."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "postdiff_compile"
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_dependency_rules_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_importing_the_lab_from_the_core_breaks_them(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "postdiff_compile", ignore=shutil.ignore_patterns("*.safetensors", "*.gz",
                                                                                         "__pycache__", "weights"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    capture = tmp_path / "postdiff_compile" / "capture.py"
    capture.write_text(capture.read_text() + "\nfrom .lab import study  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    assert "postdiff_compile.capture is not allowed to import postdiff_compile.lab" in result.stdout


def test_the_core_contract_covers_every_core_module():
    """The core contract lists the core by name; a new top-level module outside it would go unchecked."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    core = next(c for c in contracts if c["forbidden_modules"] == ["postdiff_compile.cli", "postdiff_compile.lab",
                                                                   "postdiff_compile.serve"]
                and c.get("as_packages", True))
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert {f"postdiff_compile.{name}" for name in top - {"cli", "lab", "serve"}} == set(core["source_modules"])


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > 350:
            long_modules.append(f"{path.relative_to(ROOT)}: {lines} lines")
        long_functions += [f"{path.relative_to(ROOT)}:{name}: {n} lines"
                           for name, n in _functions(ast.parse(text)) if n >= 80]
    assert not long_modules and not long_functions, long_modules + long_functions
    assert len((PACKAGE / "compile.py").read_text().splitlines()) < 150   # orchestration only
