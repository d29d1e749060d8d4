"""Step 4: surrogate MD with the fine-tuned MACE committee, run by the sampler with forces from the oracle.

Every seed starts replicas at the configured temperatures (in restraint windows along ξ when md.windows is
set); the sampler streams the frames back, stops replicas that collapse or leave the committee's competence,
and selects md.n_frames of the frames (stride or DIRECT). This step records what the MD visited: the ξ
histogram of every window, why replicas stopped, the smallest interatomic distance, the speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyacemaker.clients.sampler import md_request, run_md
from pyacemaker.config import DEFAULT_MACE_BATCH_SIZE, MdConfig
from pyacemaker.rpc import channel
from pyacemaker.run_layout import SURROGATE_MD_DIR, StepName
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.mace_finetune import committee_models, committee_spec
from pyacemaker.v1 import common_pb2, oracle_pb2, sampler_pb2

EXPORT_DIR = SURROGATE_MD_DIR
# Width of the ξ histogram bins in the record, Å.
XI_BIN_WIDTH = 0.1
# The committee's precision for the forces that drive the MD (not for any label that is fitted or scored).
MD_DTYPE = "float32"


class SurrogateMdStep:
    name = StepName.SURROGATE_MD
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "md": md_config(ctx).model_dump(mode="json"),
            "committee": [ref.sha256 for ref in committee_models(ctx)],
            "seeds": [seed.content_id for seed in ctx.seeds],
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        config = md_config(ctx)
        result, record = run_committee_md(ctx, committee_models(ctx), config)
        summary = record.summary(result, config.frame_selection)
        record_ref = ctx.store.put_bytes(json.dumps(summary, indent=1).encode(), kind="md_record", suffix=".json")
        prefix = f"{ctx.export_prefix}{EXPORT_DIR}"
        outputs = {"frames": result.selected, "md_record": record_ref, "trajectory": result.trajectory}
        metrics = {
            "n_frames_saved": float(result.n_frames),
            "n_frames_selected": float(len(result.selected_indices)),
            "replicas_stopped": float(result.replicas_stopped),
            "min_distance_a": summary["min_distance_a"],
            "steps_per_s": summary["steps_per_s"],
        }
        exports = {f"{prefix}/frames.extxyz": result.selected, f"{prefix}/md_record.json": record_ref}
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def run_committee_md(
    ctx: StepContext, committee: list[common_pb2.ArtifactRef], config: MdConfig
) -> tuple[sampler_pb2.MdResult, MdRecord]:
    """The `md` section's MD (windows, temperatures, replicas, frame selection as `config` says) from the seeds,
    with forces from `committee` through the oracle, run by the sampler: its result and what the frames showed.
    RuntimeError when no frame was saved."""
    # Every replica of a step in one graph batch (the backend's default is 32): 39 SN2 replicas with a committee
    # of 3 took 110 instead of 130 ms per step in-process (one forward and backward pass per model instead of
    # two); in the flagship's service the difference was within run-to-run noise. The MD's forces in float32,
    # as mace advises for MD (the labels that are fitted, step 5's, stay float64): the committee's passes on
    # those 39 replicas took 64 instead of 89 ms per step. Nothing else computes during this MD, so the members
    # run at the same time on every core the oracle has (`threads` 0): 62 instead of 84 ms per step on 2 cores.
    replicas = config.replicas * (config.windows.count if config.windows is not None else 1)
    spec = committee_spec(
        ctx, committee, batch_size=max(replicas, DEFAULT_MACE_BATCH_SIZE), default_dtype=MD_DTYPE, threads=0
    )
    return run_md_with(ctx, spec, config, f"a committee of {len(committee)}")


def run_md_with(
    ctx: StepContext, spec: oracle_pb2.BackendSpec, config: MdConfig, forces_from: str
) -> tuple[sampler_pb2.MdResult, MdRecord]:
    """`run_committee_md` with forces from any oracle backend `spec` (`forces_from` names it in the progress)."""
    request = md_request(ctx.seeds, config, ctx.oracle_address, spec)
    n_trajectories = config.replicas * max(len(request.windows), 1)
    ctx.report(
        common_pb2.Progress(
            stage="md",
            done=0,
            total=config.steps,
            message=f"{n_trajectories} replicas, forces from {forces_from}",
        )
    )
    record = MdRecord([w.center for w in request.windows])
    result: sampler_pb2.MdResult | None = None
    with channel(ctx.sampler_address) as ch:
        for event in run_md(ch, request, timeout=ctx.call_timeout_s):
            if event.HasField("progress"):
                ctx.report(event.progress)
            elif event.HasField("frame"):
                record.add_frame(event.frame)
            elif event.HasField("stopped"):
                record.stops.append(
                    {"replica": event.stopped.replica, "step": event.stopped.step, "reason": event.stopped.reason}
                )
            else:
                result = event.result
    if result is None:
        raise RuntimeError("the sampler closed the MD stream without a result")
    if result.n_frames == 0:
        reasons = "; ".join(f"replica {s['replica']}: {s['reason']}" for s in record.stops[:3]) or "none stopped"
        raise RuntimeError(
            f"the MD saved no frames ({config.steps} steps, md.save_interval {config.save_interval}); {reasons}"
        )
    return result, record


def md_config(ctx: StepContext) -> MdConfig:
    """The run's `md` section with its budget-derived defaults filled in."""
    return ctx.config.md.resolved(ctx.config.budget.max_dft_calls)


