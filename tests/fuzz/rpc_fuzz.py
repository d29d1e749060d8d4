"""Property-based fuzzing of every RPC of the four services, against real servers in their own processes.

`Services` starts oracle, sampler, trainer and orchestrator as `python -m pyacemaker.services.<name>` on free
loopback ports
(with the code of a chosen checkout first on PYTHONPATH, so the same fuzzer can measure an older version).
`REQUESTS` maps each RPC to a hypothesis strategy of malformed-to-valid requests: nasty numbers (NaN, ±inf,
1e308, int32 extremes), NUL bytes and junk text, broken JSON, Z = 0/119, empty and absurdly small cells, random
artifact references. `call` sends one request with a 30 s deadline and returns an `Outcome`; `violations`
says what is wrong with it: an UNKNOWN or INTERNAL status (an unhandled exception), an unbounded message, a
hang, a dead server, or a Label stream that did not return one result per structure.

Fully valid requests that would start expensive work (a training job, a whole run) are never generated: a
valid artifact or config is always paired with at least one bad field.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from pyacemaker.v1 import (
    common_pb2,
    oracle_pb2,
    oracle_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    sampler_pb2,
    sampler_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 30.0
# Longest status message a client may get (pyacemaker.rpc.MAX_STATUS_MESSAGE_CHARS plus slack).
MAX_DETAILS_CHARS = 1100
FORBIDDEN_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# -- the services -----------------------------------------------------------------------------------------------


@dataclass
class Services:
    """Four service processes and what the fuzzer needs to reach deeper code: a valid pool, a shard of
    random bytes and a valid but unlabelled shard in the artifact store."""

    root: Path
    code_root: Path = REPO_ROOT
    addresses: dict[str, str] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    refs: dict[str, common_pb2.ArtifactRef] = field(default_factory=dict)

    def crashed(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def restart_crashed(self) -> None:
        """Start a crashed service again (its address changes); the fuzz campaign goes on after a crash."""
        for name in self.crashed():
            self.processes[name], self.addresses[name] = _start(
                name, self.root, self.code_root, self.extra_args[name], self.root / "services.log"
            )

    def healthy(self, name: str) -> bool:
        try:
            with grpc.insecure_channel(self.addresses[name]) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError:
            return False
        return status.status == health_pb2.HealthCheckResponse.SERVING


def _start(name: str, root: Path, code_root: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = root / f"{name}.port"
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    for variable in [v for v in env if v.startswith("PYACEMAKER_TLS") or v == "PYACEMAKER_TOKEN_FILE"]:
        del env[variable]
    command = [sys.executable, "-m", f"pyacemaker.services.{name}", "--port", "0", "--port-file", str(port_file)]
    command += ["--store", str(root / "store"), *extra]
    with open(log, "ab") as output:
        process = subprocess.Popen(command, env=env, cwd=code_root, stdout=output, stderr=output)
    deadline = time.monotonic() + 120
    while not port_file.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{name} did not start; see {log}")
        time.sleep(0.05)
    return process, f"127.0.0.1:{int(port_file.read_text())}"


@contextmanager
def running_services(code_root: Path = REPO_ROOT, root: Path | None = None) -> Iterator[Services]:
    """The four services of `code_root` on loopback, stopped (killed if need be) on exit."""
    with tempfile.TemporaryDirectory(prefix="pyacemaker-fuzz-") as temporary:
        base = Path(root or temporary)
        # The orchestrator's services are closed ports: a run that slipped through fails at once.
        dead = ["--sampler", "127.0.0.1:9", "--oracle", "127.0.0.1:9", "--trainer", "127.0.0.1:9"]
        extra_args = {
            "oracle": ["--work-dir", str(base / "oracle")],
            "sampler": [],
            "trainer": ["--work-dir", str(base / "trainer")],
            "orchestrator": dead,
        }
        services = Services(base, code_root, extra_args=extra_args)
        log = base / "services.log"
        try:
            for name, extra in extra_args.items():
                services.processes[name], services.addresses[name] = _start(name, base, code_root, extra, log)
            services.refs = _store_fixtures(base / "store")
            yield services
        finally:
            for process in services.processes.values():
                process.terminate()
            for process in services.processes.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _store_fixtures(store_root: Path) -> dict[str, common_pb2.ArtifactRef]:
    """A valid pool (rattled H2O), a file of random bytes, and a valid but unlabelled shard, put into the
    store the way the services do."""
    from ase import Atoms

    from pyacemaker.artifacts import ArtifactStore
    from pyacemaker.structures import write_extxyz

    store = ArtifactStore(store_root)
    rng = np.random.default_rng(0)
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    frames = []
    for _ in range(12):
        atoms = water.copy()
        atoms.positions += rng.normal(scale=0.05, size=(3, 3))
        frames.append(atoms)
    refs = {}
    pool = store.new_tempfile(".extxyz")
    write_extxyz(pool, frames)
    refs["pool"] = store.put_file(pool, "structures", move=True)
    noise = store.new_tempfile(".extxyz")
    noise.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    refs["random_bytes"] = store.put_file(noise, "structures", move=True)
    noise_yaml = store.new_tempfile(".yaml")
    noise_yaml.write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    refs["random_yaml"] = store.put_file(noise_yaml, "potential", move=True)
    return refs


# -- strategies -------------------------------------------------------------------------------------------------

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
NASTY_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, -0.0, 1e-300, -1.0]
nasty_float = st.one_of(st.sampled_from(NASTY_FLOATS), st.floats(width=64))
small_float = st.floats(min_value=-10, max_value=10, allow_nan=False)
nasty_int32 = st.one_of(st.sampled_from([*INT32, -1, 0, 1, 2, 3]), st.integers(*INT32))
nasty_int64 = st.one_of(st.sampled_from([*INT64, -1, 0, 1]), st.integers(*INT64))
nasty_text = st.one_of(
    st.sampled_from(["", "\x00", "a\x00b", "/dev/null", "../../etc/passwd", "x" * 5000, "{", "null", "[]", "1e999"]),
    st.text(max_size=40),
)

H2 = ([1, 1], [0.0, 0.0, 0.0, 0.0, 0.0, 0.74])
WATER = ([8, 1, 1], [0.0, 0.0, 0.0, 0.96, 0.0, 0.0, -0.24, 0.93, 0.0])
BAD_JSON = [
    "{",
    "[1, 2]",
    "null",
    '{"a": {"__ndarray__": 1, "dtype": "bogus"}}',
    '{"a": {"__ndarray__": [1, 2], "dtype": "float64", "shape": [5]}}',
    '{"a": {"__npscalar__": 1}}',
    "[" * 100_000,
    '{"x": [1, 2, 3, 4, 5, 6, 7]}',
    '{"numbers": [1, 1]}',
    "\x00",
]


@st.composite
def structures(draw: st.DrawFn, valid_only: bool = False) -> common_pb2.Structure:
    """A small valid molecule, or one with one field made nasty, or a structure of random fields."""
    numbers, positions = draw(st.sampled_from([H2, WATER]))
    message = common_pb2.Structure(atomic_numbers=numbers, positions=positions, pbc=[False] * 3)
    if valid_only:
        return message
    kind = draw(st.integers(0, 13))
    if kind == 1:
        message.atomic_numbers[0] = draw(st.sampled_from([0, -1, 119, 87, *INT32]))
    elif kind == 2:
        message.positions[draw(st.integers(0, len(positions) - 1))] = draw(nasty_float)
    elif kind == 3:
        side = draw(st.sampled_from([0.01, 0.1, 0.5, math.nan, 1e308, 0.0, 3.0]))
        message.cell.extend([side, 0, 0, 0, side, 0, 0, 0, side])
        message.pbc[:] = draw(st.sampled_from([[True] * 3, [True, False, False], [False] * 3]))
    elif kind == 4:
        message.charge = draw(nasty_int32)
    elif kind == 5:
        message.spin_multiplicity = draw(nasty_int32)
    elif kind == 6:
        message.info_json = draw(st.one_of(st.sampled_from(BAD_JSON), nasty_text))
    elif kind == 7:
        message.arrays_json = draw(st.one_of(st.sampled_from(BAD_JSON), nasty_text))
    elif kind == 8:
        del message.atomic_numbers[:]
        del message.positions[:]
    elif kind == 9:
        message.positions.append(1.0)  # 3n + 1 values
    elif kind == 10:
        message.cell.extend(draw(st.lists(nasty_float, max_size=10)))
        del message.pbc[:]
        message.pbc.extend(draw(st.lists(st.booleans(), max_size=5)))
    elif kind == 11:
        message.content_id = draw(nasty_text)
    elif kind == 12:
        n = draw(st.integers(0, 4))
        return common_pb2.Structure(
            atomic_numbers=draw(st.lists(st.integers(-3, 130), min_size=n, max_size=n)),
            positions=draw(st.lists(nasty_float, min_size=3 * n, max_size=3 * n)),
            cell=draw(st.lists(nasty_float, max_size=9)),
            pbc=draw(st.lists(st.booleans(), max_size=3)),
            charge=draw(nasty_int32),
            spin_multiplicity=draw(nasty_int32),
        )
    elif kind == 13:  # two atoms on top of each other
        message.positions[3:6] = message.positions[0:3]
    return message


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=False, width=32), nasty_text),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(nasty_text, children, max_size=3)),
    max_leaves=8,
)
option_dicts = st.one_of(
    st.just({}),
    st.dictionaries(
        st.sampled_from(["method", "epsilon", "sigma", "cutoff", "models", "x", "executor"]), json_values, max_size=3
    ),
)
backend_specs = st.one_of(
    st.builds(lambda o: oracle_pb2.BackendSpec(name="lj", options=_struct(o)), option_dicts),
    st.just(oracle_pb2.BackendSpec(name="xtb")),
    st.builds(lambda n: oracle_pb2.BackendSpec(name=n), st.one_of(nasty_text, st.sampled_from(["mace", "ace"]))),
)


@st.composite
def label_streams(draw: st.DrawFn) -> list[oracle_pb2.LabelRequest]:
    spec = draw(st.one_of(st.sampled_from([oracle_pb2.BackendSpec(name="lj"), oracle_pb2.BackendSpec(name="xtb")]),
                          backend_specs))  # fmt: skip
    requests = []
    for position in range(draw(st.integers(1, 3))):
        request = oracle_pb2.LabelRequest(structures=draw(st.lists(structures(), max_size=4)))
        if position == 0 and draw(st.integers(0, 9)) > 0:
            request.backend.CopyFrom(spec)
        elif position > 0 and draw(st.integers(0, 9)) == 0:
            request.backend.CopyFrom(draw(backend_specs))
        requests.append(request)
    return requests


@st.composite
def describe_streams(draw: st.DrawFn) -> list[oracle_pb2.DescribeRequest]:
    spec = draw(st.one_of(st.just(oracle_pb2.BackendSpec(name="mace", options=_struct({"models": ["bundled"]}))),
                          backend_specs))  # fmt: skip
    return [oracle_pb2.DescribeRequest(backend=spec, structures=draw(st.lists(structures(), min_size=1, max_size=3)))]


def artifact_refs(services_refs: dict[str, common_pb2.ArtifactRef]) -> st.SearchStrategy[common_pb2.ArtifactRef]:
    return st.one_of(
        st.builds(
            lambda uri, sha, size: common_pb2.ArtifactRef(uri=uri, sha256=sha, size=size),
            nasty_text,
            st.one_of(nasty_text, st.just("0" * 64)),
            nasty_int64,
        ),
        st.sampled_from(list(services_refs.values())),
    )


@st.composite
def with_nasty_fields(draw: st.DrawFn, base: Any, nasty: dict[str, st.SearchStrategy[Any]]) -> Any:
    """A copy of the valid message `base` with one to three of its fields drawn from their nasty strategies (or
    all of them, now and then)."""
    message = type(base)()
    message.CopyFrom(base)
    names = sorted(nasty)
    chosen = names if draw(st.integers(0, 9)) == 0 else draw(st.lists(st.sampled_from(names), min_size=1, max_size=3))
    for name in chosen:
        value = draw(nasty[name])
        if isinstance(value, list):
            del getattr(message, name)[:]
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


VALID_POOL = sampler_pb2.PoolSettings(
    rattle_amplitudes=[0.05], rattles_per_amplitude=3, max_strain=0.01, interpolation_images=2,
    fragment_rotations_per_seed=1, max_rotation_deg=20, min_distance=0.5, interpolation_rattle=0.02,
)  # fmt: skip
VALID_MD = sampler_pb2.MdSettings(
    temperatures_k=[300.0], timestep_fs=0.5, steps=3, save_interval=1, replicas=2, friction_per_fs=0.01,
    min_distance=0.4, max_force_std=10.0, barostat_time_fs=100.0, compressibility_per_gpa=0.01,
)  # fmt: skip


def pool_settings() -> st.SearchStrategy[sampler_pb2.PoolSettings]:
    small = st.sampled_from([-1, 0, 1, 2, *INT32])
    nasty = {
        "rattle_amplitudes": st.lists(nasty_float, max_size=3),
        "rattles_per_amplitude": small,
        "max_strain": nasty_float,
        "strains_per_seed": small,
        "interpolation_images": small,
        "fragment_rotations_per_seed": small,
        "max_rotation_deg": nasty_float,
        "min_distance": nasty_float,
        "random_seed": nasty_int64,
        "interpolation_rattle": nasty_float,
    }
    return with_nasty_fields(VALID_POOL, nasty)


def md_settings() -> st.SearchStrategy[sampler_pb2.MdSettings]:
    few = st.sampled_from([-1, 0, 1, 2, INT32[0]])
    nasty = {
        "temperatures_k": st.lists(st.one_of(nasty_float, st.just(300.0)), max_size=2),
        "timestep_fs": nasty_float,
        "steps": few,
        "save_interval": few,
        "replicas": st.sampled_from([-1, 0, 1, 2, INT32[1]]),
        "friction_per_fs": nasty_float,
        "min_distance": nasty_float,
        "max_force_std": nasty_float,
        "random_seed": nasty_int64,
        "barostat_time_fs": nasty_float,
        "compressibility_per_gpa": nasty_float,
        "replicas_per_oracle_call": st.sampled_from([-1, 0, 1, INT32[1]]),
    }
    return with_nasty_fields(VALID_MD, nasty)


def restraints() -> st.SearchStrategy[sampler_pb2.DistanceDifferenceRestraint]:
    index = st.sampled_from([0, 1, 2, -1, 1000, *INT32])
    return st.builds(
        sampler_pb2.DistanceDifferenceRestraint,
        atom_a=index,
        atom_b=index,
        atom_c=index,
        center=nasty_float,
        force_constant=nasty_float,
    )


def request_strategies(services: Services) -> dict[str, st.SearchStrategy[Any]]:
    """One strategy per RPC ("Service.Method"); each draws a request (a list of requests for client streams)."""
    refs = artifact_refs(services.refs)
    oracle = st.one_of(st.just(services.addresses["oracle"]), nasty_text)
    valid_shard = st.just(services.refs["pool"])  # valid extxyz but unlabelled: never trains
    bad_shards = st.lists(artifact_refs({"b": services.refs["random_bytes"]}), min_size=1, max_size=2)
    shard_list = st.one_of(bad_shards, st.just([]), st.lists(valid_shard, min_size=1, max_size=1))
    job_ids = st.one_of(nasty_text, st.just("job-000000000000"))
    run_dirs = st.one_of(nasty_text, st.sampled_from(["/dev/null", "/proc/x", "relative/dir", "/tmp/a\x00b"]))
    minimal_config = json.dumps(
        {"name": "fuzz", "system": {"seeds": ["/nonexistent.xyz"]}, "oracle": {"backend": "lj"}}
    )
    ace_fit = st.one_of(
        # Garbage shards with any numbers, or the valid (unlabelled) shard with a bad number: never a real fit.
        st.builds(
            lambda data, cutoff, size, kind, seed: trainer_pb2.AceFitSpec(
                train_data=data, cutoff=cutoff, basis_size=size, model_kind=kind, random_seed=seed
            ),
            st.one_of(bad_shards, st.just([])),
            nasty_float,
            nasty_int32,
            st.one_of(nasty_text, st.just("linear")),
            nasty_int64,
        ),
        st.builds(
            lambda cutoff: trainer_pb2.AceFitSpec(train_data=[services.refs["pool"]], cutoff=cutoff),
            st.sampled_from([math.nan, math.inf, -1.0, 1e308]),
        ),
        st.builds(
            lambda energy: trainer_pb2.AceFitSpec(
                train_data=[services.refs["pool"]], e0s=[trainer_pb2.AtomicEnergy(atomic_number=1, energy=energy)]
            ),
            st.sampled_from([math.nan, math.inf]),
        ),
    )
    mace = st.builds(
        lambda model, data, size, epochs, energy_weight, seed: trainer_pb2.MaceFinetuneSpec(
            foundation_model=model,
            train_data=data,
            committee_size=size,
            max_epochs=epochs,
            energy_weight=energy_weight,
            random_seed=seed,
        ),
        refs,
        shard_list,
        nasty_int32,
        nasty_int32,
        nasty_float,
        nasty_int64,
    )
    delta = st.builds(
        lambda base, data, weight: trainer_pb2.DeltaFitSpec(
            base_potential=base, dft_data=data, surrogate_weight=weight
        ),
        st.one_of(refs, st.just(services.refs["random_yaml"])),
        shard_list,
        nasty_float,
    )
    start_job = st.one_of(
        st.builds(lambda s, k: trainer_pb2.StartJobRequest(ace_fit=s, idempotency_key=k), ace_fit, nasty_text),
        st.builds(lambda s: trainer_pb2.StartJobRequest(mace_finetune=s), mace),
        st.builds(lambda s: trainer_pb2.StartJobRequest(delta_fit=s), delta),
        st.just(trainer_pb2.StartJobRequest()),
    )
    start_run = st.one_of(
        # A valid config only with something else bad (no seeds, bad seeds or a bad run_dir): never a real run.
        st.builds(
            lambda config, seeds, run_dir: orchestrator_pb2.StartRunRequest(
                config_json=config, seeds=seeds, run_dir=run_dir
            ),
            st.one_of(nasty_text, st.sampled_from(BAD_JSON), json_values.map(json.dumps)),
            st.lists(structures(), max_size=2),
            st.one_of(run_dirs, st.just(str(services.root / "runs" / "fuzz"))),
        ),
        st.builds(
            lambda seeds, run_dir: orchestrator_pb2.StartRunRequest(
                config_json=minimal_config, seeds=seeds, run_dir=run_dir
            ),
            st.lists(structures(), max_size=2),
            run_dirs,
        ),
        st.builds(
            lambda seed: orchestrator_pb2.StartRunRequest(
                config_json=minimal_config, seeds=[seed], run_dir=str(services.root / "runs" / "fuzz")
            ),
            structures().filter(lambda s: s.atomic_numbers != [1, 1] and s.atomic_numbers != [8, 1, 1]),
        ),
    )
    return {
        "OracleService.GetInfo": st.builds(oracle_pb2.GetInfoRequest, backend=backend_specs),
        "OracleService.Label": label_streams(),
        "OracleService.Describe": describe_streams(),
        "SamplerService.GeneratePool": st.builds(
            sampler_pb2.GeneratePoolRequest,
            seeds=st.one_of(
                st.lists(structures(valid_only=True), min_size=1, max_size=2), st.lists(structures(), max_size=3)
            ),
            settings=pool_settings(),
        ),
        "SamplerService.SelectDirect": st.builds(
            sampler_pb2.SelectDirectRequest,
            pool=refs,
            n_select=nasty_int32,
            k_per_cluster=nasty_int32,
            featuriser=st.one_of(nasty_text, st.sampled_from(["distribution", "oracle"])),
            coverage_bins=nasty_int32,
            random_seed=nasty_int64,
            oracle_address=oracle,
            descriptor_backend=backend_specs,
        ),
        "SamplerService.RunMd": st.builds(
            sampler_pb2.RunMdRequest,
            starts=st.one_of(
                st.lists(structures(valid_only=True), min_size=1, max_size=2), st.lists(structures(), max_size=2)
            ),
            settings=md_settings(),
            oracle_address=st.one_of(st.just(services.addresses["oracle"]), oracle),
            force_backend=st.one_of(st.just(oracle_pb2.BackendSpec(name="lj")), backend_specs),
            windows=st.one_of(st.just([]), st.lists(restraints(), max_size=2)),
            selection=st.one_of(
                st.just(sampler_pb2.FrameSelection()),
                st.builds(
                    sampler_pb2.FrameSelection,
                    n_frames=nasty_int32,
                    method=st.one_of(nasty_text, st.sampled_from(["stride", "direct"])),
                    random_seed=nasty_int64,
                ),
            ),
        ),
        "TrainerService.StartJob": start_job,
        "TrainerService.GetJob": st.builds(trainer_pb2.GetJobRequest, job_id=job_ids),
        "TrainerService.WatchJob": st.builds(trainer_pb2.WatchJobRequest, job_id=job_ids),
        "TrainerService.CancelJob": st.builds(trainer_pb2.CancelJobRequest, job_id=job_ids),
        "TrainerService.ResumeJob": st.builds(trainer_pb2.ResumeJobRequest, job_id=job_ids, restart=st.booleans()),
        "TrainerService.GetTrainerInfo": st.just(trainer_pb2.GetTrainerInfoRequest()),
        "OrchestratorService.StartRun": start_run,
        "OrchestratorService.WatchRun": st.builds(
            orchestrator_pb2.WatchRunRequest, run_id=nasty_text, after_seq=nasty_int64
        ),
        "OrchestratorService.GetRun": st.builds(orchestrator_pb2.GetRunRequest, run_id=nasty_text),
        "OrchestratorService.ListRuns": st.just(orchestrator_pb2.ListRunsRequest()),
        "OrchestratorService.CancelRun": st.builds(orchestrator_pb2.CancelRunRequest, run_id=nasty_text),
    }


# -- calling ----------------------------------------------------------------------------------------------------

_STUBS: dict[str, Callable[[grpc.Channel], Any]] = {
    "OracleService": oracle_pb2_grpc.OracleServiceStub,
    "SamplerService": sampler_pb2_grpc.SamplerServiceStub,
    "TrainerService": trainer_pb2_grpc.TrainerServiceStub,
    "OrchestratorService": orchestrator_pb2_grpc.OrchestratorServiceStub,
}
_SERVICE_OF = {"OracleService": "oracle", "SamplerService": "sampler", "TrainerService": "trainer",
               "OrchestratorService": "orchestrator"}  # fmt: skip
# Streams that answer until the client leaves: read a few responses, then cancel.
_OPEN_ENDED = {"TrainerService.WatchJob", "OrchestratorService.WatchRun"}


@dataclass
class Outcome:
    rpc: str
    code: grpc.StatusCode
    details: str
    seconds: float
    responses: list[Any]
    structures_sent: int
    crashed: list[str]


def call(services: Services, rpc: str, request: Any) -> Outcome:
    """Send one drawn request; never raises for an RPC error (the Outcome holds it)."""
    service_name, method = rpc.split(".")
    structures_sent = sum(len(r.structures) for r in request) if isinstance(request, list) else 0
    start = time.perf_counter()
    responses: list[Any] = []
    code, details = grpc.StatusCode.OK, ""
    with grpc.insecure_channel(
        services.addresses[_SERVICE_OF[service_name]],
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    ) as ch:
        stub = _STUBS[service_name](ch)
        handler = getattr(stub, method)
        try:
            answer = handler(iter(request) if isinstance(request, list) else request, timeout=CALL_TIMEOUT_S)
            if hasattr(answer, "__next__"):  # a response stream
                for response in answer:
                    responses.append(response)
                    if rpc in _OPEN_ENDED and len(responses) >= 2:
                        answer.cancel()
                        break
            else:
                responses.append(answer)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
    seconds = time.perf_counter() - start
    if code == grpc.StatusCode.CANCELLED and rpc in _OPEN_ENDED:
        code = grpc.StatusCode.OK
    return Outcome(rpc, code, details, seconds, responses, structures_sent, services.crashed())


def violations(outcome: Outcome) -> list[str]:
    """What is wrong with an outcome (empty when nothing is)."""
    problems = []
    if outcome.crashed:
        problems.append(f"service crashed: {', '.join(outcome.crashed)}")
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        problems.append(f"hang: no answer within {CALL_TIMEOUT_S:g} s")
    if outcome.code in FORBIDDEN_CODES:
        problems.append(f"{outcome.code.name}: {outcome.details[:300]}")
    if len(outcome.details) > MAX_DETAILS_CHARS:
        problems.append(f"status message of {len(outcome.details)} characters")
    if outcome.rpc == "OracleService.Label" and outcome.code == grpc.StatusCode.OK:
        indices = sorted(result.index for response in outcome.responses for result in response.results)
        if indices != list(range(outcome.structures_sent)):
            problems.append(f"{outcome.structures_sent} structures sent, results for indices {indices[:20]}")
    return problems


def kind_of(outcome: Outcome) -> str:
    """One word for counting: crash, hang, unknown, internal, or the status code's name."""
    if outcome.crashed:
        return "crash"
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "hang"
    return outcome.code.name.lower()
