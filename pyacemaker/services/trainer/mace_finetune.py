"""Step 3: fine-tune the MACE teacher on the DFT set, K committee members with different seeds and bootstrap
subsets, through mace's own training entry point (`mace.cli.run_train`, run in the worker process).

Reference energies. Naive fine-tuning (`--foundation_model=... --multiheads_finetuning=False`) keeps the
teacher's atomic energies E0 whatever `--E0s` says (measured): a model fine-tuned on
labels of another level would start off by the whole difference of the isolated-atom energies, thousands of
eV, and diverge. So the targets are moved onto the teacher's reference,

    E_target = E_label − Σ E0_label + Σ E0_teacher,

training runs with the teacher's E0s, and afterwards the model's E0 buffer is set to the labels' E0s. That
buffer is added per atom to the interaction energy, so the saved model predicts E_label directly: the
conversion back is part of the model file, no caller has to remember it. Without `e0s` in the spec the
labels are taken to be on the teacher's reference already.

Multihead replay fine-tuning (option) adds mace's pretraining head trained on replay data the run already
has (teacher-labelled frames, e.g. the DIRECT pool), which keeps the model close to the teacher elsewhere.

Stress: when the training frames include periodic cells with a stress label, mace fits it too (`--loss=stress`,
whose energy and force terms are those of mace's default loss, plus `stress_weight` × the mean squared stress
error in eV/Å³; frames without a stress weigh 0 in that term). The stress goes to mace as `REF_stress`; moving
the energies onto the teacher's reference leaves it unchanged (a constant per atom has no strain derivative).

Device and mace's options: the spec's `device` (auto | cpu | cuda) is resolved here, in the worker that trains
(pyacemaker.torch_device), and used for the training and for the evaluations around it. The spec's `extra_args`
are mace's own training options over this module's defaults (pyacemaker.mace_options.FINETUNE_DEFAULTS and the
batch sizes); StartJob refuses options the trainer sets itself, and the worker checks every value with mace's
parser before it reads the data.

Checkpoints: each member trains in its own directory; mace saves a checkpoint whenever the validation loss
improves. A resumed job skips finished members and continues the current one with `--restart_latest`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.mace_options import FINETUNE_DEFAULTS, name_problem, option_arguments, value_problem
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer.datasets import (
    artifact_paths,
    check_finite,
    e0s_by_number,
    elements_of,
    energy_of,
    forces_of,
    load_labelled,
    reference_energy,
    require_e0s,
    shard_paths,
    stress_of,
)
from pyacemaker.services.trainer.progress import ProgressWriter
from pyacemaker.services.trainer.results import JobResult
from pyacemaker.structures import write_extxyz
from pyacemaker.torch_device import DEVICE_SETTINGS, resolve_device
from pyacemaker.v1 import trainer_pb2

log = logging.getLogger(__name__)

DEFAULT_COMMITTEE_SIZE = 3
DEFAULT_MAX_EPOCHS = 50
ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"
STRESS_KEY = "REF_stress"
# Weight of the stress term in mace's loss when the spec leaves it unset (energy per atom weighs 1, forces
# mace's 100); stress in eV/Å³.
DEFAULT_STRESS_WEIGHT = 10.0
DEFAULT_HEAD = "Default"


def model_head_index(model: Any) -> int:
    """Row of the fine-tuned head in a (possibly multi-head) model: "Default", else the last head."""
    heads = list(getattr(model, "heads", None) or [DEFAULT_HEAD])
    return heads.index(DEFAULT_HEAD) if DEFAULT_HEAD in heads else len(heads) - 1


def load_model(path: Path) -> Any:
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=False)


def model_atomic_energies(model: Any) -> dict[int, float]:
    """The E0s (eV) the model adds per atom, by atomic number, for its fine-tuned head."""
    energies = model.atomic_energies_fn.atomic_energies.detach().cpu().numpy()
    energies = energies.reshape(-1, len(model.atomic_numbers))[model_head_index(model)]
    return {int(z): float(e) for z, e in zip(model.atomic_numbers.tolist(), energies, strict=True)}


def set_model_atomic_energies(model: Any, e0s: dict[int, float]) -> None:
    """Overwrite the fine-tuned head's E0s; elements not in `e0s` keep theirs."""
    import torch

    buffer = model.atomic_energies_fn.atomic_energies
    row = model_head_index(model)
    with torch.no_grad():
        view = buffer.view(-1, len(model.atomic_numbers))
        for column, z in enumerate(model.atomic_numbers.tolist()):
            if int(z) in e0s:
                view[row, column] = float(e0s[int(z)])


