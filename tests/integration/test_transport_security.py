"""TLS, mutual TLS and the shared token on a real service (the oracle's GetInfo), with certificates made in
the test by the openssl CLI: the right CA and token get through, anything else is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from ase import Atoms

from pyacemaker.clients.oracle import backend_spec, stream_labels
from pyacemaker.rpc import (
    ENV_TLS_CA,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    ENV_TOKEN_FILE,
    Security,
    SecurityConfigError,
    channel,
    check_health,
    create_server,
    describe_rpc_error,
)
from pyacemaker.services.oracle.server import add_to_server
from pyacemaker.v1 import oracle_pb2, oracle_pb2_grpc
from tests.conftest import REPO_ROOT
from tests.pki import make_pki, openssl_available

TOKEN = "s3cret-token-for-tests"

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl CLI (apt-get install openssl)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_pki(tmp_path_factory.mktemp("pki"), "DNS:localhost,IP:127.0.0.1")
    (directory / "token").write_text(TOKEN + "\n")
    return directory


def _read(pki: Path, name: str) -> bytes:
    return (pki / name).read_bytes()


def _server_security(pki: Path, **changes: object) -> Security:
    base = Security(server_cert=_read(pki, "server.pem"), server_key=_read(pki, "server.key"), token=TOKEN)
    return replace(base, **changes)  # type: ignore[arg-type]


@contextmanager
def _oracle(security: Security) -> Iterator[str]:
    service = create_server("127.0.0.1", 0, add_to_server, security=security)
    service.start()
    try:
        yield f"127.0.0.1:{service.port}"
    finally:
        service.stop(grace=0)


def _get_info(address: str, security: Security) -> oracle_pb2.GetInfoResponse:
    with channel(address, security) as ch:
        return oracle_pb2_grpc.OracleServiceStub(ch).GetInfo(oracle_pb2.GetInfoRequest(), timeout=10)


def _code_of_call(address: str, security: Security) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        _get_info(address, security)
    return caught.value.code()


def test_tls_and_token_admit_the_right_client_and_refuse_the_others(pki: Path) -> None:
    client = Security(ca=_read(pki, "ca.pem"), token=TOKEN)
    with _oracle(_server_security(pki)) as address:
        backends = {b.name for b in _get_info(address, client).backends}
        assert {"lj", "xtb"} <= backends

        # No token, or the wrong one: the call is refused, with a message saying why.
        with pytest.raises(grpc.RpcError) as caught:
            _get_info(address, replace(client, token=None))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing token" in caught.value.details()
        assert "PYACEMAKER_TOKEN_FILE" in describe_rpc_error(caught.value, address)
        assert _code_of_call(address, replace(client, token="guess")) == grpc.StatusCode.UNAUTHENTICATED

        # A CA that did not sign the server certificate: the handshake fails, nothing is sent.
        assert _code_of_call(address, replace(client, ca=_read(pki, "other.pem"))) == grpc.StatusCode.UNAVAILABLE
        # A plain-text client cannot talk to a TLS server either.
        assert _code_of_call(address, Security(token=TOKEN)) == grpc.StatusCode.UNAVAILABLE

        # Health is exempt from the token (launchers and HEALTHCHECKs probe without the secret), not from TLS.
        assert check_health(address, security=replace(client, token=None))
        assert not check_health(address, security=replace(client, ca=_read(pki, "other.pem")))


def test_token_without_tls_guards_a_plain_text_server(pki: Path) -> None:
    molecule = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    with _oracle(Security(token=TOKEN)) as address:
        assert _get_info(address, Security(token=TOKEN)).backends
        assert _code_of_call(address, Security()) == grpc.StatusCode.UNAUTHENTICATED
        # Streaming calls too: labels stream back with the token, and are refused without it.
        with channel(address, Security(token=TOKEN)) as ch:
            labelled = list(stream_labels(ch, backend_spec("lj"), [molecule], timeout=30))
        assert len(labelled) == 1 and labelled[0][1].level_of_theory.startswith("lj")
        with channel(address, Security()) as ch, pytest.raises(grpc.RpcError) as caught:
            list(stream_labels(ch, backend_spec("lj"), [molecule], timeout=30))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Path) -> None:
    server = _server_security(pki, ca=_read(pki, "ca.pem"), require_client_cert=True, token=None)
    client = Security(
        ca=_read(pki, "ca.pem"), client_cert=_read(pki, "client.pem"), client_key=_read(pki, "client.key")
    )
    with _oracle(server) as address:
        assert _get_info(address, client).backends
        assert _code_of_call(address, replace(client, client_cert=None, client_key=None)) == grpc.StatusCode.UNAVAILABLE
        intruder = replace(client, client_cert=_read(pki, "intruder.pem"), client_key=_read(pki, "intruder.key"))
        assert _code_of_call(address, intruder) == grpc.StatusCode.UNAVAILABLE


def test_settings_come_from_the_environment_and_bad_ones_name_the_variable(pki: Path, tmp_path: Path) -> None:
    env = {
        ENV_TLS_CERT: str(pki / "server.pem"),
        ENV_TLS_KEY: str(pki / "server.key"),
        ENV_TOKEN_FILE: str(pki / "token"),
    }
    security = Security.from_env(env)
    assert security.server_cert == _read(pki, "server.pem") and security.token == TOKEN
    assert Security.from_env({}) == Security()  # nothing set: plain text, no token (the loopback default)

    with pytest.raises(SecurityConfigError, match=f"{ENV_TLS_CA}={tmp_path}/missing.pem: cannot read"):
        Security.from_env({ENV_TLS_CA: str(tmp_path / "missing.pem")})
    with pytest.raises(SecurityConfigError, match=f"{ENV_TLS_CERT} and {ENV_TLS_KEY} must be set together"):
        Security.from_env({ENV_TLS_CERT: str(pki / "server.pem")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecurityConfigError, match="the token file is empty"):
        Security.from_env({ENV_TOKEN_FILE: str(tmp_path / "empty")})


def test_a_service_process_started_with_the_environment_serves_tls_and_checks_the_token(pki: Path, tmp_path: Path):
    port_file = tmp_path / "oracle.port"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        ENV_TLS_CERT: str(pki / "server.pem"),
        ENV_TLS_KEY: str(pki / "server.key"),
        ENV_TOKEN_FILE: str(pki / "token"),
    }
    command = [sys.executable, "-m", "pyacemaker.services.oracle", "--port", "0", "--port-file", str(port_file)]
    command += ["--store", str(tmp_path / "store")]
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "the oracle did not start within 60 s"
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        client = Security(ca=_read(pki, "ca.pem"), token=TOKEN)
        assert _get_info(address, client).backends
        assert _code_of_call(address, replace(client, token=None)) == grpc.StatusCode.UNAUTHENTICATED
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
        assert process.returncode == 0, output
        assert "oracle stopped" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # A bad setting stops the service at start-up with one line naming the variable.
    env[ENV_TOKEN_FILE] = str(tmp_path / "no-such-token")
    failed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2
    assert f"{ENV_TOKEN_FILE}={tmp_path}/no-such-token: cannot read the file" in failed.stderr
    assert "Traceback" not in failed.stderr
