"""The JSON records a run exports (their paths: pyacemaker.run_layout), as types: the orchestrator's steps build
them and write them through `record_text`, the report and the CLI read them through `read_record`.

Each record's fields are its JSON keys, in the order the steps have always written them, and `record_text` writes
the same bytes as before the types existed: the steps' records are content-addressed, and their digests feed later
steps' keys, so a changed byte would make a continued run redo its steps.

Reading is lenient where runs differ and strict where they cannot: a field without a default is a key every run
has written and a reader cannot do without (a record without it is malformed: `RecordError` names the file and
the key); a field with a default is one older runs lack, or one the report shows as unknown when missing."""

from __future__ import annotations

import functools
import json
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

RecordT = TypeVar("RecordT")

# Field metadata. A key the step leaves out, rather than writing null, when it has no value.
OMITTED_WHEN_NONE = {"omitted_when_none": True}
# A dict whose items are written at the record's top level, beside its other keys (keys that vary, see below).
INLINE = {"inline": True}


class RecordError(ValueError):
    """A record file that does not hold what its type says; the message names the file and the key."""


# -- the records ---------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TeacherRecord:
    """step0_teacher/teacher.json: the run's own teacher (teacher.bootstrap), trained on a cheap level's labels."""

    json_indent: ClassVar[int | None] = 1

    level_of_theory: str
    n_pool: int
    n_md_frames: int
    n_md_replicas: int
    n_labelled: int
    n_failed: int
    n_above_max_force: int
    isolated_atom_energies_ev: dict[str, float]  # atomic number (a JSON key: a string) -> E0
    # The trainer job's metrics, written beside the keys above: a dict, as they differ with the committee's size
    # (member_<i>_...); energy_rmse_ev_per_atom and forces_rmse_ev_per_a (its validation RMSEs) are always there.
    training_metrics: dict[str, float] = field(default_factory=dict, metadata=INLINE)

    def validation_rmse(self) -> tuple[float, float]:
        """The teacher's validation RMSEs at its own level: energy (eV/atom), forces (eV/Å)."""
        return self.training_metrics["energy_rmse_ev_per_atom"], self.training_metrics["forces_rmse_ev_per_a"]


@dataclass(kw_only=True)
class SelectionRecord:
    """step1_direct/selection.json: the pool step 1 built and what DIRECT selected from it."""

    json_indent: ClassVar[int | None] = 2

    n_pool: int
    n_rejected: int | None = None
    n_rejected_teacher_force: int | None = None
    rattle_amplitudes_a: list[float] | None = None  # Å; the resolved pool.rattle_amplitudes (older runs lack it)
    n_selected: int
    coverage: float  # of the pool's feature space, 0-1
    n_components: int | None = None
    explained_variance_ratio: list[float] = field(default_factory=list)
    n_clusters: int | None = None
    featuriser: str | None = None
    selected_pool_indices: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class ActiveLearningRecord:
    """iteration_NN/step2_active_learning/iteration.json: how step 2 calibrated the committee and chose the DFT
    candidates. Candidates are the step-1 pool (indices below n_pool), then MD frames."""

    json_indent: ClassVar[int | None] = 1

    iteration: int | None = None
    calibration_factor: float  # force error ≈ factor × committee spread
    force_error_threshold_ev_per_a: float
    labelled_max_force_error_ev_per_a: list[float] = field(default_factory=list)
    labelled_committee_max_force_std_ev_per_a: list[float] = field(default_factory=list)
    n_pool: int | None = None
    n_md_candidates: int | None = None
    n_candidates: int | None = None
    pool_committee_max_force_std_ev_per_a: list[float]
    chosen_pool_indices: list[int] = field(default_factory=list)
    max_candidate_force_ev_per_a: float | None = None
    # The cap applied: max_candidate_force, or the largest committee force among the MD-frame candidates.
    candidate_force_cap_ev_per_a: float | None = None
    excluded_by_force_pool_indices: list[int] = field(default_factory=list)
    # Committee energy per atom far outside the DFT-labelled range (within_energy_range): unphysical.
    excluded_by_energy_pool_indices: list[int] = field(default_factory=list)
    chosen_content_ids: list[str] = field(default_factory=list)
    isolated_atom_energies_ev: dict[str, float] = field(default_factory=dict)  # atomic number -> E0
    n_dft_labelled_before: int | None = None
    n_dft_added: int | None = None
    # Labelled (and charged) but not trained on: DFT forces above max_candidate_force (near-collisions).
    excluded_by_dft_force_content_ids: list[str] = field(default_factory=list)
    dft_calls_charged: int  # by the end of this step, the run's total
    dft_allowance: int | None = None


