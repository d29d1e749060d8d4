"""What crash isolation costs: one Label stream of N rattled SN2 frames (6 atoms, GFN2-xTB) through a real oracle
server on loopback, once with xtb in its worker subprocesses (the default, pyacemaker/services/oracle/workers.py)
and once
labelled in the server's own process (isolation switched off for the measurement only).

    python benchmarks/oracle_worker_overhead.py [--frames 1000]

Prints the wall time of both streams and the overhead per structure.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pyacemaker.clients.oracle import backend_spec, stream_labels
from pyacemaker.rpc import channel, create_server
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from pyacemaker.services.oracle.server import add_to_server
from pyacemaker.structures import read_structures


def stream_seconds(frames: list, isolated: bool) -> tuple[float, int]:
    XtbBackend.isolated = isolated  # type: ignore[misc]  # measurement only
    service = create_server("127.0.0.1", 0, add_to_server)
    service.start()
    try:
        with channel(f"127.0.0.1:{service.port}") as oracle:
            spec = backend_spec("xtb", {})
            list(stream_labels(oracle, spec, frames[:4], 64, 600))  # warm up: worker start, tblite import
            start = time.perf_counter()
            results = list(stream_labels(oracle, spec, frames, 64, 600))
            return time.perf_counter() - start, sum(1 for _, labels in results if labels.ok)
    finally:
        service.stop(grace=0)
        XtbBackend.isolated = True  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    args = parser.parse_args()
    seed = read_structures("examples/sn2/seeds/reactant_complex.xyz")[0]
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(args.frames):
        atoms = seed.copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        frames.append(atoms)
    in_process, ok_in = stream_seconds(frames, isolated=False)
    isolated, ok_iso = stream_seconds(frames, isolated=True)
    print(f"{args.frames} frames of {len(seed)} atoms, xtb GFN2")
    print(f"in-process: {in_process:.2f} s ({ok_in} OK), {1000 * in_process / args.frames:.2f} ms/structure")
    print(f"isolated:   {isolated:.2f} s ({ok_iso} OK), {1000 * isolated / args.frames:.2f} ms/structure")
    print(
        f"overhead:   {1000 * (isolated - in_process) / args.frames:+.2f} ms/structure "
        f"({100 * (isolated / in_process - 1):+.1f} %)"
    )


if __name__ == "__main__":
    main()
