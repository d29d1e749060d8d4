"""The ace backend: an isolated atom's energy is the potential's reference energy E0, the level of theory names the
file's digest, γ with an active set matches pyace's own, and an active set with a .yace is refused clearly (finite
differences, impossible input, retries and batches: tests/unit/test_oracle_conformance.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from pyacemaker.config import AceOracleConfig
from pyacemaker.services.oracle.backends.ace import AceBackend
from pyacemaker.services.oracle.backends.base import OracleBackend
from pyacemaker.services.trainer import linear_ace
from pyacemaker.services.trainer.ace_fit import basis_config
from tests.sn2_training_data import xtb_e0s, xtb_frames

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
    backend = AceBackend(AceOracleConfig(backend="ace", potential=potential))
    for z, e0 in E0S.items():
        labels = backend.label(Atoms(numbers=[z], positions=[[0, 0, 0]]))
        assert labels.ok
        assert labels.energy == pytest.approx(e0, abs=1e-8)


def test_level_of_theory_names_the_file_and_an_active_set_needs_the_yaml(potential: Path) -> None:
    backend = AceBackend(AceOracleConfig(backend="ace", potential=potential))
    assert backend.level_of_theory.startswith("ace:") and len(backend.level_of_theory) == 20
    with pytest.raises(ValueError, match=r"p\.yace: γ with an active set needs the \.yaml potential"):
        AceBackend(AceOracleConfig(backend="ace", potential=potential, active_set=potential))
    with pytest.raises(ValueError, match=r"missing\.asi: no such active-set file"):
        AceBackend(
            AceOracleConfig(
                backend="ace", potential=potential.with_suffix(".yaml"), active_set=potential.with_name("missing.asi")
            )
        )


def test_extrapolation_grade_with_the_active_set_is_pyace_s(tmp_path: Path) -> None:
    from pyacemaker.services.trainer.ace_fit import fit_linear_ace

    frames = xtb_frames()
    fit = fit_linear_ace(frames[:40], tmp_path, e0s=xtb_e0s(), cutoff=4.5)
    backend = AceBackend(AceOracleConfig(backend="ace", potential=fit.yaml_path, active_set=fit.asi_path))
    far = frames[0].copy()
    far.positions[4] += 0.9 * (far.positions[4] - far.positions[0])  # one chloride pulled far out
    far.calc = None
    for atoms in (frames[1], frames[60], far):
        probe = atoms.copy()
        probe.calc = None
        labels = backend.label(probe)
        assert labels.ok, labels.reason
        reference = probe.copy()
        reference.calc = pyace.PyACECalculator(str(fit.yaml_path))
        reference.calc.set_active_set(str(fit.asi_path))
        reference.get_potential_energy()
        np.testing.assert_allclose(labels.uncertainty.extrapolation_grade, reference.calc.results["gamma"])
        assert labels.uncertainty.max_extrapolation_grade == pytest.approx(max(reference.calc.results["gamma"]))
        # The .yaml labels as its .yace does: total energies with the reference energies, the same forces.
        plain = probe.copy()
        plain.calc = pyace.PyACECalculator(str(fit.yace_path))
        assert labels.energy == pytest.approx(plain.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(labels.forces, plain.get_forces(), atol=1e-8)
    # Straight from pyace's evaluator, the labels are exactly those of the ASE path through its calculator
    # (`calculator`, the base class's labelling), with and without an active set, for a molecule and for a
    # periodic cell (stress).
    cell = frames[2].copy()
    cell.calc = None
    cell.center(vacuum=2.5)
    cell.pbc = True
    plain_backend = AceBackend(AceOracleConfig(backend="ace", potential=fit.yace_path))
    for labeller in (backend, plain_backend):
        for atoms in (frames[1], far, cell):
            direct, through_ase = labeller.label(atoms), OracleBackend.label(labeller, atoms)
            assert direct.ok and through_ase.ok and direct.energy == through_ase.energy
            assert np.array_equal(direct.forces, through_ase.forces)
            assert (direct.stress is None) == (through_ase.stress is None) == (atoms is not cell)
            if atoms is cell:
                assert np.array_equal(direct.stress, through_ase.stress)
            grades = (direct.uncertainty.extrapolation_grade, through_ase.uncertainty.extrapolation_grade)
            assert (grades[0] is None and grades[1] is None) or np.array_equal(*grades)
    alien = Atoms("CH3F", positions=frames[1].positions[:5])
    refused = plain_backend.label(alien)
    assert not refused.ok and "unsupported species" in refused.reason and "the potential has" in refused.reason
    # A training structure interpolates (γ ≤ 1 up to round-off); the stretched one extrapolates.
    assert backend.label(frames[1]).uncertainty.max_extrapolation_grade <= 1.0 + 1e-6
    assert backend.label(far).uncertainty.max_extrapolation_grade > 1.0
    # Without an active set there is no grade.
    assert (
        not AceBackend(AceOracleConfig(backend="ace", potential=fit.yace_path))
        .label(far)
        .uncertainty.extrapolation_grade
    )
    # A batch is graded together (one product per element) and gives what one by one gives.
    probes = [frames[1], frames[60], far]
    batch = list(backend.label_batch(probes))
    for probe, labels in zip(probes, batch, strict=True):
        np.testing.assert_allclose(
            labels.uncertainty.extrapolation_grade, backend.label(probe).uncertainty.extrapolation_grade, rtol=1e-10
        )
    # An active set of another basis: every structure of the batch fails, naming the file; the service goes on.
    wrong = tmp_path / "wrong.asi"
    with wrong.open("wb") as handle:
        np.savez(handle, **{symbol: np.eye(3) for symbol in ("C", "H", "Cl")})
    mismatched = AceBackend(AceOracleConfig(backend="ace", potential=fit.yaml_path, active_set=wrong))
    failed = list(mismatched.label_batch(probes[:2]))
    assert [labels.ok for labels in failed] == [False] * 2
    assert "wrong.asi: the active set does not belong to this potential" in failed[0].reason
    assert not mismatched.label(probes[0]).ok


def test_the_loaded_potential_is_reused_and_gives_the_same_labels(potential: Path) -> None:
    import time

    backend = AceBackend(AceOracleConfig(backend="ace", potential=potential))
    frames = xtb_frames()[:6]
    for atoms in frames:
        atoms.calc = None
    first = [backend.label(a) for a in frames]
    started = time.perf_counter()
    again = [backend.label(a) for a in reversed(frames)][::-1]
    per_label = (time.perf_counter() - started) / len(frames)
    fresh = [AceBackend(AceOracleConfig(backend="ace", potential=potential)).label(a) for a in frames]
    for a, b, c in zip(first, again, fresh, strict=True):
        assert a.energy == b.energy == c.energy
        assert np.array_equal(a.forces, b.forces) and np.array_equal(b.forces, c.forces)
    assert per_label < 0.1  # loading the potential again for each label took ~0.7 s (measured)


def test_a_large_batch_is_shared_by_worker_processes_with_the_labels_of_one_process(tmp_path: Path) -> None:
    """`processes`: the replicas of an MD step split among worker processes (pyace holds the GIL, so threads
    cannot share them); the labels, γ included, are those of the oracle's own process, and a worker killed while
    idle costs nothing but a fresh pool."""
    import os
    import signal

    from pyacemaker.services.oracle.backends.ace import MIN_STRUCTURES_PER_PROCESS
    from pyacemaker.services.trainer.ace_fit import fit_linear_ace

    frames = xtb_frames()
    fit = fit_linear_ace(frames[:40], tmp_path, e0s=xtb_e0s(), cutoff=4.5, functions_per_element=6)
    batch = [atoms.copy() for atoms in frames[40 : 40 + 2 * MIN_STRUCTURES_PER_PROCESS]]
    options = {"backend": "ace", "potential": fit.yaml_path, "active_set": fit.asi_path}
    here = AceBackend(AceOracleConfig(**options))
    shared = AceBackend(AceOracleConfig(**options, processes=2))
    expected = list(here.label_batch(batch))
    for _ in range(2):
        labelled = list(shared.label_batch(batch))
        assert [labels.ok for labels in labelled] == [True] * len(batch)
        for a, b in zip(expected, labelled, strict=True):
            assert a.energy == b.energy
            np.testing.assert_array_equal(a.forces, b.forces)
            np.testing.assert_array_equal(a.uncertainty.extrapolation_grade, b.uncertainty.extrapolation_grade)
    killed = set(shared.worker_pids)
    assert 1 <= len(killed) <= 2 and os.getpid() not in killed  # spawned; a quick worker may take both parts
    assert here.worker_pids == set()  # one process: nothing spawned
    # A small batch stays in the oracle's process.
    small = list(shared.label_batch(batch[:MIN_STRUCTURES_PER_PROCESS]))
    assert small[0].energy == expected[0].energy
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    again = list(shared.label_batch(batch))
    assert [labels.energy for labels in again] == [labels.energy for labels in expected]
    assert shared.worker_pids - killed  # fresh workers labelled
