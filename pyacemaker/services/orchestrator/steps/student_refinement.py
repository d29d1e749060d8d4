"""Step 6b, student-driven refinement: the teacher labels what the student visits.

The surrogate set of step 5 comes from MD driven by the fine-tuned committee. The base ACE fitted on it is
then used for MD of its own, and it goes where the committee's MD did not: measured on the B3LYP SN2
flagship, a final ACE that was fine on the run's own hold-out failed catastrophically (γ up to 2·10⁸) on
structures with the chloride beside the molecule, which no surrogate frame held. So, per round:

1. the current base runs MD through the sampler, its forces from the oracle's ace backend with the active set,
   so every force call also gives the per-atom extrapolation grade γ: plain MD from the seeds and MD in the md
   section's restraint windows, at md.temperatures plus one hotter (temperature_margin × the highest). A
   replica whose γ exceeds stop_gamma, or whose atoms come closer than md.min_distance, stops there;
2. the saved frames with γ above gamma_threshold, and the structures where replicas stopped, are labelled by
   the fine-tuned committee (the mace backend, as in step 5; no DFT) and added to the surrogate set, those
   whose committee forces exceed active_learning.max_candidate_force left out (near-collisions: the core
   repulsion, not data, covers them);
3. the base is refitted on step 6's training shards (step 5's and the committee-labelled DFT structures) plus
   every round's frames (a trainer ace_fit job, as step 6), on the base's basis (its cutoffs, functions and core
   repulsion): so the refit starts from the normal equations step 6 kept and computes only the student frames'
   rows (`pyacemaker.services.trainer.ace_fit.EquationsReuse`).

The rounds end when the student's MD stays below the threshold (no frame above it, no replica stopped) or
after max_rounds refits; with final_check, the last refit's student runs its MD once more, only to record its
γ. Frames of the student's MD where the committee itself is uncertain (its force spread,
scaled by step 2's calibration factor, above active_learning.force_error_threshold) are written as DFT
candidates (`dft_candidates.extxyz`), for the next iteration's step 2.

Resume: every finished round writes a small record (its numbers and the artifacts it made) into
<run_dir>/.work/student_refinement/<key[:16]>/round_NN.json; a restarted step with the same key takes the
rounds whose artifacts still verify and goes on from the next. The MD of a round is deterministic (seeds per
round), the trainer's jobs are idempotent by spec.

Record (`step6b_student_refinement/refinement.json`, output "record"): see `RoundRecord` and `_record`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from google.protobuf import json_format

from pyacemaker.clients.oracle import artifact_option, backend_spec
from pyacemaker.clients.sampler import md_request, run_md
from pyacemaker.config import MdConfig, StudentRefinementConfig
from pyacemaker.rpc import channel
from pyacemaker.run_layout import STUDENT_REFINEMENT_DIR, StepName
from pyacemaker.services.orchestrator.active_learning import largest_atomic_force
from pyacemaker.services.orchestrator.model_labels import model_labels
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.ace_fit import POTENTIAL_FILES, base_fit_spec, base_shards
from pyacemaker.services.orchestrator.steps.mace_finetune import committee_models, committee_spec
from pyacemaker.services.orchestrator.steps.outputs import base_fit_metric, base_potential, dft_set
from pyacemaker.services.orchestrator.steps.surrogate_md import md_config
from pyacemaker.services.orchestrator.trainer_jobs import outputs_by_suffix, run_trainer_job
from pyacemaker.structures import attach_labels, structure_to_atoms, write_extxyz
from pyacemaker.v1 import common_pb2, trainer_pb2

EXPORT_DIR = STUDENT_REFINEMENT_DIR
# Upper edges of the γ histogram bins in the record (the last bin is open).
GAMMA_BIN_EDGES = (1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1000.0)
# info entries of the frames the refinement adds: its cross-validation group (one student trajectory) and source.
SOURCE_KEY = "source"
SOURCE = "student_md"


@dataclass
class RoundRecord:
    """One round: what the student's MD showed, what was added, and the potential it ran with / led to."""

    round: int
    frames_saved: int = 0
    replicas: int = 0
    replicas_stopped: int = 0
    max_gamma: float = 0.0
    gamma_histogram: list[int] = field(default_factory=list)  # counts per bin of GAMMA_BIN_EDGES (+ open bin)
    frames_above_threshold: int = 0
    frames_labelled: int = 0
    frames_added: int = 0
    frames_too_violent: int = 0  # committee forces above active_learning.max_candidate_force
    dft_candidates: int = 0
    md_wall_time_s: float = 0.0
    stop_reasons: list[str] = field(default_factory=list)
    # Refit on everything so far (absent in the round that found nothing to add).
    refit_metrics: dict[str, float] = field(default_factory=dict)
    # Artifacts (as JSON of ArtifactRef) of the round: "frames", "candidates", and the refit's potential files.
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return self.frames_above_threshold == 0 and self.replicas_stopped == 0


