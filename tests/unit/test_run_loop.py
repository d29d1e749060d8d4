"""The loop's stopping rules in RunManager._iterate, with the steps replaced by stand-ins that record their
validation figures: target met, budget spent, max iterations, and a resumed run that follows where its earlier
attempt went instead of re-judging the budget with a ledger that already holds the later iteration's calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import parse_config
from pyacemaker.services.orchestrator import runner
from pyacemaker.services.orchestrator.runner import RunHandle, RunManager
from pyacemaker.services.orchestrator.state import RunState, StepRow
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.v1 import orchestrator_pb2
from tests.conftest import SN2_DIR


class StandIn:
    def __init__(self, name: str, metrics: dict[int, dict[str, float]] | None = None) -> None:
        self.name, self.version, self.metrics, self.ran = name, 1, metrics or {}, []

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {"iteration": ctx.iteration}

    def run(self, ctx: StepContext) -> StepOutcome:
        self.ran.append(ctx.iteration)
        return StepOutcome(outputs={}, metrics=self.metrics.get(ctx.iteration, {}), exports={})


def manager_and_handle(tmp_path: Path, max_iterations: int, budget: int) -> tuple[RunManager, RunHandle]:
    config = parse_config(
        {
            "name": "loop",
            "system": {"seeds": ["seeds/reactant_complex.xyz"], "charge": -1},
            "oracle": {"backend": "xtb"},
            "budget": {"max_dft_calls": budget},
            "validation": {"max_iterations": max_iterations},
        },
        SN2_DIR,
    )
    manager = RunManager(ArtifactStore(tmp_path / "store"), "", "", "")
    return manager, RunHandle(run_id="r", config=config, run_dir=tmp_path, state=RunState(tmp_path))


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, StandIn]:
    stand_ins = {name: StandIn(name) for name in ("active_learning", "validation")}
    monkeypatch.setattr(runner, "ITERATION_STEPS", tuple(stand_ins.values()))
    return stand_ins


def test_stops_when_the_target_is_met(tmp_path, steps, monkeypatch):
    steps["validation"].metrics = {1: {"target_met": 0.0}, 2: {"target_met": 1.0}}
    manager, handle = manager_and_handle(tmp_path, max_iterations=5, budget=100)
    monkeypatch.setattr(RunManager, "_dft_calls", lambda self, handle: 10)
    assert manager._iterate(handle, [], {}) == (2, "target met")


def test_stops_when_the_budget_is_spent_or_iterations_run_out(tmp_path, steps, monkeypatch):
    manager, handle = manager_and_handle(tmp_path, max_iterations=3, budget=40)
    monkeypatch.setattr(RunManager, "_dft_calls", lambda self, handle: 40)
    assert manager._iterate(handle, [], {}) == (1, "budget spent")
    manager, handle = manager_and_handle(tmp_path / "other", max_iterations=3, budget=40)
    monkeypatch.setattr(RunManager, "_dft_calls", lambda self, handle: 12)
    assert manager._iterate(handle, [], {}) == (3, "max iterations")


def test_a_resumed_run_follows_its_earlier_attempt_into_the_next_iteration(tmp_path, steps, monkeypatch):
    manager, handle = manager_and_handle(tmp_path, max_iterations=2, budget=40)
    # The earlier attempt reached iteration 2's step 2 before it was killed; the ledger is now at the budget.
    handle.state.mark_step("active_learning.2", "old", orchestrator_pb2.STEP_STATE_RUNNING)
    handle.state.complete_step(StepRow("active_learning.2", "old", orchestrator_pb2.STEP_STATE_COMPLETED))
    monkeypatch.setattr(RunManager, "_dft_calls", lambda self, handle: 40)
    assert manager._iterate(handle, [], {}) == (2, "budget spent")  # judged after iteration 2, not after 1
    assert steps["validation"].ran == [1, 2]


def test_the_best_iteration_is_stable_first_then_most_accurate():
    from pyacemaker.services.orchestrator.steps.validation import best_iteration

    figures = {
        1: {"final_ace_forces_rmse_mev_per_a": 90.0, "final_ace_md_survivors": 8.0, "final_ace_md_runs": 9.0},
        2: {"final_ace_forces_rmse_mev_per_a": 120.0, "final_ace_md_survivors": 9.0, "final_ace_md_runs": 9.0},
        3: {"final_ace_forces_rmse_mev_per_a": 100.0, "final_ace_md_survivors": 9.0, "final_ace_md_runs": 9.0},
    }
    assert best_iteration(figures) == 3  # 1 is the most accurate but lost an MD run
    assert best_iteration({1: figures[1]}) == 1  # nothing stabler to choose
    # Without a stability test (md_stability.steps 0) the force RMSE alone decides, as before.
    assert (
        best_iteration({1: {"final_ace_forces_rmse_mev_per_a": 90.0}, 2: {"final_ace_forces_rmse_mev_per_a": 80.0}})
        == 2
    )
    assert best_iteration({1: {"target_met": 0.0}}) == 0


class ConfigReader(StandIn):
    """A stand-in whose key depends on the budget and the md temperatures, as real steps' keys do."""

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {"budget": ctx.config.budget.model_dump(mode="json"), "temperatures": ctx.config.md.temperatures}


def _log_messages(handle: RunHandle) -> list[str]:
    return [e.message for e in handle.state.events_after(0) if e.kind == orchestrator_pb2.RUN_EVENT_KIND_LOG]


