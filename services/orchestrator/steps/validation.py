"""Validation, the loop's judge: the final ACE (and, for comparison, the teacher and the base ACE) against DFT
labels of a hold-out set the potential never saw.

The hold-out is drawn once, in iteration 1, at random from the surrogate-MD frames (the states the potential
will actually be used in), labelled by DFT through the budget ledger, and reused by later iterations so their
figures compare. Step 2 keeps its share of the budget free until then.

Energies are compared per atom on the DFT level's reference. The ACE models sit on it (they were fitted to
labels on it); the teacher, trained at another level, is aligned to it by per-element energy shifts fitted on the
hold-out (for one stoichiometry, a single constant), so its figure measures its energy differences only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from ase import Atoms

from pyacemaker.rpc import channel
from pyacemaker.structures import (
    LEVEL_KEY,
    atoms_to_structure,
    iter_extxyz,
    read_structures,
    structure_to_atoms,
    write_extxyz,
)
from pyacemaker.v1 import common_pb2
from services.oracle.client import artifact_option, backend_spec
from services.oracle.force_field import OracleForceField
from services.orchestrator.dft_labels import DftLabeller, label_frames, oracle_spec
from services.orchestrator.ledger import DftLedger
from services.orchestrator.model_labels import model_labels
from services.orchestrator.reaction_profile import central_barrier_kcal, relaxed_scan, xi_of
from services.orchestrator.state import STATE_FILE
from services.orchestrator.steps import StepContext, StepOutcome
from services.orchestrator.steps.mace_finetune import committee_models, committee_spec, teacher_model

EXPORT_DIR = "validation"
MODELS = ("teacher", "base_ace", "final_ace")


def rmse(predicted: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(predicted) - np.asarray(reference)) ** 2)))


def model_scores(
    energies: np.ndarray, forces: np.ndarray, ref_energies: np.ndarray, ref_forces: np.ndarray
) -> dict[str, Any]:
    """RMSEs (energy per atom in meV/atom, force components in meV/Å) plus the values for parity plots."""
    return {
        "energy_rmse_mev_per_atom": 1000.0 * rmse(energies, ref_energies),
        "forces_rmse_mev_per_a": 1000.0 * rmse(forces, ref_forces),
        "energy_per_atom_ev": energies.tolist(),
        "forces_ev_per_a": forces.tolist(),
    }


def target_met(scores: dict[str, Any], energy_target: float, forces_target: float) -> bool:
    return scores["energy_rmse_mev_per_atom"] <= energy_target and scores["forces_rmse_mev_per_a"] <= forces_target


class ValidationStep:
    name = "validation"
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        held_out = ctx.previous["validation"]["holdout"].sha256 if "validation" in ctx.previous else ""
        return {
            "iteration": ctx.iteration,
            "previous_holdout": held_out,
            "frames": ctx.previous["surrogate_md"]["frames"].sha256,
            "base": ctx.previous["ace_fit"]["yace"].sha256,
            "final": ctx.previous["delta_fit"]["yace"].sha256,
            "committee": {k: v.sha256 for k, v in ctx.previous["mace_finetune"].items()},
            "e0s": ctx.previous["active_learning"]["iteration"].sha256,
            "validation": ctx.config.validation.model_dump(mode="json"),
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
            if "validation" in ctx.previous:
                holdout = read_structures(ctx.store.path(ctx.previous["validation"]["holdout"]))
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
        n_atoms = np.array([len(a) for a in holdout], dtype=float)
        ref_energies = np.array([a.get_potential_energy() for a in holdout]) / n_atoms
        ref_forces = np.concatenate([a.get_forces() for a in holdout])
        scores = {}
        profile: dict[str, Any] | None = None
        if path:
            profile = {"xi_a": [xi_of(a, _profile_atoms(ctx)) for a in path], "energies_ev": {}}
            profile["energies_ev"]["dft"] = _relative([a.get_potential_energy() for a in path])
        for model, spec in _model_specs(ctx).items():
            labels = model_labels(ctx, spec, holdout, f"{model} on the hold-out set")
            energies = np.array([lab.energy for lab in labels])
            if model == "teacher":
                # The teacher's level of theory has its own energy zero; only its energy differences compare.
                energies = energies + reference_alignment(holdout, energies, ref_energies * n_atoms)
            forces = np.concatenate([np.reshape(lab.forces, (-1, 3)) for lab in labels])
            scores[model] = model_scores(energies / n_atoms, forces, ref_energies, ref_forces)
            if profile is not None:
                on_path = model_labels(ctx, spec, path, f"{model} along the reaction path")
                profile["energies_ev"][model] = _relative([lab.energy for lab in on_path])
        if profile is not None:
            profile["central_barrier_kcal_per_mol"] = {
                model: central_barrier_kcal(values) for model, values in profile["energies_ev"].items()
            }
        met = target_met(scores["final_ace"], settings.target_energy_mev_per_atom, settings.target_forces_mev_per_a)
        record = {
            "iteration": ctx.iteration,
            "level_of_theory": holdout[0].info.get(LEVEL_KEY, ctx.config.oracle.backend),
            "n_holdout": len(holdout),
            "dft_calls_total": dft_calls,
            "dft_budget": ctx.config.budget.max_dft_calls,
            "target": {
                "energy_mev_per_atom": settings.target_energy_mev_per_atom,
                "forces_mev_per_a": settings.target_forces_mev_per_a,
            },
            "target_met": met,
            "reference": {"energy_per_atom_ev": ref_energies.tolist(), "forces_ev_per_a": ref_forces.tolist()},
            "models": scores,
            "profile": profile,
        }
        holdout_file = ctx.store.new_tempfile(".extxyz")
        write_extxyz(holdout_file, holdout)
        holdout_ref = ctx.store.put_file(holdout_file, kind="structures", move=True)
        record_ref = ctx.store.put_bytes(json.dumps(record).encode(), kind="validation", suffix=".json")
        metrics = {"target_met": float(met), "dft_calls_total": float(dft_calls), "n_holdout": float(len(holdout))}
        for model, figures in scores.items():
            metrics[f"{model}_energy_rmse_mev_per_atom"] = figures["energy_rmse_mev_per_atom"]
            metrics[f"{model}_forces_rmse_mev_per_a"] = figures["forces_rmse_mev_per_a"]
        exports = {
            f"{ctx.export_prefix}{EXPORT_DIR}/validation.json": record_ref,
            f"{ctx.export_prefix}{EXPORT_DIR}/holdout.extxyz": holdout_ref,
        }
        outputs = {"holdout": holdout_ref, "validation": record_ref}
        if path:
            path_file = ctx.store.new_tempfile(".extxyz")
            write_extxyz(path_file, path)
            outputs["profile"] = ctx.store.put_file(path_file, kind="structures", move=True)
            exports[f"{ctx.export_prefix}{EXPORT_DIR}/profile.extxyz"] = outputs["profile"]
            for model, barrier in profile["central_barrier_kcal_per_mol"].items():  # type: ignore[index]
                metrics[f"{model}_barrier_kcal_per_mol"] = barrier
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def _draw_holdout(ctx: StepContext) -> list[Atoms]:
    """validation.holdout_size surrogate-MD frames at random (seeded), never one already in the DFT set;
    the frames file is streamed twice (count, then pick), so its size does not matter."""
    frames_path = ctx.store.path(ctx.previous["surrogate_md"]["frames"])
    n_frames = sum(1 for _ in iter_extxyz(frames_path))
    size = min(ctx.config.validation.holdout_size, n_frames)
    rng = np.random.default_rng(ctx.config.validation.random_seed)
    wanted = set(rng.choice(n_frames, size=size, replace=False).tolist())
    trained = {
        atoms_to_structure(a).content_id
        for a in read_structures(ctx.store.path(ctx.previous["active_learning"]["dft"]))
    }
    drawn = [a for i, a in enumerate(iter_extxyz(frames_path)) if i in wanted]
    for atoms in drawn:
        atoms.calc = None  # the MD's own labels must not pass for DFT labels
    return [a for a in drawn if atoms_to_structure(a).content_id not in trained]


def _profile_atoms(ctx: StepContext) -> tuple[int, int, int]:
    assert ctx.config.validation.profile is not None
    return ctx.config.validation.profile.atoms


def _profile_path(ctx: StepContext, dft: DftLabeller) -> list[Atoms]:
    """The reaction path with DFT labels: relaxed with the step-3 committee and labelled in iteration 1, reused
    afterwards. Empty when no profile is configured; points whose DFT failed are left out."""
    settings = ctx.config.validation.profile
    if settings is None:
        return []
    if "validation" in ctx.previous and "profile" in ctx.previous["validation"]:
        return read_structures(ctx.store.path(ctx.previous["validation"]["profile"]))
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


def _model_specs(ctx: StepContext) -> dict[str, Any]:
    return {
        "teacher": committee_spec(ctx, [teacher_model(ctx)]),
        "base_ace": backend_spec("ace", {"potential": artifact_option(ctx.previous["ace_fit"]["yace"])}),
        "final_ace": backend_spec("ace", {"potential": artifact_option(ctx.previous["delta_fit"]["yace"])}),
    }


def reference_alignment(frames: list[Atoms], model_energies: np.ndarray, reference_energies: np.ndarray) -> np.ndarray:
    """Per-frame shifts Σ_atoms δ_Z that move a model from another level of theory onto the reference's energy
    zero, with the per-element δ_Z fitted by least squares on these frames (minimum norm when the compositions
    cannot tell the elements apart, as with a single stoichiometry: then it is one constant offset)."""
    elements = sorted({int(z) for a in frames for z in a.numbers})
    counts = np.array([[np.count_nonzero(a.numbers == z) for z in elements] for a in frames], dtype=float)
    deltas, *_ = np.linalg.lstsq(counts, reference_energies - model_energies, rcond=None)
    return counts @ deltas