class StudentRefinementStep:
    name = StepName.STUDENT_REFINEMENT
    # 2: refits keep the base's basis (and start from its normal equations)
    version = 2

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "base": base_potential(ctx).yaml.sha256,
            "shards": [ref.sha256 for ref in base_shards(ctx)],
            "committee": [ref.sha256 for ref in committee_models(ctx)],
            "iteration_record": dft_set(ctx).iteration.sha256,
            "refinement": ctx.config.student_refinement.model_dump(mode="json"),
            "md": md_config(ctx).model_dump(mode="json"),
            "ace": ctx.config.ace.model_dump(mode="json", exclude={"delta_surrogate_weight"}),
            "seeds": [seed.content_id for seed in ctx.seeds],
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        settings = ctx.config.student_refinement
        base = base_potential(ctx).files()
        if not settings.enabled:
            return StepOutcome(outputs=base, metrics={"rounds": 0.0, "enabled": 0.0}, exports={})
        work_dir = _work_dir(ctx)
        rounds = _reusable_rounds(ctx, work_dir)
        potential = dict(base)
        for record in rounds:
            if record.refit_metrics:
                potential = {
                    name: _ref(record.artifacts[name])
                    for name in ("yaml", "yace", "asi", "metrics")
                    if name in record.artifacts
                }
        while not refinement_done(rounds, settings):
            number = len(rounds) + 1
            record, frames, candidates = explore(ctx, potential, number, label=number <= settings.max_rounds)
            if frames:
                record.artifacts["frames"] = _dump(_put_frames(ctx, frames))
            if candidates:
                record.artifacts["candidates"] = _dump(_put_frames(ctx, candidates))
            if not record.converged and number <= settings.max_rounds and frames:
                # The last refit's active set serves only the check round's MD: without one, nothing reads it.
                explored_later = number < settings.max_rounds or settings.final_check
                shards = [*base_shards(ctx), *_student_shards([*rounds, record])]
                potential = refit(ctx, shards, record, active_set=explored_later)
            elif not record.converged and not frames:
                # Above the threshold but nothing the committee could label sensibly: refitting changes nothing.
                rounds.append(record)
                _save_round(work_dir, record)
                break
            rounds.append(record)
            _save_round(work_dir, record)
            ctx.report(
                common_pb2.Progress(
                    stage="student_refinement",
                    done=number,
                    total=settings.most_rounds,
                    message=f"round {number}: max γ {record.max_gamma:.3g}, {record.frames_added} frames added",
                )
            )
        return _outcome(ctx, rounds, potential, work_dir)


def refinement_done(rounds: list[RoundRecord], settings: StudentRefinementConfig) -> bool:
    """Whether the rounds so far end the refinement: the last found nothing above the threshold, or max_rounds
    refits are done (and, with final_check, the round after them that only records the last student's MD)."""
    return bool(rounds) and (rounds[-1].converged or len(rounds) >= settings.most_rounds)


def refinement_temperatures(md: MdConfig, margin: float) -> list[float]:
    """md.temperatures plus one hotter: `margin` × the highest (the student must hold where it is used and a
    little beyond)."""
    hottest = max(md.temperatures)
    return sorted({*md.temperatures, round(margin * hottest, 1)})


def student_md_configs(ctx: StepContext, number: int) -> list[MdConfig]:
    """The round's MD: plain MD (every seed at every temperature) and, when md.windows is set, MD in every
    restraint window (one replica per temperature, or `window_replicas` at the hottest temperatures)."""
    settings = ctx.config.student_refinement
    md = md_config(ctx)
    temperatures = refinement_temperatures(md, settings.temperature_margin)
    saved_per_replica = settings.steps // settings.save_interval
    common = {
        "temperatures": temperatures,
        "steps": settings.steps,
        "save_interval": settings.save_interval,
        "random_seed": settings.random_seed + 1000 * number + md.random_seed,
        "frame_selection": "stride",
    }
    plain_replicas = len(ctx.seeds) * len(temperatures)
    configs = [
        md.model_copy(
            update={
                **common,
                "windows": None,
                "replicas": plain_replicas,
                "n_frames": max(1, plain_replicas * saved_per_replica),
            }
        )
    ]
    if md.windows is not None:
        # Replica r of a window runs at temperatures[r % T]: hottest first, so fewer replicas run the hottest.
        per_window = settings.window_replicas or len(temperatures)
        configs.append(
            md.model_copy(
                update={
                    **common,
                    "temperatures": sorted(temperatures, reverse=True),
                    "replicas": per_window,
                    "n_frames": max(1, md.windows.count * per_window * saved_per_replica),
                }
            )
        )
    return configs


