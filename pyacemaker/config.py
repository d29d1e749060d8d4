"""The run configuration: one YAML file, validated by pydantic.

Unknown keys and out-of-range values are errors that name the key's path (e.g. `md.temperatures.0`).
Relative paths are relative to the config file's directory.
"""

from __future__ import annotations

import json
import math
import numbers
import types
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pyacemaker.mace_options import name_problem
from pyacemaker.run_layout import STEP_DIRS, StepName
from pyacemaker.teacher.resolve import closest_model_name, is_model_name
from pyacemaker.torch_device import DeviceSetting
from pyacemaker.yaml_input import YamlInputError, load_yaml_file

Positive = Annotated[float, Field(gt=0)]
# A profile of the oracle's deployment file, chosen by name.
PROFILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ConfigError(ValueError):
    """A config that cannot be used; `str()` is one line per problem, each naming the key or file."""


# No value in a run config is this large in its unit (K, fs, s, Å, eV, Ry, counts); larger is a typo or an attack.
MAX_MAGNITUDE = 1e12
# Random seeds reach numpy's legacy seeding and int64 wire fields.
MAX_SEED = 2**32 - 1
# Fields (of any section) that name an input file, checked to exist when a config file is loaded; entries that
# are model names ('bundled', a foundation model) are not files.
_INPUT_FILE_FIELDS = ("template", "potential", "models")


def _scalar_problem(annotation: Any, value: Any) -> str | None:
    """Why `value` does not fit `annotation` strictly: no booleans or strings for numbers, no numbers for
    booleans, integers and floats within ±MAX_MAGNITUDE, no control characters (a newline) in strings. None when
    it fits or when pydantic's own validation decides (sub-models, literals, Any)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar_problem(get_args(annotation)[0], value)
    if origin in (Union, types.UnionType):
        problems = [_scalar_problem(option, value) for option in get_args(annotation)]
        return None if any(problem is None for problem in problems) else problems[0]
    if annotation is type(None):
        return None if value is None else "expected null"
    if origin in (list, tuple) and isinstance(value, list | tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        for index, item in enumerate(value):
            problem = _scalar_problem(args[min(index, len(args) - 1)], item) if args else None
            if problem is not None:
                return f"item {index}: {problem}"
        return None
    if origin is dict and isinstance(value, dict):
        key_type, value_type = get_args(annotation) or (Any, Any)
        for key, item in value.items():
            problem = _scalar_problem(key_type, key) or _scalar_problem(value_type, item)
            if problem is not None:
                return f"{key!r}: {problem}"
        return None
    if annotation is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {_kind(value)}"
    if annotation is int:  # a whole float is an integer: a protobuf Struct carries every number as a double
        whole = isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
        if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or whole):
            return f"expected an integer, got {_kind(value)}"
        return None if abs(value) <= MAX_MAGNITUDE else f"{value} is out of range (|value| ≤ {MAX_MAGNITUDE:g})"
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"expected a number, got {_kind(value)}"
        number = int(value) if isinstance(value, numbers.Integral) else float(value)
        if not math.isfinite(number):
            return f"expected a finite number, got {value}"
        return None if abs(number) <= MAX_MAGNITUDE else f"{value} is out of range (|value| ≤ {MAX_MAGNITUDE:g})"
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, PurePath)):
        text = value if isinstance(value, str) else str(value) if isinstance(value, PurePath) else None
        if text is None:
            return f"expected a {'string' if annotation is str else 'path'}, got {_kind(value)}"
        bad = next((c for c in text if ord(c) < 0x20 or ord(c) == 0x7F), None)
        return None if bad is None else f"control character {bad!r} is not allowed"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if value is None:
        return "null"
    if isinstance(value, dict | list | tuple):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return f"{type(value).__name__} {value!r:.40}"


class _Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable, numbers are finite and of
    the field's type (see `_scalar_problem`), and input files exist when a config file is loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: Any) -> Any:
        """The first value that fails `_scalar_problem`, as a `strict_type` error whose context names the key
        (format_validation_error appends it to the location: a before-validator cannot sit on the `kind` and
        `backend` discriminator fields, so this runs once per section instead of once per field)."""
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            problem = _scalar_problem(field.annotation, value) if field is not None else None
            if problem is not None:
                raise PydanticCustomError("strict_type", "{problem}", {"key": key, "problem": problem})
        return data

    @field_validator(*_INPUT_FILE_FIELDS, mode="after", check_fields=False)
    @classmethod
    def _input_files_exist(cls, value: Any, info: ValidationInfo) -> Any:
        context = info.context or {}
        if not context.get("check_files"):
            return value
        base = Path(context.get("base_dir", "."))
        for entry in value if isinstance(value, list) else [value]:
            if entry is None or (info.field_name == "models" and is_model_name(str(entry))):
                continue
            path = Path(entry).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise ValueError(f"file not found: {path}")
        return value


class SystemConfig(_Strict):
    """What is being modelled."""

    seeds: list[Path] = Field(
        min_length=1, max_length=10_000, description="Seed structure files (xyz/extxyz), relative to the config file."
    )
    charge: int = Field(0, ge=-1000, le=1000, description="Total charge of every structure, elementary charges.")
    spin_multiplicity: int | None = Field(
        None, ge=1, le=1001, description="2S+1; default: 1 for an even electron count, 2 for odd."
    )

    @field_validator("seeds")
    @classmethod
    def _seeds_exist(cls, seeds: list[Path], info: ValidationInfo) -> list[Path]:
        base = Path((info.context or {}).get("base_dir", "."))
        resolved = []
        for seed in seeds:
            path = seed if seed.is_absolute() else (base / seed)
            if not path.is_file():
                raise ValueError(f"seed file not found: {path}")
            resolved.append(path.resolve())
        return resolved


# Settings that name programs, files or directories on the oracle's host belong to the oracle's deployment file
# (docs/deployment.md), never to a run config or a request: key -> where the deployment file sets it.
_DEPLOYMENT_SETTINGS = {
    "command": "{backend}.profiles.<profile>.command",
    "pseudo_dir": "qe.profiles.<profile>.pseudo_dir",
    "potcar_dir": "vasp.profiles.<profile>.potcar_dir",
    "template": "executors.{backend}.template",
    "scratch_dir": "executors.{backend}.scratch_dir",
    "extra_directives": "executors.{backend}.extra_directives",
}


def _refuse_deployment_settings(data: Any, owner: str, keys: tuple[str, ...]) -> Any:
    """A clear error for a key that moved to the oracle's deployment file (it used to be an option here)."""
    if isinstance(data, dict):
        for key in keys:
            if key in data:
                where = _DEPLOYMENT_SETTINGS[key].format(backend=owner)
                raise ValueError(
                    f"`{key}` is a deployment setting of the oracle service, not an option of a run or a request: "
                    f"set `{where}` in the oracle's deployment file "
                    "(python -m pyacemaker.services.oracle --deployment FILE, "
                    "pyacemaker up --oracle-deployment FILE; see docs/deployment.md)"
                )
    return data


