"""Small helpers shared by the sweep fits: strict-JSON values and input checks."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.interpolate import CubicSpline


def json_safe(obj):
    """``obj`` with non-finite floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def check_xy(x: Sequence[float], y: Sequence[float], xname: str) -> tuple[np.ndarray, np.ndarray]:
    """x, y as float arrays of equal length; x must be finite (y may hold NaN for failed runs)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{xname} and loss differ in length ({x.size} != {y.size})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{xname} contains non-finite values")
    return x, y


def nan_list(v) -> list[float]:
    """A JSON interval back as floats (null -> NaN)."""
    return [math.nan if x is None else float(x) for x in (v or [None, None])]


def ci_text(v, fmt: str) -> str:
    """An interval as text, "[lo, hi]", or "[no interval]" when either end is missing."""
    lo, hi = v if v is not None else (None, None)
    ok = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
    return f"[{lo:{fmt}}, {hi:{fmt}}]" if ok else "[no interval]"


def spline_matrix(levels: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """[G, R] weights: the not-a-knot cubic spline through any knot values v, evaluated at rho, is W @ v."""
    return CubicSpline(levels, np.eye(levels.size), axis=0, bc_type="not-a-knot")(rho)


def effect_coding(idx: np.ndarray, k: int) -> np.ndarray:
    """[n, k-1] sum-to-zero coding of a factor with k levels (last level = minus the others)."""
    out = np.zeros((idx.size, max(k - 1, 0)))
    for j in range(k - 1):
        out[idx == j, j] = 1.0
    out[idx == k - 1, :] = -1.0
    return out


def ols(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, int, np.ndarray]:
    """Least squares: (coefficients [p], residual sum of squares, residual dof, pinv(X'X) [p, p])."""
    _, sv, vt = np.linalg.svd(X, full_matrices=False)  # one SVD gives the rank and pinv(X'X)
    keep = sv > sv.max(initial=0.0) * max(X.shape) * np.finfo(float).eps
    v = vt[keep].T / sv[keep]  # [p, rank]
    xtx_inv = v @ v.T
    beta = xtx_inv @ (X.T @ y)
    resid = y - X @ beta
    return beta, float(resid @ resid), y.size - int(keep.sum()), xtx_inv
