"""Committee active learning against random selection on the SN2 pool: held-out force and energy RMSE of a MACE
fine-tuned from the bundled teacher on N actively vs N randomly chosen structures, same N, several seeds.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/active_vs_random.py [--n0 20] [--n-total 40] \
        [--iterations 2] [--seeds 0 1 2]          # ~5 min per 3 seeds on one busy core

GFN2-xTB (the xtb oracle backend) plays DFT: its labels are the reference everywhere. The pool and the DIRECT
start come from the SN2 example config (pool generator and DIRECT on the distribution features, exactly as
step 1).

Candidates, as step 2 sees them: the pool (less DIRECT and the pool hold-out) plus `--md-candidates` frames of
MD along the config's restraint windows (the sampler's own MD engine, in this process). In a run those frames
come from step 4's MD with the fine-tuned committee (iteration 2 on) and, when active_learning.md_candidate_steps
is set, from a short teacher MD in iteration 1; here from the teacher, so every iteration of the benchmark sees
the same candidates. `--md-candidates 0` gives the pool alone (what step 2 scored before MD frames were candidates).

Three hold-outs, fixed (seed HELD_OUT_SEED and the MD seeds) before any selection was scored:
  MD hold-out (primary): frames of GFN2-xTB Langevin MD from each seed at each of the config's MD temperatures.
          The finished potential is for MD at these temperatures, so this is where its errors matter; neither
          selection can draw these frames, so neither gets an i.i.d. advantage.
  window hold-out: frames of GFN2-xTB MD along the config's windows (another MD seed than the candidates'),
          the states step 4 samples across the barrier.
  pool hold-out: `--held-out` random pool structures outside DIRECT, removed from the candidates. It has the
          pool's distribution, which random selection samples by construction, and is dominated by the pool's
          large rattles (its force RMS is ~3x the MD frames').

Both selections start from the same n0 DIRECT structures; only the N − n0 additions differ:
  active: step 2's selection, iterated: per iteration, a committee of K members fine-tuned from the teacher on
          bootstrap samples of the labelled set (different seeds) scores every candidate by its max force std
          (mace oracle backend); the spread is calibrated on the labelled set (calibration_factor against the
          committee mean's true max force error); candidates whose committee-mean largest force exceeds
          active_learning.max_candidate_force, or the largest among the MD-frame candidates if lower, are never
          chosen (candidate_force_cap and below_force_cap, as step 2); select_uncertain
          takes the most uncertain candidates above the threshold, with the diversity guard on the committee's
          invariant MACE descriptors. If fewer than the batch pass the threshold, the rest are taken by the
          same ranking, cap and guard without it (said in the output), so both sets have exactly N.
  random: N − n0 candidates drawn uniformly with the seed (no cap: random selection knows no model).
As in a run, labelled structures whose xtb forces exceed active_learning.max_candidate_force are not trained on
(either selection; both still count N). Then ONE model per set is fine-tuned from the teacher with identical
settings and the same seed per pair, long enough (`--final-epochs`, 100) that the fine-tuning seed moves its
held-out force RMSE by ~1 meV/Å (measured: three seeds on one training set gave 56.4, 55.8, 57.4 meV/Å at 100
epochs; 78.7, 66.0, 78.5 at 30), and scored on every hold-out; the teacher's own RMSE on each is printed for
reference.

E0s: the fine-tuning fits the labels' per-element offset from the teacher itself (see
pyacemaker.services.trainer.mace_finetune.aligned_reference_energies); xtb is the teacher's own level, so it is
small here.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from pyacemaker.clients.sampler import md_settings
from pyacemaker.config import MaceOracleConfig, RunConfig, XtbOracleConfig, load_config
from pyacemaker.restraints import DistanceDifferenceRestraint
from pyacemaker.seeds import load_seeds
from pyacemaker.services.oracle.backends.mace import MaceBackend
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from pyacemaker.services.orchestrator.active_learning import (
    below_force_cap,
    calibration_factor,
    candidate_force_cap,
    max_force_error,
    select_uncertain,
    within_force_cap,
)
from pyacemaker.services.sampler.direct import select_direct
from pyacemaker.services.sampler.features import get_featuriser
from pyacemaker.services.sampler.md import FrameEvent
from pyacemaker.services.sampler.md import run_md as run_md_engine
from pyacemaker.services.sampler.pool import generate_pool
from pyacemaker.services.sampler.server import md_parameters_from_settings
from pyacemaker.services.trainer.evaluation import evaluate_calculator, mace_calculator
from pyacemaker.services.trainer.mace_finetune import FinetuneSettings, finetune_committee
from pyacemaker.teacher import resolve_teacher

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "sn2" / "config.yaml"
HELD_OUT_SEED = 12345
MD_FRICTION = 0.02  # Langevin friction, 1/(ASE time unit): weak, so the dynamics stays close to Newtonian
MD_EQUILIBRATION_STEPS = 100
START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


class XtbLabeller:
    """GFN2-xTB labels of pool structures by index, each computed once; only the held-out set and chosen structures
    are ever labelled, as a DFT budget would allow."""

    def __init__(self, pool: Sequence[Atoms]) -> None:
        self.pool = pool
        self.backend = XtbBackend(XtbOracleConfig(backend="xtb", method="GFN2-xTB"))
        self.labelled: dict[int, Atoms] = {}

    def __call__(self, indices: Sequence[int]) -> list[Atoms]:
        missing = [int(i) for i in indices if int(i) not in self.labelled]
        for index, labels in zip(missing, self.backend.label_batch([self.pool[i] for i in missing]), strict=True):
            if not labels.HasField("energy"):
                raise RuntimeError(f"xtb failed on pool structure {index}: {labels.reason}")
            atoms = self.pool[index].copy()
            forces = np.array(labels.forces).reshape(len(atoms), 3)
            atoms.calc = SinglePointCalculator(atoms, energy=float(labels.energy), forces=forces)
            self.labelled[index] = atoms
        return [self.labelled[int(i)] for i in indices]


def md_hold_out(
    seeds: Sequence[Atoms], temperatures: Sequence[float], timestep_fs: float, replicas: int, frames: int, every: int
) -> list[Atoms]:
    """Frames of GFN2-xTB ("DFT") Langevin MD from every seed at every temperature of the config's MD step,
    `replicas` runs each, `frames` snapshots `every` steps after MD_EQUILIBRATION_STEPS, each with the MD's own
    xtb energy and forces. These are the states the finished potential is meant to simulate, and neither
    selection can draw them. The centre of mass is fixed by a constraint, not by Langevin's fixcm, which heats
    a 6-atom molecule to about twice the target temperature (pyacemaker/services/sampler/md.py)."""
    backend = XtbBackend(XtbOracleConfig(backend="xtb", method="GFN2-xTB"))
    rng = np.random.default_rng(HELD_OUT_SEED)
    snapshots = []
    for seed in seeds:
        for temperature in temperatures:
            for _ in range(replicas):
                atoms = seed.copy()
                atoms.calc = backend.calculator(atoms)
                atoms.set_constraint(FixCom())
                MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
                dynamics = Langevin(
                    atoms,
                    timestep_fs * units.fs,
                    temperature_K=temperature,
                    friction=MD_FRICTION,
                    fixcm=False,
                    rng=rng,
                )
                dynamics.run(MD_EQUILIBRATION_STEPS)
                for _ in range(frames):
                    dynamics.run(every)
                    snapshot = atoms.copy()
                    snapshot.set_constraint()
                    snapshot.info.update(md_temperature_k=temperature)
                    # The raw xtb forces: get_forces() would return them with FixCom's correction applied,
                    # off by up to ~1 eV/Å from a single-point label.
                    snapshot.calc = SinglePointCalculator(
                        snapshot,
                        energy=atoms.get_potential_energy(),
                        forces=atoms.get_forces(apply_constraint=False),
                    )
                    snapshots.append(snapshot)
    return snapshots


def window_md_frames(
    seeds: Sequence[Atoms],
    config: RunConfig,
    force_field: MaceBackend | XtbBackend,
    steps: int,
    skip_steps: int,
    keep: int,
    random_seed: int,
) -> list[Atoms]:
    """Frames of the config's step-4 MD (its restraint windows along ξ, temperatures and replicas per window)
    with `force_field`, run by the sampler's own engine in this process: every replica's frames after
    `skip_steps`, thinned evenly to `keep`. Each frame carries the force field's unbiased labels."""
    md = config.md.model_copy(update={"steps": steps, "n_frames": keep, "random_seed": random_seed})
    params = md_parameters_from_settings(md_settings(md))
    windows = []
    if md.windows is not None:
        a, b, c = md.windows.atoms
        windows = [DistanceDifferenceRestraint(a, b, c, x, md.windows.force_constant) for x in md.windows.centers()]
    frames = [
        event.atoms
        for event in run_md_engine(seeds, params, lambda batch: list(force_field.label_batch(batch)), windows)
        if isinstance(event, FrameEvent) and event.step > skip_steps
    ]
    chosen = np.unique(np.linspace(0, len(frames) - 1, min(keep, len(frames))).round().astype(int))
    return [frames[i] for i in chosen]