def frames_on_teacher_reference(
    frames: Sequence[Atoms], label_e0s: dict[int, float], teacher_e0s: dict[int, float]
) -> list[Atoms]:
    """Copies with REF_energy = E − Σ E0_label + Σ E0_teacher, REF_forces and, for a cell periodic in 3D with a
    stress label, REF_stress (eV/Å³, Voigt order of ASE), as mace reads them."""
    moved = []
    for atoms in frames:
        copy = atoms.copy()
        copy.calc = None
        energy = energy_of(atoms)
        if label_e0s:
            energy += reference_energy(atoms, teacher_e0s) - reference_energy(atoms, label_e0s)
        copy.info[ENERGY_KEY] = energy
        copy.arrays[FORCES_KEY] = forces_of(atoms)
        stress = stress_of(atoms)
        if stress is not None:
            copy.info[STRESS_KEY] = stress
        moved.append(copy)
    return moved


def aligned_reference_energies(
    teacher_energies: Sequence[float], frames: Sequence[Atoms], teacher_e0s: dict[int, float]
) -> dict[int, float]:
    """Per-element reference energies E0_teacher + δ_Z that put the labels on the teacher's footing, δ_Z fitted by
    least squares to E_label − E_teacher over the training frames (minimum norm when the compositions cannot
    tell the elements apart; then it is one constant per structure).

    Why: another level of theory differs from the teacher's by a large, nearly constant amount per atom (GFN2-xTB
    vs B3LYP binding energies: ~1 eV/atom for SN2). Left in the targets, that constant dominates the loss of a
    brief fine-tuning and wrecks the forces; removed here and restored through the model's E0s afterwards, the
    fine-tuning only has to learn the shape of the difference."""
    elements = sorted(teacher_e0s)
    counts = np.array([[np.count_nonzero(a.numbers == z) for z in elements] for a in frames], dtype=float)
    residuals = np.array([energy_of(a) for a in frames]) - np.asarray(teacher_energies, dtype=float)
    deltas, *_ = np.linalg.lstsq(counts, residuals, rcond=None)
    return {z: teacher_e0s[z] + float(d) for z, d in zip(elements, deltas, strict=True)}


