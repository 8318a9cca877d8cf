"""rho* and the gain against the training budget, across the allocation sweeps of one output directory.

Each budget contributes its point estimate and its interval; the interval's half-width over the normal
quantile of its level is taken as the estimate's standard error (intervals are not symmetric, and the
gain's is conservative, from a simultaneous band: the mean half-width is used, so the trend's intervals
err wide). The gain's point is a 75% lower bound (sweeps.analysis.ucurve): it reads low by about a standard error,
more at budgets with more noise, so the gain trend's level is conservative. The trend is a weighted
least-squares line in log10(budget) with those standard errors known (inverse-variance weights, normal
intervals): with two budgets it is the line through them, its slope interval carrying both points'
uncertainty. Budgets whose verdict is "insufficient" (no interval) are left out and listed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import norm

from sweeps.analysis.fitutil import json_safe, nan_list


def _line(x: np.ndarray, y: np.ndarray, se: np.ndarray, level: float) -> dict:
    """Inverse-variance weighted line y = a + b x; slope with its normal interval at ``level``."""
    w = 1.0 / np.maximum(se, 1e-12) ** 2
    X = np.stack([np.ones_like(x), x], axis=1)
    cov = np.linalg.inv(X.T @ (X * w[:, None]))
    a, b = cov @ (X.T @ (w * y))
    zq = float(norm.isf((1 - level) / 2))
    sb = math.sqrt(cov[1, 1])
    return {"intercept": float(a), "slope_per_decade": float(b), "slope_ci": [b - zq * sb, b + zq * sb]}


def fit_trend(budgets: Sequence[float], fits: Sequence[dict], level: float = 0.95) -> dict:
    """Trend of rho* and the gain over budgets from each sweep's ``fit`` dict (summary.json)."""
    rows, skipped = [], []
    for budget, fit in sorted(zip(budgets, fits), key=lambda p: p[0]):
        lo, hi = nan_list((fit or {}).get("rho_star_ci"))
        glo, ghi = nan_list((fit or {}).get("gain_vs_moe_ci"))
        if not all(math.isfinite(v) for v in (lo, hi, glo, ghi)):
            fit = fit or {}
            skipped.append({"budget": budget, "verdict": fit.get("verdict"), "reason": fit.get("reason")})
            continue
        rows.append({"budget": budget, "verdict": fit["verdict"], "rho_star": fit["rho_star"], "rho_star_ci": [lo, hi],
                     "gain": fit["gain_vs_moe"], "gain_ci": [glo, ghi], "level": fit.get("level", level)})
    out = {"points": rows, "skipped": skipped, "level": level, "rho_star": None, "gain": None}
    if len(rows) >= 2:
        x = np.log10([r["budget"] for r in rows])
        zq = np.array([norm.isf((1 - r["level"]) / 2) for r in rows])
        for key, ci in (("rho_star", "rho_star_ci"), ("gain", "gain_ci")):
            y = np.array([r[key] for r in rows])
            se = np.array([(r[ci][1] - r[ci][0]) / 2 for r in rows]) / zq
            out[key] = _line(x, y, se, level)
    else:
        out["note"] = f"{len(rows)} budget(s) with intervals: a trend needs >= 2"
    return json_safe(out)
