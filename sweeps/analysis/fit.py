"""Sweep fits, one import away: the allocation U-curve (verdict, rho*, gain, intervals: sweeps.analysis.ucurve),
power (sweeps.analysis.power), the trend across budgets (sweeps.analysis.trend) and the infinite-memory power law
(sweeps.analysis.powerlaw).

Command line, for any table of results (CSV with columns ``rho``, ``seed``, ``val_loss`` and optionally
``budget``)::

    python -m sweeps.analysis.fit --csv results.csv [--level 0.95] [--n-boot 4000] [--rho-ref 1.0]

prints the ``fit`` JSON a sweep writes to its summary.json (one per budget, plus their trend, when the
table has a ``budget`` column with several values), after one line per budget that states the verdict.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from sweeps.analysis.fitutil import ci_text, json_safe
from sweeps.analysis.powerlaw import PowerLawFit, expanded_quantiles, fit_power_law
from sweeps.analysis.trend import fit_trend
from sweeps.analysis.ucurve import UCurveFit, fit_u_curve

__all__ = ["UCurveFit", "PowerLawFit", "fit_u_curve", "fit_power_law", "fit_trend", "json_safe",
           "expanded_quantiles", "verdict_line", "read_csv", "main"]


def verdict_line(fit: Optional[dict]) -> str:
    """One line, verdict first, then rho* and the gain with their intervals (a ``fit`` dict)."""
    if not fit:
        return "verdict: insufficient (no fit)"
    head = f"verdict: {fit['verdict']} ({fit.get('reason') or ''})"
    if fit["verdict"] == "insufficient":
        return head
    lvl = f"{100 * fit['level']:.0f}%"
    mde = fit.get("mde")
    what = fit.get("gain_estimator") or "point"  # a lower bound inside its interval (sweeps.analysis.ucurve)
    return (f"{head}; rho* = {fit['rho_star']:.3f} {ci_text(fit['rho_star_ci'], '.3f')}, gain over rho="
            f"{fit['rho_ref']:g} = {fit['gain_vs_moe']:+.4f} nats ({what}) {ci_text(fit['gain_vs_moe_ci'], '.4f')} "
            f"({lvl}); noise sd {fit['sigma']:.4f} ({fit['sigma_dof']} dof); detectable gain "
            + ("?" if mde is None else f"{mde:.4f}") + " nats")


def read_csv(path: Path) -> dict[Optional[float], tuple[list[float], list[int], list[float]]]:
    """{budget or None: (rho, seed, val_loss)} from a CSV; a one-line error names what is wrong."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        missing = {"rho", "seed", "val_loss"} - cols
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)} (need rho, seed, val_loss; optional budget)")
        out: dict = {}
        for i, row in enumerate(reader, start=2):
            try:
                budget = float(row["budget"]) if "budget" in cols and row["budget"] not in ("", None) else None
                loss = float(row["val_loss"]) if row["val_loss"] not in ("", None) else math.nan
                rho, seed = float(row["rho"]), int(float(row["seed"]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{i}: not a number ({e})") from None
            r, s, y = out.setdefault(budget, ([], [], []))
            r.append(rho), s.append(seed), y.append(loss)
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.analysis.fit", description="Fit an allocation sweep from a CSV.")
    p.add_argument("--csv", type=Path, required=True, help="columns rho, seed, val_loss (optional budget)")
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--n-boot", type=int, default=4000, help="posterior draws")
    p.add_argument("--rho-ref", type=float, default=1.0)
    args = p.parse_args(argv)
    try:
        tables = read_csv(args.csv)
        fits = {b: fit_u_curve(r, y, s, rho_ref=args.rho_ref, n_boot=args.n_boot, level=args.level).to_dict()
                for b, (r, s, y) in tables.items()}
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for b, fit in fits.items():
        print(("" if b is None else f"budget {b:g}: ") + verdict_line(fit), file=sys.stderr)
    if list(fits) == [None]:
        print(json.dumps(fits[None], indent=1, allow_nan=False))
    else:
        budgets = [b for b in fits if b is not None]
        out = {"fits": {f"{b:g}": fits[b] for b in budgets}, "trend": fit_trend(budgets, [fits[b] for b in budgets])}
        print(json.dumps(json_safe(out), indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
