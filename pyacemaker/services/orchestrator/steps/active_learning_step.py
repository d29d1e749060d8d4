"""Step 2, one active-learning iteration: a MACE committee scores the candidates, its spread is calibrated
against DFT labels, and the most uncertain, diverse candidates are labelled by DFT. Every DFT call goes through
the run's budget ledger.

Iteration 1: DFT labels for the DIRECT set, then a committee fine-tuned from the teacher on them; candidates
are the step-1 pool, plus the frames of a short MD with the teacher when active_learning.md_candidate_steps is set.
Later iterations: the committee is the previous iteration's step-3 committee (fine-tuned on every DFT label so
far), the labelled set is the DFT set so far, and the candidates are the pool plus the previous iteration's
surrogate-MD frames. MD frames are where the potential is actually used: measured on SN2, choosing among them
is what makes active selection beat random selection on MD frames (benchmarks/active_vs_random.py). Hold-out
structures are never candidates, and in iteration 1 the hold-out's share of the budget is kept free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms

from pyacemaker.clients.oracle import describe
from pyacemaker.config import MdConfig
from pyacemaker.rpc import channel
from pyacemaker.run_layout import ACTIVE_LEARNING_DIR, StepName
from pyacemaker.run_records import ActiveLearningRecord, record_text
from pyacemaker.services.orchestrator.active_learning import (
    below_force_cap,
    calibration_factor,
    candidate_force_cap,
    max_force_error,
    select_uncertain,
    within_energy_range,
    within_force_cap,
)
from pyacemaker.services.orchestrator.dft_labels import DftLabeller, isolated_atom_energies, label_frames, oracle_spec
from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.services.orchestrator.model_labels import model_labels
from pyacemaker.services.orchestrator.state import STATE_FILE
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.mace_finetune import (
    committee_models,
    committee_spec,
    finetune_committee,
    teacher_model,
)
from pyacemaker.services.orchestrator.steps.outputs import (
    dft_set,
    direct_sample,
    has_run,
    last_validation,
    surrogate_md_outputs,
)
from pyacemaker.services.orchestrator.steps.surrogate_md import md_config, run_committee_md
from pyacemaker.structures import atoms_to_structure, read_structures, write_extxyz
from pyacemaker.v1 import common_pb2

EXPORT_DIR = ACTIVE_LEARNING_DIR
# Surrogate-MD frames scored as candidates at most (evenly spaced), so scoring stays seconds, not hours.
MAX_MD_CANDIDATES = 5000


def holdout_reserve(ctx: StepContext) -> int:
    """DFT calls to keep free for validation (the hold-out and the profile points), until a validation has
    labelled them; later validations reuse them."""
    return 0 if has_run(ctx, StepName.VALIDATION) else ctx.config.validation.dft_labels()


class ActiveLearningStep:
    name = StepName.ACTIVE_LEARNING
    version = 5

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        config = ctx.config
        used = (StepName.MACE_FINETUNE, StepName.SURROGATE_MD, StepName.VALIDATION) if ctx.iteration > 1 else ()
        return {
            "iteration": ctx.iteration,
            "direct": {
                k: v.sha256 for k, v in ctx.previous[StepName.DIRECT_SAMPLING].items()
            },  # every output, as named
            "previous": {
                step: {k: v.sha256 for k, v in ctx.previous[step].items()} for step in used if step in ctx.previous
            },
            "previous_dft": dft_set(ctx).dft.sha256 if ctx.iteration > 1 else "",
            "oracle": config.oracle.model_dump(mode="json"),
            "active_learning": config.active_learning.model_dump(mode="json"),
            "mace_stress_weight": config.mace_finetune.stress_weight,  # the committee's fine-tuning fits stress
            # and takes mace's options (only when given, so that older runs keep their keys)
            **({"mace_extra_args": config.mace_finetune.extra_args} if config.mace_finetune.extra_args else {}),
            "budget": config.budget.model_dump(mode="json"),
            "holdout_reserve": holdout_reserve(ctx),
            "md_candidates": (md.model_dump(mode="json") if (md := md_candidate_config(ctx)) is not None else None),
            # Digest only: computing a key must not write into the store.
            "teacher": teacher_model(ctx).sha256,
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        settings = ctx.config.active_learning
        candidates, pool_size = _candidates(ctx)
        ledger = DftLedger(ctx.run_dir / STATE_FILE)
        try:
            allowance = ctx.config.budget.max_dft_calls - holdout_reserve(ctx)
            dft = DftLabeller(ledger, ctx.oracle_address, oracle_spec(ctx.config.oracle, ctx.store), allowance)
            e0s = isolated_atom_energies(
                dft,
                {int(z) for frame in candidates for z in frame.numbers},
                ctx.report,
                periodic=any(frame.pbc.any() for frame in candidates),
            )
            if ctx.iteration == 1:
                direct = read_structures(ctx.store.path(direct_sample(ctx).direct))
                labelled, too_hot = within_force_cap(
                    label_frames(dft, direct, ctx.report, "DFT labels of the DIRECT set"), settings.max_candidate_force
                )
                if len(labelled) < 2:
                    raise RuntimeError(
                        f"only {len(labelled)} DIRECT structures got DFT labels; a committee needs 2 "
                        f"(budget.max_dft_calls {ctx.config.budget.max_dft_calls}, of which "
                        f"{holdout_reserve(ctx)} are kept for validation.holdout_size)"
                    )
                committee = _train_committee(ctx, labelled, e0s)
                md_frames, md_frames_ref = _md_candidates(ctx)
                candidates += md_frames
            else:
                labelled, too_hot = read_structures(ctx.store.path(dft_set(ctx).dft)), []
                md_frames_ref = None
                committee = committee_models(ctx)
            spec = committee_spec(ctx, committee)
            pool_labels = model_labels(ctx, spec, candidates, "committee uncertainty on the candidates")
            labelled_labels = model_labels(ctx, spec, labelled, "committee on the DFT set")
            errors = [
                max_force_error(p.required_forces(), a.get_forces())
                for p, a in zip(labelled_labels, labelled, strict=True)
            ]
            stds = np.array([p.uncertainty.max_force_std for p in labelled_labels])
            calibration = calibration_factor(stds, np.array(errors))
            ctx.report(common_pb2.Progress(stage="describe", message="descriptors for the diversity guard"))
            with channel(ctx.oracle_address) as ch:
                pool_features, labelled_features = describe(ch, spec, candidates), describe(ch, spec, labelled)
            pool_std = np.array([p.uncertainty.max_force_std for p in pool_labels])
            remaining = max(0, allowance - ledger.count())
            force_cap = candidate_force_cap(
                settings.max_candidate_force, [p.required_forces() for p in pool_labels[pool_size:]]
            )
            below_cap = below_force_cap([p.required_forces() for p in pool_labels], force_cap)
            in_range = within_energy_range(
                np.array([p.required_energy() / len(a) for p, a in zip(pool_labels, candidates, strict=True)]),
                np.array([a.get_potential_energy() / len(a) for a in labelled]),
            )
            eligible = below_cap & in_range
            chosen = select_uncertain(
                pool_std,
                calibration,
                settings.force_error_threshold,
                pool_features,
                labelled_features,
                max_count=min(settings.batch_size, remaining),
                diversity_fraction=settings.diversity_fraction,
                eligible=eligible,
            )
            uncertain = [candidates[i] for i in chosen]
            added, too_hot_added = within_force_cap(
                label_frames(dft, uncertain, ctx.report, "DFT labels of the uncertain candidates"),
                settings.max_candidate_force,
            )
            too_hot += too_hot_added
            dft_calls = ledger.count()
        finally:
            ledger.close()
        dft_file = ctx.store.new_tempfile(".extxyz")
        write_extxyz(dft_file, [*labelled, *added])
        dft_ref = ctx.store.put_file(dft_file, kind="structures", move=True)
        record = ActiveLearningRecord(
            iteration=ctx.iteration,
            calibration_factor=calibration,
            force_error_threshold_ev_per_a=settings.force_error_threshold,
            labelled_max_force_error_ev_per_a=errors,
            labelled_committee_max_force_std_ev_per_a=stds.tolist(),
            # Candidates: the step-1 pool (indices below n_pool), then MD frames (iteration 1: this step's short
            # MD with the teacher; later: the previous iteration's step 4).
            n_pool=pool_size,
            n_md_candidates=len(candidates) - pool_size,
            n_candidates=len(candidates),
            pool_committee_max_force_std_ev_per_a=pool_std.tolist(),
            chosen_pool_indices=chosen.tolist(),
            max_candidate_force_ev_per_a=settings.max_candidate_force,
            candidate_force_cap_ev_per_a=force_cap,
            excluded_by_force_pool_indices=np.flatnonzero(~below_cap).tolist(),
            excluded_by_energy_pool_indices=np.flatnonzero(below_cap & ~in_range).tolist(),
            chosen_content_ids=[atoms_to_structure(candidates[i]).content_id for i in chosen],
            isolated_atom_energies_ev={str(z): e for z, e in e0s.items()},
            n_dft_labelled_before=len(labelled),
            n_dft_added=len(added),
            excluded_by_dft_force_content_ids=[atoms_to_structure(a).content_id for a in too_hot],
            dft_calls_charged=dft_calls,
            dft_allowance=allowance,
        )
        record_ref = ctx.store.put_bytes(record_text(record).encode(), kind="al_iteration", suffix=".json")
        outputs = {"dft": dft_ref, "iteration": record_ref}
        outputs.update({f"committee_{i}": ref for i, ref in enumerate(committee)})
        if md_frames_ref is not None:
            outputs["md_candidates"] = md_frames_ref
        metrics = {
            "calibration_factor": calibration,
            "n_dft_labelled_before": float(len(labelled)),
            "n_dft_selected": float(len(added)),
            "dft_calls_charged": float(dft_calls),
            "max_pool_uncertainty_ev_per_a": float(calibration * pool_std.max()),
            # DFT calls charged in this step whose labels are not trained on (forces above the cap).
            "n_dft_not_trained_on": float(len(too_hot)),
        }
        exports = {
            f"{ctx.export_prefix}{EXPORT_DIR}/dft.extxyz": dft_ref,
            f"{ctx.export_prefix}{EXPORT_DIR}/iteration.json": record_ref,
        }
        if md_frames_ref is not None:
            exports[f"{ctx.export_prefix}{EXPORT_DIR}/md_candidates.extxyz"] = md_frames_ref
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def md_candidate_config(ctx: StepContext) -> MdConfig | None:
    """Iteration 1's MD for candidates (active_learning.md_candidate_steps), or None when it is off or the
    iteration has step-4 frames to score instead."""
    steps = ctx.config.active_learning.md_candidate_steps
    if ctx.iteration != 1 or steps == 0:
        return None
    md = md_config(ctx)
    # Another random seed than step 4's MD, whose frames hold the validation hold-out: the same start velocities
    # would make the first frames of the two runs near-duplicates.
    return md.model_copy(
        update={
            "steps": steps,
            "n_frames": MAX_MD_CANDIDATES,
            "frame_selection": "stride",
            "random_seed": md.random_seed + 1,
        }
    )


def _md_candidates(ctx: StepContext) -> tuple[list[Atoms], common_pb2.ArtifactRef | None]:
    """Frames of iteration 1's MD with the teacher (and their artifact), or none when that MD is off. The teacher,
    not the committee just fine-tuned on the few DIRECT labels: its dynamics is what was measured to give
    candidates worth labelling (benchmarks/active_vs_random.py), and it does not depend on a committee fitted to
    a handful of structures."""
    config = md_candidate_config(ctx)
    if config is None:
        return [], None
    result, _ = run_committee_md(ctx, [teacher_model(ctx)], config)
    return read_structures(ctx.store.path(result.selected)), result.selected


def _candidates(ctx: StepContext) -> tuple[list[Atoms], int]:
    """(candidates, how many of them come first from the pool): the pool, plus (after iteration 1) the previous
    iteration's MD frames, less the validation hold-out."""
    pool = read_structures(ctx.store.path(direct_sample(ctx).pool))
    frames: list[Atoms] = []
    if ctx.iteration > 1 and has_run(ctx, StepName.SURROGATE_MD):
        frames = read_structures(ctx.store.path(surrogate_md_outputs(ctx).frames))
        stride = max(1, -(-len(frames) // MAX_MD_CANDIDATES))
        frames = frames[::stride]
    if (validation := last_validation(ctx)) is not None:
        held_out = {atoms_to_structure(a).content_id for a in read_structures(ctx.store.path(validation.holdout))}
        pool = [a for a in pool if atoms_to_structure(a).content_id not in held_out]
        frames = [a for a in frames if atoms_to_structure(a).content_id not in held_out]
    return pool + frames, len(pool)


def _train_committee(ctx: StepContext, labelled: list[Atoms], e0s: dict[int, float]) -> list[common_pb2.ArtifactRef]:
    settings = ctx.config.active_learning
    train_file = ctx.store.new_tempfile(".extxyz")
    write_extxyz(train_file, labelled)
    train_ref = ctx.store.put_file(train_file, kind="structures", move=True)
    return finetune_committee(ctx, train_ref, e0s, settings.random_seed, settings.finetune_epochs, "committee")
