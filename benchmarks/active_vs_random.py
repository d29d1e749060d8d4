"""Committee active learning against random selection on the SN2 pool: held-out force and energy RMSE of a MACE
fine-tuned from the bundled teacher on N actively vs N randomly chosen structures, same N, several seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/active_vs_random.py [--n0 20] [--n-total 40] [--iterations 2]

GFN2-xTB (the xtb oracle backend) plays DFT: its labels are the reference everywhere. The pool and the DIRECT
start come from the SN2 example config (pool generator and DIRECT on the distribution features, exactly as
step 1). A held-out set of `--held-out` pool structures outside the DIRECT set (fixed seed) is labelled and
removed from the candidates, so neither selection can pick a test structure.

Both selections start from the same n0 DIRECT structures; only the N − n0 additions differ:
  active: per iteration, a committee of K members fine-tuned briefly from the teacher on bootstrap samples of
          the labelled set (different seeds) scores every candidate by its max force std (mace oracle backend);
          the spread is calibrated on the labelled set (calibration_factor against the committee mean's true
          max force error) and select_uncertain takes the most uncertain candidates above the config's
          threshold, with the diversity guard on the committee's invariant MACE descriptors (as step 2 in the
          orchestrator). If fewer than the batch pass the threshold, the rest are taken by the same ranking
          and guard without it (said in the output).
  random: N − n0 candidates drawn uniformly with the seed.
Then ONE model per set is fine-tuned from the teacher with identical settings and the same seed per pair, and
scored on the held-out set.

`--max-teacher-force F` drops candidates (for both selections alike) whose teacher-predicted largest force
component exceeds F eV/Å: without it the committee's absolute force spread, which grows with the force, sends
exactly the near-collision geometries of the pool's largest rattles (|F| 20-40 eV/Å) to DFT.

E0s: xtb is the teacher's own level and the teacher's E0s are GFN2-xTB isolated atoms, so the labels are on the
teacher's reference already and fine-tuning gets no label E0s (see services.trainer.mace_finetune).
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
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.config import MaceOracleConfig, RunConfig, XtbOracleConfig, load_config
from pyacemaker.seeds import load_seeds
from pyacemaker.teacher import resolve_teacher
from services.oracle.backends.mace import MaceBackend
from services.oracle.backends.xtb import XtbBackend
from services.orchestrator.active_learning import calibration_factor, max_force_error, select_uncertain
from services.sampler.direct import select_direct
from services.sampler.features import get_featuriser
from services.sampler.pool import generate_pool
from services.trainer.evaluation import evaluate_calculator, mace_calculator
from services.trainer.mace_finetune import FinetuneSettings, finetune_committee

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "sn2" / "config.yaml"
HELD_OUT_SEED = 12345
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


@dataclass
class Experiment:
    pool: list[Atoms]
    direct: np.ndarray
    held_out: np.ndarray
    candidates: np.ndarray
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
        label_e0s={},  # xtb labels are on the teacher's (GFN2-xTB) reference already
        multihead_replay=False,
        energy_weight=experiment.energy_weight,
        forces_weight=experiment.forces_weight,
    )


def committee_predictions(models: list[Path], frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Max force std per structure and the committee mean forces, through the mace oracle backend."""
    backend = MaceBackend(MaceOracleConfig(backend="mace", models=models, batch_size=64))
    std, forces = [], []
    for atoms, labels in zip(frames, backend.label_batch(frames), strict=True):
        std.append(labels.uncertainty.max_force_std)
        forces.append(np.array(labels.forces).reshape(len(atoms), 3))
    return np.array(std), forces


def committee_descriptors(models: list[Path], frames: Sequence[Atoms]) -> np.ndarray:
    """The committee's invariant descriptors (its first model's, as the orchestrator's diversity guard uses)."""
    backend = MaceBackend(MaceOracleConfig(backend="mace", models=models, batch_size=64))
    return np.vstack(list(backend.describe_batch(frames)))


