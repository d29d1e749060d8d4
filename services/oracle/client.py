"""Streaming client of the OracleService, for the CLI and the other services.

Structures go out in batches while labels come back, so neither side holds the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from ase import Atoms
from google.protobuf import struct_pb2

from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc

RequestT = TypeVar("RequestT", oracle_pb2.LabelRequest, oracle_pb2.DescribeRequest)


def backend_spec(name: str, options: Mapping[str, Any] | None = None) -> oracle_pb2.BackendSpec:
    """The wire form of a backend choice; `options` are the config's oracle section minus `backend`.
    Raises ValueError for values a protobuf Struct cannot hold."""
    struct = struct_pb2.Struct()
    struct.update(dict(options or {}))
    return oracle_pb2.BackendSpec(name=name, options=struct)


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
) -> Iterator[tuple[int, common_pb2.Labels]]:
    """(index in `frames`, Labels) as the oracle computes them; raises grpc.RpcError when the call fails.
    `on_submission` sees each scheduler job the oracle reports (DFT backends). Stopping the iteration early
    cancels the call."""
    call = oracle_pb2_grpc.OracleServiceStub(channel).Label(
        label_requests(backend, frames, batch_size), timeout=timeout
    )
    try:
        for response in call:
            if on_submission is not None:
                for submission in response.submissions:
                    on_submission(submission)
            for result in response.results:
                yield int(result.index), result.labels
    finally:
        call.cancel()


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