class LocalExecutorConfig(_Strict):
    """Run calculations as local processes (a pool of workers on this machine)."""

    kind: Literal["local"] = "local"
    max_workers: int = Field(1, ge=1, le=4096, description="Calculations run at once.")
    timeout_s: Positive = Field(3600.0, description="Wall-time limit of one calculation, s.")
    keep_finished: bool = Field(False, description="Keep the dirs of successful calculations too (failed: always).")

    @model_validator(mode="before")
    @classmethod
    def _no_deployment_settings(cls, data: Any) -> Any:
        return _refuse_deployment_settings(data, "local", ("scratch_dir",))


# Scheduler time limits, checked here so that a typo fails at config time, not at submission.
_SLURM_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_PBS_DURATION_FORMS = "SS, MM:SS or HH:MM:SS (seconds may have a fraction, e.g. 90.5)"


def _clock_fields(clock: str, text: str, forms: str) -> list[int]:
    """The 1 to 3 colon-separated whole numbers of `clock` (a part of `text`, named in the error)."""
    parts = clock.split(":")
    if len(parts) > 3 or not all(part.isdigit() and part.isascii() for part in parts):
        raise ValueError(f"{text!r} is not a time limit; use {forms}")
    return [int(part) for part in parts]


def slurm_time_seconds(text: str) -> int:
    """Seconds of an sbatch --time value in each form sbatch documents: "minutes", "minutes:seconds",
    "hours:minutes:seconds", "days-hours", "days-hours:minutes", "days-hours:minutes:seconds". Slurm counts in
    minutes and rounds seconds up; the first field may be any size, the others are below 60 (24 for hours after
    days). Zero (Slurm's "no limit") and the names UNLIMITED / INFINITE are refused: a task needs a limit."""
    days, dash, clock = text.rpartition("-")
    if dash:
        if not (days.isdigit() and days.isascii()):
            raise ValueError(f"{text!r} is not a time limit; use {_SLURM_TIME_FORMS}")
        hours, *rest = _clock_fields(clock, text, _SLURM_TIME_FORMS)
        rest += [0] * (2 - len(rest))
        limits = [(hours, 24)] + [(value, 60) for value in rest]
        seconds = ((int(days) * 24 + hours) * 60 + rest[0]) * 60 + rest[1]
    else:
        values = _clock_fields(clock, text, _SLURM_TIME_FORMS)
        if len(values) == 1:
            limits, seconds = [], values[0] * 60
        elif len(values) == 2:
            limits, seconds = [(values[1], 60)], values[0] * 60 + values[1]
        else:
            limits, seconds = [(values[1], 60), (values[2], 60)], (values[0] * 60 + values[1]) * 60 + values[2]
    if any(value >= bound for value, bound in limits):
        raise ValueError(f"{text!r}: a field after the first is out of range; use {_SLURM_TIME_FORMS}")
    if seconds <= 0:
        raise ValueError(f"{text!r}: the time limit must be above zero (zero means no limit to Slurm)")
    return seconds


def pbs_walltime_seconds(text: str) -> float:
    """Seconds of a PBS walltime, a duration as PBS writes it: [[hours:]minutes:]seconds[.fraction]. The first
    field may be any size, minutes and seconds after it are below 60."""
    whole, dot, fraction = text.partition(".")
    if dot and not (fraction.isdigit() and fraction.isascii()):
        raise ValueError(f"{text!r} is not a time limit; use {_PBS_DURATION_FORMS}")
    values = _clock_fields(whole, text, _PBS_DURATION_FORMS)
    if any(value >= 60 for value in values[1:]):
        raise ValueError(f"{text!r}: minutes and seconds after the first field must be below 60")
    seconds = 0.0
    for value in values:
        seconds = seconds * 60 + value
    seconds += float(f"0.{fraction}") if dot else 0.0
    if seconds <= 0:
        raise ValueError(f"{text!r}: the walltime must be above zero")
    return seconds


class _ArrayJobExecutor(_Strict):
    """What every batch-scheduler executor shares: one array job per request batch."""

    array_throttle: int = Field(8, ge=1, le=100_000, description="Array tasks running at once (%N).")
    keep_finished: bool = Field(False, description="Keep the dirs of successful calculations too (failed: always).")

    @model_validator(mode="before")
    @classmethod
    def _no_deployment_settings(cls, data: Any) -> Any:
        kind = data.get("kind", "") if isinstance(data, dict) else ""
        return _refuse_deployment_settings(data, str(kind), ("template", "scratch_dir", "extra_directives"))


class SlurmExecutorConfig(_ArrayJobExecutor):
    """Submit calculations as Slurm array jobs (sbatch/squeue/sacct)."""

    kind: Literal["slurm"]
    partition: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.,-]+$", description="sbatch --partition; default: the cluster's default."
    )
    time_limit: str = Field(
        "01:00:00",
        description="sbatch --time per task, in any form sbatch takes: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.",
    )
    ntasks: int = Field(
        1, ge=1, le=1_000_000, description="sbatch --ntasks per calculation: MPI ranks for a launcher such as srun."
    )
    nodes: int | None = Field(None, ge=1, le=100_000, description="sbatch --nodes per calculation; default: Slurm's.")
    cpus_per_task: int = Field(1, ge=1, le=4096, description="sbatch --cpus-per-task (OpenMP threads per rank).")
    memory: str | None = Field(None, pattern=r"^\d+[KMGT]?$", description="sbatch --mem, e.g. 4G.")
    poll_interval_s: Positive = Field(5.0, description="Seconds between squeue/sacct polls.")

    @field_validator("time_limit")
    @classmethod
    def _sbatch_time(cls, value: str) -> str:
        slurm_time_seconds(value)
        return value


class PbsExecutorConfig(_ArrayJobExecutor):
    """Submit calculations as PBS array jobs (qsub -J / qstat)."""

    kind: Literal["pbs"]
    queue: str | None = Field(None, pattern=r"^[A-Za-z0-9_.@-]+$", description="qsub -q; default: the server's.")
    walltime: str = Field(
        "01:00:00",
        description="Per sub-job, in any form PBS takes: SS, MM:SS or HH:MM:SS (seconds may have a fraction).",
    )
    ncpus: int = Field(1, ge=1, le=4096, description="CPUs per chunk (select=N:ncpus=...).")
    mpiprocs: int = Field(1, ge=1, le=4096, description="MPI ranks per chunk (select=N:...:mpiprocs=...).")
    nodes: int = Field(1, ge=1, le=100_000, description="Chunks per calculation (the N of select=N:...).")
    memory: str | None = Field(None, pattern=r"^\d+[kmgt]?b$", description="PBS mem, e.g. 4gb.")
    poll_interval_s: Positive = Field(10.0, description="Seconds between qstat polls.")

    @field_validator("walltime")
    @classmethod
    def _pbs_duration(cls, value: str) -> str:
        pbs_walltime_seconds(value)
        return value

    @model_validator(mode="after")
    def _ranks_fit_the_chunk(self) -> PbsExecutorConfig:
        if self.mpiprocs > self.ncpus:
            raise ValueError(f"mpiprocs ({self.mpiprocs}) must not exceed ncpus ({self.ncpus}): one CPU per MPI rank")
        return self


