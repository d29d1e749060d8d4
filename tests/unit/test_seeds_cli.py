"""`pyacemaker seeds`: F⁻ + CH3Cl → CH3F + Cl⁻ end to end from two files written here (real GFN2-xTB through
tblite in this process), checked against independent tblite/ASE numbers; bad input exits 2 and a failed
calculation 1, each with one line and no traceback."""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.vibrations import Vibrations
from tblite.ase import TBLite

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from pyacemaker.structures import read_structures, write_extxyz
from tests.conftest import SN2_DIR
from tests.unit.test_seed_builder import fluoride_product, fluoride_reactant, rotated_and_shuffled, shipped

# The product file lists its atoms in another order: F, H, C, H, Cl, H.
PRODUCT_ORDER = [5, 3, 0, 2, 4, 1]


def _cli(*args: str) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of the pyacemaker CLI run in this process."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, err.getvalue().strip().splitlines(), out.getvalue()


def _one_error(result: tuple[int, list[str], str], expected_code: int, *fragments: str) -> str:
    """The one `error:` line of a CLI run that must exit `expected_code`; it must contain every fragment."""
    code, lines, _ = result
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == expected_code and len(errors) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _write(path: Path, atoms: Atoms) -> Path:
    write_extxyz(path, [Atoms(atoms.numbers, positions=atoms.positions)])
    return path


@pytest.fixture
def fluoride_files(tmp_path: Path) -> tuple[Path, Path]:
    """Plain xyz-like files without charge: the command gets it from --charge."""
    reactant = _write(tmp_path / "reactant.xyz", fluoride_reactant())
    product = _write(tmp_path / "product.xyz", rotated_and_shuffled(fluoride_product(), PRODUCT_ORDER))
    return reactant, product


def _gfn2_energy(atoms: Atoms) -> float:
    atoms = Atoms(atoms.numbers, positions=atoms.positions)
    atoms.calc = TBLite(method="GFN2-xTB", charge=-1, multiplicity=1, verbosity=0)
    return float(atoms.get_potential_energy())


def test_fluoride_substitution_end_to_end(tmp_path: Path, fluoride_files: tuple[Path, Path]) -> None:
    reactant_file, product_file = fluoride_files
    out = tmp_path / "seeds"
    code, lines, stdout = _cli(
        "seeds", str(reactant_file), str(product_file), "--charge", "-1", "-o", str(out), "--polish"
    )
    assert code == EXIT_OK, lines
    assert any("climbing-image NEB" in line for line in lines)  # progress per stage on stderr
    assert any("polishing the highest image with the dimer method" in line for line in lines)
    seeds = {name: read_structures(out / f"{name}.xyz") for name in ("reactant_complex", "transition_state",
                                                                     "product_complex")}  # fmt: skip
    reactant_numbers = list(fluoride_reactant().numbers)
    for frames in seeds.values():
        (atoms,) = frames
        assert list(atoms.numbers) == reactant_numbers  # the reactant's order, also for the shuffled product
        assert atoms.info["charge"] == -1 and atoms.info["spin_multiplicity"] == 1
    reactant, ts, product = (seeds[name][0] for name in ("reactant_complex", "transition_state", "product_complex"))

    def d(atoms: Atoms, i: int, j: int) -> float:
        return float(np.linalg.norm(atoms.positions[i] - atoms.positions[j]))

    # Bonds as chemistry says: C–Cl in the reactant, C–F in the product (atom 5 is F in both).
    assert d(reactant, 0, 4) < 1.9 < d(reactant, 0, 5)
    assert d(product, 0, 5) < 1.5 and d(product, 0, 4) > 2.8
    xi = {name: d(atoms, 4, 0) - d(atoms, 0, 5) for name, atoms in (("r", reactant), ("ts", ts), ("p", product))}
    assert xi["r"] < xi["ts"] < xi["p"]

    # Polished: a stationary point by tblite's own forces on the written file.
    calculated = Atoms(ts.numbers, positions=ts.positions)
    calculated.calc = TBLite(method="GFN2-xTB", charge=-1, multiplicity=1, verbosity=0)
    assert float(np.linalg.norm(calculated.get_forces(), axis=1).max()) < 0.01

    # Barrier from tblite directly on the written files: a small central barrier, as printed.
    barrier = _gfn2_energy(ts) - _gfn2_energy(reactant)
    assert 0.02 < barrier < 0.3
    printed = re.search(r"one imaginary mode, (\d+)i cm⁻¹; barrier from the reactant complex ([\d.]+) eV", stdout)
    assert printed is not None, stdout
    assert float(printed[2]) == pytest.approx(barrier, abs=0.002)

    # ASE's frequencies of the written TS (rigid-body modes not projected: they stay below 50 cm⁻¹).
    with tempfile.TemporaryDirectory() as cache:
        vibrations = Vibrations(calculated, name=str(Path(cache) / "vib"), delta=0.005)
        vibrations.run()
        imaginary = [abs(f.imag) for f in vibrations.get_frequencies() if abs(f.imag) > 50]
    assert len(imaginary) == 1
    assert float(printed[1]) == pytest.approx(imaginary[0], rel=0.05)

    # The snippet: printed, written, valid, and bracketing the reactant's and the product's ξ.
    snippet = (out / "reaction_coordinate.yaml").read_text()
    assert snippet in stdout
    data = yaml.safe_load(snippet)
    windows, profile = data["md"]["windows"], data["validation"]["profile"]
    assert windows["atoms"] == profile["atoms"] == [4, 0, 5]
    assert windows["start"] < xi["r"] - 0.2 and windows["stop"] > xi["p"] + 0.2
    assert (profile["start"], profile["stop"]) == (windows["start"], windows["stop"])


