"""Step 7: delta learning — the base ACE corrected with the DFT set (DFT weighted high, the surrogate frames as
a down-weighted regulariser that anchors the correction where DFT has no data).

The base is the student refinement's (step 6b) when it ran, else step 6's; the anchor frames are step 5's
shards plus the frames the refinement added. The base was also fitted on the committee's labels of the DFT
structures (step 6); those are no anchor frames: there the DFT rows say where the potential goes. The anchor's
Gram matrices come from step 6's kept normal equations (the trainer takes the DFT structures' rows out and puts
the student frames' in), so the anchor's 2000 frames are not computed again."""

from __future__ import annotations

from typing import Any

from pyacemaker.run_layout import DELTA_DIR, StepName
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.ace_fit import potential_outcome, surrogate_shards
from pyacemaker.services.orchestrator.steps.outputs import Potential, base_potential, dft_set, has_run, outputs_of
from pyacemaker.services.orchestrator.trainer_jobs import run_trainer_job
from pyacemaker.v1 import common_pb2, trainer_pb2

EXPORT_DIR = DELTA_DIR


def refined_base(ctx: StepContext) -> Potential:
    """The base potential: the refinement's when it ran, else step 6's."""
    if has_run(ctx, StepName.STUDENT_REFINEMENT):
        return outputs_of(ctx, StepName.STUDENT_REFINEMENT, Potential)
    return base_potential(ctx)


def anchor_shards(ctx: StepContext) -> list[common_pb2.ArtifactRef]:
    """Step 5's shards plus the student refinement's frames (when it added some)."""
    extra = refined_base(ctx).student_frames
    return [*surrogate_shards(ctx), *([extra] if extra is not None else [])]


def base_fit_equations(ctx: StepContext) -> tuple[common_pb2.ArtifactRef, list[common_pb2.ArtifactRef]] | None:
    """Step 6's kept normal equations and the shards they were made from (step 5's and the committee-labelled
    DFT structures), from which the delta takes its anchor's Gram matrices; None when step 6 kept none."""
    base = base_potential(ctx)
    if base.normal_equations is None:
        return None
    return base.normal_equations, [*surrogate_shards(ctx), *([base.dft_structures] if base.dft_structures else [])]


class DeltaFitStep:
    name = StepName.DELTA_FIT
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "base": refined_base(ctx).yaml.sha256,
            "dft": dft_set(ctx).dft.sha256,
            "shards": [ref.sha256 for ref in anchor_shards(ctx)],
            "surrogate_weight": ctx.config.ace.delta_surrogate_weight,
            "seed": ctx.config.ace.random_seed,
            "stress_weight": ctx.config.ace.stress_weight,
            "anchor_equations": equations[0].sha256 if (equations := base_fit_equations(ctx)) else "",
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        spec = trainer_pb2.DeltaFitSpec(
            base_potential=refined_base(ctx).yaml,
            dft_data=[dft_set(ctx).dft],
            surrogate_data=anchor_shards(ctx),
            surrogate_weight=ctx.config.ace.delta_surrogate_weight,
            random_seed=ctx.config.ace.random_seed,
            stress_weight=ctx.config.ace.stress_weight,
        )
        if (equations := base_fit_equations(ctx)) is not None:
            spec.anchor_equations.CopyFrom(equations[0])
            spec.anchor_equations_data.extend(equations[1])
        job = run_trainer_job(ctx, trainer_pb2.StartJobRequest(delta_fit=spec), "delta learning on the DFT set")
        return potential_outcome(job, ctx, "final", EXPORT_DIR)
