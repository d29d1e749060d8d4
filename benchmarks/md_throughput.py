"""Surrogate-MD throughput: the sampler service with the batched remote calculator vs the same MD in-process.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/md_throughput.py [--replicas 16] [--steps 200]

16 SN2 replicas (Cl⁻ + CH3Cl, 6 atoms; the example's three seeds at 300/600/1000 K), Langevin NVT at 0.5 fs, forces
from the bundled MACE teacher. Four ways, each timed over the same number of steps:

1. service, batched: `pyacemaker.services.sampler` and `pyacemaker.services.oracle` as their own processes
(`pyacemaker up` on free
   ports); RunMd sends every replica's structure in ONE Label call per step.
2. service, one call per replica: the same, with settings.replicas_per_oracle_call = 1.
3. in-process, batched: the sampler's MD engine in this process with the mace backend class called directly
   (same graph batching, no gRPC, no protobuf).
4. in-process ASE: what a script would do: mace's MACECalculator with ASE's Langevin (fixcm=False + FixCom),
   replica after replica.

Prints MD steps/s (all replicas advanced one step) and replica-steps/s of each, and the ratios. Timings on a
shared machine are noisy; run it when the machine is quiet for clean figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from ase import units
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.clients.oracle import artifact_option, backend_spec
from pyacemaker.clients.sampler import md_request, md_settings, run_md
from pyacemaker.config import MaceOracleConfig, MdConfig
from pyacemaker.deploy.local import SERVICES, down, store_dir, up
from pyacemaker.rpc import channel
from pyacemaker.structures import read_structures
from pyacemaker.teacher import resolve_teacher

REPO_ROOT = Path(__file__).resolve().parent.parent
SEEDS = [REPO_ROOT / "examples" / "sn2" / "seeds" / f"{n}.xyz" for n in ("reactant_complex", "transition_state")]
SEEDS.append(SEEDS[0].with_name("product_complex.xyz"))


def md_config(replicas: int, steps: int) -> MdConfig:
    return MdConfig(
        temperatures=[300.0, 600.0, 1000.0],
        timestep_fs=0.5,
        steps=steps,
        save_interval=10,
        replicas=replicas,
        min_distance=0.6,
        n_frames=1,
    )


def through_service(
    address: dict[str, str], model: Path, config: MdConfig, per_call: int, home: Path
) -> tuple[float, object]:
    """(wall s of the RunMd call, its MdResult); a 5-step warm-up first loads the model in the oracle."""
    starts = [read_structures(path)[0] for path in SEEDS]
    # The oracle loads model files only from the deployment's store.
    spec = backend_spec("mace", {"models": [artifact_option(ArtifactStore(store_dir(home)).put_file(model, "model"))]})
    with channel(address["sampler"]) as sampler:
        warm = config.model_copy(update={"steps": 5})
        list(run_md(sampler, md_request(starts, warm, address["oracle"], spec, per_call), timeout=600))
        began = time.perf_counter()
        result = None
        for event in run_md(sampler, md_request(starts, config, address["oracle"], spec, per_call), timeout=3600):
            if event.HasField("result"):
                result = event.result
        return time.perf_counter() - began, result


def in_process_engine(model: Path, config: MdConfig) -> float:
    """Wall s of the sampler's engine with the mace backend called in this process (batched, no gRPC)."""
    from pyacemaker.services.oracle.backends.mace import MaceBackend
    from pyacemaker.services.sampler.md import run_md as run_engine
    from pyacemaker.services.sampler.server import md_parameters_from_settings

    backend = MaceBackend(MaceOracleConfig(backend="mace", models=[model]))
    starts = [read_structures(path)[0] for path in SEEDS]
    params = md_parameters_from_settings(md_settings(config))
    list(backend.label_batch(starts))  # warm-up
    began = time.perf_counter()
    for _ in run_engine(starts, params, lambda frames: list(backend.label_batch(frames))):
        pass
    return time.perf_counter() - began


def in_process_ase(model: Path, config: MdConfig) -> float:
    """Wall s of ASE Langevin + MACECalculator, replica after replica."""
    from mace.calculators import MACECalculator

    calculator = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
    starts = [read_structures(path)[0] for path in SEEDS]
    elapsed = 0.0
    for r in range(config.replicas):
        atoms = starts[r % len(starts)].copy()
        temperature = config.temperatures[(r // len(starts)) % len(config.temperatures)]
        atoms.calc = calculator
        atoms.set_constraint(FixCom())
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature)
        dynamics = Langevin(
            atoms,
            config.timestep_fs * units.fs,
            temperature_K=temperature,
            friction=config.friction_per_fs / units.fs,
            fixcm=False,
        )
        atoms.get_forces()  # first evaluation outside the timing, as the engine's warm-up
        began = time.perf_counter()
        dynamics.run(config.steps)
        elapsed += time.perf_counter() - began
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default="bundled", help="teacher.model: path, 'bundled' or foundation name")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = resolve_teacher(args.model)
    config = md_config(args.replicas, args.steps)
    print(
        f"model: {model}  replicas: {args.replicas} SN2 (6 atoms)  steps: {args.steps} of {config.timestep_fs} fs  "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
        flush=True,
    )
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="md-throughput-") as home:
        try:
            processes = up(Path(home), ports=dict.fromkeys(SERVICES, 0))
            address = {name: proc.address for name, proc in processes.items()}
            batched_s, batched = through_service(address, model, config, per_call=0, home=Path(home))
            rows.append(("service, one oracle call per step (batched)", batched_s))
            print(
                f"  batched RunMd: {batched.oracle_calls} oracle calls, {batched.oracle_time_s:.1f} of "
                f"{batched.wall_time_s:.1f} s waiting for the oracle",
                flush=True,
            )
            single_s, single = through_service(address, model, config, per_call=1, home=Path(home))
            rows.append(("service, one oracle call per replica per step", single_s))
            print(f"  per-replica RunMd: {single.oracle_calls} oracle calls", flush=True)
        finally:
            down(Path(home))
    rows.append(("in-process engine + mace backend (batched, no gRPC)", in_process_engine(model, config)))
    rows.append(("in-process ASE Langevin + MACECalculator (one replica at a time)", in_process_ase(model, config)))
    print(f"\n{'':66s} {'MD steps/s':>10s} {'replica-steps/s':>16s}")
    for name, seconds in rows:
        print(f"{name:66s} {args.steps / seconds:10.1f} {args.steps * args.replicas / seconds:16.1f}")
    rate = {name: args.steps / seconds for name, seconds in rows}
    names = [name for name, _ in rows]
    print(f"\nservice batched / in-process batched engine: {rate[names[0]] / rate[names[2]]:.2f}")
    print(f"service batched / in-process ASE MACECalculator: {rate[names[0]] / rate[names[3]]:.2f}")
    print(f"batched / one call per replica (16 replicas through the service): {rate[names[0]] / rate[names[1]]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
