"""MACE on the CPU vs a CUDA GPU: one committee fine-tuning and one labelling pass, same data, same code as a run.

    .venv/bin/python benchmarks/mace_gpu.py [--system sn2|si] [--frames 200] [--epochs 5] [--label-frames 2000]
                                            [--batch-size 64] [--threads N] [--extra-args '{"batch_size": 8}']

Fine-tuning: the trainer's own `finetune_committee` (one member, `--epochs` epochs from the teacher, mace's
training entry point, the evaluations around it), as step 3 runs it with `mace_finetune.device: cpu` and then
`cuda`. Labelling: the oracle's mace backend (`MaceBackend.label_batch`, graph batches of `--batch-size`), as step
5 labels the surrogate set, timed after a warm-up batch. Data: `sn2`: the bundled C/H/Cl teacher and rattled
Cl⁻ + CH3Cl frames (6 atoms) from the example's seeds; `si`: the Si example's teacher and rattled, strained
64-atom diamond cells. The fine-tuning's labels are the teacher's own, moved by a constant per atom and scaled
forces (a "level B"): the timing does not depend on what is learnt.

The CPU side uses `--threads` torch threads (default: OMP_NUM_THREADS, else every core). Without a GPU that torch
can see, the CPU figures are printed with a line saying so and the script exits 0. Prints seconds per side and
the speed-up, and the largest difference between the CPU's and the GPU's labels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.config import MaceOracleConfig  # noqa: E402
from pyacemaker.mace_options import option_text  # noqa: E402
from pyacemaker.structures import read_structures  # noqa: E402
from pyacemaker.teacher import resolve_teacher  # noqa: E402

SN2_SEEDS = REPO_ROOT / "examples" / "sn2" / "seeds"
SI_TEACHER = REPO_ROOT / "examples" / "si" / "teacher" / "si_teacher.model"
OFFSET_PER_ATOM = 0.05  # eV, level B − teacher
FORCE_SCALE = 1.03


def frames_of(system: str, n: int, seed: int) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    if system == "sn2":
        seeds = [read_structures(SN2_SEEDS / f"{name}.xyz")[0] for name in ("reactant_complex", "transition_state")]
        for index in range(n):
            atoms = seeds[index % len(seeds)].copy()
            atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
            frames.append(atoms)
        return frames
    for _ in range(n):
        atoms = bulk("Si", "diamond", a=5.43 * (1 + rng.uniform(-0.02, 0.02)), cubic=True).repeat(2)
        atoms.positions += rng.normal(0.0, 0.06, atoms.positions.shape)
        frames.append(atoms)
    return frames


def teacher_of(system: str) -> Path:
    return resolve_teacher("bundled") if system == "sn2" else SI_TEACHER


def level_b(teacher: Path, frames: list[Atoms]) -> list[Atoms]:
    """The frames labelled by the teacher (on the CPU), energies moved by OFFSET_PER_ATOM and forces scaled."""
    from pyacemaker.services.trainer.evaluation import mace_calculator, predict

    predicted = predict(mace_calculator([teacher]), frames)
    labelled = []
    for atoms, energy, forces in zip(frames, predicted.energies, predicted.forces, strict=True):
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(
            copy, energy=float(energy) + OFFSET_PER_ATOM * len(atoms), forces=FORCE_SCALE * np.asarray(forces)
        )
        labelled.append(copy)
    return labelled


def finetune_seconds(
    teacher: Path, train: list[Atoms], valid: list[Atoms], device: str, epochs: int, extra: dict[str, str]
) -> float:
    """Seconds for fine-tuning one committee member from the teacher on `device`, as the trainer does."""
    from pyacemaker.services.trainer.mace_finetune import FinetuneSettings, finetune_committee

    settings = FinetuneSettings(
        foundation_model=teacher,
        committee_size=1,
        seed=1,
        max_epochs=epochs,
        multihead_replay=False,
        energy_weight=0.0,
        forces_weight=0.0,
        device=device,
        extra_args=extra,
    )
    # mace logs every step to stdout: kept out of the figures
    with (
        tempfile.TemporaryDirectory(prefix=f"mace-gpu-{device}-") as work,
        open(Path(work) / "mace_stdout.log", "w") as log,
        contextlib.redirect_stdout(log),
    ):
        start = time.perf_counter()
        finetune_committee(settings, train, valid, [], Path(work))
        return time.perf_counter() - start


def label_seconds(model: Path, frames: list[Atoms], device: str, batch_size: int) -> tuple[float, np.ndarray]:
    """Seconds for labelling `frames` with the oracle's mace backend on `device` (after a warm-up batch), and
    the energies."""
    from pyacemaker.services.oracle.backends.mace import MaceBackend

    backend = MaceBackend(
        MaceOracleConfig(backend="mace", models=[model], device=device, batch_size=batch_size)  # type: ignore[arg-type]
    )
    list(backend.label_batch(frames[:batch_size]))
    _synchronise(device)
    start = time.perf_counter()
    energies = np.array([labels.energy for labels in backend.label_batch(frames)])
    _synchronise(device)
    return time.perf_counter() - start, energies


def _synchronise(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=("sn2", "si"), default="sn2")
    parser.add_argument("--frames", type=int, default=200, help="fine-tuning frames (10 %% more for validation)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--label-frames", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64, help="structures per labelling batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: OMP_NUM_THREADS or all)")
    parser.add_argument("--extra-args", default="{}", help="mace_finetune.extra_args as JSON, for both sides")
    args = parser.parse_args(argv)
    import torch

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the oracle backend sets torch's threads from it
    torch.set_num_threads(threads)
    extra = {key: option_text(value) for key, value in json.loads(args.extra_args).items()}
    from pyacemaker.mace_options import value_problem

    refused = [f"{key}: {problem}" for key, text in extra.items() if (problem := value_problem(key, text))]
    if refused:
        print("extra args refused: " + "; ".join(refused), file=sys.stderr)
        return 2

    teacher = teacher_of(args.system)
    n_valid = max(1, args.frames // 10)
    labelled = level_b(teacher, frames_of(args.system, args.frames + n_valid, seed=1))
    to_label = frames_of(args.system, args.label_frames, seed=2)
    gpu = torch.cuda.is_available()
    print(
        f"system {args.system} ({len(labelled[0])} atoms), teacher {teacher.name}, fine-tuning {args.frames} frames "
        f"x {args.epochs} epochs, labelling {args.label_frames} frames in batches of {args.batch_size}, "
        f"torch {torch.__version__}, CPU threads {threads}" + (f", GPU {torch.cuda.get_device_name(0)}" if gpu else "")
    )
    figures: dict[str, dict[str, float]] = {"fine-tuning": {}, "labelling": {}}
    energies = {}
    for device in ("cpu", "cuda") if gpu else ("cpu",):
        figures["fine-tuning"][device] = finetune_seconds(
            teacher, labelled[: args.frames], labelled[args.frames :], device, args.epochs, extra
        )
        figures["labelling"][device], energies[device] = label_seconds(teacher, to_label, device, args.batch_size)
        print(
            f"{device}: fine-tuning {figures['fine-tuning'][device]:.1f} s, labelling "
            f"{figures['labelling'][device]:.2f} s ({args.label_frames / figures['labelling'][device]:.0f} frames/s)",
            flush=True,
        )
    if not gpu:
        print("no CUDA GPU is visible to torch (torch.cuda.is_available() is False): CPU figures only")
        return 0
    print(f"{'':12} {'cpu s':>9} {'cuda s':>9} {'speed-up':>9}")
    for step, seconds in figures.items():
        print(f"{step:12} {seconds['cpu']:9.2f} {seconds['cuda']:9.2f} {seconds['cpu'] / seconds['cuda']:9.1f}")
    print(f"labels: max |E_cpu − E_cuda| = {float(np.abs(energies['cpu'] - energies['cuda']).max()):.2e} eV")
    return 0


if __name__ == "__main__":
    sys.exit(main())
