"""Build the periodic example's MACE teacher for bulk Si, from labels of a deliberately CHEAP DFT level.

    OMP_NUM_THREADS=1 .venv/bin/python examples/si/make_teacher.py [--work-dir build/si_teacher] [--reuse-labels]

The teacher stands for a foundation model: broad but not accurate at the level the run cares about. Its labels
come from Quantum ESPRESSO with the runs' pseudopotential (LDA, Si.pz-vbc) but a 12 Ry cut-off and a 2×2×2 k-grid
for the 8-atom cell (0.62 Å⁻¹): basis-set error that makes the crystal too large and soft (its E(V) curve gives
a₀ = 5.467 Å, B = 90 GPa, against 5.418 Å, 93 GPa at config_quick.yaml's 18 Ry and 5.407 Å, 93 GPa at
config.yaml's 20 Ry / 3×3×3). A run then has to correct the teacher with a few labels of the better level,
which is the situation the pipeline is built for.

Structures (165, fixed numpy seed): the 8-atom cubic cell over a ±6 % range of lattice constants, rattled up to
0.18 Å; random shears with rattles; hot rattles (0.2-0.25 Å, beyond the runs' MD); the 7-atom vacancy cell,
strained and rattled; strained and rattled 2-atom primitive cells. Labels: energy and forces from the oracle's
own qe backend (so the settings mean what they mean in a run); E0 is the cheap level's Si atom in the same box
a run uses for its own E0 (pyacemaker.services.orchestrator.dft_labels.isolated_atoms).

Outputs: examples/si/teacher/si_teacher.model (0.5 MB; mace's stage-two model, float64) and
si_teacher_metrics.json (errors per split, E(V) of the model against its own level, timings). The geometries
come from a fixed seed and mace trains with a fixed seed on one thread: training twice on the same labels gave
the same model. Measured on 2 shared cores: labelling 7 min, training 5-10 min. The labelled set is kept in
--work-dir (labelled.extxyz, e0s.json), so `--reuse-labels` retrains without pw.x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.eos import EquationOfState
from ase.units import GPa

from pyacemaker.config import QeOracleConfig
from pyacemaker.labels import Labels
from pyacemaker.services.oracle.backends.qe import QeBackend
from pyacemaker.services.orchestrator.dft_labels import isolated_atoms
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, read_structures, write_extxyz
from pyacemaker.teacher.build import MACE_SETTINGS, TEST_FRACTION, VALID_FRACTION, rmse_metrics, sha256_of, train_mace
from pyacemaker.teacher.dataset import GROUP_KEY
from pyacemaker.teacher.recipe import split_frames

log = logging.getLogger("make_teacher")

EXAMPLE_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLE_DIR.parents[1]
TEACHER_DIR = EXAMPLE_DIR / "teacher"
MODEL_FILE = TEACHER_DIR / "si_teacher.model"
METRICS_FILE = TEACHER_DIR / "si_teacher_metrics.json"
RANDOM_SEED = 0
LATTICE_CONSTANT_A = 5.431  # experiment; the scans below are relative to it
MAX_RETRIES = 2
MAX_MODEL_BYTES = 1_000_000
# The cheap level: the run's pseudopotential and smearing, a third less cut-off and a coarser k-grid.
TEACHER_LEVEL = QeOracleConfig(
    backend="qe",
    pseudopotentials={"Si": "Si.pz-vbc.UPF"},
    ecutwfc_ry=12.0,
    kpoint_spacing=0.62,
    smearing="marzari-vanderbilt",
    degauss_ry=0.01,
)
# The bundled teacher's small-MACE recipe (pyacemaker/teacher/build.py). One composition, and the E(V) curve
# lives in meV/atom energy differences:
# energies weigh as much as forces from the start (100:100) and ten times more in stage two (SWA). Measured on
# this set: the bundled teacher's weights (20:100, SWA 100:100, 200 epochs here) left the test energy RMSE at
# 15 meV/atom and the bulk modulus at 71 GPa against the level's 90; these reach 8 meV/atom and 88 GPa.
SI_MACE_SETTINGS: dict[str, str | int | float] = {
    **MACE_SETTINGS,
    "max_num_epochs": 300,
    "start_swa": 200,
    "energy_weight": 100,
    "forces_weight": 100,
    "swa_energy_weight": 1000,
    "swa_forces_weight": 100,
}
# Lattice constants of the E(V) scans: ±5 % around experiment, wide enough for a Birch-Murnaghan fit to bracket
# the minimum of both levels and of every model fitted to them.
EOS_SCALES = np.linspace(0.95, 1.05, 9)


def _tagged(atoms: Atoms, group: str) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = None
    atoms.info = {CHARGE_KEY: 0, SPIN_KEY: 1, GROUP_KEY: group}
    return atoms


def _rattled(atoms: Atoms, amplitude: float, rng: np.random.Generator) -> Atoms:
    copy = atoms.copy()
    copy.positions = atoms.positions + rng.normal(0.0, amplitude, atoms.positions.shape)
    return copy


def _sheared(atoms: Atoms, max_strain: float, rng: np.random.Generator) -> Atoms:
    raw = rng.uniform(-max_strain, max_strain, size=(3, 3))
    copy = atoms.copy()
    copy.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + 0.5 * (raw + raw.T)), scale_atoms=True)
    return copy


def training_structures(random_seed: int = RANDOM_SEED) -> list[Atoms]:
    """The unlabelled set, in a fixed order."""
    rng = np.random.default_rng(random_seed)
    out: list[Atoms] = []
    for scale in np.linspace(0.94, 1.06, 13):
        crystal = bulk("Si", "diamond", a=scale * LATTICE_CONSTANT_A, cubic=True)
        out.append(_tagged(crystal, "volume"))
        for amplitude in (0.04, 0.1, 0.18):
            out.append(_tagged(_rattled(crystal, amplitude, rng), "volume_rattle"))
    crystal = bulk("Si", "diamond", a=LATTICE_CONSTANT_A, cubic=True)
    for _ in range(40):
        sheared = _sheared(crystal, 0.05, rng)
        out.append(_tagged(_rattled(sheared, rng.uniform(0.03, 0.15), rng), "shear_rattle"))
    for _ in range(16):  # hotter than the run's MD goes, so the teacher is not extrapolating there
        out.append(_tagged(_rattled(crystal, rng.uniform(0.2, 0.25), rng), "hot"))
    vacancy = crystal.copy()
    del vacancy[0]
    for scale in (0.97, 1.0, 1.03):
        strained = vacancy.copy()
        strained.set_cell(np.asarray(vacancy.cell) * scale, scale_atoms=True)
        out.append(_tagged(strained, "vacancy"))
        for amplitude in (0.05, 0.1, 0.15, 0.2):
            out.extend(_tagged(_rattled(strained, amplitude, rng), "vacancy_rattle") for _ in range(2))
    primitive = bulk("Si", "diamond", a=LATTICE_CONSTANT_A)
    for _ in range(30):
        strained = _sheared(primitive, 0.06, rng)
        out.append(_tagged(_rattled(strained, rng.uniform(0.0, 0.12), rng), "primitive"))
    return out


def pw_labels(backend: QeBackend, atoms: Atoms, scratch: Path, prefix: str) -> Labels:
    """pw.x labels of one structure, run in a fresh scratch directory under `scratch`: the backend runs pw.x in
    the current directory, as the oracle's executor arranges."""
    with contextlib.chdir(tempfile.mkdtemp(prefix=prefix, dir=scratch)):
        return backend.label_with_retries(atoms, MAX_RETRIES)


