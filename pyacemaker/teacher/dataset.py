"""The bundled teacher's training geometries: varied C/H/Cl structures at total charge 0 and −1.

The teacher must be a *general* C/H/Cl model that knows the SN2 region (Cl⁻ + CH3Cl) among other things, as a
real foundation model would, not a fit to the demo's own candidate pool. So the set mixes:

- the SN2 path (charge −1, singlet): the example's seeds rattled at several amplitudes (the exact seeds are
  held out for the barrier check), images along
  reactant → TS → product (the antisymmetric Cl–C–Cl coordinate) with small rattles, C–Cl bonds stretched and
  compressed, the nucleophile approaching from 2.6 Å out to 12 Å (beyond the 5 Å cutoff: Cl⁻ and CH3Cl apart)
  and from off-axis directions, an isolated Cl⁻, and other anions (ClHCl⁻, Cl⁻···CH4);
- neutral closed-shell molecules (CH4, CH3Cl, CH2Cl2, CHCl3, CCl4, HCl, Cl2, H2, C2H6), each at its xTB minimum,
  rattled, and uniformly stretched/compressed;
- the CH3 radical (doublet) as a fragment.

No isolated neutral atom is included: a charge-blind model cannot tell an isolated Cl atom from an isolated
Cl⁻ (same geometry, one atom), and the ion is the one the SN2 asymptote needs.

Every draw comes from one numpy Generator in a fixed order, so the same `random_seed` gives the same set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule

from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, read_structures

# Atom order of every SN2 seed: C, H, H, H, Cl1 (bonded to C in the reactant), Cl2 (the nucleophile).
SN2_SEED_NAMES = ("reactant_complex", "transition_state", "product_complex")
INDEX_C, INDEX_CL1, INDEX_CL2 = 0, 4, 5
NEUTRAL_MOLECULES = ("CH4", "CH3Cl", "H2CCl2", "HCCl3", "CCl4", "HCl", "Cl2", "H2", "C2H6")
SN2_RATTLE_AMPLITUDES = (0.02, 0.05, 0.08, 0.12, 0.16)  # Å, per Cartesian component
MOLECULE_RATTLE_AMPLITUDES = (0.03, 0.06, 0.1)  # Å
GROUP_KEY = "config_type"  # mace reports its error tables per config_type


def _tagged(atoms: Atoms, group: str, charge: int, multiplicity: int) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = None
    atoms.info = {CHARGE_KEY: charge, SPIN_KEY: multiplicity, GROUP_KEY: group}
    return atoms


def _rattled(atoms: Atoms, amplitude: float, rng: np.random.Generator) -> Atoms:
    copy = atoms.copy()
    copy.positions = atoms.positions + rng.normal(0.0, amplitude, atoms.positions.shape)
    return copy


def _with_positions(atoms: Atoms, positions: np.ndarray) -> Atoms:
    copy = atoms.copy()
    copy.positions = positions
    return copy


def _random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)


def sn2_seeds(seed_dir: Path) -> dict[str, Atoms]:
    """The example's SN2 stationary points by name (charge −1, singlet)."""
    return {name: read_structures(seed_dir / f"{name}.xyz")[0] for name in SN2_SEED_NAMES}


