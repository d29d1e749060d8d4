"""The OracleService servicer: parse requests, call a backend, stream labels back. No science here."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.labels import Labels, labels_to_proto
from pyacemaker.rpc import InvalidInputError, abort, status_on_error
from pyacemaker.services.oracle.backends import OracleBackend, backend_infos, create_backend
from pyacemaker.services.oracle.deployment import OracleDeployment
from pyacemaker.services.oracle.gateway import LabelGateway, executor_config_of
from pyacemaker.services.oracle.workers import WorkerPool
from pyacemaker.structure_checks import check_structure
from pyacemaker.structures import content_id, structure_to_atoms
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = oracle_pb2.DESCRIPTOR.services_by_name["OracleService"].full_name
# A result that took longer than this to produce is sent at once (a slow backend: progress matters more);
# quicker ones are gathered into one response of at most MAX_RESULTS_PER_RESPONSE.
SLOW_RESULT_S = 0.01
MAX_RESULTS_PER_RESPONSE = 64
# Distinct backend settings kept ready at once; a MACE backend holds a model in memory per entry.
BACKEND_CACHE_SIZE = 8
# A client's content_id is echoed in FAILED results only up to this length.
MAX_CONTENT_ID_CHARS = 128


class OracleService(oracle_pb2_grpc.OracleServiceServicer):
    def __init__(
        self,
        work_dir: Path | None = None,
        store: ArtifactStore | None = None,
        deployment: OracleDeployment | None = None,
    ) -> None:
        # Programs and directories come from the deployment, model files from the store (deployment.py).
        self._store = store
        self._deployment = deployment if deployment is not None else OracleDeployment()
        # Keyed by name and canonical options, so repeated streams with the same settings share a backend.
        # (Partials, not bound methods: no reference cycle, so the backends, the pools and their workers end with
        # the servicer.)
        self._backend_for = functools.lru_cache(maxsize=BACKEND_CACHE_SIZE)(
            functools.partial(_create_backend_from_json, self._deployment, self._store)
        )
        # Worker pools of isolated backends (xtb), one per backend setting like the backends themselves.
        self._pool_for = functools.lru_cache(maxsize=BACKEND_CACHE_SIZE)(
            functools.partial(_create_pool, self._backend_for)
        )
        # Task dirs and the durable job table of executor backends; made on first use.
        self._work_dir = work_dir
        self._temporary_work_dir: tempfile.TemporaryDirectory[str] | None = None  # removed with this servicer
        self._gateway: LabelGateway | None = None
        self._gateway_lock = threading.Lock()

    def gateway(self) -> LabelGateway:
        with self._gateway_lock:
            if self._gateway is None:
                if self._work_dir is None:
                    self._temporary_work_dir = tempfile.TemporaryDirectory(prefix="pyacemaker-oracle-")
                    self._work_dir = Path(self._temporary_work_dir.name)
                    log.warning("no --work-dir given: calculation dirs and the job table go to %s", self._work_dir)
                self._gateway = LabelGateway(self._work_dir, self._deployment)
            return self._gateway

    def backend(self, spec: oracle_pb2.BackendSpec) -> OracleBackend:
        return self._backend_for(spec.name, json.dumps(backend_options(spec), sort_keys=True))

    def labeller(self, spec: oracle_pb2.BackendSpec, backend: OracleBackend) -> OracleBackend | WorkerPool:
        """What labels in-process structures: the backend itself, or its worker pool when its native code can
        crash (`OracleBackend.isolated`)."""
        if not backend.isolated:
            return backend
        return self._pool_for(spec.name, json.dumps(backend_options(spec), sort_keys=True))

    def GetInfo(self, request: oracle_pb2.GetInfoRequest, context: grpc.ServicerContext) -> oracle_pb2.GetInfoResponse:
        level = ""
        if request.HasField("backend"):
            with status_on_error(context):
                level = self.backend(request.backend).level_of_theory
        return oracle_pb2.GetInfoResponse(backends=backend_infos(), level_of_theory=level)

    def Label(
        self, request_iterator: Iterator[oracle_pb2.LabelRequest], context: grpc.ServicerContext
    ) -> Iterator[oracle_pb2.LabelResponse]:
        with status_on_error(context):
            yield from self._label_stream(request_iterator, context.is_active)

    def _label_stream(
        self, requests: Iterator[oracle_pb2.LabelRequest], is_active: Callable[[], bool]
    ) -> Iterator[oracle_pb2.LabelResponse]:
        # One request batch at a time, each result sent as soon as it is labelled: memory stays flat however
        # long the stream, and the client sees progress. Results that a batched backend (mace) hands over
        # together travel in one response, so many small structures do not cost a message each.
        backend: OracleBackend | None = None
        labeller: OracleBackend | WorkerPool | None = None
        first_spec = oracle_pb2.BackendSpec()
        index = 0
        failed = 0
        for request in requests:
            if backend is None:
                first_spec = _required_backend_spec(request, "LabelRequest")
                backend = self.backend(first_spec)
                log.info("label stream started: backend %s (%s)", backend.name, backend.level_of_theory)
                if executor_config_of(backend) is not None:
                    # Expensive backends: task dirs, array jobs, re-attachment (pyacemaker/executors).
                    options = backend_options(first_spec)
                    batches = _structure_batches(request, requests, first_spec)
                    yield from self.gateway().label_stream(backend, options, batches, is_active)
                    return
                labeller = self.labeller(first_spec, backend)
            else:
                _check_same_backend(request, first_spec)
            assert labeller is not None
            pending: list[oracle_pb2.LabelResult] = []
            produced = time.perf_counter()
            for result in _label_batch(backend, labeller, request.structures, index):
                took = time.perf_counter() - produced
                if result.labels.status != common_pb2.LABEL_STATUS_OK:
                    failed += 1
                    log.warning("structure %d failed: %s", result.index, result.labels.reason)
                if took > SLOW_RESULT_S and pending:
                    yield oracle_pb2.LabelResponse(results=pending)
                    pending = []
                pending.append(result)
                if took > SLOW_RESULT_S or len(pending) >= MAX_RESULTS_PER_RESPONSE:
                    yield oracle_pb2.LabelResponse(results=pending)
                    pending = []
                produced = time.perf_counter()
            if pending:
                yield oracle_pb2.LabelResponse(results=pending)
            index += len(request.structures)
        log.info("label stream finished: %d structures, %d failed", index, failed)

    def Describe(
        self, request_iterator: Iterator[oracle_pb2.DescribeRequest], context: grpc.ServicerContext
    ) -> Iterator[oracle_pb2.DescribeResponse]:
        with status_on_error(context):
            yield from self._describe_stream(request_iterator, context)

    def _describe_stream(
        self, requests: Iterator[oracle_pb2.DescribeRequest], context: grpc.ServicerContext
    ) -> Iterator[oracle_pb2.DescribeResponse]:
        # One response per request batch: memory stays flat however long the stream.
        backend: OracleBackend | None = None
        first_spec = oracle_pb2.BackendSpec()
        index = 0
        for request in requests:
            if backend is None:
                first_spec = _required_backend_spec(request, "DescribeRequest")
                backend = self.backend(first_spec)
                if not backend.descriptors:
                    abort(
                        context,
                        grpc.StatusCode.UNIMPLEMENTED,
                        f"oracle backend {backend.name!r} has no descriptors (descriptors come from the mace backend)",
                    )
                log.info("describe stream started: backend %s (%s)", backend.name, backend.level_of_theory)
            elif request.HasField("backend") and request.backend != first_spec:
                raise InvalidInputError("only the first DescribeRequest of a stream may name a backend")
            frames = []
            limits = backend.structure_limits()
            for offset, message in enumerate(request.structures):
                try:
                    atoms = structure_to_atoms(message)
                    check_structure(atoms, limits)
                except ValueError as exc:
                    raise InvalidInputError(f"structure {index + offset} cannot be described: {exc}") from None
                frames.append(atoms)
            descriptors = [
                oracle_pb2.Descriptor(
                    index=index + offset,
                    content_id=message.content_id or content_id(atoms),
                    values=values.tolist(),
                )
                for offset, (message, atoms, values) in enumerate(
                    zip(request.structures, frames, backend.describe_batch(frames, index), strict=True)
                )
            ]
            yield oracle_pb2.DescribeResponse(descriptors=descriptors)
            index += len(frames)
        log.info("describe stream finished: %d structures", index)


def backend_options(spec: oracle_pb2.BackendSpec) -> dict[str, object]:
    """The spec's options as plain JSON values; a NaN or infinite number (which JSON cannot carry) is an
    InvalidInputError naming the backend's options."""
    try:
        return json_format.MessageToDict(spec.options)
    except ValueError as exc:
        raise InvalidInputError(f"backend.options of {spec.name[:40]!r}: {exc}") from None


