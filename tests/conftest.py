"""Fixtures shared by all tests: real gRPC servers on ephemeral loopback ports, stopped also on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from ase import Atoms

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.deploy.local import SERVICES, pid_alive
from pyacemaker.rpc import SECURITY_FILE_VARIABLES, SECURITY_VALUE_VARIABLES, create_server
from pyacemaker.structures import read_structures

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests depend on nothing outside the checkout and their own temporary dirs: no service registry or store in the
# user's ~/.pyacemaker (a test that starts services makes its own home, see cli_env; the rest get this empty one,
# removed at the end), no service address, TLS or token setting of the caller's shell.
_TEST_HOME = tempfile.TemporaryDirectory(prefix="pyacemaker-test-home-")
os.environ["PYACEMAKER_HOME"] = _TEST_HOME.name
_ADDRESS_VARIABLES = tuple(f"PYACEMAKER_{name.upper()}_ADDRESS" for name in SERVICES)
# The oracle's deployment file too: each test that wants one gives it.
for _variable in (
    *SECURITY_FILE_VARIABLES,
    *SECURITY_VALUE_VARIABLES,
    *_ADDRESS_VARIABLES,
    "PYACEMAKER_ORACLE_DEPLOYMENT",
):
    os.environ.pop(_variable, None)

REPO_ROOT = Path(__file__).resolve().parent.parent
SN2_DIR = REPO_ROOT / "examples" / "sn2"
SN2_SEED_FILES = ("reactant_complex.xyz", "transition_state.xyz", "product_complex.xyz")
CLI = str(Path(sys.executable).parent / "pyacemaker")


def sn2_seeds() -> list[Atoms]:
    """The SN2 example's seeds (GFN2-xTB stationary points; atom order C, H, H, H, Cl1, Cl2; charge −1)."""
    return [read_structures(SN2_DIR / "seeds" / name)[0] for name in SN2_SEED_FILES]


@contextmanager
def running_service(register: Callable[[grpc.Server], list[str]]) -> Iterator[str]:
    """Start a real gRPC server in this process on a free loopback port; yields its address."""
    service = create_server("127.0.0.1", 0, register)
    service.start()
    try:
        yield f"127.0.0.1:{service.port}"
    finally:
        service.stop(grace=0)


@pytest.fixture
def artifact_store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def cli(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The `pyacemaker` console script, as a user runs it."""
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment whose PYACEMAKER_HOME is private to the test; every service started in it (`pyacemaker up`)
    is stopped afterwards, killed if it does not stop."""
    env = {**os.environ, "PYACEMAKER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    try:
        yield env
    finally:
        cli(env, "down")
        registry = Path(env["PYACEMAKER_HOME"]) / "services.json"
        for entry in json.loads(registry.read_text()).values() if registry.is_file() else []:
            if pid_alive(entry["pid"]):
                os.killpg(entry["pid"], signal.SIGKILL)