ExecutorConfig = Annotated[LocalExecutorConfig | SlurmExecutorConfig | PbsExecutorConfig, Field(discriminator="kind")]


class RetryConfig(_Strict):
    """Self-healing of failed calculations."""

    max_retries: int = Field(
        2, ge=0, le=20, description="Retries with escalated SCF settings before a structure is Failed."
    )
    resubmit_lost_tasks: int = Field(1, ge=0, le=20, description="Resubmissions of a task whose node died.")


class _DftOracle(_Strict):
    executor: ExecutorConfig = Field(default_factory=LocalExecutorConfig)
    retries: RetryConfig = Field(default_factory=RetryConfig)


class LjOracleConfig(_Strict):
    """Lennard-Jones toy oracle (analytic, one parameter set for all elements)."""

    backend: Literal["lj"]
    epsilon: Positive = Field(0.0103, description="Well depth, eV.")
    sigma: Positive = Field(3.40, description="Zero-crossing distance, Å.")
    cutoff: Positive = Field(10.2, description="Pair cutoff, Å (energy shifted to zero there).")


class XtbOracleConfig(_Strict):
    """GFN-xTB through tblite."""

    backend: Literal["xtb"]
    method: Literal["GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"] = "GFN2-xTB"
    accuracy: Positive = Field(1.0, description="tblite numerical accuracy (smaller is tighter).")
    electronic_temperature: Positive = Field(300.0, description="Fermi smearing temperature, K.")
    max_iterations: int = Field(250, ge=1, le=100_000, description="SCC iterations before the calculation fails.")
    executor: ExecutorConfig | None = Field(
        None, description="Run each calculation as a task through this executor; default: in the oracle's process."
    )
    retries: RetryConfig = Field(default_factory=RetryConfig)


class PyscfOracleConfig(_DftOracle):
    """Molecular DFT with PySCF (Kohn-Sham, analytic gradients)."""

    backend: Literal["pyscf"]
    functional: str = Field("PBE", min_length=1, description="Exchange-correlation functional as PySCF names it.")
    basis: str = Field("def2-SVP", min_length=1, description="Basis set as PySCF names it.")
    max_cycle: int = Field(100, ge=1, le=100_000, description="SCF iterations before the first retry.")
    conv_tol: Positive = Field(1e-9, description="SCF energy convergence, Hartree (PySCF's unit).")
    density_fit: bool = Field(False, description="Density fitting (faster, slightly less exact).")

    @field_validator("basis")
    @classmethod
    def _a_name_not_a_file(cls, basis: str) -> str:
        # PySCF reads a basis that names an existing file from that file.
        if "/" in basis or "\\" in basis:
            raise ValueError(f"{basis!r} must be a basis set name as PySCF knows it, not a path")
        return basis


class QeOracleConfig(_DftOracle):
    """Quantum ESPRESSO pw.x through ASE (periodic cells; energy, forces, stress)."""

    backend: Literal["qe"]
    profile: str = Field(
        "default",
        pattern=PROFILE_NAME,
        description="The oracle deployment's qe profile: how pw.x runs and where the UPF files are (the deployment "
        "file's qe.profiles; default: pw.x on PATH, UPF files where pw.x looks or Debian's pseudo dir).",
    )
    pseudopotentials: dict[str, str] = Field(
        description="Element symbol → UPF file name in the profile's pseudo_dir (a plain file name)."
    )
    ecutwfc_ry: Positive = Field(30.0, description="Wave-function cutoff, Ry (pw.x's unit).")
    ecutrho_ry: Positive | None = Field(None, description="Charge-density cutoff, Ry; default 4 × ecutwfc_ry.")
    kpoint_spacing: Positive = Field(
        0.25, description="Largest k-point spacing, Å⁻¹ with the 2π (as VASP's KSPACING); sets the Γ-centred grid."
    )
    electron_maxstep: int = Field(100, ge=1, le=100_000, description="SCF iterations before the first retry.")
    smearing: Literal["none", "gaussian", "marzari-vanderbilt", "fermi-dirac"] = "none"
    degauss_ry: Positive = Field(0.01, description="Smearing width, Ry.")

    @model_validator(mode="before")
    @classmethod
    def _no_deployment_settings(cls, data: Any) -> Any:
        return _refuse_deployment_settings(data, "qe", ("command", "pseudo_dir"))

    @field_validator("pseudopotentials")
    @classmethod
    def _plain_file_names(cls, pseudopotentials: dict[str, str]) -> dict[str, str]:
        for element, name in pseudopotentials.items():
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise ValueError(
                    f"{element}: {name!r} must be a plain file name (the directory is a deployment setting)"
                )
        return pseudopotentials


class VaspOracleConfig(_DftOracle):
    """VASP through ASE: writes INCAR/POSCAR/KPOINTS/POTCAR, runs `command`, parses vasprun.xml."""

    backend: Literal["vasp"]
    profile: str = Field(
        "default",
        pattern=PROFILE_NAME,
        description="The oracle deployment's vasp profile: how VASP runs and where the POTCARs are (the deployment "
        "file's vasp.profiles).",
    )
    xc: str = Field("PBE", description="Functional (ASE's xc names).")
    encut_ev: Positive = Field(520.0, description="Plane-wave cutoff, eV.")
    kpoint_spacing: Positive = Field(
        0.25, description="Largest k-point spacing, Å⁻¹ with the 2π (as VASP's KSPACING); sets the Γ-centred grid."
    )
    setups: dict[str, str] = Field(default_factory=dict, description="Element → POTCAR variant suffix, e.g. {Cl: ''}.")
    incar: dict[str, Any] = Field(default_factory=dict, description="Extra INCAR tags (ASE Vasp keywords).")

    @model_validator(mode="before")
    @classmethod
    def _no_deployment_settings(cls, data: Any) -> Any:
        return _refuse_deployment_settings(data, "vasp", ("command", "potcar_dir"))

    @field_validator("setups")
    @classmethod
    def _plain_setups(cls, setups: dict[str, str]) -> dict[str, str]:
        for element, suffix in setups.items():
            if "/" in suffix or ".." in suffix:
                raise ValueError(f"setup {element}: {suffix!r} must be a POTCAR variant suffix, not a path")
        return setups


# Structures per graph batch of the mace oracle backend unless a run or a user says otherwise.
DEFAULT_MACE_BATCH_SIZE = 32


