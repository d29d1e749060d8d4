"""A trainer job's CPU threads: `StartJobRequest.threads` sets the worker's BLAS threads, never above its cores,
and the orchestrator asks for `trainer.fit_threads` on its linear fits only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyacemaker.config import TrainerConfig
from pyacemaker.services.orchestrator.trainer_jobs import LINEAR_FIT_JOBS
from pyacemaker.v1 import trainer_pb2
from tests.conftest import REPO_ROOT

# numpy's BLAS loaded before the limit is set (changed at run time) or after (started with it).
PROBE = """
import json, sys
if sys.argv[2] == "before":
    import numpy
from threadpoolctl import threadpool_info
from pyacemaker.services.trainer.worker import limit_threads
got = limit_threads(int(sys.argv[1]))
import numpy
print(json.dumps([got, [pool["num_threads"] for pool in threadpool_info()]]))
"""


@pytest.mark.parametrize("numpy_loaded", ["before", "after"])
@pytest.mark.parametrize("requested", [0, 1, 10_000])
def test_the_worker_s_blas_runs_the_requested_threads_within_its_cores(requested: int, numpy_loaded: str) -> None:
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(requested), numpy_loaded], env=env, capture_output=True, text=True, check=True
    )
    got, pools = json.loads(out.stdout.strip().splitlines()[-1])
    expected = 1 if requested == 1 else cores
    assert got == expected
    assert pools and all(threads == expected for threads in pools), pools


def test_only_linear_fits_are_given_the_fit_threads() -> None:
    assert set(LINEAR_FIT_JOBS) == {"ace_fit", "delta_fit"}
    assert set(LINEAR_FIT_JOBS) <= {
        field.name for field in trainer_pb2.StartJobRequest.DESCRIPTOR.oneofs_by_name["spec"].fields
    }
    assert TrainerConfig().fit_threads == 0  # default: every core of the trainer's worker
    with pytest.raises(ValueError, match="fit_threads"):
        TrainerConfig(fit_threads=-1)