def test_one_structure_is_relaxed_into_a_single_seed(tmp_path: Path) -> None:
    molecule = fluoride_product()
    molecule.set_distance(0, 4, 6.0, fix=0)  # CH3F with the chloride far away: relax CH3F alone instead
    ch3f = Atoms(molecule.numbers[[0, 1, 2, 3, 5]], positions=molecule.positions[[0, 1, 2, 3, 5]])
    path = _write(tmp_path / "ch3f.xyz", ch3f)
    code, lines, stdout = _cli("seeds", str(path), "-o", str(tmp_path / "out"))
    assert code == EXIT_OK, lines
    (seed,) = read_structures(tmp_path / "out" / "seed.xyz")
    assert seed.info["charge"] == 0 and seed.info["spin_multiplicity"] == 1
    assert 1.35 < float(np.linalg.norm(seed.positions[0] - seed.positions[4])) < 1.42  # GFN2 C–F
    assert not (tmp_path / "out" / "reaction_coordinate.yaml").exists()
    assert f"wrote {tmp_path / 'out' / 'seed.xyz'}" in stdout

    # Charge and spin from the file's comment line: the shipped Cl⁻···CH3Cl complex (charge=-1) on its own.
    code, lines, _ = _cli("seeds", str(SN2_DIR / "seeds" / "reactant_complex.xyz"), "-o", str(tmp_path / "ion"))
    assert code == EXIT_OK, lines
    (ion,) = read_structures(tmp_path / "ion" / "seed.xyz")
    assert ion.info["charge"] == -1 and ion.info["spin_multiplicity"] == 1
    assert any("charge -1, spin multiplicity 1" in line for line in lines)


def test_bad_input_exits_2_with_one_line(tmp_path: Path, fluoride_files: tuple[Path, Path]) -> None:
    reactant, product = fluoride_files
    out = str(tmp_path / "out")
    _one_error(_cli("seeds", str(tmp_path / "missing.xyz"), str(product), "-o", out), EXIT_BAD_INPUT, "no such file")
    chloride = _write(tmp_path / "chloride.xyz", shipped("product_complex"))
    _one_error(
        _cli("seeds", str(reactant), str(chloride), "--charge", "-1", "-o", out),
        EXIT_BAD_INPUT,
        "reactant (C1 Cl1 F1 H3) and the product (C1 Cl2 H3) must hold the same atoms",
    )
    _one_error(
        _cli("seeds", str(reactant), str(product), "--charge", "-1", "--method", "GFN0", "-o", out),
        EXIT_BAD_INPUT,
        "unknown method 'GFN0': choose one of GFN2-xTB, GFN1-xTB",
    )
    _one_error(
        _cli("seeds", str(reactant), str(product), "--charge", "-1", "--spin-multiplicity", "2", "-o", out),
        EXIT_BAD_INPUT,
        "reactant:",
        "spin",
    )
    two_frames = tmp_path / "two.xyz"
    write_extxyz(two_frames, [fluoride_reactant(), fluoride_reactant()])
    _one_error(_cli("seeds", str(two_frames), "-o", out), EXIT_BAD_INPUT, "holds 2 frames")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "transition_state.xyz").write_text("")
    _one_error(
        _cli("seeds", str(reactant), str(product), "--charge", "-1", "-o", str(taken)),
        EXIT_BAD_INPUT,
        "exist already: pass --overwrite",
    )


