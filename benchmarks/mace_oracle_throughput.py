"""Batched MACE labelling throughput: through the oracle service vs in-process batched mace, same structures.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mace_oracle_throughput.py [--n 1000] [--batch-size 32]

The structures are rattled SN2 frames (Cl⁻ + CH3Cl, 6 atoms) from the example's seeds. In-process: mace's own
data pipeline (AtomicData.from_config, torch_geometric DataLoader) and one forward/backward pass per batch,
energy and forces, exactly what a script using mace directly would do. Service: `python -m
pyacemaker.services.oracle` as
its own process, the structures streamed in requests of `--batch-size` through the Label RPC (protobuf
conversion, gRPC, committee statistics included). Both after a warm-up on the same model, torch on
OMP_NUM_THREADS threads, each timed `--repeats` times with the best kept (timings on a shared machine are
noisy). Prints structures/s for both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.clients.oracle import artifact_option, backend_spec, stream_labels
from pyacemaker.rpc import channel, wait_for_health
from pyacemaker.structures import read_structures
from pyacemaker.teacher import resolve_teacher

REPO_ROOT = Path(__file__).resolve().parent.parent

SEEDS = [REPO_ROOT / "examples" / "sn2" / "seeds" / f"{name}.xyz" for name in ("reactant_complex", "transition_state")]


def sn2_frames(n: int, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    seeds = [read_structures(path)[0] for path in [*SEEDS, SEEDS[0].with_name("product_complex.xyz")]]
    frames = []
    for i in range(n):
        atoms = seeds[i % len(seeds)].copy()
        atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
        frames.append(atoms)
    return frames


def in_process(model_path: Path, frames: list[Atoms], batch_size: int, repeats: int) -> tuple[float, np.ndarray]:
    """Best of `repeats` timings of energy + forces of all frames with mace's own loader; (seconds, energies)."""
    import torch
    from mace import data as mace_data
    from mace.tools import torch_geometric, torch_tools
    from mace.tools.utils import AtomicNumberTable

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch_tools.set_default_dtype("float64")
    model = torch.load(model_path, map_location="cpu", weights_only=False).double()
    for parameter in model.parameters():
        parameter.requires_grad = False
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    r_max = float(model.r_max)

    def run(subset: list[Atoms]) -> np.ndarray:
        keyspec = mace_data.KeySpecification(info_keys={}, arrays_keys={})
        dataset = [
            mace_data.AtomicData.from_config(
                mace_data.config_from_atoms(atoms, key_specification=keyspec), z_table=z_table, cutoff=r_max
            )
            for atoms in subset
        ]
        loader = torch_geometric.dataloader.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
        energies = []
        for batch in loader:
            out = model(batch.to_dict(), compute_force=True, training=False)
            energies.append(out["energy"].detach().numpy())
            out["forces"].detach().numpy()
        return np.concatenate(energies)

    run(frames[:batch_size])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        energies = run(frames)
        best = min(best, time.perf_counter() - start)
    return best, energies


def through_service(model_path: Path, frames: list[Atoms], batch_size: int, repeats: int) -> tuple[float, np.ndarray]:
    """Best of `repeats` timings of the same frames through a separate oracle process; (seconds, energies)."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyacemaker.services.oracle",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--store",
                tmp,
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the oracle did not start")
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text()}"
            wait_for_health(address)
            # The oracle loads model files only from its store.
            model = artifact_option(ArtifactStore(tmp).put_file(model_path, kind="model"))
            spec = backend_spec("mace", {"models": [model], "batch_size": batch_size})
            with channel(address) as oracle:
                list(stream_labels(oracle, spec, frames[:batch_size], batch_size=batch_size, timeout=120))  # warm-up
                energies = np.empty(len(frames))
                elapsed = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    for index, labels in stream_labels(oracle, spec, frames, batch_size=batch_size, timeout=600):
                        energies[index] = labels.energy
                    elapsed = min(elapsed, time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return elapsed, energies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="structures")
    parser.add_argument("--batch-size", type=int, default=32, help="structures per graph batch and per request")
    parser.add_argument("--repeats", type=int, default=3, help="timings per side; the best counts (shared machines)")
    parser.add_argument("--model", default="bundled", help="teacher.model: path, 'bundled' or foundation name")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model_path = resolve_teacher(args.model)
    frames = sn2_frames(args.n)
    direct_s, direct_energies = in_process(model_path, frames, args.batch_size, args.repeats)
    service_s, service_energies = through_service(model_path, frames, args.batch_size, args.repeats)
    agreement = float(np.abs(direct_energies - service_energies).max())
    direct_rate, service_rate = len(frames) / direct_s, len(frames) / service_s
    print(
        f"model: {model_path}  structures: {len(frames)} (6 atoms)  batch: {args.batch_size}  "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    print(f"in-process batched mace: {direct_rate:8.1f} structures/s ({direct_s:.2f} s)")
    print(f"oracle service (Label):  {service_rate:8.1f} structures/s ({service_s:.2f} s)")
    print(f"service / in-process:    {service_rate / direct_rate:8.2f}   (max |ΔE| = {agreement:.1e} eV)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