@dataclass
class MdRecord:
    """What the streamed frames say about the MD, kept as small numbers (not the frames)."""

    window_centers: list[float]
    xi: dict[int, list[float]] = field(default_factory=dict)
    frames_per_replica: dict[int, int] = field(default_factory=dict)
    replica_info: dict[int, dict[str, float]] = field(default_factory=dict)
    temperatures: dict[float, list[float]] = field(default_factory=dict)
    min_distance: float = float("inf")
    stops: list[dict[str, Any]] = field(default_factory=list)

    def add_frame(self, frame: sampler_pb2.MdFrame) -> None:
        self.frames_per_replica[frame.replica] = self.frames_per_replica.get(frame.replica, 0) + 1
        self.replica_info.setdefault(
            frame.replica, {"window": frame.window, "temperature_k": frame.target_temperature_k}
        )
        self.temperatures.setdefault(frame.target_temperature_k, []).append(frame.temperature_k)
        self.min_distance = min(self.min_distance, frame.min_distance)
        if frame.HasField("collective_variable"):
            self.xi.setdefault(frame.window, []).append(frame.collective_variable)

    def summary(self, result: sampler_pb2.MdResult, selection: str) -> dict[str, Any]:
        stopped = {s["replica"]: s for s in self.stops}
        replicas = [
            {
                "replica": r,
                "window": int(info["window"]),
                "temperature_k": info["temperature_k"],
                "frames": self.frames_per_replica.get(r, 0),
                "stopped_at_step": stopped[r]["step"] if r in stopped else None,
                "stop_reason": stopped[r]["reason"] if r in stopped else None,
            }
            for r, info in sorted(self.replica_info.items())
        ]
        # Replicas that stopped before saving a frame appear only in the stop list.
        replicas += [
            {"replica": r, "frames": 0, "stopped_at_step": s["step"], "stop_reason": s["reason"]}
            for r, s in sorted(stopped.items())
            if r not in self.replica_info
        ]
        return {
            "steps": result.steps,
            "wall_time_s": result.wall_time_s,
            "steps_per_s": result.steps / max(result.wall_time_s, 1e-9),
            "replica_steps_per_s": result.replica_steps_per_s,
            "oracle_calls": result.oracle_calls,
            "oracle_time_s": result.oracle_time_s,
            "n_replicas": result.replicas,
            "replicas_stopped": result.replicas_stopped,
            "n_frames_saved": result.n_frames,
            "n_frames_selected": len(result.selected_indices),
            "frame_selection": selection,
            "selected_trajectory_indices": list(result.selected_indices),
            "min_distance_a": self.min_distance,
            "mean_kinetic_temperature_k": {
                f"{target:g}": float(np.mean(values)) for target, values in sorted(self.temperatures.items())
            },
            "windows": self._windows(),
            "replicas": replicas,
        }

    def _windows(self) -> list[dict[str, Any]]:
        """Per window: ξ₀, the sampled ξ's mean and spread, and their histogram on bins shared by all windows."""
        if not self.window_centers:
            return []
        everything = [x for values in self.xi.values() for x in values] or self.window_centers
        low = np.floor(min(min(everything), min(self.window_centers)) / XI_BIN_WIDTH) * XI_BIN_WIDTH
        high = np.ceil(max(max(everything), max(self.window_centers)) / XI_BIN_WIDTH) * XI_BIN_WIDTH
        edges = np.linspace(low, high, int(np.rint((high - low) / XI_BIN_WIDTH)) + 1)
        windows = []
        for w, center in enumerate(self.window_centers):
            values = np.array(self.xi.get(w, []))
            counts = np.histogram(values, bins=edges)[0] if len(values) else np.zeros(len(edges) - 1, dtype=int)
            windows.append(
                {
                    "window": w,
                    "center_a": center,
                    "n_frames": len(values),
                    "xi_mean_a": float(values.mean()) if len(values) else None,
                    "xi_std_a": float(values.std()) if len(values) else None,
                    "xi_bin_edges_a": [round(float(e), 6) for e in edges],
                    "xi_counts": counts.tolist(),
                }
            )
        return windows
