"""Hundreds of atoms through the pipeline: seconds, frames and peak memory per step.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/scale_run.py [--work-dir build/scale_run]
        [--repeat 3] [--md-steps 100] [--n-frames 60]

The Si example's seeds (8-atom cubic cells at 0.96, 1, 1.04 × a and one with a vacancy) repeated --repeat times
along each axis (3: 216-atom cells, 215 with the vacancy) go through steps 1 to 6 (`stop_after: ace_fit`) on
services of this script's own (`pyacemaker up --ports auto`, as benchmarks/flagship_timing.py). The Si teacher
(examples/si/teacher) stands in for DFT through the oracle's mace backend: QE on 216 atoms would take hours per
call here, and what is measured is how the pipeline's own parts (DIRECT featurising, MACE fine-tuning on large
frames, NPT MD of large cells, streaming labels, the linear ACE design) scale with the cell, not DFT.

While the run goes, the resident memory of each service's process tree (the service and its children, e.g. the
trainer's job workers) is read from /proc every POLL_S seconds; per step the table gives its wall seconds (the
run's state file), its frame counts (the step's metrics) and the peak RSS of each service during the step.
The linear fit's design memory: the Gram matrices' size from the fit's own metrics against
pyacemaker.services.trainer.linear_ace.GRAM_MEMORY_BYTES, and the largest chunk of design rows held at once
(linear_ace.chunks, CHUNK_ATOMS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from pyacemaker.services.orchestrator.report import read_run  # noqa: E402
from pyacemaker.services.trainer import linear_ace  # noqa: E402
from pyacemaker.structures import read_structures, write_extxyz  # noqa: E402

CLI = str(Path(sys.executable).parent / "pyacemaker")
SI_DIR = REPO_ROOT / "examples" / "si"
SEED_FILES = ("diamond_compressed.xyz", "diamond.xyz", "diamond_expanded.xyz", "vacancy.xyz")
SERVICES = ("orchestrator", "sampler", "oracle", "trainer")
POLL_S = 0.5
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def supercell_seeds(directory: Path, repeat: int) -> list[str]:
    """The Si seeds repeated `repeat` times along each axis, written to `directory`; their file names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name in SEED_FILES:
        (atoms,) = read_structures(SI_DIR / "seeds" / name)
        big = atoms.repeat((repeat, repeat, repeat))
        big.info.update(atoms.info)
        write_extxyz(directory / name, [big])
        names.append(f"seeds/{name}")
    return names


def scale_config(seeds: list[str], md_steps: int, n_frames: int) -> dict:
    teacher = str((SI_DIR / "teacher" / "si_teacher.model").resolve())
    return {
        "name": "si-scale",
        "system": {"seeds": seeds},
        "oracle": {"backend": "mace", "models": [teacher], "batch_size": 4, "device": "cpu"},
        "teacher": {"model": teacher},
        "budget": {"max_dft_calls": 14},
        "sampling": {
            "pool": {
                "rattle_amplitudes": [0.03, 0.08],
                "rattles_per_amplitude": 2,
                "strains_per_seed": 2,
                "max_strain": 0.03,
                "interpolation_images": 2,
                "interpolation_rattle": 0.05,
                "fragment_rotations_per_seed": 0,
                "min_distance": 1.8,
            },
            "direct": {"n_select": 6},
        },
        "active_learning": {"committee_size": 2, "finetune_epochs": 3, "batch_size": 2},
        "mace_finetune": {"epochs": 4, "device": "cpu"},
        "md": {
            "temperatures": [600, 1200],
            "timestep_fs": 1.0,
            "steps": md_steps,
            "save_interval": 5,
            "replicas": 4,
            "pressure_gpa": 0.0,
            "n_frames": n_frames,
        },
        "surrogate_labelling": {"shard_size": 20},
        "student_refinement": {"enabled": False},
        "validation": {"holdout_size": 2, "max_iterations": 1},
        "stop_after": "ace_fit",
    }


