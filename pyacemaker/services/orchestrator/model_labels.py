"""Labels from a model served by the oracle (the MACE committee, the teacher, an ACE): not charged to the DFT
budget, streamed in batches, every structure required to succeed."""

from __future__ import annotations

from collections.abc import Sequence

from ase import Atoms

from pyacemaker.clients.oracle import stream_labels
from pyacemaker.labels import Labels
from pyacemaker.rpc import channel
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.v1 import common_pb2, oracle_pb2

_BATCH = 64


def model_labels(ctx: StepContext, spec: oracle_pb2.BackendSpec, frames: Sequence[Atoms], stage: str) -> list[Labels]:
    """The labels of every frame, in order; RuntimeError when any could not be evaluated."""
    results = all_labels(ctx, spec, frames, stage)
    failed = [i for i, labels in enumerate(results) if not labels.ok]
    if failed:
        raise RuntimeError(
            f"{stage}: the {spec.name} oracle could not evaluate {len(failed)} of {len(frames)} structures "
            f"(first: #{failed[0]}: {results[failed[0]].reason})"
        )
    return results


def all_labels(
    ctx: StepContext, spec: oracle_pb2.BackendSpec, frames: Sequence[Atoms], stage: str, progress_stage: str = "model"
) -> list[Labels]:
    """The labels of every frame, in order, failed ones included (a frame the stream skipped gets a FAILED label
    saying so); progress reported under `progress_stage` with `stage` as its message."""
    results: list[Labels | None] = [None] * len(frames)
    with channel(ctx.oracle_address) as ch:
        for done, (index, labels) in enumerate(stream_labels(ch, spec, frames, batch_size=_BATCH, timeout=3600), 1):
            results[index] = labels
            if done % _BATCH == 0 or done == len(frames):
                ctx.report(common_pb2.Progress(stage=progress_stage, done=done, total=len(frames), message=stage))
    missing = Labels.failed("no result")
    return [labels if labels is not None else missing for labels in results]