class MaceOracleConfig(_Strict):
    """A MACE model or committee (mean and spread), e.g. the teacher or the fine-tuned committee."""

    backend: Literal["mace"]
    models: list[Path] = Field(
        default_factory=list, description="Model files; empty means the run's teacher (teacher.model)."
    )
    batch_size: int = Field(DEFAULT_MACE_BATCH_SIZE, ge=1, le=100_000, description="Structures per evaluation batch.")
    default_dtype: Literal["float64", "float32"] = "float64"
    threads: int = Field(
        1,
        ge=0,
        le=1024,
        description="Committee members evaluated at the same time, each in a thread of the oracle (with torch's "
        "threads, OMP_NUM_THREADS, per member): 1 one after the other, 0 one per core the oracle may run on, never "
        "more than the committee's size. For MD of many replicas while nothing else computes; a run asks for 0 in "
        "step 4's MD (39 SN2 replicas, a committee of 3 on 2 cores: 62 instead of 84 ms per step).",
    )
    device: DeviceSetting = Field(
        "auto",
        description="Where the models run: 'auto' (a CUDA GPU when the oracle process sees one, else the CPU), 'cpu' "
        "or 'cuda' (refused when the oracle sees no GPU). When the run itself asks the oracle for the teacher or "
        "the committee, mace_finetune.device is used instead.",
    )


class AceOracleConfig(_Strict):
    """An ACE potential (.yace), e.g. the run's base or final student; used for validation and MD."""

    backend: Literal["ace"]
    potential: Path = Field(description="The .yace file (or the .yaml B-basis, which active_set needs).")
    active_set: Path | None = Field(
        None,
        description="The potential's active set (.asi); with it the labels carry the per-atom extrapolation "
        "grade γ. Needs the .yaml potential.",
    )
    processes: int = Field(
        1,
        ge=0,
        le=1024,
        description="Processes that share a large batch (pyace runs on one core per process): 1 evaluates in "
        "the oracle's own process, 0 uses one per core the oracle may run on. For MD of many replicas while "
        "nothing else computes; a run asks for 0 in the student's MD (with γ, 2-3 ms per SN2 structure).",
    )


OracleConfig = Annotated[
    LjOracleConfig
    | XtbOracleConfig
    | PyscfOracleConfig
    | QeOracleConfig
    | VaspOracleConfig
    | MaceOracleConfig
    | AceOracleConfig,
    Field(discriminator="backend"),
]
ORACLE_OPTION_MODELS: dict[str, type[_Strict]] = {
    "lj": LjOracleConfig,
    "xtb": XtbOracleConfig,
    "pyscf": PyscfOracleConfig,
    "qe": QeOracleConfig,
    "vasp": VaspOracleConfig,
    "mace": MaceOracleConfig,
    "ace": AceOracleConfig,
}


class BudgetConfig(_Strict):
    """The DFT budget: every DFT call of the run counts (the isolated-atom energies, the DIRECT set, active
    learning, the hold-out and the profile points), each structure once, over all starts of the run."""

    max_dft_calls: int = Field(
        60,
        ge=0,
        le=10_000_000,
        description="Hard limit on DFT calls over the whole run. The sizes a config leaves at 0 are split from it: "
        "sampling.direct.n_select, validation.holdout_size, validation.profile's points and active_learning."
        "batch_size (70 calls, 3 elements: 3 + 24 DIRECT + 10 hold-out + 11 profile points + 22 for active "
        "learning, 7 per iteration); `pyacemaker config check` prints them and refuses given sizes that do not fit.",
    )


# Thermal rattles: per Cartesian component, σ = sqrt(k_B·T / k) with this stiffness, eV/Å² (between a soft
# bend and a C–H stretch: 0.05 Å at 300 K, 0.09 Å at 1000 K).
THERMAL_STIFFNESS_EV_PER_A2 = 10.0
# The thermal rattles reach this many times the highest temperature.
THERMAL_TEMPERATURE_MARGIN = 1.25


def thermal_rattle_amplitudes(temperatures: list[float]) -> list[float]:
    """Rattle amplitudes (Å) of the thermal displacements at the given temperatures and at
    THERMAL_TEMPERATURE_MARGIN × the highest, so the pool covers what MD at these temperatures visits without
    the harsh rattles that only make near-collisions."""
    from ase.units import kB  # Boltzmann's constant, eV/K (imported here: the CLI starts without ase)

    wanted = sorted({*temperatures, THERMAL_TEMPERATURE_MARGIN * max(temperatures)})
    return [round((kB * t / THERMAL_STIFFNESS_EV_PER_A2) ** 0.5, 4) for t in wanted]


class PoolConfig(_Strict):
    """Step 1a: candidate pool generation from the seeds."""

    rattle_amplitudes: Annotated[list[Positive], Field(max_length=1000)] | None = Field(
        None,
        description="Gaussian displacement amplitudes (per Cartesian component), Å; default: thermal ones, "
        "sqrt(k_B·T / 10 eV/Å²) at each md temperature and 1.25 × the highest.",
    )
    rattles_per_amplitude: int = Field(25, ge=0, le=100_000, description="Rattled copies per seed and amplitude.")
    max_strain: float = Field(0.03, ge=0, le=0.3, description="Largest strain component (periodic seeds).")
    strains_per_seed: int = Field(0, ge=0, le=100_000, description="Strained copies per periodic seed.")
    interpolation_images: int = Field(
        10, ge=0, le=100_000, description="Images between consecutive seeds with the same atoms."
    )
    interpolation_rattle: float = Field(0.05, ge=0, description="Rattle of interpolated images, Å.")
    fragment_rotations_per_seed: int = Field(
        10, ge=0, le=100_000, description="Copies per seed with one molecular fragment rotated about its centroid."
    )
    max_rotation_deg: float = Field(30.0, gt=0, le=180, description="Largest fragment rotation, degrees.")
    min_distance: Positive = Field(0.6, description="Candidates with a shorter interatomic distance are dropped, Å.")
    random_seed: int = Field(0, ge=0, le=MAX_SEED)

    def resolved(self, temperatures: list[float]) -> PoolConfig:
        """This section with thermal rattle amplitudes for `temperatures` (K) when none were given."""
        if self.rattle_amplitudes is not None:
            return self
        return self.model_copy(update={"rattle_amplitudes": thermal_rattle_amplitudes(temperatures)})


def _bootstrap_pool() -> PoolConfig:
    # The bundled teacher's spread: rattles from gentle to bond-straining, images along the path, turned fragments.
    return PoolConfig(
        rattle_amplitudes=[0.02, 0.05, 0.08, 0.12, 0.16],
        rattles_per_amplitude=20,
        interpolation_images=10,
        fragment_rotations_per_seed=10,
    )


