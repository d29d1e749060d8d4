"""The contract every registered oracle backend keeps, checked the same way for each (lj, xtb, pyscf, qe, ace,
mace, vasp):

- forces are minus the central finite-difference gradient of the backend's own energy, and for backends that
  label periodic cells the stress is the finite-difference strain derivative (tests/finite_differences.py);
- impossible input (a NaN coordinate, two atoms on the same spot, atomic number 0, a NaN cell) becomes a FAILED
  label with a reason on the oracle's labelling path, never an exception: the structure check refuses the first,
  third and fourth before the backend sees them (handed them directly, ace and mace label a NaN coordinate OK
  and mace's neighbour list spent minutes on a NaN cell: the check is what protects them); coinciding atoms
  reach the backend, whose calculation fails, and retries end FAILED too;
- the level of theory is fixed: every attempt of a retry labels at the backend's one level string, with the same
  answer, and options a retry may change (SCF iterations, batch size) leave the level alone;
- a batch gives exactly the labels of the same structures labelled one by one.

Each backend gets the smallest system it can treat (H2, CH4, a 2-atom Si cell) at its cheapest settings. VASP
cannot run here: its case goes through a stand-in command that copies a recorded vasprun.xml
(tests/vasp_recorded.py); the finite-difference checks skip for it, as one recorded geometry has no displaced
energies, and its coinciding atoms fail on the stand-in's geometry check, not in VASP. Backend-specific checks
(against a direct call of the underlying code, charges, unit constants, failure messages) stay in the
per-backend test files.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from pyacemaker.config import (
    AceOracleConfig,
    LjOracleConfig,
    MaceOracleConfig,
    PyscfOracleConfig,
    QeOracleConfig,
    XtbOracleConfig,
)
from pyacemaker.labels import LabelStatus
from pyacemaker.services.oracle.backends import BACKENDS
from pyacemaker.services.oracle.backends.base import OracleBackend
from pyacemaker.services.oracle.deployment import QeProfile
from pyacemaker.services.oracle.server import _label_batch
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2
from tests.conftest import REPO_ROOT
from tests.finite_differences import numerical_forces, numerical_stress
from tests.vasp_recorded import RECORDED, recorded_structure, stand_in, vasp_backend, write_fake_potcars

OK, FAILED = LabelStatus.OK, LabelStatus.FAILED

QE_PSEUDO_DIR = Path("/usr/share/espresso/pseudo")
QE_SI_PSEUDO = "Si.pz-vbc.UPF"
SI_TEACHER = REPO_ROOT / "examples" / "si" / "teacher" / "si_teacher.model"


def methane() -> Atoms:
    atoms = molecule("CH4")
    atoms.rattle(0.05, seed=3)  # off the minimum, so that forces are far from zero
    return atoms


def hydrogen() -> Atoms:
    return Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 0.02, 0.86]])


def silicon() -> Atoms:
    """Two-atom diamond Si, sheared and rattled so that forces and every stress component are far from zero."""
    atoms = bulk("Si", "diamond", a=5.43)
    strain = np.array([[0.01, 0.005, 0.0], [0.005, -0.01, 0.0], [0.0, 0.0, 0.02]])
    atoms.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + strain), scale_atoms=True)
    atoms.rattle(0.05, seed=2)
    return atoms


@dataclass
class Case:
    """How to build one backend for the suite, what it is tested on, and how closely its finite differences
    must agree (analytic potentials to round-off, SCF codes to their convergence)."""

    build: Callable[[], OracleBackend]
    molecule: Atoms | None
    periodic: Atoms | None
    fd_step: float = 1e-4
    force_atol: float = 1e-5
    stress_step: float = 1e-4
    stress_atol: float = 1e-6
    # The same physics with options that a retry may change (SCF iterations, batch size); None: it has none.
    build_with_retry_options: Callable[[], OracleBackend] | None = None
    # Why the finite-difference checks cannot run for this backend here; None: they run.
    no_finite_differences: str | None = None
    # Tolerance between the energies of attempt 0 and attempt 1 (escalated SCF settings), eV.
    retry_energy_atol: float = 1e-8
    batch: list[Atoms] = field(default_factory=list)
    # A second backend of the same kind for the periodic system, where the first cannot treat it (MACE's bundled
    # teacher knows H, C and Cl only; the Si example's teacher labels the Si cell).
    build_periodic: Callable[[], OracleBackend] | None = None
    # A backend of the same kind for the stress check alone, where it needs tighter settings than the rest.
    build_stress: Callable[[], OracleBackend] | None = None


def _ace_case(directory: Path) -> Case:
    import pyace

    from pyacemaker.services.trainer import linear_ace
    from pyacemaker.services.trainer.ace_fit import basis_config

    basis = pyace.ACEBBasisSet(basis_config(["H", "C", "Si"], 5.0, 6))
    coeffs = np.random.default_rng(0).normal(0.0, 0.05, len(basis.basis_coeffs))
    e0s = {1: -13.6, 6: -1029.8, 14: -107.0}
    linear_ace.write_potential(basis, coeffs, e0s, directory / "p.yaml", directory / "p.yace")
    config = AceOracleConfig(backend="ace", potential=directory / "p.yace")
    # Forces of the random potential on Si2 are ~1e-4 eV/Å, so the (round-off) tolerance is tight.
    return Case(lambda: BACKENDS["ace"](config), methane(), silicon(), force_atol=1e-7)  # type: ignore[call-arg]


def _qe_case(directory: Path) -> Case:
    if shutil.which("pw.x") is None or not (QE_PSEUDO_DIR / QE_SI_PSEUDO).is_file():
        pytest.skip(
            f"pw.x or {QE_PSEUDO_DIR / QE_SI_PSEUDO} is missing: install the Debian packages quantum-espresso and "
            "quantum-espresso-data (make install-system)"
        )
    config = QeOracleConfig(backend="qe", pseudopotentials={"Si": QE_SI_PSEUDO}, ecutwfc_ry=12.0, kpoint_spacing=1.5)
    profile = QeProfile(command="pw.x", pseudo_dir=QE_PSEUDO_DIR)
    # pw.x's stress is the strain derivative at a fixed number of plane waves; a finite difference at a fixed
    # cutoff also counts the plane waves that enter the sphere (the Pulay stress). At 12 Ry that is up to
    # 0.13 eV/Å³ here, at 30 Ry below 1e-3 eV/Å³ (measured), so the stress check runs at 30 Ry.
    converged = config.model_copy(update={"ecutwfc_ry": 30.0})
    return Case(
        lambda: BACKENDS["qe"](config, profile),  # type: ignore[call-arg]
        None,
        silicon(),
        fd_step=1e-3,
        force_atol=2e-3,
        stress_step=1e-3,
        stress_atol=1.5e-3,
        build_stress=lambda: BACKENDS["qe"](converged, profile),  # type: ignore[call-arg]
        build_with_retry_options=lambda: BACKENDS["qe"](  # type: ignore[call-arg]
            config.model_copy(update={"electron_maxstep": 7}), profile
        ),
        retry_energy_atol=1e-5,
    )


def _vasp_case(directory: Path) -> Case:
    potcars = write_fake_potcars(directory / "potcars")
    command = stand_in(directory, "vasp_copy.sh", f"cp '{RECORDED}' vasprun.xml\n")
    return Case(
        lambda: vasp_backend(potcars, command),
        None,
        recorded_structure(),
        build_with_retry_options=lambda: vasp_backend(
            potcars, command, incar={"ISMEAR": 0, "SIGMA": 0.05, "PREC": "Accurate", "NELM": 40, "ALGO": "Normal"}
        ),
        no_finite_differences="VASP is not installed here; its stand-in replays one recorded geometry, which has "
        "no displaced energies",
        batch=[recorded_structure(), recorded_structure()],
    )


def _lj_case(directory: Path) -> Case:
    # σ and cutoff chosen so that no pair of either system sits near the cutoff, where the shifted LJ forces jump
    # and a finite difference across it would test nothing.
    config = LjOracleConfig(backend="lj", epsilon=0.1, sigma=1.2, cutoff=3.0)
    return Case(lambda: BACKENDS["lj"](config), methane(), silicon(), force_atol=1e-5, stress_atol=1e-9)  # type: ignore[call-arg]


def _xtb_case(directory: Path) -> Case:
    xtb = XtbOracleConfig(backend="xtb")
    return Case(
        lambda: BACKENDS["xtb"](xtb),  # type: ignore[call-arg]
        methane(),
        silicon(),
        fd_step=1e-3,
        force_atol=1e-3,
        stress_atol=1e-5,
        build_with_retry_options=lambda: BACKENDS["xtb"](xtb.model_copy(update={"max_iterations": 40})),  # type: ignore[call-arg]
        retry_energy_atol=1e-6,
    )


def _pyscf_case(directory: Path) -> Case:
    pyscf = PyscfOracleConfig(backend="pyscf", basis="6-31G")
    return Case(
        lambda: BACKENDS["pyscf"](pyscf),  # type: ignore[call-arg]
        hydrogen(),
        None,
        fd_step=1e-3,
        force_atol=1e-3,
        build_with_retry_options=lambda: BACKENDS["pyscf"](pyscf.model_copy(update={"max_cycle": 7})),  # type: ignore[call-arg]
        retry_energy_atol=1e-6,
    )


def _mace_case(directory: Path) -> Case:
    bundled = MaceOracleConfig(backend="mace", models=[Path("bundled")], device="cpu")
    si_teacher = bundled.model_copy(update={"models": [SI_TEACHER]})
    return Case(
        lambda: BACKENDS["mace"](bundled),  # type: ignore[call-arg]
        methane(),
        silicon(),
        build_periodic=lambda: BACKENDS["mace"](si_teacher),  # type: ignore[call-arg]
        build_with_retry_options=lambda: BACKENDS["mace"](bundled.model_copy(update={"batch_size": 1})),  # type: ignore[call-arg]
    )


CASES: dict[str, Callable[[Path], Case]] = {
    "ace": _ace_case,
    "lj": _lj_case,
    "mace": _mace_case,
    "pyscf": _pyscf_case,
    "qe": _qe_case,
    "vasp": _vasp_case,
    "xtb": _xtb_case,
}


def build_case(name: str, directory: Path) -> Case:
    """The suite's case for backend `name`; pytest.skip naming what is missing when its code is absent."""
    reason = BACKENDS[name].unavailable_reason()
    if reason is not None:
        pytest.skip(f"oracle backend {name!r} is not available here: {reason}")
    directory.mkdir(parents=True, exist_ok=True)
    return CASES[name](directory)


