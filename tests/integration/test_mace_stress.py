"""MACE fine-tuning with stress through the trainer service: on periodic cells whose labels carry a stress, a
fine-tuning with a (heavy) stress weight reproduces held-out stresses better than the same fine-tuning without
one, and mace's configuration shows the stress loss exactly when a weight is given.

The labels are a level B made from the Si example's teacher with every length scaled: E_B(x) = E_T(k·x), so
F_B(x) = k·F_T(k·x) and σ_B(x) = k³·σ_T(k·x). It is a consistent potential energy surface whose crystal is
1.5 % smaller than the teacher's, so its stresses differ from the teacher's by GPa on the same cells."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import channel
from pyacemaker.services.trainer.server import add_to_server, create_manager
from pyacemaker.structures import read_structures, write_extxyz
from pyacemaker.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import REPO_ROOT, running_service

pytest.importorskip("mace", reason="mace-torch is not installed (pyacemaker[trainer])")
pytestmark = pytest.mark.slow  # fine-tunes the Si teacher twice in worker processes (~2-4 min)

SI_TEACHER = REPO_ROOT / "examples" / "si" / "teacher" / "si_teacher.model"
SCALE = 1.015
# Labels (argv[3]) of the frames in argv[2] at the teacher (argv[1]) with lengths scaled by argv[4]; and the
# stress RMSE (GPa) of the models argv[5:] on them, when argv[2] is already labelled.
_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa
from pyacemaker.structures import read_structures, write_extxyz
from pyacemaker.services.trainer.evaluation import evaluate_calculator, mace_calculator

frames = read_structures(sys.argv[2])
if sys.argv[3] != "-":
    teacher, k = mace_calculator([Path(sys.argv[1])]), float(sys.argv[4])
    labelled = []
    for atoms in frames:
        scaled = atoms.copy()
        scaled.set_cell(np.asarray(atoms.cell) * k, scale_atoms=True)
        scaled.calc = teacher
        energy, forces, stress = scaled.get_potential_energy(), k * scaled.get_forces(), k**3 * scaled.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        labelled.append(atoms)
    write_extxyz(Path(sys.argv[3]), labelled)
for model in sys.argv[5:]:
    print("stress_rmse_gpa", evaluate_calculator(mace_calculator([Path(model)]), frames).errors.stress_rmse / GPa)
"""


def _run_script(*arguments: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *arguments], env=env, check=True, capture_output=True, text=True
    )
    # mace prints notes of its own to stdout
    return [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("stress_rmse_gpa ")]


def si_cells(count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = bulk("Si", "diamond", a=5.43 * (1 + rng.uniform(-0.03, 0.03)), cubic=True)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        frames.append(atoms)
    return frames


def test_finetuning_with_stress_weight_fits_held_out_stresses_better(
    tmp_path: Path, artifact_store: ArtifactStore
) -> None:
    cells = tmp_path / "cells.extxyz"
    write_extxyz(cells, si_cells(16, seed=2))
    labelled = tmp_path / "labelled.extxyz"
    _run_script(str(SI_TEACHER), str(cells), str(labelled), str(SCALE))
    frames = read_structures(labelled)
    train, held_out = tmp_path / "train.extxyz", tmp_path / "held_out.extxyz"
    write_extxyz(train, frames[:12])
    write_extxyz(held_out, frames[12:])
    teacher_ref = artifact_store.put_file(SI_TEACHER, "model")
    train_ref = artifact_store.put_file(train, "structures")
    manager = create_manager(artifact_store, tmp_path / "trainer")
    models = {}
    try:
        with running_service(functools.partial(add_to_server, manager=manager)) as address, channel(address) as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            for weight in (0.0, 1000.0):
                spec = trainer_pb2.MaceFinetuneSpec(
                    foundation_model=teacher_ref,
                    train_data=[train_ref],
                    committee_size=1,
                    random_seed=3,
                    max_epochs=4,
                    stress_weight=weight,
                )
                job = stub.StartJob(trainer_pb2.StartJobRequest(mace_finetune=spec), timeout=60).job
                final = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=600))[-1].job
                assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
                logs = "".join(p.read_text() for p in (manager.job_dir(job.job_id) / "work").rglob("logs/*.log"))
                assert ("loss='stress'" in logs) == (weight > 0)  # mace logs its configuration
                models[weight] = artifact_store.path(next(ref for ref in final.outputs if ref.kind == "model"))
    finally:
        manager.shutdown(stop_workers=True)
    teacher, without, weighted = _run_script(
        str(SI_TEACHER), str(held_out), "-", "1", str(SI_TEACHER), str(models[0.0]), str(models[1000.0])
    )
    print(
        f"held-out stress RMSE: teacher {teacher:.2f} GPa, fine-tuned without stress {without:.2f}, with {weighted:.2f}"
    )
    assert teacher > 1.0  # level B's stresses really differ from the teacher's
    # Measured: teacher 3.27 GPa, without stress 2.40, with stress weight 1000 1.60 (with 100: 2.51, no gain in
    # 4 epochs: mace's stress term in (eV/Å³)² is small beside the forces' unless weighted heavily).
    assert weighted < 0.8 * without
