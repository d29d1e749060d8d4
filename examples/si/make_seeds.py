"""Seed structures for the periodic example: bulk silicon in the 8-atom conventional diamond cell.

Writes four extxyz files to examples/si/seeds/ (structure only: cell, positions, pbc, charge 0, singlet):

- diamond_compressed.xyz: the perfect crystal at a = 0.96 a_exp (−12 % volume).
- diamond.xyz: the perfect crystal at the experimental lattice constant a_exp = 5.431 Å.
- diamond_expanded.xyz: the perfect crystal at a = 1.04 a_exp (+12 % volume).
- vacancy.xyz: diamond.xyz with one atom removed (7 atoms, an unrelaxed vacancy).

Why three lattice constants: step 1 interpolates between consecutive seeds that hold the same atoms, in
fractional coordinates and cell, and rattles the images; compressed → diamond → expanded therefore gives the pool
rattled crystals over a ±4 % range of lattice constants, which is what an E(V) curve (and an NPT run) needs. The
vacancy comes last so that it is not interpolated with anything (it has one atom fewer).

Run: .venv/bin/python examples/si/make_seeds.py
"""

from __future__ import annotations

from pathlib import Path

from ase import Atoms
from ase.build import bulk

from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, write_extxyz

SEED_DIR = Path(__file__).resolve().parent / "seeds"
# Silicon's lattice constant at room temperature (Å); the DFT levels of the example put theirs within ~1 % of it.
EXPERIMENTAL_LATTICE_CONSTANT_A = 5.431
LATTICE_SCALES = {"diamond_compressed": 0.96, "diamond": 1.0, "diamond_expanded": 1.04}
VACANCY_INDEX = 0


def diamond_cell(lattice_constant: float) -> Atoms:
    """The 8-atom conventional cubic cell of diamond-structure Si, as a seed (no calculator, no labels)."""
    crystal = bulk("Si", "diamond", a=lattice_constant, cubic=True)
    return Atoms(
        crystal.numbers,
        positions=crystal.positions,
        cell=crystal.cell,
        pbc=True,
        info={CHARGE_KEY: 0, SPIN_KEY: 1},
    )


def seeds() -> dict[str, Atoms]:
    """The example's seeds by file stem, in the order config.yaml lists them."""
    out = {name: diamond_cell(scale * EXPERIMENTAL_LATTICE_CONSTANT_A) for name, scale in LATTICE_SCALES.items()}
    vacancy = out["diamond"].copy()
    del vacancy[VACANCY_INDEX]
    out["vacancy"] = vacancy
    return out


def main() -> None:
    SEED_DIR.mkdir(parents=True, exist_ok=True)
    for name, atoms in seeds().items():
        path = SEED_DIR / f"{name}.xyz"
        write_extxyz(path, [atoms])
        print(f"{path}: {len(atoms)} atoms, a = {atoms.cell.lengths()[0]:.4f} Å, V = {atoms.get_volume():.2f} Å³")


if __name__ == "__main__":
    main()