class TeacherBootstrapConfig(_Strict):
    """A teacher trained by the run itself, before step 1, for elements that no available model knows: a small
    MACE (the bundled teacher's recipe) on a cheap level's labels of structures around the seeds (a pool like
    step 1's, plus MD at the cheap level along the md section's windows and temperatures)."""

    oracle: OracleConfig = Field(
        default_factory=lambda: XtbOracleConfig(backend="xtb"),
        description="The cheap level that labels the teacher's training set (default GFN2-xTB; any oracle backend).",
    )
    pool: PoolConfig = Field(
        default_factory=_bootstrap_pool, description="Structures around the seeds (as sampling.pool)."
    )
    md_steps: int = Field(
        2000, ge=0, le=10_000_000, description="Steps of MD at the cheap level from every seed (0: no MD)."
    )
    md_frames: int = Field(200, ge=0, le=1_000_000, description="Frames of that MD added to the training set.")
    md_replicas: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Replicas of that MD (per window when md.windows is set, as md.replicas); default: one per "
        "temperature of md.temperatures (per window), or one per seed and temperature without windows: enough "
        "for md_frames, where md.replicas (sized for step 4's thousands of frames) would cost ~5× more.",
    )
    max_epochs: int = Field(400, ge=1, le=100_000, description="Training epochs of the teacher.")
    max_force_ev_per_a: Positive = Field(
        10.0, description="Structures with a larger force component at the cheap level are left out, eV/Å."
    )
    random_seed: int = Field(0, ge=0, le=MAX_SEED)


class TeacherConfig(_Strict):
    """The MACE teacher that the ACE student is distilled from."""

    model: str = Field(
        "bundled",
        min_length=1,
        description="A MACE model file, a mace foundation-model name, or 'bundled' (the project's C/H/Cl teacher).",
    )
    bootstrap: TeacherBootstrapConfig | None = Field(
        None,
        description="Train the teacher in the run instead (for elements no model knows); excludes teacher.model.",
    )

    @model_validator(mode="after")
    def _one_teacher(self) -> TeacherConfig:
        # Not "model in model_fields_set": the config travels as JSON with every field written out.
        if self.bootstrap is not None and self.model != "bundled":
            raise ValueError(
                "teacher.model and teacher.bootstrap exclude each other: the bootstrapped teacher is the run's "
                "teacher; remove one of them"
            )
        return self

    @field_validator("model")
    @classmethod
    def _file_relative_to_config(cls, model: str, info: ValidationInfo) -> str:
        """A model file given by a relative path is taken relative to the config file's directory, like every
        path of the config (the orchestrator that opens it runs elsewhere); names stay names."""
        if is_model_name(model):
            return model
        context = info.context or {}
        path = Path(model).expanduser()
        if not path.is_absolute():
            path = (Path(context.get("base_dir", ".")) / path).resolve()
        if context.get("check_files") and not path.is_file():
            raise ValueError(
                f"not a model name ('bundled' or a mace foundation model) and no such file: {path}"
                + closest_model_name(model)
            )
        return str(path)


class DirectConfig(_Strict):
    """Step 1b: DIRECT selection (Qi et al., npj Comput. Mater. 2024)."""

    n_select: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="Exactly this many structures are selected (and labelled by DFT in iteration 1); 0: derived "
        "from the budget, 35 % of budget.max_dft_calls (24 of 70), at least 2.",
    )
    k_per_cluster: int = Field(1, ge=1, le=100_000, description="Structures taken from each BIRCH cluster.")
    featuriser: Literal["auto", "distribution", "oracle"] = Field(
        "auto",
        description="'distribution': radial/angular distribution histograms (invariant, cheap); 'oracle': the MACE "
        "teacher's invariant descriptors from the mace oracle's Describe; 'auto': 'oracle' when the oracle serves "
        "the mace backend, else 'distribution'.",
    )
    coverage_bins: int = Field(20, ge=2, le=10_000, description="Histogram bins per principal component for coverage.")
    random_seed: int = Field(0, ge=0, le=MAX_SEED)


class SamplingConfig(_Strict):
    """Step 1: a candidate pool around the seeds, and the DIRECT selection from it that DFT labels first."""

    pool: PoolConfig = Field(default_factory=PoolConfig)
    direct: DirectConfig = Field(default_factory=DirectConfig)


class ActiveLearningConfig(_Strict):
    """Step 2: committee uncertainty → the most uncertain, diverse candidates go to DFT, within the budget."""

    committee_size: int = Field(3, ge=2, le=64, description="Committee members fine-tuned from the teacher.")
    batch_size: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Structures sent to DFT per active-learning iteration at most; 0: derived from the budget, what "
        "is left after the isolated-atom energies, the DIRECT set and the validation's labels, divided over "
        "validation.max_iterations (70 calls, 3 elements, 24 + 10 + 11: 22 left, 7 per iteration), at least 1.",
    )
    force_error_threshold: Positive = Field(
        0.1, description="Candidates whose calibrated max force error exceeds this are labelled, eV/Å."
    )
    diversity_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="A candidate closer than this fraction of the median pairwise feature distance to one "
        "already chosen or labelled is skipped (near-duplicate guard).",
    )
    max_candidate_force: Positive = Field(
        10.0,
        description="Candidates whose committee-mean largest atomic force exceeds this are not sent to DFT, eV/Å: "
        "near-collision geometries that the dynamics never visits (their spread is large only because their "
        "forces are). When MD frames are among the candidates (see md_candidate_steps), the cap falls to the "
        "largest force among them if that is lower. DFT-labelled structures whose largest force exceeds this are "
        "charged but not trained on. Before DIRECT, pool structures whose teacher force exceeds 0.8 × this are "
        "dropped (a cheaper teacher's forces fall short of DFT's on compressed bonds).",
    )
    finetune_epochs: int = Field(20, ge=1, le=100_000, description="Epochs of each committee member's fine-tuning.")
    md_candidate_steps: int = Field(
        0,
        ge=0,
        le=100_000_000,
        description="Iteration 1 has no MD frames to score yet: when > 0, step 2 runs this many steps of the md "
        "section's MD (windows, temperatures, replicas) with the teacher, and the frames join the pool as "
        "candidates (later iterations score the previous step 4's frames either way). 0: the pool alone. Off by "
        "default: on the B3LYP SN2 flagship (one run each) it gave better hold-out forces (84 vs 92 meV/Å) but "
        "worse energies (9.3 vs 6.7 meV/atom) and barrier.",
    )
    random_seed: int = Field(0, ge=0, le=MAX_SEED)


class _DistanceDifferenceRange(_Strict):
    """Points along ξ = d(a, b) − d(b, c) (the SN2 reaction coordinate), evenly spaced from start to stop."""

    atoms: tuple[int, int, int] = Field(description="0-based indices a, b, c (SN2: Cl1, C, Cl2 = 4, 0, 5).")
    start: float = Field(ge=-1000, le=1000, description="ξ of the first point, Å.")
    stop: float = Field(ge=-1000, le=1000, description="ξ of the last point, Å.")
    count: int = Field(13, ge=1, le=10_000, description="Points, evenly spaced from start to stop.")

    @field_validator("atoms")
    @classmethod
    def _distinct(cls, atoms: tuple[int, int, int]) -> tuple[int, int, int]:
        if len(set(atoms)) != 3 or min(atoms) < 0:
            raise ValueError(f"need three distinct non-negative atom indices, got {list(atoms)}")
        return atoms

    def centers(self) -> list[float]:
        if self.count == 1:
            return [self.start]
        return [self.start + (self.stop - self.start) * i / (self.count - 1) for i in range(self.count)]