@dataclass(kw_only=True)
class ValidationTarget:
    energy_mev_per_atom: float
    forces_mev_per_a: float


@dataclass(kw_only=True)
class HoldoutReference:
    """The DFT labels of the hold-out: energy per structure and per atom, force components per atom."""

    energy_per_atom_ev: list[float]
    forces_ev_per_a: list[list[float]]


@dataclass(kw_only=True)
class SourceScores:
    """A model's RMSEs on the hold-out structures of one source (validation.SURROGATE_SOURCE, EXTERNAL_SOURCE)."""

    n: int
    energy_rmse_mev_per_atom: float
    forces_rmse_mev_per_a: float


@dataclass(kw_only=True)
class ModelScores:
    """One model against the hold-out: its RMSEs and its values (for the parity plots)."""

    energy_rmse_mev_per_atom: float
    forces_rmse_mev_per_a: float
    energy_per_atom_ev: list[float]
    forces_ev_per_a: list[list[float]]
    by_source: dict[str, SourceScores] = field(default_factory=dict)
    # The extrapolation grade γ: only for the ACE models whose active set the trainer wrote (final, direct).
    max_gamma_per_structure: list[float] | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    max_gamma: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    max_gamma_by_source: dict[str, float] | None = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass(kw_only=True)
class EnergyProfile:
    """Energies along the reaction coordinate ξ, per method ("dft" and the models), each on its own zero."""

    xi_a: list[float]
    energies_ev: dict[str, list[float]]
    central_barrier_kcal_per_mol: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class MdStabilityRun:
    seed: int  # index into the run's seeds
    temperature_k: float
    steps_done: int
    survived: bool
    problem: str | None  # why it did not survive
    dissociation: str | None = None  # a survivor that split into the seeds' own fragments: when and into what


@dataclass(kw_only=True)
class MdStability:
    """The final ACE's stability MD (validation.md_stability): every run, and survivors per temperature."""

    steps: int
    timestep_fs: float
    n_runs: int
    n_survivors: int
    n_dissociated: int | None = None
    survivors_by_temperature: dict[str, list[int]]  # temperature (K, as written by "%g") -> [survivors, runs]
    runs: list[MdStabilityRun]


@dataclass(kw_only=True)
class DistillationGain:
    """What the distillation gains over the ablation: final / direct RMSE ratios (below 1: it earns its place)."""

    forces_rmse_ratio_final_over_direct: float
    energy_rmse_ratio_final_over_direct: float
    final_ace_forces_rmse_mev_per_a: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    direct_ace_forces_rmse_mev_per_a: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    final_ace_energy_rmse_mev_per_atom: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    direct_ace_energy_rmse_mev_per_atom: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    # Model -> |its central barrier − DFT's|, only with a profile.
    barrier_error_kcal_per_mol: dict[str, float] | None = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass(kw_only=True)
class Ablation:
    """The same ACE fitted on the iteration's DFT training labels alone; `error` says why there is none."""

    model: str
    trained_on: str = ""
    n_training_structures: int | None = None
    fit: dict[str, float] = field(default_factory=dict)  # the trainer job's metrics: they vary with the fit
    error: str = ""
    gain: DistillationGain | None = None


@dataclass(kw_only=True)
class ValidationRecord:
    """iteration_NN/validation/validation.json: every model against the DFT hold-out, the profile, the stability
    MD and the ablation."""

    json_indent: ClassVar[int | None] = None

    iteration: int
    level_of_theory: str | None = None
    n_holdout: int | None = None
    n_holdout_by_source: dict[str, int] = field(default_factory=dict)
    holdout_sources: list[str] = field(default_factory=list)  # per hold-out structure
    dft_calls_total: int | None = None  # by the end of validation, the run's total
    dft_budget: int | None = None
    target: ValidationTarget
    target_met: bool | None = None
    reference: HoldoutReference
    # Model name (validation.MODELS) -> its scores: a dict, as the models validated vary (no direct_ace when the
    # ablation's fit was refused; older runs have fewer).
    models: dict[str, ModelScores]
    profile: EnergyProfile | None = None
    md_stability: MdStability | None = None
    ablation: Ablation | None = None


