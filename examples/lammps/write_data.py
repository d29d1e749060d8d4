"""Write a structure file (extxyz, anything ASE reads) as a LAMMPS data file whose atom types follow the given
element order, the order of `pair_coeff * * final.yaml final.asi ELEMENTS`.

    python write_data.py STRUCTURE OUT.data H C Cl
"""

from __future__ import annotations

import argparse

from ase.io import read, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structure")
    parser.add_argument("output")
    parser.add_argument("elements", nargs="+", help="element of atom type 1, 2, ... (pair_coeff's order)")
    args = parser.parse_args()
    atoms = read(args.structure)
    missing = sorted(set(atoms.get_chemical_symbols()) - set(args.elements))
    if missing:
        raise SystemExit(f"{args.structure}: elements {', '.join(missing)} are not in the type list {args.elements}")
    if not atoms.cell.rank:  # a molecule: a box around it (LAMMPS needs one; boundary s s s shrink-wraps it)
        atoms.center(vacuum=10.0)
        atoms.pbc = False
    write(args.output, atoms, format="lammps-data", specorder=args.elements, masses=True, units="metal")


if __name__ == "__main__":
    main()
