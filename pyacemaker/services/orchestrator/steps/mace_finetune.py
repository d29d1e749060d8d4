"""Step 3: the teacher fine-tuned into a committee on every DFT label so far, by the trainer.

The committee drives the MD of step 4, labels the surrogate set in step 5 and scores the next iteration's
candidates in step 2. Its models are delivered on the DFT labels' reference energies (the trainer converts),
so their labels can be mixed with DFT labels downstream.
"""

from __future__ import annotations

import json
from typing import Any

from pyacemaker.clients.oracle import artifact_option, backend_spec
from pyacemaker.mace_options import option_text
from pyacemaker.run_layout import MACE_FINETUNE_DIR, StepName
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.outputs import dft_set
from pyacemaker.services.orchestrator.trainer_jobs import run_trainer_job
from pyacemaker.teacher import resolve_teacher
from pyacemaker.v1 import common_pb2, oracle_pb2, trainer_pb2

EXPORT_DIR = MACE_FINETUNE_DIR


def teacher_model(ctx: StepContext) -> common_pb2.ArtifactRef:
    """The run's teacher as a store artifact (the oracle and the trainer load model files only from verified
    artifacts: torch.load unpickles): the model step 0 trained with teacher.bootstrap, else teacher.model."""
    if ctx.config.teacher.bootstrap is not None:
        return ctx.previous[StepName.TEACHER_BOOTSTRAP]["model"]
    return ctx.store.put_file(resolve_teacher(ctx.config.teacher.model), kind="model")


def finetune_committee(
    ctx: StepContext, train_data: common_pb2.ArtifactRef, e0s: dict[int, float], seed: int, epochs: int, stage: str
) -> list[common_pb2.ArtifactRef]:
    """active_learning.committee_size models fine-tuned from the teacher on `train_data` (each member its own
    seed and bootstrap subset) with mace_finetune's stress weight, device and mace options; the same request is
    the same trainer job, also after an orchestrator restart."""
    settings = ctx.config.mace_finetune
    spec = trainer_pb2.MaceFinetuneSpec(
        foundation_model=teacher_model(ctx),
        train_data=[train_data],
        committee_size=ctx.config.active_learning.committee_size,
        random_seed=seed,
        max_epochs=epochs,
        e0s=[trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in sorted(e0s.items())],
        stress_weight=settings.stress_weight,
        device=settings.device,  # resolved by the trainer's worker, which may run on another machine
        extra_args={key: option_text(value) for key, value in settings.extra_args.items()},
    )
    job = run_trainer_job(ctx, trainer_pb2.StartJobRequest(mace_finetune=spec), stage)
    models = [ref for ref in job.outputs if ref.kind == "model"]
    if len(models) != spec.committee_size:
        raise RuntimeError(f"{stage}: the trainer returned {len(models)} models, expected {spec.committee_size}")
    return models


def committee_models(ctx: StepContext) -> list[common_pb2.ArtifactRef]:
    """The latest fine-tuned committee (step 3's outputs model_0 … model_{K−1}), in member order."""
    outputs = ctx.previous.get(MaceFinetuneStep.name, {})
    members = sorted(
        (int(name.removeprefix("model_")), ref)
        for name, ref in outputs.items()
        if name.startswith("model_") and name.removeprefix("model_").isdigit()
    )
    if not members:
        raise RuntimeError(f"this step needs the fine-tuned committee; step '{MaceFinetuneStep.name}' has no models")
    return [ref for _, ref in members]


def committee_spec(ctx: StepContext, models: list[common_pb2.ArtifactRef], **options: Any) -> oracle_pb2.BackendSpec:
    """The mace oracle backend for a committee of model artifacts (loaded by the oracle from the store), on the
    device mace_finetune.device asks for (resolved by the oracle)."""
    return backend_spec(
        "mace",
        {"models": [artifact_option(ref) for ref in models], "device": ctx.config.mace_finetune.device, **options},
    )


def dft_reference_energies(ctx: StepContext) -> dict[int, float]:
    """The DFT level's isolated-atom energies E0, as step 2 recorded them."""
    record = json.loads(ctx.store.path(dft_set(ctx).iteration).read_text())
    return {int(z): float(e) for z, e in record["isolated_atom_energies_ev"].items()}


class MaceFinetuneStep:
    name = StepName.MACE_FINETUNE
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "dft": dft_set(ctx).dft.sha256,
            "iteration_record": dft_set(ctx).iteration.sha256,
            "mace_finetune": ctx.config.mace_finetune.key_material(),
            "committee_size": ctx.config.active_learning.committee_size,
            "iteration": ctx.iteration,
            "teacher": teacher_model(ctx).sha256,
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        settings = ctx.config.mace_finetune
        models = finetune_committee(
            ctx,
            dft_set(ctx).dft,
            dft_reference_energies(ctx),
            # Another seed per iteration, so each iteration's committee is an independent draw.
            settings.random_seed + 1000 * ctx.iteration,
            settings.epochs,
            "MACE fine-tuning on the DFT set",
        )
        outputs = {f"model_{i}": ref for i, ref in enumerate(models)}
        exports = {f"{ctx.export_prefix}{EXPORT_DIR}/mace_{i}.model": ref for i, ref in enumerate(models)}
        return StepOutcome(outputs=outputs, metrics={"committee_size": float(len(models))}, exports=exports)
