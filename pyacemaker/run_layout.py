"""Where a run keeps its files: every path inside a run directory is spelled here and nowhere else.

    RUN_DIR/state.sqlite          the run's state (steps, keys, outputs, events, the DFT ledger)
    RUN_DIR/run_summary.json      why the run stopped and where its potential is
    RUN_DIR/step0_teacher/        the run's own teacher (once per run, only with teacher.bootstrap)
    RUN_DIR/step1_direct/         DIRECT sampling (once per run)
    RUN_DIR/iteration_NN/stepK_*/ the looped steps 2-7 and validation, once per active-learning iteration
    RUN_DIR/report/index.html     the HTML report

The orchestrator writes these, the report and the CLI read them; both import the names from here."""

from __future__ import annotations

import re
from enum import StrEnum

STATE_FILE = "state.sqlite"
SUMMARY_FILE = "run_summary.json"
REPORT_DIR = "report"
REPORT_FILE = "index.html"

# Each step's directory, relative to the run dir (step 1) or to its iteration's dir (the others).
TEACHER_BOOTSTRAP_DIR = "step0_teacher"
DIRECT_DIR = "step1_direct"
ACTIVE_LEARNING_DIR = "step2_active_learning"
MACE_FINETUNE_DIR = "step3_mace_finetune"
SURROGATE_MD_DIR = "step4_surrogate_md"
SURROGATE_LABELS_DIR = "step5_surrogate_labels"
BASE_ACE_DIR = "step6_base_ace"
STUDENT_REFINEMENT_DIR = "step6b_student_refinement"
DELTA_DIR = "step7_delta"
VALIDATION_DIR = "validation"


# Every step of a run, in the order the run takes them, with its directory: the names the state file, the
# events, the report and the config's `stop_after` use. The first two run once per run (the first only with
# teacher.bootstrap); the others once per active-learning iteration, inside iteration_NN/.
class StepName(StrEnum):
    """A step's name: its state rows ("<name>" once per run, "<name>.<iteration>" for the looped steps), the key
    of its outputs for later steps, its events and the config's `stop_after` value. A str: it is the name."""

    TEACHER_BOOTSTRAP = "teacher_bootstrap"
    DIRECT_SAMPLING = "direct_sampling"
    ACTIVE_LEARNING = "active_learning"
    MACE_FINETUNE = "mace_finetune"
    SURROGATE_MD = "surrogate_md"
    SURROGATE_LABELLING = "surrogate_labelling"
    ACE_FIT = "ace_fit"
    STUDENT_REFINEMENT = "student_refinement"
    DELTA_FIT = "delta_fit"
    VALIDATION = "validation"


STEP_DIRS: dict[str, str] = {
    StepName.TEACHER_BOOTSTRAP: TEACHER_BOOTSTRAP_DIR,
    StepName.DIRECT_SAMPLING: DIRECT_DIR,
    StepName.ACTIVE_LEARNING: ACTIVE_LEARNING_DIR,
    StepName.MACE_FINETUNE: MACE_FINETUNE_DIR,
    StepName.SURROGATE_MD: SURROGATE_MD_DIR,
    StepName.SURROGATE_LABELLING: SURROGATE_LABELS_DIR,
    StepName.ACE_FIT: BASE_ACE_DIR,
    StepName.STUDENT_REFINEMENT: STUDENT_REFINEMENT_DIR,
    StepName.DELTA_FIT: DELTA_DIR,
    StepName.VALIDATION: VALIDATION_DIR,
}
ONCE_PER_RUN_STEPS = (StepName.TEACHER_BOOTSTRAP, StepName.DIRECT_SAMPLING)

# The records the report reads, relative to the run dir (selection) or to an iteration's dir (the others).
TEACHER_BOOTSTRAP_RECORD = f"{TEACHER_BOOTSTRAP_DIR}/teacher.json"
SELECTION_RECORD = f"{DIRECT_DIR}/selection.json"
ACTIVE_LEARNING_RECORD = f"{ACTIVE_LEARNING_DIR}/iteration.json"
VALIDATION_RECORD = f"{VALIDATION_DIR}/validation.json"
FINAL_POTENTIAL = f"{DELTA_DIR}/final.yace"

_ITERATION_DIR = re.compile(r"^iteration_(\d+)$")


def iteration_dir(number: int) -> str:
    """The directory of active-learning iteration `number` (1-based), relative to the run dir."""
    return f"iteration_{number:02d}"


def iteration_number(name: str) -> int | None:
    """The iteration a directory name stands for, or None when it is not an iteration's directory."""
    match = _ITERATION_DIR.match(name)
    return int(match.group(1)) if match else None


def in_iteration(number: int, path: str) -> str:
    """`path` (relative to an iteration's dir) relative to the run dir."""
    return f"{iteration_dir(number)}/{path}"
