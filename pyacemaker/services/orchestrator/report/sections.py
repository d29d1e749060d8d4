"""The report's sections: each takes what was read from the run and returns its HTML (writing its plots into the
report dir); a section whose data is missing says so instead of failing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols
from matplotlib.ticker import MaxNLocator

from pyacemaker.run_layout import ACTIVE_LEARNING_RECORD, STATE_FILE, SUMMARY_FILE, VALIDATION_RECORD, in_iteration
from pyacemaker.run_records import ValidationRecord
from pyacemaker.services.orchestrator.reaction_profile import KCAL_PER_MOL_PER_EV
from pyacemaker.services.orchestrator.report.html import (
    escape,
    fmt,
    format_duration,
    format_size,
    format_utc,
    html_table,
    key_value_table,
    missing_note,
)
from pyacemaker.services.orchestrator.report.plots import (
    DFT_COLOUR,
    figure,
    parity_axes,
    plot_dft_calls,
    plot_uncertainty,
    save_figure,
)
from pyacemaker.services.orchestrator.report.records import RunRecord
from pyacemaker.v1 import orchestrator_pb2

# The models validation compares, in plotting order: key in validation.json, label, colour.
MODELS = (
    ("teacher", "teacher (MACE)", "tab:gray"),
    ("committee", "fine-tuned committee", "tab:purple"),
    ("base_ace", "base ACE", "tab:blue"),
    ("final_ace", "final ACE", "tab:red"),
    ("direct_ace", "direct ACE (no teacher)", "tab:green"),
)
_RUN_FAILED = orchestrator_pb2.RUN_EVENT_KIND_RUN_FAILED
_VERDICT: dict[Any, str] = {True: '<b class="good">target met</b>', False: '<b class="bad">target not met</b>'}
_RUN_LEVEL_EVENTS = {
    orchestrator_pb2.RUN_EVENT_KIND_RUN_STARTED,
    orchestrator_pb2.RUN_EVENT_KIND_RUN_COMPLETED,
    _RUN_FAILED,
}
_STATE_COLOURS = {"completed": "tab:green", "failed": "tab:red", "running": "tab:orange"}


def headline(run: RunRecord, out_dir: Path) -> str:
    summary = run.summary.data
    rows: list[tuple[str, str]] = []
    if summary is not None:
        rows.append(("Stop reason", f"<b>{escape(summary.stop_reason)}</b>"))
        rows.append(("Iterations", escape(str(summary.iterations))))
        rows.append(("Final potential", _final_potential(run, summary.final_potential)))
    else:
        rows.append(("Stop reason", f'<span class="missing">{escape(_unfinished_state(run))}</span>'))
        rows.append(("Iterations", f"{len(run.iterations)} started"))
    used = summary.dft_calls if summary is not None else _ledger_total(run)
    rows.append(("DFT calls", f"{fmt(used, 0)} of a budget of {fmt(run.budget(), 0)}"))
    if run.ledger:
        rows.append(("DFT ledger", escape(_ledger_text(run.ledger))))
    if summary is not None and summary.dft_calls_not_trained_on is not None:
        wasted = summary.dft_calls_not_trained_on
        css = "good" if wasted == 0 else "bad"
        rows.append(
            (
                "DFT calls charged but not trained on",
                f'<b class="{css}">{wasted}</b> (DFT forces above active_learning.max_candidate_force)',
            )
        )
    if summary is not None and summary.wall_time_s is not None:
        rows.append(("Wall time", format_duration(summary.wall_time_s)))
    elif run.created is not None and run.events:
        elapsed = format_duration(run.events[-1][0] - run.created)
        rows.append(("Elapsed", f"{elapsed} (from the run's start to its last event)"))
    for step in run.steps:
        if step.state == "failed":
            rows.append((f"Step {step.name} failed", f'<span class="bad">{escape(step.error)}</span>'))
    last = run.handed_out_validation()
    if last is None:
        rows.append(("Final ACE vs DFT hold-out", missing_note("no validation yet: " + _validation_problems(run))))
    else:
        validation = last.validation.data
        assert validation is not None
        if "final_ace" in validation.models:
            accuracy = _accuracy_sentence(last.number, validation)
        else:
            accuracy = missing_note(f"{in_iteration(last.number, VALIDATION_RECORD)} has no final_ace scores")
        rows.append(("Final ACE vs DFT hold-out", accuracy))
    return key_value_table(rows)


def problem_of(exc: Exception) -> str:
    return f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"


def _rmse_pair(energy_mev_per_atom: Any, forces_mev_per_a: Any) -> str:
    return f"{fmt(energy_mev_per_atom, 1)} meV/atom, {fmt(forces_mev_per_a, 1)} meV/Å"


def _unfinished_state(run: RunRecord) -> str:
    """What the event log says about a run without a summary: failed, cancelled, or not finished (yet)."""
    run_level = [e for e in run.events if e[1] in _RUN_LEVEL_EVENTS]
    if run_level and run_level[-1][1] == _RUN_FAILED:
        return f"the run failed: {run_level[-1][3]} (no {SUMMARY_FILE})"
    if run_level and run_level[-1][1] == orchestrator_pb2.RUN_EVENT_KIND_RUN_COMPLETED:
        return f"the run completed without a {SUMMARY_FILE} (it stopped after an earlier step: config stop_after)"
    return f"the run has not finished ({run.summary.problem}): still running, or killed"


def _accuracy_sentence(number: int, validation: ValidationRecord) -> str:
    target = validation.target
    final = validation.models["final_ace"]
    verdict = _VERDICT.get(validation.target_met, "")
    others = "; ".join(
        f"{label} {_rmse_pair(model.energy_rmse_mev_per_atom, model.forces_rmse_mev_per_a)}"
        for key, label, _colour in MODELS
        if key != "final_ace" and (model := validation.models.get(key)) is not None
    )
    stability = validation.md_stability
    stable = (
        f" MD stability: {stability.n_survivors}/{stability.n_runs} runs survive {stability.steps} steps."
        if stability
        else ""
    )
    return (
        f"<b>{_rmse_pair(final.energy_rmse_mev_per_atom, final.forces_rmse_mev_per_a)}</b> "
        f"(target {_rmse_pair(target.energy_mev_per_atom, target.forces_mev_per_a)}): "
        f"{verdict}. For comparison: {escape(others)}. "
        f"Iteration {number}, {escape(_or_unknown(validation.n_holdout))} "
        f"hold-out structures at {escape(_or_unknown(validation.level_of_theory))}.{escape(stable)}"
    )


def _or_unknown(value: Any) -> str:
    return "?" if value is None else str(value)


def teacher_section(run: RunRecord, out_dir: Path) -> str:
    data = run.teacher.data
    if data is None:
        model = run.config.get("teacher", {}).get("model", "bundled")
        return f"<p>The teacher is <code>{escape(str(model))}</code> (teacher.model; not trained by the run).</p>"
    e0s = data.isolated_atom_energies_ev
    energy_rmse, forces_rmse = data.validation_rmse()
    rows = [
        ("Level of theory of its labels", escape(data.level_of_theory)),
        ("Pool structures", fmt(data.n_pool, 0)),
        ("MD frames at that level", fmt(data.n_md_frames, 0)),
        ("Labelled (trained on and validated)", fmt(data.n_labelled, 0)),
        ("Left out: failed / force above the cap", f"{fmt(data.n_failed, 0)} / {fmt(data.n_above_max_force, 0)}"),
        ("Epochs", fmt(data.training_metrics.get("epochs_count"), 0)),
        ("Validation RMSE (its own level)", _rmse_pair(1000 * energy_rmse, 1000 * forces_rmse)),
        (
            "Isolated-atom energies E0 (eV)",
            escape(", ".join(f"{chemical_symbols[int(z)]} {e:.4f}" for z, e in sorted(e0s.items(), key=_by_number))),
        ),
    ]
    note = (
        "<p>The run trained its own teacher (teacher.bootstrap): a small MACE on the cheap level's labels of "
        "structures around the seeds. Its errors are against that level, not DFT.</p>"
    )
    return note + key_value_table(rows)


def _by_number(item: tuple[str, Any]) -> int:
    return int(item[0])


def selection_section(run: RunRecord, out_dir: Path) -> str:
    data = run.selection.data
    if data is None:
        return missing_note(f"no DIRECT selection record: {run.selection.problem}")
    rows = [
        ("Pool structures", fmt(data.n_pool, 0)),
        ("Rejected while building the pool", fmt(data.n_rejected, 0)),
        ("Dropped for teacher forces above the cap", fmt(data.n_rejected_teacher_force, 0)),
        ("Rattle amplitudes (Å)", escape(", ".join(f"{a:g}" for a in data.rattle_amplitudes_a or []))),
        ("Selected by DIRECT", fmt(data.n_selected, 0)),
        ("Coverage of the pool's feature space", fmt(data.coverage, 3)),
        ("Featuriser", escape(_or_unknown(data.featuriser))),
        (
            "Principal components (explained variance)",
            f"{fmt(data.n_components, 0)} ({fmt(sum(data.explained_variance_ratio), 3)})",
        ),
        ("Clusters", fmt(data.n_clusters, 0)),
    ]
    return key_value_table(rows)


def active_learning_section(run: RunRecord, out_dir: Path) -> str:
    if not run.iterations:
        return missing_note(f"no active-learning iteration yet (no iteration_NN/{ACTIVE_LEARNING_RECORD})")
    out = []
    header = [
        "iteration",
        "new DFT calls",
        "DFT calls after step 2",
        "DFT calls after validation",
        "calibration factor",
        "pool",
        "above threshold",
        "excluded (force)",
        "chosen",
        "max calibrated σ (eV/Å)",
    ]
    rows = []
    cumulative: list[tuple[int, float]] = []  # (iteration, DFT calls charged by its end)
    previous = 0.0
    histograms = []
    for iteration in run.iterations:
        record = iteration.active_learning.data
        validation = iteration.validation.data
        after_validation = validation.dft_calls_total if validation is not None else None
        if record is None:
            rows.append([str(iteration.number), *[missing_note(iteration.active_learning.problem)], *[""] * 8])
            continue
        factor = record.calibration_factor
        calibrated = factor * np.asarray(record.pool_committee_max_force_std_ev_per_a, dtype=np.float64)
        threshold = record.force_error_threshold_ev_per_a
        chosen = np.asarray(record.chosen_pool_indices, dtype=np.int64)
        end = float(after_validation if after_validation is not None else record.dft_calls_charged)
        cumulative.append((iteration.number, end))
        rows.append(
            [
                str(iteration.number),
                fmt(end - previous, 0),
                fmt(record.dft_calls_charged, 0),
                fmt(after_validation, 0),
                fmt(factor, 2),
                fmt(len(calibrated), 0),
                fmt(int((calibrated > threshold).sum()), 0),
                fmt(len(record.excluded_by_force_pool_indices), 0),
                fmt(len(chosen), 0),
                fmt(calibrated.max() if len(calibrated) else None, 3),
            ]
        )
        previous = end
        histograms.append((iteration.number, calibrated, chosen, threshold))
    out.append(html_table(header, rows))
    if cumulative:
        out.append(plot_dft_calls(cumulative, run.budget(), out_dir))
    if histograms:
        out.append(
            "<p>Pool uncertainty: committee max force spread × the iteration's calibration factor (an estimate of "
            "the largest force error); candidates above the threshold are labelled, most uncertain first, within "
            "the budget and the diversity guard.</p>"
        )
        out.append(plot_uncertainty(histograms, out_dir))
    return "\n".join(out)


def validation_section(run: RunRecord, out_dir: Path) -> str:
    last = run.handed_out_validation()
    if last is None:
        return missing_note("validation is missing: " + _validation_problems(run))
    validation = last.validation.data
    assert validation is not None
    ref_energy = np.asarray(validation.reference.energy_per_atom_ev, dtype=np.float64)
    ref_forces = np.asarray(validation.reference.forces_ev_per_a, dtype=np.float64).reshape(-1)
    fig, (energy_ax, force_ax) = figure(ncols=2, size=(11, 5))
    for key, label, colour in MODELS:
        model = validation.models.get(key)
        if model is None:
            continue
        energy = np.asarray(model.energy_per_atom_ev, dtype=np.float64)
        forces = np.asarray(model.forces_ev_per_a, dtype=np.float64).reshape(-1)
        if energy.shape != ref_energy.shape or forces.shape != ref_forces.shape:
            raise ValueError(
                f"{key}: {len(energy)} energies / {len(forces)} force components, the reference has "
                f"{len(ref_energy)} / {len(ref_forces)}"
            )
        energy_ax.scatter(
            ref_energy,
            energy,
            s=18,
            color=colour,
            alpha=0.75,
            label=f"{label}: RMSE {fmt(model.energy_rmse_mev_per_atom, 1)} meV/atom",
        )
        force_ax.scatter(
            ref_forces,
            forces,
            s=8,
            color=colour,
            alpha=0.5,
            label=f"{label}: RMSE {fmt(model.forces_rmse_mev_per_a, 1)} meV/Å",
        )
    parity_axes(energy_ax, "energy per atom (eV/atom)")
    parity_axes(force_ax, "force component (eV/Å)")
    fig.suptitle(f"Iteration {last.number}: models vs the DFT hold-out ({validation.level_of_theory or ''})")
    intro = (
        f"<p>Iteration {last.number}: {escape(_or_unknown(validation.n_holdout))} hold-out structures labelled at "
        f"{escape(_or_unknown(validation.level_of_theory))}, never used for training. "
        f"{_VERDICT.get(validation.target_met, '')}</p>"
    )
    return (
        intro
        + _rmse_table(validation)
        + _source_table(validation)
        + _stability_text(validation)
        + save_figure(fig, out_dir, "parity.png", "parity plots of energies and forces")
    )


def ablation_section(run: RunRecord, out_dir: Path) -> str:
    chosen = run.handed_out_validation()
    if chosen is None:
        return missing_note("no validation yet, so no ablation: " + _validation_problems(run))
    validation = chosen.validation.data
    assert validation is not None
    ablation = validation.ablation
    if ablation is None:
        return missing_note(
            f"{in_iteration(chosen.number, VALIDATION_RECORD)} has no ablation (a run from before the ablation)"
        )
    intro = (
        f"<p>The ablation: the same ACE (settings, cutoff, fit) fitted directly on the "
        f"{fmt(ablation.n_training_structures, 0)} DFT training structures of iteration {chosen.number} "
        "— no teacher, no surrogate data — and scored on the same hold-out and profile as the run's models.</p>"
    )
    if ablation.error:
        return intro + f'<p class="bad">The direct fit could not be made: {escape(ablation.error)}</p>'
    # Per method ("dft" and the models): the central barrier, when the run computed a profile.
    barriers = validation.profile.central_barrier_kcal_per_mol if validation.profile is not None else {}
    dft = barriers.get("dft")
    rows = []
    for key, label, _colour in MODELS:
        model = validation.models.get(key)
        if model is None:
            continue
        barrier = barriers.get(key)
        error = None if barrier is None or dft is None else abs(barrier - dft)
        name = f"<b>{escape(label)}</b>" if key in ("final_ace", "direct_ace") else escape(label)
        rows.append(
            [
                name,
                fmt(model.energy_rmse_mev_per_atom, 1),
                fmt(model.forces_rmse_mev_per_a, 1),
                fmt(barrier, 2),
                fmt(error, 2),
                _gamma(model.max_gamma),
            ]
        )
    header = [
        "model",
        "energy RMSE (meV/atom)",
        "force RMSE (meV/Å)",
        "barrier (kcal/mol)",
        "|barrier − DFT|",
        "max γ on the hold-out",
    ]
    table = html_table(header, rows)
    gain = ablation.gain
    if gain is None:
        return intro + table
    ratio = gain.forces_rmse_ratio_final_over_direct
    energy_ratio = gain.energy_rmse_ratio_final_over_direct
    verdict = (
        '<b class="good">the distillation earns its place on forces</b>'
        if ratio < 1
        else '<b class="bad">the distillation does not beat a plain fit of the DFT labels on forces</b>'
    )
    sentence = (
        f"<p>Final ACE / direct ACE: force RMSE ratio <b>{fmt(ratio, 2)}</b>, energy RMSE ratio "
        f"<b>{fmt(energy_ratio, 2)}</b> (below 1: the distillation helps): {verdict}.</p>"
    )
    return intro + table + sentence


def learning_curve_section(run: RunRecord, out_dir: Path) -> str:
    validated = [it for it in run.iterations if it.validation.data is not None]
    if not validated:
        return missing_note("no validation yet, so no learning curve: " + _validation_problems(run))
    numbers = [it.number for it in validated]
    records = [it.validation.data for it in validated if it.validation.data is not None]
    fig, (force_ax, energy_ax) = figure(ncols=2, size=(11, 4))
    header = ["iteration"]
    for _key, label, _colour in MODELS:
        header += [f"{label}: E (meV/atom)", f"{label}: F (meV/Å)"]
    rows = [[str(n)] for n in numbers]
    for key, label, colour in MODELS:
        scores = [r.models.get(key) for r in records]
        energies = [None if s is None else s.energy_rmse_mev_per_atom for s in scores]
        forces = [None if s is None else s.forces_rmse_mev_per_a for s in scores]
        for row, e, f in zip(rows, energies, forces, strict=True):
            row += [fmt(e, 1), fmt(f, 1)]
        force_ax.plot(numbers, [math.nan if f is None else f for f in forces], "o-", color=colour, label=label)
        energy_ax.plot(numbers, [math.nan if e is None else e for e in energies], "o-", color=colour, label=label)
    target = records[-1].target
    force_ax.axhline(target.forces_mev_per_a, color="black", ls="--", label="target")
    energy_ax.axhline(target.energy_mev_per_atom, color="black", ls="--", label="target")
    force_ax.set(xlabel="iteration", ylabel="force RMSE (meV/Å)", title="forces")
    energy_ax.set(xlabel="iteration", ylabel="energy RMSE (meV/atom)", title="energies")
    for ax in (force_ax, energy_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.legend()
    return html_table(header, rows) + save_figure(
        fig, out_dir, "learning_curve.png", "RMSE per model against the iteration"
    )


def profile_section(run: RunRecord, out_dir: Path) -> str:
    last = run.handed_out_validation()
    if last is None:
        return missing_note("no validation yet, so no energy profile: " + _validation_problems(run))
    validation = last.validation.data
    assert validation is not None
    profile = validation.profile
    if profile is None:
        return missing_note(
            "no energy profile was computed for this system "
            f"(profile is null in {in_iteration(last.number, VALIDATION_RECORD)})"
        )
    xi = np.asarray(profile.xi_a, dtype=np.float64)
    barriers = profile.central_barrier_kcal_per_mol
    fig, (ax,) = figure(ncols=1, size=(7, 4.5))
    curves = [("dft", "DFT", DFT_COLOUR), *MODELS]
    for key, label, colour in curves:
        if key not in profile.energies_ev:
            continue
        energies = np.asarray(profile.energies_ev[key], dtype=np.float64)
        if energies.shape != xi.shape:
            raise ValueError(f"profile {key}: {len(energies)} energies for {len(xi)} points of ξ")
        relative = (energies - energies.min()) * KCAL_PER_MOL_PER_EV
        style = "s-" if key == "dft" else "o-"
        ax.plot(xi, relative, style, color=colour, ms=4, label=f"{label}: barrier {fmt(barriers.get(key), 2)} kcal/mol")
    ax.set(xlabel="ξ (Å)", ylabel="E − E_min (kcal/mol)", title=f"Energy profile along ξ (iteration {last.number})")
    ax.legend(fontsize="small", loc="upper left")
    dft = barriers.get("dft")
    rows = []
    for key, label, _colour in curves:
        value = barriers.get(key)
        delta = None if value is None or dft is None or key == "dft" else value - dft
        rows.append([label, fmt(value, 2), fmt(delta, 2)])
    table = html_table(["method", "central barrier (kcal/mol)", "minus DFT (kcal/mol)"], rows)
    return table + save_figure(fig, out_dir, "profile.png", "energy profile along the reaction coordinate")


def time_section(run: RunRecord, out_dir: Path) -> str:
    if not run.steps:
        return missing_note(f"no step has started (the steps table of {STATE_FILE} is empty)")
    rows = [
        [
            escape(s.name),
            escape(s.state),
            escape(format_utc(s.started)) if s.started is not None else "",
            format_duration(s.duration_s) if s.duration_s is not None else '<span class="missing">not finished</span>',
            escape(s.error),
        ]
        for s in run.steps
    ]
    timed = [s for s in run.steps if s.duration_s is not None]
    rows.append(["<b>all steps</b>", "", "", f"<b>{format_duration(sum(s.duration_s or 0.0 for s in timed))}</b>", ""])
    out = [html_table(["step", "state", "started (UTC)", "time", "error"], rows)]
    if timed:
        fig, (ax,) = figure(ncols=1, size=(8, max(2.5, 0.8 + 0.35 * len(timed))))
        names = [s.name for s in timed][::-1]
        seconds = [s.duration_s or 0.0 for s in timed][::-1]
        colours = [_STATE_COLOURS.get(s.state, "tab:gray") for s in timed][::-1]
        ax.barh(names, seconds, color=colours)
        ax.set(xlabel="time (s)", title="Time per step")
        out.append(save_figure(fig, out_dir, "step_times.png", "time per step"))
    return "\n".join(out)


def artifacts_section(run: RunRecord, out_dir: Path) -> str:
    rows = []
    for step in run.steps:
        by_digest: dict[str, list[str]] = {}
        for relative, digest in step.exported.items():
            by_digest.setdefault(digest, []).append(relative)
        for name, ref in sorted(step.outputs.items()):
            digest = ref.sha256
            exported = ", ".join(
                f'<a href="../{escape(p)}"><code>{escape(p)}</code></a>' for p in sorted(by_digest.get(digest, []))
            )
            rows.append(
                [
                    escape(step.name),
                    escape(name),
                    escape(ref.kind),
                    format_size(ref.size),
                    f'<code title="{escape(digest)}">{escape(digest[:12])}</code>',
                    exported,
                ]
            )
    if not rows:
        return missing_note("no step has recorded outputs yet")
    note = "<p>Outputs of every step in the content-addressed store (sha256, first 12 hex digits; hover for all).</p>"
    return note + html_table(["step", "output", "kind", "size", "sha256", "exported to"], rows)


# -- pieces of several sections ------------------------------------------------------------------------------------


def _rmse_table(validation: ValidationRecord) -> str:
    target = validation.target
    rows = []
    for key, label, _colour in MODELS:
        model = validation.models.get(key)
        if model is None:
            rows.append([label, missing_note("not validated"), ""])
            continue
        rows.append([label, fmt(model.energy_rmse_mev_per_atom, 1), fmt(model.forces_rmse_mev_per_a, 1)])
    rows.append(["<i>target</i>", fmt(target.energy_mev_per_atom, 1), fmt(target.forces_mev_per_a, 1)])
    return html_table(["model", "energy RMSE (meV/atom)", "force RMSE (meV/Å)"], rows)


_SOURCE_LABELS = {
    "surrogate_md": "the run's own surrogate MD",
    "teacher_md": "an independent MD (the teacher, other seed, hotter)",
}


def _source_table(validation: ValidationRecord) -> str:
    """Force and energy RMSE per hold-out source: the run's own MD against the independent one."""
    counts = validation.n_holdout_by_source
    if len(counts) < 2:
        return ""
    sources = sorted(counts)
    header = ["model"] + [f"{_SOURCE_LABELS.get(src, src)} ({counts[src]}): E, F" for src in sources]
    rows = []
    for key, label, _colour in MODELS:
        model = validation.models.get(key)
        if model is None or not model.by_source:
            continue
        rows.append(
            [escape(label)]
            + [
                _rmse_pair(scores.energy_rmse_mev_per_atom, scores.forces_rmse_mev_per_a)
                if (scores := model.by_source.get(src)) is not None
                else "–"
                for src in sources
            ]
        )
    return "<p>By source of the hold-out structures:</p>" + html_table(header, rows)