def bootstrap(n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bootstrap sample (n draws with replacement) and its out-of-bag frames."""
    drawn = np.random.default_rng(seed).integers(0, n_frames, size=n_frames)
    out_of_bag = np.setdiff1d(np.arange(n_frames), drawn)
    return np.sort(drawn), out_of_bag


@dataclass
class FinetuneSettings:
    foundation_model: Path
    committee_size: int
    seed: int
    max_epochs: int
    multihead_replay: bool
    energy_weight: float
    forces_weight: float
    stress_weight: float = 0.0
    # A resolved torch device ("cpu" or "cuda") and mace options (text values) over the defaults.
    device: str = "cpu"
    extra_args: dict[str, str] = field(default_factory=dict)


def mace_arguments(
    settings: FinetuneSettings,
    member_dir: Path,
    name: str,
    seed: int,
    train_file: Path,
    valid_file: Path | None,
    teacher_e0s: dict[int, float],
    n_train: int,
    replay_file: Path | None,
    n_replay: int,
    resume: bool,
    with_stress: bool = False,
) -> list[str]:
    """mace's command line for one member; with `with_stress` (the training frames hold stress labels) and a
    positive `settings.stress_weight`, the loss with a stress term (module docstring). The tunable options
    (learning rate, batch sizes, EMA, loss weights, ...) are the defaults overridden by `settings.extra_args`."""
    batch_size = str(max(1, min(10, n_train // 4)))
    tunable = {**FINETUNE_DEFAULTS, "batch_size": batch_size, "valid_batch_size": batch_size}
    if settings.energy_weight > 0:
        tunable["energy_weight"] = repr(settings.energy_weight)
    if settings.forces_weight > 0:
        tunable["forces_weight"] = repr(settings.forces_weight)
    arguments = [
        f"--name={name}",
        f"--seed={seed}",
        f"--work_dir={member_dir}",
        f"--train_file={train_file}",
        f"--foundation_model={settings.foundation_model}",
        "--E0s={" + ", ".join(f"{z}: {e!r}" for z, e in sorted(teacher_e0s.items())) + "}",
        f"--energy_key={ENERGY_KEY}",
        f"--forces_key={FORCES_KEY}",
        f"--max_num_epochs={settings.max_epochs}",
        f"--device={settings.device}",
        "--save_cpu",
        *option_arguments(tunable, settings.extra_args),
    ]
    arguments.append(f"--valid_file={valid_file}" if valid_file is not None else "--valid_fraction=0.1")
    if with_stress and settings.stress_weight > 0:
        arguments += [
            "--loss=stress",
            f"--stress_weight={settings.stress_weight}",
            f"--stress_key={STRESS_KEY}",
            "--compute_stress=True",
        ]
    if settings.multihead_replay and replay_file is not None:
        arguments += [
            "--multiheads_finetuning=True",
            f"--pt_train_file={replay_file}",
            f"--num_samples_pt={n_replay}",
            "--subselect_pt=random",
        ]
    else:
        arguments.append("--multiheads_finetuning=False")
    if resume:
        arguments.append("--restart_latest")
    return arguments


class MetricsTail:
    """Follows mace's per-epoch results file (JSON lines) and turns its evaluations into progress lines."""

    def __init__(self, path: Path, member: int, progress: ProgressWriter | None) -> None:
        self.path = path
        self.member = member
        self.progress = progress
        self.iterations = 0
        self.last: dict[str, Any] | None = None
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if path.exists():  # a resumed member: count earlier steps, report only new evaluations
            for line in path.read_text().splitlines():
                if '"mode": "opt"' in line:
                    self.iterations += 1
            self._offset = path.stat().st_size

    def __enter__(self) -> MetricsTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for raw in chunk[: end + 1].splitlines():
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if record.get("mode") == "opt":
                self.iterations += 1
            elif record.get("mode") == "eval" and record.get("epoch") is not None:
                if record.get("head", DEFAULT_HEAD) != DEFAULT_HEAD:
                    continue
                self.last = record
                if self.progress is not None:
                    self.progress.training(
                        epoch=int(record["epoch"]),
                        iteration=self.iterations,
                        loss=float(record.get("loss", float("nan"))),
                        energy_rmse=float(record.get("rmse_e_per_atom", float("nan"))),
                        forces_rmse=float(record.get("rmse_f", float("nan"))),
                        member=self.member,
                    )


def run_mace_training(arguments: list[str]) -> None:
    """mace's training entry point on an argument list, in this process. mace adds its log handlers to the
    root logger on every call; they are removed again so members do not log into each other's files."""
    from mace.cli.run_train import run
    from mace.tools import build_default_arg_parser

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        run(build_default_arg_parser().parse_args(arguments))
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def member_seed(seed: int, member: int) -> int:
    return int(seed) * 1000 + member + 1


def finetune_committee(
    settings: FinetuneSettings,
    train: Sequence[Atoms],
    validation: Sequence[Atoms],
    replay: Sequence[Atoms],
    work_dir: Path,
    progress: ProgressWriter | None = None,
    resume: bool = False,
) -> tuple[list[Path], dict[str, float]]:
    """Train the committee; returns the model files (predicting energies on the labels' reference) and the
    metrics: per member and mean validation RMSEs (eV/atom, eV/Å) of the final, E0-corrected models on the
    validation set (or the member's out-of-bag frames, or the training set when there is neither)."""
    from pyacemaker.services.trainer.evaluation import evaluate_calculator, mace_calculator, predict

    teacher = load_model(settings.foundation_model)
    teacher_e0s = model_atomic_energies(teacher)
    missing = sorted(set(elements_of(train)) - {_symbol(z) for z in teacher_e0s})
    if missing:
        raise InvalidInputError(f"the teacher model knows no {', '.join(missing)}; it cannot be fine-tuned on them")
    del teacher
    teacher_calculator = mace_calculator([settings.foundation_model], device=settings.device)
    reference_e0s = aligned_reference_energies(list(predict(teacher_calculator, train).energies), train, teacher_e0s)
    del teacher_calculator
    moved_train = frames_on_teacher_reference(train, reference_e0s, teacher_e0s)
    moved_validation = frames_on_teacher_reference(validation, reference_e0s, teacher_e0s)
    replay_file = None
    if settings.multihead_replay and replay:
        replay_file = work_dir / "replay.xyz"
        write_extxyz(replay_file, frames_on_teacher_reference(replay, {}, teacher_e0s))
    models, metrics = [], {}
    for member in range(settings.committee_size):
        member_dir = work_dir / f"member_{member}"
        final_model = work_dir / f"mace_{member}.model"
        done_file = work_dir / f"mace_{member}.json"
        if done_file.exists() and final_model.exists():
            models.append(final_model)
            metrics.update(json.loads(done_file.read_text()))
            continue
        member_dir.mkdir(parents=True, exist_ok=True)
        seed = member_seed(settings.seed, member)
        if settings.committee_size > 1:
            chosen, out_of_bag = bootstrap(len(train), seed)
        else:
            chosen, out_of_bag = np.arange(len(train)), np.array([], dtype=int)
        train_file = member_dir / "train.xyz"
        write_extxyz(train_file, [moved_train[i] for i in chosen])
        if validation:
            scored, valid_frames = list(validation), moved_validation
        elif len(out_of_bag):
            scored, valid_frames = [train[i] for i in out_of_bag], [moved_train[i] for i in out_of_bag]
        else:
            scored, valid_frames = list(train), []
        valid_file = None
        if valid_frames:
            valid_file = member_dir / "valid.xyz"
            write_extxyz(valid_file, valid_frames)
        name = f"mace_{member}"
        checkpoints = member_dir / "checkpoints"
        continuing = resume and checkpoints.is_dir() and any(checkpoints.glob("*.pt"))
        arguments = mace_arguments(
            settings,
            member_dir,
            name,
            seed,
            train_file,
            valid_file,
            teacher_e0s,
            len(chosen),
            replay_file,
            len(replay),
            continuing,
            with_stress=any(STRESS_KEY in moved_train[i].info for i in chosen),
        )
        if progress is not None:
            how = "continuing from its last checkpoint" if continuing else "from the teacher"
            progress.stage("mace_finetune", member, settings.committee_size, f"member {member + 1} {how}")
        log.info("mace %s", " ".join(arguments))
        results = member_dir / "results" / f"{name}_run-{seed}_train.txt"
        with MetricsTail(results, member, progress):
            run_mace_training(arguments)
        model = load_model(member_dir / f"{name}.model")
        # Back onto the labels' energy scale (see aligned_reference_energies).
        set_model_atomic_energies(model, reference_e0s)
        import torch

        torch.save(model, final_model)
        scores = evaluate_calculator(mace_calculator([final_model], device=settings.device), scored).errors
        member_metrics = {
            f"member_{member}_energy_rmse_ev_per_atom": scores.energy_rmse_per_atom,
            f"member_{member}_forces_rmse_ev_per_a": scores.forces_rmse,
        }
        done_file.write_text(json.dumps(member_metrics))
        models.append(final_model)
        metrics.update(member_metrics)
    members = range(settings.committee_size)
    metrics["energy_rmse_ev_per_atom"] = float(
        np.mean([metrics[f"member_{m}_energy_rmse_ev_per_atom"] for m in members])
    )
    metrics["forces_rmse_ev_per_a"] = float(np.mean([metrics[f"member_{m}_forces_rmse_ev_per_a"] for m in members]))
    metrics["committee_size_count"] = float(settings.committee_size)
    return models, metrics


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z]


