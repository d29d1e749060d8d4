"""Seed structures and the reaction coordinate ξ from a reactant and a product, at a cheap level (xTB).

The steps `pyacemaker seeds` runs, as plain functions:

1. `map_atoms`: the product's atoms put into the reactant's order (the pipeline interpolates between seeds and
   indexes ξ's atoms into every seed, so the order must agree). Minimal-RMSD assignment: a rigid alignment
   (Kabsch) alternating with a Hungarian assignment within each element, from several starting orientations.
   Mappings that turn the reaction into no reaction (the product laid onto the reactant itself, possible when
   both are the same molecule with two atoms swapped, as in Cl⁻ + CH3Cl) are passed over.
2. `infer_reaction_coordinate`: the bond a–b that breaks and the bond b–c that forms (bonds: distances below
   BOND_FACTOR × the sum of covalent radii from ase.data), so that ξ = d(a, b) − d(b, c), exactly as
   pyacemaker.restraints defines it, is negative in the reactant and positive in the product.
3. `relax_complex`: a relaxation that refuses to let a complex become the other side of the reaction: when a
   plain relaxation forms the forming bond (F⁻···CH3Cl at GFN2-xTB falls into CH3F + Cl⁻ without a barrier), the
   complex is relaxed again with that bond's length held at its input value (ase.constraints.FixBondLength),
   and the caller is told: such a complex is not a stationary point at this level.
4. `find_transition_state`: a climbing-image NEB (ase.mep.NEB, IDPP interpolation, FIRE) between the relaxed
   complexes; its highest image is the transition-state guess, and `vibrational_analysis` (a finite-difference
   Hessian from ase.vibrations with rigid-body motions projected out) must find exactly one imaginary mode.
5. `window_bounds` / `reaction_coordinate_yaml`: `md.windows` and `validation.profile` bracketing the reactant's
   and the product's ξ.

The level is GFN2-xTB or GFN1-xTB through tblite's ASE calculator, in this process: a path and a Hessian take a
few hundred single points of milliseconds each, so a round trip per point to the oracle service would cost more
than the calculation and would make a set-up step depend on running services.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import CalculationFailed, Calculator
from ase.data import covalent_radii
from ase.optimize import BFGS, FIRE

from pyacemaker.restraints import DistanceDifferenceRestraint
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, write_extxyz

if TYPE_CHECKING:
    from pyacemaker.config import MdWindowsConfig, ReactionPathConfig

XTB_METHODS = ("GFN2-xTB", "GFN1-xTB")
_METHOD_ALIASES = {alias: name for name in XTB_METHODS for alias in (name.lower(), name.lower().split("-")[0])}
# Two atoms are bonded when closer than this times the sum of their covalent radii (C–Cl: 2.14 Å, C–F: 1.60 Å).
BOND_FACTOR = 1.2
# |ν| below this (cm⁻¹) is numerical noise of the finite-difference Hessian, not a mode.
NOISE_FREQUENCY_CM1 = 20.0
# Window and profile ranges reach this far beyond the reactant's and the product's ξ (Å), rounded outwards to GRID.
XI_MARGIN = 0.3
XI_GRID = 0.1
# Spacing of the restraint windows along ξ (Å) and the profile's points (each charged to the DFT budget).
WINDOW_SPACING = 0.25
WINDOW_FORCE_CONSTANT = 5.0
PROFILE_COUNT = 11
SEED_NAMES = ("reactant_complex", "transition_state", "product_complex")
SINGLE_SEED_NAME = "seed"
REACTION_COORDINATE_FILE = "reaction_coordinate.yaml"
# Relaxed complexes closer than this (RMSD after alignment, Å) are one structure: nothing to find between them.
SAME_STRUCTURE_RMSD = 0.05
KCAL_PER_MOL = units.kcal / units.mol

Progress = Callable[[str], None]


class SeedInputError(ValueError):
    """The structures or options cannot describe the job (different atoms, no reaction, unknown method)."""


class SeedComputationError(RuntimeError):
    """A calculation failed or did not give what it must (no convergence, no barrier, not a saddle point)."""


class NoBarrierError(SeedComputationError):
    """The relaxed path from the reactant to the product has no maximum between its ends."""

    def __init__(self, message: str, energies: list[float]) -> None:
        super().__init__(message)
        self.energies = energies


def _quiet(_: str) -> None:
    pass


# --- the level ---------------------------------------------------------------------------------------------------


def canonical_method(name: str) -> str:
    """GFN2-xTB or GFN1-xTB for any spelling of them (gfn2, GFN1-xTB, ...); SeedInputError for another name."""
    method = _METHOD_ALIASES.get(name.lower())
    if method is None:
        raise SeedInputError(f"unknown method {name!r}: choose one of {', '.join(XTB_METHODS)}")
    return method


def xtb_calculator(method: str, charge: int, multiplicity: int) -> Calculator:
    """tblite's ASE calculator at `method` (GFN2-xTB or GFN1-xTB); SeedInputError for another name or when tblite
    is not installed."""
    method = canonical_method(method)
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise SeedInputError(
            "tblite is not installed (it comes with the oracle extra: pip install 'pyacemaker[oracle]')"
        ) from None
    calculator: Calculator = TBLite(method=method, charge=charge, multiplicity=multiplicity, verbosity=0)
    return calculator


CalculatorFactory = Callable[[], Calculator]


def check_input(atoms: Atoms, options: SeedOptions, what: str) -> None:
    """SeedInputError naming `what` when the structure, with the options' charge and spin, is unfit for a
    calculation (see pyacemaker.structure_checks) or is periodic (molecules only)."""
    from pyacemaker.structure_checks import StructureCheckError, check_structure

    if any(atoms.pbc):
        raise SeedInputError(f"{what}: periodic structures are not supported (pyacemaker seeds makes molecular seeds)")
    trial = Atoms(atoms.numbers, positions=atoms.positions)
    trial.info[CHARGE_KEY] = options.charge
    trial.info[SPIN_KEY] = options.multiplicity
    try:
        check_structure(trial)
    except StructureCheckError as exc:
        raise SeedInputError(f"{what}: {exc}") from None


# --- atom order ---------------------------------------------------------------------------------------------------


def _formula(atoms: Atoms) -> str:
    counts = Counter(atoms.get_chemical_symbols())
    return " ".join(f"{symbol}{counts[symbol]}" for symbol in sorted(counts))


def check_same_atoms(reactant: Atoms, product: Atoms) -> None:
    """SeedInputError naming both formulas when the two structures do not hold the same atoms."""
    if Counter(reactant.get_chemical_symbols()) != Counter(product.get_chemical_symbols()):
        raise SeedInputError(
            f"the reactant ({_formula(reactant)}) and the product ({_formula(product)}) must hold the same atoms"
        )


def _kabsch(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """`moving` rotated and translated onto `reference` (same row order) with the least RMSD, proper rotation."""
    ref_centre, mov_centre = reference.mean(axis=0), moving.mean(axis=0)
    covariance = (moving - mov_centre).T @ (reference - ref_centre)
    u, _, vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(u @ vt)) or 1.0
    rotation = u @ np.diag([1.0, 1.0, sign]) @ vt
    return (moving - mov_centre) @ rotation + ref_centre


def _assign(reference: Atoms, positions: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """Permutation p (positions[p] in reference order) minimising Σ|r − x|² within each element."""
    from scipy.optimize import linear_sum_assignment

    permutation = np.empty(len(reference), dtype=int)
    for z in np.unique(reference.numbers):
        ref_idx = np.flatnonzero(reference.numbers == z)
        mov_idx = np.flatnonzero(numbers == z)
        cost = ((reference.positions[ref_idx, None, :] - positions[None, mov_idx, :]) ** 2).sum(axis=-1)
        rows, cols = linear_sum_assignment(cost)
        permutation[ref_idx[rows]] = mov_idx[cols]
    return permutation


def _principal_axes(positions: np.ndarray) -> np.ndarray:
    centred = positions - positions.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    return vectors


@dataclass(frozen=True)
class AtomMapping:
    """`permutation[i]`: the index in the product of the reactant's atom i; `rmsd` after the best alignment, Å."""

    permutation: np.ndarray
    rmsd: float