def qe_energies_and_forces(backend: QeBackend, frames: Sequence[Atoms], scratch: Path) -> list[Atoms]:
    """Frames with REF_energy / REF_forces (mace's default keys) from pw.x, one scratch dir per calculation;
    a structure that fails every retry is dropped with a log line."""
    labelled = []
    started = time.perf_counter()
    for index, atoms in enumerate(frames):
        labels = pw_labels(backend, atoms, scratch, f"pw{index:04d}_")
        if labels.energy is None or labels.forces is None:
            log.warning("dropping a %s structure: %s", atoms.info.get(GROUP_KEY), labels.reason)
            continue
        copy = atoms.copy()
        copy.info["REF_energy"] = labels.energy
        copy.arrays["REF_forces"] = labels.forces.copy()
        labelled.append(copy)
        if (index + 1) % 10 == 0 or index + 1 == len(frames):
            elapsed = time.perf_counter() - started
            left = elapsed / (index + 1) * (len(frames) - index - 1)
            log.info("labelled %d/%d (%.0f s, ~%.0f s left)", index + 1, len(frames), elapsed, left)
    return labelled


def isolated_atom_energy(backend: QeBackend, scratch: Path) -> dict[int, float]:
    """E0 of Si at this level, from the same boxed atom a run uses for its own E0."""
    (atom,) = isolated_atoms([14], periodic=True)
    labels = pw_labels(backend, atom, scratch, "pw_atom_")
    if labels.energy is None:
        raise RuntimeError(f"the isolated Si atom could not be computed: {labels.reason}")
    return {14: labels.energy}