def student_spec(ctx: StepContext, potential: dict[str, common_pb2.ArtifactRef]) -> Any:
    """The oracle's ace backend for the potential's B-basis .yaml with its active set (labels carry γ), its
    batches shared by one process per core of the oracle: nothing else computes during the student's MD."""
    return backend_spec(
        "ace",
        {
            "potential": artifact_option(potential["yaml"]),
            "active_set": artifact_option(potential["asi"]),
            "processes": 0,
        },
    )


def explore(
    ctx: StepContext, potential: dict[str, common_pb2.ArtifactRef], number: int, label: bool = True
) -> tuple[RoundRecord, list[Atoms], list[Atoms]]:
    """One round's student MD, the frames it adds (committee-labelled; none without `label`) and the DFT
    candidates among them."""
    settings = ctx.config.student_refinement
    record = RoundRecord(round=number)
    picked: list[tuple[float, str, Atoms]] = []  # (γ, trajectory, structure) worth labelling
    gammas: list[float] = []
    spec = student_spec(ctx, potential)
    for kind, config in zip(("plain", "windows"), student_md_configs(ctx, number), strict=False):
        request = md_request(ctx.seeds, config, ctx.oracle_address, spec)
        request.settings.max_extrapolation_grade = settings.stop_gamma
        with channel(ctx.sampler_address) as ch:
            for event in run_md(ch, request, timeout=ctx.call_timeout_s):
                if event.HasField("progress"):
                    ctx.report(event.progress)
                elif event.HasField("frame"):
                    grade = event.frame.labels.uncertainty.max_extrapolation_grade
                    gammas.append(grade)
                    if grade > settings.gamma_threshold:
                        trajectory = f"{kind}:{event.frame.window}:{event.frame.replica}"
                        picked.append((grade, trajectory, structure_to_atoms(event.frame.structure)))
                elif event.HasField("stopped"):
                    record.replicas_stopped += 1
                    record.stop_reasons.append(f"{kind} replica {event.stopped.replica}: {event.stopped.reason}")
                    if event.stopped.HasField("structure"):
                        trajectory = f"{kind}:stop:{event.stopped.replica}"
                        picked.append((np.inf, trajectory, structure_to_atoms(event.stopped.structure)))
                else:
                    record.replicas += event.result.replicas
                    record.md_wall_time_s += event.result.wall_time_s
    record.frames_saved = len(gammas)
    record.max_gamma = float(max(gammas, default=0.0))
    edges = [0.0, *GAMMA_BIN_EDGES, np.inf]
    record.gamma_histogram = [int(n) for n in np.histogram(gammas, bins=edges)[0]] if gammas else []
    record.frames_above_threshold = sum(1 for g in gammas if g > settings.gamma_threshold)
    chosen = spread_over_trajectories(picked, settings.max_frames_per_round)
    if not chosen or not label:
        return record, [], []
    frames, candidates = label_with_committee(ctx, chosen, record)
    for atoms in frames:
        atoms.info["fit_group"] = f"student:{number}:{atoms.info.pop('_trajectory')}"
        atoms.info[SOURCE_KEY] = SOURCE
    for atoms in candidates:
        atoms.info.pop("_trajectory", None)
        atoms.info[SOURCE_KEY] = SOURCE
    return record, frames, candidates


def spread_over_trajectories(picked: list[tuple[float, str, Atoms]], limit: int) -> list[tuple[str, Atoms]]:
    """At most `limit` of the picked structures, taken in turns from every trajectory, highest γ first within
    each (the stop structures first of all): one runaway replica does not fill the round alone."""
    by_trajectory: dict[str, list[tuple[float, Atoms]]] = {}
    for grade, trajectory, atoms in picked:
        by_trajectory.setdefault(trajectory, []).append((grade, atoms))
    queues = [sorted(items, key=lambda item: -item[0]) for _, items in sorted(by_trajectory.items())]
    chosen: list[tuple[str, Atoms]] = []
    names = sorted(by_trajectory)
    depth = 0
    while len(chosen) < limit and any(depth < len(q) for q in queues):
        for name, queue in zip(names, queues, strict=True):
            if depth < len(queue) and len(chosen) < limit:
                chosen.append((name, queue[depth][1]))
        depth += 1
    return chosen