def atom_mappings(reference: Atoms, moving: Atoms) -> list[AtomMapping]:
    """Distinct minimal-RMSD mappings of `moving`'s atoms onto `reference`'s, best first, each a local optimum of
    alternating alignment and per-element assignment from one start: the atoms in their given order, and the
    principal axes of the two structures laid onto each other in each of their four proper orientations."""
    check_same_atoms(reference, moving)
    ref_positions = reference.positions
    ref_centre = ref_positions.mean(axis=0)
    mov_centre = moving.positions.mean(axis=0)
    starts: list[np.ndarray] = []
    # The given order, element by element (the i-th H of one is the i-th H of the other).
    given = np.empty(len(reference), dtype=int)
    for z in np.unique(reference.numbers):
        given[reference.numbers == z] = np.flatnonzero(moving.numbers == z)
    starts.append(given)
    ref_axes, mov_axes = _principal_axes(ref_positions), _principal_axes(moving.positions)
    for signs in itertools.product((1.0, -1.0), repeat=3):
        rotation = ref_axes @ np.diag(signs) @ mov_axes.T
        if np.linalg.det(rotation) < 0:
            continue
        rotated = (moving.positions - mov_centre) @ rotation.T + ref_centre
        starts.append(_assign(reference, rotated, moving.numbers))

    found: dict[tuple[int, ...], float] = {}
    for permutation in starts:
        for _ in range(100):
            aligned = _kabsch(ref_positions, moving.positions[permutation])
            # Positions in the moving structure's own indexing, so a new assignment can be read off.
            moved = np.empty_like(aligned)
            moved[permutation] = aligned
            new = _assign(reference, moved, moving.numbers)
            if np.array_equal(new, permutation):
                break
            permutation = new
        aligned = _kabsch(ref_positions, moving.positions[permutation])
        rmsd = float(np.sqrt(((aligned - ref_positions) ** 2).sum(axis=1).mean()))
        key = tuple(int(i) for i in permutation)
        found[key] = min(rmsd, found.get(key, math.inf))
    ranked = sorted(found.items(), key=lambda item: (item[1], item[0]))
    return [AtomMapping(np.array(key), rmsd) for key, rmsd in ranked]


