"""The pipeline's steps as the orchestrator runs them.

A step is a small object with a `name`, a `version` (bump it when its behaviour changes, so old results are
not reused), `key_material(ctx)` (the canonical config of the step and the digests of its inputs) and
`run(ctx)`. The step key is sha256 of that material plus the code version: a completed step whose key matches
and whose outputs still verify is skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyacemaker import __version__
from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import RunConfig
from pyacemaker.run_layout import StepName
from pyacemaker.v1 import common_pb2


class RunCancelledError(RuntimeError):
    """Raised inside a step when the run was cancelled."""


@dataclass
class StepContext:
    config: RunConfig
    store: ArtifactStore
    run_dir: Path
    seeds: list[common_pb2.Structure]
    sampler_address: str
    oracle_address: str
    trainer_address: str
    # Called with progress; raises RunCancelledError once the run is cancelled.
    report: Callable[[common_pb2.Progress], None]
    # Outputs of the steps that ran (or were skipped) before this one, by step name.
    previous: dict[str, dict[str, common_pb2.ArtifactRef]] = field(default_factory=dict)
    # Client-side deadline for one long streaming call, s.
    call_timeout_s: float = 3600.0
    # Active-learning iteration this step belongs to (1-based; steps 2-7 and validation repeat per iteration).
    iteration: int = 1
    # Prefix of this step's exports in the run directory ("" for step 1, "iteration_01/" for looped steps).
    export_prefix: str = ""
    # Extra oracle instances step 5 spreads its shards over, besides oracle_address (orchestrator
    # --labelling-oracle; they share the artifact store).
    labelling_oracle_addresses: tuple[str, ...] = ()
    # This step's key (set by the runner before `run`), for work that must survive a crash mid-step and be
    # reused only by the same step with the same inputs.
    key: str = ""


@dataclass
class StepOutcome:
    outputs: dict[str, common_pb2.ArtifactRef]
    metrics: dict[str, float]
    # Files to place in the run directory for the user: path relative to it -> artifact to copy there.
    exports: dict[str, common_pb2.ArtifactRef]


class Step(Protocol):
    name: StepName
    version: int

    def key_material(self, ctx: StepContext) -> dict[str, Any]: ...

    def run(self, ctx: StepContext) -> StepOutcome: ...


def step_key(step: Step, ctx: StepContext) -> str:
    material = {"step": step.name, "version": step.version, "code": __version__, "inputs": step.key_material(ctx)}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
