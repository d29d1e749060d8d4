"""`pyacemaker seeds REACTANT [PRODUCT]`: seed files and the reaction coordinate ξ from a reactant and a product.

The science is in pyacemaker.seed_builder; this module reads the files, settles charge and spin, prints one
progress line per stage and the result, and turns every failure into one line (exit 2 bad input, 1 a failed
calculation). The xTB calculations run in this process through tblite (not the oracle service): a path and a
Hessian are a few hundred millisecond single points, and seeds are made before any service is up.
"""

from __future__ import annotations

import argparse
import numbers
import sys
from pathlib import Path

import numpy as np
from ase import Atoms

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, fail
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, StructureFileError, read_structures


def register(subparsers: argparse._SubParsersAction) -> None:
    from pyacemaker import seed_builder as sb

    parser = subparsers.add_parser(
        "seeds",
        help="make seed files and the reaction coordinate ξ from a reactant and a product (xTB)",
        description="Relax a reactant and a product at GFN2-xTB (or GFN1-xTB) with tblite, in this process (no "
        "services needed; seconds for a small molecule), put the product's atoms into the reactant's order "
        "(least-RMSD assignment within each element), find the transition state with a climbing-image NEB and check "
        "it with a finite-difference Hessian (exactly one imaginary mode), then write reactant_complex.xyz, "
        "transition_state.xyz and product_complex.xyz (one atom order, charge and spin on the comment line) and "
        f"{sb.REACTION_COORDINATE_FILE}: the bond a–b that breaks and b–c that forms, ξ = d(a, b) − d(b, c), as "
        "md.windows and validation.profile sections (a config that leaves them out derives the same from the seeds). "
        "A complex that falls to the other "
        "side when relaxed freely is relaxed with the forming bond held and reported. With one structure (a "
        "non-reactive system) it is relaxed, checked to be a minimum and written as seed.xyz. Exit 2 for bad "
        "input, 1 when a calculation fails or finds no transition state (unless --no-barrier-ok).",
    )
    parser.add_argument("reactant", type=Path, help="reactant (complex) structure file, one frame (xyz, extxyz, ...)")
    parser.add_argument("product", type=Path, nargs="?", help="product (complex) structure file, same atoms")
    parser.add_argument("--charge", type=int, help="total charge (default: charge= in the file, else 0)")
    parser.add_argument(
        "--spin-multiplicity",
        type=int,
        help="2S+1 (default: spin_multiplicity= in the file, else the lowest the electron count allows)",
    )
    parser.add_argument("--method", default="GFN2-xTB", help="GFN2-xTB (default) or GFN1-xTB")
    parser.add_argument(
        "-o", "--output-dir", type=Path, default=Path("seeds"), help="where the files go (default: ./seeds)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace seed files that exist already")
    parser.add_argument(
        "--no-barrier-ok",
        action="store_true",
        help="when the path has no barrier at this level, write the two complexes and ξ (no transition state) "
        "instead of failing",
    )
    parser.add_argument(
        "--images", type=int, default=sb.SeedOptions.images, help="moving NEB images (default: %(default)s)"
    )
    parser.add_argument(
        "--neb-fmax",
        type=float,
        default=sb.SeedOptions.neb_fmax,
        help="NEB convergence, largest force, eV/Å (default: %(default)s)",
    )
    parser.add_argument(
        "--neb-steps", type=int, default=sb.SeedOptions.neb_steps, help="NEB optimiser steps (default: %(default)s)"
    )
    parser.add_argument(
        "--relax-fmax",
        type=float,
        default=sb.SeedOptions.relax_fmax,
        help="relaxation convergence, largest force, eV/Å (default: %(default)s)",
    )
    parser.add_argument(
        "--polish",
        type=float,
        nargs="?",
        const=0.005,
        metavar="FMAX",
        help="refine the NEB's transition state with the dimer method to this largest force, eV/Å (0.005 when "
        "given without a value)",
    )
    parser.set_defaults(handler=run_seeds)


def _read_one(path: Path, what: str) -> Atoms:
    frames = read_structures(path)
    if len(frames) != 1:
        raise StructureFileError(f"{path}: holds {len(frames)} frames; the {what} must be one structure")
    return frames[0]


