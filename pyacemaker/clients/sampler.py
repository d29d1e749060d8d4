"""Client of the sampler's RunMd: the request built from the run config's `md` section, and the event stream.

Light on purpose (no sampler science imported), so the orchestrator and benchmarks can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
from ase import Atoms

from pyacemaker.config import MdConfig
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2, oracle_pb2, sampler_pb2, sampler_pb2_grpc


def md_settings(config: MdConfig, replicas_per_oracle_call: int = 0) -> sampler_pb2.MdSettings:
    if config.steps is None or config.n_frames is None:
        raise ValueError("md.steps and md.n_frames must be set; MdConfig.resolved(budget) fills in the defaults")
    settings = sampler_pb2.MdSettings(
        temperatures_k=config.temperatures,
        timestep_fs=config.timestep_fs,
        steps=config.steps,
        save_interval=config.save_interval,
        replicas=config.replicas,
        friction_per_fs=config.friction_per_fs,
        min_distance=config.min_distance,
        max_force_std=config.max_force_std,
        random_seed=config.random_seed,
        barostat_time_fs=config.barostat_time_fs,
        compressibility_per_gpa=config.compressibility_per_gpa,
        replicas_per_oracle_call=replicas_per_oracle_call,
    )
    if config.pressure_gpa is not None:
        settings.pressure_gpa = config.pressure_gpa
    return settings


def md_request(
    starts: Iterable[Atoms | common_pb2.Structure],
    config: MdConfig,
    oracle_address: str,
    force_backend: oracle_pb2.BackendSpec,
    replicas_per_oracle_call: int = 0,
) -> sampler_pb2.RunMdRequest:
    """RunMd for the `md` section: its windows as restraints and its frame selection (n_frames, method)."""
    windows = []
    if config.windows is not None:
        a, b, c = config.windows.atoms
        windows = [
            sampler_pb2.DistanceDifferenceRestraint(
                atom_a=a, atom_b=b, atom_c=c, center=center, force_constant=config.windows.force_constant
            )
            for center in config.windows.centers()
        ]
    return sampler_pb2.RunMdRequest(
        starts=[s if isinstance(s, common_pb2.Structure) else atoms_to_structure(s) for s in starts],
        settings=md_settings(config, replicas_per_oracle_call),
        oracle_address=oracle_address,
        force_backend=force_backend,
        windows=windows,
        selection=sampler_pb2.FrameSelection(
            n_frames=config.n_frames, method=config.frame_selection, random_seed=config.random_seed
        ),
    )


def run_md(
    sampler_channel: grpc.Channel, request: sampler_pb2.RunMdRequest, timeout: float | None = None
) -> Iterator[sampler_pb2.RunMdResponse]:
    """RunMd's events (progress, frame, stopped, and the result last) as the sampler produces them; raises
    grpc.RpcError when the call fails. Stopping the iteration early cancels the MD."""
    call = sampler_pb2_grpc.SamplerServiceStub(sampler_channel).RunMd(request, timeout=timeout)
    try:
        yield from call
    finally:
        call.cancel()
