"""Seconds per step of the flagship (or any config): run it through services of its own and print the step-time
table, or print the tables of finished runs side by side (before/after a change).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/flagship_timing.py run \
        [--config examples/sn2/config.yaml] [--work-dir build/flagship_timing]       # the flagship: ~40-60 min
    PYTHONPATH=. .venv/bin/python benchmarks/flagship_timing.py table RUN_DIR [RUN_DIR ...]

`run` copies the config and its seeds into the work dir (the run directory lands there), starts the four services
on free ports with a PYACEMAKER_HOME inside the work dir (services someone else started on the default ports are
not shared), runs the config, stops the services and prints the table: every step's wall time from the run's
state file (the same figures as the report's step-time table), the sum over steps and the wall time of the whole
command (start-up and shut-down included). The machine's core count and load average at the start are printed
with it, since a figure from a busy machine says little.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from pyacemaker.services.orchestrator.report import ReportInputError, read_run  # noqa: E402

CLI = str(Path(sys.executable).parent / "pyacemaker")


def step_seconds(run_dir: Path) -> dict[str, float | None]:
    """Step name → wall seconds (None for a step that did not finish), in the order the steps started."""
    return {step.name: step.duration_s for step in read_run(run_dir).steps}


def print_table(run_dirs: list[Path]) -> None:
    columns = [step_seconds(run_dir) for run_dir in run_dirs]
    names = list(dict.fromkeys(name for column in columns for name in column))
    width = max([len(name) for name in names] + [len("all steps")])
    for number, run_dir in enumerate(run_dirs, 1):
        print(f"[{number}] {run_dir}")
    print(f"{'step (s)':<{width}}" + "".join(f"{f'[{number}]':>10}" for number in range(1, len(run_dirs) + 1)))
    for name in names:
        cells = [column.get(name) for column in columns]
        print(f"{name:<{width}}" + "".join(f"{'-' if s is None else f'{s:.1f}':>10}" for s in cells))
    totals = [sum(s for s in column.values() if s is not None) for column in columns]
    print(f"{'all steps':<{width}}" + "".join(f"{t:>10.1f}" for t in totals))


def run_config(config_source: Path, work_dir: Path) -> Path:
    """Run the config through services of its own; returns the run directory."""
    work_dir.mkdir(parents=True, exist_ok=True)
    seeds = config_source.parent / "seeds"
    if seeds.is_dir():
        shutil.copytree(seeds, work_dir / "seeds", dirs_exist_ok=True)
    config = yaml.safe_load(config_source.read_text())
    config_path = work_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = work_dir / "runs" / config["name"]
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: pick another --work-dir (a resumed run would skip its finished steps)")
    env = {**os.environ, "PYACEMAKER_HOME": str(work_dir / "services"), "OMP_NUM_THREADS": "1"}
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; run directory {run_dir}", flush=True)
    subprocess.run([CLI, "up", "--ports", "auto"], env=env, check=True)
    start = time.monotonic()
    try:
        result = subprocess.run([CLI, "run", str(config_path)], env=env)
    finally:
        subprocess.run([CLI, "down"], env=env, check=False)
    print(f"wall time of `pyacemaker run`: {time.monotonic() - start:.0f} s (exit {result.returncode})")
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a config through services of its own, then print its step times")
    run.add_argument("--config", type=Path, default=REPO_ROOT / "examples" / "sn2" / "config.yaml")
    run.add_argument("--work-dir", type=Path, default=REPO_ROOT / "build" / "flagship_timing")
    table = sub.add_parser("table", help="print the step times of finished runs side by side")
    table.add_argument("run_dirs", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        print_table([run_config(args.config.resolve(), args.work_dir.resolve())])
    else:
        try:
            print_table(args.run_dirs)
        except ReportInputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
