"""The SamplerService servicer: parse requests, call the pool / featuriser / DIRECT code, write extxyz
artifacts, stream progress and results. No science here."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from ase import Atoms
from pydantic import ValidationError

from pyacemaker.artifacts import ArtifactError, ArtifactStore
from pyacemaker.config import DirectConfig, PoolConfig, format_validation_error
from pyacemaker.rpc import InvalidInputError, abort, status_on_error
from pyacemaker.structures import StructureFileError, read_structures, structure_to_atoms, write_extxyz
from pyacemaker.v1 import common_pb2, sampler_pb2, sampler_pb2_grpc
from services.sampler.direct import coverage_score, select_direct
from services.sampler.features import UnknownFeaturiserError, get_featuriser
from services.sampler.oracle_features import OracleCallError, OracleFeaturiser
from services.sampler.pool import ProgressCallback, generate_pool

log = logging.getLogger(__name__)

SERVICE_NAME = sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"].full_name

Result = TypeVar("Result")
Response = TypeVar("Response")


def pool_config_from_settings(settings: sampler_pb2.PoolSettings) -> PoolConfig:
    """PoolSettings → PoolConfig. Every field is taken literally (the orchestrator sends a full PoolConfig), so
    a zero is a zero, and out-of-range values are errors that name the field."""
    data = {
        field.name: list(getattr(settings, field.name)) if field.is_repeated else getattr(settings, field.name)
        for field in settings.DESCRIPTOR.fields
    }
    try:
        return PoolConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(format_validation_error(exc, data, "settings")) from None


def _seeds_from_request(request: sampler_pb2.GeneratePoolRequest) -> list[Atoms]:
    if not request.seeds:
        raise InvalidInputError("GeneratePoolRequest has no seeds; send at least one structure")
    seeds = []
    for i, structure in enumerate(request.seeds):
        try:
            seeds.append(structure_to_atoms(structure))
        except ValueError as exc:
            raise InvalidInputError(f"seed {i}: {exc}") from None
    return seeds


def _run_with_progress(
    stage: str,
    work: Callable[[ProgressCallback], Result],
    wrap: Callable[[common_pb2.Progress], Response],
) -> Generator[Response, None, Result]:
    """Run `work` in a helper thread and yield its progress reports as they happen; returns its result (or
    raises its exception) once it finishes. Lets plain code report through a callback while the handler
    streams."""
    reports: queue.Queue[common_pb2.Progress | None] = queue.Queue()
    outcome: dict[str, object] = {}

    def report(done: int, total: int, message: str) -> None:
        reports.put(common_pb2.Progress(stage=stage, done=done, total=total, message=message))

    def target() -> None:
        try:
            outcome["value"] = work(report)
        except BaseException as exc:  # handed to the handler thread, which re-raises it
            outcome["error"] = exc
        finally:
            reports.put(None)

    worker = threading.Thread(target=target, name=f"sampler-{stage}", daemon=True)
    worker.start()
    while (progress := reports.get()) is not None:
        yield wrap(progress)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class SamplerService(sampler_pb2_grpc.SamplerServiceServicer):
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def _store_structures(self, frames: list[Atoms]) -> common_pb2.ArtifactRef:
        """Write frames as one extxyz file into the store (kind "structures")."""
        staging: Path = self.store.new_tempfile(".extxyz")
        try:
            write_extxyz(staging, frames)
            return self.store.put_file(staging, "structures", move=True)
        finally:
            staging.unlink(missing_ok=True)

    def _read_pool(self, ref: common_pb2.ArtifactRef) -> list[Atoms]:
        try:
            return read_structures(self.store.path(ref))
        except (ArtifactError, StructureFileError) as exc:
            raise InvalidInputError(f"pool artifact: {exc}") from None

    def GeneratePool(
        self, request: sampler_pb2.GeneratePoolRequest, context: grpc.ServicerContext
    ) -> Iterator[sampler_pb2.GeneratePoolResponse]:
        with status_on_error(context):
            seeds = _seeds_from_request(request)
            config = pool_config_from_settings(request.settings) if request.HasField("settings") else PoolConfig()
            result = yield from _run_with_progress(
                "generate_pool",
                lambda progress: generate_pool(seeds, config, progress),
                lambda progress: sampler_pb2.GeneratePoolResponse(progress=progress),
            )
            if not result.structures:
                raise InvalidInputError(
                    f"every one of the {result.n_rejected} candidates has two atoms closer than "
                    f"settings.min_distance = {config.min_distance} Å; check the seeds or lower min_distance"
                )
            pool_ref = self._store_structures(result.structures)
            log.info(
                "pool of %d structures from %d seeds (%d rejected): %s",
                len(result.structures),
                len(seeds),
                result.n_rejected,
                pool_ref.uri,
            )
            yield sampler_pb2.GeneratePoolResponse(
                result=sampler_pb2.GeneratePoolResult(
                    pool=pool_ref, n_structures=len(result.structures), n_rejected=result.n_rejected
                )
            )

    def SelectDirect(
        self, request: sampler_pb2.SelectDirectRequest, context: grpc.ServicerContext
    ) -> Iterator[sampler_pb2.SelectDirectResponse]:
        def progress(stage: str, done: int, total: int, message: str) -> sampler_pb2.SelectDirectResponse:
            return sampler_pb2.SelectDirectResponse(
                progress=common_pb2.Progress(stage=stage, done=done, total=total, message=message)
            )

        with status_on_error(context):
            # Zero means "not set" for these fields: none of them can be zero.
            defaults = DirectConfig()
            k_per_cluster = request.k_per_cluster or defaults.k_per_cluster
            coverage_bins = request.coverage_bins or defaults.coverage_bins
            featuriser_name = request.featuriser or "distribution"
            if request.n_select < 1:
                raise InvalidInputError(f"n_select must be at least 1, got {request.n_select}")
            if k_per_cluster < 1:
                raise InvalidInputError(f"k_per_cluster must be at least 1, got {k_per_cluster}")
            if coverage_bins < 1:
                raise InvalidInputError(f"coverage_bins must be at least 1, got {coverage_bins}")
            featuriser: Callable[[list[Atoms]], np.ndarray]
            if featuriser_name == OracleFeaturiser.name:
                featuriser = OracleFeaturiser(request.oracle_address, request.descriptor_backend)
            else:
                try:
                    featuriser = get_featuriser(featuriser_name)
                except UnknownFeaturiserError as exc:
                    raise InvalidInputError(str(exc)) from None

            frames = self._read_pool(request.pool)
            if request.n_select > len(frames):
                raise InvalidInputError(
                    f"n_select = {request.n_select} exceeds the pool size {len(frames)}; lower n_select or grow "
                    "the pool (sampling.pool)"
                )
            yield progress("featurise", 0, len(frames), f"{featuriser_name} features of {len(frames)} structures")
            try:
                features = featuriser(frames)
            except OracleCallError as exc:
                abort(context, exc.code, str(exc))
            yield progress("featurise", len(frames), len(frames), f"{features.shape[1]} features per structure")
            selection = select_direct(features, request.n_select, k_per_cluster, request.random_seed)
            coverage = coverage_score(selection.pc_scores, selection.indices, coverage_bins)
            yield progress(
                "cluster",
                1,
                1,
                f"{selection.n_components} principal components, {selection.n_clusters} clusters, "
                f"coverage {coverage:.3f}",
            )
            selected = []
            for index in selection.indices:
                atoms = frames[int(index)]
                atoms.info["pool_index"] = int(index)
                selected.append(atoms)
            selected_ref = self._store_structures(selected)
            log.info(
                "DIRECT selected %d of %d (coverage %.3f): %s", len(selected), len(frames), coverage, selected_ref.uri
            )
            yield sampler_pb2.SelectDirectResponse(
                result=sampler_pb2.SelectDirectResult(
                    selected=selected_ref,
                    indices=[int(i) for i in selection.indices],
                    coverage=coverage,
                    n_components=selection.n_components,
                    explained_variance_ratio=[float(r) for r in selection.explained_variance_ratio],
                    n_clusters=selection.n_clusters,
                )
            )

    def RunMd(
        self, request: sampler_pb2.RunMdRequest, context: grpc.ServicerContext
    ) -> Iterator[sampler_pb2.RunMdResponse]:
        abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "RunMd (surrogate MD) arrives with step 4 of the pipeline; this sampler offers GeneratePool and "
            "SelectDirect",
        )
        yield  # unreachable; makes this a generator like every streaming handler


def add_to_server(server: grpc.Server, store: ArtifactStore) -> list[str]:
    sampler_pb2_grpc.add_SamplerServiceServicer_to_server(SamplerService(store), server)
    return [SERVICE_NAME]
