"""PNG figures of sweeps (matplotlib, Agg backend: no display needed).

``plot_u_curves`` overlays the allocation sweeps of several budgets: the runs' validation losses, the
robust quadratic with its pointwise bootstrap band, rho* with its interval; a second panel shows every
curve relative to its own fitted loss at rho = 1, so budgets with different loss levels compare.
``plot_memory_scaling`` shows loss against Engram slots (log axis) with the power-law and log-linear fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sweeps.fit import PowerLawFit, UCurveFit  # noqa: E402


@dataclass
class CurveData:
    """One sweep's points for a figure: completed runs' (x, loss) and how many runs have no loss."""

    label: str  # legend entry, e.g. "1e13 FLOPs"
    x: Sequence[float]  # rho (allocation) or slots (memory)
    loss: Sequence[float]
    n_missing: int = 0  # failed / unfinished runs (no loss)
    outliers: list[int] = field(default_factory=list)  # indices into x/loss flagged by the fit


def _finish(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_u_curves(curves: Sequence[tuple[CurveData, Optional[UCurveFit]]], path: Path,
                  title: str = "Allocation sweep: loss vs expert share rho") -> Path:
    """Overlay U-curves (one colour per budget); a fit may be None when there were too few points."""
    if not curves:
        raise ValueError("plot_u_curves needs at least one curve")
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (data, fit) in enumerate(curves):
        c = colours[i % len(colours)]
        x, y = np.asarray(data.x, float), np.asarray(data.loss, float)
        label = data.label + (f" ({data.n_missing} without loss)" if data.n_missing else "")
        inl = np.ones(x.size, bool)
        inl[[j for j in data.outliers if j < x.size]] = False
        ax.scatter(x[inl], y[inl], color=c, s=22, zorder=3, label=label)
        if (~inl).any():
            ax.scatter(x[~inl], y[~inl], color=c, marker="x", s=40, zorder=3)
        if fit is None:
            continue
        grid = np.linspace(fit.rho_range[0], fit.rho_range[1], 200)
        ax.plot(grid, fit.predict(grid), color=c, lw=1.6)
        ref = fit.loss_ref
        lo, hi = fit.rho_star_ci
        has_ci = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
        star = f"rho*={fit.rho_star:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if has_ci else "")
        gain = f", gain {fit.gain_vs_moe:.4f}" + ("" if fit.interior else " (no U: minimum at an end)")
        axr.plot(grid, fit.predict(grid) - ref, color=c, lw=1.6, label=f"{data.label}: {star}{gain}")
        axr.scatter(x[inl], y[inl] - ref, color=c, s=14, zorder=3)
        if fit.band_rho:
            ax.fill_between(fit.band_rho, fit.band_lo, fit.band_hi, color=c, alpha=0.18, lw=0)
            axr.fill_between(fit.band_rho, np.asarray(fit.band_lo) - ref, np.asarray(fit.band_hi) - ref,
                             color=c, alpha=0.18, lw=0)
        for a, yv in ((ax, fit.loss_star), (axr, fit.loss_star - ref)):
            a.plot([fit.rho_star], [yv], marker="*", ms=13, color=c, mec="k", mew=0.6, zorder=4)
        if has_ci:
            axr.axvspan(lo, hi, color=c, alpha=0.08)
    ax.set_xlabel("rho (share of sparse parameters in routed experts)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    axr.axhline(0.0, color="0.5", lw=0.8, ls="--")
    axr.set_xlabel("rho")
    axr.set_ylabel("loss - fitted loss at rho = 1")
    axr.set_title("relative to pure MoE (bands: bootstrap CIs of the curve and of rho*)", fontsize=10)
    axr.grid(alpha=0.3)
    if any(fit is not None for _, fit in curves):
        axr.legend(fontsize=8)
    return _finish(fig, path)


def plot_memory_scaling(data: CurveData, fit: Optional[PowerLawFit], path: Path,
                        title: str = "Infinite memory: loss vs Engram slots (fixed backbone)",
                        xlabel: str = "Engram slots") -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    x, y = np.asarray(data.x, float), np.asarray(data.loss, float)
    label = data.label + (f" ({data.n_missing} without loss)" if data.n_missing else "")
    ax.scatter(x, y, s=24, zorder=3, label=label)
    if fit is not None and x.size:
        grid = np.geomspace(x.min(), x.max(), 200)
        ax.plot(grid, fit.predict(grid), lw=1.6, label=f"{fit.a:.3f} + {fit.b:.3f} (s/{fit.s0:.3g})^-{fit.c:.3f}")
        ax.plot(grid, fit.predict_loglinear(grid), lw=1.2, ls="--",
                label=f"log-linear: {fit.beta:+.4f} per decade")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _finish(fig, path)
