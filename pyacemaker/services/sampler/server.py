"""The SamplerService servicer: parse requests, call the pool / featuriser / DIRECT code, write extxyz
artifacts, stream progress and results. No science here."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from ase import Atoms
from pydantic import ValidationError

from pyacemaker.artifacts import ArtifactError, ArtifactStore
from pyacemaker.clients.oracle_force_field import OracleCallError, OracleForceField
from pyacemaker.config import BudgetConfig, DirectConfig, MdConfig, PoolConfig, format_validation_error
from pyacemaker.labels import labels_to_proto
from pyacemaker.restraints import DistanceDifferenceRestraint
from pyacemaker.rpc import InvalidInputError, abort, channel, check_address, status_on_error
from pyacemaker.services.sampler.direct import direct_sample
from pyacemaker.services.sampler.features import UnknownFeaturiserError, get_featuriser
from pyacemaker.services.sampler.frames import FRAME_SELECTIONS, select_saved_frames
from pyacemaker.services.sampler.md import FrameEvent, MdParameters, MdSummary, ReplicaStoppedEvent, run_md
from pyacemaker.services.sampler.oracle_features import OracleFeaturiser
from pyacemaker.services.sampler.pool import ProgressCallback, check_pool_size, generate_pool
from pyacemaker.structure_checks import check_structure
from pyacemaker.structures import (
    StructureFileError,
    atoms_to_structure,
    read_structures,
    structure_to_atoms,
    write_extxyz,
)
from pyacemaker.v1 import common_pb2, sampler_pb2, sampler_pb2_grpc

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


# scikit-learn's random_state (PCA, BIRCH) takes seeds in [0, 2**32).
MAX_RANDOM_SEED = 2**32 - 1


def _random_seed(value: int, field: str) -> int:
    if not 0 <= value <= MAX_RANDOM_SEED:
        raise InvalidInputError(f"{field} must be between 0 and {MAX_RANDOM_SEED}, got {value}")
    return value


def _atoms_from_request(structures: Iterable[common_pb2.Structure], request: str, field: str) -> list[Atoms]:
    frames = []
    for i, structure in enumerate(structures):
        try:
            atoms = structure_to_atoms(structure)
            check_structure(atoms)
        except ValueError as exc:
            raise InvalidInputError(f"{field} {i}: {exc}") from None
        frames.append(atoms)
    if not frames:
        raise InvalidInputError(f"{request} has no {field}s; send at least one structure")
    return frames


def md_parameters_from_settings(settings: sampler_pb2.MdSettings) -> MdParameters:
    """MdSettings → MdParameters; a zero (or empty) field takes the default of the run config's `md` section,
    and values out of range are errors that name the field."""
    # An unset steps or frame count takes the run config's default for a budget of its default size.
    defaults = MdConfig().resolved(BudgetConfig().max_dft_calls)
    assert defaults.steps is not None
    parameters = MdParameters(
        temperatures_k=tuple(settings.temperatures_k) or tuple(defaults.temperatures),
        timestep_fs=settings.timestep_fs or defaults.timestep_fs,
        steps=settings.steps or defaults.steps,
        save_interval=settings.save_interval or defaults.save_interval,
        replicas=settings.replicas or defaults.replicas,
        friction_per_fs=settings.friction_per_fs or defaults.friction_per_fs,
        min_distance=settings.min_distance or defaults.min_distance,
        max_force_std=settings.max_force_std or defaults.max_force_std,
        pressure_gpa=settings.pressure_gpa if settings.HasField("pressure_gpa") else None,
        barostat_time_fs=settings.barostat_time_fs or defaults.barostat_time_fs,
        compressibility_per_gpa=settings.compressibility_per_gpa or defaults.compressibility_per_gpa,
        random_seed=settings.random_seed,
        max_extrapolation_grade=settings.max_extrapolation_grade or float("inf"),
    )
    try:
        parameters.check()
    except ValueError as exc:
        raise InvalidInputError(f"settings.{exc}") from None
    if settings.replicas_per_oracle_call < 0:
        raise InvalidInputError(
            f"settings.replicas_per_oracle_call must be 0 (all in one call) or positive, got "
            f"{settings.replicas_per_oracle_call}"
        )
    return parameters


def _restraints(request: sampler_pb2.RunMdRequest) -> list[DistanceDifferenceRestraint]:
    return [
        DistanceDifferenceRestraint(w.atom_a, w.atom_b, w.atom_c, w.center, w.force_constant) for w in request.windows
    ]


def _md_frame(event: FrameEvent) -> sampler_pb2.MdFrame:
    frame = sampler_pb2.MdFrame(
        replica=event.replica,
        step=event.step,
        structure=atoms_to_structure(event.atoms),
        labels=labels_to_proto(event.labels),
        temperature_k=event.temperature_k,
        window=event.window,
        target_temperature_k=event.target_temperature_k,
        min_distance=event.min_distance,
    )
    if event.collective_variable is not None:
        frame.collective_variable = event.collective_variable
    return frame


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
            seeds = _atoms_from_request(request.seeds, "GeneratePoolRequest", "seed")
            config = pool_config_from_settings(request.settings) if request.HasField("settings") else PoolConfig()
            try:
                check_pool_size(len(seeds), config)
            except ValueError as exc:
                raise InvalidInputError(f"settings: {exc}") from None
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
            _random_seed(request.random_seed, "random_seed")
            featuriser: Callable[[list[Atoms]], np.ndarray]
            if featuriser_name == OracleFeaturiser.name:
                featuriser = OracleFeaturiser(request.oracle_address, request.descriptor_backend)
                check_address(request.oracle_address, "oracle_address")
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
            sample = direct_sample(
                frames, features, request.n_select, k_per_cluster, coverage_bins, request.random_seed
            )
            selection, coverage = sample.selection, sample.coverage
            yield progress(
                "cluster",
                1,
                1,
                f"{selection.n_components} principal components, {selection.n_clusters} clusters, "
                f"coverage {coverage:.3f}",
            )
            selected_ref = self._store_structures(sample.selected)
            log.info(
                "DIRECT selected %d of %d (coverage %.3f): %s",
                len(sample.selected),
                len(frames),
                coverage,
                selected_ref.uri,
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
        with status_on_error(context):
            starts = _atoms_from_request(request.starts, "RunMdRequest", "start")
            params = md_parameters_from_settings(request.settings)
            selection = request.selection
            method = selection.method or "stride"
            if method not in FRAME_SELECTIONS:
                raise InvalidInputError(
                    f"selection.method {method!r} is unknown (known: {', '.join(FRAME_SELECTIONS)})"
                )
            if selection.n_frames < 0:
                raise InvalidInputError(
                    f"selection.n_frames must be 0 (keep all) or positive, got {selection.n_frames}"
                )
            _random_seed(selection.random_seed, "selection.random_seed")
            if not request.oracle_address or not request.force_backend.name:
                raise InvalidInputError(
                    "RunMdRequest needs oracle_address and force_backend (the oracle that gives the forces)"
                )
            check_address(request.oracle_address, "oracle_address")
            try:
                with channel(request.oracle_address) as oracle:
                    force_field = OracleForceField(
                        oracle, request.force_backend, request.settings.replicas_per_oracle_call
                    )
                    trajectory = self.store.new_tempfile(".extxyz")
                    try:
                        summary = yield from self._stream_md(
                            starts, params, force_field, request, trajectory, context.is_active
                        )
                        result = self._md_result(summary, force_field, trajectory, selection, method)
                    finally:
                        trajectory.unlink(missing_ok=True)
            except OracleCallError as exc:
                abort(context, exc.code, f"oracle at {request.oracle_address}: {exc}")
            yield sampler_pb2.RunMdResponse(result=result)

    def _stream_md(
        self,
        starts: list[Atoms],
        params: MdParameters,
        force_field: OracleForceField,
        request: sampler_pb2.RunMdRequest,
        trajectory: Path,
        is_active: Callable[[], bool],
    ) -> Generator[sampler_pb2.RunMdResponse, None, MdSummary]:
        """Run the MD, stream its frames and stops, append every frame to `trajectory` (one write per step,
        so memory stays flat), and report progress about a hundred times per run."""
        try:
            events = run_md(starts, params, force_field, _restraints(request), is_active)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        n_windows = max(len(request.windows), 1)
        log.info(
            "MD: %d replicas x %d window(s), %d steps of %.2f fs, temperatures %s K",
            params.replicas,
            n_windows,
            params.steps,
            params.timestep_fs,
            list(params.temperatures_k),
        )
        report_every = max(1, params.steps // 100)
        pending: list[Atoms] = []
        began = time.perf_counter()
        while True:
            try:
                event = next(events)
            except StopIteration as finished:
                summary: MdSummary = finished.value
                break
            if isinstance(event, FrameEvent):
                pending.append(event.atoms)
                yield sampler_pb2.RunMdResponse(frame=_md_frame(event))
            elif isinstance(event, ReplicaStoppedEvent):
                log.warning("MD replica %d stopped at step %d: %s", event.replica, event.step, event.reason)
                stopped = sampler_pb2.MdReplicaStopped(replica=event.replica, step=event.step, reason=event.reason)
                if event.atoms is not None:
                    stopped.structure.CopyFrom(atoms_to_structure(event.atoms))
                yield sampler_pb2.RunMdResponse(stopped=stopped)
            else:
                if pending:
                    write_extxyz(trajectory, pending, append=True)
                    pending = []
                if event.step % report_every == 0 or event.step == params.steps or not event.running:
                    rate = event.step / max(time.perf_counter() - began, 1e-9)
                    yield sampler_pb2.RunMdResponse(
                        progress=common_pb2.Progress(
                            stage="md",
                            done=event.step,
                            total=params.steps,
                            message=f"{event.running} replicas running, {rate:.1f} steps/s",
                        )
                    )
        if pending:
            write_extxyz(trajectory, pending, append=True)
        return summary

    def _md_result(
        self,
        summary: MdSummary,
        force_field: OracleForceField,
        trajectory: Path,
        selection: sampler_pb2.FrameSelection,
        method: str,
    ) -> sampler_pb2.MdResult:
        result = sampler_pb2.MdResult(
            steps=summary.steps,
            wall_time_s=summary.wall_time_s,
            oracle_time_s=force_field.time_s,
            oracle_calls=force_field.calls,
            replica_steps_per_s=summary.replica_steps / max(summary.wall_time_s, 1e-9),
            replicas=summary.replicas,
            replicas_stopped=summary.replicas_stopped,
            n_frames=summary.n_frames,
        )
        log.info(
            "MD finished: %d steps, %d frames, %d of %d replicas stopped, %.1f replica-steps/s, %d oracle calls "
            "(%.0f%% of the time)",
            summary.steps,
            summary.n_frames,
            summary.replicas_stopped,
            summary.replicas,
            result.replica_steps_per_s,
            force_field.calls,
            100 * force_field.time_s / max(summary.wall_time_s, 1e-9),
        )
        if summary.n_frames == 0:
            return result  # nothing saved: every replica stopped before its first save, or steps < save_interval
        result.trajectory.CopyFrom(self.store.put_file(trajectory, "structures"))
        frames = read_structures(trajectory)
        indices = select_saved_frames(frames, selection.n_frames, method, selection.random_seed)
        result.selected.CopyFrom(self._store_structures([frames[int(i)] for i in indices]))
        result.selected_indices.extend(int(i) for i in indices)
        return result


def add_to_server(server: grpc.Server, store: ArtifactStore) -> list[str]:
    sampler_pb2_grpc.add_SamplerServiceServicer_to_server(SamplerService(store), server)
    return [SERVICE_NAME]