def active_selection(experiment: Experiment, seed: int, n_total: int, iterations: int) -> list[int]:
    al = experiment.config.active_learning
    labelled = [int(i) for i in experiment.direct]
    n0 = len(labelled)
    for iteration in range(iterations):
        remaining = n_total - len(labelled)
        if remaining <= 0:
            break
        batch = -(-remaining // (iterations - iteration))  # spread the additions evenly over the iterations
        train = experiment.label(labelled)
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
        candidate_std, _ = committee_predictions(models, [experiment.pool[i] for i in candidates])
        labelled_std, labelled_forces = committee_predictions(models, train)
        true_error = np.array(
            [max_force_error(f, atoms.get_forces()) for f, atoms in zip(labelled_forces, train, strict=True)]
        )
        factor = calibration_factor(labelled_std, true_error)
        candidate_features = committee_descriptors(models, [experiment.pool[i] for i in candidates])
        labelled_features = committee_descriptors(models, train)
        chosen = select_uncertain(
            candidate_std,
            factor,
            al.force_error_threshold,
            candidate_features,
            labelled_features,
            batch,
            al.diversity_fraction,
        )
        above = int((factor * candidate_std > al.force_error_threshold).sum())
        filled = 0
        if len(chosen) < batch:  # too few above the threshold: same ranking and guard without it
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
            f"{1e3 * np.median(candidate_std):.1f}, max {1e3 * candidate_std.max():.1f} meV/Å, {above} of "
            f"{len(candidates)} above {al.force_error_threshold} eV/Å calibrated; chose {len(new)}"
            + (f" ({filled} below the threshold)" if filled else "")
        )
    if len(labelled) < n_total:
        raise RuntimeError(f"active selection reached only {len(labelled)} of {n_total} (from {n0})")
    return labelled


def random_selection(experiment: Experiment, seed: int, n_total: int) -> list[int]:
    rng = np.random.default_rng(seed)
    additions = rng.choice(experiment.candidates, n_total - len(experiment.direct), replace=False)
    return [int(i) for i in experiment.direct] + [int(i) for i in additions]


def final_scores(experiment: Experiment, indices: list[int], seed: int, name: str) -> tuple[float, float]:
    """(force RMSE meV/Å, energy RMSE meV/atom) on the held-out set of one model fine-tuned on `indices`.
    The training set doubles as mace's validation set (checkpoint choice), so no labelled structure is lost."""
    train = experiment.label(indices)
    models = quietly_finetune(
        settings_for(experiment, 1, seed, experiment.final_epochs),
        train,
        train,
        experiment.work_dir / f"seed{seed}" / f"final_{name}",
    )
    errors = evaluate_calculator(mace_calculator(models), experiment.label(experiment.held_out)).errors
    return 1e3 * errors.forces_rmse, 1e3 * errors.energy_rmse_per_atom


