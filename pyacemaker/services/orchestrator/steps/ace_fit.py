"""Step 6: the base ACE fitted by the trainer on the surrogate set: the committee-labelled MD frames of step 5
and the fine-tuned committee's labels of the DFT training structures.

Why the DFT structures: step 7 corrects the base where DFT labels exist. Step 2 picks those structures from a
perturbed pool, so without them the base would be fitted on MD frames only and extrapolate on them (measured on
the quick SN2 run: γ up to 7·10⁹, force errors up to 333 eV/Å), and the delta would be fitted on the residuals
of an extrapolating base, which distorts the potential away from the DFT set. With the committee's labels of
those structures in the base's data, the delta corrects what it should: the committee's differences from DFT,
on structures the base knows. The labels cost no DFT call (the oracle's mace backend, as in step 5); structures
whose committee forces exceed active_learning.max_candidate_force are left out (as in step 6b).
"""

from __future__ import annotations

from typing import Any

from ase import Atoms

from pyacemaker.run_layout import BASE_ACE_DIR, StepName
from pyacemaker.services.orchestrator.active_learning import largest_atomic_force
from pyacemaker.services.orchestrator.model_labels import model_labels
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.mace_finetune import (
    committee_models,
    committee_spec,
    dft_reference_energies,
)
from pyacemaker.services.orchestrator.steps.outputs import base_potential, dft_set, has_run
from pyacemaker.services.orchestrator.trainer_jobs import outputs_by_suffix, pacemaker_outputs, run_trainer_job
from pyacemaker.structures import attach_labels, read_structures, write_extxyz
from pyacemaker.v1 import common_pb2, trainer_pb2

EXPORT_DIR = BASE_ACE_DIR
POTENTIAL_FILES = {".yaml": "yaml", ".yace": "yace", ".asi": "asi", ".json": "metrics"}
# Step 6's output: the committee-labelled DFT structures (a shard of the base's training data).
DFT_STRUCTURES_OUTPUT = "dft_structures"
# Step 6's output (and the trainer's artifact kind): the base fit's normal equations, for the refits of step 6b.
NORMAL_EQUATIONS_OUTPUT = "normal_equations"
# info entries of those frames: each its own cross-validation group, and where it comes from.
DFT_STRUCTURES_SOURCE = "dft_structures"


def surrogate_shards(ctx: StepContext) -> list[common_pb2.ArtifactRef]:
    """Step 5's labelled shards, in order."""
    outputs = ctx.previous[StepName.SURROGATE_LABELLING]
    return [outputs[name] for name in sorted(outputs) if name.startswith("shard_")]


def base_shards(ctx: StepContext) -> list[common_pb2.ArtifactRef]:
    """The base fit's training shards once step 6 ran: step 5's plus the committee-labelled DFT structures
    (the student refinement's refits start from these)."""
    extra = base_potential(ctx).dft_structures if has_run(ctx, AceFitStep.name) else None
    return [*surrogate_shards(ctx), *([extra] if extra is not None else [])]


def committee_labelled_dft_structures(ctx: StepContext) -> tuple[list[Atoms], int]:
    """The DFT training structures (step 2's set, isolated atoms left out) with the fine-tuned committee's labels
    instead of DFT's, and how many were left out for committee forces above active_learning.max_candidate_force."""
    structures = [
        Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        for atoms in read_structures(ctx.store.path(dft_set(ctx).dft))
        if len(atoms) > 1
    ]
    if not structures:
        return [], 0
    labels = model_labels(
        ctx, committee_spec(ctx, committee_models(ctx)), structures, "committee labels of the DFT structures"
    )
    cap = ctx.config.active_learning.max_candidate_force
    frames: list[Atoms] = []
    for index, (atoms, label) in enumerate(zip(structures, labels, strict=True)):
        labelled = attach_labels(atoms, label)
        labelled.info.pop("wall_time_s", None)  # timing differs run to run; the shard's bytes must not
        if largest_atomic_force([labelled.get_forces()])[0] > cap:
            continue
        labelled.info["fit_group"] = f"{DFT_STRUCTURES_SOURCE}:{index}"
        labelled.info["source"] = DFT_STRUCTURES_SOURCE
        frames.append(labelled)
    return frames, len(structures) - len(frames)


def potential_outcome(job: common_pb2.Job, ctx: StepContext, stem: str, export_dir: str) -> StepOutcome:
    """A fit's files as step outputs (yaml, yace, asi, metrics) and exports (<stem>.yace, ..., and the pacemaker
    export of a linear fit in pacemaker/)."""
    by_suffix = outputs_by_suffix(job)
    missing = [suffix for suffix in (".yaml", ".yace", ".asi") if suffix not in by_suffix]
    if missing:
        raise RuntimeError(f"trainer job {job.job_id} returned no {', '.join(missing)} file")
    outputs = {POTENTIAL_FILES[suffix]: ref for suffix, ref in by_suffix.items() if suffix in POTENTIAL_FILES}
    for ref in job.outputs:
        if ref.kind == NORMAL_EQUATIONS_OUTPUT:
            outputs[NORMAL_EQUATIONS_OUTPUT] = ref
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
    name = StepName.ACE_FIT
    version = 2

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "shards": [ref.sha256 for ref in surrogate_shards(ctx)],
            "e0s": dft_set(ctx).iteration.sha256,
            "ace": ctx.config.ace.model_dump(mode="json", exclude={"delta_surrogate_weight"}),
            "dft": dft_set(ctx).dft.sha256,
            "committee": [ref.sha256 for ref in committee_models(ctx)],
            "max_candidate_force": ctx.config.active_learning.max_candidate_force,
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        frames, too_violent = committee_labelled_dft_structures(ctx)
        shards = surrogate_shards(ctx)
        extra: dict[str, common_pb2.ArtifactRef] = {}
        if frames:
            path = ctx.store.new_tempfile(".extxyz")
            write_extxyz(path, frames)
            extra[DFT_STRUCTURES_OUTPUT] = ctx.store.put_file(path, kind="structures", move=True)
            shards = [*shards, extra[DFT_STRUCTURES_OUTPUT]]
        spec = base_fit_spec(ctx, shards)
        # The refinement's refits add frames to this fit on its basis and start from its normal equations; the
        # delta fit takes its anchor's Gram matrices from them.
        spec.keep_normal_equations = spec.model_kind == "linear"
        job = run_trainer_job(ctx, trainer_pb2.StartJobRequest(ace_fit=spec), "base ACE fit on the surrogate set")
        outcome = potential_outcome(job, ctx, "base", EXPORT_DIR)
        outcome.outputs.update(extra)
        if extra:
            outcome.exports[f"{ctx.export_prefix}{EXPORT_DIR}/dft_structures_committee.extxyz"] = extra[
                DFT_STRUCTURES_OUTPUT
            ]
        outcome.metrics["dft_structures_count"] = float(len(frames))
        outcome.metrics["dft_structures_left_out_count"] = float(too_violent)
        return outcome


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
        stress_weight=settings.stress_weight,
    )
