"""PNG figures of sweeps (matplotlib, Agg backend: no display needed).

``plot_u_curves`` overlays the allocation sweeps of several budgets: the runs' validation losses, the
fitted curve (spline through the seed-adjusted means) with its pointwise band, rho* with its interval; a
second panel shows every curve relative to its own fitted loss at rho = 1, so budgets with different loss
levels compare. Legends and titles state each sweep's verdict first, then rho* and the gain with intervals.
``plot_trend`` draws rho* and the gain against budget with their intervals and fitted trend lines.
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

from sweeps.analysis.fitutil import ci_text  # noqa: E402
from sweeps.analysis.powerlaw import PowerLawFit  # noqa: E402
from sweeps.analysis.ucurve import UCurveFit  # noqa: E402


@dataclass
class CurveData:
    """One sweep's points for a figure: completed runs' (x, loss) and how many runs have no loss."""

    label: str  # legend entry, e.g. "1e13 FLOPs"
    x: Sequence[float]  # rho (allocation) or slots (memory)
    loss: Sequence[float]
    n_missing: int = 0  # runs not fitted: failed, unfinished, or excluded (off the FLOP budget)
    outliers: list[int] = field(default_factory=list)  # indices into x/loss flagged by the fit


def _finish(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def fit_label(fit: UCurveFit) -> str:
    """Verdict first, then rho* and the gain with their intervals."""
    if fit.verdict == "insufficient":
        return f"insufficient: {fit.reason}"
    return (f"{fit.verdict}: rho*={fit.rho_star:.2f} {ci_text(fit.rho_star_ci, '.2f')}, "
            f"gain {fit.gain_vs_moe:+.4f} {ci_text(fit.gain_vs_moe_ci, '.4f')} ({100 * fit.level:.0f}%)")


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
        label = data.label + (f" ({data.n_missing} not fitted)" if data.n_missing else "")
        inl = np.ones(x.size, bool)
        inl[[j for j in data.outliers if j < x.size]] = False
        ax.scatter(x[inl], y[inl], color=c, s=22, zorder=3, label=label)
        if (~inl).any():
            ax.scatter(x[~inl], y[~inl], color=c, marker="x", s=40, zorder=3)
        if fit is None or fit.verdict == "insufficient":
            continue
        grid = np.linspace(fit.rho_range[0], fit.rho_range[1], 200)
        ax.plot(grid, fit.predict(grid), color=c, lw=1.6)
        ref = fit.loss_ref
        axr.plot(grid, fit.predict(grid) - ref, color=c, lw=1.6, label=f"{data.label}: {fit_label(fit)}")
        axr.scatter(x[inl], y[inl] - ref, color=c, s=14, zorder=3)
        if fit.band_rho:
            ax.fill_between(fit.band_rho, fit.band_lo, fit.band_hi, color=c, alpha=0.18, lw=0)
            axr.fill_between(fit.band_rho, np.asarray(fit.band_lo) - ref, np.asarray(fit.band_hi) - ref,
                             color=c, alpha=0.18, lw=0)
        for a, yv in ((ax, fit.loss_star), (axr, fit.loss_star - ref)):
            a.plot([fit.rho_star], [yv], marker="*", ms=13, color=c, mec="k", mew=0.6, zorder=4)
        lo, hi = fit.rho_star_ci
        if math.isfinite(lo) and math.isfinite(hi):
            axr.axvspan(lo, hi, color=c, alpha=0.08)
    ax.set_xlabel("rho (share of sparse parameters in routed experts)")
    ax.set_ylabel("validation loss (nats)")
    fitted = [f for _, f in curves if f is not None]
    if len(fitted) == 1:  # one sweep: its verdict leads the title
        title = f"{fit_label(fitted[0])}\n{title}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    axr.axhline(0.0, color="0.5", lw=0.8, ls="--")
    axr.set_xlabel("rho")
    axr.set_ylabel("loss - fitted loss at rho = 1")
    axr.set_title("relative to pure MoE (bands: intervals of the curve and of rho*)", fontsize=10)
    axr.grid(alpha=0.3)
    if any(fit is not None and fit.verdict != "insufficient" for _, fit in curves):
        axr.legend(fontsize=8, loc="best")
    return _finish(fig, path)


def plot_memory_scaling(data: CurveData, fit: Optional[PowerLawFit], path: Path,
                        title: str = "Infinite memory: loss vs Engram slots (fixed backbone)",
                        xlabel: str = "Engram slots") -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    x, y = np.asarray(data.x, float), np.asarray(data.loss, float)
    label = data.label + (f" ({data.n_missing} not fitted)" if data.n_missing else "")
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


def plot_trend(trend: dict, path: Path) -> Path:
    """rho* and the gain against budget (log axis), intervals as error bars, fitted lines (sweeps.analysis.trend)."""
    pts = trend["points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    b = np.array([p["budget"] for p in pts], float)
    for ax, key, ci, name in ((axes[0], "rho_star", "rho_star_ci", "rho*"), (axes[1], "gain", "gain_ci",
                                                                             "gain over rho = 1 (nats)")):
        y = np.array([p[key] for p in pts], float)
        lo, hi = (np.array([p[ci][i] for p in pts], float) for i in (0, 1))
        ax.errorbar(b, y, yerr=[y - lo, hi - y], fmt="o", capsize=4)
        for p in pts:
            ax.annotate(p["verdict"], (p["budget"], p[key]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        line = trend.get(key)
        if line:
            g = np.geomspace(b.min(), b.max(), 50)
            lo_s, hi_s = line["slope_ci"]
            ax.plot(g, line["intercept"] + line["slope_per_decade"] * np.log10(g), lw=1.2,
                    label=f"{line['slope_per_decade']:+.3f} per decade [{lo_s:+.3f}, {hi_s:+.3f}]")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"optimum vs budget ({100 * trend['level']:.0f}% intervals)", fontsize=10)
    axes[1].set_title("gain vs budget", fontsize=10)
    return _finish(fig, path)
