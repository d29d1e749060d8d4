"""Step 2, one active-learning iteration: DFT labels for the DIRECT set → a committee fine-tuned from the
teacher → committee uncertainty on the pool, calibrated against the DFT labels → the most uncertain, diverse
candidates labelled by DFT. Every DFT call goes through the run's budget ledger.

The loop back to this step after validation belongs to the full run (steps 3-7); one iteration is what a run
does today.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from ase import Atoms

from pyacemaker.artifacts import sha256_of_file
from pyacemaker.rpc import channel
from pyacemaker.structures import (
    CHARGE_KEY,
    SPIN_KEY,
    atom_ground_state_multiplicity,
    atoms_to_structure,
    attach_labels,
    read_structures,
    write_extxyz,
)
from pyacemaker.teacher import resolve_teacher
from pyacemaker.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from services.oracle.client import backend_spec, describe, stream_labels
from services.orchestrator.active_learning import calibration_factor, max_force_error, select_uncertain
from services.orchestrator.dft_labels import DftLabeller, oracle_spec
from services.orchestrator.ledger import DftLedger
from services.orchestrator.state import STATE_FILE
from services.orchestrator.steps import StepContext, StepOutcome

EXPORT_DIR = "step2_active_learning"
_OK = common_pb2.LABEL_STATUS_OK


class ActiveLearningStep:
    name = "active_learning"
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        config = ctx.config
        return {
            "direct": {k: v.sha256 for k, v in ctx.previous["direct_sampling"].items()},
            "oracle": config.oracle.model_dump(mode="json"),
            "active_learning": config.active_learning.model_dump(mode="json"),
            "budget": config.budget.model_dump(mode="json"),
            # Digest only: computing a key must not write into the store.
            "teacher": sha256_of_file(resolve_teacher(ctx.config.teacher.model)),
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        settings = ctx.config.active_learning
        previous = ctx.previous["direct_sampling"]
        pool = read_structures(ctx.store.path(previous["pool"]))
        direct = read_structures(ctx.store.path(previous["direct"]))
        ledger = DftLedger(ctx.run_dir / STATE_FILE)
        try:
            dft = DftLabeller(
                ledger, ctx.oracle_address, oracle_spec(ctx.config.oracle), ctx.config.budget.max_dft_calls
            )
            e0s = _isolated_atom_energies(dft, pool, ctx)
            labelled = _label(dft, direct, ctx, "DFT labels of the DIRECT set")
            if len(labelled) < 2:
                raise RuntimeError(f"only {len(labelled)} DIRECT structures got DFT labels; a committee needs 2")
            committee = _train_committee(ctx, labelled, e0s)
            spec = backend_spec("mace", {"models": [str(ctx.store.path(ref)) for ref in committee]})
            pool_labels = _committee_labels(ctx, spec, pool, "committee uncertainty on the pool")
            labelled_labels = _committee_labels(ctx, spec, labelled, "committee on the DFT set")
            errors = [
                max_force_error(np.reshape(p.forces, (-1, 3)), a.get_forces())
                for p, a in zip(labelled_labels, labelled, strict=True)
            ]
            stds = np.array([p.uncertainty.max_force_std for p in labelled_labels])
            calibration = calibration_factor(stds, np.array(errors))
            ctx.report(common_pb2.Progress(stage="describe", message="teacher descriptors for the diversity guard"))
            with channel(ctx.oracle_address) as ch:
                pool_features, labelled_features = describe(ch, spec, pool), describe(ch, spec, labelled)
            pool_std = np.array([p.uncertainty.max_force_std for p in pool_labels])
            remaining = max(0, ctx.config.budget.max_dft_calls - ledger.count())
            pool_force = np.array([np.linalg.norm(np.reshape(p.forces, (-1, 3)), axis=1).max() for p in pool_labels])
            eligible = pool_force <= settings.max_candidate_force
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
            added = _label(dft, [pool[i] for i in chosen], ctx, "DFT labels of the uncertain candidates")
            dft_calls = ledger.count()
        finally:
            ledger.close()
        dft_file = ctx.store.new_tempfile(".extxyz")
        write_extxyz(dft_file, [*labelled, *added])
        dft_ref = ctx.store.put_file(dft_file, kind="structures", move=True)
        record = {
            "calibration_factor": calibration,
            "force_error_threshold_ev_per_a": settings.force_error_threshold,
            "labelled_max_force_error_ev_per_a": errors,
            "labelled_committee_max_force_std_ev_per_a": stds.tolist(),
            "pool_committee_max_force_std_ev_per_a": pool_std.tolist(),
            "chosen_pool_indices": chosen.tolist(),
            "max_candidate_force_ev_per_a": settings.max_candidate_force,
            "excluded_by_force_pool_indices": np.flatnonzero(~eligible).tolist(),
            "chosen_content_ids": [atoms_to_structure(pool[i]).content_id for i in chosen],
            "isolated_atom_energies_ev": {str(z): e for z, e in e0s.items()},
            "dft_calls_charged": dft_calls,
        }
        record_ref = ctx.store.put_bytes(json.dumps(record, indent=1).encode(), kind="al_iteration", suffix=".json")
        outputs = {"dft": dft_ref, "iteration": record_ref}
        outputs.update({f"committee_{i}": ref for i, ref in enumerate(committee)})
        metrics = {
            "calibration_factor": calibration,
            "n_dft_direct": float(len(labelled)),
            "n_dft_selected": float(len(added)),
            "dft_calls_charged": float(dft_calls),
            "max_pool_uncertainty_ev_per_a": float(calibration * pool_std.max()),
        }
        exports = {f"{EXPORT_DIR}/dft.extxyz": dft_ref, f"{EXPORT_DIR}/iteration.json": record_ref}
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def _label(dft: DftLabeller, frames: list[Atoms], ctx: StepContext, stage: str) -> list[Atoms]:
    """DFT-labelled copies of the frames that got an OK label (failed and refused ones are left out)."""
    ctx.report(common_pb2.Progress(stage="dft", done=0, total=len(frames), message=stage))
    structures = [atoms_to_structure(a) for a in frames]
    done = [0]

    def progress(_cid: str, _labels: common_pb2.Labels) -> None:
        done[0] += 1
        ctx.report(common_pb2.Progress(stage="dft", done=done[0], total=len(frames), message=stage))

    outcome = dft.label(structures, on_result=progress)
    labelled = []
    for atoms, message in zip(frames, structures, strict=True):
        labels = outcome.labels.get(message.content_id)
        if labels is not None and labels.status == _OK:
            labelled.append(attach_labels(atoms.copy(), labels))
    return labelled


def _isolated_atom_energies(dft: DftLabeller, pool: list[Atoms], ctx: StepContext) -> dict[int, float]:
    """E0 per element at the DFT level: the neutral atom in its ground-state multiplicity (charged to the
    budget like any DFT call; computed once per run and level, then reused from the ledger)."""
    atoms = []
    for z in sorted({int(z) for frame in pool for z in frame.numbers}):
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        atom.info.update({CHARGE_KEY: 0, SPIN_KEY: atom_ground_state_multiplicity(z)})
        atoms.append(atom)
    labelled = _label(dft, atoms, ctx, "isolated-atom reference energies")
    if len(labelled) != len(atoms):
        raise RuntimeError("the DFT oracle could not compute every isolated-atom reference energy (E0)")
    return {int(a.numbers[0]): float(a.get_potential_energy()) for a in labelled}


def _train_committee(ctx: StepContext, labelled: list[Atoms], e0s: dict[int, float]) -> list[common_pb2.ArtifactRef]:
    settings = ctx.config.active_learning
    train_file = ctx.store.new_tempfile(".extxyz")
    write_extxyz(train_file, labelled)
    spec = trainer_pb2.MaceFinetuneSpec(
        foundation_model=ctx.store.put_file(resolve_teacher(ctx.config.teacher.model), kind="model"),
        train_data=[ctx.store.put_file(train_file, kind="structures", move=True)],
        committee_size=settings.committee_size,
        random_seed=settings.random_seed,
        max_epochs=settings.finetune_epochs,
        e0s=[trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in sorted(e0s.items())],
    )
    request = trainer_pb2.StartJobRequest(
        # Same run and same spec → the same job, also when a restarted orchestrator asks again.
        idempotency_key=f"{ctx.run_dir}:committee:{hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()}",
        mace_finetune=spec,
    )
    with channel(ctx.trainer_address) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        job = stub.StartJob(request, timeout=60).job
        for update in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=ctx.call_timeout_s):
            job = update.job
            ctx.report(
                common_pb2.Progress(
                    stage="committee",
                    done=job.progress.done,
                    total=job.progress.total,
                    message=job.progress.message or job.progress.stage,
                )
            )
    if job.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"committee fine-tuning (trainer job {job.job_id}) ended {job.state}: {job.error}")
    return [ref for ref in job.outputs if ref.kind == "model"]


def _committee_labels(ctx: StepContext, spec: Any, frames: list[Atoms], stage: str) -> list[common_pb2.Labels]:
    results: list[common_pb2.Labels | None] = [None] * len(frames)
    with channel(ctx.oracle_address) as ch:
        for done, (index, labels) in enumerate(stream_labels(ch, spec, frames, batch_size=64, timeout=3600), 1):
            results[index] = labels
            if done % 64 == 0 or done == len(frames):
                ctx.report(common_pb2.Progress(stage="committee", done=done, total=len(frames), message=stage))
    missing = [i for i, labels in enumerate(results) if labels is None or labels.status != _OK]
    if missing:
        raise RuntimeError(f"the committee could not evaluate {len(missing)} structures (first: {missing[0]})")
    return [labels for labels in results if labels is not None]