def _create_backend_from_json(
    deployment: OracleDeployment, store: ArtifactStore | None, name: str, options_json: str
) -> OracleBackend:
    return create_backend(name, json.loads(options_json), deployment, store)


def _create_pool(backend_for: Callable[[str, str], OracleBackend], name: str, options_json: str) -> WorkerPool:
    return WorkerPool(backend_for(name, options_json), json.loads(options_json))


def _required_backend_spec(
    request: oracle_pb2.LabelRequest | oracle_pb2.DescribeRequest, kind: str
) -> oracle_pb2.BackendSpec:
    if not request.HasField("backend") or not request.backend.name:
        raise InvalidInputError(f"the first {kind} of a stream must name a backend (field `backend`)")
    return request.backend


def _check_same_backend(request: oracle_pb2.LabelRequest, first_spec: oracle_pb2.BackendSpec) -> None:
    if request.HasField("backend") and request.backend != first_spec:
        raise InvalidInputError("only the first LabelRequest of a stream may name a backend")


def _structure_batches(
    first: oracle_pb2.LabelRequest, rest: Iterator[oracle_pb2.LabelRequest], first_spec: oracle_pb2.BackendSpec
) -> Iterator[Sequence[common_pb2.Structure]]:
    yield first.structures
    for request in rest:
        _check_same_backend(request, first_spec)
        yield request.structures


