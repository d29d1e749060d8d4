"""The bundled teacher as committed: its metrics describe this very file, its reference energies are GFN2-xTB's
isolated atoms, and it reproduces xTB's SN2 barrier on the example's seeds; its training set is reproducible
and covers both charges."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from ase import Atoms, units
from tblite.ase import TBLite

from pyacemaker.structures import CHARGE_KEY, SPIN_KEY
from pyacemaker.teacher import BUNDLED_METRICS, BUNDLED_MODEL
from pyacemaker.teacher.dataset import GROUP_KEY, training_structures
from tests.conftest import SN2_DIR, sn2_seeds

EV_PER_KCAL_MOL = units.kcal / units.mol


def xtb_energy(atoms: Atoms, charge: int, multiplicity: int) -> float:
    work = atoms.copy()
    work.calc = TBLite(method="GFN2-xTB", charge=charge, multiplicity=multiplicity, verbosity=0)
    return float(work.get_potential_energy())


@pytest.fixture(scope="module")
def teacher():  # type: ignore[no-untyped-def]
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(BUNDLED_MODEL), device="cpu", default_dtype="float64")


def test_metrics_describe_the_committed_model() -> None:
    metrics = json.loads(BUNDLED_METRICS.read_text())
    data = BUNDLED_MODEL.read_bytes()
    assert metrics["model_sha256"] == hashlib.sha256(data).hexdigest()
    assert metrics["model_bytes"] == len(data) < 1_000_000
    for split in ("train", "valid", "test"):
        assert metrics[split]["n_structures"] > 0
        assert metrics[split]["energy_rmse_mev_per_atom"] >= 0 and metrics[split]["force_rmse_mev_per_a"] >= 0


def test_reference_energies_are_xtb_isolated_neutral_atoms(teacher) -> None:  # type: ignore[no-untyped-def]
    import torch

    model = teacher.models[0]
    assert [int(z) for z in model.atomic_numbers] == [1, 6, 17]
    e0s = model.atomic_energies_fn(torch.eye(3, dtype=torch.float64)).detach().numpy().ravel()
    expected = [xtb_energy(Atoms(s), 0, m) for s, m in (("H", 2), ("C", 3), ("Cl", 2))]
    np.testing.assert_allclose(e0s, expected, atol=1e-8)


def test_teacher_reproduces_the_xtb_central_barrier(teacher) -> None:  # type: ignore[no-untyped-def]
    reactant, ts, _ = sn2_seeds()

    def teacher_energy(atoms: Atoms) -> float:
        work = atoms.copy()
        work.calc = teacher
        return float(work.get_potential_energy())

    xtb_barrier = (xtb_energy(ts, -1, 1) - xtb_energy(reactant, -1, 1)) / EV_PER_KCAL_MOL
    teacher_barrier = (teacher_energy(ts) - teacher_energy(reactant)) / EV_PER_KCAL_MOL
    assert teacher_barrier == pytest.approx(xtb_barrier, abs=1.5)


def test_training_set_is_reproducible_and_covers_both_charges() -> None:
    def unrelaxed(atoms: Atoms) -> Atoms:  # relaxation is xTB's job in the build; not needed for this check
        return atoms

    first = training_structures(SN2_DIR / "seeds", unrelaxed, random_seed=3)
    second = training_structures(SN2_DIR / "seeds", unrelaxed, random_seed=3)
    other = training_structures(SN2_DIR / "seeds", unrelaxed, random_seed=4)
    assert len(first) == len(second) and 300 <= len(first) <= 600
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a.positions, b.positions) for a, b in zip(first, other, strict=True))
    charges = {a.info[CHARGE_KEY] for a in first}
    assert charges == {0, -1}
    groups = {a.info[GROUP_KEY] for a in first}
    assert {"sn2_rattle", "sn2_path", "sn2_approach", "chloride", "neutral_CH4", "neutral_Cl2"} <= groups
    for atoms in first:  # a multiplicity that fits the electron count (xTB would reject the rest anyway)
        electrons = int(atoms.numbers.sum()) - atoms.info[CHARGE_KEY]
        assert (electrons - (atoms.info[SPIN_KEY] - 1)) % 2 == 0
    far = [a for a in first if a.info[GROUP_KEY] == "sn2_approach" and a.get_distance(0, 5) > 6.0]
    assert far  # Cl⁻ beyond the 5 Å cutoff of CH3Cl