class MdWindowsConfig(_DistanceDifferenceRange):
    """Restraint windows along ξ with a harmonic bias ½ k (ξ − ξ₀)² on top of the oracle's forces; the window
    centres ξ₀ run from `start` to `stop`, and every window runs md.replicas replicas."""

    force_constant: Positive = Field(5.0, description="k of the harmonic bias, eV/Å².")


class MdConfig(_Strict):
    """Step 4 (surrogate MD): replicas driven by the fine-tuned committee through the oracle, Langevin NVT (NPT
    for periodic cells when pressure_gpa is set), optional restraint windows, then frame selection."""

    temperatures: list[Annotated[float, Field(gt=0, le=100_000)]] = Field(
        default_factory=lambda: [300.0, 600.0, 1000.0],
        min_length=1,
        max_length=10_000,
        description="Thermostat temperatures, K; replicas are spread over them.",
    )
    timestep_fs: Positive = Field(0.5, le=100, description="Time step, fs.")
    steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000_000,
        description="MD steps per replica; default: enough for the trajectories to save twice md.n_frames frames "
        "(at least 500).",
    )
    replicas: int = Field(16, ge=1, le=100_000, description="Replicas (per restraint window when windows are set).")
    save_interval: int = Field(10, ge=1, le=1_000_000, description="A frame is kept every save_interval steps.")
    friction_per_fs: Positive = Field(0.01, description="Langevin friction, 1/fs (0.01: a 100 fs memory).")
    pressure_gpa: float | None = Field(
        None, ge=-1000, le=1000, description="NPT target pressure for periodic cells, GPa; null: NVT."
    )
    barostat_time_fs: Positive = Field(1000.0, description="Barostat relaxation time (NPT), fs.")
    compressibility_per_gpa: Positive = Field(
        0.01, description="Compressibility the barostat assumes (NPT), 1/GPa; only sets the volume response rate."
    )
    min_distance: Positive = Field(
        0.5, description="A replica whose smallest interatomic distance drops below this is stopped, Å."
    )
    max_force_std: Positive = Field(
        1.0, description="A replica whose committee max force std exceeds this is stopped, eV/Å."
    )
    windows: MdWindowsConfig | None = Field(
        None,
        description="Restraint windows along ξ; null: plain MD. When absent and the first and the last seed differ "
        "in which bond is formed, derived from them as `pyacemaker seeds` does: ξ's atoms from the bond that breaks "
        "and the one that forms, 0.3 Å beyond both seeds' ξ rounded outwards to 0.1 Å, a window every 0.25 Å.",
    )
    n_frames: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="Frames kept for the surrogate set (fewer if MD saved fewer); default: 50 per DFT call of the "
        "budget, between 500 and 20000 (the surrogate set should dwarf the DFT set it is corrected with).",
    )
    frame_selection: Literal["stride", "direct"] = Field(
        "stride",
        description="'stride': evenly spaced frames of every trajectory (decorrelation); 'direct': DIRECT on the "
        "frames' distribution features.",
    )
    random_seed: int = Field(0, ge=0, le=MAX_SEED)

    def resolved(self, max_dft_calls: int) -> MdConfig:
        """This section with the budget-derived defaults (n_frames, steps) filled in."""
        n_frames = self.n_frames or min(20000, max(500, 50 * max_dft_calls))
        trajectories = self.replicas * (self.windows.count if self.windows is not None else 1)
        steps = self.steps or max(500, self.save_interval * -(-2 * n_frames // trajectories))
        return self.model_copy(update={"n_frames": n_frames, "steps": steps})


class MaceFinetuneConfig(_Strict):
    """Step 3: the teacher fine-tuned on every DFT label so far (a committee of active_learning.committee_size,
    which drives MD in step 4, labels the surrogate set in step 5 and scores the next iteration's candidates)."""

    epochs: int = Field(40, ge=1, le=100_000, description="Epochs of each committee member's fine-tuning.")
    stress_weight: float = Field(
        10.0,
        ge=0,
        le=1e6,
        description="Weight of the stress term in mace's loss (stress in eV/Å³; energy per atom weighs 1, forces "
        "mace's 100) when the DFT set holds periodic cells with a stress, for this step's and step 2's committee; "
        "0: stress not fitted. A set without periodic cells (molecules) is fitted the same whatever the value. "
        "Measured on the Si example's 9 DFT cells (8 epochs): up to 100 the committee's bulk modulus did not move "
        "(78-85 GPa against QE's 93); 300-1000 gave 98-99 GPa but a lattice constant 0.7 % short (QE's 18 Ry "
        "stresses vanish 0.4 % short of its E(V) minimum) and hold-out energies 30-40 % worse.",
    )
    random_seed: int = Field(1, ge=0, le=MAX_SEED)
    device: DeviceSetting = Field(
        "auto",
        description="Where the run's MACE work runs: the committee's fine-tuning (this step's and step 2's, in the "
        "trainer's worker) and every evaluation of the teacher and the committee (through the oracle: the pool's "
        "forces and descriptors, candidate scoring, the surrogate MD and labels, validation). One key for both: "
        "they are the same models on the same machines' hardware. 'auto': a CUDA GPU when the process doing the "
        "work sees one (torch.cuda.is_available()), else the CPU, decided by that process; 'cpu'; 'cuda': refused "
        "by a trainer or oracle that sees no GPU, naming this key. Results on a GPU differ from the CPU's in the "
        "last digits only; changing it does not redo finished steps.",
    )
    extra_args: dict[str, bool | int | float | str] = Field(
        default_factory=dict,
        description="mace's own training options for the committee's fine-tuning (this step's and step 2's), as "
        "mace_run_train's --key=value without the dashes, e.g. {lr: 0.005, batch_size: 4, weight_decay: 1e-6}; "
        "true/false turn one of mace's flags (ema, swa) on or off. They override the fine-tuning's own choices "
        "(lr 0.01, amsgrad, ema with decay 0.99, float64, batch sizes min(10, frames/4)). Checked with the "
        "installed mace's argument parser by `config check` (where mace is installed) and by the trainer; options "
        "the pipeline sets itself (train_file, model_dir, device, seed, name, E0s, max_num_epochs, stress_weight, "
        "...) are refused with the reason.",
    )

    @field_validator("extra_args")
    @classmethod
    def _not_reserved(cls, extra_args: dict[str, Any]) -> dict[str, Any]:
        """Names only (mace's parser checks the values where mace is installed: cli.preflight, the trainer)."""
        for key in extra_args:
            problem = name_problem(key)
            if problem is not None:  # a strict_type error: its context names the key (format_validation_error)
                raise PydanticCustomError("strict_type", "{problem}", {"key": key, "problem": problem})
        return extra_args

    def key_material(self) -> dict[str, Any]:
        """What changes the fine-tuned models: every setting but the device; extra_args only when given, so that
        configs written before it existed keep their steps' keys."""
        return self.model_dump(mode="json", exclude={"device"} | (set() if self.extra_args else {"extra_args"}))


class SurrogateLabellingConfig(_Strict):
    """Step 5: the surrogate MD frames labelled by the fine-tuned committee through the oracle, streamed into
    extxyz shards (energy, forces, stress for periodic cells, committee spread in each frame's info)."""

    shard_size: int = Field(
        5000,
        ge=1,
        le=100_000_000,
        description="Frames per extxyz shard; a restarted step resumes after the last complete shard.",
    )
    batch_size: int = Field(
        64, ge=1, le=100_000, description="Structures per oracle request and per MACE evaluation batch."
    )


class AceConfig(_Strict):
    """Steps 6 (base ACE on the surrogate set) and 7 (delta learning on the DFT set)."""

    model_kind: Literal["linear", "nonlinear"] = Field(
        "linear",
        description="linear: pyace ridge fit (no TensorFlow); nonlinear: pacemaker, which needs TensorFlow, not "
        "installed by `make install` nor by any extra of this package (`pyacemaker config check` prints the command "
        "that installs it).",
    )
    cutoff: float = Field(0.0, ge=0, le=100, description="Radial cutoff, Å; 0 infers it from the elements.")
    basis_size: int = Field(
        0, ge=0, le=10_000_000, description="Target basis functions; 0 infers it from the data size."
    )
    delta_surrogate_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the surrogate (anchor) block relative to the DFT block in delta learning; 0 "
        "chooses it by cross-validation from 1, 3, 10 (never weaker than the DFT block: weaker anchors cost molecular "
        "MD runs). Where the teacher is off everywhere (a bulk with the wrong lattice constant), a weak anchor such as "
        "0.1 lets the correction reach the whole surrogate region.",
    )
    core_repulsion: bool = Field(
        True,
        description="Linear ACE: below the shortest distance of each element pair in the training data, switch "
        "the fitted part off and a core repulsion on (bounded extrapolation; carried by the .yace).",
    )
    stress_weight: float = Field(
        0.01,
        ge=0,
        le=1e6,
        description="Linear ACE, steps 6 and 7: weight of the stress rows (the strain derivative of the energy per "
        "atom, V·σ/N in eV/atom, 6 per frame) of periodic frames with a stress label, next to the energy and force "
        "terms whose weights sum to 1; 0: stress not fitted. Molecules have no stress rows: their fit is the same "
        "whatever the value. Measured on the Si example's quick run (QE at 18 Ry): the final ACE's bulk modulus was "
        "81 GPa without stress, 92-93 with 0.01 and 96 with 0.1 (QE's E(V): 93), its hold-out energy RMSE 4.5, 7-8 "
        "and 17 meV/atom. A DFT level whose stress disagrees with its own E(V) (an incomplete plane-wave basis: Pulay "
        "stress) pulls the lattice constant towards its zero-stress one as the weight grows. The nonlinear "
        "(pacemaker) fit has no stress term.",
    )
    random_seed: int = Field(0, ge=0, le=MAX_SEED)


class StudentRefinementConfig(_Strict):
    """Step 6b, between the base fit and delta learning: the base ACE runs MD itself (plain and in the md
    section's restraint windows, at md.temperatures plus one hotter by temperature_margin) with its
    extrapolation grade γ watched; frames above gamma_threshold, and the structures where a replica ran off
    (γ above stop_gamma, or atoms closer than md.min_distance), are labelled by the fine-tuned committee and
    added to the surrogate set, and the base is refitted, until the student's MD stays below the threshold or
    max_rounds refits are done."""

    enabled: bool = Field(True, description="Run the refinement (false: step 7 corrects the base of step 6).")
    max_rounds: int = Field(3, ge=1, le=100, description="Refits at most.")
    final_check: bool = Field(
        True,
        description="After the last refit, one more round of the student's MD that only records its γ (nothing is "
        "labelled or refitted; validation's MD stability tests the final ACE either way).",
    )
    gamma_threshold: Positive = Field(
        3.0, description="Frames whose largest per-atom γ exceeds this are labelled and added (1: the data's span)."
    )
    stop_gamma: Positive = Field(
        30.0, description="A replica whose γ exceeds this stops there (the structure is labelled too)."
    )
    steps: int = Field(400, ge=1, le=10_000_000, description="MD steps per replica and round.")
    save_interval: int = Field(
        5, ge=1, le=10_000_000, description="γ is read on every step; a frame is kept every this many."
    )
    temperature_margin: float = Field(
        1.25, ge=1.0, le=10.0, description="One more temperature, this factor above the highest of md.temperatures."
    )
    max_frames_per_round: int = Field(
        200, ge=1, le=10_000_000, description="Frames labelled and added per round at most."
    )
    window_replicas: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Replicas per restraint window; 0: one per temperature. Fewer run the hottest temperatures.",
    )
    refit_ridge: Literal["base", "cross_validation"] = Field(
        "base",
        description="The ridge strength λ of the refits: 'base' keeps the one cross-validation chose for the base "
        "fit (a refit adds a few percent of frames to the same basis), 'cross_validation' chooses it again for "
        "every refit (one eigendecomposition per fold: 13 of a flagship refit's 30 s).",
    )
    random_seed: int = Field(0, ge=0, le=MAX_SEED)

    @property
    def most_rounds(self) -> int:
        """Rounds of the student's MD at most: one per refit, and the check round after them."""
        return self.max_rounds + int(self.final_check)

    @model_validator(mode="after")
    def _stop_above_threshold(self) -> StudentRefinementConfig:
        if self.stop_gamma <= self.gamma_threshold:
            raise ValueError(
                f"stop_gamma ({self.stop_gamma}) must exceed gamma_threshold ({self.gamma_threshold}): a replica "
                "must be able to visit frames worth labelling before it stops"
            )
        return self