def label_with_committee(
    ctx: StepContext, chosen: list[tuple[str, Atoms]], record: RoundRecord
) -> tuple[list[Atoms], list[Atoms]]:
    """The committee's labels on the chosen structures: (frames to add, DFT candidates among them)."""
    structures = [atoms for _, atoms in chosen]
    labels = model_labels(ctx, committee_spec(ctx, committee_models(ctx)), structures, "student frames")
    record.frames_labelled = len(structures)
    calibration, threshold = _calibration(ctx)
    cap = ctx.config.active_learning.max_candidate_force
    frames: list[Atoms] = []
    candidates: list[Atoms] = []
    for (trajectory, atoms), label in zip(chosen, labels, strict=True):
        labelled = attach_labels(atoms.copy(), label)
        labelled.info.pop("wall_time_s", None)
        labelled.info["_trajectory"] = trajectory
        if largest_atomic_force([labelled.get_forces()])[0] > cap:
            record.frames_too_violent += 1
            continue
        frames.append(labelled)
        if calibration * label.uncertainty.max_force_std > threshold:
            candidates.append(labelled.copy())
    record.frames_added = len(frames)
    record.dft_candidates = len(candidates)
    return frames, candidates


def refit(
    ctx: StepContext, shards: list[common_pb2.ArtifactRef], record: RoundRecord, active_set: bool = True
) -> dict[str, common_pb2.ArtifactRef]:
    """The base fit again on the base's basis, on step 5's shards plus the student frames so far, starting from
    the base fit's normal equations where step 6 kept them, with the base fit's ridge strength unless
    student_refinement.refit_ridge asks for cross-validation; the new potential's files."""
    spec = base_fit_spec(ctx, shards)
    base = base_potential(ctx)
    spec.basis.CopyFrom(base.yaml)
    if base.normal_equations is not None:
        spec.normal_equations.CopyFrom(base.normal_equations)
    if ctx.config.student_refinement.refit_ridge == "base" and (lam := base_fit_metric(ctx, "ridge_lambda_relative")):
        spec.ridge_lambda = lam
    spec.no_active_set = not active_set
    job = run_trainer_job(
        ctx, trainer_pb2.StartJobRequest(ace_fit=spec), f"refit {record.round} with the student's frames"
    )
    by_suffix = outputs_by_suffix(job)
    wanted = (".yaml", ".yace", ".json", *((".asi",) if active_set else ()))
    missing = [suffix for suffix in wanted if suffix not in by_suffix]
    if missing:
        raise RuntimeError(f"trainer job {job.job_id} returned no {', '.join(missing)} file")
    potential = {POTENTIAL_FILES[suffix]: by_suffix[suffix] for suffix in wanted}
    record.refit_metrics = {k: float(v) for k, v in job.metrics.items()}
    record.artifacts.update({name: _dump(ref) for name, ref in potential.items()})
    return potential


def _calibration(ctx: StepContext) -> tuple[float, float]:
    """Step 2's calibration factor of the committee spread and its force-error threshold (eV/Å)."""
    iteration = json.loads(ctx.store.path(dft_set(ctx).iteration).read_text())
    return (
        float(iteration.get("calibration_factor", 1.0)),
        float(iteration.get("force_error_threshold_ev_per_a", ctx.config.active_learning.force_error_threshold)),
    )


def _student_shards(rounds: list[RoundRecord]) -> list[common_pb2.ArtifactRef]:
    return [_ref(r.artifacts["frames"]) for r in rounds if "frames" in r.artifacts]


def _put_frames(ctx: StepContext, frames: list[Atoms]) -> common_pb2.ArtifactRef:
    path = ctx.store.new_tempfile(".extxyz")
    write_extxyz(path, frames)
    return ctx.store.put_file(path, kind="structures", move=True)


def _dump(ref: common_pb2.ArtifactRef) -> dict[str, Any]:
    return json_format.MessageToDict(ref, preserving_proto_field_name=True)


def _ref(data: dict[str, Any]) -> common_pb2.ArtifactRef:
    return json_format.ParseDict(data, common_pb2.ArtifactRef())


