"""The pyscf backend against PySCF called directly in the test (energies to 1e-6 eV); charge and spin reach PySCF;
an SCF that cannot converge fails or is retried (finite differences, impossible input, the level across retries
and batches: tests/unit/test_oracle_conformance.py)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.units import Bohr, Hartree

from pyacemaker.config import PyscfOracleConfig
from pyacemaker.labels import LabelStatus
from pyacemaker.services.oracle.backends.pyscf import PyscfBackend
from tests.conftest import sn2_seeds

pyscf = pytest.importorskip("pyscf", reason="pyscf is not installed (pyacemaker[oracle])")
from pyscf import dft, gto  # noqa: E402

OK, FAILED = LabelStatus.OK, LabelStatus.FAILED


def config(**options: object) -> PyscfOracleConfig:
    return PyscfOracleConfig.model_validate({"backend": "pyscf", **options})


def water() -> Atoms:
    atoms = molecule("H2O")
    atoms.rattle(0.05, seed=1)  # off the minimum, so that forces are large
    return atoms


def hydroxide(charge: int) -> Atoms:
    atoms = molecule("OH")
    atoms.positions[1] += [0.0, 0.0, 0.08]
    atoms.info["charge"] = charge
    return atoms


def direct_pyscf(atoms: Atoms, basis: str, charge: int = 0, unpaired: int = 0) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) of PBE from PySCF's own API, which works in Hartree and Bohr."""
    rows = zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)
    text = "; ".join(f"{symbol} {x:.12f} {y:.12f} {z:.12f}" for symbol, (x, y, z) in rows)
    mol = gto.M(atom=text, unit="Angstrom", basis=basis, charge=charge, spin=unpaired, verbose=0)
    mf = dft.RKS(mol) if unpaired == 0 else dft.UKS(mol)
    mf.xc = "PBE"
    mf.conv_tol = 1e-9
    energy_hartree = mf.kernel()
    assert mf.converged
    gradient = mf.nuc_grad_method()
    gradient.grid_response = True
    return energy_hartree * Hartree, -gradient.kernel() * Hartree / Bohr


def test_the_unit_constants_are_codata_2014_as_in_every_backend() -> None:
    # ase.units (CODATA 2014): 1 Hartree = 27.21138602 eV, 1 Bohr = 0.52917721067 Å.
    assert Hartree == pytest.approx(27.21138602, rel=1e-9)
    assert Bohr == pytest.approx(0.52917721067, rel=1e-9)
    assert Hartree / Bohr == pytest.approx(27.21138602 / 0.52917721067, rel=1e-9)


def test_energy_and_forces_equal_a_direct_pyscf_run_in_ev() -> None:
    atoms = water()
    labels = PyscfBackend(config()).label(atoms)
    assert labels.status == OK, labels.reason
    energy, forces = direct_pyscf(atoms, "def2-SVP")
    print(f"pyscf H2O PBE/def2-SVP: backend - direct = {labels.energy - energy:.2e} eV")
    assert labels.energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(labels.forces, forces, atol=1e-6)
    assert np.abs(forces).max() > 0.5
    assert labels.stress is None
    assert labels.level_of_theory == "pyscf:PBE/def2-SVP"
    assert labels.attempts == 1


def test_charge_minus_one_is_honoured() -> None:
    backend = PyscfBackend(config())
    anion = backend.label(hydroxide(-1))
    radical = backend.label(hydroxide(0))  # 9 electrons: a doublet by default, unrestricted Kohn-Sham
    assert anion.status == OK and radical.status == OK, (anion.reason, radical.reason)
    anion_energy, anion_forces = direct_pyscf(hydroxide(-1), "def2-SVP", charge=-1)
    radical_energy, _ = direct_pyscf(hydroxide(0), "def2-SVP", unpaired=1)
    print(f"pyscf OH-: backend - direct = {anion.energy - anion_energy:.2e} eV")
    print(f"pyscf OH: backend - direct = {radical.energy - radical_energy:.2e} eV; E(OH-) - E(OH) = ", end="")
    print(f"{anion.energy - radical.energy:.3f} eV")
    assert anion.energy == pytest.approx(anion_energy, abs=1e-6)
    np.testing.assert_allclose(anion.forces, anion_forces, atol=1e-6)
    assert radical.energy == pytest.approx(radical_energy, abs=1e-6)
    # Without diffuse functions PBE/def2-SVP does not bind the extra electron, so no sign is asserted; the
    # direct runs above fix which charge each label belongs to.
    assert abs(anion.energy - radical.energy) > 0.1
    assert np.abs(anion.forces - radical.forces).max() > 0.01


def test_the_sn2_reactant_complex_at_the_flagship_level() -> None:
    atoms = sn2_seeds()[0]  # Cl⁻ ··· CH3Cl, charge −1, singlet
    assert atoms.info["charge"] == -1
    labels = PyscfBackend(config()).label(atoms)
    assert labels.status == OK, labels.reason
    energy, forces = direct_pyscf(atoms, "def2-SVP", charge=-1)
    print(f"pyscf SN2 complex PBE/def2-SVP: backend - direct = {labels.energy - energy:.2e} eV")
    assert labels.energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(labels.forces, forces, atol=1e-6)


def test_an_unconverged_scf_fails_and_a_retry_with_escalated_settings_heals_it() -> None:
    atoms = water()
    starved = PyscfBackend(config(basis="6-31G", max_cycle=2))
    first = starved.label(atoms)
    assert first.status == FAILED
    assert "SCF did not converge" in first.reason and "2 cycles" in first.reason
    no_retries = starved.label_with_retries(atoms, max_retries=0)
    assert (no_retries.status, no_retries.attempts) == (FAILED, 1)
    assert "SCF did not converge" in no_retries.reason
    healed = starved.label_with_retries(atoms, max_retries=2)
    assert (healed.status, healed.attempts) == (OK, 2), healed.reason
    reference, _ = direct_pyscf(atoms, "6-31G")
    # Damping, level shift and Newton iterations change the path to the SCF solution, not the solution.
    assert healed.energy == pytest.approx(reference, abs=1e-6)
    newton = starved.label(atoms, attempt=2)
    assert newton.energy == pytest.approx(reference, abs=1e-6)
    assert healed.level_of_theory == newton.level_of_theory == first.level_of_theory == "pyscf:PBE/6-31G"


def test_a_periodic_structure_is_refused_without_retries() -> None:
    labels = PyscfBackend(config()).label_with_retries(bulk("Si"), max_retries=3)
    assert (labels.status, labels.attempts) == (FAILED, 1)
    assert "molecules only" in labels.reason and "periodic" in labels.reason


def test_an_impossible_spin_is_refused_before_any_scf() -> None:
    atoms = water()
    atoms.info["spin_multiplicity"] = 2  # 10 electrons
    labels = PyscfBackend(config()).label_with_retries(atoms, max_retries=3)
    assert (labels.status, labels.attempts) == (FAILED, 1)
    assert "multiplicity 2" in labels.reason


def test_density_fitting_is_another_level_of_theory() -> None:
    assert PyscfBackend(config(density_fit=True)).level_of_theory == "pyscf:PBE/def2-SVP,density-fitting"