def map_atoms(reference: Atoms, moving: Atoms) -> Atoms:
    """`moving` with its atoms in `reference`'s order (the least-RMSD mapping) and aligned onto it."""
    return reordered(reference, moving, atom_mappings(reference, moving)[0])


def reordered(reference: Atoms, moving: Atoms, mapping: AtomMapping) -> Atoms:
    """`moving`'s atoms in the mapping's order, rigidly aligned onto `reference`; info kept."""
    positions = _kabsch(reference.positions, moving.positions[mapping.permutation])
    return Atoms(moving.numbers[mapping.permutation], positions=positions, info=dict(moving.info))


# --- bonds and ξ ----------------------------------------------------------------------------------------------------


def bonds(atoms: Atoms) -> set[tuple[int, int]]:
    """Pairs (i < j) closer than BOND_FACTOR × the sum of their covalent radii."""
    radii = covalent_radii[atoms.numbers]
    distances = atoms.get_all_distances()
    limit = BOND_FACTOR * (radii[:, None] + radii[None, :])
    i, j = np.nonzero(np.triu(distances < limit, k=1))
    return {(int(a), int(b)) for a, b in zip(i, j, strict=True)}


def _bond_name(atoms: Atoms, pair: tuple[int, int]) -> str:
    symbols = atoms.get_chemical_symbols()
    return f"{symbols[pair[0]]}{pair[0]}–{symbols[pair[1]]}{pair[1]}"


def choose_reactive_mapping(reactant: Atoms, product: Atoms) -> tuple[Atoms, AtomMapping]:
    """The product in the reactant's atom order: the least-RMSD mapping under which some bond breaks or forms
    (a mapping that lays the product onto the reactant itself describes no reaction). SeedInputError when the
    product has the reactant's bonds under every mapping."""
    reactant_bonds = bonds(reactant)
    for mapping in atom_mappings(reactant, product):
        mapped = reordered(reactant, product, mapping)
        if bonds(mapped) != reactant_bonds:
            return mapped, mapping
    raise SeedInputError(
        "the product has the same bonds as the reactant: no bond breaks or forms, so there is no reaction "
        "coordinate (for a non-reactive system give one structure)"
    )


def xi(atoms: Atoms, triple: tuple[int, int, int]) -> float:
    """ξ = d(a, b) − d(b, c), Å, as the restraint windows compute it."""
    a, b, c = triple
    return DistanceDifferenceRestraint(a, b, c, center=0.0, force_constant=1.0).value(atoms.positions)


def infer_reaction_coordinate(reactant: Atoms, product: Atoms) -> tuple[int, int, int]:
    """[a, b, c] such that the bond a–b breaks and the bond b–c forms (both atoms orders the same): of every
    broken and formed bond that share an atom, the pair whose lengths change most. SeedInputError when no
    broken bond shares an atom with a formed one."""
    if len(reactant) != len(product) or not np.array_equal(reactant.numbers, product.numbers):
        raise SeedInputError("the reactant and the product must hold the same atoms in the same order")
    before, after = bonds(reactant), bonds(product)
    broken, formed = sorted(before - after), sorted(after - before)
    if not broken or not formed:
        raise SeedInputError(
            "no bond both breaks and forms between the reactant and the product "
            f"(breaks: {', '.join(_bond_name(reactant, p) for p in broken) or 'none'}; "
            f"forms: {', '.join(_bond_name(reactant, p) for p in formed) or 'none'}): set md.windows by hand"
        )
    best: tuple[float, tuple[int, int, int]] | None = None
    for old, new in itertools.product(broken, formed):
        shared = set(old) & set(new)
        if len(shared) != 1:
            continue
        (b,) = shared
        a = old[0] if old[1] == b else old[1]
        c = new[0] if new[1] == b else new[1]
        change = (product.get_distance(a, b) - reactant.get_distance(a, b)) + (
            reactant.get_distance(b, c) - product.get_distance(b, c)
        )
        if best is None or change > best[0]:
            best = (change, (a, b, c))
    if best is None:
        raise SeedInputError(
            "no bond that breaks shares an atom with a bond that forms "
            f"(breaks: {', '.join(_bond_name(reactant, p) for p in broken)}; "
            f"forms: {', '.join(_bond_name(reactant, p) for p in formed)}): ξ = d(a, b) − d(b, c) needs one; "
            "set md.windows by hand"
        )
    return best[1]


def window_bounds(xi_reactant: float, xi_product: float) -> tuple[float, float]:
    """(start, stop): XI_MARGIN beyond the reactant's and the product's ξ, rounded outwards to XI_GRID."""
    low, high = min(xi_reactant, xi_product) - XI_MARGIN, max(xi_reactant, xi_product) + XI_MARGIN
    start = math.floor(round(low / XI_GRID, 6)) * XI_GRID
    stop = math.ceil(round(high / XI_GRID, 6)) * XI_GRID
    return round(start, 6), round(stop, 6)