@dataclass
class Experiment:
    pool: list[Atoms]  # the step-1 pool's n_pool structures, then the MD-frame candidates
    n_pool: int
    direct: np.ndarray
    candidates: np.ndarray
    hold_outs: dict[str, list[Atoms]]
    label: XtbLabeller
    config: RunConfig
    teacher: Path
    work_dir: Path
    committee_size: int
    committee_epochs: int
    final_epochs: int
    energy_weight: float
    forces_weight: float


def quietly_finetune(
    settings: FinetuneSettings, train: list[Atoms], validation: list[Atoms], work_dir: Path
) -> list[Path]:
    """finetune_committee with mace's console logging sent to a file in `work_dir` (mace logs through the root
    logger, whose handlers, e.g. from an earlier basicConfig, are set aside meanwhile)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers = list(root.handlers)
    for handler in handlers:
        root.removeHandler(handler)
    try:
        with (
            open(work_dir / "mace_console.log", "w") as log_file,
            contextlib.redirect_stdout(log_file),
            contextlib.redirect_stderr(log_file),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            models, _ = finetune_committee(settings, train, validation, [], work_dir)
    finally:
        for handler in handlers:
            root.addHandler(handler)
    return models


def settings_for(experiment: Experiment, committee_size: int, seed: int, epochs: int) -> FinetuneSettings:
    return FinetuneSettings(
        foundation_model=experiment.teacher,
        committee_size=committee_size,
        seed=seed,
        max_epochs=epochs,
        multihead_replay=False,
        energy_weight=experiment.energy_weight,
        forces_weight=experiment.forces_weight,
    )


def mace_backend(models: list[Path]) -> MaceBackend:
    return MaceBackend(MaceOracleConfig(backend="mace", models=models, batch_size=64))


def committee_predictions(backend: MaceBackend, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Max force std per structure and the committee mean forces, through the mace oracle backend."""
    std, forces = [], []
    for atoms, labels in zip(frames, backend.label_batch(frames), strict=True):
        std.append(labels.uncertainty.max_force_std)
        forces.append(np.array(labels.forces).reshape(len(atoms), 3))
    return np.array(std), forces