def _label_batch(
    backend: OracleBackend,
    labeller: OracleBackend | WorkerPool,
    structures: Iterable[common_pb2.Structure],
    first_index: int,
) -> Iterator[oracle_pb2.LabelResult]:
    """LabelResults in request order; a Structure that does not describe a valid geometry, or that the
    backend cannot take (pyacemaker.structure_checks), gets a FAILED label like a failed calculation, so the
    rest of the stream goes on."""
    entries: list[tuple[int, str, str | None]] = []  # (index, content id, reason it cannot be labelled)
    valid = []
    limits = backend.structure_limits()
    for offset, message in enumerate(structures):
        try:
            atoms = structure_to_atoms(message)
            check_structure(atoms, limits)
        except ValueError as exc:
            cid = message.content_id[:MAX_CONTENT_ID_CHARS]
            entries.append((first_index + offset, cid, f"invalid structure: {exc}"))
            continue
        entries.append((first_index + offset, message.content_id[:MAX_CONTENT_ID_CHARS] or content_id(atoms), None))
        valid.append(atoms)
    labels = labeller.label_batch(valid)
    for index, cid, reason in entries:
        result = Labels.failed(reason, backend.level_of_theory) if reason is not None else next(labels)
        yield oracle_pb2.LabelResult(index=index, content_id=cid, labels=labels_to_proto(result))  # the response


def add_to_server(
    server: grpc.Server,
    work_dir: Path | None = None,
    store: ArtifactStore | None = None,
    deployment: OracleDeployment | None = None,
) -> list[str]:
    """`work_dir` holds the calculation dirs and the durable job table of executor backends (pyscf, qe,
    vasp); without one, a temp dir is made when first needed. Model files (mace, ace) are read only as artifacts
    of `store`; programs, templates and scratch dirs come only from `deployment` (default: the defaults)."""
    oracle_pb2_grpc.add_OracleServiceServicer_to_server(OracleService(work_dir, store, deployment), server)
    return [SERVICE_NAME]