def tree_rss_kb(pid: int) -> int:
    """Resident memory of `pid` and all its descendants, kB (0 for a process that is gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE_KB
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


class MemorySampler(threading.Thread):
    """(time, {service: tree RSS kB}) every POLL_S seconds until stopped."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), {name: tree_rss_kb(pid) for name, pid in self.pids.items()}))
            self.stop.wait(POLL_S)

    def peaks(self, start: float, end: float) -> dict[str, int]:
        inside = [rss for when, rss in self.samples if start <= when <= end]
        return {name: max((rss[name] for rss in inside), default=0) for name in self.pids}


def run(work_dir: Path, repeat: int, md_steps: int, n_frames: int) -> None:
    if work_dir.exists():
        shutil.rmtree(work_dir)
    seeds = supercell_seeds(work_dir / "seeds", repeat)
    config_path = work_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(scale_config(seeds, md_steps, n_frames), sort_keys=False))
    env = {**os.environ, "PYACEMAKER_HOME": str(work_dir / "services"), "OMP_NUM_THREADS": "1"}
    sizes = sorted({len(read_structures(work_dir / seed)[0]) for seed in seeds})
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; seeds of {sizes} atoms", flush=True)
    subprocess.run([CLI, "up", "--ports", "auto"], env=env, check=True)
    registry = json.loads((work_dir / "services" / "services.json").read_text())
    sampler = MemorySampler({name: int(registry[name]["pid"]) for name in SERVICES})
    sampler.start()
    start = time.monotonic()
    try:
        result = subprocess.run([CLI, "run", str(config_path)], env=env)
    finally:
        sampler.stop.set()
        sampler.join()
        subprocess.run([CLI, "down"], env=env, check=False)
    print(f"wall time of `pyacemaker run`: {time.monotonic() - start:.0f} s (exit {result.returncode})")
    print_table(work_dir / "runs" / "si-scale", sampler)


def print_table(run_dir: Path, sampler: MemorySampler) -> None:
    record = read_run(run_dir)
    header = f"{'step':<22}{'s':>8}  {'counts':<52}" + "".join(f"{name + ' MiB':>17}" for name in SERVICES)
    print(header)
    for step in record.steps:
        if step.started is None or step.duration_s is None:
            continue
        peaks = sampler.peaks(step.started, step.started + step.duration_s)
        counts = [(key, value) for key, value in step.metrics.items() if key.startswith("n_") or key.endswith("_count")]
        frames = ", ".join(f"{key.removeprefix('n_').removesuffix('_count')}={value:.0f}" for key, value in counts[:3])
        print(
            f"{step.name:<22}{step.duration_s:>8.1f}  {frames:<52}"
            + "".join(f"{peaks[name] / 1024:>17.0f}" for name in SERVICES)
        )
        if step.name.startswith("ace_fit"):
            design_memory(step.metrics)


def design_memory(metrics: dict[str, float]) -> None:
    functions, folds = metrics.get("basis_functions_count"), metrics.get("cv_folds_count")
    if not functions or not folds:
        print(f"(the fit's metrics give no function or fold count: {sorted(metrics)})")
        return
    gram = 3 * folds * functions**2 * 8  # energy, force and stress Gram matrices per fold
    rows = 3 * linear_ace.CHUNK_ATOMS * functions * 8
    print(
        f"design memory: {functions:.0f} functions, Gram matrices {gram / 2**20:.0f} MiB of the "
        f"{linear_ace.GRAM_MEMORY_BYTES / 2**30:.0f} GiB budget; force rows held at once at most "
        f"{rows / 2**20:.0f} MiB (CHUNK_ATOMS {linear_ace.CHUNK_ATOMS})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "build" / "scale_run")
    parser.add_argument("--repeat", type=int, default=3, help="supercell repeats per axis (3: 216 atoms)")
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--n-frames", type=int, default=60)
    args = parser.parse_args()
    run(args.work_dir.resolve(), args.repeat, args.md_steps, args.n_frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
