"""The TrainerService servicer: parse requests, hand them to the JobManager, build responses. No science
here; the jobs themselves run in worker processes or scheduler jobs (see pyacemaker.services.trainer.jobs)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import grpc

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import InvalidInputError, abort, status_on_error
from pyacemaker.services.trainer.deployment import TrainerDeployment
from pyacemaker.services.trainer.jobs import JobManager, JobNotFoundError
from pyacemaker.services.trainer.worker import validate_request
from pyacemaker.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def _job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidInputError("job_id is empty")
    return job_id


class TrainerService(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def StartJob(
        self, request: trainer_pb2.StartJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.StartJobResponse:
        with status_on_error(context):
            return trainer_pb2.StartJobResponse(job=self.manager.start(request))

    def GetJob(self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext) -> trainer_pb2.GetJobResponse:
        with _job_errors(context):
            return trainer_pb2.GetJobResponse(job=self.manager.job(_job_id(request.job_id)))

    def WatchJob(
        self, request: trainer_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.WatchJobResponse]:
        with _job_errors(context):
            for job, training in self.manager.watch(_job_id(request.job_id), context.is_active):
                response = trainer_pb2.WatchJobResponse(job=job)
                if training is not None:
                    response.training.CopyFrom(training)
                yield response

    def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.CancelJobResponse:
        with _job_errors(context):
            return trainer_pb2.CancelJobResponse(job=self.manager.cancel(_job_id(request.job_id)))

    def ResumeJob(
        self, request: trainer_pb2.ResumeJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ResumeJobResponse:
        with _job_errors(context):
            return trainer_pb2.ResumeJobResponse(job=self.manager.resume(_job_id(request.job_id), request.restart))

    def GetTrainerInfo(
        self, request: trainer_pb2.GetTrainerInfoRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.GetTrainerInfoResponse:
        deployment = self.manager.deployment
        return trainer_pb2.GetTrainerInfoResponse(
            executor_profiles=deployment.profile_names(), default_executor=deployment.default_executor
        )


@contextlib.contextmanager
def _job_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """status_on_error, plus JobNotFoundError → NOT_FOUND."""
    with status_on_error(context):
        try:
            yield
        except JobNotFoundError as exc:
            abort(context, grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "no such job")


def default_work_dir(store: ArtifactStore) -> Path:
    """The trainer's own directory (job table, job dirs): a sibling "trainer" of the artifact store."""
    return store.root.parent / "trainer"


def create_manager(
    store: ArtifactStore,
    work_dir: Path | None = None,
    max_running: int = 1,
    deployment: TrainerDeployment | None = None,
) -> JobManager:
    return JobManager(
        store,
        work_dir or default_work_dir(store),
        validate=functools.partial(_validate, store=store),
        max_running=max_running,
        deployment=deployment,
    )


def _validate(request: trainer_pb2.StartJobRequest, store: ArtifactStore) -> None:
    validate_request(request, store)


def add_to_server(server: grpc.Server, manager: JobManager) -> list[str]:
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerService(manager), server)
    return [SERVICE_NAME]
