"""The orchestrator's SQLite run state: steps and events survive reopening the file."""

from __future__ import annotations

from pyacemaker.services.orchestrator.state import RunState, StepRow
from pyacemaker.v1 import common_pb2, orchestrator_pb2


def test_steps_and_events_persist_across_reopen(tmp_path):
    state = RunState(tmp_path)
    state.save_config("demo", '{"name": "demo"}')
    state.mark_step("direct_sampling", "k1", orchestrator_pb2.STEP_STATE_RUNNING)
    ref = common_pb2.ArtifactRef(uri="objects/ab/abc.extxyz", sha256="ab" * 32, size=10, kind="structures")
    state.complete_step(
        StepRow(
            "direct_sampling", "k1", orchestrator_pb2.STEP_STATE_COMPLETED, {"pool": ref}, {"coverage": 0.5}, {"a": "x"}
        )
    )
    progress = common_pb2.Progress(stage="featurise", done=3, total=10)
    first = state.add_event(orchestrator_pb2.RUN_EVENT_KIND_STEP_PROGRESS, step="direct_sampling", progress=progress)
    state.add_event(orchestrator_pb2.RUN_EVENT_KIND_RUN_COMPLETED, message="done")
    state.close()

    reopened = RunState(tmp_path)
    row = reopened.step("direct_sampling")
    assert row is not None and row.key == "k1" and row.state == orchestrator_pb2.STEP_STATE_COMPLETED
    assert row.outputs["pool"] == ref
    assert row.metrics == {"coverage": 0.5} and row.exported == {"a": "x"}
    events = reopened.events_after(0)
    assert [e.seq for e in events] == [first.seq, first.seq + 1]
    assert events[0].progress == progress
    assert reopened.events_after(first.seq)[0].message == "done"


def test_restarting_a_step_clears_its_old_outputs(tmp_path):
    state = RunState(tmp_path)
    state.mark_step("s", "k1", orchestrator_pb2.STEP_STATE_RUNNING)
    state.complete_step(StepRow("s", "k1", orchestrator_pb2.STEP_STATE_COMPLETED, {}, {"n": 1.0}, {"f": "sha"}))
    state.mark_step("s", "k2", orchestrator_pb2.STEP_STATE_RUNNING)
    row = state.step("s")
    assert row is not None
    assert (row.key, row.state, row.metrics, row.exported) == ("k2", orchestrator_pb2.STEP_STATE_RUNNING, {}, {})
