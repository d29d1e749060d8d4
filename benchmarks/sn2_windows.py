"""SN2 restraint windows through the sampler service: does the surrogate MD cover ξ from −1.5 to +1.5 Å without
any replica exploding?

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/sn2_windows.py [--steps 1000] [--replicas 2]

ξ = d(C–Cl1) − d(C–Cl2) (atoms 0, 4, 5 of the example's seeds). The example config's `md.windows` (13 windows
from −1.5 to +1.5 Å, k = 5 eV/Å²) with `--replicas` replicas per window at 300, 600, 1000 K in turn; forces from
the bundled MACE teacher served by `pyacemaker.services.oracle`, MD by `pyacemaker.services.sampler` (`pyacemaker
up` on free ports),
all replicas in one oracle call per step. Prints a text histogram of the sampled ξ over all frames, every window's
mean and spread, the smallest interatomic distance over all frames, and any replica the guard rails stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pyacemaker.clients.oracle import backend_spec
from pyacemaker.clients.sampler import md_request, run_md
from pyacemaker.config import load_config
from pyacemaker.deploy.local import SERVICES, down, up
from pyacemaker.rpc import channel
from pyacemaker.seeds import load_seeds

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "examples" / "sn2" / "config.yaml"
BIN_WIDTH = 0.1  # Å
BAR_WIDTH = 60  # characters of the longest histogram bar


def text_histogram(values: np.ndarray, low: float, high: float) -> list[str]:
    edges = np.arange(low, high + BIN_WIDTH / 2, BIN_WIDTH)
    counts = np.histogram(values, bins=edges)[0]
    scale = BAR_WIDTH / max(counts.max(), 1)
    return [
        f"{left:+5.2f} … {right:+5.2f} Å {count:6d} {'#' * round(count * scale)}"
        for left, right, count in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="MD steps of 0.5 fs")
    parser.add_argument("--replicas", type=int, default=2, help="replicas per window")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = load_config(CONFIG)
    md = config.md.model_copy(update={"steps": args.steps, "replicas": args.replicas})
    assert md.windows is not None, f"{CONFIG} has no md.windows"
    a, b, c = md.windows.atoms
    starts = load_seeds(config)
    spec = backend_spec("mace", {"models": ["bundled"]})
    print(
        f"{md.windows.count} windows ξ₀ = {md.windows.start:+.2f} … {md.windows.stop:+.2f} Å, k = "
        f"{md.windows.force_constant} eV/Å², {args.replicas} replicas each at {md.temperatures} K in turn, "
        f"{args.steps} steps of {md.timestep_fs} fs, a frame every {md.save_interval} steps",
        flush=True,
    )
    xi: list[float] = []
    window_of: list[int] = []
    min_distances: list[float] = []
    stops = []
    result = None
    with tempfile.TemporaryDirectory(prefix="sn2-windows-") as home:
        try:
            processes = up(Path(home), ports=dict.fromkeys(SERVICES, 0))
            began = time.perf_counter()
            with channel(processes["sampler"].address) as sampler:
                request = md_request(starts, md, processes["oracle"].address, spec)
                for event in run_md(sampler, request, timeout=3600):
                    if event.HasField("frame"):
                        # Recomputed from the positions rather than taken from the frame's own ξ.
                        r = np.reshape(event.frame.structure.positions, (-1, 3))
                        xi.append(float(np.linalg.norm(r[a] - r[b]) - np.linalg.norm(r[b] - r[c])))
                        window_of.append(event.frame.window)
                        min_distances.append(event.frame.min_distance)
                    elif event.HasField("stopped"):
                        stops.append(event.stopped)
                    elif event.HasField("progress") and event.progress.done % max(1, args.steps // 5) == 0:
                        progress = event.progress
                        print(f"  step {progress.done}/{progress.total}: {progress.message}", flush=True)
                    elif event.HasField("result"):
                        result = event.result
            wall = time.perf_counter() - began
        finally:
            down(Path(home))
    assert result is not None
    values, windows = np.array(xi), np.array(window_of)
    print(f"\nξ over all {len(values)} frames ({BIN_WIDTH} Å bins):")
    low = np.floor(min(values.min(), md.windows.start) / BIN_WIDTH) * BIN_WIDTH
    high = np.ceil(max(values.max(), md.windows.stop) / BIN_WIDTH) * BIN_WIDTH
    print("\n".join(text_histogram(values, low, high)))
    print("\nwindow   ξ₀ (Å)   mean ξ (Å)   std ξ (Å)   frames")
    for w, center in enumerate(md.windows.centers()):
        mine = values[windows == w]
        print(f"{w:6d} {center:+8.2f} {mine.mean():+12.3f} {mine.std():11.3f} {len(mine):8d}")
    empty = [f"{x:+.2f}" for x in np.arange(-1.5, 1.5 + 1e-9, BIN_WIDTH) if not np.any(np.abs(values - x) < BIN_WIDTH)]
    print(f"\nsampled ξ range: {values.min():+.3f} … {values.max():+.3f} Å")
    print(f"ξ points in −1.5 … +1.5 Å with no frame within {BIN_WIDTH} Å: {', '.join(empty) or 'none'}")
    print(f"smallest interatomic distance over all frames: {min(min_distances):.3f} Å (guard: {md.min_distance} Å)")
    print(f"replicas stopped: {len(stops)} of {result.replicas}")
    for stop in stops:
        print(f"  replica {stop.replica} at step {stop.step}: {stop.reason}")
    print(
        f"MD: {result.steps} steps in {wall:.1f} s ({result.steps / wall:.1f} steps/s, "
        f"{result.replica_steps_per_s:.0f} replica-steps/s), {result.oracle_calls} oracle calls taking "
        f"{result.oracle_time_s:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
