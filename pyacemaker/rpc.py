"""gRPC plumbing shared by the services and the CLI: server start-up with health and reflection, channels,
health waits, and the mapping of errors to status codes."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
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


def create_server(host: str, port: int, register: Callable[[grpc.Server], list[str]], max_workers: int = 16) -> Service:
    """A server bound to host:port (port 0 picks a free one) with the services `register` adds (it returns
    their full names), plus grpc.health.v1 and server reflection. Not started yet."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_CHANNEL_OPTIONS)
    names = register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
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
    service = create_server(host, port, register)
    service.start()
    log.info("%s serving on %s:%d", name, host, service.port)
    if port_file is not None:
        staging = port_file.with_suffix(".tmp")
        staging.write_text(str(service.port))
        staging.replace(port_file)
    stop = threading.Event()

    def _handle(signum: int, _frame: Any) -> None:
        log.info("%s received signal %d, stopping", name, signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    stop.wait()
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
    """The whole `python -m services.<name>`: common flags, logging, artifact store, serve until signalled."""
    from pyacemaker.logs import configure_logging

    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=f"PyAceMaker {name} service")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--store", type=Path, required=True, help="root of the shared artifact store")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(name)
    store = ArtifactStore(args.store)
    serve_forever(name, args.host, args.port, make_register(args, store), port_file=args.port_file)
    return 0


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)


def check_health(address: str, timeout: float = 2.0) -> bool:
    try:
        with channel(address) as ch:
            response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def wait_for_health(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check_health(address, timeout=1.0):
            return
        time.sleep(0.1)
    raise TimeoutError(f"service at {address} did not report SERVING within {timeout:.0f} s")


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


@contextmanager
def status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn the exceptions plain code raises into gRPC status codes with a human message."""
    try:
        yield
    except InvalidInputError as exc:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except WrongStateError as exc:
        abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))


def describe_rpc_error(exc: grpc.RpcError, address: str = "") -> str:
    """One line for the CLI out of an RpcError."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {address}" if address else ""
        return f"service unavailable{where} (is it running? try `pyacemaker up`): {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"request timed out{' at ' + address if address else ''}: {details}"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"