# ----------------------------------------------------------------------------------------------- the job
def validate_mace_finetune(spec: trainer_pb2.MaceFinetuneSpec, store: ArtifactStore) -> None:
    if not spec.foundation_model.uri:
        raise InvalidInputError("mace_finetune.foundation_model is not set; give the teacher model file")
    if not spec.train_data:
        raise InvalidInputError("mace_finetune.train_data is empty; give the labelled DFT set")
    if spec.committee_size < 0 or spec.max_epochs < 0:
        raise InvalidInputError("mace_finetune.committee_size and max_epochs must not be negative (0: default)")
    check_finite(
        {
            "mace_finetune.energy_weight": spec.energy_weight,
            "mace_finetune.forces_weight": spec.forces_weight,
            "mace_finetune.stress_weight": spec.stress_weight,
        }
    )
    if spec.energy_weight < 0 or spec.forces_weight < 0:
        raise InvalidInputError("mace_finetune loss weights must not be negative (0: mace's default)")
    if spec.stress_weight < 0:
        raise InvalidInputError(
            f"mace_finetune.stress_weight must not be negative (0: stress not fitted), got {spec.stress_weight:g}"
        )
    if spec.random_seed < 0:
        raise InvalidInputError(f"mace_finetune.random_seed must not be negative, got {spec.random_seed}")
    if spec.multihead_replay and not spec.replay_data:
        raise InvalidInputError(
            "mace_finetune.multihead_replay needs replay_data (teacher-labelled frames the run has)"
        )
    if spec.device and spec.device not in DEVICE_SETTINGS:
        raise InvalidInputError(
            f"mace_finetune.device: unknown device {spec.device!r}; use one of {', '.join(DEVICE_SETTINGS)}"
        )
    refused = [
        f"mace_finetune.extra_args.{key}: {problem}" for key in spec.extra_args if (problem := name_problem(key))
    ]
    if refused:
        raise InvalidInputError("; ".join(refused))
    e0s_by_number(spec.e0s)
    (foundation,) = artifact_paths(store, [spec.foundation_model], "mace_finetune.foundation_model")
    with open(foundation, "rb") as handle:
        magic = handle.read(4)
    # torch.save writes a zip archive (or, in old versions, a pickle): anything else cannot be a model.
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise InvalidInputError("mace_finetune.foundation_model: not a PyTorch model file (no zip or pickle header)")
    shard_paths(store, spec.train_data, "mace_finetune.train_data")
    shard_paths(store, spec.validation_data, "mace_finetune.validation_data")
    shard_paths(store, spec.replay_data, "mace_finetune.replay_data")


