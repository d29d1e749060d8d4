"""`python -m services.oracle` as a real process: starts, reports its port, serves, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pyacemaker.rpc import channel, wait_for_health
from pyacemaker.v1 import oracle_pb2, oracle_pb2_grpc
from tests.conftest import REPO_ROOT


def test_oracle_process_serves_and_stops_on_sigterm(tmp_path) -> None:
    port_file = tmp_path / "oracle.port"
    command = [sys.executable, "-m", "services.oracle", "--port", "0", "--port-file", str(port_file)]
    command += ["--store", str(tmp_path / "store")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
        assert process.returncode == 0, output
        assert "oracle serving on" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