def describe_selection(pool: Sequence[Atoms], indices: Sequence[int]) -> str:
    kinds = Counter(
        f"rattle {pool[i].info['amplitude']:g} Å"
        if pool[i].info.get("operation") == "rattle"
        else pool[i].info["operation"]
        for i in indices
    )
    return ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config with seeds and settings")
    parser.add_argument("--n0", type=int, default=20, help="DIRECT start, labelled before any committee")
    parser.add_argument("--n-total", type=int, default=40, help="N: labelled structures per selection")
    parser.add_argument("--iterations", type=int, default=2, help="active-learning iterations to reach N")
    parser.add_argument("--held-out", type=int, default=40, help="held-out pool structures (not in DIRECT)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--committee-size", type=int, help="K (default: the config's committee_size)")
    parser.add_argument("--committee-epochs", type=int, help="(default: the config's finetune_epochs)")
    parser.add_argument("--final-epochs", type=int, default=30, help="epochs of the scored fine-tunes")
    parser.add_argument("--energy-weight", type=float, default=0.0, help="fine-tuning loss weight (0: mace's)")
    parser.add_argument("--forces-weight", type=float, default=0.0, help="fine-tuning loss weight (0: mace's)")
    parser.add_argument(
        "--max-teacher-force",
        type=float,
        help="drop candidates (for both selections) whose teacher-predicted largest force component exceeds "
        "this, eV/Å: near-collision geometries that MD never visits (default: keep all)",
    )
    parser.add_argument("--work-dir", type=Path, help="keep mace's files here (default: a temporary folder)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    pool = generate_pool(load_seeds(config), config.sampling.pool).structures
    features = get_featuriser("distribution")(pool)  # step 1's featuriser when the oracle is not mace
    direct = select_direct(
        features, args.n0, config.sampling.direct.k_per_cluster, config.sampling.direct.random_seed
    ).indices
    outside = np.setdiff1d(np.arange(len(pool)), direct)
    held_out = np.sort(np.random.default_rng(HELD_OUT_SEED).choice(outside, args.held_out, replace=False))
    candidates = np.setdiff1d(outside, held_out)
    teacher = resolve_teacher("bundled")
    n_implausible = 0
    if args.max_teacher_force is not None:
        _, teacher_forces = committee_predictions([teacher], [pool[i] for i in candidates])
        plausible = np.array([np.abs(f).max() <= args.max_teacher_force for f in teacher_forces])
        n_implausible = int((~plausible).sum())
        candidates = candidates[plausible]
    al = config.active_learning

    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="active_vs_random_")))
        experiment = Experiment(
            pool=pool,
            direct=direct,
            held_out=held_out,
            candidates=candidates,
            label=XtbLabeller(pool),
            config=config,
            teacher=teacher,
            work_dir=work_dir,
            committee_size=args.committee_size or al.committee_size,
            committee_epochs=args.committee_epochs or al.finetune_epochs,
            final_epochs=args.final_epochs,
            energy_weight=args.energy_weight,
            forces_weight=args.forces_weight,
        )
        held_frames = experiment.label(held_out)
        held_forces = np.concatenate([a.get_forces().ravel() for a in held_frames])
        teacher_errors = evaluate_calculator(mace_calculator([teacher]), held_frames).errors
        say(f"config:    {args.config}")
        say(f"pool:      {len(pool)} structures; DIRECT start n0 = {len(direct)} (distribution features)")
        say(
            f"held-out:  {len(held_out)} pool structures outside DIRECT (seed {HELD_OUT_SEED}), xtb-labelled; "
            f"force component RMS {1e3 * np.sqrt(np.mean(held_forces**2)):.0f} meV/Å; "
            f"{describe_selection(pool, held_out)}"
        )
        say(f"candidates: {len(candidates)} (pool − DIRECT − held-out)")
        if args.max_teacher_force is not None:
            say(
                f"            {n_implausible} more candidates dropped for both selections: the teacher predicts a "
                f"force component above {args.max_teacher_force} eV/Å (the held-out set is not filtered)"
            )
        say(
            f"teacher on held-out (no fine-tuning): force RMSE {1e3 * teacher_errors.forces_rmse:.1f} meV/Å, "
            f"energy RMSE {1e3 * teacher_errors.energy_rmse_per_atom:.2f} meV/atom"
        )
        say(
            f"settings:  N = {args.n_total} (n0 = {len(direct)} DIRECT + {args.n_total - len(direct)} added), "
            f"{args.iterations} active iterations, committee K = {experiment.committee_size} x "
            f"{experiment.committee_epochs} epochs (bootstrap), threshold {al.force_error_threshold} eV/Å "
            f"calibrated, diversity fraction {al.diversity_fraction}; scored model {args.final_epochs} epochs; "
            f"loss weights energy {args.energy_weight or 'mace default'}, forces {args.forces_weight or 'mace default'}"
        )

        rows = []
        for seed in args.seeds:
            active = active_selection(experiment, seed, args.n_total, args.iterations)
            random = random_selection(experiment, seed, args.n_total)
            say(f"  seed {seed} active additions: {describe_selection(pool, active[len(direct) :])}")
            say(f"  seed {seed} random additions: {describe_selection(pool, random[len(direct) :])}")
            active_f, active_e = final_scores(experiment, active, seed, "active")
            random_f, random_e = final_scores(experiment, random, seed, "random")
            rows.append((seed, active_f, random_f, active_e, random_e))
            say(
                f"seed {seed}: force RMSE active {active_f:.1f} vs random {random_f:.1f} meV/Å; "
                f"energy RMSE active {active_e:.2f} vs random {random_e:.2f} meV/atom"
            )

    print()
    print(f"Held-out force / energy RMSE after fine-tuning the bundled teacher on N = {args.n_total} xtb-labelled")
    print(f"SN2 structures; both sets share the same {len(direct)} DIRECT structures, only the additions differ.")
    print(f"{'seed':>6} {'F active':>10} {'F random':>10} {'E active':>10} {'E random':>10}")
    print(f"{'':>6} {'meV/Å':>10} {'meV/Å':>10} {'meV/atom':>10} {'meV/atom':>10}")
    for seed, active_f, random_f, active_e, random_e in rows:
        print(f"{seed:>6} {active_f:>10.1f} {random_f:>10.1f} {active_e:>10.2f} {random_e:>10.2f}")
    means = np.mean([row[1:] for row in rows], axis=0)
    print(f"{'mean':>6} {means[0]:>10.1f} {means[1]:>10.1f} {means[2]:>10.2f} {means[3]:>10.2f}")
    print(
        f"active lower on average: forces {'yes' if means[0] < means[1] else 'NO'}, "
        f"energies {'yes' if means[2] < means[3] else 'NO'}; total time {time.perf_counter() - START:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
