"""Validation, the loop's judge: the final ACE (and, for comparison, the teacher and the base ACE) against DFT
labels of a hold-out set the potential never saw.

The hold-out is drawn once, in iteration 1, labelled by DFT through the budget ledger, and reused by later
iterations so their figures compare; step 2 keeps its share of the budget free until then. It has two sources,
scored apart as well as together: frames of step 4's surrogate MD (the states the pipeline trained on) and,
validation.external_fraction of it, frames of an MD the pipeline does not fit to: the teacher's, along the same
restraint windows, with another random seed and up to 1.25 × the highest md temperature. A hold-out drawn only
from the training distribution flatters the potential (measured on the SN2 flagship: 96 meV/Å on its own frames,
catastrophic on independent ones).

MD stability: the final ACE runs short MDs from every seed at each temperature (validation.md_stability); an
iteration that loses a run never meets the target and is never the run's best (pyacemaker.services.orchestrator.runner).

The ablation: the same ACE (the run's `ace` settings and the base's cutoff, through the same trainer fit) fitted
directly on the iteration's DFT training labels only — no teacher, no surrogate data — is scored beside the teacher,
the fine-tuned committee, the base and the final ACE. Its figures say whether the distillation earns its place.

Energies are compared per atom on the DFT level's reference. The ACE models sit on it (they were fitted to labels
on it); the teacher and the fine-tuned committee, MACE models with their own energy zero (a fine-tuning keeps the
teacher's atomic energies), are aligned to it by per-element energy shifts fitted on the hold-out (for one
stoichiometry, a single constant), so their figures measure their energy differences only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from pyacemaker.clients.oracle import artifact_option, backend_spec
from pyacemaker.clients.oracle_force_field import OracleForceField
from pyacemaker.clients.sampler import md_request, run_md
from pyacemaker.rpc import channel
from pyacemaker.run_layout import VALIDATION_DIR, StepName
from pyacemaker.run_records import (
    Ablation,
    DistillationGain,
    EnergyProfile,
    HoldoutReference,
    MdStability,
    ModelScores,
    SourceScores,
    ValidationRecord,
    ValidationTarget,
    record_text,
)
from pyacemaker.services.orchestrator.dft_labels import DftLabeller, label_frames, oracle_spec
from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.services.orchestrator.md_stability import (
    StabilityRun,
    TrajectoryJudge,
    seed_fragments,
    stability_summary,
)
from pyacemaker.services.orchestrator.model_labels import model_labels
from pyacemaker.services.orchestrator.reaction_profile import central_barrier_kcal, relaxed_scan, xi_of
from pyacemaker.services.orchestrator.state import STATE_FILE
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.ace_fit import POTENTIAL_FILES
from pyacemaker.services.orchestrator.steps.mace_finetune import (
    committee_models,
    committee_spec,
    dft_reference_energies,
    teacher_model,
)
from pyacemaker.services.orchestrator.steps.outputs import (
    base_fit_metric,
    base_potential,
    dft_set,
    final_potential,
    last_validation,
    surrogate_md_outputs,
)
from pyacemaker.services.orchestrator.steps.surrogate_md import md_config, run_committee_md
from pyacemaker.services.orchestrator.trainer_jobs import outputs_by_suffix, run_trainer_job
from pyacemaker.structures import (
    LEVEL_KEY,
    atoms_to_structure,
    iter_extxyz,
    read_structures,
    structure_to_atoms,
    write_extxyz,
)
from pyacemaker.v1 import common_pb2, trainer_pb2

EXPORT_DIR = VALIDATION_DIR
# teacher: the MACE the run distils; committee: the fine-tuned MACE committee (step 3); base_ace / final_ace:
# steps 6 and 7; direct_ace: the ablation, the same ACE fitted on the DFT training labels alone.
MODELS = ("teacher", "committee", "base_ace", "final_ace", "direct_ace")
ABLATION_STEM = "direct_ace"
# Models whose energies are aligned to the reference's zero before scoring (see the module docstring).
ALIGNED_MODELS = ("teacher", "committee")
# Where a hold-out structure comes from (atoms.info key, and the per-source figures' keys).
SOURCE_KEY = "holdout_source"
SURROGATE_SOURCE, EXTERNAL_SOURCE = "surrogate_md", "teacher_md"
# The independent MD reaches this many times the highest md temperature.
EXTERNAL_TEMPERATURE_MARGIN = 1.25


def rmse(predicted: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(predicted) - np.asarray(reference)) ** 2)))


def model_scores(
    energies: np.ndarray, forces: np.ndarray, ref_energies: np.ndarray, ref_forces: np.ndarray
) -> ModelScores:
    """RMSEs (energy per atom in meV/atom, force components in meV/Å) plus the values for parity plots."""
    return ModelScores(
        energy_rmse_mev_per_atom=1000.0 * rmse(energies, ref_energies),
        forces_rmse_mev_per_a=1000.0 * rmse(forces, ref_forces),
        energy_per_atom_ev=energies.tolist(),
        forces_ev_per_a=forces.tolist(),
    )


def target_met(scores: ModelScores, energy_target: float, forces_target: float) -> bool:
    return scores.energy_rmse_mev_per_atom <= energy_target and scores.forces_rmse_mev_per_a <= forces_target


class ValidationStep:
    name = StepName.VALIDATION
    version = 5

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        previous = last_validation(ctx)
        held_out = previous.holdout.sha256 if previous is not None else ""
        base, final = base_potential(ctx), final_potential(ctx)
        return {
            "iteration": ctx.iteration,
            "previous_holdout": held_out,
            "frames": surrogate_md_outputs(ctx).frames.sha256,
            "base": base.yace.sha256,
            "final": final.yace.sha256,
            "final_active_set": final.asi.sha256 if final.asi is not None else "",
            "committee": {k: v.sha256 for k, v in ctx.previous[StepName.MACE_FINETUNE].items()},
            "e0s": dft_set(ctx).iteration.sha256,
            # The ablation's inputs: the DFT training set, the ACE settings and the base fit's (cutoff) record.
            "dft": dft_set(ctx).dft.sha256,
            "ace": ctx.config.ace.model_dump(mode="json", exclude={"delta_surrogate_weight"}),
            "base_metrics": base.metrics.sha256 if base.metrics is not None else "",
            # Not max_iterations: it decides how many iterations run, not how one is validated, and raising it to
            # continue a finished run must not redo the validations (and, through their records, what follows).
            "validation": ctx.config.validation.model_dump(mode="json", exclude={"max_iterations"}),
            # The independent hold-out MD and the stability MD follow the md section and the seeds.
            "md": md_config(ctx).model_dump(mode="json"),
            "seeds": [seed.content_id for seed in ctx.seeds],
            "oracle": ctx.config.oracle.model_dump(mode="json"),
            "budget": ctx.config.budget.max_dft_calls,
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        settings = ctx.config.validation
        ledger = DftLedger(ctx.run_dir / STATE_FILE)
        try:
            dft = DftLabeller(
                ledger, ctx.oracle_address, oracle_spec(ctx.config.oracle, ctx.store), ctx.config.budget.max_dft_calls
            )
            if (previous := last_validation(ctx)) is not None:
                holdout = read_structures(ctx.store.path(previous.holdout))
            else:
                holdout = label_frames(dft, _draw_holdout(ctx), ctx.report, "DFT labels of the hold-out set")
            path = _profile_path(ctx, dft)
            dft_calls = ledger.count()
        finally:
            ledger.close()
        if len(holdout) < 2:
            raise RuntimeError(
                f"only {len(holdout)} hold-out structures have DFT labels; validation needs at least 2 "
                "(raise budget.max_dft_calls or check the oracle's failures in the run's events)"
            )
        ablation = fit_direct_ace(ctx)
        n_atoms = np.array([len(a) for a in holdout], dtype=float)
        ref_energies = np.array([a.get_potential_energy() for a in holdout]) / n_atoms
        ref_forces = np.concatenate([a.get_forces() for a in holdout])
        sources = np.array([str(a.info.get(SOURCE_KEY, SURROGATE_SOURCE)) for a in holdout])
        atom_sources = np.repeat(sources, n_atoms.astype(int))
        scores: dict[str, ModelScores] = {}
        profile: EnergyProfile | None = None
        if path:
            profile = EnergyProfile(
                xi_a=[xi_of(a, _profile_atoms(ctx)) for a in path],
                energies_ev={"dft": _relative([a.get_potential_energy() for a in path])},
            )
        for model, spec in _model_specs(ctx, ablation.potential).items():
            labels = model_labels(ctx, spec, holdout, f"{model} on the hold-out set")
            energies = np.array([lab.required_energy() for lab in labels])
            if model in ALIGNED_MODELS:
                # A MACE's energy zero is its own; only its energy differences compare.
                energies = energies + reference_alignment(holdout, energies, ref_energies * n_atoms)
            forces = np.concatenate([lab.required_forces() for lab in labels])
            scores[model] = model_scores(energies / n_atoms, forces, ref_energies, ref_forces)
            scores[model].by_source = {
                src: SourceScores(
                    n=int(np.count_nonzero(sources == src)),
                    energy_rmse_mev_per_atom=1000.0
                    * rmse((energies / n_atoms)[sources == src], ref_energies[sources == src]),
                    forces_rmse_mev_per_a=1000.0 * rmse(forces[atom_sources == src], ref_forces[atom_sources == src]),
                )
                for src in sorted(set(sources))
            }
            if profile is not None:
                on_path = model_labels(ctx, spec, path, f"{model} along the reaction path")
                profile.energies_ev[model] = _relative([lab.required_energy() for lab in on_path])
        for model, outputs in (("final_ace", final_potential(ctx).files()), (ABLATION_STEM, ablation.files)):
            if model in scores and "yaml" in outputs and "asi" in outputs:
                grades = extrapolation_grades(ctx, outputs["yaml"], outputs["asi"], holdout, model)
                scores[model].max_gamma_per_structure = grades.tolist()
                scores[model].max_gamma = float(grades.max())
                scores[model].max_gamma_by_source = {
                    src: float(grades[sources == src].max()) for src in sorted(set(sources))
                }
        if profile is not None:
            profile.central_barrier_kcal_per_mol = {
                model: central_barrier_kcal(values) for model, values in profile.energies_ev.items()
            }
        stability = final_md_stability(ctx)
        stable = stability is None or stability.n_survivors == stability.n_runs
        met = stable and target_met(
            scores["final_ace"], settings.target_energy_mev_per_atom, settings.target_forces_mev_per_a
        )
        record = ValidationRecord(
            iteration=ctx.iteration,
            level_of_theory=holdout[0].info.get(LEVEL_KEY, ctx.config.oracle.backend),
            n_holdout=len(holdout),
            n_holdout_by_source={src: int(np.count_nonzero(sources == src)) for src in sorted(set(sources))},
            holdout_sources=sources.tolist(),
            dft_calls_total=dft_calls,
            dft_budget=ctx.config.budget.max_dft_calls,
            target=ValidationTarget(
                energy_mev_per_atom=settings.target_energy_mev_per_atom,
                forces_mev_per_a=settings.target_forces_mev_per_a,
            ),
            target_met=met,
            reference=HoldoutReference(energy_per_atom_ev=ref_energies.tolist(), forces_ev_per_a=ref_forces.tolist()),
            models=scores,
            profile=profile,
            md_stability=stability,
            ablation=Ablation(
                model=ABLATION_STEM,
                trained_on="the iteration's DFT training labels only (no teacher, no surrogate data)",
                n_training_structures=ablation.n_training,
                fit=ablation.metrics,
                error=ablation.error,
                gain=distillation_gain(_flat_metrics(scores, profile)),
            ),
        )
        holdout_file = ctx.store.new_tempfile(".extxyz")
        write_extxyz(holdout_file, holdout)
        holdout_ref = ctx.store.put_file(holdout_file, kind="structures", move=True)
        record_ref = ctx.store.put_bytes(record_text(record).encode(), kind="validation", suffix=".json")
        metrics = {"target_met": float(met), "dft_calls_total": float(dft_calls), "n_holdout": float(len(holdout))}
        metrics.update(_flat_metrics(scores, profile))
        if stability is not None:
            metrics["final_ace_md_survivors"] = float(stability.n_survivors)
            metrics["final_ace_md_runs"] = float(stability.n_runs)
        exports = {
            f"{ctx.export_prefix}{EXPORT_DIR}/validation.json": record_ref,
            f"{ctx.export_prefix}{EXPORT_DIR}/holdout.extxyz": holdout_ref,
        }
        outputs = {"holdout": holdout_ref, "validation": record_ref}
        for name, ref in ablation.files.items():
            outputs[f"{ABLATION_STEM}_{name}"] = ref
            if name in ("yaml", "yace", "asi"):
                exports[f"{ctx.export_prefix}{EXPORT_DIR}/{ABLATION_STEM}.{name}"] = ref
        if path:
            path_file = ctx.store.new_tempfile(".extxyz")
            write_extxyz(path_file, path)
            outputs["profile"] = ctx.store.put_file(path_file, kind="structures", move=True)
            exports[f"{ctx.export_prefix}{EXPORT_DIR}/profile.extxyz"] = outputs["profile"]
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def _draw_holdout(ctx: StepContext) -> list[Atoms]:
    """validation.holdout_size structures, never one already in the DFT set: external_fraction of them from
    the independent teacher MD, the rest surrogate-MD frames, each at random (seeded), tagged with their source."""
    settings = ctx.config.validation
    n_external = round(settings.holdout_size * settings.external_fraction)
    surrogate_frames = ctx.store.path(surrogate_md_outputs(ctx).frames)
    drawn = _draw_frames(ctx, surrogate_frames, settings.holdout_size - n_external)
    for atoms in drawn:
        atoms.info[SOURCE_KEY] = SURROGATE_SOURCE
    if n_external:
        external = _draw_frames(ctx, ctx.store.path(independent_md_frames(ctx, n_external)), n_external)
        for atoms in external:
            atoms.info[SOURCE_KEY] = EXTERNAL_SOURCE
        drawn += external
    trained = {atoms_to_structure(a).content_id for a in read_structures(ctx.store.path(dft_set(ctx).dft))}
    return [a for a in drawn if atoms_to_structure(a).content_id not in trained]


def _draw_frames(ctx: StepContext, frames_path: Any, size: int) -> list[Atoms]:
    """`size` frames of an extxyz file at random (seeded), without their MD labels; the file is streamed twice
    (count, then pick), so its size does not matter."""
    n_frames = sum(1 for _ in iter_extxyz(frames_path))
    size = min(size, n_frames)
    rng = np.random.default_rng(ctx.config.validation.random_seed)
    wanted = set(rng.choice(n_frames, size=size, replace=False).tolist())
    drawn = [a for i, a in enumerate(iter_extxyz(frames_path)) if i in wanted]
    for atoms in drawn:
        atoms.calc = None  # the MD's own labels must not pass for DFT labels
    return drawn


def independent_md_frames(ctx: StepContext, n_wanted: int) -> common_pb2.ArtifactRef:
    """Frames of an MD the pipeline does not fit to: the teacher (never the fine-tuned committee) along the md
    section's ξ range (max(3, n_wanted) windows at most), one replica per window and temperature, the md
    temperatures plus EXTERNAL_TEMPERATURE_MARGIN × the highest, half md.steps, another random seed than step 4's
    and iteration 1's MD."""
    md = md_config(ctx)
    hottest = EXTERNAL_TEMPERATURE_MARGIN * max(md.temperatures)
    temperatures = sorted({*md.temperatures, float(round(hottest))})
    # Only a few frames are wanted: a coarser set of windows over the same ξ range and half the steps keep this
    # MD a fraction of step 4's (measured on the quick config: 96 s with every window and all the steps).
    windows = md.windows
    if windows is not None:
        windows = windows.model_copy(update={"count": min(windows.count, max(3, n_wanted))})
    assert md.steps is not None
    config = md.model_copy(
        update={
            "temperatures": temperatures,
            "replicas": len(temperatures),
            "windows": windows,
            "steps": max(md.save_interval * 4, md.steps // 2),
            "random_seed": md.random_seed + 2,
            "n_frames": max(10 * n_wanted, 20),
            "frame_selection": "stride",
        }
    )
    result, _ = run_committee_md(ctx, [teacher_model(ctx)], config)
    return result.selected


def final_md_stability(ctx: StepContext) -> MdStability | None:
    """validation.md_stability: the final ACE's MD from every seed at each temperature through the sampler (plain
    MD, no restraint), each run judged by a `TrajectoryJudge` on its saved frames and by the sampler's own stops.
    None when md_stability.steps is 0."""
    settings = ctx.config.validation.md_stability
    if settings.steps == 0:
        return None
    md = md_config(ctx)
    temperatures = list(settings.temperatures or md.temperatures)
    n_seeds = len(ctx.seeds)
    config = md.model_copy(
        update={
            "temperatures": temperatures,
            "steps": settings.steps,
            "replicas": n_seeds * len(temperatures) * settings.runs_per_seed,
            "save_interval": max(1, settings.steps // 50),
            "windows": None,
            "min_distance": settings.min_distance,
            "n_frames": 1,
            "frame_selection": "stride",
            "random_seed": md.random_seed + 3,
        }
    )
    # In the oracle's own process: without an active set a structure costs well under a millisecond, and worker
    # processes made the 9 replicas slower (833 against 1185 replica-steps/s on the flagship, 2 cores).
    spec = backend_spec("ace", {"potential": artifact_option(final_potential(ctx).yace)})
    request = md_request(ctx.seeds, config, ctx.oracle_address, spec)
    runs = [
        StabilityRun(seed=r % n_seeds, temperature_k=temperatures[(r // n_seeds) % len(temperatures)], steps_done=0)
        for r in range(config.replicas)
    ]
    allowed = seed_fragments([structure_to_atoms(seed) for seed in ctx.seeds])
    judges = [
        TrajectoryJudge(allowed, run.temperature_k, settings.min_distance, settings.max_neighbour_distance)
        for run in runs
    ]
    ctx.report(common_pb2.Progress(stage="md_stability", total=settings.steps, message="final ACE MD stability"))
    stopped: set[int] = set()
    with channel(ctx.sampler_address) as ch:
        for event in run_md(ch, request, timeout=ctx.call_timeout_s):
            if event.HasField("progress"):
                ctx.report(event.progress)
            elif event.HasField("frame"):
                frame = event.frame
                run = runs[frame.replica]
                run.steps_done = max(run.steps_done, int(frame.step))
                energy = frame.labels.energy if frame.labels.HasField("energy") else float("nan")
                if run.problem is not None:
                    continue
                atoms = structure_to_atoms(frame.structure)
                problem = judges[frame.replica].judge(atoms, energy, frame.step * md.timestep_fs)
                if problem is not None:
                    run.problem = f"step {frame.step}: {problem}"
            elif event.HasField("stopped"):
                run = runs[event.stopped.replica]
                stopped.add(event.stopped.replica)
                run.steps_done = int(event.stopped.step)
                run.problem = run.problem or f"step {event.stopped.step}: {event.stopped.reason}"
    for index, run in enumerate(runs):
        if index not in stopped and run.problem is None:
            run.steps_done = settings.steps
        run.dissociation = judges[index].dissociation
    return stability_summary(runs, settings.steps, md.timestep_fs)


def _profile_atoms(ctx: StepContext) -> tuple[int, int, int]:
    assert ctx.config.validation.profile is not None
    return ctx.config.validation.profile.atoms


def _profile_path(ctx: StepContext, dft: DftLabeller) -> list[Atoms]:
    """The reaction path with DFT labels: relaxed with the step-3 committee and labelled in iteration 1, reused
    afterwards. Empty when no profile is configured; points whose DFT failed are left out."""
    settings = ctx.config.validation.profile
    if settings is None:
        return []
    previous = last_validation(ctx)
    if previous is not None and previous.profile is not None:
        return read_structures(ctx.store.path(previous.profile))
    if max(settings.atoms) >= min(len(seed.atomic_numbers) for seed in ctx.seeds):
        raise ValueError(f"validation.profile.atoms {list(settings.atoms)} are out of range for the seeds")
    seeds = [structure_to_atoms(seed) for seed in ctx.seeds]
    committee = committee_spec(ctx, committee_models(ctx))

    def progress(done: int, total: int) -> None:
        ctx.report(common_pb2.Progress(stage="scan", done=done, total=total, message="relaxed scan along ξ"))

    with channel(ctx.oracle_address) as ch:
        path = relaxed_scan(OracleForceField(ch, committee), seeds, settings.atoms, settings.centers(), progress)
    return label_frames(dft, path, ctx.report, "DFT along the reaction path")


def _relative(energies: list[float]) -> list[float]:
    """Energies relative to the profile's lowest point, eV (each model's own zero: only differences count)."""
    values = np.asarray(energies, dtype=float)
    return (values - values.min()).tolist()


def _model_specs(ctx: StepContext, ablation: common_pb2.ArtifactRef | None) -> dict[str, Any]:
    specs = {
        "teacher": committee_spec(ctx, [teacher_model(ctx)]),
        "committee": committee_spec(ctx, committee_models(ctx)),
        "base_ace": backend_spec("ace", {"potential": artifact_option(base_potential(ctx).yace)}),
        "final_ace": backend_spec("ace", {"potential": artifact_option(final_potential(ctx).yace)}),
    }
    if ablation is not None:
        specs[ABLATION_STEM] = backend_spec("ace", {"potential": artifact_option(ablation)})
    return specs


@dataclass
class DirectFit:
    """The ablation's potential (None when it could not be fitted, with the reason in `error`)."""

    potential: common_pb2.ArtifactRef | None
    files: dict[str, common_pb2.ArtifactRef]
    metrics: dict[str, float]
    n_training: int
    error: str = ""


def fit_direct_ace(ctx: StepContext) -> DirectFit:
    """The ablation: the run's ACE fitted by the trainer, exactly as step 6 fits the base (same `ace` settings,
    same code path, same reference energies), with the base's cutoff, on the iteration's DFT training labels
    alone. An explicit ace.basis_size is kept; an inferred one follows the same rule from this (much smaller)
    set, since a basis as large as the base's would leave a fit on a few dozen structures under-determined.
    A fit the trainer refuses (too few structures for the configured basis) is recorded, not fatal: the run's
    own potential stands without its ablation."""
    settings = ctx.config.ace
    dft_ref = dft_set(ctx).dft
    n_training = sum(1 for _ in iter_extxyz(ctx.store.path(dft_ref)))
    spec = trainer_pb2.AceFitSpec(
        train_data=[dft_ref],
        cutoff=settings.cutoff or _base_cutoff(ctx),
        basis_size=settings.basis_size,
        model_kind=settings.model_kind,
        e0s=[trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in dft_reference_energies(ctx).items()],
        random_seed=settings.random_seed,
        stress_weight=settings.stress_weight,
    )
    try:
        job = run_trainer_job(
            ctx, trainer_pb2.StartJobRequest(ace_fit=spec), "ablation: the ACE fitted on the DFT labels alone"
        )
    except RuntimeError as exc:
        return DirectFit(None, {}, {}, n_training, str(exc))
    by_suffix = outputs_by_suffix(job)
    files = {POTENTIAL_FILES[suffix]: ref for suffix, ref in by_suffix.items() if suffix in POTENTIAL_FILES}
    if "yace" not in files:
        return DirectFit(None, files, dict(job.metrics), n_training, f"trainer job {job.job_id} returned no .yace")
    return DirectFit(files["yace"], files, dict(job.metrics), n_training)


def _base_cutoff(ctx: StepContext) -> float:
    """The cutoff step 6 used (its metrics record), 0 (inferred again, by the same rule) when it has none."""
    return base_fit_metric(ctx, "cutoff_a") or 0.0


def extrapolation_grades(
    ctx: StepContext,
    yaml_ref: common_pb2.ArtifactRef,
    asi_ref: common_pb2.ArtifactRef,
    frames: list[Atoms],
    model: str,
) -> np.ndarray:
    """Per structure, the largest per-atom extrapolation grade γ of an ACE (its .yaml with its active set .asi),
    computed by the oracle's ace backend: below 1 interpolation, above a few the potential extrapolates."""
    spec = backend_spec(
        "ace",
        {"potential": artifact_option(yaml_ref), "active_set": artifact_option(asi_ref)},
    )
    labels = model_labels(ctx, spec, frames, f"extrapolation grade of the {model} on the hold-out set")
    return np.array([lab.uncertainty.max_extrapolation_grade for lab in labels])


def _flat_metrics(scores: dict[str, ModelScores], profile: EnergyProfile | None) -> dict[str, float]:
    """The step's metrics: <model>_energy_rmse_mev_per_atom, <model>_forces_rmse_mev_per_a and, with a profile,
    <model>_barrier_kcal_per_mol (dft_barrier_kcal_per_mol the reference)."""
    metrics: dict[str, float] = {}
    for model, figures in scores.items():
        metrics[f"{model}_energy_rmse_mev_per_atom"] = figures.energy_rmse_mev_per_atom
        metrics[f"{model}_forces_rmse_mev_per_a"] = figures.forces_rmse_mev_per_a
        if figures.max_gamma is not None:
            metrics[f"{model}_max_gamma"] = figures.max_gamma
    if profile is not None:
        for model, barrier in profile.central_barrier_kcal_per_mol.items():
            metrics[f"{model}_barrier_kcal_per_mol"] = barrier
    return metrics


def best_iteration(metrics_by_iteration: dict[int, dict[str, float]]) -> int:
    """From each validated iteration's metrics, the one to hand out: the largest share of surviving stability MD
    runs first (an unstable potential is never best while a stabler one exists), then the lowest hold-out force
    RMSE of the final ACE; 0 when none was scored."""
    scored = []
    for iteration, metrics in metrics_by_iteration.items():
        if "final_ace_forces_rmse_mev_per_a" not in metrics:
            continue
        runs = metrics.get("final_ace_md_runs", 0.0)
        surviving = metrics.get("final_ace_md_survivors", 0.0) / runs if runs else 1.0
        scored.append((-surviving, metrics["final_ace_forces_rmse_mev_per_a"], iteration))
    return min(scored)[2] if scored else 0


def handed_out_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The final ACE's figures from one validation's metrics (hold-out RMSEs, barrier and its DFT reference)."""
    keys = (
        "final_ace_energy_rmse_mev_per_atom",
        "final_ace_forces_rmse_mev_per_a",
        "final_ace_barrier_kcal_per_mol",
        "dft_barrier_kcal_per_mol",
        "final_ace_md_survivors",
        "final_ace_md_runs",
        "final_ace_max_gamma",
        "n_holdout",
    )
    return {key.removeprefix("final_ace_"): metrics[key] for key in keys if key in metrics}


def distillation_gain(metrics: dict[str, float]) -> DistillationGain | None:
    """What the distillation (teacher, surrogate data, delta learning) gains over the ablation, from one
    validation's metrics: final / direct RMSE ratios (below 1: the distillation earns its place) and both
    potentials' central-barrier errors against DFT. None when the ablation was not scored."""
    needed = ("final_ace", "direct_ace")
    if any(f"{m}_forces_rmse_mev_per_a" not in metrics for m in needed):
        return None

    def ratio(quantity: str) -> float:
        direct = metrics[f"direct_ace_{quantity}"]
        return metrics[f"final_ace_{quantity}"] / direct if direct > 0 else float("inf")

    gain = DistillationGain(
        forces_rmse_ratio_final_over_direct=ratio("forces_rmse_mev_per_a"),
        energy_rmse_ratio_final_over_direct=ratio("energy_rmse_mev_per_atom"),
        final_ace_forces_rmse_mev_per_a=metrics["final_ace_forces_rmse_mev_per_a"],
        direct_ace_forces_rmse_mev_per_a=metrics["direct_ace_forces_rmse_mev_per_a"],
        final_ace_energy_rmse_mev_per_atom=metrics["final_ace_energy_rmse_mev_per_atom"],
        direct_ace_energy_rmse_mev_per_atom=metrics["direct_ace_energy_rmse_mev_per_atom"],
    )
    if "dft_barrier_kcal_per_mol" in metrics:
        dft = metrics["dft_barrier_kcal_per_mol"]
        gain.barrier_error_kcal_per_mol = {
            model: abs(metrics[f"{model}_barrier_kcal_per_mol"] - dft)
            for model in needed
            if f"{model}_barrier_kcal_per_mol" in metrics
        }
    return gain


def reference_alignment(frames: list[Atoms], model_energies: np.ndarray, reference_energies: np.ndarray) -> np.ndarray:
    """Per-frame shifts Σ_atoms δ_Z that move a model from another level of theory onto the reference's energy
    zero, with the per-element δ_Z fitted by least squares on these frames (minimum norm when the compositions
    cannot tell the elements apart, as with a single stoichiometry: then it is one constant offset)."""
    elements = sorted({int(z) for a in frames for z in a.numbers})
    counts = np.array([[np.count_nonzero(a.numbers == z) for z in elements] for a in frames], dtype=float)
    deltas, *_ = np.linalg.lstsq(counts, reference_energies - model_energies, rcond=None)
    return counts @ deltas
