"""Step 0, only with `teacher.bootstrap`: the run's own teacher, trained from a cheap level of theory.

For elements that no available MACE model knows. Structures around the seeds (a pool like step 1's, plus MD at
the cheap level along the md section's windows and temperatures) are labelled by the cheap oracle backend
(GFN2-xTB by default), and the trainer fits a small MACE to them from scratch (the bundled teacher's recipe)
with the cheap level's isolated-atom energies as E0s. Nothing here is charged to the DFT budget. Every later
step that uses "the teacher" uses this model (`mace_finetune.teacher_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms

from pyacemaker.config import MdConfig, TeacherBootstrapConfig
from pyacemaker.rpc import channel
from pyacemaker.run_layout import TEACHER_BOOTSTRAP_DIR, StepName
from pyacemaker.run_records import TeacherRecord, record_text, record_to_json
from pyacemaker.services.orchestrator.dft_labels import isolated_atoms, oracle_spec
from pyacemaker.services.orchestrator.model_labels import all_labels
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.direct_sampling import last_result
from pyacemaker.services.orchestrator.steps.surrogate_md import md_config, run_md_with
from pyacemaker.services.orchestrator.trainer_jobs import run_trainer_job
from pyacemaker.structures import LEVEL_KEY, attach_labels, read_structures, structure_to_atoms, write_extxyz
from pyacemaker.v1 import oracle_pb2, sampler_pb2, sampler_pb2_grpc, trainer_pb2

EXPORT_DIR = TEACHER_BOOTSTRAP_DIR


def bootstrap_config(ctx: StepContext) -> TeacherBootstrapConfig:
    config = ctx.config.teacher.bootstrap
    if config is None:
        raise ValueError("teacher.bootstrap is not set: the run uses teacher.model")
    return config


def bootstrap_md_replicas(config: TeacherBootstrapConfig, md: MdConfig, n_seeds: int) -> int:
    """teacher.bootstrap.md_replicas, or its default: every window (or every seed) at every temperature once."""
    if config.md_replicas is not None:
        return config.md_replicas
    temperatures = len(md.temperatures)
    return temperatures if md.windows is not None else temperatures * max(n_seeds, 1)


class TeacherBootstrapStep:
    name = StepName.TEACHER_BOOTSTRAP
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "bootstrap": bootstrap_config(ctx).model_dump(mode="json"),
            "md": md_config(ctx).model_dump(mode="json"),
            "device": ctx.config.mace_finetune.device,
            "seeds": [seed.content_id for seed in ctx.seeds],
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        config = bootstrap_config(ctx)
        spec = oracle_spec(config.oracle, ctx.store)
        with channel(ctx.sampler_address) as ch:
            pool_result = last_result(
                sampler_pb2_grpc.SamplerServiceStub(ch).GeneratePool(
                    sampler_pb2.GeneratePoolRequest(
                        seeds=ctx.seeds, settings=sampler_pb2.PoolSettings(**config.pool.model_dump())
                    ),
                    timeout=ctx.call_timeout_s,
                ),
                ctx,
            ).result
        seeds = [structure_to_atoms(seed) for seed in ctx.seeds]
        frames = seeds + read_structures(ctx.store.path(pool_result.pool))
        n_md = n_replicas = 0
        if config.md_steps and config.md_frames:
            md = md_config(ctx)
            md = md.model_copy(
                update={
                    "steps": config.md_steps,
                    "n_frames": config.md_frames,
                    "frame_selection": "stride",
                    "replicas": bootstrap_md_replicas(config, md, len(seeds)),
                }
            )
            n_replicas = md.replicas * (md.windows.count if md.windows is not None else 1)
            result, _record = run_md_with(ctx, spec, md, f"the {config.oracle.backend} oracle")
            md_frames = read_structures(ctx.store.path(result.selected))
            frames += md_frames
            n_md = len(md_frames)
        labelled, failed, too_hot = cheap_labels(ctx, spec, frames, config.max_force_ev_per_a)
        if len(labelled) < 10:
            raise RuntimeError(
                f"teacher.bootstrap: only {len(labelled)} of {len(frames)} structures got a usable "
                f"{config.oracle.backend} label ({failed} failed, {too_hot} above max_force_ev_per_a); "
                "a teacher needs more (check the seeds' charge and multiplicity, or raise the pool)"
            )
        e0s = cheap_reference_energies(ctx, spec, seeds)
        train_file = ctx.store.new_tempfile(".extxyz")
        write_extxyz(train_file, labelled)
        train_ref = ctx.store.put_file(train_file, kind="structures", move=True)
        job = run_trainer_job(
            ctx,
            trainer_pb2.StartJobRequest(
                mace_train=trainer_pb2.MaceTrainSpec(
                    train_data=[train_ref],
                    e0s=[trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in sorted(e0s.items())],
                    random_seed=config.random_seed,
                    max_epochs=config.max_epochs,
                    device=ctx.config.mace_finetune.device,
                )
            ),
            "teacher_bootstrap",
        )
        models = [ref for ref in job.outputs if ref.kind == "model"]
        if len(models) != 1:
            raise RuntimeError(f"teacher_bootstrap: the trainer returned {len(models)} models, expected 1")
        record = TeacherRecord(
            level_of_theory=str(labelled[0].info.get(LEVEL_KEY, config.oracle.backend)),
            n_pool=int(pool_result.n_structures),
            n_md_frames=n_md,
            n_md_replicas=n_replicas,
            n_labelled=len(labelled),
            n_failed=failed,
            n_above_max_force=too_hot,
            isolated_atom_energies_ev={str(z): e for z, e in sorted(e0s.items())},
            training_metrics={key: float(value) for key, value in job.metrics.items()},
        )
        data = record_to_json(record)
        record_ref = ctx.store.put_bytes(record_text(record).encode(), kind="teacher_record", suffix=".json")
        metrics = {k: float(v) for k, v in data.items() if isinstance(v, int | float)}
        exports = {
            f"{EXPORT_DIR}/teacher.model": models[0],
            f"{EXPORT_DIR}/train.extxyz": train_ref,
            f"{EXPORT_DIR}/teacher.json": record_ref,
        }
        return StepOutcome(
            outputs={"model": models[0], "train_data": train_ref, "record": record_ref},
            metrics=metrics,
            exports=exports,
        )


def cheap_labels(
    ctx: StepContext, spec: oracle_pb2.BackendSpec, frames: Sequence[Atoms], max_force: float
) -> tuple[list[Atoms], int, int]:
    """(labelled copies, failed, above max_force): the frames the cheap level labels, those it could not, and
    those with a force component above `max_force` (rattles that pushed atoms together; a teacher trained on them
    learns walls it never needs at the cost of the region that matters)."""
    labelled: list[Atoms] = []
    failed = too_hot = 0
    for atoms, labels in zip(frames, all_labels(ctx, spec, frames, "cheap-level labels", "label"), strict=True):
        if not labels.ok:
            failed += 1
        elif labels.forces is not None and np.abs(labels.forces).max(initial=0.0) > max_force:
            too_hot += 1
        else:
            labelled.append(attach_labels(atoms.copy(), labels))
    return labelled, failed, too_hot


def cheap_reference_energies(
    ctx: StepContext, spec: oracle_pb2.BackendSpec, seeds: Sequence[Atoms]
) -> dict[int, float]:
    """The cheap level's isolated-atom energies (neutral atoms in their ground-state multiplicities), the E0s of
    the teacher; RuntimeError naming the element the level could not compute."""
    periodic = any(atoms.pbc.any() for atoms in seeds)
    atoms = isolated_atoms([z for seed in seeds for z in seed.numbers], periodic)
    labelled, failed, _ = cheap_labels(ctx, spec, atoms, max_force=np.inf)
    if failed:
        computed = {int(a.numbers[0]) for a in labelled}
        missing = [a.get_chemical_symbols()[0] for a in atoms if int(a.numbers[0]) not in computed]
        raise RuntimeError(f"teacher.bootstrap: the cheap level could not compute the isolated {', '.join(missing)}")
    return {int(a.numbers[0]): float(a.get_potential_energy()) for a in labelled}