def reaction_coordinate_sections(
    triple: tuple[int, int, int], xi_reactant: float, xi_product: float, profile_count: int = PROFILE_COUNT
) -> tuple[MdWindowsConfig, ReactionPathConfig]:
    """`md.windows` (a window every WINDOW_SPACING Å) and `validation.profile` (`profile_count` points) over
    `window_bounds` of the reactant's and the product's ξ."""
    from pyacemaker.config import MdWindowsConfig, ReactionPathConfig

    start, stop = window_bounds(xi_reactant, xi_product)
    count = round((stop - start) / WINDOW_SPACING) + 1
    windows = MdWindowsConfig(atoms=triple, start=start, stop=stop, count=count, force_constant=WINDOW_FORCE_CONSTANT)
    return windows, ReactionPathConfig(atoms=triple, start=start, stop=stop, count=profile_count)


def seeds_reaction_coordinate(first: Atoms, last: Atoms) -> tuple[tuple[int, int, int], float, float] | None:
    """ξ's atoms [a, b, c] and ξ of `first` and `last` when the two (same atoms, same order) differ in which
    bond is formed (infer_reaction_coordinate on the structures as they are: no relaxation); None when they
    hold different atoms, are periodic (bonds here are molecular) or no broken and formed bond share an atom (a
    non-reactive system)."""
    if any(first.pbc) or any(last.pbc) or len(first) != len(last) or not np.array_equal(first.numbers, last.numbers):
        return None
    try:
        triple = infer_reaction_coordinate(first, last)
    except SeedInputError:
        return None
    return triple, xi(first, triple), xi(last, triple)


def bond_change_text(atoms: Atoms, triple: tuple[int, int, int]) -> str:
    """ "Cl4–C0 breaks, C0–Cl5 forms" for ξ's atoms [a, b, c]."""
    a, b, c = triple
    return f"{_bond_name(atoms, (a, b))} breaks, {_bond_name(atoms, (b, c))} forms"


def reaction_coordinate_yaml(
    reactant: Atoms, triple: tuple[int, int, int], xi_values: dict[str, float], level: str
) -> str:
    """The `md.windows` and `validation.profile` sections (validated by the config's own models) for ξ over the
    reactant's and the product's ξ, with comments that say which bonds they are."""
    windows, profile = reaction_coordinate_sections(triple, xi_values["reactant_complex"], xi_values["product_complex"])
    symbols = reactant.get_chemical_symbols()
    a, b, c = triple
    names = [f"{symbols[i]}{i}" for i in triple]
    labels = {"reactant_complex": "reactant", "transition_state": "transition state", "product_complex": "product"}
    values = ", ".join(f"{labels.get(name, name)} {round(value, 2) + 0.0:+.2f}" for name, value in xi_values.items())
    atoms_text = f"[{a}, {b}, {c}]"
    return (
        f"# ξ = d(a, b) − d(b, c) with [a, b, c] = {atoms_text} ({', '.join(names)}): the {names[0]}–{names[1]} bond"
        f" breaks, the {names[1]}–{names[2]} bond forms.\n"
        f"# ξ at {level}, Å: {values}.\n"
        "md:\n"
        f"  windows: {{atoms: {atoms_text}, start: {windows.start:.1f}, stop: {windows.stop:.1f}, "
        f"count: {windows.count}, force_constant: {windows.force_constant:.1f}}}\n"
        "validation:\n"
        f"  profile: {{atoms: {atoms_text}, start: {profile.start:.1f}, stop: {profile.stop:.1f}, "
        f"count: {profile.count}}}\n"
    )


# --- relaxation -----------------------------------------------------------------------------------------------------


def _run(optimizer: Any, fmax: float, steps: int, what: str) -> None:
    try:
        converged = optimizer.run(fmax=fmax, steps=steps)
    except CalculationFailed as exc:
        raise SeedComputationError(f"{what}: the xTB calculation failed ({exc})") from None
    if not converged:
        raise SeedComputationError(f"{what}: not converged to fmax {fmax} eV/Å in {steps} steps")


def relax(atoms: Atoms, calculator: Calculator, fmax: float, steps: int, what: str, constraint: Any = None) -> Atoms:
    """A BFGS-relaxed copy (with `constraint` while relaxing, none on the result)."""
    relaxed = Atoms(atoms.numbers, positions=atoms.positions)
    if constraint is not None:
        relaxed.set_constraint(constraint)
    relaxed.calc = calculator
    _run(BFGS(relaxed, logfile=None), fmax, steps, what)
    result = Atoms(relaxed.numbers, positions=relaxed.positions, info=dict(atoms.info))
    return result


@dataclass(frozen=True)
class RelaxedComplex:
    atoms: Atoms
    # The bond held at its input length because a plain relaxation formed or broke a reacting bond; None when the
    # complex is a minimum at this level.
    held_bond: tuple[int, int] | None = None
    collapsed_to: Atoms | None = None


