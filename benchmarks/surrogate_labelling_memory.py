"""Peak memory of step 5 (surrogate labelling) against the frame count: the labelling process and the oracle.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/surrogate_labelling_memory.py \
        [--sizes 20000 100000] [--models 1] [--shard-size 5000]

For each N: a fresh oracle process (`python -m pyacemaker.services.oracle`, mace backend over the bundled teacher,
or the
teacher plus perturbed copies for a committee), N rattled SN2 frames (6 atoms, from examples/sn2/seeds)
streamed into an extxyz file, and a fresh process that runs SurrogateLabellingStep.run on them as the
orchestrator would (artifact store, shards, summary). Peak RSS is VmHWM from /proc/PID/status of each
process when its work is done. Flat: the peak at the largest N is within 10 % of the peak at the smallest.
Time: mace labels ~700 six-atom structures/s per core when idle; expect ~3-6 min for 120 000 frames.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.artifacts import ArtifactStore  # noqa: E402
from pyacemaker.clients.oracle import artifact_option  # noqa: E402
from pyacemaker.rpc import wait_for_health  # noqa: E402
from pyacemaker.structures import read_structures, write_extxyz  # noqa: E402
from pyacemaker.teacher import resolve_teacher  # noqa: E402

SN2_SEEDS = REPO_ROOT / "examples" / "sn2" / "seeds"
SEED_FILES = ("reactant_complex.xyz", "transition_state.xyz", "product_complex.xyz")
FLAT_TOLERANCE = 0.10


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM (the peak resident set size) of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def write_frames(path: Path, count: int, seed: int = 0, chunk: int = 1000) -> None:
    """`count` rattled SN2 frames (0.05 Å Gaussian rattle of the three seeds), written a chunk at a time."""
    rng = np.random.default_rng(seed)
    seeds = [read_structures(SN2_SEEDS / name)[0] for name in SEED_FILES]
    path.unlink(missing_ok=True)
    for start in range(0, count, chunk):
        frames = []
        for i in range(start, min(start + chunk, count)):
            atoms = seeds[i % 3].copy()
            atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
            atoms.info["md_step"] = i
            frames.append(atoms)
        write_extxyz(path, frames, append=True)


def committee_files(count: int, scratch: Path) -> list[Path]:
    """The bundled teacher, plus copies with one weight tensor perturbed for a committee of `count`."""
    teacher = resolve_teacher("bundled")
    if count == 1:
        return [teacher]
    import torch

    files = [teacher]
    for member in range(1, count):
        model = torch.load(teacher, weights_only=False)
        generator = torch.Generator().manual_seed(member)
        with torch.no_grad():
            weight = next(model.interactions[0].parameters())
            weight.add_(0.05 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
        files.append(scratch / f"member_{member}.model")
        torch.save(model, files[-1])
    return files


def start_oracle(scratch: Path, store: Path) -> tuple[subprocess.Popen, str]:
    port_file = scratch / "oracle.port"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pyacemaker.services.oracle", "--port", "0", "--port-file", str(port_file)]
    command += ["--store", str(store), "--work-dir", str(scratch / "oracle")]
    with open(scratch / "oracle.log", "ab") as log:  # the process keeps its own copy of the handle
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=_environment())
    deadline = time.monotonic() + 60
    while not port_file.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the oracle did not start; see {scratch / 'oracle.log'}")
        time.sleep(0.1)
    address = f"127.0.0.1:{int(port_file.read_text())}"
    wait_for_health(address, timeout=30)
    return process, address


def _environment() -> dict[str, str]:
    # PYTHONPATH: mace-torch installs its own top-level `tests` package; ours must win.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}


def measure(count: int, models: list[Path], shard_size: int, scratch: Path) -> dict[str, float]:
    """Label `count` frames with a fresh oracle and a fresh labelling process; their peak RSS and the time."""
    store_root = scratch / f"store_{count}"
    store = ArtifactStore(store_root)
    frames_file = scratch / f"frames_{count}.extxyz"
    write_frames(frames_file, count)
    job = {
        "store": str(store_root),
        "frames": artifact_option(store.put_file(frames_file, kind="structures", move=True)),
        "models": [artifact_option(store.put_file(path, kind="model")) for path in models],
        "run_dir": str(scratch / f"run_{count}"),
        "shard_size": shard_size,
    }
    oracle, address = start_oracle(scratch, store_root)
    try:
        job["oracle"] = address
        job_file = scratch / f"job_{count}.json"
        job_file.write_text(json.dumps(job))
        start = time.perf_counter()
        worker = subprocess.run(
            [sys.executable, __file__, "--worker", str(job_file)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=_environment(),
            check=True,
        )
        seconds = time.perf_counter() - start
        oracle_peak = peak_rss_mb(oracle.pid)
    finally:
        oracle.terminate()
        oracle.wait(30)
    result = json.loads(worker.stdout.strip().splitlines()[-1])
    if result["n_labelled"] != count:
        raise RuntimeError(f"labelled {result['n_labelled']} of {count} frames")
    return {"labeller_mb": result["peak_rss_mb"], "oracle_mb": oracle_peak, "seconds": seconds, **result}


def run_worker(job_file: Path) -> None:
    """The labelling process: step 5 exactly as the orchestrator runs it, progress on stderr, then one JSON line
    with its own peak RSS."""
    from pyacemaker.config import SurrogateLabellingConfig, load_config
    from pyacemaker.services.orchestrator.steps import StepContext, step_key
    from pyacemaker.services.orchestrator.steps.surrogate_labelling import SurrogateLabellingStep
    from pyacemaker.v1 import common_pb2

    job = json.loads(job_file.read_text())
    config = load_config(REPO_ROOT / "examples" / "sn2" / "config.yaml").model_copy(
        update={"surrogate_labelling": SurrogateLabellingConfig(shard_size=job["shard_size"])}
    )

    def report(progress: common_pb2.Progress) -> None:
        if progress.message.startswith("shard"):
            print(f"  {progress.done}/{progress.total}: {progress.message}", file=sys.stderr, flush=True)

    step = SurrogateLabellingStep()
    ctx = StepContext(
        config=config,
        store=ArtifactStore(job["store"]),
        run_dir=Path(job["run_dir"]),
        seeds=[],
        sampler_address="",
        oracle_address=job["oracle"],
        trainer_address="",
        report=report,
        previous={
            "surrogate_md": {"frames": common_pb2.ArtifactRef(**job["frames"])},
            "mace_finetune": {f"model_{i}": common_pb2.ArtifactRef(**m) for i, m in enumerate(job["models"])},
        },
    )
    ctx.key = step_key(step, ctx)
    outcome = step.run(ctx)
    print(
        json.dumps(
            {
                "peak_rss_mb": peak_rss_mb(),
                "n_labelled": int(outcome.metrics["n_labelled"]),
                "n_shards": int(outcome.metrics["n_shards"]),
                "max_force_std_max": outcome.metrics["max_force_std_max_ev_per_a"],
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000], help="frame counts")
    parser.add_argument("--models", type=int, default=1, help="committee members (the teacher + perturbed copies)")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return 0
    with tempfile.TemporaryDirectory(prefix="surrogate-labelling-") as tmp:
        scratch = Path(tmp)
        models = committee_files(args.models, scratch)
        print(f"committee of {args.models} (bundled teacher), shard size {args.shard_size}, 6-atom SN2 frames")
        rows = []
        for count in args.sizes:
            print(f"N = {count}: labelling ...", flush=True)
            row = measure(count, models, args.shard_size, scratch)
            rows.append((count, row))
            print(
                f"N = {count:>7}: labeller peak RSS {row['labeller_mb']:7.1f} MB, oracle peak RSS "
                f"{row['oracle_mb']:7.1f} MB, {row['seconds']:6.1f} s ({count / row['seconds']:.0f} frames/s), "
                f"{row['n_shards']} shards",
                flush=True,
            )
    (small, first), (large, last) = rows[0], rows[-1]
    flat = True
    for key, name in (("labeller_mb", "labelling process"), ("oracle_mb", "oracle")):
        ratio = last[key] / first[key]
        flat &= abs(ratio - 1) <= FLAT_TOLERANCE
        print(f"{name}: peak RSS at N={large} / N={small} = {ratio:.3f}")
    print(f"flat (within {FLAT_TOLERANCE:.0%}): {'yes' if flat else 'NO'}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