def equation_of_state(energy_of: Callable[[Atoms], float]) -> dict[str, float]:
    """Equilibrium lattice constant (Å), bulk modulus (GPa) and energy per atom (eV) of diamond Si from a
    Birch-Murnaghan fit of E(V) at EOS_SCALES × 5.431 Å; `energy_of` gives the total energy of a cell.

    The cell is the 8-atom cubic one the runs train on: pw.x's k-grid follows the cell (kpoint_spacing), and
    the primitive cell's grid samples the zone differently, which moves a coarse level's minimum by ~0.01 Å."""
    volumes, energies = [], []
    for scale in EOS_SCALES:
        cell = bulk("Si", "diamond", a=scale * LATTICE_CONSTANT_A, cubic=True)
        volumes.append(cell.get_volume() / len(cell))
        energies.append(energy_of(cell) / len(cell))
    volume, energy, modulus = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    # 8 atoms per conventional cubic cell: a³ = 8 V/atom.
    return {
        "lattice_constant_a": float((8 * volume) ** (1 / 3)),
        "bulk_modulus_gpa": float(modulus / GPa),
        "energy_ev_per_atom": float(energy),
    }


def qe_energy_function(backend: QeBackend, scratch: Path) -> Callable[[Atoms], float]:
    """Total energy of a cell from pw.x at the backend's level, run in its own scratch directory."""

    def energy(atoms: Atoms) -> float:
        labels = pw_labels(backend, _tagged(atoms, "eos"), scratch, "pw_eos_")
        if labels.energy is None:
            raise RuntimeError(f"E(V) point failed: {labels.reason}")
        return labels.energy

    return energy


def calculator_energy_function(calculator: object) -> Callable[[Atoms], float]:
    """Total energy of a cell from an ASE calculator (a MACE model, an ACE potential)."""

    def energy(atoms: Atoms) -> float:
        atoms = atoms.copy()
        atoms.calc = calculator
        return float(atoms.get_potential_energy())

    return energy


def labelled_set(backend: QeBackend, work_dir: Path, reuse: bool) -> tuple[list[Atoms], dict[int, float]]:
    """The training structures with their labels and E0, from pw.x or (`reuse`) from an earlier build's
    labelled.extxyz in work_dir when it holds exactly these structures at this level."""
    frames = training_structures()
    cache, e0_cache = work_dir / "labelled.extxyz", work_dir / "e0s.json"
    if reuse and cache.is_file() and e0_cache.is_file():
        cached = json.loads(e0_cache.read_text())
        labelled = read_structures(cache)
        if cached["level_of_theory"] == backend.level_of_theory and _is_subsequence(labelled, frames):
            log.info("reusing %d labelled structures from %s", len(labelled), cache)
            for atoms in labelled:
                atoms.info["REF_energy"] = atoms.get_potential_energy()
                atoms.arrays["REF_forces"] = atoms.get_forces()
                atoms.calc = None
            return labelled, {int(z): float(e) for z, e in cached["e0s_ev"].items()}
        log.info("%s holds other structures or another level; labelling again", cache)
    scratch = work_dir / "pw"
    scratch.mkdir(exist_ok=True)
    log.info("labelling %d structures at %s", len(frames), backend.level_of_theory)
    labelled = qe_energies_and_forces(backend, frames, scratch)
    e0s = isolated_atom_energy(backend, scratch)
    write_extxyz(cache, [_with_labels_as_results(a) for a in labelled])
    e0_cache.write_text(json.dumps({"level_of_theory": backend.level_of_theory, "e0s_ev": e0s}))
    return labelled, e0s


