"""gRPC plumbing shared by the services and the CLI: server start-up with health and reflection, channels,
health waits, the mapping of errors to status codes, and the deployment's transport security.

Security is a deployment setting, never part of a run config: TLS and a shared token are switched on by
environment variables that both `create_server` and `channel` read (see `Security` and docs/deployment.md).
Without them servers listen in plain text and clients connect in plain text: the default for loopback.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pyacemaker.artifacts import ArtifactStore

log = logging.getLogger(__name__)

# Pools travel by reference, but a batch of large periodic cells can still exceed gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# The environment variables of the deployment's transport security (docs/deployment.md).
ENV_TLS_CERT = "PYACEMAKER_TLS_CERT"  # server: certificate chain (PEM); with ENV_TLS_KEY switches TLS on
ENV_TLS_KEY = "PYACEMAKER_TLS_KEY"  # server: private key (PEM)
ENV_TLS_CA = "PYACEMAKER_TLS_CA"  # client: CA bundle that signs the servers; set => clients use TLS
ENV_TLS_CLIENT_AUTH = "PYACEMAKER_TLS_CLIENT_AUTH"  # server: "1" requires client certificates signed by the CA
ENV_TLS_CLIENT_CERT = "PYACEMAKER_TLS_CLIENT_CERT"  # client: certificate chain for mutual TLS
ENV_TLS_CLIENT_KEY = "PYACEMAKER_TLS_CLIENT_KEY"  # client: its private key
ENV_TLS_SERVER_NAME = "PYACEMAKER_TLS_SERVER_NAME"  # client: the name to check the server certificate against
ENV_TOKEN_FILE = "PYACEMAKER_TOKEN_FILE"  # both: a file holding the shared token
SECURITY_FILE_VARIABLES = (
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    ENV_TLS_CA,
    ENV_TLS_CLIENT_CERT,
    ENV_TLS_CLIENT_KEY,
    ENV_TOKEN_FILE,
)
SECURITY_VALUE_VARIABLES = (ENV_TLS_CLIENT_AUTH, ENV_TLS_SERVER_NAME)
# Health stays reachable without the token, so launchers and container HEALTHCHECKs can probe a service
# without holding the secret; it reveals only SERVING/NOT_SERVING. Everything else needs the token.
TOKEN_EXEMPT_PREFIX = "/grpc.health.v1.Health/"
_TOKEN_METADATA_KEY = "authorization"


class SecurityConfigError(ValueError):
    """A security setting that cannot be used: the message names the variable and the file."""


@dataclass(frozen=True)
class Security:
    """The deployment's transport security: PEM bytes and the token, read once from the environment."""

    server_cert: bytes | None = None
    server_key: bytes | None = None
    ca: bytes | None = None
    require_client_cert: bool = False
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None
    token: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Security:
        env = os.environ if environ is None else environ

        def read(variable: str) -> bytes | None:
            value = env.get(variable, "")
            if not value:
                return None
            try:
                return Path(value).expanduser().read_bytes()
            except OSError as exc:
                raise SecurityConfigError(f"{variable}={value}: cannot read the file ({exc.strerror})") from None

        security = cls(
            server_cert=read(ENV_TLS_CERT),
            server_key=read(ENV_TLS_KEY),
            ca=read(ENV_TLS_CA),
            require_client_cert=env.get(ENV_TLS_CLIENT_AUTH, "").lower() in ("1", "true", "yes"),
            client_cert=read(ENV_TLS_CLIENT_CERT),
            client_key=read(ENV_TLS_CLIENT_KEY),
            server_name=env.get(ENV_TLS_SERVER_NAME) or None,
            token=_token_of(read(ENV_TOKEN_FILE), env.get(ENV_TOKEN_FILE, "")),
        )
        if (security.server_cert is None) != (security.server_key is None):
            raise SecurityConfigError(f"{ENV_TLS_CERT} and {ENV_TLS_KEY} must be set together")
        if (security.client_cert is None) != (security.client_key is None):
            raise SecurityConfigError(f"{ENV_TLS_CLIENT_CERT} and {ENV_TLS_CLIENT_KEY} must be set together")
        if security.require_client_cert and (security.server_cert is None or security.ca is None):
            raise SecurityConfigError(
                f"{ENV_TLS_CLIENT_AUTH}=1 needs {ENV_TLS_CERT}/{ENV_TLS_KEY} (server TLS) and {ENV_TLS_CA} "
                "(the CA that signs client certificates)"
            )
        return security


