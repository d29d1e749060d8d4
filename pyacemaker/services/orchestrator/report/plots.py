"""The report's figures: matplotlib without a display (the Agg canvas), each saved as a PNG beside the HTML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pyacemaker.services.orchestrator.report.html import escape

DFT_COLOUR = "black"


def figure(ncols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure drawn by the Agg canvas directly: no pyplot, no global state, safe in the orchestrator's threads."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def save_figure(fig: Figure, out_dir: Path, name: str, alt: str) -> str:
    fig.savefig(out_dir / name, dpi=100)
    return f'<img src="{escape(name)}" alt="{escape(alt)}">'


def parity_axes(ax: Axes, quantity: str) -> None:
    low, high = ax.dataLim.intervalx
    low, high = min(low, ax.dataLim.intervaly[0]), max(high, ax.dataLim.intervaly[1])
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color=DFT_COLOUR, lw=0.8, ls="--")
    ax.set(
        xlabel=f"DFT {quantity}", ylabel=f"model {quantity}", xlim=(low - pad, high + pad), ylim=(low - pad, high + pad)
    )
    ax.set_aspect("equal")
    ax.legend(fontsize="small", loc="upper left")


def plot_dft_calls(cumulative: list[tuple[int, float]], budget: int | None, out_dir: Path) -> str:
    fig, (ax,) = figure(ncols=1, size=(7, 4))
    numbers = [n for n, _ in cumulative]
    totals = [c for _, c in cumulative]
    new = np.diff([0.0, *totals])
    ax.bar(numbers, new, color="tab:blue", alpha=0.6, label="DFT calls in the iteration")
    ax.plot(numbers, totals, "o-", color="tab:blue", label="cumulative")
    if budget is not None:
        ax.axhline(budget, color="tab:red", ls="--", label=f"budget ({budget})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="iteration", ylabel="DFT calls", title="DFT calls per iteration")
    ax.legend()
    return save_figure(fig, out_dir, "dft_calls.png", "DFT calls per iteration against the budget")


def plot_uncertainty(histograms: list[tuple[int, np.ndarray, np.ndarray, float]], out_dir: Path) -> str:
    fig, (ax,) = figure(ncols=1, size=(8, 4.5))
    values = np.concatenate([h[1] for h in histograms])
    thresholds = sorted({h[3] for h in histograms})
    positive = values[values > 0]
    logarithmic = len(positive) > 1 and positive.max() > 10 * positive.min()
    if logarithmic:
        low = min(positive.min(), *thresholds)
        high = max(positive.max(), *thresholds)
        bins = np.geomspace(low, high * 1.0001, 41)
        ax.set_xscale("log")
    else:
        bins = np.linspace(
            min(values.min(initial=0.0), *thresholds), max(values.max(initial=0.0), *thresholds) * 1.0001, 41
        )
    colours = [f"C{i % 10}" for i in range(len(histograms))]
    for (number, calibrated, chosen, threshold), colour in zip(histograms, colours, strict=True):
        above = int((calibrated > threshold).sum())
        ax.hist(
            calibrated,
            bins=bins.tolist(),
            histtype="step",
            lw=1.5,
            color=colour,
            label=f"iteration {number}: pool {len(calibrated)}, {above} above threshold, {len(chosen)} chosen",
        )
        if len(chosen):
            ax.plot(calibrated[chosen], np.zeros(len(chosen)), "|", color=colour, ms=18, mew=2)
    for threshold in thresholds:
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:g} eV/Å")
    ax.set(
        xlabel="calibrated uncertainty: max force error estimate (eV/Å)",
        ylabel="pool structures",
        title="Pool uncertainty per iteration (ticks: chosen for DFT)",
    )
    ax.legend(fontsize="small")
    return save_figure(fig, out_dir, "uncertainty.png", "distribution of the calibrated pool uncertainty")
