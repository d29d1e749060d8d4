"""The task dir and its worker (`pyacemaker.services.oracle.task`), called in this process: what every executor runs."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from pyacemaker.services.oracle.task import RESULT_FILE, read_result, run_task, write_result, write_task
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2
from tests.conftest import sn2_seeds

pytest.importorskip("tblite.ase", reason="tblite is not installed (pyacemaker[oracle])")


def sn2_anion(seed: int = 0, scale: float = 1.0) -> Atoms:
    atoms = sn2_seeds()[0]
    atoms.rattle(0.05, seed=seed)
    atoms.positions *= scale
    return atoms


def test_the_worker_labels_the_structure_of_its_dir_like_tblite(tmp_path) -> None:
    from tblite.ase import TBLite

    atoms = sn2_anion()
    write_task(tmp_path, atoms_to_structure(atoms), "xtb", {"accuracy": 1.0}, max_retries=2)
    labels = run_task(tmp_path)
    assert labels.ok, labels.reason
    reference = atoms.copy()
    reference.calc = TBLite(method="GFN2-xTB", charge=-1, multiplicity=1, verbosity=0)
    assert labels.energy == pytest.approx(reference.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(labels.forces, reference.get_forces(), atol=1e-6)
    assert labels.attempts == 1 and labels.level_of_theory == "xtb:GFN2-xTB"


def test_the_worker_retries_as_configured_and_reports_every_attempt(tmp_path) -> None:
    # Stretched to 2.5 times its size, the anion's SCC needs far more than 20 · 2² iterations.
    stretched = sn2_anion(scale=2.5)
    write_task(tmp_path, atoms_to_structure(stretched), "xtb", {"max_iterations": 20}, max_retries=2)
    labels = run_task(tmp_path)
    assert not labels.ok
    assert labels.attempts == 3
    assert "failed in all 3 attempts" in labels.reason
    for cycles in (20, 40, 80):
        assert f"SCF not converged in {cycles} cycles" in labels.reason


def test_a_task_the_backend_cannot_run_gets_a_failed_label_not_a_crash(tmp_path) -> None:
    write_task(tmp_path, atoms_to_structure(sn2_anion()), "xtb", {"no_such_option": 1}, max_retries=0)
    labels = run_task(tmp_path)
    assert not labels.ok
    assert labels.reason.startswith("task worker: InvalidInputError") and "no_such_option" in labels.reason


def test_labels_round_trip_through_the_result_file_exactly(tmp_path) -> None:
    assert read_result(tmp_path) is None
    labels = common_pb2.Labels(status=common_pb2.LABEL_STATUS_OK, energy=-353.271738191201, attempts=2)
    labels.forces.extend([0.1 + 1e-17, -2.0 / 3.0, 1e300])
    write_result(tmp_path, labels)
    assert read_result(tmp_path) == labels
    assert [path.name for path in tmp_path.iterdir()] == [RESULT_FILE], "no staging file is left behind"
    (tmp_path / RESULT_FILE).write_text("{not json")
    garbled = read_result(tmp_path)
    assert garbled is not None and garbled.status == common_pb2.LABEL_STATUS_FAILED and "unreadable" in garbled.reason
    # A new task in the same dir starts without the old result.
    write_task(tmp_path, atoms_to_structure(sn2_anion()), "xtb", {}, max_retries=0)
    assert read_result(tmp_path) is None
