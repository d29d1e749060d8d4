"""Step 1: candidate pool from the seeds, then DIRECT selection, both done by the sampler over gRPC."""

from __future__ import annotations

import json
from typing import Any

import grpc

from pyacemaker.rpc import channel
from pyacemaker.v1 import oracle_pb2, oracle_pb2_grpc, sampler_pb2, sampler_pb2_grpc
from services.orchestrator.steps import StepContext, StepOutcome
from services.orchestrator.steps.mace_finetune import committee_spec, teacher_model

EXPORT_DIR = "step1_direct"


class DirectSamplingStep:
    name = "direct_sampling"
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        sampling = ctx.config.sampling
        featuriser, descriptor_backend = _featuriser(ctx)
        return {
            "pool": sampling.pool.model_dump(mode="json"),
            "direct": sampling.direct.model_dump(mode="json"),
            "featuriser": featuriser,
            "descriptor_models": [ref["sha256"] for ref in descriptor_backend.options["models"]]
            if descriptor_backend
            else [],
            "seeds": [seed.content_id for seed in ctx.seeds],
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        pool_config = ctx.config.sampling.pool
        direct = ctx.config.sampling.direct
        featuriser, descriptor_backend = _featuriser(ctx)
        with channel(ctx.sampler_address) as ch:
            sampler = sampler_pb2_grpc.SamplerServiceStub(ch)
            pool_result = _last_result(
                sampler.GeneratePool(
                    sampler_pb2.GeneratePoolRequest(
                        seeds=ctx.seeds, settings=sampler_pb2.PoolSettings(**pool_config.model_dump())
                    ),
                    timeout=ctx.call_timeout_s,
                ),
                ctx,
            ).result
            if pool_result.n_structures < direct.n_select:
                raise ValueError(
                    f"the pool has {pool_result.n_structures} structures but sampling.direct.n_select is "
                    f"{direct.n_select}; raise the pool settings (sampling.pool) or lower n_select"
                )
            selection = _last_result(
                sampler.SelectDirect(
                    sampler_pb2.SelectDirectRequest(
                        pool=pool_result.pool,
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
        summary = {
            "n_pool": pool_result.n_structures,
            "n_rejected": pool_result.n_rejected,
            "n_selected": len(selection.indices),
            "coverage": selection.coverage,
            "n_components": selection.n_components,
            "explained_variance_ratio": list(selection.explained_variance_ratio),
            "n_clusters": selection.n_clusters,
            "featuriser": featuriser,
            "selected_pool_indices": list(selection.indices),
        }
        summary_ref = ctx.store.put_bytes(
            json.dumps(summary, indent=2).encode(), kind="selection_summary", suffix=".json"
        )
        outputs = {"pool": pool_result.pool, "direct": selection.selected, "summary": summary_ref}
        metrics = {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}
        exports = {
            f"{EXPORT_DIR}/pool.extxyz": pool_result.pool,
            f"{EXPORT_DIR}/direct.extxyz": selection.selected,
            f"{EXPORT_DIR}/selection.json": summary_ref,
        }
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


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


def _last_result(responses: Any, ctx: StepContext) -> Any:
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