class ReactionPathConfig(_DistanceDifferenceRange):
    """An energy profile along ξ: a relaxed scan with the fine-tuned committee, then DFT, the teacher and both
    ACEs on the same geometries (the DFT points are charged to the budget, once)."""

    count: int = Field(11, ge=3, le=10_000, description="Points, evenly spaced from start to stop.")


class MdStabilityConfig(_Strict):
    """MD with the final ACE from every seed at each temperature: a replica survives when no atom pair comes
    closer than min_distance, every energy is finite, no atom moves faster between saved frames than thermal
    motion at the run's temperature allows (a blow-up), and a system that falls apart (an atom farther than
    max_neighbour_distance from every other) splits only into fragments the seeds hold (Cl⁻ leaving CH3Cl is a
    dissociation, noted in the record; a lone H is a loss). An iteration whose final ACE loses a replica is never
    the run's best and never meets the target."""

    steps: int = Field(2000, ge=0, description="Steps of each run (0: no stability test).")
    temperatures: list[Positive] | None = Field(
        None, description="Thermostat temperatures, K; default: md.temperatures."
    )
    runs_per_seed: int = Field(1, ge=1, description="Runs per seed and temperature (each its own random seed).")
    min_distance: Positive = Field(0.5, description="Closest approach of two atoms a survivor never goes below, Å.")
    max_neighbour_distance: Positive = Field(
        8.0,
        description="An atom farther than this from every other means the system fell apart: it survives only as "
        "fragments the seeds hold, Å.",
    )


