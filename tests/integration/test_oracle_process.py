"""`python -m pyacemaker.services.oracle` as a real process: starts with its deployment file, reports its port,
serves, stops
on SIGTERM; a bad deployment file stops it (and `pyacemaker up`) at start-up with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from ase.build import bulk

from pyacemaker.clients.oracle import backend_spec, stream_labels
from pyacemaker.deploy.local import read_registry
from pyacemaker.rpc import channel, wait_for_health
from pyacemaker.v1 import oracle_pb2, oracle_pb2_grpc
from tests.conftest import CLI, REPO_ROOT, cli


def test_oracle_process_serves_and_stops_on_sigterm(tmp_path) -> None:
    port_file = tmp_path / "oracle.port"
    command = [sys.executable, "-m", "pyacemaker.services.oracle", "--port", "0", "--port-file", str(port_file)]
    command += ["--store", str(tmp_path / "store")]
    deployment = tmp_path / "oracle.yaml"
    deployment.write_text("qe:\n  profiles:\n    big: {command: mpirun -np 64 pw.x, pseudo_dir: /opt/pseudo}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYACEMAKER_ORACLE_DEPLOYMENT": str(deployment)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not port_file.is_file():
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, "the oracle did not write its port file within 30 s"
            time.sleep(0.05)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        wait_for_health(address, timeout=10)
        with channel(address) as ch:
            info = oracle_pb2_grpc.OracleServiceStub(ch).GetInfo(oracle_pb2.GetInfoRequest(), timeout=10)
            assert {"lj", "xtb"} <= {backend.name for backend in info.backends}
            # The profiles a request may choose are the deployment file's (and the default).
            spec = backend_spec("qe", {"profile": "huge", "pseudopotentials": {"Si": "Si.UPF"}})
            with pytest.raises(grpc.RpcError) as caught:
                list(stream_labels(ch, spec, [bulk("Si")], timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no qe profile 'huge' (it has: big, default)" in caught.value.details()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
        assert process.returncode == 0, output
        assert "oracle serving on" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_service_stopped_the_moment_its_port_file_appears_stops_gracefully(tmp_path) -> None:
    # A launcher may stop a service as soon as it is up: the signal must be handled, not kill it mid-start.
    port_file = tmp_path / "oracle.port"
    command = [sys.executable, "-m", "pyacemaker.services.oracle", "--port", "0", "--port-file", str(port_file)]
    command += ["--store", str(tmp_path / "store")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, "the oracle did not write its port file within 60 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
        assert process.returncode == 0, output
        assert "oracle received signal 15, stopping" in output
        assert "oracle stopped" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_bad_deployment_file_is_one_line_at_start_up(tmp_path) -> None:
    deployment = tmp_path / "oracle.yaml"
    deployment.write_text("qe:\n  profiles:\n    default: {command: pw.x, pseudo_dir: relative/dir}\n")
    command = [sys.executable, "-m", "pyacemaker.services.oracle", "--store", str(tmp_path / "store")]
    result = subprocess.run(
        [*command, "--deployment", str(deployment)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"oracle deployment file {deployment}: qe.profiles.default.pseudo_dir: " in result.stderr
    assert "must be an absolute path" in result.stderr and "Traceback" not in result.stderr
    env = {**os.environ, "PYACEMAKER_HOME": str(tmp_path / "home")}
    up = subprocess.run(
        [CLI, "up", "--oracle-deployment", str(deployment)], env=env, capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 2, up.stderr
    assert "qe.profiles.default.pseudo_dir" in up.stderr and not (tmp_path / "home" / "services.json").exists()


def test_pyacemaker_up_hands_the_oracle_its_deployment_file(cli_env, tmp_path) -> None:
    deployment = tmp_path / "oracle.yaml"
    deployment.write_text("vasp:\n  profiles:\n    cluster: {command: srun vasp_std}\n")
    started = cli(cli_env, "up", "--ports", "auto", "--oracle-deployment", str(deployment), timeout=300)
    assert started.returncode == 0, started.stderr
    address = read_registry(Path(cli_env["PYACEMAKER_HOME"]))["oracle"].address
    with channel(address) as ch, pytest.raises(grpc.RpcError) as caught:
        list(stream_labels(ch, backend_spec("vasp", {}), [bulk("Si")], timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no vasp profile 'default' (it has: cluster)" in caught.value.details()
