"""What the steps hand on to later steps, typed: each step records its outputs in the state file as artifact refs
by name; the classes here name those that later steps read, and `outputs_of` turns a step's refs into one, so a
step reads `dft_set(ctx).dft` instead of spelling `ctx.previous["active_learning"]["dft"]`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TypeVar

from pyacemaker.run_layout import StepName
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.v1 import common_pb2

Ref = common_pb2.ArtifactRef
Outputs = TypeVar("Outputs")


@dataclass(frozen=True)
class DirectSample:
    """Step 1 (direct_sampling)."""

    pool: Ref  # the candidate pool (extxyz)
    direct: Ref  # the DIRECT selection (extxyz), DFT-labelled in iteration 1
    summary: Ref  # selection.json


@dataclass(frozen=True)
class DftSet:
    """Step 2 (active_learning)."""

    dft: Ref  # every DFT label of the run so far (extxyz)
    iteration: Ref  # the iteration record (iteration.json: E0s, counts, uncertainty)
    md_candidates: Ref | None = None  # teacher MD frames scored as candidates (md_candidate_steps)


@dataclass(frozen=True)
class SurrogateMd:
    """Step 4 (surrogate_md)."""

    frames: Ref  # the selected frames (extxyz)
    md_record: Ref  # md_record.json
    trajectory: Ref | None = None  # every saved frame


@dataclass(frozen=True)
class Potential:
    """An ACE potential's files: steps 6 (ace_fit), 6b (student_refinement) and 7 (delta_fit)."""

    yaml: Ref
    yace: Ref
    asi: Ref | None = None  # the active set (extrapolation grade γ)
    metrics: Ref | None = None  # the fit's metrics JSON
    dft_structures: Ref | None = None  # step 6: the committee-labelled DFT structures it was fitted on too
    normal_equations: Ref | None = None  # step 6: its kept normal equations, where the refits of 6b start
    student_frames: Ref | None = None  # step 6b: the student-MD frames its refits added
    dft_candidates: Ref | None = None  # step 6b: high-γ student frames for the next active-learning step
    record: Ref | None = None  # step 6b: refinement.json

    def files(self) -> dict[str, Ref]:
        """yaml, yace and (where there is one) asi and metrics, by name."""
        return {
            name: ref
            for name, ref in (("yaml", self.yaml), ("yace", self.yace), ("asi", self.asi), ("metrics", self.metrics))
            if ref is not None
        }


@dataclass(frozen=True)
class Validation:
    """The validation step."""

    validation: Ref  # validation.json
    holdout: Ref  # the DFT hold-out (extxyz), reused by later iterations
    profile: Ref | None = None  # the relaxed scan's structures, reused by later iterations


def outputs_of(ctx: StepContext, step: str, kind: type[Outputs]) -> Outputs:
    """`step`'s outputs (the latest iteration's for a looped step) as `kind`; refs of other names are not part of
    it. RuntimeError naming the step when it has not run or lacks one of kind's required outputs."""
    refs = ctx.previous.get(step)
    if refs is None:
        raise RuntimeError(f"step {step} has not run: no outputs to read")
    fields = dataclasses.fields(kind)  # type: ignore[arg-type]
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in refs]
    if missing:
        raise RuntimeError(f"step {step} recorded no {', '.join(missing)}")
    return kind(**{f.name: refs[f.name] for f in fields if f.name in refs})


def has_run(ctx: StepContext, step: str) -> bool:
    return step in ctx.previous


def direct_sample(ctx: StepContext) -> DirectSample:
    return outputs_of(ctx, StepName.DIRECT_SAMPLING, DirectSample)


def dft_set(ctx: StepContext) -> DftSet:
    return outputs_of(ctx, StepName.ACTIVE_LEARNING, DftSet)


def surrogate_md_outputs(ctx: StepContext) -> SurrogateMd:
    return outputs_of(ctx, StepName.SURROGATE_MD, SurrogateMd)


def base_potential(ctx: StepContext) -> Potential:
    return outputs_of(ctx, StepName.ACE_FIT, Potential)


def final_potential(ctx: StepContext) -> Potential:
    return outputs_of(ctx, StepName.DELTA_FIT, Potential)


def last_validation(ctx: StepContext) -> Validation | None:
    """The previous iteration's validation (None in iteration 1)."""
    return outputs_of(ctx, StepName.VALIDATION, Validation) if has_run(ctx, StepName.VALIDATION) else None


def base_fit_metric(ctx: StepContext, key: str) -> float | None:
    """One figure of step 6's fit record (its metrics JSON, e.g. cutoff_a or ridge_lambda_relative); None when
    the fit recorded no such figure."""
    ref = base_potential(ctx).metrics
    if ref is None:
        return None
    value = json.loads(ctx.store.path(ref).read_text()).get("metrics", {}).get(key)
    return None if value is None else float(value)
