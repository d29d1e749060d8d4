"""Forces from an oracle over gRPC for client-side dynamics and optimisation (the sampler's MD, the
orchestrator's relaxed scans), batched across structures.

Every MD step needs the forces of every running replica at once. `OracleForceField` sends them all as ONE Label
call (one request message holding every structure) and waits for the labels, so a step costs one round trip
and the oracle evaluates the replicas together (the mace backend puts them into one graph batch). The sampler
process never imports torch: the model lives in the oracle.

Each structure goes out with its charge and spin multiplicity (atoms.info), so charged systems are evaluated
as what they are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from ase import Atoms

from pyacemaker.clients.oracle import stream_labels
from pyacemaker.labels import Labels
from pyacemaker.v1 import oracle_pb2


class OracleCallError(RuntimeError):
    """An oracle call (Label or Describe) failed; carries its status code so a service can pass it on and a
    client can tell a restarting oracle (UNAVAILABLE) from a bad request."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# Deadline of one Label call: a fixed allowance (the first call may load a model) plus a time per structure.
DEADLINE_BASE_S = 300.0
DEADLINE_PER_STRUCTURE_S = 1.0


class OracleForceField:
    """Callable: a sequence of structures → their Labels (in order), from the oracle on `oracle_channel`.

    `structures_per_call` = 0 puts every structure of a call into one Label RPC; n > 0 splits them into RPCs of
    at most n structures (1: one call per replica, the unbatched way, for comparison). `calls` and `time_s`
    count the RPCs made and the wall time spent in them.
    """

    def __init__(
        self, oracle_channel: grpc.Channel, backend: oracle_pb2.BackendSpec, structures_per_call: int = 0
    ) -> None:
        if structures_per_call < 0:
            raise ValueError(f"structures_per_call must be 0 (all) or positive, got {structures_per_call}")
        self.channel = oracle_channel
        self.backend = backend
        self.structures_per_call = structures_per_call
        self.calls = 0
        self.time_s = 0.0

    def __call__(self, frames: Sequence[Atoms]) -> list[Labels]:
        size = self.structures_per_call or max(len(frames), 1)
        labels: list[Labels] = []
        for start in range(0, len(frames), size):
            labels.extend(self._one_call(frames[start : start + size]))
        return labels

    def _one_call(self, frames: Sequence[Atoms]) -> list[Labels]:
        began = time.perf_counter()
        results: list[Labels | None] = [None] * len(frames)
        timeout = DEADLINE_BASE_S + DEADLINE_PER_STRUCTURE_S * len(frames)
        try:
            for index, labels in stream_labels(self.channel, self.backend, frames, len(frames), timeout):
                results[index] = labels
        except grpc.RpcError as exc:
            raise OracleCallError(exc.code(), f"oracle force call failed: {exc.details()}") from None
        except ValueError as exc:  # a malformed answer (stream_labels)
            raise OracleCallError(grpc.StatusCode.INTERNAL, f"oracle force call failed: {exc}") from None
        finally:
            self.calls += 1
            self.time_s += time.perf_counter() - began
        missing = [i for i, labels in enumerate(results) if labels is None]
        if missing:
            raise OracleCallError(
                grpc.StatusCode.INTERNAL, f"the oracle returned {len(frames) - len(missing)} of {len(frames)} labels"
            )
        return [labels for labels in results if labels is not None]
