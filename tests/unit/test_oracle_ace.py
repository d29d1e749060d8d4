"""The ace backend: an isolated atom's energy is the potential's reference energy E0, forces equal finite
differences of its energies, the level of theory names the file's digest, and a .yaml is refused clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyacemaker.config import AceOracleConfig
from pyacemaker.v1 import common_pb2
from services.oracle.backends.ace import AceBackend
from services.trainer import linear_ace
from services.trainer.ace_fit import basis_config
from tests.finite_differences import numerical_forces
from tests.sn2_training_data import xtb_frames

pyace = pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")

E0S = {1: -13.6, 6: -1029.8, 17: -12577.1}


@pytest.fixture(scope="module")
def potential(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ace")
    basis = pyace.ACEBBasisSet(basis_config(["H", "C", "Cl"], 5.0, 6))
    coeffs = np.random.default_rng(0).normal(0.0, 0.05, len(basis.basis_coeffs))
    linear_ace.write_potential(basis, coeffs, E0S, directory / "p.yaml", directory / "p.yace")
    return directory / "p.yace"


def test_isolated_atoms_give_the_reference_energies(potential: Path) -> None:
    from ase import Atoms

    backend = AceBackend(AceOracleConfig(backend="ace", potential=potential))
    for z, e0 in E0S.items():
        labels = backend.label(Atoms(numbers=[z], positions=[[0, 0, 0]]))
        assert labels.status == common_pb2.LABEL_STATUS_OK
        assert labels.energy == pytest.approx(e0, abs=1e-8)


def test_forces_are_minus_the_energy_gradient(potential: Path) -> None:
    backend = AceBackend(AceOracleConfig(backend="ace", potential=potential))
    atoms = xtb_frames()[5]
    atoms.calc = None
    labels = backend.label(atoms)
    reference = numerical_forces(lambda a: backend.label(a).energy, atoms, 1e-4)
    np.testing.assert_allclose(np.reshape(labels.forces, (-1, 3)), reference, atol=1e-5)


def test_level_of_theory_names_the_file_and_yaml_is_refused(potential: Path) -> None:
    backend = AceBackend(AceOracleConfig(backend="ace", potential=potential))
    assert backend.level_of_theory.startswith("ace:") and len(backend.level_of_theory) == 20
    with pytest.raises(ValueError, match=r"p\.yaml: the ace backend evaluates \.yace files"):
        AceBackend(AceOracleConfig(backend="ace", potential=potential.with_suffix(".yaml")))


def test_labels_carry_the_extrapolation_grade_with_the_active_set(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from services.trainer.ace_fit import fit_linear_ace
    from services.trainer.evaluation import extrapolation_grades
    from tests.conftest import sn2_seeds
    from tests.sn2_training_data import xtb_e0s

    frames = xtb_frames()[:40]
    fit = fit_linear_ace(frames, tmp_path / "fit", e0s=xtb_e0s(), functions_per_element=10)
    backend = AceBackend(
        AceOracleConfig(backend="ace", potential=fit.yace_path, active_set=fit.asi_path, basis=fit.yaml_path)
    )
    stretched = sn2_seeds()[1]
    stretched.positions *= 1.35
    for atoms in (frames[3], stretched):
        labels = backend.label(atoms)
        expected = extrapolation_grades(fit.yaml_path, fit.asi_path, [atoms])[0]
        assert len(labels.uncertainty.extrapolation_grade) == len(atoms)
        assert labels.uncertainty.max_extrapolation_grade == pytest.approx(expected, rel=1e-9)
        # Energies and forces are the .yace's, as without the active set.
        plain = AceBackend(AceOracleConfig(backend="ace", potential=fit.yace_path)).label(atoms)
        assert labels.energy == pytest.approx(plain.energy, abs=1e-9)
        assert not plain.uncertainty.extrapolation_grade
    assert backend.label(frames[3]).uncertainty.max_extrapolation_grade <= 1.01 + 1e-6
    assert backend.label(stretched).uncertainty.max_extrapolation_grade > 2.0
    with pytest.raises(ValidationError, match="active_set and basis go together"):
        AceOracleConfig(backend="ace", potential=fit.yace_path, active_set=fit.asi_path)