def _stability_text(validation: ValidationRecord) -> str:
    stability = validation.md_stability
    if stability is None:
        return ""
    n_runs, survivors = stability.n_runs, stability.n_survivors
    css = "good" if survivors == n_runs else "bad"
    per_t = ", ".join(f"{t} K: {s}/{n}" for t, (s, n) in stability.survivors_by_temperature.items())
    lost = [
        f"seed {run.seed} at {fmt(run.temperature_k, 0)} K: {run.problem}" for run in stability.runs if not run.survived
    ]
    text = (
        f'<p>MD stability of the final ACE: <b class="{css}">{survivors}/{n_runs} runs survive</b> '
        f"{stability.steps} steps of {fmt(stability.timestep_fs, 2)} fs ({escape(per_t)}).</p>"
    )
    # A survivor that split into the seeds' own fragments (Cl⁻ leaving CH3Cl at 1000 K) is physics, named so.
    dissociated = [
        f"seed {run.seed} at {fmt(run.temperature_k, 0)} K survived and dissociated {run.dissociation}"
        for run in stability.runs
        if run.survived and run.dissociation
    ]
    if lost or dissociated:
        text += "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in [*lost, *dissociated]) + "</ul>"
    return text


def _gamma(value: Any) -> str:
    """An extrapolation grade: 2 decimals near 1, scientific notation when huge; "–" when not computed."""
    if value is None:
        return "–"
    number = float(value)
    return f"{number:.2f}" if number < 1000 else f"{number:.2e}"


def _validation_problems(run: RunRecord) -> str:
    if not run.iterations:
        return f"no iteration_NN/{VALIDATION_RECORD} (the run has no active-learning iteration yet)"
    return "; ".join(it.validation.problem for it in run.iterations)


def _final_potential(run: RunRecord, relative: str) -> str:
    if not relative:
        return missing_note("none recorded")
    digest = next((s.exported[relative] for s in run.steps if relative in s.exported), "")
    present = (run.run_dir / relative).is_file()
    text = f'<a href="../{escape(relative)}"><code>{escape(relative)}</code></a>'
    if digest:
        text += f' (sha256 <code title="{escape(digest)}">{escape(digest[:12])}</code>)'
    return text if present else text + ' <span class="bad">(file missing)</span>'


def _ledger_total(run: RunRecord) -> int | None:
    return None if run.ledger is None else sum(run.ledger.values())


def _ledger_text(ledger: dict[tuple[str, str], int]) -> str:
    parts = []
    for level in sorted({level for level, _status in ledger}):
        counts = {status: n for (lev, status), n in ledger.items() if lev == level}
        detail = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
        parts.append(f"{sum(counts.values())} at {level} ({detail})")
    return "; ".join(parts)
