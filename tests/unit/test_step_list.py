"""One list of steps (pyacemaker.run_layout.STEP_DIRS): the runner takes them in its order, each exports into its
directory, and the config's stop_after accepts exactly its names."""

from __future__ import annotations

import importlib

import pytest

from pyacemaker.config import ConfigError, parse_config
from pyacemaker.run_layout import ONCE_PER_RUN_STEPS, STEP_DIRS
from pyacemaker.services.orchestrator.runner import FIRST_STEP, ITERATION_STEPS
from pyacemaker.services.orchestrator.steps.teacher_bootstrap import TeacherBootstrapStep

_MODULES = {
    "teacher_bootstrap": "teacher_bootstrap",
    "direct_sampling": "direct_sampling",
    "active_learning": "active_learning_step",
    "mace_finetune": "mace_finetune",
    "surrogate_md": "surrogate_md",
    "surrogate_labelling": "surrogate_labelling",
    "ace_fit": "ace_fit",
    "student_refinement": "student_refinement",
    "delta_fit": "delta_fit",
    "validation": "validation",
}


def test_the_runner_takes_the_steps_of_the_list_in_its_order() -> None:
    once = [TeacherBootstrapStep().name, FIRST_STEP.name]
    assert once == list(ONCE_PER_RUN_STEPS)
    assert once + [step.name for step in ITERATION_STEPS] == list(STEP_DIRS)


@pytest.mark.parametrize("name", list(STEP_DIRS))
def test_each_step_exports_into_its_directory(name: str) -> None:
    module = importlib.import_module(f"pyacemaker.services.orchestrator.steps.{_MODULES[name]}")
    assert STEP_DIRS[name] == module.EXPORT_DIR


def test_stop_after_takes_a_step_name_and_refuses_anything_else(tmp_path) -> None:
    (tmp_path / "a.xyz").write_text("1\n\nH 0 0 0\n")
    base = {"name": "t", "system": {"seeds": ["a.xyz"]}, "oracle": {"backend": "lj"}}
    for name in STEP_DIRS:
        if name != "validation":
            assert parse_config({**base, "stop_after": name}, tmp_path).stop_after == name
    with pytest.raises(ConfigError, match="stop_after: 'ace' is not a step; use one of teacher_bootstrap, direct_s"):
        parse_config({**base, "stop_after": "ace"}, tmp_path)
