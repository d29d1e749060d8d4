"""The "oracle" featuriser for DIRECT: descriptors computed by an oracle's Describe RPC (e.g. the mace
oracle's per-element means of the teacher's invariant node features), so the sampler itself needs no torch.

The pool streams to the oracle in batches while descriptors stream back; only the feature matrix, which
DIRECT needs whole anyway, is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
import numpy as np
from ase import Atoms

from pyacemaker.clients.oracle import describe
from pyacemaker.clients.oracle_force_field import OracleCallError
from pyacemaker.rpc import InvalidInputError, channel
from pyacemaker.v1 import oracle_pb2

# Deadline of one Describe call: a fixed allowance (model loading) plus a generous time per structure.
DEADLINE_BASE_S = 300.0
DEADLINE_PER_STRUCTURE_S = 0.1


@dataclass
class OracleFeaturiser:
    """Features of shape (n_frames, n_descriptors) from the oracle at `address` with `backend`."""

    name: ClassVar[str] = "oracle"
    address: str
    backend: oracle_pb2.BackendSpec
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.address:
            raise InvalidInputError("featuriser 'oracle' needs oracle_address (the oracle whose Describe to use)")
        if not self.backend.name:
            raise InvalidInputError("featuriser 'oracle' needs descriptor_backend (e.g. the mace backend and models)")

    def __call__(self, frames: Sequence[Atoms]) -> np.ndarray:
        timeout = DEADLINE_BASE_S + DEADLINE_PER_STRUCTURE_S * len(frames)
        with channel(self.address) as oracle:
            try:
                return describe(oracle, self.backend, frames, self.batch_size, timeout)
            except grpc.RpcError as exc:
                raise OracleCallError(exc.code(), f"oracle at {self.address}: {exc.details()}") from None
            except ValueError as exc:
                raise OracleCallError(grpc.StatusCode.INTERNAL, f"oracle at {self.address} {exc}") from None