def sn2_structures(seeds: dict[str, Atoms], rng: np.random.Generator) -> list[Atoms]:
    """Geometries of Cl⁻ + CH3Cl (charge −1): around the seeds, along the path, and dissociating."""
    reactant, ts, product = (seeds[name] for name in SN2_SEED_NAMES)
    out: list[Atoms] = []

    def add(atoms: Atoms, group: str) -> None:
        out.append(_tagged(atoms, group, -1, 1))

    # The exact seeds are left out: the metrics compare the teacher's barrier on them with xTB's.
    for seed in (reactant, ts, product):
        for amplitude in SN2_RATTLE_AMPLITUDES:
            for _ in range(8):
                add(_rattled(seed, amplitude, rng), "sn2_rattle")

    # Reactant → TS → product, 14 images per segment (ends excluded), each also with a small rattle.
    for start, end in ((reactant, ts), (ts, product)):
        for fraction in np.linspace(0.0, 1.0, 16)[1:-1]:
            image = _with_positions(start, (1 - fraction) * start.positions + fraction * end.positions)
            add(image, "sn2_path")
            add(_rattled(image, 0.04, rng), "sn2_path")

    # C–Cl1 stretched and compressed in the reactant complex (CH3 and Cl2 fixed), then rattled.
    axis = reactant.positions[INDEX_CL1] - reactant.positions[INDEX_C]
    for scale in np.linspace(0.85, 1.35, 12):
        positions = reactant.positions.copy()
        positions[INDEX_CL1] = positions[INDEX_C] + axis * scale
        add(_rattled(_with_positions(reactant, positions), 0.03, rng), "sn2_stretch")

    # The nucleophile approaching the back side (and from off-axis directions), out to far beyond r_max.
    centre = reactant.positions[INDEX_C]
    back_side = reactant.positions[INDEX_CL2] - centre
    back_side /= np.linalg.norm(back_side)
    for distance in np.linspace(2.6, 12.0, 16):
        positions = reactant.positions.copy()
        positions[INDEX_CL2] = centre + back_side * distance
        add(_with_positions(reactant, positions), "sn2_approach")
        add(_rattled(_with_positions(reactant, positions), 0.05, rng), "sn2_approach")
    for _ in range(40):
        direction = _random_unit_vector(rng)
        distance = rng.uniform(3.0, 7.0)
        positions = reactant.positions.copy()
        positions[INDEX_CL2] = centre + direction * distance
        nearest = np.min(np.linalg.norm(positions[:INDEX_CL2] - positions[INDEX_CL2], axis=1))
        if nearest < 2.8:  # keep the ion out of bonding contact with an H or Cl1 (no Cl2⁻-like front side)
            continue
        add(_rattled(_with_positions(reactant, positions), 0.03, rng), "sn2_offaxis")

    # The TS "breathing": both C–Cl bonds stretched or compressed together.
    for scale in np.linspace(0.92, 1.2, 16):
        positions = ts.positions.copy()
        for index in (INDEX_CL1, INDEX_CL2):
            positions[index] = positions[INDEX_C] + (positions[index] - positions[INDEX_C]) * scale
        add(_rattled(_with_positions(ts, positions), 0.03, rng), "sn2_ts_breathing")

    add(Atoms("Cl"), "chloride")
    return out


def other_anions(relax: Callable[[Atoms], Atoms], rng: np.random.Generator) -> list[Atoms]:
    """Charge −1 systems beyond SN2, so that the ion is not tied to one partner."""
    out: list[Atoms] = []
    clhcl = relax(_tagged(Atoms("ClHCl", positions=[[-1.55, 0, 0], [0, 0, 0], [1.55, 0, 0]]), "anion_clhcl", -1, 1))
    out.append(clhcl)
    for amplitude in (0.03, 0.08, 0.15):
        out.extend(_rattled(clhcl, amplitude, rng) for _ in range(4))
    methane = relax(_tagged(molecule("CH4"), "anion_cl_ch4", 0, 1))
    for _ in range(14):
        direction = _random_unit_vector(rng)
        distance = rng.uniform(3.0, 6.5)
        complex_ = methane + Atoms("Cl", positions=[methane.positions[0] + direction * distance])
        if np.min(np.linalg.norm(complex_.positions[:-1] - complex_.positions[-1], axis=1)) < 2.4:
            continue
        out.append(_tagged(_rattled(complex_, 0.04, rng), "anion_cl_ch4", -1, 1))
    return out


def neutral_structures(relax: Callable[[Atoms], Atoms], rng: np.random.Generator) -> list[Atoms]:
    """Closed-shell molecules around their minima, plus the CH3 radical."""
    out: list[Atoms] = []
    species: Sequence[tuple[str, int]] = [(name, 1) for name in NEUTRAL_MOLECULES] + [("CH3", 2)]
    for name, multiplicity in species:
        group = f"neutral_{name}"
        minimum = relax(_tagged(molecule(name), group, 0, multiplicity))
        out.append(minimum)
        for amplitude in MOLECULE_RATTLE_AMPLITUDES:
            out.extend(_rattled(minimum, amplitude, rng) for _ in range(5))
        centroid = minimum.positions.mean(axis=0)
        for scale in (0.9, 0.95, 1.06, 1.12, 1.2):  # two per scale, so no stretch is seen only once
            stretched = _with_positions(minimum, centroid + (minimum.positions - centroid) * scale)
            out.extend(_rattled(stretched, 0.02, rng) for _ in range(2))
    return out


def training_structures(seed_dir: Path, relax: Callable[[Atoms], Atoms], random_seed: int = 0) -> list[Atoms]:
    """The whole unlabelled set, in a fixed order. `relax` takes a tagged molecule to its minimum at the
    labelling level (so rattles are centred where that level puts the molecule)."""
    rng = np.random.default_rng(random_seed)
    frames = sn2_structures(sn2_seeds(seed_dir), rng)
    frames += other_anions(relax, rng)
    frames += neutral_structures(relax, rng)
    return frames