class ValidationConfig(_Strict):
    """The loop's judge: the final ACE against DFT labels of structures it never saw, once per iteration."""

    holdout_size: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Structures labelled by DFT as the hold-out set (charged to the budget): surrogate-MD frames "
        "and, external_fraction of them, frames of an MD the pipeline does not fit to; 0: derived from the budget, "
        "budget.max_dft_calls / 7 rounded, between 2 and 20 (10 of 70).",
    )
    external_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the hold-out drawn from an independent MD: the teacher (not the fine-tuned "
        "committee) along the restraint windows' ξ range, another random seed, up to 1.25 × the highest md "
        "temperature.",
    )
    md_stability: MdStabilityConfig = Field(default_factory=MdStabilityConfig)
    target_energy_mev_per_atom: Positive = Field(5.0, description="Target energy RMSE on the hold-out, meV/atom.")
    target_forces_mev_per_a: Positive = Field(100.0, description="Target force RMSE on the hold-out, meV/Å.")
    max_iterations: int = Field(3, ge=1, le=1000, description="Active-learning iterations (steps 2-7) at most.")
    profile: ReactionPathConfig | None = Field(
        None,
        description="Energy profile along a reaction coordinate; when absent and the first and the last seed differ "
        "in which bond is formed, derived from them like md.windows, with budget.max_dft_calls / 6 points (odd, "
        "5 to 11; 11 of 70). null: no profile.",
    )
    random_seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("holdout_size")
    @classmethod
    def _holdout_of_two(cls, size: int) -> int:
        if size == 1:
            raise ValueError("a hold-out needs at least 2 structures (0: derived from the budget)")
        return size

    def dft_labels(self) -> int:
        """DFT calls the validation charges to the budget (once, in iteration 1): the hold-out and the profile
        points. Active learning keeps them free until then."""
        return self.holdout_size + (self.profile.count if self.profile is not None else 0)


class TrainerConfig(_Strict):
    """Where the trainer runs this run's training jobs."""

    executor: str | None = Field(
        None,
        pattern=PROFILE_NAME,
        description="An executor profile of the trainer's deployment file: 'local' (a worker process on the "
        "trainer's host) or a name its `executors` define (a Slurm/PBS job with the partition, resources, job "
        "template and Apptainer image set there); default: the deployment's default_executor ('local' without one).",
    )
    fit_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="CPU threads of each linear ACE fit (base, refits, delta: the BLAS of their normal equations); "
        "0: every core the trainer's worker may run on. The pipeline runs these fits while nothing else computes; "
        "set a number when other work shares the trainer's machine.",
    )

    @model_validator(mode="before")
    @classmethod
    def _profile_name_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("executor"), dict):
            problem = (
                "give the name of an executor profile of the trainer's deployment file, e.g. `executor: gpu`; the "
                "scheduler and its settings (kind, partition, time limit, template, image) are set there, under "
                "executors.<name> (python -m pyacemaker.services.trainer --deployment FILE; see docs/deployment.md)"
            )
            raise PydanticCustomError("strict_type", "{problem}", {"key": "executor", "problem": problem})
        return data


class RunConfig(_Strict):
    """A PyAceMaker run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name (letters, digits, _.-).")
    run_dir: Path | None = Field(None, description="Where outputs go; default runs/<name> beside the config.")
    system: SystemConfig
    oracle: OracleConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    active_learning: ActiveLearningConfig = Field(default_factory=ActiveLearningConfig)
    md: MdConfig = Field(default_factory=MdConfig)
    mace_finetune: MaceFinetuneConfig = Field(default_factory=MaceFinetuneConfig)
    surrogate_labelling: SurrogateLabellingConfig = Field(default_factory=SurrogateLabellingConfig)
    ace: AceConfig = Field(default_factory=AceConfig)
    student_refinement: StudentRefinementConfig = Field(default_factory=StudentRefinementConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    stop_after: str | None = Field(
        None,
        description="End the run after this step of the first iteration (default: run to the end): one of "
        + ", ".join(name for name in STEP_DIRS if name != StepName.VALIDATION)
        + ".",
    )

    @field_validator("stop_after")
    @classmethod
    def _a_step_name(cls, name: str | None) -> str | None:
        # After the validation an iteration is over anyway: max_iterations says how many.
        steps = [step for step in STEP_DIRS if step != StepName.VALIDATION]
        if name is not None and name not in steps:
            raise ValueError(f"{name!r} is not a step; use one of {', '.join(steps)}")
        return name


def _loc_path(loc: tuple[Any, ...], data: Any) -> str:
    """Dotted key path of a pydantic error location, dropping union tags that are not keys of the input."""
    parts: list[str] = []
    current = data
    for i, element in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(current, dict) and element in current:
            current = current[element]
            parts.append(str(element))
        elif isinstance(current, list) and isinstance(element, int) and element < len(current):
            current = current[element]
            parts.append(str(element))
        elif last or not isinstance(current, dict):
            parts.append(str(element))
    return ".".join(parts) or "<root>"


def format_validation_error(exc: ValidationError, data: Any, source: str) -> str:
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        loc = tuple(error["loc"])
        if error["type"] == "strict_type":  # raised for a whole section; the context names the key
            loc = (*loc, error["ctx"]["key"])
        key = _loc_path(loc, data)
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in error and not isinstance(error["input"], dict | list) and error["type"] != "missing":
            message = f"{message} (got {error['input']!r})"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, base_dir: Path, source: str = "config", check_files: bool = False) -> RunConfig:
    """Validate a config mapping; relative paths are taken relative to `base_dir`. With `check_files`, the input
    files it names (teacher model, oracle models/potential, job template) must exist here."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys, got {type(data).__name__}")
    try:
        config = RunConfig.model_validate(data, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, source)) from None
    if config.run_dir is None:
        return config.model_copy(update={"run_dir": (base_dir / "runs" / config.name).resolve()})
    if not config.run_dir.is_absolute():
        return config.model_copy(update={"run_dir": (base_dir / config.run_dir).resolve()})
    return config


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config; raises ConfigError with one line per problem."""
    path = Path(path)
    try:
        data = load_yaml_file(path)
    except YamlInputError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(data, path.parent.resolve(), source=str(path), check_files=True)


def config_to_json(config: RunConfig) -> str:
    return config.model_dump_json()


def config_from_json(text: str) -> RunConfig:
    """The orchestrator's side: the client already resolved paths, so they are absolute here."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"config: not valid JSON ({type(exc).__name__})") from None
    return parse_config(data, Path("/"), source="config")


def json_schema() -> dict[str, Any]:
    return RunConfig.model_json_schema()