@dataclass(kw_only=True)
class RunSummary:
    """run_summary.json: why the run stopped, where its potential is, what it cost."""

    json_indent: ClassVar[int | None] = 1

    stop_reason: str
    iterations: int
    best_iteration: int | None = None  # the iteration handed out
    final_potential: str = ""  # relative to the run dir; "" when there is none
    dft_calls: int
    dft_budget: int
    wall_time_s: float | None = None
    dft_calls_not_trained_on: int | None = None
    # The handed-out iteration's figures (validation.handed_out_figures): a dict, as they follow its settings (a
    # barrier only with a profile, survivors only with the stability MD). Written only when it was validated,
    # and distillation_gain (null without an ablation) with it.
    final_potential_figures: dict[str, float] | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    distillation_gain: DistillationGain | None = field(
        default=None, metadata={"written_with": "final_potential_figures"}
    )


# -- writing and reading -------------------------------------------------------------------------------------------


def record_text(record: Any) -> str:
    """The record as the steps have always written it (its type's indent)."""
    return json.dumps(record_to_json(record), indent=type(record).json_indent)


def record_to_json(record: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for spec in fields(record):
        value = getattr(record, spec.name)
        if value is None and spec.metadata.get("omitted_when_none"):
            continue
        if (partner := spec.metadata.get("written_with")) and getattr(record, partner) is None:
            continue
        if spec.metadata.get("inline"):
            data.update(value)
        else:
            data[spec.name] = _to_json(value)
    return data


def _to_json(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return record_to_json(value)
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    return value


def read_record(path: Path, kind: type[RecordT], name: str | None = None) -> RecordT:
    """The record in `path` (named `name` in errors, the path by default); raises RecordError when it is not
    valid JSON or does not hold what `kind` says, OSError when it cannot be read."""
    name = name or str(path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{name} is not valid JSON ({exc})") from None
    return record_from_json(kind, data, name)


def record_from_json(kind: type[RecordT], data: Any, name: str) -> RecordT:
    """`kind` from a record's parsed JSON; `name` (the file) is what a RecordError names."""
    return _parse(kind, data, name, "")


def _parse(kind: Any, value: Any, name: str, key: str) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = (arg for arg in args if arg is not type(None))
        return _parse(kind, value, name, key)
    if isinstance(kind, type) and is_dataclass(kind):
        _check(isinstance(value, dict), value, "a JSON object", name, key)
        return _parse_dataclass(kind, value, name, key)
    if origin is list:
        _check(isinstance(value, list), value, "a list", name, key)
        return [_parse(args[0], item, name, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), value, "a JSON object", name, key)
        return {k: _parse(args[1], item, name, _join(key, k)) for k, item in value.items()}
    if kind is Any:
        return value
    # bool is an int to Python, not to a record; a float may have been written as an int (60 for 60.0).
    scalar = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}[kind]
    _check(isinstance(value, scalar) and (kind is bool or not isinstance(value, bool)), value, kind.__name__, name, key)
    return value


def _parse_dataclass(kind: type, value: dict[str, Any], name: str, key: str) -> Any:
    hints = _type_hints(kind)
    specs = fields(kind)
    values: dict[str, Any] = {}
    for spec in specs:
        where = _join(key, spec.name)
        if spec.metadata.get("inline"):
            named = {s.name for s in specs}
            values[spec.name] = _parse(hints[spec.name], {k: v for k, v in value.items() if k not in named}, name, key)
        elif spec.name in value:
            values[spec.name] = _parse(hints[spec.name], value[spec.name], name, where)
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise RecordError(f"{name}: missing key {where!r}")
    return kind(**values)


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


@functools.cache
def _type_hints(kind: type) -> dict[str, Any]:
    return get_type_hints(kind)


def _check(ok: bool, value: Any, expected: str, name: str, key: str) -> None:
    if not ok:
        where = f"key {key!r}" if key else "the record"
        raise RecordError(f"{name}: {where} holds {type(value).__name__}, expected {expected}")
