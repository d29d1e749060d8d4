"""OrchestratorService: thin gRPC layer over RunManager."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from pyacemaker.rpc import abort, status_on_error
from pyacemaker.services.orchestrator.runner import RunHandle, RunManager
from pyacemaker.v1 import orchestrator_pb2, orchestrator_pb2_grpc


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, runs: RunManager) -> None:
        self.runs = runs

    def _handle(self, run_id: str, context: grpc.ServicerContext) -> RunHandle:
        try:
            return self.runs.get(run_id)
        except KeyError:
            abort(context, grpc.StatusCode.NOT_FOUND, f"no run with id {run_id!r} on this orchestrator")

    def StartRun(self, request, context):
        with status_on_error(context):
            handle = self.runs.start(request.config_json, list(request.seeds), request.run_dir)
            return orchestrator_pb2.StartRunResponse(run=handle.to_proto())

    def WatchRun(self, request, context) -> Iterator[orchestrator_pb2.WatchRunResponse]:
        with status_on_error(context):
            handle = self._handle(request.run_id, context)
            seq = request.after_seq
            while context.is_active():
                with handle.changed:
                    finished = handle.finished
                events = handle.state.events_after(seq)
                for event in events:
                    seq = event.seq
                    yield orchestrator_pb2.WatchRunResponse(event=event, run=handle.to_proto())
                if finished:
                    return
                if not events:
                    with handle.changed:
                        handle.changed.wait(timeout=1.0)

    def GetRun(self, request, context):
        with status_on_error(context):
            return orchestrator_pb2.GetRunResponse(run=self._handle(request.run_id, context).to_proto())

    def ListRuns(self, request, context):
        with status_on_error(context):
            return orchestrator_pb2.ListRunsResponse(runs=[h.to_proto() for h in self.runs.all_runs()])

    def CancelRun(self, request, context):
        with status_on_error(context):
            self._handle(request.run_id, context)
            return orchestrator_pb2.CancelRunResponse(run=self.runs.cancel(request.run_id).to_proto())


def add_to_server(server: grpc.Server, runs: RunManager) -> list[str]:
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(OrchestratorServicer(runs), server)
    return [orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name]
