"""The xtb backend against tblite's non-ASE interface called directly (finite differences, impossible input,
retries and batches: tests/unit/test_oracle_conformance.py)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.units import Bohr, Hartree, kB

from pyacemaker.config import XtbOracleConfig
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from tests.conftest import sn2_seeds

tblite_interface = pytest.importorskip("tblite.interface", reason="tblite is not installed (pyacemaker[oracle])")

GFN2 = XtbOracleConfig(backend="xtb")


def sn2_complex(charge: int = -1, spin_multiplicity: int | None = 1) -> Atoms:
    """The example's Cl⁻ ··· CH3Cl complex, rattled so that forces are far from zero."""
    atoms = sn2_seeds()[0]
    atoms.rattle(0.05, seed=3)
    atoms.info.pop("spin_multiplicity")
    atoms.info["charge"] = charge
    if spin_multiplicity is not None:
        atoms.info["spin_multiplicity"] = spin_multiplicity
    return atoms


def direct_tblite(atoms: Atoms, charge: int, unpaired: int) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) from tblite's plain interface, which works in Hartree and Bohr."""
    calc = tblite_interface.Calculator("GFN2-xTB", atoms.numbers, atoms.positions / Bohr, charge, unpaired)
    calc.set("verbosity", 0)
    calc.set("accuracy", 1.0)
    calc.set("temperature", 300.0 * kB / Hartree)
    calc.set("max-iter", 250)
    result = calc.singlepoint()
    return result.get("energy") * Hartree, -result.get("gradient") * Hartree / Bohr


def test_hartree_constant_is_codata() -> None:
    assert Hartree == pytest.approx(27.211386, abs=1e-5)


def test_charged_energy_and_forces_equal_a_direct_tblite_call_in_ev() -> None:
    atoms = sn2_complex()
    labels = XtbBackend(GFN2).label(atoms)
    assert labels.ok, labels.reason
    energy, forces = direct_tblite(atoms, charge=-1, unpaired=0)
    assert labels.energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(labels.forces, forces, atol=1e-6)
    assert labels.stress is None, "a molecule has no stress"
    assert labels.level_of_theory == "xtb:GFN2-xTB"


def test_the_charge_of_the_structure_reaches_tblite() -> None:
    backend = XtbBackend(GFN2)
    anion = backend.label(sn2_complex(charge=-1))
    # 43 electrons: the neutral radical is a doublet (the default multiplicity for an odd count).
    neutral = backend.label(sn2_complex(charge=0, spin_multiplicity=None))
    assert neutral.ok, neutral.reason
    assert abs(anion.energy - neutral.energy) > 1.0
    energy, _ = direct_tblite(sn2_complex(charge=0), charge=0, unpaired=1)
    assert neutral.energy == pytest.approx(energy, abs=1e-6)


def test_unconverged_scf_gives_a_failed_label() -> None:
    backend = XtbBackend(XtbOracleConfig(backend="xtb", max_iterations=1))
    labels = backend.label(sn2_complex())
    assert not labels.ok
    assert "SCF not converged" in labels.reason
    assert labels.energy is None


def test_impossible_spin_multiplicity_gives_a_failed_label() -> None:
    # Cl⁻ + CH3Cl has 44 electrons: a doublet cannot exist.
    labels = XtbBackend(GFN2).label(sn2_complex(charge=-1, spin_multiplicity=2))
    assert not labels.ok
    assert "spin multiplicity 2" in labels.reason and "44 electrons" in labels.reason


def test_level_of_theory_names_a_non_default_electronic_temperature() -> None:
    hot = XtbBackend(XtbOracleConfig(backend="xtb", method="GFN1-xTB", electronic_temperature=1000.0))
    assert hot.level_of_theory == "xtb:GFN1-xTB,Tel=1000.0K"