def _is_subsequence(labelled: Sequence[Atoms], frames: Sequence[Atoms]) -> bool:
    """Whether `labelled` holds some of `frames`, in their order (failed calculations leave gaps). Geometries
    compare to 1e-5 Å: extxyz's decimals move a coordinate across content_id's 1e-6 Å rounding now and then."""
    remaining = iter(frames)
    return all(any(_same_geometry(atoms, frame) for frame in remaining) for atoms in labelled)


def _same_geometry(first: Atoms, second: Atoms) -> bool:
    return (
        len(first) == len(second)
        and np.array_equal(first.numbers, second.numbers)
        and np.allclose(first.cell.array, second.cell.array, atol=1e-5)
        and np.allclose(first.positions, second.positions, atol=1e-5)
    )


def _with_labels_as_results(atoms: Atoms) -> Atoms:
    """A copy whose REF_energy/REF_forces are calculator results, so that extxyz stores them as labels."""
    copy = atoms.copy()
    copy.info.pop("REF_energy")
    forces = copy.arrays.pop("REF_forces")
    copy.calc = SinglePointCalculator(copy, energy=atoms.info["REF_energy"], forces=forces)
    return copy


def build(work_dir: Path, reuse_labels: bool = False) -> dict:
    """The whole recipe; returns the metrics it writes."""
    import mace
    import torch
    from mace.calculators import MACECalculator

    work_dir.mkdir(parents=True, exist_ok=True)
    scratch = work_dir / "pw"
    scratch.mkdir(exist_ok=True)
    backend = QeBackend(TEACHER_LEVEL)
    started = time.perf_counter()
    labelled, e0s = labelled_set(backend, work_dir, reuse_labels)
    sets = split_frames(labelled, np.random.default_rng(RANDOM_SEED + 1), VALID_FRACTION, TEST_FRACTION)
    for name, subset in sets.items():
        write_extxyz(work_dir / f"{name}.extxyz", subset)
    labelling_s = time.perf_counter() - started

    started = time.perf_counter()
    trained = train_mace(work_dir, e0s, "si_teacher", SI_MACE_SETTINGS)
    training_s = time.perf_counter() - started
    size = trained.stat().st_size
    if size >= MAX_MODEL_BYTES:
        raise RuntimeError(f"{trained} is {size} bytes; the committed teacher must stay under {MAX_MODEL_BYTES}")
    TEACHER_DIR.mkdir(parents=True, exist_ok=True)
    MODEL_FILE.write_bytes(trained.read_bytes())

    calculator = MACECalculator(model_paths=str(MODEL_FILE), device="cpu", default_dtype="float64")
    groups: dict[str, int] = {}
    for atoms in labelled:
        groups[atoms.info[GROUP_KEY]] = groups.get(atoms.info[GROUP_KEY], 0) + 1
    metrics = {
        "model_file": MODEL_FILE.name,
        "model_sha256": sha256_of(MODEL_FILE),
        "model_bytes": size,
        "level_of_theory": backend.level_of_theory,
        "elements": ["Si"],
        "e0s_ev": {str(z): e for z, e in e0s.items()},
        "mace_settings": SI_MACE_SETTINGS,
        "random_seed": RANDOM_SEED,
        "n_structures": {name: len(subset) for name, subset in sets.items()},
        "structure_groups": dict(sorted(groups.items())),
        **{name: rmse_metrics(MODEL_FILE, subset) for name, subset in sets.items()},
        "equation_of_state": {
            "teacher_level_qe": equation_of_state(qe_energy_function(backend, scratch)),
            "teacher_model": equation_of_state(calculator_energy_function(calculator)),
        },
        "labels_reused": reuse_labels,  # then labelling_wall_s is the time to read them back
        "labelling_wall_s": round(labelling_s, 1),
        "training_wall_s": round(training_s, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "versions": {"mace-torch": mace.__version__, "torch": torch.__version__},
    }
    METRICS_FILE.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "build" / "si_teacher")
    parser.add_argument(
        "--reuse-labels", action="store_true", help="train on the labels an earlier build left in --work-dir"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    metrics = build(args.work_dir.resolve(), args.reuse_labels)
    summary = ("n_structures", "train", "valid", "test", "equation_of_state", "labelling_wall_s", "training_wall_s")
    print(json.dumps({k: metrics[k] for k in summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
