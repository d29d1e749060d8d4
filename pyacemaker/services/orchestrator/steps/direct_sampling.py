"""Step 1: candidate pool from the seeds, then DIRECT selection, both done by the sampler over gRPC.

The pool's rattles follow the run's temperatures unless sampling.pool.rattle_amplitudes is set. Before DIRECT,
when the oracle serves the mace backend, the teacher labels the pool (cheap) and every structure whose largest
atomic force exceeds active_learning.max_candidate_force is dropped: DIRECT would otherwise send near-collisions
to DFT that step 2 then refuses to train on (measured on the SN2 flagship: 18 of 46 training calls wasted so).
The teacher is judged against a lower bar, TEACHER_FORCE_MARGIN × the cap, because it is a cheaper model whose
forces on compressed bonds fall short of DFT's."""

from __future__ import annotations

from typing import Any

import grpc

from pyacemaker.config import PoolConfig
from pyacemaker.rpc import channel
from pyacemaker.run_layout import DIRECT_DIR, StepName
from pyacemaker.run_records import SelectionRecord, record_text, record_to_json
from pyacemaker.services.orchestrator.active_learning import largest_atomic_force
from pyacemaker.services.orchestrator.model_labels import model_labels
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.mace_finetune import committee_spec, teacher_model
from pyacemaker.structures import read_structures, write_extxyz
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc, sampler_pb2, sampler_pb2_grpc

EXPORT_DIR = DIRECT_DIR


