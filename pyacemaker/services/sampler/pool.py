"""Candidate-pool generation (step 1a): many cheap variations of the seed structures, from which DIRECT later
picks a diverse subset.

Every operation draws from one numpy Generator seeded with `PoolConfig.random_seed` in a fixed order, so the
same seeds and config give the same pool. Each candidate records how it was made in `atoms.info` ("operation",
"parent_id" = content id of the structure it came from, and the operation's parameters), which survives the
extxyz round trip, so a selected structure can be traced back to its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

from pyacemaker.config import MdConfig, PoolConfig
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, charge_of, content_id, spin_multiplicity_of

ProgressCallback = Callable[[int, int, str], None]

# Provenance keys this module writes; stale copies inherited from a seed's info are removed first, so a
# strained copy of a rattled seed does not claim a rattle amplitude.
PROVENANCE_KEYS = frozenset(
    {
        "operation",
        "parent_id",
        "amplitude",
        "max_strain",
        "end_parent_id",
        "fraction",
        "rattle",
        "angle_deg",
        "fragment_size",
        "content_id",
    }
)
# Bonds are covalent-radius sums times this factor; 1.2 keeps a stretched C–Cl (1.8–2.1 Å) bonded but
# separates an ion–dipole complex (C···Cl⁻ ≈ 3.2 Å) into its molecules.
BOND_TOLERANCE = 1.2


@dataclass
class PoolResult:
    structures: list[Atoms]
    # Candidates dropped because two atoms came closer than `min_distance`.
    n_rejected: int


def _candidate(parent: Atoms, positions: np.ndarray, operation: str, parent_id: str | None, **params: object) -> Atoms:
    """A copy of `parent` with new positions, charge and spin made explicit, and provenance recorded."""
    atoms = parent.copy()
    atoms.calc = None
    atoms.positions = positions
    for key in PROVENANCE_KEYS:
        atoms.info.pop(key, None)
    atoms.info[CHARGE_KEY] = charge_of(parent)
    atoms.info[SPIN_KEY] = spin_multiplicity_of(parent)
    atoms.info["operation"] = operation
    if parent_id is not None:  # extxyz cannot store an empty string, so seeds simply have no parent_id
        atoms.info["parent_id"] = parent_id
    atoms.info.update(params)
    return atoms


def has_short_contact(atoms: Atoms, min_distance: float) -> bool:
    """Whether any two atoms (periodic images included, i.e. minimum image and closer) are nearer than
    `min_distance`."""
    if len(atoms) < 2 and not atoms.pbc.any():
        return False
    if atoms.pbc.any():
        return len(neighbor_list("d", atoms, min_distance)) > 0
    diff = atoms.positions[:, None, :] - atoms.positions[None, :, :]
    distances = np.linalg.norm(diff, axis=-1)
    upper = np.triu_indices(len(atoms), k=1)
    return bool((distances[upper] < min_distance).any())


def _rattled(seed: Atoms, seed_id: str, amplitude: float, rng: np.random.Generator) -> Atoms:
    positions = seed.positions + rng.normal(0.0, amplitude, size=seed.positions.shape)
    return _candidate(seed, positions, "rattle", seed_id, amplitude=float(amplitude))


def _strained(seed: Atoms, seed_id: str, max_strain: float, rng: np.random.Generator) -> Atoms:
    """A random symmetric strain ε with |ε_ij| ≤ max_strain; atoms move with the cell (cell → cell·(1+ε))."""
    raw = rng.uniform(-max_strain, max_strain, size=(3, 3))
    strain = 0.5 * (raw + raw.T)
    deformation = np.eye(3) + strain
    atoms = _candidate(seed, seed.positions, "strain", seed_id, max_strain=float(max_strain))
    atoms.set_cell(np.asarray(seed.cell) @ deformation, scale_atoms=True)
    return atoms


def rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues' formula: rotation by `angle_rad` about the unit vector along `axis` (right-handed)."""
    unit = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0.0, -unit[2], unit[1]], [unit[2], 0.0, -unit[0]], [-unit[1], unit[0], 0.0]])
    return np.eye(3) + np.sin(angle_rad) * cross + (1.0 - np.cos(angle_rad)) * (cross @ cross)