def committee_descriptors(backend: MaceBackend, frames: Sequence[Atoms]) -> np.ndarray:
    """The committee's invariant descriptors (its first model's, as the orchestrator's diversity guard uses)."""
    return np.vstack(list(backend.describe_batch(frames)))


def active_selection(experiment: Experiment, seed: int, n_total: int, iterations: int) -> list[int]:
    """Step 2's selection, iterated: calibrated committee spread above the threshold, most uncertain first,
    diversity guard, candidates above active_learning.max_candidate_force (committee mean) never chosen."""
    al = experiment.config.active_learning
    labelled = [int(i) for i in experiment.direct]
    n0 = len(labelled)
    for iteration in range(iterations):
        remaining = n_total - len(labelled)
        if remaining <= 0:
            break
        batch = -(-remaining // (iterations - iteration))  # spread the additions evenly over the iterations
        train, _ = within_force_cap(experiment.label(labelled), al.max_candidate_force)
        committee_dir = experiment.work_dir / f"seed{seed}" / f"committee{iteration}"
        started = time.perf_counter()
        models = quietly_finetune(
            settings_for(experiment, experiment.committee_size, 100 * seed + iteration, experiment.committee_epochs),
            train,
            [],
            committee_dir,
        )
        trained = time.perf_counter() - started
        candidates = np.setdiff1d(experiment.candidates, labelled)
        committee = mace_backend(models)
        candidate_std, candidate_forces = committee_predictions(committee, [experiment.pool[i] for i in candidates])
        md_forces = [f for i, f in zip(candidates, candidate_forces, strict=True) if i >= experiment.n_pool]
        force_cap = candidate_force_cap(al.max_candidate_force, md_forces)
        eligible = below_force_cap(candidate_forces, force_cap)
        labelled_std, labelled_forces = committee_predictions(committee, train)
        true_error = np.array(
            [max_force_error(f, atoms.get_forces()) for f, atoms in zip(labelled_forces, train, strict=True)]
        )
        factor = calibration_factor(labelled_std, true_error)
        candidate_features = committee_descriptors(committee, [experiment.pool[i] for i in candidates])
        labelled_features = committee_descriptors(committee, train)
        chosen = select_uncertain(
            candidate_std,
            factor,
            al.force_error_threshold,
            candidate_features,
            labelled_features,
            batch,
            al.diversity_fraction,
            eligible=eligible,
        )
        above = int(((factor * candidate_std > al.force_error_threshold) & eligible).sum())
        filled = 0
        if len(chosen) < batch:  # too few above the threshold: same ranking, guard and cap without it
            rest = np.setdiff1d(np.arange(len(candidates)), chosen)
            guard = np.vstack([labelled_features, candidate_features[chosen]])
            more = select_uncertain(
                candidate_std[rest],
                factor,
                0.0,
                candidate_features[rest],
                guard,
                batch - len(chosen),
                al.diversity_fraction,
                eligible=eligible[rest],
            )
            filled = len(more)
            chosen = np.concatenate([chosen, rest[more]])
        new = [int(candidates[i]) for i in chosen]
        labelled += new
        experiment.label(new)
        say(
            f"  seed {seed} active iteration {iteration}: committee of {experiment.committee_size} on "
            f"{len(train)} labelled ({trained:.0f} s); calibration factor {factor:.2f} (labelled-set max force "
            f"error median {1e3 * np.median(true_error):.0f} meV/Å, committee std median "
            f"{1e3 * np.median(labelled_std):.1f} meV/Å); candidates: max force std median "
            f"{1e3 * np.median(candidate_std):.1f}, max {1e3 * candidate_std.max():.1f} meV/Å, "
            f"{int((~eligible).sum())} over the {force_cap:.2f} eV/Å force cap, {above} of the rest "
            f"above {al.force_error_threshold} eV/Å calibrated; chose {len(new)}"
            + (f" ({filled} below the threshold)" if filled else "")
        )
    if len(labelled) < n_total:
        raise RuntimeError(f"active selection reached only {len(labelled)} of {n_total} (from {n0})")
    return labelled


def random_selection(experiment: Experiment, seed: int, n_total: int) -> list[int]:
    rng = np.random.default_rng(seed)
    additions = rng.choice(experiment.candidates, n_total - len(experiment.direct), replace=False)
    return [int(i) for i in experiment.direct] + [int(i) for i in additions]


@dataclass
class Score:
    forces_rmse: float  # meV/Å
    energy_rmse: float  # meV/atom


def final_scores(experiment: Experiment, indices: list[int], seed: int, name: str) -> dict[str, Score]:
    """Held-out RMSEs, per hold-out, of one model fine-tuned on `indices`. The training set doubles as mace's
    validation set (checkpoint choice), so no labelled structure is lost."""
    train, _ = within_force_cap(experiment.label(indices), experiment.config.active_learning.max_candidate_force)
    models = quietly_finetune(
        settings_for(experiment, 1, seed, experiment.final_epochs),
        train,
        train,
        experiment.work_dir / f"seed{seed}" / f"final_{name}",
    )
    calculator = mace_calculator(models)
    scores = {}
    for hold_out, frames in experiment.hold_outs.items():
        errors = evaluate_calculator(calculator, frames).errors
        scores[hold_out] = Score(1e3 * errors.forces_rmse, 1e3 * errors.energy_rmse_per_atom)
    return scores


def describe_selection(pool: Sequence[Atoms], indices: Sequence[int]) -> str:
    def kind(atoms: Atoms) -> str:
        if "md_xi" in atoms.info:
            return "teacher MD"
        if atoms.info.get("operation") == "rattle":
            return f"rattle {atoms.info['amplitude']:g} Å"
        return atoms.info["operation"]

    kinds = Counter(kind(pool[i]) for i in indices)
    return ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items()))