def _token_of(data: bytes | None, path: str) -> str | None:
    if data is None:
        return None
    token = data.decode("utf-8", errors="replace").strip()
    if not token:
        raise SecurityConfigError(f"{ENV_TOKEN_FILE}={path}: the token file is empty")
    if any(ch.isspace() for ch in token):
        raise SecurityConfigError(f"{ENV_TOKEN_FILE}={path}: the token must be one line without spaces")
    return token


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <token>` (health excepted) with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(TOKEN_EXEMPT_PREFIX):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(_TOKEN_METADATA_KEY, "")
        sent_bytes = sent.encode() if isinstance(sent, str) else bytes(sent)
        if hmac.compare_digest(sent_bytes, self._expected):
            return handler
        message = "missing token" if not sent else "wrong token"

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{message}: this service requires the shared token")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


class _TokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call (plain-text channels cannot carry call credentials)."""

    def __init__(self, token: str) -> None:
        self._entry = (_TOKEN_METADATA_KEY, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._entry],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class InvalidInputError(ValueError):
    """Bad input from a client: becomes INVALID_ARGUMENT with this message."""


class WrongStateError(RuntimeError):
    """The request does not fit the current state: becomes FAILED_PRECONDITION."""


@dataclass
class Service:
    """A gRPC server with its application services, grpc.health.v1 and reflection."""

    server: grpc.Server
    port: int
    names: list[str]
    health: health.HealthServicer

    def start(self) -> None:
        self.server.start()
        for name in ["", *self.names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=grace).wait()


def create_server(
    host: str,
    port: int,
    register: Callable[[grpc.Server], list[str]],
    max_workers: int = 16,
    security: Security | None = None,
) -> Service:
    """A server bound to host:port (port 0 picks a free one) with the services `register` adds (it returns
    their full names), plus grpc.health.v1 and server reflection. Not started yet. `security` (default: from
    the environment) adds TLS when it has a server certificate and a token check when it has a token."""
    security = Security.from_env() if security is None else security
    interceptors = [_TokenCheck(security.token)] if security.token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=_CHANNEL_OPTIONS, interceptors=interceptors
    )
    names = register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if security.server_cert is not None and security.server_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(security.server_key, security.server_cert)],
            root_certificates=security.ca if security.require_client_cert else None,
            require_client_auth=security.require_client_cert,
        )
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return Service(server, bound, names, health_servicer)


def serve_forever(
    name: str,
    host: str,
    port: int,
    register: Callable[[grpc.Server], list[str]],
    on_stop: Callable[[], None] | None = None,
    port_file: Path | None = None,
) -> None:
    """Run a service until SIGTERM/SIGINT; in-flight calls get a grace period. With port 0 the bound port
    is written to `port_file` once the server is serving, so a launcher can find it."""
    # The handler only records the signal: doing more there (an Event's set, a log line) can deadlock when the
    # signal lands while the main thread holds the very lock it needs. Installed before the port file appears,
    # so a launcher that stops the service at once still gets a graceful stop.
    received: list[int] = []

    def _handle(signum: int, _frame: Any) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    service = create_server(host, port, register)
    service.start()
    log.info("%s serving on %s:%d", name, host, service.port)
    if port_file is not None:
        staging = port_file.with_suffix(".tmp")
        staging.write_text(str(service.port))
        staging.replace(port_file)
    while not received:
        time.sleep(0.2)
    log.info("%s received signal %d, stopping", name, received[0])
    if on_stop is not None:
        on_stop()
    service.stop()
    log.info("%s stopped", name)


def run_service_cli(
    name: str,
    argv: list[str] | None,
    make_register: Callable[[argparse.Namespace, ArtifactStore], Callable[[grpc.Server], list[str]]],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The whole `python -m pyacemaker.services.<name>`: common flags, logging, artifact store, serve until
    signalled."""
    from pyacemaker.logs import configure_logging

    parser = argparse.ArgumentParser(
        prog=f"python -m pyacemaker.services.{name}", description=f"PyAceMaker {name} service"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--store", type=Path, required=True, help="root of the shared artifact store")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        Security.from_env()  # a bad security setting is one clear line, not a traceback from deep inside
    except SecurityConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    configure_logging(name)
    store = ArtifactStore(args.store)
    serve_forever(name, args.host, args.port, make_register(args, store), port_file=args.port_file)
    return 0


def channel(address: str, security: Security | None = None) -> grpc.Channel:
    """A channel to a service. `security` (default: from the environment) makes it TLS when it has a CA,
    with a client certificate when it has one, and sends the token on every call when it has one."""
    security = Security.from_env() if security is None else security
    options: list[tuple[str, int | str]] = list(_CHANNEL_OPTIONS)
    if security.ca is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.ca, private_key=security.client_key, certificate_chain=security.client_cert
        )
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        ch = grpc.secure_channel(address, credentials, options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    if security.token:
        return grpc.intercept_channel(ch, _TokenMetadata(security.token))
    return ch


def check_health(address: str, timeout: float = 2.0, security: Security | None = None) -> bool:
    try:
        with channel(address, security) as ch:
            response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def wait_for_health(address: str, timeout: float = 30.0, security: Security | None = None) -> None:
    security = Security.from_env() if security is None else security
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check_health(address, timeout=1.0, security=security):
            return
        time.sleep(0.1)
    raise TimeoutError(f"service at {address} did not report SERVING within {timeout:.0f} s")


# Status messages are cut to this length: an error that quotes a client's input stays readable and small.
MAX_STATUS_MESSAGE_CHARS = 1000


def bounded_message(message: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """`message` cut to `limit` characters (with "..." when cut), NUL characters shown as \\0."""
    message = message.replace("\0", "\\0")
    return message if len(message) <= limit else message[: limit - 3] + "..."


def check_address(address: str, field: str) -> str:
    """A service address from a request ("host:port" or "unix:PATH"); InvalidInputError naming `field` for
    anything gRPC could not even turn into a channel target (empty, control characters, no port)."""
    shown = bounded_message(repr(address), 80)
    if not address or len(address) > 255 or any(ch.isspace() or not ch.isprintable() for ch in address):
        raise InvalidInputError(f"{field} {shown} is not a service address (host:port)")
    if address.startswith("unix:"):
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"{field} {shown} is not a service address (host:port)")
    return address


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, bounded_message(message))
    raise AssertionError("unreachable")  # context.abort raises


@contextmanager
def status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn the exceptions plain code raises into gRPC status codes with a human message. Anything else that
    escapes (a bug) becomes INTERNAL with its type and message, logged with its traceback, never UNKNOWN."""
    try:
        yield
    except InvalidInputError as exc:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except WrongStateError as exc:
        abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except Exception as exc:
        if _aborted(context):
            raise  # context.abort's own exception: the status is set already
        log.exception("unhandled error in an RPC handler")
        abort(context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _aborted(context: grpc.ServicerContext) -> bool:
    code = getattr(context, "code", None)
    return callable(code) and code() is not None


def describe_rpc_error(exc: grpc.RpcError, address: str = "") -> str:
    """One line for the CLI out of an RpcError."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {address}" if address else ""
        return f"service unavailable{where} (is it running? try `pyacemaker up`): {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"refused{' by ' + address if address else ''}: {details} (set {ENV_TOKEN_FILE})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"request timed out{' at ' + address if address else ''}: {details}"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"