def molecular_fragments(atoms: Atoms) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Covalently connected fragments as (atom indices, unwrapped positions).

    Two atoms are bonded when closer than BOND_TOLERANCE × the sum of their covalent radii (through periodic
    boundaries too). Unwrapped positions place every atom of a fragment next to its bonded neighbours, so the
    fragment can be rotated as a rigid body; they are None for a fragment bonded to its own periodic image
    (a chain, a layer or a framework), which has no finite extent to rotate.
    """
    radii = BOND_TOLERANCE * covalent_radii[atoms.numbers]
    first, second, shifts = neighbor_list("ijS", atoms, radii)
    cell = np.asarray(atoms.cell)
    order = np.argsort(first, kind="stable")
    first, second, shifts = first[order], second[order], shifts[order]
    starts = np.searchsorted(first, np.arange(len(atoms) + 1))
    image_of = np.full((len(atoms), 3), np.iinfo(np.int64).min, dtype=np.int64)
    fragments: list[tuple[np.ndarray, np.ndarray | None]] = []
    for root in range(len(atoms)):
        if image_of[root, 0] != np.iinfo(np.int64).min:
            continue
        image_of[root] = 0
        members = [root]
        finite = True
        stack = [root]
        while stack:
            atom = stack.pop()
            for edge in range(starts[atom], starts[atom + 1]):
                neighbour = second[edge]
                image = image_of[atom] + shifts[edge]
                if image_of[neighbour, 0] == np.iinfo(np.int64).min:
                    image_of[neighbour] = image
                    members.append(neighbour)
                    stack.append(neighbour)
                elif not np.array_equal(image_of[neighbour], image):
                    finite = False  # reached the same atom in another cell: an infinite network
        indices = np.array(sorted(members), dtype=np.int64)
        unwrapped = atoms.positions[indices] + image_of[indices] @ cell if finite else None
        fragments.append((indices, unwrapped))
    return fragments


def _fragment_rotated(
    seed: Atoms,
    seed_id: str,
    fragment: tuple[np.ndarray, np.ndarray],
    max_rotation_deg: float,
    rng: np.random.Generator,
) -> Atoms:
    indices, unwrapped = fragment
    axis = rng.normal(size=3)
    angle_deg = float(rng.uniform(0.0, max_rotation_deg))
    centroid = unwrapped.mean(axis=0)
    rotated = (unwrapped - centroid) @ rotation_matrix(axis, np.radians(angle_deg)).T + centroid
    positions = seed.positions.copy()
    positions[indices] = rotated
    return _candidate(seed, positions, "rotate_fragment", seed_id, angle_deg=angle_deg, fragment_size=len(indices))


def _rotatable_fragments(atoms: Atoms) -> list[tuple[np.ndarray, np.ndarray]]:
    """Finite fragments of at least two atoms; none when the whole structure is one fragment (rotating it
    would only turn the molecule as a whole)."""
    fragments = molecular_fragments(atoms)
    if len(fragments) < 2:
        return []
    return [(indices, unwrapped) for indices, unwrapped in fragments if len(indices) >= 2 and unwrapped is not None]


def _kabsch_aligned(mobile: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`mobile` rigidly rotated and translated onto `reference` with the smallest RMSD (proper rotation)."""
    mobile_centroid = mobile.mean(axis=0)
    reference_centroid = reference.mean(axis=0)
    covariance = (mobile - mobile_centroid).T @ (reference - reference_centroid)
    left, _, right_t = np.linalg.svd(covariance)
    handedness = np.sign(np.linalg.det(left @ right_t)) or 1.0
    correction = np.diag([1.0, 1.0, handedness])
    rotation = left @ correction @ right_t
    return (mobile - mobile_centroid) @ rotation + reference_centroid


def can_interpolate(start: Atoms, end: Atoms) -> bool:
    """Seeds can be interpolated when they hold the same atoms in the same order, with the same periodicity,
    charge and spin."""
    return (
        len(start) == len(end)
        and np.array_equal(start.numbers, end.numbers)
        and np.array_equal(start.pbc, end.pbc)
        and charge_of(start) == charge_of(end)
        and spin_multiplicity_of(start) == spin_multiplicity_of(end)
    )


def _interpolated(start: Atoms, end: Atoms, n_images: int, rattle: float, rng: np.random.Generator) -> Iterator[Atoms]:
    """Images strictly between two seeds, linear in positions (molecules: after aligning `end` onto `start`)
    or in fractional coordinates and cell (periodic: the shortest periodic path of each atom)."""
    start_id, end_id = content_id(start), content_id(end)
    periodic = bool(start.pbc.any())
    if periodic:
        start_frac = start.get_scaled_positions(wrap=False)
        step_frac = end.get_scaled_positions(wrap=False) - start_frac
        step_frac -= np.round(step_frac) * start.pbc
        start_cell, end_cell = np.asarray(start.cell), np.asarray(end.cell)
    else:
        end_positions = _kabsch_aligned(end.positions, start.positions)
    for image in range(1, n_images + 1):
        fraction = image / (n_images + 1)
        if periodic:
            cell = (1.0 - fraction) * start_cell + fraction * end_cell
            positions = (start_frac + fraction * step_frac) @ cell
        else:
            positions = (1.0 - fraction) * start.positions + fraction * end_positions
        if rattle > 0:
            positions = positions + rng.normal(0.0, rattle, size=positions.shape)
        atoms = _candidate(
            start, positions, "interpolate", start_id, end_parent_id=end_id, fraction=fraction, rattle=float(rattle)
        )
        if periodic:
            atoms.set_cell(cell, scale_atoms=False)
        yield atoms


