"""What a run on periodic cells needs beyond a molecular one: isolated-atom references in a box (pw.x has no
molecular mode) and a teacher file found beside the config (the periodic example ships its own teacher)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.build import bulk

from pyacemaker.config import config_from_json, config_to_json, load_config
from pyacemaker.services.orchestrator.dft_labels import ISOLATED_ATOM_BOX_A, isolated_atoms

SEED = '2\nLattice="2.7 2.7 0 0 2.7 2.7 2.7 0 2.7" pbc="T T T"\nSi 0 0 0\nSi 1.35 1.35 1.35\n'


def test_isolated_atoms_sit_in_a_periodic_box_only_when_asked() -> None:
    boxed = isolated_atoms([14, 1, 14], periodic=True)
    assert [int(a.numbers[0]) for a in boxed] == [1, 14]
    for atom in boxed:
        assert atom.pbc.all()
        np.testing.assert_allclose(atom.cell.array, ISOLATED_ATOM_BOX_A * np.eye(3))
        np.testing.assert_allclose(atom.positions[0], [ISOLATED_ATOM_BOX_A / 2] * 3)
    # Ground-state multiplicities: H doublet, Si triplet (3p²); neutral.
    assert [a.info["spin_multiplicity"] for a in boxed] == [2, 3]
    assert all(a.info["charge"] == 0 for a in boxed)
    molecular = isolated_atoms([14])
    assert not molecular[0].pbc.any() and molecular[0].cell.rank == 0


def test_teacher_file_is_relative_to_the_config_and_names_stay_names(tmp_path: Path) -> None:
    (tmp_path / "seed.xyz").write_text(SEED)
    base = {"name": "si", "system": {"seeds": ["seed.xyz"]}, "oracle": {"backend": "lj"}}
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "teacher").mkdir()
    for model_file in ("teacher/si.model", "elsewhere/si.model", "small"):
        (tmp_path / model_file).write_bytes(b"model")  # `config check` wants model files to exist
    absolute = str((tmp_path / "elsewhere" / "si.model").resolve())
    cases = {
        "teacher/si.model": str((tmp_path / "teacher" / "si.model").resolve()),
        absolute: absolute,
        "bundled": "bundled",
        "small": "small",  # a foundation-model name, even if a file called "small" were beside the config
        "./small": str((tmp_path / "small").resolve()),
    }
    for given, expected in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({**base, "teacher": {"model": given}}))
        config = load_config(path)
        assert config.teacher.model == expected, given
        # The orchestrator re-reads the resolved config as JSON: the path must not move again.
        assert config_from_json(config_to_json(config)).teacher.model == expected


def test_linear_ace_design_rows_on_a_periodic_cell_match_pyace(tmp_path: Path) -> None:
    """pyace lists a periodic cell's images after its atoms; the design rows must cover the real atoms only,
    and reproduce pyace's own calculator (energy, and forces with the images' contributions folded back)."""
    pyace = pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")
    from pyacemaker.services.trainer import linear_ace
    from pyacemaker.services.trainer.ace_fit import basis_config
    from pyacemaker.services.trainer.evaluation import ace_calculator

    basis = pyace.ACEBBasisSet(basis_config(["Si"], 5.5, 20))
    coefficients = np.random.default_rng(0).normal(0.0, 0.05, size=len(basis.basis_coeffs))
    yaml_path, yace_path = tmp_path / "si.yaml", tmp_path / "si.yace"
    linear_ace.write_potential(basis, coefficients, {14: -100.0}, yaml_path, yace_path)
    design = linear_ace.AceDesign(linear_ace.load_basis(yaml_path))
    crystal = bulk("Si", "diamond", a=5.43, cubic=True)  # 5.43 Å edge < 2 × 5.5 Å cutoff: images interact
    crystal.rattle(0.05, seed=3)
    energy_row, force_rows = design.rows(crystal)
    assert force_rows.shape == (3 * len(crystal), len(coefficients))
    reference = crystal.copy()
    reference.calc = ace_calculator(yace_path)
    assert energy_row @ coefficients * len(crystal) - 100.0 * len(crystal) == pytest.approx(
        reference.get_potential_energy(), abs=1e-8
    )
    np.testing.assert_allclose((force_rows @ coefficients).reshape(-1, 3), reference.get_forces(), atol=1e-8)
