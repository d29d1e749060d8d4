"""The student's MD in refinement: milliseconds per replica-step with the extrapolation grade γ on every step,
graded by the ace oracle backend (pyace's projections, one matrix product per element for the whole batch) in
the oracle's own process and with the batch shared by worker processes (`processes`, as a run asks for it),
against pyace's own grading (PyACECalculator with its active set set), in the sampler's MD engine in-process.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/student_md_throughput.py RUN_DIR \
        [--iteration 1] [--replicas 64] [--steps 50] [--processes 0]

RUN_DIR is a finished run whose iteration has a refined student (step6b_student_refinement/refined.yaml and
.asi; else the base of step6_base_ace). The replicas start from the example's three SN2 seeds at 300/600/900/
1080 K, as refinement's plain MD does. Every way runs the same engine and steps; the grades are compared on the
first frames (largest absolute difference). Run it on a quiet machine: the processes compete for its cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from ase import Atoms

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.clients.sampler import md_settings  # noqa: E402
from pyacemaker.config import AceOracleConfig, MdConfig  # noqa: E402
from pyacemaker.labels import Labels  # noqa: E402
from pyacemaker.services.oracle.backends.ace import AceBackend  # noqa: E402
from pyacemaker.services.oracle.backends.base import OracleBackend  # noqa: E402
from pyacemaker.services.sampler.md import run_md as run_engine  # noqa: E402
from pyacemaker.services.sampler.server import md_parameters_from_settings  # noqa: E402
from pyacemaker.structures import read_structures  # noqa: E402

SEEDS = sorted((REPO_ROOT / "examples" / "sn2" / "seeds").glob("*.xyz"))


class PyaceGrading(AceBackend):
    """The backend as it was: pyace's calculator with its active set grades every structure itself."""

    def _load(self):  # type: ignore[no-untyped-def]
        from pyace import PyACECalculator

        calc = PyACECalculator(str(self.config.potential))
        calc.set_active_set(str(self.config.active_set))
        return calc

    def annotate(self, atoms: Atoms, labels: Labels) -> Labels:
        if self._yaml_e0s and labels.energy is not None:
            labels = replace(labels, energy=labels.energy + sum(self._yaml_e0s.get(int(z), 0.0) for z in atoms.numbers))
        grades = np.asarray(atoms.calc.results["gamma"], dtype=np.float64)  # type: ignore[union-attr]
        uncertainty = replace(
            labels.uncertainty, extrapolation_grade=grades, max_extrapolation_grade=float(grades.max(initial=0.0))
        )
        return replace(labels, uncertainty=uncertainty)

    def label(self, atoms: Atoms, attempt: int = 0) -> Labels:
        return OracleBackend.label(self, atoms, attempt)  # through the ASE calculator, as before

    def label_batch(self, frames: Sequence[Atoms]) -> Iterator[Labels]:
        for atoms in frames:
            yield self.label(atoms)


def student_files(run_dir: Path, iteration: int) -> tuple[Path, Path]:
    it = run_dir / f"iteration_{iteration:02d}"
    for directory, stem in (("step6b_student_refinement", "refined"), ("step6_base_ace", "base")):
        if (it / directory / f"{stem}.asi").is_file():
            return it / directory / f"{stem}.yaml", it / directory / f"{stem}.asi"
    raise SystemExit(f"{it}: no refined.yaml/.asi or base.yaml/.asi")


def timed_md(backend: AceBackend, replicas: int, steps: int) -> tuple[float, list[list[float]]]:
    """(ms per replica-step, the grades of the first batch)."""
    seeds = [read_structures(path)[0] for path in SEEDS]
    config = MdConfig(
        temperatures=[300.0, 600.0, 900.0, 1080.0],
        timestep_fs=0.5,
        steps=steps,
        save_interval=5,
        replicas=replicas,
        min_distance=0.6,
        n_frames=1,
    )
    params = md_parameters_from_settings(md_settings(config))
    first = [list(labels.uncertainty.extrapolation_grade) for labels in backend.label_batch(seeds)]
    list(backend.label_batch([seeds[i % len(seeds)] for i in range(replicas)]))  # warm-up: workers started
    began = time.perf_counter()
    for _ in run_engine(seeds, params, lambda frames: list(backend.label_batch(frames))):
        pass
    return (time.perf_counter() - began) / (steps * replicas) * 1e3, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iteration", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--processes", type=int, default=0, help="for the shared way (0: one per core)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yaml_path, asi_path = student_files(args.run_dir, args.iteration)
    config = AceOracleConfig(backend="ace", potential=yaml_path, active_set=asi_path)
    shared = AceBackend(config.model_copy(update={"processes": args.processes}))
    print(
        f"{yaml_path}: {args.replicas} replicas x {args.steps} steps, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    ours, grades = timed_md(AceBackend(config), args.replicas, args.steps)
    in_processes, shared_grades = timed_md(shared, args.replicas, args.steps)
    theirs, reference = timed_md(PyaceGrading(config), args.replicas, args.steps)
    difference = max(float(np.max(np.abs(np.subtract(a, b)))) for a, b in zip(grades, reference, strict=True))
    shared_difference = max(
        float(np.max(np.abs(np.subtract(a, b)))) for a, b in zip(grades, shared_grades, strict=True)
    )
    print(f"{'ace backend, batched grading':44s} {ours:8.2f} ms per replica-step")
    print(f"{f'  the same in {shared.processes} worker processes':44s} {in_processes:8.2f} ms per replica-step")
    print(f"{'pyace grading every structure':44s} {theirs:8.2f} ms per replica-step")
    print(f"batched grading: {theirs / ours:.1f}x; largest |Δγ| on the seeds {difference:.1e}")
    print(f"worker processes: {ours / in_processes:.2f}x; largest |Δγ| against one process {shared_difference:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