@dataclass
class Built:
    case: Case
    backend: OracleBackend
    periodic_backend: OracleBackend

    def systems(self) -> list[tuple[OracleBackend, Atoms]]:
        """(backend, structure) for the molecule and the periodic cell the case has."""
        pairs = [(self.backend, self.case.molecule), (self.periodic_backend, self.case.periodic)]
        return [(backend, atoms) for backend, atoms in pairs if atoms is not None]


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    case = build_case(request.param, tmp_path_factory.mktemp(f"conformance-{request.param}"))
    backend = case.build()
    return Built(case, backend, case.build_periodic() if case.build_periodic is not None else backend)


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """File-based codes (pw.x, the VASP stand-in) write into the current directory, as in an executor's."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def energy_of(backend: OracleBackend) -> Callable[[Atoms], float]:
    def energy(atoms: Atoms) -> float:
        labels = backend.label(atoms)
        assert labels.ok, labels.reason
        return labels.required_energy()

    return energy


def test_every_registered_backend_has_a_case() -> None:
    assert sorted(CASES) == sorted(BACKENDS), "a registered oracle backend needs a case here (CASES)"


def test_forces_are_minus_the_finite_difference_gradient(built: Built) -> None:
    case = built.case
    if case.no_finite_differences:
        pytest.skip(case.no_finite_differences)
    for backend, atoms in built.systems():
        labels = backend.label(atoms)
        assert labels.status == OK, labels.reason
        forces = labels.required_forces()
        numeric = numerical_forces(energy_of(backend), atoms, case.fd_step)
        print(f"{backend.name} {atoms.get_chemical_formula()}: max |F - FD| = {np.abs(forces - numeric).max():.1e}")
        assert np.abs(forces).max() > 10 * case.force_atol, "forces too small to test"
        np.testing.assert_allclose(forces, numeric, atol=case.force_atol)


def test_stress_is_the_finite_difference_strain_derivative(built: Built) -> None:
    case = built.case
    backend = case.build_stress() if case.build_stress is not None else built.periodic_backend
    if case.no_finite_differences:
        pytest.skip(case.no_finite_differences)
    if "stress" not in backend.implemented_properties:
        assert case.periodic is None and case.molecule is not None
        assert backend.label(case.molecule).stress is None
        pytest.skip(f"{backend.name} labels molecules only: no stress")
    assert case.periodic is not None, f"{backend.name} implements stress: its case needs a periodic cell"
    atoms = case.periodic
    labels = backend.label(atoms)
    assert labels.status == OK, labels.reason
    stress = np.array(labels.stress)
    numeric = numerical_stress(energy_of(backend), atoms, case.stress_step)
    print(f"{backend.name} Si2: max |σ - FD| = {np.abs(stress - numeric).max():.1e} eV/Å³")
    assert np.abs(stress).max() > 10 * case.stress_atol, "stress too small to test"
    np.testing.assert_allclose(stress, numeric, atol=case.stress_atol)
    if case.molecule is not None:
        assert built.backend.label(case.molecule).stress is None, "a molecule has no stress"


def impossible(atoms: Atoms, kind: str) -> Atoms:
    bad = atoms.copy()
    if kind == "nan-position":
        bad.positions[0, 0] = np.nan
    elif kind == "coinciding-atoms":
        bad.positions[1] = bad.positions[0]
    elif kind == "atomic-number-0":
        bad.numbers[1] = 0
    elif kind == "nan-cell":
        if not bad.pbc.any():
            bad.cell = np.eye(3) * 10.0
            bad.pbc = True
        cell = np.array(bad.cell)
        cell[0, 0] = np.nan
        bad.cell = cell
    return bad


# What the reason names for each kind: the oracle's structure check refuses all but coinciding atoms before the
# backend sees them (pyacemaker/structure_checks.py); coinciding atoms reach the backend, whose calculation fails.
IMPOSSIBLE = {
    "nan-position": "positions",
    "coinciding-atoms": "",
    "atomic-number-0": "atomic_numbers",
    "nan-cell": "cell",
}


@pytest.mark.parametrize("kind", sorted(IMPOSSIBLE))
def test_impossible_input_gives_a_failed_label_with_a_reason(built: Built, kind: str) -> None:
    backend, atoms = built.systems()[0]
    bad = impossible(atoms, kind)
    # The oracle's path (pyacemaker/services/oracle/server.py, and the executors' gateway likewise): the structure check
    # against the backend's limits, then the backend.
    [result] = list(_label_batch(backend, backend, [atoms_to_structure(bad)], 0))
    labels = result.labels  # the response's message
    print(f"{backend.name} {kind}: {labels.reason}")
    assert labels.status == common_pb2.LABEL_STATUS_FAILED, f"{kind} was labelled"
    assert IMPOSSIBLE[kind] in labels.reason and len(labels.reason) > 10, labels.reason
    assert not labels.HasField("energy") and list(labels.forces) == []
    assert labels.level_of_theory == backend.level_of_theory
    if labels.reason.startswith("invalid structure"):
        return  # refused before any backend saw it
    # It reached the backend: retries end in a FAILED label too, never in an exception.
    retried = backend.label_with_retries(bad, max_retries=1)
    assert retried.status == FAILED and retried.reason
    assert retried.level_of_theory == backend.level_of_theory


def test_the_level_of_theory_is_fixed_across_retries(built: Built) -> None:
    case = built.case
    backend, atoms = built.systems()[0]
    first = backend.label(atoms, attempt=0)
    retry = backend.label(atoms, attempt=1)
    assert first.status == retry.status == OK, (first.reason, retry.reason)
    assert first.level_of_theory == retry.level_of_theory == backend.level_of_theory != ""
    # Escalated settings change the path to the answer, not the answer.
    assert retry.energy == pytest.approx(first.energy, abs=case.retry_energy_atol)
    assert backend.label_with_retries(atoms, max_retries=2).level_of_theory == backend.level_of_theory
    assert case.build().level_of_theory == backend.level_of_theory, "two backends of one config disagree"
    if case.build_with_retry_options is not None:
        assert case.build_with_retry_options().level_of_theory == backend.level_of_theory


def test_a_batch_equals_labelling_one_by_one(built: Built) -> None:
    backend, atoms = built.systems()[0]
    frames = built.case.batch or [atoms, _displaced(atoms), atoms]
    batch = list(backend.label_batch(frames))
    single = [backend.label(frame) for frame in frames]
    assert len(batch) == len(frames)
    for together, alone in zip(batch, single, strict=True):
        assert together.status == alone.status == OK, (together.reason, alone.reason)
        assert together.energy == pytest.approx(alone.energy, abs=1e-8)
        np.testing.assert_allclose(together.forces, alone.forces, atol=1e-8)
        if together.stress is None or alone.stress is None:
            assert together.stress is alone.stress is None
        else:
            np.testing.assert_allclose(together.stress, alone.stress, atol=1e-10)
        assert together.level_of_theory == alone.level_of_theory


def _displaced(atoms: Atoms) -> Atoms:
    other = atoms.copy()
    other.rattle(0.02, seed=11)
    return other