def _work_dir(ctx: StepContext) -> Path:
    """This key's round records; those of other keys (other inputs or settings) are removed."""
    if not ctx.key:
        raise RuntimeError("the step key is not set (the runner sets ctx.key before running a step)")
    parent = ctx.run_dir / ".work" / StudentRefinementStep.name
    work_dir = parent / ctx.key[:16]
    if parent.is_dir():
        for stale in parent.iterdir():
            if stale != work_dir and stale.is_dir():
                shutil.rmtree(stale)
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def _save_round(work_dir: Path, record: RoundRecord) -> None:
    path = work_dir / f"round_{record.round:02d}.json"
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(asdict(record), indent=1))
    staging.replace(path)


def _reusable_rounds(ctx: StepContext, work_dir: Path) -> list[RoundRecord]:
    """The rounds an earlier attempt with the same key finished, up to the first whose artifacts do not verify."""
    rounds: list[RoundRecord] = []
    for number in range(1, ctx.config.student_refinement.max_rounds + 2):
        path = work_dir / f"round_{number:02d}.json"
        if not path.is_file():
            break
        try:
            record = RoundRecord(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            break
        if record.round != number or not all(ctx.store.verify(_ref(a)) for a in record.artifacts.values()):
            break
        rounds.append(record)
        ctx.report(common_pb2.Progress(stage="student_refinement", message=f"round {number} from an earlier attempt"))
    for stale in work_dir.glob("round_*.json"):
        if int(stale.stem.split("_")[1]) > len(rounds):
            stale.unlink()
    return rounds


def _outcome(
    ctx: StepContext, rounds: list[RoundRecord], potential: dict[str, common_pb2.ArtifactRef], work_dir: Path
) -> StepOutcome:
    settings = ctx.config.student_refinement
    record = _record(ctx, rounds)
    record_ref = ctx.store.put_bytes(json.dumps(record, indent=1).encode(), kind="refinement_record", suffix=".json")
    prefix = f"{ctx.export_prefix}{EXPORT_DIR}"
    outputs = {**potential, "record": record_ref}
    exports = {f"{prefix}/refinement.json": record_ref}
    if potential["yace"].sha256 != base_potential(ctx).yace.sha256:
        exports.update(
            {
                f"{prefix}/refined{suffix}": potential[name]
                for suffix, name in POTENTIAL_FILES.items()
                if name != "metrics" and name in potential
            }
        )
    student = [atoms for ref in _student_shards(rounds) for atoms in _read(ctx, ref)]
    if student:
        outputs["student_frames"] = _put_frames(ctx, student)
        exports[f"{prefix}/student_frames.extxyz"] = outputs["student_frames"]
    candidates = [
        atoms for r in rounds if "candidates" in r.artifacts for atoms in _read(ctx, _ref(r.artifacts["candidates"]))
    ]
    if candidates:
        outputs["dft_candidates"] = _put_frames(ctx, candidates)
        exports[f"{prefix}/dft_candidates.extxyz"] = outputs["dft_candidates"]
    shutil.rmtree(work_dir)
    with contextlib.suppress(OSError):
        work_dir.parent.rmdir()
    last = rounds[-1]
    metrics = {
        "rounds": float(len(rounds)),
        "refits": float(sum(1 for r in rounds if r.refit_metrics)),
        "converged": float(last.converged),
        "first_max_gamma": rounds[0].max_gamma,
        "last_max_gamma": last.max_gamma,
        "frames_added": float(sum(r.frames_added for r in rounds)),
        "dft_candidates": float(len(candidates)),
        "gamma_threshold": settings.gamma_threshold,
    }
    return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def _read(ctx: StepContext, ref: common_pb2.ArtifactRef) -> list[Atoms]:
    from pyacemaker.structures import read_structures

    return read_structures(ctx.store.path(ref))


def _record(ctx: StepContext, rounds: list[RoundRecord]) -> dict[str, Any]:
    """What the report shows: per round the student's γ (max, histogram), the frames added, the refit."""
    settings = ctx.config.student_refinement
    return {
        "gamma_threshold": settings.gamma_threshold,
        "stop_gamma": settings.stop_gamma,
        "max_rounds": settings.max_rounds,
        "temperatures_k": refinement_temperatures(md_config(ctx), settings.temperature_margin),
        "gamma_bin_edges": [0.0, *GAMMA_BIN_EDGES, None],
        "converged": rounds[-1].converged,
        "rounds": [{k: v for k, v in asdict(r).items() if k != "artifacts"} for r in rounds],
    }
