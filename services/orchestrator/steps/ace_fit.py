"""Step 6: the base ACE fitted by the trainer on the surrogate set (the committee-labelled MD frames)."""

from __future__ import annotations

from typing import Any

from pyacemaker.v1 import common_pb2, trainer_pb2
from services.orchestrator.steps import StepContext, StepOutcome
from services.orchestrator.steps.mace_finetune import dft_reference_energies
from services.orchestrator.trainer_jobs import outputs_by_suffix, pacemaker_outputs, run_trainer_job

EXPORT_DIR = "step6_base_ace"
POTENTIAL_FILES = {".yaml": "yaml", ".yace": "yace", ".asi": "asi", ".json": "metrics"}


def surrogate_shards(ctx: StepContext) -> list[common_pb2.ArtifactRef]:
    """Step 5's labelled shards, in order."""
    outputs = ctx.previous["surrogate_labelling"]
    return [outputs[name] for name in sorted(outputs) if name.startswith("shard_")]


def potential_outcome(job: common_pb2.Job, ctx: StepContext, stem: str, export_dir: str) -> StepOutcome:
    """A fit's files as step outputs (yaml, yace, asi, metrics) and exports (<stem>.yace, ..., and the pacemaker
    export of a linear fit in pacemaker/)."""
    by_suffix = outputs_by_suffix(job)
    missing = [suffix for suffix in (".yaml", ".yace", ".asi") if suffix not in by_suffix]
    if missing:
        raise RuntimeError(f"trainer job {job.job_id} returned no {', '.join(missing)} file")
    outputs = {POTENTIAL_FILES[suffix]: ref for suffix, ref in by_suffix.items() if suffix in POTENTIAL_FILES}
    exports = {
        f"{ctx.export_prefix}{export_dir}/{stem}{suffix}": ref
        for suffix, ref in by_suffix.items()
        if suffix in (".yaml", ".yace", ".asi")
    }
    # The fit's data and input for pacemaker (linear fits), in <export_dir>/pacemaker/.
    for name, ref in pacemaker_outputs(job).items():
        exports[f"{ctx.export_prefix}{export_dir}/pacemaker/{name}"] = ref
    return StepOutcome(outputs=outputs, metrics=dict(job.metrics), exports=exports)


class AceFitStep:
    name = "ace_fit"
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "shards": [ref.sha256 for ref in surrogate_shards(ctx)],
            "e0s": ctx.previous["active_learning"]["iteration"].sha256,
            "ace": ctx.config.ace.model_dump(mode="json", exclude={"delta_surrogate_weight"}),
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        spec = base_fit_spec(ctx, surrogate_shards(ctx))
        job = run_trainer_job(ctx, trainer_pb2.StartJobRequest(ace_fit=spec), "base ACE fit on the surrogate set")
        return potential_outcome(job, ctx, "base", EXPORT_DIR)


def base_fit_spec(ctx: StepContext, shards: list[common_pb2.ArtifactRef]) -> trainer_pb2.AceFitSpec:
    """The base fit as the `ace` section asks for it, on the given labelled shards (step 5's; the student
    refinement adds its own)."""
    settings = ctx.config.ace
    return trainer_pb2.AceFitSpec(
        train_data=shards,
        cutoff=settings.cutoff,
        basis_size=settings.basis_size,
        model_kind=settings.model_kind,
        # The committee's labels sit on the DFT level's reference energies (step 3), so the ACE does too.
        e0s=[trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in dft_reference_energies(ctx).items()],
        random_seed=settings.random_seed,
        no_core_repulsion=not settings.core_repulsion,
    )