def relax_complex(
    atoms: Atoms,
    calculator: Calculator,
    keep_bonded: tuple[int, int],
    keep_apart: tuple[int, int],
    fmax: float,
    steps: int,
    what: str,
) -> RelaxedComplex:
    """Relax a complex whose bond `keep_bonded` must stay and `keep_apart` must not form. When a plain
    relaxation breaks the one or forms the other, relax again from the input with `keep_apart` held at its input
    length (the complex is then not a stationary point at this level; `collapsed_to` is what it fell into)."""
    from ase.constraints import FixBondLength

    bonded = (min(keep_bonded), max(keep_bonded))
    apart = (min(keep_apart), max(keep_apart))
    plain = relax(atoms, calculator, fmax, steps, what)
    after = bonds(plain)
    if bonded in after and apart not in after:
        return RelaxedComplex(plain)
    held = relax(atoms, calculator, fmax, steps, what, constraint=FixBondLength(*keep_apart))
    if bonded not in bonds(held):
        raise SeedComputationError(
            f"{what}: the {_bond_name(atoms, bonded)} bond breaks on relaxation even with the "
            f"{_bond_name(atoms, apart)} distance held"
        )
    return RelaxedComplex(held, held_bond=keep_apart, collapsed_to=plain)


# --- transition state and vibrations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NebResult:
    images: list[Atoms]
    energies: list[float]
    steps: int

    @property
    def highest(self) -> int:
        return int(np.argmax(self.energies))


def find_transition_state(
    reactant: Atoms,
    product: Atoms,
    calculators: CalculatorFactory,
    images: int,
    fmax: float,
    steps: int,
) -> NebResult:
    """Climbing-image NEB with `images` moving images between the two end points (IDPP interpolation, FIRE): a
    plain band first (to twice `fmax`, at least 0.1 eV/Å), whose highest image must lie between the ends, then
    the highest image climbs. SeedComputationError when either stage does not converge, or when the plain band
    has no maximum between its ends (no barrier at this level)."""
    from ase.mep import NEB

    band = [Atoms(reactant.numbers, positions=reactant.positions)]
    band += [band[0].copy() for _ in range(images)]
    band.append(Atoms(product.numbers, positions=product.positions))
    for image in band:
        image.calc = calculators()
    neb = NEB(band, climb=False, method="improvedtangent")
    neb.interpolate(method="idpp")
    total_steps = 0
    for stage_fmax, climb in ((max(2 * fmax, 0.1), False), (fmax, True)):
        neb.climb = climb
        optimizer = FIRE(neb, logfile=None)
        try:
            converged = optimizer.run(fmax=stage_fmax, steps=steps)
        except CalculationFailed as exc:
            raise SeedComputationError(f"NEB: the xTB calculation failed ({exc})") from None
        total_steps += optimizer.nsteps
        energies = [float(image.get_potential_energy()) for image in band]
        if not converged:
            max_force = float(np.sqrt((neb.get_forces() ** 2).sum(axis=1).max()))
            raise SeedComputationError(
                f"NEB{' (climbing image)' if climb else ''}: not converged to fmax {stage_fmax} eV/Å in {steps} "
                f"steps (max force now {max_force:.3f} eV/Å); try more --neb-steps, more --images or a looser "
                "--neb-fmax"
            )
        highest = int(np.argmax(energies))
        if highest in (0, len(band) - 1):
            profile = " → ".join(f"{energy - energies[0]:+.3f}" for energy in energies)
            raise NoBarrierError(
                "no barrier between the reactant and the product at this level: along the relaxed path the energy "
                f"(eV, from the reactant) goes {profile}, so there is no transition state",
                energies,
            )
    return NebResult([Atoms(im.numbers, positions=im.positions) for im in band], energies, total_steps)


def polish_transition_state(
    neb: NebResult, calculator: Calculator, fmax: float, steps: int
) -> tuple[Atoms, float] | None:
    """The NEB's highest image refined by the dimer method (ase.mep, the lowest mode started along the band's
    tangent there) to `fmax`, and its energy; None when the dimer does not converge in `steps`."""
    import warnings

    from ase.mep import DimerControl, MinModeAtoms, MinModeTranslate

    i = neb.highest
    tangent = neb.images[i + 1].positions - neb.images[i - 1].positions
    tangent /= np.linalg.norm(tangent)
    atoms = Atoms(neb.images[i].numbers, positions=neb.images[i].positions)
    atoms.calc = calculator
    control = DimerControl(initial_eigenmode_method="displacement", displacement_method="vector", logfile=None)
    dimer = MinModeAtoms(atoms, control)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not possible to figure out which atoms to displace": all
        dimer.displace(displacement_vector=0.01 * tangent)
        optimizer = MinModeTranslate(dimer, logfile=None)
        try:
            converged = optimizer.run(fmax=fmax, steps=steps)
        except CalculationFailed:
            return None
    if not converged:
        return None
    polished = Atoms(atoms.numbers, positions=atoms.positions)
    polished.calc = calculator
    return polished, float(polished.get_potential_energy())