def _from_file(value: int | None, frames: list[tuple[Path, Atoms]], key: str, option: str) -> int | None:
    """The option if given, else the files' `key`; StructureFileError when the files disagree."""
    if value is not None:
        return value
    found = set()
    for path, atoms in frames:
        if key in atoms.info:
            given = atoms.info[key]
            if (
                isinstance(given, bool | np.bool_)
                or not isinstance(given, numbers.Real)
                or not float(given).is_integer()
            ):
                raise StructureFileError(f"{path}: {key}={given} is not an integer (or pass {option})")
            found.add(int(float(given)))
    if len(found) > 1:
        raise StructureFileError(f"the files disagree on {key} ({sorted(found)}): pass {option}")
    return found.pop() if found else None


def run_seeds(args: argparse.Namespace) -> int:
    from pyacemaker import seed_builder as sb
    from pyacemaker.structures import default_spin_multiplicity

    for name, value in (("--images", args.images), ("--neb-steps", args.neb_steps)):
        if value < 1:
            return fail(f"{name} must be at least 1, got {value}", EXIT_BAD_INPUT)
    for name, fvalue in (("--neb-fmax", args.neb_fmax), ("--relax-fmax", args.relax_fmax), ("--polish", args.polish)):
        if fvalue is not None and not fvalue > 0:
            return fail(f"{name} must be positive (eV/Å), got {fvalue}", EXIT_BAD_INPUT)
    try:
        method = sb.canonical_method(args.method)
        frames = [_read_one(args.reactant, "reactant")]
        if args.product is not None:
            frames.append(_read_one(args.product, "product"))
        files = list(zip((args.reactant, args.product), frames, strict=False))
        charge = _from_file(args.charge, files, CHARGE_KEY, "--charge") or 0
        spin = _from_file(args.spin_multiplicity, files, SPIN_KEY, "--spin-multiplicity")
    except (StructureFileError, sb.SeedInputError, ValueError) as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    names = sb.SEED_NAMES if args.product is not None else (sb.SINGLE_SEED_NAME,)
    targets = [args.output_dir / f"{name}.xyz" for name in names]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not args.overwrite:
        return fail(f"{', '.join(existing)} exist already: pass --overwrite or another --output-dir", EXIT_BAD_INPUT)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        return fail(f"--output-dir {args.output_dir} is a file, not a directory", EXIT_BAD_INPUT)
    options = sb.SeedOptions(
        method=method,
        charge=charge,
        multiplicity=spin or default_spin_multiplicity(frames[0].numbers, charge),
        relax_fmax=args.relax_fmax,
        images=args.images,
        neb_fmax=args.neb_fmax,
        neb_steps=args.neb_steps,
        allow_no_barrier=args.no_barrier_ok,
        polish_fmax=args.polish,
    )

    def progress(line: str) -> None:
        print(f"seeds: {line}", file=sys.stderr, flush=True)

    progress(f"{method}, charge {options.charge}, spin multiplicity {options.multiplicity}")
    try:
        if args.product is None:
            result = sb.build_single_seed(frames[0], options, progress)
        else:
            result = sb.build_reaction_seeds(frames[0], frames[1], options, progress)
    except sb.SeedInputError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except sb.SeedComputationError as exc:
        return fail(str(exc), EXIT_FAILED)
    try:
        written = sb.write_seeds(result, args.output_dir)
    except OSError as exc:
        return fail(f"cannot write the seeds to {args.output_dir}: {exc}", EXIT_FAILED)
    for stale in set(targets) - set(written):  # an earlier transition state must not pass for this reaction's
        if stale.exists():
            stale.unlink()
            print(f"removed {stale} (from an earlier run; this one found no transition state)")
    _print_result(result, written, method)
    return EXIT_OK


def _print_result(result: object, written: list[Path], method: str) -> None:
    from pyacemaker import seed_builder as sb

    assert isinstance(result, sb.SeedResult)
    for note in result.notes:
        print(f"note: {note}")
    if "transition_state" in result.seeds:
        (wavenumber,) = result.imaginary_cm1
        barrier = result.barrier_ev
        reaction = result.energies["product_complex"] - result.energies["reactant_complex"]
        print(
            f"transition state at {method}: one imaginary mode, {wavenumber:.0f}i cm⁻¹; barrier from the reactant "
            f"complex {barrier:.3f} eV = {barrier / sb.KCAL_PER_MOL:.2f} kcal/mol; product − reactant "
            f"{reaction:+.3f} eV = {reaction / sb.KCAL_PER_MOL:+.2f} kcal/mol"
        )
    print("wrote " + ", ".join(str(path) for path in written))
    if result.yaml:
        print(
            "a config that lists these seeds first to last and leaves md.windows and validation.profile out gets "
            f"them from the seeds (`pyacemaker config check` prints them); to set them yourself, paste (also in "
            f"{written[-1]}):\n"
        )
        print(result.yaml, end="")
