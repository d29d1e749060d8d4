"""Streaming client of the OracleService, for the CLI and the other services.

Structures go out in batches while labels come back, so neither side holds the whole set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from ase import Atoms
from google.protobuf import struct_pb2

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.labels import Labels, labels_from_proto
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc

RequestT = TypeVar("RequestT", oracle_pb2.LabelRequest, oracle_pb2.DescribeRequest)


def backend_spec(name: str, options: Mapping[str, Any] | None = None) -> oracle_pb2.BackendSpec:
    """The wire form of a backend choice; `options` are the config's oracle section minus `backend`.
    Raises ValueError for values a protobuf Struct cannot hold."""
    struct = struct_pb2.Struct()
    struct.update(dict(options or {}))
    return oracle_pb2.BackendSpec(name=name, options=struct)


# Backend → its options that name model files (models, potentials, active sets), each with whether it is a list:
# the oracle accepts these only as artifact references into the shared store, never as paths.
ARTIFACT_OPTIONS: dict[str, tuple[tuple[str, bool], ...]] = {
    "mace": (("models", True),),
    "ace": (("potential", False), ("active_set", False)),
}


def artifact_option(ref: common_pb2.ArtifactRef) -> dict[str, Any]:
    """An ArtifactRef as a backend option value (a protobuf Struct holds plain mappings): how mace's `models`
    and ace's `potential` name model files."""
    return {"uri": ref.uri, "sha256": ref.sha256, "size": ref.size, "kind": ref.kind}


def model_files_as_artifacts(name: str, options: Mapping[str, Any], store: ArtifactStore) -> dict[str, Any]:
    """`options` as the oracle accepts them: the model files that mace's `models` (paths, foundation-model names)
    and ace's `potential` name on this side are put into the shared store and sent as artifact references; the
    oracle loads model files from nowhere else. "bundled" stays a name (the oracle ships that file itself)."""
    from pyacemaker.teacher.resolve import BUNDLED_NAME, resolve_teacher

    options = dict(options)

    def as_ref(value: Any) -> Any:
        if isinstance(value, Mapping) or (value == BUNDLED_NAME and name == "mace"):
            return value
        path = resolve_teacher(str(value)) if name == "mace" else Path(str(value))
        return artifact_option(store.put_file(path, kind="model" if name == "mace" else "potential"))

    for key, is_list in ARTIFACT_OPTIONS.get(name, ()):
        if key in options:
            value = options[key]
            options[key] = [as_ref(v) for v in value] if is_list and isinstance(value, list) else as_ref(value)
    return options


def batched_requests(
    message: type[RequestT], backend: oracle_pb2.BackendSpec, frames: Iterable[Atoms], batch_size: int
) -> Iterator[RequestT]:
    """LabelRequest or DescribeRequest messages built lazily from `frames`; only the first carries the backend."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch: list[common_pb2.Structure] = []
    first = True
    for atoms in frames:
        batch.append(atoms_to_structure(atoms))
        if len(batch) == batch_size:
            yield message(backend=backend if first else None, structures=batch)
            batch, first = [], False
    if batch or first:
        yield message(backend=backend if first else None, structures=batch)


def label_requests(
    backend: oracle_pb2.BackendSpec, frames: Iterable[Atoms], batch_size: int
) -> Iterator[oracle_pb2.LabelRequest]:
    return batched_requests(oracle_pb2.LabelRequest, backend, frames, batch_size)


def stream_labels(
    channel: grpc.Channel,
    backend: oracle_pb2.BackendSpec,
    frames: Iterable[Atoms],
    batch_size: int = 16,
    timeout: float | None = None,
    on_submission: Callable[[oracle_pb2.Submission], None] | None = None,
    max_in_flight: int | None = None,
) -> Generator[tuple[int, Labels], None, None]:
    """(index in `frames`, Labels) as the oracle computes them; raises grpc.RpcError when the call fails and
    ValueError when an answer is malformed (an index never sent, forces that are not three per atom).
    `on_submission` sees each scheduler job the oracle reports (DFT backends). Stopping the iteration early
    cancels the call.

    `max_in_flight` (at least `batch_size`) bounds the structures sent but not yet answered. Without it gRPC's
    transport window (megabytes) lets a lazily read `frames` run far ahead of the labels, into both processes'
    buffers. Only for backends that answer each request before reading the next (mace, xtb, lj): the
    executor-backed DFT backends may read the whole stream before they answer."""
    window = _InFlightWindow(max_in_flight, batch_size) if max_in_flight is not None else None
    # The atom count of each structure sent and not yet answered: the wire's flat forces become (N, 3) with it.
    # Filled in gRPC's request thread before the structure goes out, so it is there when its answer comes.
    atom_counts: dict[int, int] = {}

    def counted(frames: Iterable[Atoms]) -> Iterator[Atoms]:
        for index, atoms in enumerate(frames):
            atom_counts[index] = len(atoms)
            yield atoms

    sent = counted(window.admit(frames) if window else frames)
    call = oracle_pb2_grpc.OracleServiceStub(channel).Label(label_requests(backend, sent, batch_size), timeout=timeout)
    try:
        for response in call:
            if on_submission is not None:
                for submission in response.submissions:
                    on_submission(submission)
            for result in response.results:
                if window is not None:
                    window.release()
                index = int(result.index)
                if index not in atom_counts:
                    raise ValueError(f"the oracle sent a label for index {index}, which is not awaiting one")
                yield index, labels_from_proto(result.labels, atom_counts.pop(index))
    finally:
        if window is not None:
            window.close()
        call.cancel()


class _InFlightWindow:
    """Admits a structure into the request stream only while fewer than `size` are awaiting their labels."""

    def __init__(self, size: int, batch_size: int) -> None:
        if size < batch_size:
            # The oracle answers whole request batches, so a smaller window would never fill one.
            raise ValueError(f"max_in_flight ({size}) must be at least batch_size ({batch_size})")
        self._free = threading.Semaphore(size)
        self._closed = threading.Event()

    def admit(self, frames: Iterable[Atoms]) -> Iterator[Atoms]:
        # Runs in gRPC's request thread; it stops waiting once the call is over.
        for atoms in frames:
            while not self._free.acquire(timeout=0.2):
                if self._closed.is_set():
                    return
            yield atoms

    def release(self) -> None:
        self._free.release()

    def close(self) -> None:
        self._closed.set()


def describe(
    channel: grpc.Channel,
    backend: oracle_pb2.BackendSpec,
    frames: Sequence[Atoms],
    batch_size: int = 64,
    timeout: float | None = None,
) -> np.ndarray:
    """Descriptors of `frames` from the oracle's Describe, shape (n_frames, n_descriptors); only the matrix is
    kept while the frames stream out. Raises grpc.RpcError when the call fails and ValueError when the answer is
    malformed (an index out of range, a ragged row, a structure left out)."""
    features: np.ndarray | None = None
    seen = np.zeros(len(frames), dtype=bool)
    call = oracle_pb2_grpc.OracleServiceStub(channel).Describe(
        batched_requests(oracle_pb2.DescribeRequest, backend, frames, batch_size), timeout=timeout
    )
    for response in call:
        for descriptor in response.descriptors:
            if features is None:
                features = np.empty((len(frames), len(descriptor.values)))
            if not 0 <= descriptor.index < len(frames) or len(descriptor.values) != features.shape[1]:
                raise ValueError(f"sent a malformed descriptor for index {descriptor.index}")
            features[descriptor.index] = descriptor.values
            seen[descriptor.index] = True
    if features is None or not seen.all():
        raise ValueError(f"described {int(seen.sum())} of {len(frames)} structures")
    return features