def test_a_neb_that_does_not_converge_exits_1(tmp_path: Path, fluoride_files: tuple[Path, Path]) -> None:
    reactant, product = fluoride_files
    _one_error(
        _cli("seeds", str(reactant), str(product), "--charge", "-1", "--neb-steps", "3", "-o", str(tmp_path / "o")),
        EXIT_FAILED,
        "NEB: not converged to fmax 0.1 eV/Å in 3 steps",
        "try more --neb-steps",
    )
    assert not (tmp_path / "o").exists()


def test_a_reactant_and_product_that_relax_into_one_structure_exit_1(tmp_path: Path) -> None:
    """H2O2 at dihedrals ±115°: enantiomers, but GFN2-xTB makes both trans-planar."""

    def hooh(dihedral_deg: float) -> Atoms:
        angle = np.radians(dihedral_deg)
        h2 = [1.78, 0.92 * np.cos(angle), 0.92 * np.sin(angle)]
        return Atoms("OOHH", positions=[[0, 0, 0], [1.45, 0, 0], [-0.33, 0.92, 0], h2])

    reactant, product = _write(tmp_path / "r.xyz", hooh(115)), _write(tmp_path / "p.xyz", hooh(-115))
    _one_error(
        _cli("seeds", str(reactant), str(product), "-o", str(tmp_path / "out")),
        EXIT_FAILED,
        "the reactant and the product relax into the same structure at GFN2-xTB",
    )
    fractional = tmp_path / "fractional.xyz"
    fractional.write_text(reactant.read_text().replace('pbc="F F F"', 'charge=0.5 pbc="F F F"'))
    assert "charge=0.5" in fractional.read_text()
    _one_error(_cli("seeds", str(fractional)), EXIT_BAD_INPUT, f"{fractional}: charge=0.5 is not an integer")


def test_a_collapsing_complex_without_a_barrier_exits_1_and_says_why(tmp_path: Path) -> None:
    back_side = shipped("reactant_complex")
    back_side.symbols[5] = "F"
    back_side.set_distance(0, 5, 2.6, fix=0)
    reactant = _write(tmp_path / "reactant.xyz", back_side)
    product = _write(tmp_path / "product.xyz", fluoride_product())
    error = _one_error(
        _cli("seeds", str(reactant), str(product), "--charge", "-1", "-o", str(tmp_path / "out")),
        EXIT_FAILED,
        "no barrier",
        "not a minimum at GFN2-xTB",
        "hydrogen-bonded",
    )
    assert "(d(C0–F5) 2.60 → 1.38 Å)" in error and "--no-barrier-ok" in error
    assert not (tmp_path / "out" / "transition_state.xyz").exists()

    # Asked to, it writes the held complex, the product and ξ, and drops a transition state of an earlier run.
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "transition_state.xyz", shipped("transition_state"))
    code, lines, stdout = _cli(
        "seeds", str(reactant), str(product), "--charge", "-1", "-o", str(out), "--no-barrier-ok", "--overwrite"
    )
    assert code == EXIT_OK, lines
    assert sorted(path.name for path in out.iterdir()) == [
        "product_complex.xyz",
        "reactant_complex.xyz",
        "reaction_coordinate.yaml",
    ]
    assert "note: no barrier" in stdout and "removed" in stdout
    (held,) = read_structures(out / "reactant_complex.xyz")
    assert float(np.linalg.norm(held.positions[0] - held.positions[5])) == pytest.approx(2.60, abs=1e-3)