# Candidates one pool may plan: each is held in memory until the pool is written (a few kB apiece).
MAX_POOL_CANDIDATES = 200_000


def check_pool_size(n_seeds: int, config: PoolConfig) -> None:
    """ValueError when the settings could plan more than MAX_POOL_CANDIDATES candidates (an upper bound that
    counts every variant for every seed, before any is made)."""
    config = config.resolved(MdConfig().temperatures)
    assert config.rattle_amplitudes is not None
    per_seed = (
        1
        + len(config.rattle_amplitudes) * config.rattles_per_amplitude
        + config.strains_per_seed
        + config.fragment_rotations_per_seed
    )
    bound = n_seeds * per_seed + config.interpolation_images * max(n_seeds - 1, 0)
    if bound > MAX_POOL_CANDIDATES:
        raise ValueError(
            f"these settings plan up to {bound} candidates from {n_seeds} seed(s) (at most {MAX_POOL_CANDIDATES}); "
            "lower rattles_per_amplitude, strains_per_seed, fragment_rotations_per_seed or interpolation_images"
        )


def generate_pool(seeds: list[Atoms], config: PoolConfig, progress: ProgressCallback | None = None) -> PoolResult:
    """The seeds plus rattled, strained (periodic only), fragment-rotated and interpolated variants.

    Order: for each seed, the seed, its rattles (by amplitude), strains and fragment rotations; then the
    interpolation images between each consecutive pair of compatible seeds. Candidates with a contact shorter
    than `config.min_distance` are dropped and counted. `progress(done, total, message)` is called after each
    batch; `total` is the number of candidates planned. Without rattle amplitudes the thermal ones of the md
    section's default temperatures are used (the orchestrator sends the run's own, `PoolConfig.resolved`).
    """
    if not seeds:
        raise ValueError("generate_pool needs at least one seed structure")
    config = config.resolved(MdConfig().temperatures)
    assert config.rattle_amplitudes is not None
    check_pool_size(len(seeds), config)
    rng = np.random.default_rng(config.random_seed)
    seed_ids = [content_id(seed) for seed in seeds]
    rotatable = [_rotatable_fragments(seed) for seed in seeds]
    interpolable = [can_interpolate(start, end) for start, end in pairwise(seeds)]
    planned = sum(
        1
        + len(config.rattle_amplitudes) * config.rattles_per_amplitude
        + (config.strains_per_seed if seed.pbc.any() else 0)
        + (config.fragment_rotations_per_seed if rotatable[i] else 0)
        for i, seed in enumerate(seeds)
    ) + config.interpolation_images * sum(interpolable)

    structures: list[Atoms] = []
    n_rejected = 0
    done = 0

    def keep(batch: list[Atoms], message: str) -> None:
        nonlocal n_rejected, done
        for atoms in batch:
            if has_short_contact(atoms, config.min_distance):
                n_rejected += 1
            else:
                structures.append(atoms)
        done += len(batch)
        if progress is not None:
            progress(done, planned, message)

    for i, (seed, seed_id) in enumerate(zip(seeds, seed_ids, strict=True)):
        label = f"seed {i + 1}/{len(seeds)}"
        keep([_candidate(seed, seed.positions, "seed", None)], f"{label}: seed")
        for amplitude in config.rattle_amplitudes:
            batch = [_rattled(seed, seed_id, amplitude, rng) for _ in range(config.rattles_per_amplitude)]
            keep(batch, f"{label}: rattle {amplitude:g} Å")
        if seed.pbc.any() and config.strains_per_seed:
            batch = [_strained(seed, seed_id, config.max_strain, rng) for _ in range(config.strains_per_seed)]
            keep(batch, f"{label}: strain")
        if rotatable[i] and config.fragment_rotations_per_seed:
            batch = []
            for _ in range(config.fragment_rotations_per_seed):
                fragment = rotatable[i][rng.integers(len(rotatable[i]))]
                batch.append(_fragment_rotated(seed, seed_id, fragment, config.max_rotation_deg, rng))
            keep(batch, f"{label}: fragment rotations")
    for i, compatible in enumerate(interpolable):
        if compatible and config.interpolation_images:
            batch = list(
                _interpolated(seeds[i], seeds[i + 1], config.interpolation_images, config.interpolation_rattle, rng)
            )
            keep(batch, f"interpolation seed {i + 1} → {i + 2}")
    return PoolResult(structures=structures, n_rejected=n_rejected)