def test_a_completed_step_redone_after_a_config_change_says_which_keys_changed(tmp_path):
    manager, first = manager_and_handle(tmp_path, max_iterations=1, budget=60)
    step = ConfigReader("mace_finetune")
    manager._run_step(first, step, [], {}, 1)
    manager._run_step(first, step, [], {}, 1)  # same config: skipped
    assert step.ran == [1]
    _, second = manager_and_handle(tmp_path, max_iterations=1, budget=70)
    second.previous_config = first.config
    manager._run_step(second, step, [], {}, 1)
    assert step.ran == [1, 1]
    assert _log_messages(second)[-1] == (
        "redoing (it had completed): its inputs from the config changed: budget.max_dft_calls (60 → 70)"
    )
    step.version = 2  # a later start with the same config, but the step's code changed
    _, third = manager_and_handle(tmp_path, max_iterations=1, budget=70)
    manager._run_step(third, step, [], {}, 1)
    assert step.ran == [1, 1, 1]
    assert _log_messages(third)[-1] == (
        "redoing (it had completed): the outputs of earlier steps it uses (they were redone) or the pipeline's "
        "code version changed"
    )


def test_starting_a_run_dir_with_another_config_announces_the_changed_keys(tmp_path):
    from pyacemaker.structures import atoms_to_structure
    from tests.conftest import sn2_seeds

    seeds = [atoms_to_structure(atoms) for atoms in sn2_seeds()]
    manager, first = manager_and_handle(tmp_path, max_iterations=1, budget=60)
    run_dir = str(tmp_path / "run")
    # No services at these addresses: each run fails at once after its start-up events, which is all this needs.
    handle = manager.start(first.config.model_dump_json(), seeds, run_dir)
    handle.thread.join(30)
    assert not any("config differs" in m for m in _log_messages(handle))
    changed = first.config.model_copy(update={"budget": first.config.budget.model_copy(update={"max_dft_calls": 70})})
    handle = manager.start(changed.model_dump_json(), seeds, run_dir)
    handle.thread.join(30)
    # The DIRECT size and the hold-out derived at the first start (budget 60: 21 and 9) are kept from the run
    # dir's saved config; the active-learning batch follows the new budget (60 − 3 − 21 − 9 = 27 → 37 left).
    assert (
        "the config differs from the one this run dir last ran with: active_learning.batch_size (27 → 37); "
        "budget.max_dft_calls (60 → 70). Completed steps whose inputs these change are redone; each says so when it "
        "starts"
    ) in _log_messages(handle)


def test_more_iterations_or_a_new_stop_after_change_no_step_key(tmp_path):
    """Continuing a finished run with a larger validation.max_iterations (or another stop_after) must skip
    every completed step: none of the looped steps' keys may depend on them."""
    from pyacemaker.services.orchestrator.steps import step_key
    from pyacemaker.v1 import common_pb2

    _, handle = manager_and_handle(tmp_path, max_iterations=2, budget=60)
    more = handle.config.model_copy(
        update={
            "validation": handle.config.validation.model_copy(update={"max_iterations": 5}),
            "stop_after": "delta_fit",
        }
    )
    outputs = ("dft", "iteration", "frames", "md_record", "yaml", "yace", "asi", "metrics", "holdout", "validation")
    outputs += ("model_0", "shard_0000")
    previous = {
        step: {name: common_pb2.ArtifactRef(uri=f"{step}/{name}", sha256=f"{step}{name}") for name in outputs}
        for step in ("direct_sampling", *(s.name for s in runner.ITERATION_STEPS))
    }
    for iteration in (1, 2):
        for step in runner.ITERATION_STEPS:
            keys = [
                step_key(
                    step,
                    StepContext(
                        config=config,
                        store=ArtifactStore(tmp_path / "store"),
                        run_dir=tmp_path,
                        seeds=[],
                        sampler_address="",
                        oracle_address="",
                        trainer_address="",
                        report=lambda progress: None,
                        previous=previous,
                        iteration=iteration,
                    ),
                )
                for config in (handle.config, more)
            ]
            assert keys[0] == keys[1], f"{step.name}.{iteration}"


def test_the_orchestrator_derives_what_a_config_leaves_out_and_saves_it(tmp_path):
    """A client that sends a config without windows, profile or the budget's sizes (not derived by `pyacemaker
    run`) gets them derived from the request's seeds; the run dir's saved config holds them, so a resume uses the
    same values, and the run's log says what was derived."""
    import json

    from pyacemaker.config import config_from_json
    from pyacemaker.services.orchestrator.state import saved_config_json
    from pyacemaker.structures import atoms_to_structure
    from tests.conftest import sn2_seeds

    seeds = [atoms_to_structure(atoms) for atoms in sn2_seeds()]
    raw = {
        "name": "derive",
        "system": {"seeds": [str(SN2_DIR / "seeds" / "reactant_complex.xyz")], "charge": -1},
        "oracle": {"backend": "xtb"},
        "budget": {"max_dft_calls": 70},
    }
    manager = RunManager(ArtifactStore(tmp_path / "store"), "", "", "")
    handle = manager.start(json.dumps(raw), seeds, str(tmp_path / "run"))
    handle.thread.join(30)
    saved = config_from_json(saved_config_json(tmp_path / "run"))
    assert saved.md.windows is not None and saved.md.windows.atoms == (4, 0, 5)
    assert (saved.md.windows.start, saved.md.windows.stop, saved.md.windows.count) == (-1.5, 1.5, 13)
    assert (saved.sampling.direct.n_select, saved.validation.holdout_size, saved.active_learning.batch_size) == (
        24,
        10,
        7,
    )
    assert any(
        m.startswith("derived from the seeds and the budget: md.windows: derived from the seeds: atoms [4, 0, 5]")
        for m in _log_messages(handle)
    )
