"""Seconds of a base ACE fit and of a refinement refit on the same data, each way: one BLAS thread or every core,
the refit computing every frame's rows or starting from the base fit's kept normal equations.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/refit_timing.py WORK_DIR [--ways all|quick]

WORK_DIR is the work dir of a finished `benchmarks/flagship_timing.py run` (its services/trainer/jobs hold every
fit's request, its services/store the shards). The base is the first ace_fit job whose training shards are the
leading shards of a later ace_fit job's, the refinement's refit. The fits run here, in this process (the work
of a trainer worker without the process around it); their outputs go to the same store. `--ways quick` runs
only the two the pipeline now takes (base on every core keeping its equations, refit reusing them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.artifacts import ArtifactStore  # noqa: E402
from pyacemaker.services.trainer.ace_fit import NORMAL_EQUATIONS_KIND, run_ace_fit  # noqa: E402
from pyacemaker.services.trainer.progress import ProgressWriter  # noqa: E402
from pyacemaker.services.trainer.results import JobResult  # noqa: E402
from pyacemaker.v1 import trainer_pb2  # noqa: E402


def base_and_refit(jobs_dir: Path) -> tuple[trainer_pb2.AceFitSpec, trainer_pb2.AceFitSpec]:
    fits = []
    for request_file in sorted(jobs_dir.glob("*/request.pb"), key=lambda path: path.stat().st_mtime):
        request = trainer_pb2.StartJobRequest.FromString(request_file.read_bytes())
        if request.WhichOneof("spec") == "ace_fit":
            fits.append(request.ace_fit)
    for base in fits:
        shards = [ref.sha256 for ref in base.train_data]
        for later in fits:
            if len(later.train_data) > len(shards) and [r.sha256 for r in later.train_data[: len(shards)]] == shards:
                return base, later
    raise SystemExit(f"{jobs_dir}: no ace_fit job whose shards lead another's (did the refinement refit?)")


def timed(name: str, spec: trainer_pb2.AceFitSpec, store: ArtifactStore, threads: int) -> JobResult:
    from threadpoolctl import threadpool_limits

    with tempfile.TemporaryDirectory(prefix="refit-timing-") as scratch, threadpool_limits(limits=threads):
        began = time.perf_counter()
        result = run_ace_fit(spec, store, Path(scratch), ProgressWriter(Path(scratch) / "progress.jsonl"))
        seconds = time.perf_counter() - began
        shutil.rmtree(scratch, ignore_errors=True)
    m = result.metrics
    print(
        f"{name:52s} {seconds:7.1f} s  {threads} thread(s)  {int(m['structures_count']):5d} frames "
        f"({int(m['reused_equations_structures_count'])} from kept equations)  λ {m['ridge_lambda_relative']:.1e}  "
        f"CV forces {1000 * m['cv_forces_rmse_ev_per_a']:.1f} meV/Å",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--ways", choices=("all", "quick"), default="all")
    args = parser.parse_args(argv)
    store = ArtifactStore(args.work_dir / "services" / "store")
    base, refit = base_and_refit(args.work_dir / "services" / "trainer" / "jobs")
    cores = len(os.sched_getaffinity(0))
    base.ClearField("basis")
    base.ClearField("normal_equations")
    if args.ways == "all":
        base.keep_normal_equations = False
        timed("base fit", base, store, 1)
    base.keep_normal_equations = True
    kept = timed("base fit, keeping its normal equations", base, store, cores)
    (equations,) = [ref for ref in kept.outputs if ref.kind == NORMAL_EQUATIONS_KIND]
    (yaml,) = [ref for ref in kept.outputs if ref.uri.endswith(".yaml") and ref.kind == "potential"]
    print(f"  kept normal equations: {equations.size / 2**20:.0f} MiB")
    refit.keep_normal_equations = False
    refit.basis.CopyFrom(yaml)
    refit.ClearField("normal_equations")
    if args.ways == "all":
        timed("refit on the base's basis, every frame's rows", refit, store, 1)
        timed("refit on the base's basis, every frame's rows", refit, store, cores)
    refit.normal_equations.CopyFrom(equations)
    timed("refit from the kept normal equations", refit, store, cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