def force_rms(frames: Sequence[Atoms]) -> float:
    """RMS force component of labelled frames, meV/Å: the scale an RMSE is to be read against."""
    return 1e3 * float(np.sqrt(np.mean(np.concatenate([a.get_forces().ravel() for a in frames]) ** 2)))


def print_table(hold_out: str, rows: list[tuple[int, Score, Score]], teacher: Score) -> bool:
    """One hold-out's per-seed table; returns whether active is lower on average in force RMSE."""
    print(f"\n{hold_out}")
    print(f"{'seed':>6} {'F active':>10} {'F random':>10} {'E active':>10} {'E random':>10}")
    print(f"{'':>6} {'meV/Å':>10} {'meV/Å':>10} {'meV/atom':>10} {'meV/atom':>10}")
    for seed, active, random in rows:
        print(
            f"{seed:>6} {active.forces_rmse:>10.1f} {random.forces_rmse:>10.1f} "
            f"{active.energy_rmse:>10.2f} {random.energy_rmse:>10.2f}"
        )
    means = [
        float(np.mean([getattr(row[column], field) for row in rows]))
        for field in ("forces_rmse", "energy_rmse")
        for column in (1, 2)
    ]
    print(f"{'mean':>6} {means[0]:>10.1f} {means[1]:>10.1f} {means[2]:>10.2f} {means[3]:>10.2f}")
    print(f"{'teacher':>7}{teacher.forces_rmse:>10.1f} {'':>10} {teacher.energy_rmse:>10.2f}   (no fine-tuning)")
    print(
        f"active lower on average: forces {'yes' if means[0] < means[1] else 'NO'} "
        f"({means[0] - means[1]:+.1f} meV/Å), energies {'yes' if means[2] < means[3] else 'NO'}"
    )
    return means[0] < means[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config with seeds and settings")
    parser.add_argument("--n0", type=int, default=20, help="DIRECT start, labelled before any committee")
    parser.add_argument("--n-total", type=int, default=40, help="N: labelled structures per selection")
    parser.add_argument("--iterations", type=int, default=2, help="active-learning iterations to reach N")
    parser.add_argument("--held-out", type=int, default=40, help="pool hold-out: pool structures outside DIRECT")
    parser.add_argument("--md-replicas", type=int, default=2, help="MD hold-out: runs per seed and temperature")
    parser.add_argument("--md-frames", type=int, default=10, help="MD hold-out: snapshots per run")
    parser.add_argument("--md-every", type=int, default=40, help="MD hold-out: steps between snapshots")
    parser.add_argument(
        "--md-candidates",
        type=int,
        default=600,
        help="teacher MD frames along the config's windows added to the candidates, as step 2 scores the previous "
        "iteration's MD frames besides the pool (0: the pool alone)",
    )
    parser.add_argument("--md-candidate-steps", type=int, default=400, help="steps of that teacher MD")
    parser.add_argument(
        "--window-hold-out",
        type=int,
        default=120,
        help="window hold-out: frames of GFN2-xTB MD along the config's windows (0: none)",
    )
    parser.add_argument(
        "--max-candidate-force", type=float, help="eV/Å (default: the config's active_learning.max_candidate_force)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--committee-size", type=int, help="K (default: the config's committee_size)")
    parser.add_argument("--committee-epochs", type=int, help="(default: the config's finetune_epochs)")
    parser.add_argument(
        "--final-epochs",
        type=int,
        default=100,
        help="epochs of the scored fine-tunes (100: converged enough that the fine-tuning seed moves the held-out "
        "force RMSE by ~1 meV/Å, against ~6 at 30)",
    )
    parser.add_argument("--energy-weight", type=float, default=0.0, help="fine-tuning loss weight (0: mace's)")
    parser.add_argument("--forces-weight", type=float, default=0.0, help="fine-tuning loss weight (0: mace's)")
    parser.add_argument("--work-dir", type=Path, help="keep mace's files here (default: a temporary folder)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    if args.max_candidate_force:
        al_override = config.active_learning.model_copy(update={"max_candidate_force": args.max_candidate_force})
        config = config.model_copy(update={"active_learning": al_override})
    seeds = load_seeds(config)
    pool = generate_pool(seeds, config.sampling.pool).structures
    features = get_featuriser("distribution")(pool)  # step 1's featuriser when the oracle is not mace
    direct = select_direct(
        features, args.n0, config.sampling.direct.k_per_cluster, config.sampling.direct.random_seed
    ).indices
    outside = np.setdiff1d(np.arange(len(pool)), direct)
    pool_held_out = np.sort(np.random.default_rng(HELD_OUT_SEED).choice(outside, args.held_out, replace=False))
    teacher = resolve_teacher("bundled")
    al = config.active_learning
    md = config.md
    xtb = XtbBackend(XtbOracleConfig(backend="xtb", method="GFN2-xTB"))
    skip = MD_EQUILIBRATION_STEPS
    md_candidates = []
    if args.md_candidates:
        teacher_md = mace_backend([teacher])
        md_candidates = window_md_frames(
            seeds, config, teacher_md, args.md_candidate_steps, skip, args.md_candidates, random_seed=1
        )
        for frame in md_candidates:
            frame.calc = None  # the teacher's labels: a candidate gets xtb's only when chosen
    # Candidates index into pool + teacher MD frames; DIRECT (step 1) sees the pool alone.
    structures = pool + md_candidates
    candidates = np.concatenate([np.setdiff1d(outside, pool_held_out), np.arange(len(pool), len(structures))])
    label = XtbLabeller(structures)
    temperatures = ", ".join(f"{t:g}" for t in md.temperatures)
    hold_outs = {
        f"MD hold-out (primary): xtb MD from the {len(seeds)} seeds at {temperatures} K": md_hold_out(
            seeds, md.temperatures, md.timestep_fs, args.md_replicas, args.md_frames, args.md_every
        ),
    }
    if args.window_hold_out:
        hold_outs[f"window hold-out: xtb MD along the config's {md.windows.count if md.windows else 0} windows"] = (
            window_md_frames(seeds, config, xtb, args.md_candidate_steps, skip, args.window_hold_out, random_seed=2)
        )
    hold_outs[f"pool hold-out: {args.held_out} random pool structures outside DIRECT"] = label(pool_held_out)

    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="active_vs_random_")))
        experiment = Experiment(
            pool=structures,
            n_pool=len(pool),
            direct=direct,
            candidates=candidates,
            hold_outs=hold_outs,
            label=label,
            config=config,
            teacher=teacher,
            work_dir=work_dir,
            committee_size=args.committee_size or al.committee_size,
            committee_epochs=args.committee_epochs or al.finetune_epochs,
            final_epochs=args.final_epochs,
            energy_weight=args.energy_weight,
            forces_weight=args.forces_weight,
        )
        say(f"config:    {args.config}")
        say(f"pool:      {len(pool)} structures; DIRECT start n0 = {len(direct)} (distribution features)")
        md_frames = next(iter(hold_outs.values()))
        say(
            f"MD hold-out: {len(md_frames)} frames of GFN2-xTB Langevin MD ({args.md_replicas} runs per seed and "
            f"temperature, {args.md_frames} snapshots every {args.md_every} steps of {md.timestep_fs} fs after "
            f"{MD_EQUILIBRATION_STEPS}); force component RMS {force_rms(md_frames):.0f} meV/Å"
        )
        say(
            f"pool hold-out: {len(pool_held_out)} pool structures outside DIRECT (seed {HELD_OUT_SEED}), removed "
            f"from the candidates; force component RMS {force_rms(hold_outs[list(hold_outs)[-1]]):.0f} meV/Å; "
            f"{describe_selection(pool, pool_held_out)}"
        )
        say(
            f"candidates: {len(candidates)} (pool − DIRECT − pool hold-out: {len(candidates) - len(md_candidates)}; "
            f"teacher MD along the windows, {args.md_candidate_steps} steps, frames after {skip}: "
            f"{len(md_candidates)})"
        )
        for name, frames in list(hold_outs.items())[1:-1]:
            say(f"{name.split(':')[0]}: {len(frames)} frames; force component RMS {force_rms(frames):.0f} meV/Å")
        teacher_calculator = mace_calculator([teacher])
        teacher_scores = {}
        for name, frames in hold_outs.items():
            errors = evaluate_calculator(teacher_calculator, frames).errors
            teacher_scores[name] = Score(1e3 * errors.forces_rmse, 1e3 * errors.energy_rmse_per_atom)
        say(
            f"settings:  N = {args.n_total} (n0 = {len(direct)} DIRECT + {args.n_total - len(direct)} added), "
            f"{args.iterations} active iterations, committee K = {experiment.committee_size} x "
            f"{experiment.committee_epochs} epochs (bootstrap), threshold {al.force_error_threshold} eV/Å "
            f"calibrated, candidate force cap {al.max_candidate_force} eV/Å, diversity fraction "
            f"{al.diversity_fraction} (the same cap keeps labels with larger xtb forces out of training); "
            f"scored model: one per set, {args.final_epochs} epochs; loss weights energy "
            f"{args.energy_weight or 'mace default'}, forces {args.forces_weight or 'mace default'}"
        )

        rows: dict[str, list[tuple[int, Score, Score]]] = {name: [] for name in hold_outs}
        for seed in args.seeds:
            active = active_selection(experiment, seed, args.n_total, args.iterations)
            random = random_selection(experiment, seed, args.n_total)
            say(f"  seed {seed} active additions: {describe_selection(structures, active[len(direct) :])}")
            say(f"  seed {seed} random additions: {describe_selection(structures, random[len(direct) :])}")
            active_scores = final_scores(experiment, active, seed, "active")
            random_scores = final_scores(experiment, random, seed, "random")
            for name in hold_outs:
                rows[name].append((seed, active_scores[name], random_scores[name]))
            say(
                f"seed {seed}: force RMSE active vs random: "
                + "; ".join(
                    f"{name.split(':')[0]} {active_scores[name].forces_rmse:.1f} vs "
                    f"{random_scores[name].forces_rmse:.1f} meV/Å"
                    for name in hold_outs
                )
            )

    print(f"\nHeld-out force / energy RMSE after fine-tuning the bundled teacher on N = {args.n_total} xtb-labelled")
    print(f"SN2 structures; both sets share the same {len(direct)} DIRECT structures, only the additions differ.")
    verdicts = [print_table(name, rows[name], teacher_scores[name]) for name in hold_outs]
    print(
        f"\nMust-show (primary, MD hold-out): active lower on average: {'yes' if verdicts[0] else 'NO'}; "
        f"total time {time.perf_counter() - START:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