class DirectSamplingStep:
    name = StepName.DIRECT_SAMPLING
    version = 2

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        sampling = ctx.config.sampling
        featuriser, descriptor_backend = _featuriser(ctx)
        return {
            "pool": pool_config(ctx).model_dump(mode="json"),
            "max_candidate_force": ctx.config.active_learning.max_candidate_force,
            "teacher": teacher_model(ctx).sha256,
            "direct": sampling.direct.model_dump(mode="json"),
            "featuriser": featuriser,
            "descriptor_models": [ref["sha256"] for ref in descriptor_backend.options["models"]]
            if descriptor_backend
            else [],
            "seeds": [seed.content_id for seed in ctx.seeds],
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        settings = pool_config(ctx)
        direct = ctx.config.sampling.direct
        featuriser, descriptor_backend = _featuriser(ctx)
        with channel(ctx.sampler_address) as ch:
            sampler = sampler_pb2_grpc.SamplerServiceStub(ch)
            pool_result = last_result(
                sampler.GeneratePool(
                    sampler_pb2.GeneratePoolRequest(
                        seeds=ctx.seeds, settings=sampler_pb2.PoolSettings(**settings.model_dump())
                    ),
                    timeout=ctx.call_timeout_s,
                ),
                ctx,
            ).result
            pool, n_pool, too_hot = teacher_force_filter(ctx, pool_result.pool)
            if n_pool < direct.n_select:
                raise ValueError(
                    f"the pool has {n_pool} structures ({too_hot} more dropped for teacher forces above "
                    f"active_learning.max_candidate_force) but sampling.direct.n_select is {direct.n_select}; "
                    "raise the pool settings (sampling.pool) or lower n_select"
                )
            selection = last_result(
                sampler.SelectDirect(
                    sampler_pb2.SelectDirectRequest(
                        pool=pool,
                        n_select=direct.n_select,
                        k_per_cluster=direct.k_per_cluster,
                        featuriser=featuriser,
                        oracle_address=ctx.oracle_address if descriptor_backend else "",
                        descriptor_backend=descriptor_backend,
                        coverage_bins=direct.coverage_bins,
                        random_seed=direct.random_seed,
                    ),
                    timeout=ctx.call_timeout_s,
                ),
                ctx,
            ).result
        summary = SelectionRecord(
            n_pool=n_pool,
            n_rejected=pool_result.n_rejected,
            n_rejected_teacher_force=too_hot,
            rattle_amplitudes_a=settings.rattle_amplitudes,
            n_selected=len(selection.indices),
            coverage=selection.coverage,
            n_components=selection.n_components,
            explained_variance_ratio=list(selection.explained_variance_ratio),
            n_clusters=selection.n_clusters,
            featuriser=featuriser,
            selected_pool_indices=list(selection.indices),
        )
        data = record_to_json(summary)
        summary_ref = ctx.store.put_bytes(record_text(summary).encode(), kind="selection_summary", suffix=".json")
        outputs = {"pool": pool, "direct": selection.selected, "summary": summary_ref}
        metrics = {k: float(v) for k, v in data.items() if isinstance(v, int | float)}
        exports = {
            f"{EXPORT_DIR}/pool.extxyz": pool,
            f"{EXPORT_DIR}/direct.extxyz": selection.selected,
            f"{EXPORT_DIR}/selection.json": summary_ref,
        }
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def pool_config(ctx: StepContext) -> PoolConfig:
    """sampling.pool with its rattle amplitudes resolved (thermal ones for the md temperatures by default)."""
    return ctx.config.sampling.pool.resolved(ctx.config.md.temperatures)


# On the flagship's DIRECT set (24 structures, B3LYP/def2-SVP) the largest DFT force was 1.23 × the teacher's
# (median); with the plain cap 8 rattles with teacher forces of 8.3-9.8 eV/Å went to DFT at 10.5-11.7 eV/Å and
# were charged but not trained on. 0.8 × the cap drops exactly those 8 and keeps every structure DFT put below it.
TEACHER_FORCE_MARGIN = 0.8


def teacher_force_filter(ctx: StepContext, pool: common_pb2.ArtifactRef) -> tuple[common_pb2.ArtifactRef, int, int]:
    """(the pool without the structures whose teacher forces exceed TEACHER_FORCE_MARGIN ×
    active_learning.max_candidate_force, its size, how many were dropped). The pool as it is when the oracle does
    not serve the teacher (mace)."""
    with channel(ctx.oracle_address) as ch:
        info = oracle_pb2_grpc.OracleServiceStub(ch).GetInfo(oracle_pb2.GetInfoRequest(), timeout=30)
    frames = read_structures(ctx.store.path(pool))
    if not any(b.name == "mace" and b.available for b in info.backends):
        return pool, len(frames), 0
    labels = model_labels(ctx, committee_spec(ctx, [teacher_model(ctx)]), frames, "teacher forces on the pool")
    largest = largest_atomic_force([lab.required_forces() for lab in labels])
    limit = TEACHER_FORCE_MARGIN * ctx.config.active_learning.max_candidate_force
    kept = [a for a, f in zip(frames, largest, strict=True) if f <= limit]
    if len(kept) == len(frames):
        return pool, len(frames), 0
    path = ctx.store.new_tempfile(".extxyz")
    write_extxyz(path, kept)
    return ctx.store.put_file(path, kind="structures", move=True), len(kept), len(frames) - len(kept)


def _featuriser(ctx: StepContext) -> tuple[str, oracle_pb2.BackendSpec | None]:
    """The featuriser DIRECT uses, resolved from 'auto': the teacher's descriptors when the oracle serves the
    mace backend, else the cheap distribution histograms."""
    name = ctx.config.sampling.direct.featuriser
    if name == "auto":
        with channel(ctx.oracle_address) as ch:
            info = oracle_pb2_grpc.OracleServiceStub(ch).GetInfo(oracle_pb2.GetInfoRequest(), timeout=30)
        mace = any(b.name == "mace" and b.available and b.descriptors for b in info.backends)
        name = "oracle" if mace else "distribution"
    if name != "oracle":
        return name, None
    return name, committee_spec(ctx, [teacher_model(ctx)])


def last_result(responses: Any, ctx: StepContext) -> Any:
    """Forward a sampler stream's progress to the run and return its final `result` message."""
    final = None
    try:
        for response in responses:
            if response.HasField("progress"):
                ctx.report(response.progress)
            else:
                final = response
    except BaseException:
        if isinstance(responses, grpc.Future):
            responses.cancel()  # do not leave the sampler working for a run that stopped
        raise
    if final is None:
        raise RuntimeError("the sampler closed the stream without a result")
    return final
