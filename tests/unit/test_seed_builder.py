"""pyacemaker.seed_builder: atom mapping, ξ inference and window bounds on real geometries, and the whole
reactant → TS → product search at GFN2-xTB (tblite, in this process) checked against independent numbers."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.vibrations import Vibrations
from tblite.ase import TBLite

from pyacemaker import seed_builder as sb
from pyacemaker.config import MdWindowsConfig, ReactionPathConfig
from pyacemaker.structures import read_structures
from tests.conftest import SN2_DIR

SEED_DIR = SN2_DIR / "seeds"


def shipped(name: str) -> Atoms:
    return read_structures(SEED_DIR / f"{name}.xyz")[0]


def fluoride_reactant() -> Atoms:
    """F⁻···H–CH2Cl: the shipped reactant with the incoming Cl (atom 5) replaced by F 1.9 Å beyond H1 along C–H1
    (at GFN2-xTB the back-side F⁻···CH3Cl complex is no minimum; this hydrogen-bonded one is)."""
    atoms = shipped("reactant_complex")
    atoms.symbols[5] = "F"
    direction = atoms.positions[1] - atoms.positions[0]
    atoms.positions[5] = atoms.positions[1] + 1.9 * direction / np.linalg.norm(direction)
    return atoms


def fluoride_product() -> Atoms:
    """CH3F···Cl⁻: the shipped product with the bonded Cl (atom 5) replaced by F at C–F 1.40 Å."""
    atoms = shipped("product_complex")
    atoms.symbols[5] = "F"
    atoms.set_distance(0, 5, 1.40, fix=0)
    return atoms


def rotated_and_shuffled(atoms: Atoms, permutation: list[int], seed: int = 3) -> Atoms:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.linalg.det(q))
    moved = atoms.positions @ rotation.T + rng.normal(size=3)
    return Atoms(atoms.numbers[permutation], positions=moved[permutation])


def distance(atoms: Atoms, i: int, j: int) -> float:
    return float(np.linalg.norm(atoms.positions[i] - atoms.positions[j]))


def gfn2(charge: int = -1) -> TBLite:
    return TBLite(method="GFN2-xTB", charge=charge, multiplicity=1, verbosity=0)


@pytest.mark.parametrize("make", [fluoride_reactant, lambda: shipped("transition_state")])
def test_a_rotated_shuffled_structure_is_mapped_back_onto_the_original(make: Callable[[], Atoms]) -> None:
    original = make()
    shuffled = rotated_and_shuffled(original, [5, 3, 0, 2, 4, 1])
    mapped = sb.map_atoms(original, shuffled)
    assert list(mapped.numbers) == list(original.numbers)
    # Every atom lands on its original (the C3v/D3h seeds may swap symmetry-equivalent H atoms, same positions).
    np.testing.assert_allclose(mapped.positions, original.positions, atol=1e-6)


def test_different_atoms_are_refused_naming_both_formulas() -> None:
    with pytest.raises(sb.SeedInputError, match=r"reactant \(C1 Cl2 H3\) and the product \(C1 Cl1 F1 H3\)"):
        sb.map_atoms(shipped("reactant_complex"), fluoride_product())


def test_the_symmetric_cl_exchange_is_not_mapped_onto_no_reaction() -> None:
    """The product with its two Cl swapped (and rotated) is the reactant itself under the least-RMSD mapping;
    the chosen mapping must still break C–Cl4 and form C–Cl5."""
    reactant = shipped("reactant_complex")
    product = rotated_and_shuffled(shipped("product_complex"), [0, 2, 3, 1, 5, 4])
    assert sb.atom_mappings(reactant, product)[0].rmsd < 1e-6  # the trap: a perfect, reaction-free overlay
    mapped, _ = sb.choose_reactive_mapping(reactant, product)
    assert sb.infer_reaction_coordinate(reactant, mapped) == (4, 0, 5)
    assert distance(mapped, 0, 5) == pytest.approx(distance(shipped("product_complex"), 0, 5), abs=1e-6)


def test_xi_atoms_on_the_shipped_cl_seeds_and_their_mirror() -> None:
    reactant, product = shipped("reactant_complex"), shipped("product_complex")
    assert sb.infer_reaction_coordinate(reactant, product) == (4, 0, 5)
    assert sb.infer_reaction_coordinate(product, reactant) == (5, 0, 4)
    expected = distance(reactant, 4, 0) - distance(reactant, 0, 5)
    assert sb.xi(reactant, (4, 0, 5)) == pytest.approx(expected)
    assert expected < -1.0


def test_xi_atoms_of_fluoride_substitution_and_a_reaction_without_a_shared_atom() -> None:
    assert sb.infer_reaction_coordinate(fluoride_reactant(), fluoride_product()) == (4, 0, 5)
    same = shipped("reactant_complex")
    with pytest.raises(sb.SeedInputError, match="no bond both breaks and forms"):
        sb.infer_reaction_coordinate(same, same.copy())
    # Cl4 leaves C0 while H1 bonds to far-away Cl5: no atom in common.
    apart = same.copy()
    apart.set_distance(0, 4, 4.0, fix=0)
    apart.positions[5] = apart.positions[1] + np.array([1.3, 0.0, 0.0])
    with pytest.raises(sb.SeedInputError, match=r"no bond that breaks shares an atom.*C0–Cl4.*H1–Cl5"):
        sb.infer_reaction_coordinate(same, apart)


def test_window_bounds_bracket_both_sides_on_a_0_1_grid() -> None:
    assert sb.window_bounds(-1.1747, 1.1747) == (-1.5, 1.5)  # the flagship's hand-chosen range
    assert sb.window_bounds(-0.947, 1.676) == (-1.3, 2.0)
    assert sb.window_bounds(-1.2, 0.2) == (-1.5, 0.5)


def test_the_yaml_snippet_is_valid_config() -> None:
    reactant = shipped("reactant_complex")
    text = sb.reaction_coordinate_yaml(
        reactant, (4, 0, 5), {"reactant_complex": -0.95, "product_complex": 1.68}, "GFN2-xTB"
    )
    data = yaml.safe_load(text)
    windows = MdWindowsConfig(**data["md"]["windows"])
    profile = ReactionPathConfig(**data["validation"]["profile"])
    assert windows.atoms == profile.atoms == (4, 0, 5)
    assert (windows.start, windows.stop, windows.count) == (-1.3, 2.0, 14)
    assert (profile.start, profile.stop) == (-1.3, 2.0)
    assert "Cl4–C0 bond breaks" in text


def test_the_cl_exchange_ts_matches_the_shipped_seeds() -> None:
    """NEB from the shipped complexes vs the shipped D3h TS (made by a symmetry-constrained minimisation)."""
    result = sb.build_reaction_seeds(
        shipped("reactant_complex"), shipped("product_complex"), sb.SeedOptions(charge=-1, multiplicity=1)
    )
    assert result.triple == (4, 0, 5)
    shipped_ts = shipped("transition_state")
    energies = {}
    for name in ("reactant_complex", "transition_state"):
        atoms = shipped(name)
        atoms.calc = gfn2()
        energies[name] = atoms.get_potential_energy()
    assert result.barrier_ev == pytest.approx(energies["transition_state"] - energies["reactant_complex"], abs=0.01)
    ts = result.seeds["transition_state"]
    for index in (4, 5):
        assert distance(ts, 0, index) == pytest.approx(distance(shipped_ts, 0, index), abs=0.02)
    # ASE's own frequencies of the shipped TS (no projection): the one large imaginary one.
    shipped_ts.calc = gfn2()
    with pytest.MonkeyPatch.context() as patch:
        import tempfile

        with tempfile.TemporaryDirectory() as cache:
            patch.chdir(cache)
            vibrations = Vibrations(shipped_ts, delta=0.005)
            vibrations.run()
            frequencies = vibrations.get_frequencies()
    reference = max(abs(f.imag) for f in frequencies)
    (found,) = result.imaginary_cm1
    assert found == pytest.approx(reference, rel=0.03)
    assert result.xi["transition_state"] == pytest.approx(0.0, abs=0.02)


def test_a_back_side_fluoride_complex_collapses_and_the_command_says_so() -> None:
    reactant = shipped("reactant_complex")
    reactant.symbols[5] = "F"
    reactant.set_distance(0, 5, 2.6, fix=0)
    # Independent: a plain GFN2-xTB relaxation of it forms the C–F bond.
    from ase.optimize import BFGS

    plain = reactant.copy()
    plain.calc = gfn2()
    BFGS(plain, logfile=None).run(fmax=0.05, steps=200)
    assert distance(plain, 0, 5) < 1.5
    with pytest.raises(sb.SeedComputationError) as caught:
        sb.build_reaction_seeds(reactant, fluoride_product(), sb.SeedOptions(charge=-1, multiplicity=1))
    message = str(caught.value)
    assert "no barrier" in message
    assert "reactant complex is not a minimum at GFN2-xTB" in message
    assert "held at 2.60 Å" in message


def test_an_unknown_method_and_an_impossible_spin_are_input_errors() -> None:
    with pytest.raises(sb.SeedInputError, match="unknown method 'GFN3-xTB'"):
        sb.canonical_method("GFN3-xTB")
    assert sb.canonical_method("gfn1") == "GFN1-xTB"
    with pytest.raises(sb.SeedInputError, match=r"reactant: .*spin"):
        sb.build_reaction_seeds(
            shipped("reactant_complex"), shipped("product_complex"), sb.SeedOptions(charge=-1, multiplicity=2)
        )