def vibrational_analysis(atoms: Atoms, calculator: Calculator) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (cm⁻¹, imaginary as negative) and Cartesian mode vectors with translations/rotations removed.

    The Hessian comes from ase.vibrations (central differences); rigid-body motions are projected out of the
    mass-weighted Hessian so that only the 3N−6 (3N−5 for a linear molecule) internal modes remain.
    """
    from ase.vibrations import Vibrations

    atoms = Atoms(atoms.numbers, positions=atoms.positions)
    atoms.calc = calculator
    with tempfile.TemporaryDirectory() as cache:
        vibrations = Vibrations(atoms, name=str(Path(cache) / "vib"), delta=0.005, nfree=2)
        try:
            vibrations.run()
        except CalculationFailed as exc:
            raise SeedComputationError(f"Hessian: the xTB calculation failed ({exc})") from None
        hessian = vibrations.get_vibrations().get_hessian_2d()
    masses = atoms.get_masses()
    sqrt_m = np.repeat(np.sqrt(masses), 3)
    mass_weighted = hessian / np.outer(sqrt_m, sqrt_m)
    mass_weighted = 0.5 * (mass_weighted + mass_weighted.T)

    centred = atoms.positions - atoms.get_center_of_mass()
    rigid = []
    for axis in np.eye(3):
        rigid.append((np.tile(axis, (len(atoms), 1)) * np.sqrt(masses)[:, None]).ravel())
        rigid.append((np.cross(axis, centred) * np.sqrt(masses)[:, None]).ravel())
    basis, singular, _ = np.linalg.svd(np.array(rigid).T, full_matrices=False)
    basis = basis[:, singular > 1e-8 * singular.max()]
    projector = np.eye(3 * len(atoms)) - basis @ basis.T
    eigenvalues, eigenvectors = np.linalg.eigh(projector @ mass_weighted @ projector)

    # Drop the rigid-body eigenvectors (they lie in the projected-out space).
    internal = np.linalg.norm(basis.T @ eigenvectors, axis=0) < 0.5
    eigenvalues, eigenvectors = eigenvalues[internal], eigenvectors[:, internal]
    # eV/(Å² amu) → cm⁻¹: ω = sqrt(k/m) in s⁻¹ with SI conversion, then / (2π c).
    to_cm1 = np.sqrt(units._e / units._amu) * 1e10 / (2 * np.pi * units._c * 100)
    frequencies = np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * to_cm1
    cartesian_modes = (eigenvectors / sqrt_m[:, None]).T.reshape(-1, len(atoms), 3)
    return frequencies, cartesian_modes


def imaginary_frequencies(frequencies: np.ndarray) -> np.ndarray:
    """The imaginary wavenumbers (as positive numbers, cm⁻¹) above the noise level."""
    return np.sort(-frequencies[frequencies < -NOISE_FREQUENCY_CM1])[::-1]


# --- the whole job ----------------------------------------------------------------------------------------------


@dataclass
class SeedOptions:
    method: str = "GFN2-xTB"
    charge: int = 0
    multiplicity: int = 1
    relax_fmax: float = 0.01
    relax_steps: int = 500
    images: int = 5
    neb_fmax: float = 0.05
    neb_steps: int = 1000
    # Without a barrier, write the two complexes and ξ instead of failing (the run's windows still cross ξ).
    allow_no_barrier: bool = False
    # Refine the NEB's highest image with the dimer method to this largest force, eV/Å; None: keep it as it is.
    polish_fmax: float | None = None


@dataclass
class SeedResult:
    """Seeds (name → structure, one atom order), ξ's atoms and values, the barrier and the TS's wavenumbers."""

    seeds: dict[str, Atoms]
    energies: dict[str, float] = field(default_factory=dict)
    triple: tuple[int, int, int] | None = None
    xi: dict[str, float] = field(default_factory=dict)
    frequencies: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    yaml: str = ""
    reordered_atoms: int = 0

    @property
    def barrier_ev(self) -> float:
        return self.energies["transition_state"] - self.energies["reactant_complex"]

    @property
    def imaginary_cm1(self) -> np.ndarray:
        assert self.frequencies is not None
        return imaginary_frequencies(self.frequencies)


def _seed_frame(atoms: Atoms, options: SeedOptions) -> Atoms:
    """Plain positions plus charge/spin, as examples/sn2/seeds carry them."""
    return Atoms(
        atoms.numbers, positions=atoms.positions, info={CHARGE_KEY: options.charge, SPIN_KEY: options.multiplicity}
    )


def _mapped_product(reactant: Atoms, product: Atoms, notes: list[str], progress: Progress) -> tuple[Atoms, int]:
    """The product in the reactant's order (see choose_reactive_mapping; the least-RMSD mapping when no mapping
    changes a bond) and how many atoms moved."""
    try:
        mapped, mapping = choose_reactive_mapping(reactant, product)
    except SeedInputError:
        mapping = atom_mappings(reactant, product)[0]
        mapped = reordered(reactant, product, mapping)
        notes.append("no bond breaks or forms between the reactant and the product: a change of shape, no ξ")
        progress(notes[-1])
    moved = int((mapping.permutation != np.arange(len(reactant))).sum())
    progress(
        f"atom order: the product's atoms mapped onto the reactant's ({moved} of {len(reactant)} reordered, "
        f"RMSD {mapping.rmsd:.2f} Å after alignment)"
    )
    return mapped, moved


def _relaxed_complexes(
    reactant: Atoms,
    product: Atoms,
    triple: tuple[int, int, int] | None,
    options: SeedOptions,
    notes: list[str],
    progress: Progress,
) -> dict[str, Atoms]:
    """Both complexes relaxed; with ξ known, a complex that falls to the other side is held (relax_complex)."""
    symbols = reactant.get_chemical_symbols()
    relaxed: dict[str, Atoms] = {}
    for name, atoms in (("reactant_complex", reactant), ("product_complex", product)):
        what = name.replace("_", " ")
        progress(f"relaxing the {what} at {options.method}")
        calculator = xtb_calculator(options.method, options.charge, options.multiplicity)
        if triple is None:
            relaxed[name] = relax(atoms, calculator, options.relax_fmax, options.relax_steps, what)
            if bonds(relaxed[name]) != bonds(atoms):
                notes.append(f"the {what}'s bonds changed on relaxation")
                progress(notes[-1])
            continue
        a, b, c = triple
        keep_bonded, keep_apart = ((a, b), (b, c)) if name == "reactant_complex" else ((b, c), (a, b))
        outcome = relax_complex(
            atoms, calculator, keep_bonded, keep_apart, options.relax_fmax, options.relax_steps, what
        )
        if outcome.held_bond is not None:
            i, j = outcome.held_bond
            assert outcome.collapsed_to is not None
            notes.append(
                f"the {what} is not a minimum at {options.method}: relaxed freely it falls to the other side "
                f"(d({symbols[i]}{i}–{symbols[j]}{j}) {atoms.get_distance(i, j):.2f} → "
                f"{outcome.collapsed_to.get_distance(i, j):.2f} Å), so it was relaxed with that distance held at "
                f"{atoms.get_distance(i, j):.2f} Å (not a stationary point)"
            )
            progress(notes[-1])
        relaxed[name] = outcome.atoms
    # The product laid onto the relaxed reactant, so the band starts without a rigid rotation in it.
    relaxed["product_complex"] = reordered(
        relaxed["reactant_complex"], relaxed["product_complex"], AtomMapping(np.arange(len(reactant)), 0.0)
    )
    return relaxed


def _result(
    structures: dict[str, Atoms],
    energies: dict[str, float],
    triple: tuple[int, int, int] | None,
    options: SeedOptions,
    notes: list[str],
    moved: int,
    frequencies: np.ndarray | None = None,
) -> SeedResult:
    xi_values = {name: xi(atoms, triple) for name, atoms in structures.items()} if triple is not None else {}
    return SeedResult(
        seeds={name: _seed_frame(atoms, options) for name, atoms in structures.items()},
        energies=energies,
        triple=triple,
        xi=xi_values,
        frequencies=frequencies,
        notes=notes,
        yaml=reaction_coordinate_yaml(structures["reactant_complex"], triple, xi_values, options.method)
        if triple is not None
        else "",
        reordered_atoms=moved,
    )


def build_reaction_seeds(
    reactant: Atoms, product: Atoms, options: SeedOptions, progress: Progress = _quiet
) -> SeedResult:
    """Reactant complex, transition state and product complex in one atom order (the reactant's), ξ's atoms and
    the YAML snippet (none, with a note, when no broken and formed bond share an atom). SeedInputError for inputs
    that cannot describe a reaction, SeedComputationError for a calculation that fails or finds no saddle point."""
    options = replace(options, method=canonical_method(options.method))
    check_input(reactant, options, "reactant")
    check_input(product, options, "product")
    xtb_calculator(options.method, options.charge, options.multiplicity)  # a missing tblite fails before any work
    check_same_atoms(reactant, product)
    notes: list[str] = []
    product, moved = _mapped_product(reactant, product, notes, progress)
    triple: tuple[int, int, int] | None = None
    try:
        triple = infer_reaction_coordinate(reactant, product)
    except SeedInputError as exc:
        if not notes:  # a reaction whose bond changes give no single ξ (the no-bond-change case is noted already)
            notes.append(f"no reaction coordinate: {exc}")
            progress(notes[-1])
    if triple is not None:
        a, b, c = triple
        symbols = reactant.get_chemical_symbols()
        progress(
            f"reaction coordinate: {symbols[a]}{a}–{symbols[b]}{b} breaks, {symbols[b]}{b}–{symbols[c]}{c} forms: "
            f"ξ = d({a}, {b}) − d({b}, {c})"
        )
    held_before = len(notes)
    relaxed = _relaxed_complexes(reactant, product, triple, options, notes, progress)
    held = notes[held_before:]
    difference = float(
        np.sqrt(((relaxed["reactant_complex"].positions - relaxed["product_complex"].positions) ** 2).sum(1).mean())
    )
    if difference < SAME_STRUCTURE_RMSD:
        raise SeedComputationError(
            f"the reactant and the product relax into the same structure at {options.method} (RMSD "
            f"{difference:.3f} Å after alignment): there is no path between them at this level"
        )

    def calculators() -> Calculator:
        return xtb_calculator(options.method, options.charge, options.multiplicity)

    progress(f"climbing-image NEB with {options.images} images (fmax {options.neb_fmax} eV/Å)")
    try:
        neb = find_transition_state(
            relaxed["reactant_complex"],
            relaxed["product_complex"],
            calculators,
            options.images,
            options.neb_fmax,
            options.neb_steps,
        )
    except NoBarrierError as exc:
        why = f" Why: {held[0]}." if held else ""
        if not options.allow_no_barrier:
            hint = (
                f" Start from a complex that is a minimum at {options.method} (for F⁻ + CH3Cl at GFN2-xTB: the "
                "hydrogen-bonded F⁻···H–CH2Cl, not the back-side complex), or pass"
                if held
                else " Pass"
            )
            raise NoBarrierError(
                f"{exc}.{why}{hint} --no-barrier-ok to write the two complexes and ξ without a transition state",
                exc.energies,
            ) from None
        notes.append(f"{exc}; wrote no transition state.{why}")
        progress(notes[-1])
        ends = {"reactant_complex": exc.energies[0], "product_complex": exc.energies[-1]}
        return _result({name: relaxed[name] for name in ends}, ends, triple, options, notes, moved)
    transition_state, ts_energy = neb.images[neb.highest], neb.energies[neb.highest]
    progress(f"NEB converged in {neb.steps} steps")
    if options.polish_fmax is not None:
        progress(f"polishing the highest image with the dimer method (fmax {options.polish_fmax} eV/Å)")
        polished = polish_transition_state(neb, calculators(), options.polish_fmax, options.relax_steps)
        between = polished is not None and polished[1] > max(neb.energies[0], neb.energies[-1])
        if polished is not None and triple is not None:
            span = sorted((xi(relaxed["reactant_complex"], triple), xi(relaxed["product_complex"], triple)))
            between = between and span[0] < xi(polished[0], triple) < span[1]
        if polished is None or not between:
            notes.append("the dimer method did not converge between the complexes: the NEB's highest image is kept")
            progress(notes[-1])
        else:
            transition_state, ts_energy = polished
    progress("checking the transition state with a finite-difference Hessian")
    frequencies, _ = vibrational_analysis(transition_state, calculators())
    imaginary = imaginary_frequencies(frequencies)
    if len(imaginary) != 1:
        found = ", ".join(f"{value:.0f}i" for value in imaginary) or "none"
        raise SeedComputationError(
            f"the NEB's highest image is not a first-order saddle point: {len(imaginary)} imaginary modes "
            f"({found} cm⁻¹); try more --images or a tighter --neb-fmax"
        )
    structures = {
        "reactant_complex": relaxed["reactant_complex"],
        "transition_state": transition_state,
        "product_complex": relaxed["product_complex"],
    }
    energies = {
        "reactant_complex": neb.energies[0],
        "transition_state": ts_energy,
        "product_complex": neb.energies[-1],
    }
    return _result(structures, energies, triple, options, notes, moved, frequencies)


def build_single_seed(atoms: Atoms, options: SeedOptions, progress: Progress = _quiet) -> SeedResult:
    """One structure relaxed at the cheap level and checked with a Hessian (a note when it is not a minimum)."""
    options = replace(options, method=canonical_method(options.method))
    check_input(atoms, options, "structure")
    calculator = xtb_calculator(options.method, options.charge, options.multiplicity)
    progress(f"relaxing the structure at {options.method}")
    relaxed = relax(atoms, calculator, options.relax_fmax, options.relax_steps, "relaxation")
    progress("checking the minimum with a finite-difference Hessian")
    frequencies, _ = vibrational_analysis(relaxed, xtb_calculator(options.method, options.charge, options.multiplicity))
    notes = []
    imaginary = imaginary_frequencies(frequencies)
    if len(imaginary):
        notes.append(
            f"the relaxed structure is not a minimum: {len(imaginary)} imaginary modes "
            f"({', '.join(f'{value:.0f}i' for value in imaginary)} cm⁻¹)"
        )
    relaxed.calc = xtb_calculator(options.method, options.charge, options.multiplicity)
    energy = float(relaxed.get_potential_energy())
    return SeedResult(
        seeds={SINGLE_SEED_NAME: _seed_frame(relaxed, options)},
        energies={SINGLE_SEED_NAME: energy},
        frequencies=frequencies,
        notes=notes,
    )


def write_seeds(result: SeedResult, directory: Path) -> list[Path]:
    """The seed files (extxyz, one frame each) and, for a reaction, the YAML snippet; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, atoms in result.seeds.items():
        path = directory / f"{name}.xyz"
        write_extxyz(path, [atoms])
        written.append(path)
    if result.yaml:
        path = directory / REACTION_COORDINATE_FILE
        path.write_text(result.yaml, encoding="utf-8")
        written.append(path)
    return written
