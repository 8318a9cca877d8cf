"""U-curve and power-law fits: recovery, interval coverage over synthetic sweeps, outlier robustness."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sweeps.fit import expanded_quantiles, fit_power_law, fit_u_curve, huber_irls

RHO_TRUE, CURV, FLOOR = 0.75, 0.3, 2.0


def truth(rho):
    return FLOOR + CURV * (np.asarray(rho) - RHO_TRUE) ** 2


GAIN_TRUE = float(truth(1.0) - truth(RHO_TRUE))


def sweep(rng, grid, seeds, sigma):
    rho = np.repeat(grid, seeds)
    return rho, truth(rho) + rng.normal(0.0, sigma, rho.size)


def test_exact_quadratic_is_recovered():
    rho = np.linspace(0.2, 1.0, 7)
    f = fit_u_curve(rho, truth(rho), n_boot=200)
    assert f.rho_star == pytest.approx(RHO_TRUE, abs=1e-9)
    assert f.gain_vs_moe == pytest.approx(GAIN_TRUE, rel=1e-6)
    assert f.coef == pytest.approx([FLOOR + CURV * RHO_TRUE**2, -2 * CURV * RHO_TRUE, CURV], abs=1e-8)
    assert f.interior and f.vertex == pytest.approx(RHO_TRUE)
    assert f.predict([0.5])[0] == pytest.approx(truth(0.5))


@pytest.mark.parametrize("seeds,grid,sigma,expect", [
    (1, np.linspace(0.2, 1.0, 9), 0.003, "residual"),
    (1, np.linspace(0.2, 1.0, 5), 0.002, "residual"),
    (2, np.linspace(0.2, 1.0, 5), 0.003, "residual"),
    (3, np.linspace(0.2, 1.0, 5), 0.005, "strata"),
])
def test_interval_covers_truth_in_most_synthetic_sweeps(seeds, grid, sigma, expect):
    """Nominal 90% intervals for rho* and the gain cover the truth in >= 80% of 150 noisy sweeps."""
    rng = np.random.default_rng(seeds * 100 + grid.size)
    trials, cover_rho, cover_gain, errors = 150, 0, 0, []
    for t in range(trials):
        rho, loss = sweep(rng, grid, seeds, sigma)
        f = fit_u_curve(rho, loss, n_boot=600, level=0.9, seed=t)
        assert f.bootstrap == expect
        lo, hi = f.rho_star_ci
        assert lo <= f.rho_star <= hi
        cover_rho += lo <= RHO_TRUE <= hi
        cover_gain += f.gain_vs_moe_ci[0] <= GAIN_TRUE <= f.gain_vs_moe_ci[1]
        errors.append(f.rho_star - RHO_TRUE)
    assert cover_rho / trials >= 0.80, cover_rho / trials
    assert cover_gain / trials >= 0.80, cover_gain / trials
    assert cover_rho / trials <= 0.995  # intervals are not uselessly wide
    assert abs(np.median(errors)) < 0.02  # point estimate unbiased to within the grid's resolution


def test_one_outlier_barely_moves_the_robust_fit():
    rng = np.random.default_rng(7)
    rho, loss = sweep(rng, np.linspace(0.2, 1.0, 9), 2, 0.003)
    spike = 4  # a seed at rho = 0.4 with a loss spike of 0.3 nats
    loss[spike] += 0.3
    f = fit_u_curve(rho, loss, n_boot=500)
    X = np.stack([np.ones_like(rho), rho, rho * rho], axis=1)
    c = np.linalg.lstsq(X, loss, rcond=None)[0]
    ols_star = -c[1] / (2 * c[2])
    assert abs(f.rho_star - RHO_TRUE) < 0.03
    assert abs(ols_star - RHO_TRUE) > 0.1  # least squares would have been dragged away
    assert spike in f.outliers
    assert f.rho_star_ci[0] <= RHO_TRUE <= f.rho_star_ci[1]
    assert f.scale_source == "pure_error" and f.bootstrap == "residual"
    # the outlier's residual must not shift the bootstrap: the band straddles the fitted curve everywhere
    centre = f.predict(f.band_rho)
    assert np.all(np.asarray(f.band_lo) < centre) and np.all(centre < np.asarray(f.band_hi))


def test_failed_runs_are_dropped_and_outlier_indices_refer_to_the_input():
    rng = np.random.default_rng(3)
    rho, loss = sweep(rng, np.linspace(0.2, 1.0, 9), 1, 0.002)
    loss[1] = np.nan  # a failed run
    loss[6] += 0.5
    f = fit_u_curve(rho, loss, n_boot=200)
    assert f.n_points == 8 and f.n_rho == 8
    assert f.outliers == [6]
    assert abs(f.rho_star - RHO_TRUE) < 0.05


def test_monotone_data_has_no_interior_minimum_and_is_flagged():
    rho = np.linspace(0.2, 1.0, 6)
    loss = 2.5 - 0.2 * rho + np.array([0.001, -0.001, 0.0005, -0.0005, 0.001, 0.0])
    f = fit_u_curve(rho, loss, n_boot=300)
    assert not f.interior
    assert f.rho_star == pytest.approx(1.0)
    assert f.gain_vs_moe == pytest.approx(0.0, abs=1e-12)
    assert any("no interior minimum" in n for n in f.notes)
    assert f.boot_interior_frac < 0.5


def test_three_points_interpolate_without_an_interval_and_json_is_valid():
    f = fit_u_curve([0.4, 0.7, 1.0], [2.05, 2.0, 2.03], n_boot=100)
    assert f.bootstrap == "none" and f.n_boot == 0
    assert all(math.isnan(v) for v in f.rho_star_ci)
    d = f.to_dict()
    assert d["rho_star_ci"] == [None, None]
    json.dumps(d, allow_nan=False)  # strict JSON: NaN became null


def test_reference_outside_the_range_is_flagged():
    rho = np.array([0.2, 0.4, 0.6, 0.8])
    f = fit_u_curve(rho, truth(rho) + np.array([0.001, -0.001, 0.001, -0.001]), n_boot=100)
    assert f.ref_extrapolated and any("extrapolated" in n for n in f.notes)


def test_bootstrap_is_reproducible_from_its_seed():
    rng = np.random.default_rng(0)
    rho, loss = sweep(rng, np.linspace(0.2, 1.0, 5), 2, 0.003)
    a = fit_u_curve(rho, loss, n_boot=300, seed=5)
    b = fit_u_curve(rho, loss, n_boot=300, seed=5)
    c = fit_u_curve(rho, loss, n_boot=300, seed=6)
    assert a.rho_star_ci == b.rho_star_ci and a.rho_star_ci != c.rho_star_ci
    assert len(a.band_rho) == len(a.band_lo) == len(a.band_hi) > 0
    assert np.all(np.asarray(a.band_lo) <= np.asarray(a.band_hi))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(rho=[0.2, 0.5], loss=[1.0, 2.0]), ">= 3 distinct rho"),
    (dict(rho=[0.2, 0.5, 0.8, 1.0], loss=[1.0, np.nan, np.nan, 2.0]), ">= 3 distinct rho"),
    (dict(rho=[0.2, 0.5, 0.8], loss=[1.0, 2.0]), "differ in length"),
    (dict(rho=[0.2, np.nan, 0.8], loss=[1.0, 2.0, 3.0]), "non-finite"),
    (dict(rho=[0.2, 0.5, 0.8], loss=[1.0, 2.0, 3.0], bootstrap="jackknife"), "bootstrap must be"),
    (dict(rho=[0.2, 0.5, 0.8], loss=[1.0, 2.0, 3.0], level=1.5), "level must be"),
    (dict(rho=[0.2, 0.2, 0.5, 0.8], loss=[1.0, 1.1, 2.0, 3.0], bootstrap="strata"), ">= 2 finite seeds"),
])
def test_bad_input_is_refused_in_one_line(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        fit_u_curve(**kwargs)


def test_huber_irls_matches_least_squares_on_clean_data_and_resists_an_outlier():
    rng = np.random.default_rng(1)
    x = np.linspace(-1, 1, 20)
    X = np.stack([np.ones_like(x), x, x * x], axis=1)
    y = X @ np.array([1.0, -0.5, 2.0]) + rng.normal(0, 0.01, x.size)
    beta, w = huber_irls(X, y[None, :], scale=1e9)
    assert np.allclose(beta[0], np.linalg.lstsq(X, y, rcond=None)[0]) and np.all(w == 1)
    y[3] += 5.0
    beta, w = huber_irls(X, y[None, :], scale=0.01)
    assert np.allclose(beta[0], [1.0, -0.5, 2.0], atol=0.02)
    assert w[0, 3] < 0.01 and np.median(w) == 1.0


def test_expanded_quantiles_widen_with_few_degrees_of_freedom():
    assert expanded_quantiles(0.9, 10_000) == pytest.approx([0.05, 0.95], abs=1e-4)
    lo2, hi2 = expanded_quantiles(0.9, 2)
    lo10, _ = expanded_quantiles(0.9, 10)
    assert lo2 < lo10 < 0.05 and hi2 == pytest.approx(1 - lo2)
    with pytest.raises(ValueError, match="degree of freedom"):
        expanded_quantiles(0.9, 0)


# ---- power law ("infinite memory") -------------------------------------------------------------------
SLOTS = np.geomspace(2.58e5, 1e7, 7)


def memory_truth(s):
    return 1.7 + 0.4 * (s / SLOTS[0]) ** -0.3


def test_power_law_recovers_exponent_and_log_linear_slope():
    rng = np.random.default_rng(2)
    f = fit_power_law(SLOTS, memory_truth(SLOTS) + rng.normal(0, 0.001, SLOTS.size), n_boot=300, level=0.9)
    assert f.c == pytest.approx(0.3, abs=0.05) and f.a == pytest.approx(1.7, abs=0.03)
    assert f.c_ci[0] <= 0.3 <= f.c_ci[1] and f.decreasing
    ll = np.polyfit(np.log10(SLOTS), memory_truth(SLOTS), 1)[0]
    assert f.beta_ci[0] <= ll <= f.beta_ci[1] and f.beta < 0
    assert f.rmse < f.rmse_loglinear  # the curved form fits a curved truth better
    assert np.allclose(f.predict(SLOTS), memory_truth(SLOTS), atol=0.005)


def test_power_law_interval_covers_truth_in_most_trials():
    rng = np.random.default_rng(11)
    trials, cover = 150, 0
    for t in range(trials):
        f = fit_power_law(SLOTS, memory_truth(SLOTS) + rng.normal(0, 0.003, SLOTS.size), n_boot=400, level=0.9,
                          seed=t)
        cover += f.c_ci[0] <= 0.3 <= f.c_ci[1]
    assert 0.78 <= cover / trials <= 0.99, cover / trials


def test_exactly_log_linear_data_gives_the_paper_slope():
    f = fit_power_law(SLOTS, 2.0 - 0.05 * np.log10(SLOTS), n_boot=50)
    assert f.beta == pytest.approx(-0.05, abs=1e-9) and f.rmse_loglinear < 1e-9


@pytest.mark.parametrize("slots,loss,msg", [
    ([1e5, 1e6, 1e7], [2.0, 1.9, 1.8], ">= 4 distinct"),
    ([1e5, 1e6, -1.0, 1e8], [2.0, 1.9, 1.8, 1.7], "positive"),
])
def test_power_law_refuses_bad_input(slots, loss, msg):
    with pytest.raises(ValueError, match=msg):
        fit_power_law(slots, loss)
