"""Runs: validation, the step sequence with skip-if-verified, events, cancellation.

A run is identified by its run directory. Each run executes in its own thread inside the orchestrator, so it
outlives the client that started it; clients follow it through the event log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from pyacemaker.artifacts import ArtifactStore, sha256_of_file
from pyacemaker.config import ConfigError, RunConfig, config_from_json, config_to_json
from pyacemaker.config_defaults import derive_defaults
from pyacemaker.rpc import InvalidInputError, WrongStateError, channel
from pyacemaker.run_layout import FINAL_POTENTIAL, STATE_FILE, SUMMARY_FILE, StepName, in_iteration, iteration_dir
from pyacemaker.run_records import RunSummary, record_text
from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.services.orchestrator.state import RunState, StepRow
from pyacemaker.services.orchestrator.steps import RunCancelledError, Step, StepContext, StepOutcome, step_key
from pyacemaker.services.orchestrator.steps.ace_fit import AceFitStep
from pyacemaker.services.orchestrator.steps.active_learning_step import ActiveLearningStep
from pyacemaker.services.orchestrator.steps.delta_fit import DeltaFitStep
from pyacemaker.services.orchestrator.steps.direct_sampling import DirectSamplingStep
from pyacemaker.services.orchestrator.steps.mace_finetune import MaceFinetuneStep
from pyacemaker.services.orchestrator.steps.student_refinement import StudentRefinementStep
from pyacemaker.services.orchestrator.steps.surrogate_labelling import SurrogateLabellingStep
from pyacemaker.services.orchestrator.steps.surrogate_md import SurrogateMdStep
from pyacemaker.services.orchestrator.steps.teacher_bootstrap import TeacherBootstrapStep
from pyacemaker.services.orchestrator.steps.validation import (
    ValidationStep,
    best_iteration,
    distillation_gain,
    handed_out_figures,
)
from pyacemaker.structure_checks import check_structure
from pyacemaker.structures import structure_to_atoms
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc, orchestrator_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)

# Step 1 runs once (after step 0, the teacher's training, when teacher.bootstrap is set); steps 2-7 and the
# validation repeat per active-learning iteration until the target is met, the budget is spent or
# validation.max_iterations is reached. `stop_after` in the config ends a run early.
FIRST_STEP: Step = DirectSamplingStep()
ITERATION_STEPS: tuple[Step, ...] = (
    ActiveLearningStep(),
    MaceFinetuneStep(),
    SurrogateMdStep(),
    SurrogateLabellingStep(),
    AceFitStep(),
    StudentRefinementStep(),
    DeltaFitStep(),
    ValidationStep(),
)
# A step that fails because a service is unreachable (restarting, say) is retried after these waits, s.
RETRY_WAITS_S = (2.0, 5.0, 10.0, 20.0, 40.0)

_E = orchestrator_pb2
# Codes that mean "the service is (momentarily) not there", not "the request is wrong".
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_FINAL_STATES = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}


def run_id_for(run_dir: Path) -> str:
    return hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]


@dataclass
class RunHandle:
    run_id: str
    config: RunConfig
    run_dir: Path
    state: RunState
    job_state: int = common_pb2.JOB_STATE_QUEUED
    error: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    # Notified on every new event, so watchers wake up without polling the database.
    changed: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None
    first_seq: int = 0
    # State-row name of the step running (or last run), for the run's failure event.
    current_step: str = ""
    # The config this run dir was last started with, when it differs from `config` (to say why steps are redone).
    previous_config: RunConfig | None = None

    @property
    def finished(self) -> bool:
        return self.job_state in _FINAL_STATES

    def to_proto(self) -> orchestrator_pb2.Run:
        return orchestrator_pb2.Run(
            run_id=self.run_id,
            name=self.config.name,
            run_dir=str(self.run_dir),
            state=common_pb2.JobState.Name(self.job_state),
            steps=[row.to_proto() for row in self.state.steps()],
            error=self.error,
            first_seq=self.first_seq,
        )


class RunManager:
    def __init__(
        self,
        store: ArtifactStore,
        sampler_address: str,
        oracle_address: str,
        trainer_address: str = "",
        labelling_oracle_addresses: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.sampler_address = sampler_address
        self.oracle_address = oracle_address
        self.trainer_address = trainer_address
        self.labelling_oracle_addresses = labelling_oracle_addresses
        self._runs: dict[str, RunHandle] = {}
        self._lock = threading.Lock()

    # -- client-facing -------------------------------------------------------------------------------------
    def start(self, config_json: str, seeds: list[common_pb2.Structure], run_dir: str) -> RunHandle:
        try:
            config = config_from_json(config_json)
        except ConfigError as exc:
            raise InvalidInputError(str(exc)) from None
        except (ValueError, TypeError, RecursionError) as exc:  # not JSON, or JSON that is not a config object
            raise InvalidInputError(f"config_json is not a JSON run config ({type(exc).__name__}: {exc})") from None
        if not seeds:
            raise InvalidInputError("no seed structures in the request (system.seeds)")
        seed_atoms = []
        for index, seed in enumerate(seeds):
            try:
                seed_atoms.append(structure_to_atoms(seed))
                check_structure(seed_atoms[-1])
            except ValueError as exc:
                raise InvalidInputError(f"seeds[{index}]: {exc}") from None
        if not run_dir or "\0" in run_dir or not Path(run_dir).is_absolute():
            raise InvalidInputError(f"run_dir must be an absolute path, got {run_dir[:200]!r}")
        path = Path(run_dir)
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"run_dir {run_dir[:200]!r} exists and is not a directory")
        run_id = run_id_for(path)
        with self._lock:
            existing = self._runs.get(run_id)
            if existing is not None and not existing.finished:
                raise WrongStateError(f"run {run_id} in {path} is already in progress")
            if existing is not None:
                existing.state.close()
            try:
                state = RunState(path)
            except (OSError, sqlite3.Error) as exc:
                raise InvalidInputError(f"run_dir {run_dir[:200]!r} cannot hold the run's state: {exc}") from None
            handle = RunHandle(run_id=run_id, config=config, run_dir=path, state=state)
            self._runs[run_id] = handle
        saved = _saved_config(handle.state.config_json())
        # What the config leaves out, from the seeds and the budget (`pyacemaker run` sends it derived already),
        # saved with the rest, so a resume and a repeated start use the same values.
        config, derived = derive_defaults(config, seed_atoms, saved)
        handle.config = config
        handle.previous_config = None if saved == config else saved
        handle.state.save_config(config.name, config_to_json(config))
        started = handle.state.add_event(_E.RUN_EVENT_KIND_RUN_STARTED, message=f"run {config.name} in {path}")
        handle.first_seq = started.seq - 1
        if derived:
            self._event(
                handle,
                _E.RUN_EVENT_KIND_LOG,
                message="derived from the seeds and the budget: " + "; ".join(item.line() for item in derived),
            )
        if handle.previous_config is not None:
            changes = changed_keys(handle.previous_config.model_dump(mode="json"), config.model_dump(mode="json"))
            self._event(
                handle,
                _E.RUN_EVENT_KIND_LOG,
                message=f"the config differs from the one this run dir last ran with: {'; '.join(changes)}. "
                "Completed steps whose inputs these change are redone; each says so when it starts",
            )
        handle.thread = threading.Thread(
            target=self._execute, args=(handle, list(seeds)), name=f"run-{run_id}", daemon=True
        )
        handle.thread.start()
        return handle

    def get(self, run_id: str) -> RunHandle:
        with self._lock:
            handle = self._runs.get(run_id)
        if handle is None:
            raise KeyError(run_id)
        return handle

    def all_runs(self) -> list[RunHandle]:
        with self._lock:
            return list(self._runs.values())

    def cancel(self, run_id: str) -> RunHandle:
        handle = self.get(run_id)
        handle.cancel.set()
        return handle

    def shutdown(self, timeout: float = 10.0) -> None:
        for handle in self.all_runs():
            handle.cancel.set()
        for handle in self.all_runs():
            if handle.thread is not None:
                handle.thread.join(timeout)

    # -- the run itself --------------------------------------------------------------------------------------
    def _event(
        self,
        handle: RunHandle,
        kind: int,
        step: str = "",
        message: str = "",
        progress: common_pb2.Progress | None = None,
        final_state: int | None = None,
    ) -> None:
        # Under the condition's lock, so a watcher that sees the run finished has all its events in the log.
        with handle.changed:
            if final_state is not None:
                handle.job_state = final_state
            handle.state.add_event(kind, step=step, message=message, progress=progress)
            handle.changed.notify_all()

    def _execute(self, handle: RunHandle, seeds: list[common_pb2.Structure]) -> None:
        handle.job_state = common_pb2.JOB_STATE_RUNNING
        started = time.monotonic()
        try:
            self._check_oracle(handle.config)
            self._check_trainer(handle.config)
            previous: dict[str, dict[str, common_pb2.ArtifactRef]] = {}
            for step in self._once_steps(handle.config):
                previous[step.name] = self._run_step(handle, step, seeds, previous, 0)
                if handle.config.stop_after == step.name:
                    iterations, stop_reason = 0, f"stop_after: {step.name}"
                    break
            else:
                iterations, stop_reason = self._iterate(handle, seeds, previous)
            summary = self._write_summary(handle, previous, iterations, stop_reason, time.monotonic() - started)
            self._event(
                handle,
                _E.RUN_EVENT_KIND_RUN_COMPLETED,
                message=f"{stop_reason}; {summary.dft_calls} DFT calls; in {time.monotonic() - started:.1f} s",
                final_state=common_pb2.JOB_STATE_SUCCEEDED,
            )
        except RunCancelledError:
            handle.error = "cancelled"
            self._event(
                handle,
                _E.RUN_EVENT_KIND_RUN_FAILED,
                step=handle.current_step,
                message="run cancelled",
                final_state=common_pb2.JOB_STATE_CANCELLED,
            )
        except Exception as exc:
            handle.error = _describe(exc)
            log.error(
                "run %s failed in step %s: %s\n%s",
                handle.run_id,
                handle.current_step,
                handle.error,
                traceback.format_exc(),
            )
            self._event(
                handle,
                _E.RUN_EVENT_KIND_RUN_FAILED,
                step=handle.current_step,
                message=handle.error,
                final_state=common_pb2.JOB_STATE_FAILED,
            )

    @staticmethod
    def _once_steps(config: RunConfig) -> list[Step]:
        """The steps that run once per run, before the loop: the teacher's training when the run bootstraps it,
        then step 1."""
        return [TeacherBootstrapStep(), FIRST_STEP] if config.teacher.bootstrap is not None else [FIRST_STEP]

    def _iterate(
        self,
        handle: RunHandle,
        seeds: list[common_pb2.Structure],
        previous: dict[str, dict[str, common_pb2.ArtifactRef]],
    ) -> tuple[int, str]:
        """Steps 2-7 and validation per iteration; returns the iterations done and why the loop stopped."""
        config = handle.config
        for iteration in range(1, config.validation.max_iterations + 1):
            for step in ITERATION_STEPS:
                outputs = self._run_step(handle, step, seeds, previous, iteration)
                previous[step.name] = previous[f"{step.name}.{iteration}"] = outputs
                if step.name == config.stop_after:
                    return iteration, f"stop_after: {step.name}"
            metrics = handle.state.step(f"{ValidationStep.name}.{iteration}")
            if metrics is not None and metrics.metrics.get("target_met"):
                return iteration, "target met"
            if handle.state.step(f"{ActiveLearningStep.name}.{iteration + 1}") is not None:
                # An earlier attempt of this run already went on (the ledger now holds that iteration's DFT calls,
                # so judging the budget again would stop a resumed run short of where it was).
                continue
            if self._dft_calls(handle) >= config.budget.max_dft_calls:
                return iteration, "budget spent"
            selected = handle.state.step(f"{ActiveLearningStep.name}.{iteration}")
            if selected is not None and iteration > 1 and selected.metrics.get("n_dft_selected", 1) == 0:
                return iteration, "no candidate above the uncertainty threshold"
        return config.validation.max_iterations, "max iterations"

    def _best_iteration(self, handle: RunHandle, iterations: int) -> int:
        """The validated iteration whose final ACE survives the most stability MD runs and, among those, has the
        lowest hold-out force RMSE (0 when none validated): an iteration that loses an MD run is never best while
        another survives more."""
        metrics = {}
        for iteration in range(1, iterations + 1):
            row = handle.state.step(f"{ValidationStep.name}.{iteration}")
            if row is not None and row.state == _E.STEP_STATE_COMPLETED:
                metrics[iteration] = row.metrics
        return best_iteration(metrics)

    def _dft_calls(self, handle: RunHandle) -> int:
        ledger = DftLedger(handle.run_dir / STATE_FILE)
        try:
            return ledger.count()
        finally:
            ledger.close()

    def _write_summary(
        self,
        handle: RunHandle,
        previous: dict[str, dict[str, common_pb2.ArtifactRef]],
        iterations: int,
        stop_reason: str,
        wall_time_s: float,
    ) -> RunSummary:
        """run_summary.json (why the run stopped, where the potential is), then the HTML report.

        The final potential is the best validated one, not necessarily the last: every iteration is scored on the
        same DFT hold-out, and a later iteration can come out worse (small sets, a new MD region)."""
        final, best = "", self._best_iteration(handle, iterations)
        if best:
            final = in_iteration(best, FINAL_POTENTIAL)
        elif iterations and StepName.DELTA_FIT in previous:
            final = in_iteration(iterations, FINAL_POTENTIAL)
        # DFT labels charged but not trained on (DFT forces above active_learning.max_candidate_force), all
        # iterations: the pool's teacher-force filter and step 2's committee caps exist to keep this at 0.
        not_trained_on = sum(
            row.metrics.get("n_dft_not_trained_on", 0.0)
            for iteration in range(1, iterations + 1)
            if (row := handle.state.step(f"{ActiveLearningStep.name}.{iteration}")) is not None
        )
        summary = RunSummary(
            stop_reason=stop_reason,
            iterations=iterations,
            best_iteration=best or iterations,
            final_potential=final,
            dft_calls=self._dft_calls(handle),
            dft_budget=handle.config.budget.max_dft_calls,
            wall_time_s=wall_time_s,
            dft_calls_not_trained_on=int(not_trained_on),
        )
        row = handle.state.step(f"{ValidationStep.name}.{best}") if best else None
        if row is not None:
            # The figures of the potential handed out (the best iteration's), and what its distillation gains
            # over the ablation (the same ACE fitted on the DFT labels alone).
            summary.final_potential_figures = handed_out_figures(row.metrics)
            summary.distillation_gain = distillation_gain(row.metrics)
        (handle.run_dir / SUMMARY_FILE).write_text(record_text(summary))
        try:
            from pyacemaker.services.orchestrator.report import write_report

            report = write_report(handle.run_dir)
            self._event(handle, _E.RUN_EVENT_KIND_LOG, message=f"report: {report}")
        except Exception as exc:  # the run's results stand even when its report cannot be drawn
            log.warning("report for %s failed", handle.run_dir, exc_info=True)
            self._event(handle, _E.RUN_EVENT_KIND_LOG, message=f"the report could not be written: {_describe(exc)}")
        return summary

    def _check_oracle(self, config: RunConfig) -> None:
        """Fail early when the configured oracle backend is not served, instead of at the first DFT call."""
        wanted = config.oracle.backend
        with channel(self.oracle_address) as ch:
            info = oracle_pb2_grpc.OracleServiceStub(ch).GetInfo(oracle_pb2.GetInfoRequest(), timeout=30)
        offered = {b.name: b for b in info.backends}
        if wanted not in offered:
            raise RuntimeError(
                f"the oracle at {self.oracle_address} does not serve backend {wanted!r} (oracle.backend)"
            )
        if not offered[wanted].available:
            raise RuntimeError(
                f"oracle backend {wanted!r} is not available at {self.oracle_address}: "
                f"{offered[wanted].unavailable_reason}"
            )

    def _check_trainer(self, config: RunConfig) -> None:
        """Fail early when trainer.executor names a profile the trainer's deployment lacks, instead of at the first
        training job, after the DFT of step 2."""
        wanted = config.trainer.executor
        if not wanted:
            return
        with channel(self.trainer_address) as ch:
            info = trainer_pb2_grpc.TrainerServiceStub(ch).GetTrainerInfo(
                trainer_pb2.GetTrainerInfoRequest(), timeout=30
            )
        if wanted not in info.executor_profiles:
            raise RuntimeError(
                f"trainer.executor: the trainer at {self.trainer_address} has no executor profile {wanted!r} (it has: "
                f"{', '.join(info.executor_profiles)}); profiles are set in the trainer's deployment file "
                "(executors.<name>, see docs/deployment.md)"
            )

    def _run_step(
        self,
        handle: RunHandle,
        step: Step,
        seeds: list[common_pb2.Structure],
        previous: dict[str, dict[str, common_pb2.ArtifactRef]],
        iteration: int,
    ) -> dict[str, common_pb2.ArtifactRef]:
        """Run one step (iteration 0: a step that runs once per run), or skip it when its key matches a completed
        record whose outputs verify. State rows are named "<step>" for those and "<step>.<iteration>"."""
        name = f"{step.name}.{iteration}" if iteration else step.name
        handle.current_step = name

        def report(progress: common_pb2.Progress) -> None:
            if handle.cancel.is_set():
                raise RunCancelledError()
            self._event(handle, _E.RUN_EVENT_KIND_STEP_PROGRESS, step=name, progress=progress)

        ctx = StepContext(
            config=handle.config,
            store=self.store,
            run_dir=handle.run_dir,
            seeds=seeds,
            sampler_address=self.sampler_address,
            oracle_address=self.oracle_address,
            trainer_address=self.trainer_address,
            labelling_oracle_addresses=self.labelling_oracle_addresses,
            report=report,
            previous=dict(previous),
            iteration=max(iteration, 1),
            export_prefix=f"{iteration_dir(iteration)}/" if iteration else "",
        )
        key = step_key(step, ctx)
        ctx.key = key
        done = handle.state.step(name)
        if done is not None and done.key == key and done.state == _E.STEP_STATE_COMPLETED:
            problem = self._verify(handle.run_dir, done)
            if problem is None:
                self._event(handle, _E.RUN_EVENT_KIND_STEP_SKIPPED, step=name, message="outputs verified")
                return done.outputs
            self._event(handle, _E.RUN_EVENT_KIND_LOG, step=name, message=f"redoing: {problem}")
        elif done is not None and done.state == _E.STEP_STATE_COMPLETED:
            reason = _why_key_changed(step, ctx, done.key, handle.previous_config)
            self._event(handle, _E.RUN_EVENT_KIND_LOG, step=name, message=f"redoing (it had completed): {reason}")
        handle.state.mark_step(name, key, _E.STEP_STATE_RUNNING)
        self._event(handle, _E.RUN_EVENT_KIND_STEP_STARTED, step=name)
        try:
            outcome = self._run_with_retries(handle, step, ctx, name)
            exported = {rel: self._export(handle.run_dir, rel, ref) for rel, ref in outcome.exports.items()}
        except BaseException as exc:
            handle.state.mark_step(name, key, _E.STEP_STATE_FAILED, error=_describe(exc))
            self._event(handle, _E.RUN_EVENT_KIND_STEP_FAILED, step=name, message=_describe(exc))
            raise
        row = StepRow(name, key, _E.STEP_STATE_COMPLETED, outcome.outputs, outcome.metrics, exported)
        handle.state.complete_step(row)
        summary = ", ".join(f"{k}={v:g}" for k, v in sorted(outcome.metrics.items()))
        self._event(handle, _E.RUN_EVENT_KIND_STEP_COMPLETED, step=name, message=summary)
        return outcome.outputs

    def _run_with_retries(self, handle: RunHandle, step: Step, ctx: StepContext, name: str) -> StepOutcome:
        """Steps are idempotent (DFT through the ledger, training jobs by key), so a step that lost its service
        mid-way (UNAVAILABLE: a restart, a crash) is simply run again once the service answers."""
        for wait in (*RETRY_WAITS_S, None):
            try:
                return step.run(ctx)
            except Exception as exc:
                if wait is None or _status_code(exc) not in _RETRYABLE:
                    raise
                message = f"{_describe(exc)}; retrying in {wait:g} s"
                self._event(handle, _E.RUN_EVENT_KIND_LOG, step=name, message=message)
                if handle.cancel.wait(wait):
                    raise RunCancelledError() from None
        raise AssertionError("unreachable")

    def _export(self, run_dir: Path, relative: str, ref: common_pb2.ArtifactRef) -> str:
        """Copy an artifact into the run directory (a copy, so editing it cannot corrupt the store)."""
        target = run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + ".partial")
        shutil.copyfile(self.store.path(ref), staging)
        staging.replace(target)
        return ref.sha256

    def _verify(self, run_dir: Path, row: StepRow) -> str | None:
        """None when every output is intact, else what is wrong."""
        for name, ref in row.outputs.items():
            if not self.store.verify(ref):
                return f"output {name!r} ({ref.uri}) is missing or altered in the artifact store"
        for relative, sha256 in row.exported.items():
            path = run_dir / relative
            if not path.is_file():
                return f"{path} was deleted"
            if sha256_of_file(path) != sha256:
                return f"{path} was altered"
        return None


def _saved_config(saved_json: str | None) -> RunConfig | None:
    """The config saved in the run dir, when there is one and it still parses."""
    if saved_json is None:
        return None
    try:
        return config_from_json(saved_json)
    except ConfigError:  # saved by an older version whose keys this one no longer has
        return None


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ, each with its old and new value when they are short:
    ["budget.max_dft_calls (60 → 70)", "md.windows (added)"]."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                paths.append(f"{path} (added)")
            elif key not in new:
                paths.append(f"{path} (removed)")
            else:
                paths.extend(changed_keys(old[key], new[key], path))
        return paths
    if old == new:
        return []
    if old is None or new is None:
        return [f"{prefix or 'value'} ({'added' if old is None else 'removed'})"]
    shown = (json.dumps(old, ensure_ascii=False), json.dumps(new, ensure_ascii=False))
    if max(len(text) for text in shown) > 40:
        return [prefix or "value"]
    return [f"{prefix or 'value'} ({shown[0]} → {shown[1]})"]


def _why_key_changed(step: Step, ctx: StepContext, done_key: str, previous_config: RunConfig | None) -> str:
    """Why a completed step's key no longer matches: the config keys among its inputs that changed (found by
    computing its key material under the previous config), else earlier steps' outputs or the code version."""
    others = "the outputs of earlier steps it uses (they were redone) or the pipeline's code version changed"
    if previous_config is None:
        return others
    old_ctx = replace(ctx, config=previous_config)
    try:
        changes = changed_keys(
            json.loads(json.dumps(step.key_material(old_ctx), sort_keys=True, default=str)),
            json.loads(json.dumps(step.key_material(ctx), sort_keys=True, default=str)),
        )
        old_key = step_key(step, old_ctx)
    except Exception:  # the previous config's material cannot be computed now (a file it named is gone, say)
        return f"the config changed since it completed, or {others}"
    if not changes:
        return others
    also = "" if old_key == done_key else f"; also {others}"
    return f"its inputs from the config changed: {', '.join(changes)}{also}"


def _status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind an exception: a failed call's, or the one an OracleCallError carries."""
    if isinstance(exc, grpc.RpcError):
        return exc.code()  # type: ignore[attr-defined]
    code = getattr(exc, "code", None)
    return code if isinstance(code, grpc.StatusCode) else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    if isinstance(exc, RunCancelledError):
        return "cancelled"
    if isinstance(exc, RuntimeError | ValueError | OSError):
        return str(exc) or type(exc).__name__
    # Anything else is a bug somewhere: name the exception so the message is not a bare "numbers".
    return f"{type(exc).__name__}: {exc}"
