"""A local Ray instance for the tests that need one, only inside a network namespace that has loopback alone.

Ray binds some of its listeners to every interface. The Ray tests (marker `ray`) therefore run only as .ci/run
runs them, `unshare -n sh -c 'ip link set lo up && python -m pytest -q -m ray'`; anywhere else the fixture fails
with that command instead of opening ports.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
NAMESPACE_COMMAND = "unshare -n sh -c 'ip link set lo up && python -m pytest -q -m ray'"


def interfaces() -> list[str]:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return [line.split(":")[0].strip() for line in lines]


def check_namespace() -> None:
    found = interfaces()
    if found != ["lo"]:
        pytest.fail(f"the Ray tests start Ray, which listens on every interface; this namespace has {found}. Run "
                    f"them in one with loopback alone: {NAMESPACE_COMMAND}", pytrace=False)


@pytest.fixture(scope="session")
def ray_sweep():
    """A RaySweep on a local Ray instance with 2 CPUs, shut down (and its temp dir removed) at the end of the run:
    one start for test_ray_sweep.py and test_serve.py (each module started its own until 8 Dec)."""
    from postdiff_compile.lab.sweep import RaySweep

    check_namespace()
    # The workers import the tests' job functions (cloudpickle ships them by module name): they inherit the
    # environment of the instance this process starts.
    env = {**RAY_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                  os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")     # short: Ray's socket paths have a length limit
    sweep = RaySweep(num_cpus=2, temp_dir=temp)
    try:
        with sweep:
            yield sweep
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
