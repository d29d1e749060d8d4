"""A MACE model trained from scratch: the run's own teacher, for elements that no available model knows.

The recipe is the bundled teacher's (`pyacemaker.teacher.build.MACE_SETTINGS`: a small ScaleShiftMACE, 16
channels, L = 0, two interactions, energy weighted 20:100 against forces, SWA for the last fifth of the epochs),
so a bootstrapped teacher is made the way the shipped one was. The labels' isolated-atom energies are the model's
E0s: its energies are on the labels' own reference, like the DFT oracle's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer.datasets import e0s_by_number, elements_of, load_labelled, require_e0s, shard_paths
from pyacemaker.services.trainer.mace_finetune import (
    ENERGY_KEY,
    FORCES_KEY,
    MetricsTail,
    frames_on_teacher_reference,
    run_mace_training,
)
from pyacemaker.services.trainer.progress import ProgressWriter
from pyacemaker.services.trainer.results import JobResult
from pyacemaker.structures import write_extxyz
from pyacemaker.teacher.recipe import MACE_SETTINGS, split_frames
from pyacemaker.torch_device import DEVICE_SETTINGS, resolve_device
from pyacemaker.v1 import trainer_pb2

log = logging.getLogger(__name__)

DEFAULT_MAX_EPOCHS = 400
# Share of the training data held out for the metrics when the spec gives no validation data.
VALIDATION_FRACTION = 0.1
MODEL_NAME = "teacher"


def validate_mace_train(spec: trainer_pb2.MaceTrainSpec, store: ArtifactStore) -> None:
    if not spec.train_data:
        raise InvalidInputError("mace_train.train_data is empty; give the labelled structures")
    if spec.max_epochs < 0:
        raise InvalidInputError(f"mace_train.max_epochs must not be negative (0: default), got {spec.max_epochs}")
    if spec.random_seed < 0:
        raise InvalidInputError(f"mace_train.random_seed must not be negative, got {spec.random_seed}")
    if spec.device and spec.device not in DEVICE_SETTINGS:
        raise InvalidInputError(
            f"mace_train.device: unknown device {spec.device!r}; use one of {', '.join(DEVICE_SETTINGS)}"
        )
    if not spec.e0s:
        raise InvalidInputError(
            "mace_train.e0s is empty; a model trained from scratch needs the isolated-atom energies of its labels"
        )
    e0s_by_number(spec.e0s)
    shard_paths(store, spec.train_data, "mace_train.train_data")
    shard_paths(store, spec.validation_data, "mace_train.validation_data")


def training_arguments(
    work_dir: Path, train_file: Path, valid_file: Path, e0s: dict[int, float], seed: int, epochs: int, device: str
) -> list[str]:
    """mace's command line for the recipe, `epochs` long (SWA over the last fifth)."""
    settings = {**MACE_SETTINGS, "seed": seed, "max_num_epochs": epochs, "start_swa": max(1, (4 * epochs) // 5)}
    return [
        f"--name={MODEL_NAME}",
        f"--work_dir={work_dir}",
        f"--train_file={train_file}",
        f"--valid_file={valid_file}",
        "--E0s={" + ", ".join(f"{z}: {e!r}" for z, e in sorted(e0s.items())) + "}",
        f"--energy_key={ENERGY_KEY}",
        f"--forces_key={FORCES_KEY}",
        f"--device={device}",
        "--amsgrad",
        "--ema",
        "--swa",
        "--save_cpu",
        *(f"--{key}={value}" for key, value in settings.items()),
    ]


def run_mace_train(
    spec: trainer_pb2.MaceTrainSpec, store: ArtifactStore, work_dir: Path, progress: ProgressWriter
) -> JobResult:
    from pyacemaker.services.trainer.evaluation import evaluate_calculator, mace_calculator

    device = resolve_device(spec.device or "auto", "mace_train.device")
    progress.stage("load_data", message=f"reading and verifying the data (training on {device})")
    train = load_labelled(store, spec.train_data, "mace_train.train_data")
    validation = load_labelled(store, spec.validation_data, "mace_train.validation_data")
    e0s = e0s_by_number(spec.e0s)
    require_e0s(e0s, elements_of([*train, *validation]), "mace_train.e0s")
    if not validation:
        sets = split_frames(train, np.random.default_rng(int(spec.random_seed)), VALIDATION_FRACTION, min_valid=1)
        train, validation = sets["train"], sets["valid"]
    if not validation:
        raise InvalidInputError("mace_train: no structure to validate on (give validation_data or more train_data)")
    work_dir.mkdir(parents=True, exist_ok=True)
    train_file, valid_file = work_dir / "train.xyz", work_dir / "valid.xyz"
    write_extxyz(train_file, frames_on_teacher_reference(train, {}, {}))
    write_extxyz(valid_file, frames_on_teacher_reference(validation, {}, {}))
    epochs = spec.max_epochs or DEFAULT_MAX_EPOCHS
    seed = int(spec.random_seed)
    arguments = training_arguments(work_dir, train_file, valid_file, e0s, seed, epochs, device)
    progress.stage("mace_train", 0, 1, f"{len(train)} structures, {epochs} epochs")
    log.info("mace %s", " ".join(arguments))
    with MetricsTail(work_dir / "results" / f"{MODEL_NAME}_run-{seed}_train.txt", 0, progress):
        run_mace_training(arguments)
    model = work_dir / f"{MODEL_NAME}_stagetwo.model"
    if not model.is_file():  # mace writes the stage-two (SWA) model only when SWA started
        model = work_dir / f"{MODEL_NAME}.model"
    scores = evaluate_calculator(mace_calculator([model], device=device), validation).errors
    progress.stage("store_outputs", message="copying the model into the artifact store")
    return JobResult(
        metrics={
            "energy_rmse_ev_per_atom": scores.energy_rmse_per_atom,
            "forces_rmse_ev_per_a": scores.forces_rmse,
            "train_structures_count": float(len(train)),
            "validation_structures_count": float(len(validation)),
            "epochs_count": float(epochs),
        },
        outputs=[store.put_file(model, "model")],
    )