def finetune_settings(spec: trainer_pb2.MaceFinetuneSpec, foundation: Path) -> FinetuneSettings:
    """The spec's settings for this worker: the device resolved here (pyacemaker.torch_device) and mace's options
    checked with mace's parser; a GPU that is not there or an option mace refuses is an error naming the key."""
    device = resolve_device(spec.device or "auto", "mace_finetune.device")
    refused = [
        f"mace_finetune.extra_args.{key}: {problem}"
        for key, text in sorted(spec.extra_args.items())
        if (problem := value_problem(key, text))
    ]
    if refused:
        raise InvalidInputError("; ".join(refused))
    return FinetuneSettings(
        foundation_model=foundation,
        committee_size=spec.committee_size or DEFAULT_COMMITTEE_SIZE,
        seed=int(spec.random_seed),
        max_epochs=spec.max_epochs or DEFAULT_MAX_EPOCHS,
        multihead_replay=spec.multihead_replay,
        energy_weight=spec.energy_weight,
        forces_weight=spec.forces_weight,
        stress_weight=spec.stress_weight if spec.HasField("stress_weight") else DEFAULT_STRESS_WEIGHT,
        device=device,
        extra_args=dict(spec.extra_args),
    )


def run_mace_finetune(
    spec: trainer_pb2.MaceFinetuneSpec, store: ArtifactStore, work_dir: Path, progress: ProgressWriter, resume: bool
) -> JobResult:
    (foundation,) = artifact_paths(store, [spec.foundation_model], "mace_finetune.foundation_model")
    # Before the data are read: a missing GPU or a refused option fails the job at once.
    settings = finetune_settings(spec, foundation)
    progress.stage("load_data", message=f"reading and verifying the data (training on {settings.device})")
    train = load_labelled(store, spec.train_data, "mace_finetune.train_data")
    validation = load_labelled(store, spec.validation_data, "mace_finetune.validation_data")
    replay = load_labelled(store, spec.replay_data, "mace_finetune.replay_data") if spec.multihead_replay else []
    # Checked, not used: the fine-tuning fits the labels' per-element offset from the teacher itself
    # (aligned_reference_energies); a spec whose E0s miss an element still fails here, by name.
    label_e0s = e0s_by_number(spec.e0s)
    if label_e0s:
        require_e0s(label_e0s, elements_of([*train, *validation]), "mace_finetune.e0s")
    models, metrics = finetune_committee(settings, train, validation, replay, work_dir, progress, resume)
    progress.stage("store_outputs", message="copying the committee into the artifact store")
    outputs = [store.put_file(path, "model") for path in models]
    return JobResult(metrics=metrics, outputs=outputs)
