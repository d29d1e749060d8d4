"""Step 7: delta learning — the base ACE corrected with the DFT set (DFT weighted high, the surrogate frames as
a down-weighted regulariser that anchors the correction where DFT has no data)."""

from __future__ import annotations

from typing import Any

from pyacemaker.v1 import trainer_pb2
from services.orchestrator.steps import StepContext, StepOutcome
from services.orchestrator.steps.ace_fit import potential_outcome, surrogate_shards
from services.orchestrator.trainer_jobs import run_trainer_job

EXPORT_DIR = "step7_delta"


class DeltaFitStep:
    name = "delta_fit"
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "base": ctx.previous["ace_fit"]["yaml"].sha256,
            "dft": ctx.previous["active_learning"]["dft"].sha256,
            "shards": [ref.sha256 for ref in surrogate_shards(ctx)],
            "surrogate_weight": ctx.config.ace.delta_surrogate_weight,
            "seed": ctx.config.ace.random_seed,
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        spec = trainer_pb2.DeltaFitSpec(
            base_potential=ctx.previous["ace_fit"]["yaml"],
            dft_data=[ctx.previous["active_learning"]["dft"]],
            surrogate_data=surrogate_shards(ctx),
            surrogate_weight=ctx.config.ace.delta_surrogate_weight,
            random_seed=ctx.config.ace.random_seed,
        )
        job = run_trainer_job(ctx, trainer_pb2.StartJobRequest(delta_fit=spec), "delta learning on the DFT set")
        return potential_outcome(job, ctx, "final", EXPORT_DIR)
