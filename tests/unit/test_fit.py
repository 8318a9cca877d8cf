"""Allocation fit: recovery, verdicts, insufficient designs, seed blocking, JSON, CSV entry point."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sweeps.analysis.fit import fit_u_curve, main as fit_main, verdict_line
from sweeps.analysis.power import mde_of, noise_dof, seeds_needed

RHO_TRUE, CURV, FLOOR = 0.75, 0.3, 2.0
GRID5 = np.linspace(0.2, 1.0, 5)


def truth(rho):
    return FLOOR + CURV * (np.asarray(rho) - RHO_TRUE) ** 2


def design(grid, seeds):
    return np.repeat(grid, seeds), np.tile(np.arange(seeds), len(grid))


def test_exact_quadratic_is_recovered_with_a_u_verdict():
    rho, seed = design(GRID5, 2)
    f = fit_u_curve(rho, truth(rho) + 1e-4 * np.sin(11 * rho + 3 * seed), seed, n_boot=500)
    assert f.rho_star == pytest.approx(RHO_TRUE, abs=0.003)
    assert f.verdict == "U", f.reason
    assert f.predict([0.5])[0] == pytest.approx(truth(0.5), abs=2e-4)
    assert f.gain_vs_moe == pytest.approx(truth(1.0) - truth(RHO_TRUE), abs=2e-4)
    assert f.rho_star_ci[0] < RHO_TRUE < f.rho_star_ci[1] and f.gain_vs_moe_ci[0] > 0
    assert f.rho_star_shape < 0.005  # a parabola has no shape error to widen for


def test_monotone_truth_is_called_monotone():
    rho, seed = design(GRID5, 3)
    f = fit_u_curve(rho, 2.5 - 0.2 * rho + 1e-3 * np.sin(7 * rho + seed), seed, n_boot=500)
    assert f.verdict == "monotone", f.reason
    assert f.rho_star == pytest.approx(1.0) and not f.interior and f.differs_from_ref


def test_monotone_needs_a_significant_slope():
    """Best at an end is "monotone" only when the gain band puts some rho significantly off rho_ref."""
    from dataclasses import replace

    from sweeps.analysis.ucurve import verdict_of

    rho, seed = design(GRID5, 3)
    f = fit_u_curve(rho, 2.5 + 0.2 * rho + 1e-3 * np.sin(7 * rho + seed), seed, n_boot=500)
    assert f.verdict == "monotone" and f.rho_star == pytest.approx(0.2) and f.gain_vs_moe_ci[0] > 0, f.reason
    verdict, why = verdict_of(replace(f, differs_from_ref=False), 0.05)
    assert verdict == "flat" and "no significant slope" in why


def test_shared_seed_effect_cancels():
    """A seed shifts every rho alike (it fixes the data order): the blocked fit must not see it at all."""
    rho, seed = design(GRID5, 3)
    rng = np.random.default_rng(4)
    y = truth(rho) + rng.normal(0, 0.005, rho.size)
    a = fit_u_curve(rho, y, seed, n_boot=500)
    b = fit_u_curve(rho, y + np.array([0.0, 0.1, -0.07])[seed], seed, n_boot=500)
    assert b.sigma == pytest.approx(a.sigma) and b.rho_star == pytest.approx(a.rho_star)
    assert b.rho_star_ci == pytest.approx(a.rho_star_ci) and b.verdict == a.verdict
    unblocked = fit_u_curve(rho, y + np.array([0.0, 0.1, -0.07])[seed], None, n_boot=500)
    assert unblocked.sigma > 5 * a.sigma  # ignoring the block would have called it noise


@pytest.mark.parametrize("rho,seed,why", [
    ([], [], "0 finished rho"),
    ([0.8], [0], "1 finished rho"),
    ([0.8, 0.8], [0, 1], "1 finished rho"),
    ([1.0, 0.6], [0, 0], "2 finished rho"),
    ([1.0, 0.6, 1.0, 0.6], [0, 0, 1, 1], "2 finished rho"),
    ([1.0, 0.6, 0.2], [0, 0, 0], "no degree of freedom"),
])
def test_too_little_data_is_insufficient_with_a_reason_and_no_bare_rho_star(rho, seed, why):
    f = fit_u_curve(rho, [2.0 + 0.01 * i for i in range(len(rho))], seed, n_boot=200)
    assert f.verdict == "insufficient" and why in f.reason
    assert math.isnan(f.rho_star) and all(math.isnan(v) for v in f.rho_star_ci)
    d = f.to_dict()
    json.dumps(d, allow_nan=False)
    assert verdict_line(d).startswith("verdict: insufficient")


def test_failed_runs_are_dropped_and_outliers_refer_to_the_input():
    rho, seed = design(np.linspace(0.2, 1.0, 9), 3)
    rng = np.random.default_rng(3)
    loss = truth(rho) + rng.normal(0, 0.002, rho.size)
    loss[1] = np.nan
    loss[6] += 0.2
    f = fit_u_curve(rho, loss, seed, n_boot=300)
    assert f.n_points == 26 and f.n_rho == 9 and f.outliers == [6]


def test_reference_outside_the_range_is_flagged_and_draws_are_reproducible():
    rho, seed = design(np.array([0.2, 0.4, 0.6, 0.8]), 2)
    y = truth(rho) + 0.001 * np.sin(7 * rho + 2 * seed)
    f = fit_u_curve(rho, y, seed, n_boot=300, seed=5)
    assert f.ref_extrapolated and any("outside the sampled range" in n for n in f.notes)
    assert fit_u_curve(rho, y, seed, n_boot=300, seed=5).rho_star_ci == f.rho_star_ci
    assert fit_u_curve(rho, y, seed, n_boot=300, seed=6).rho_star_ci != f.rho_star_ci


@pytest.mark.parametrize("kwargs,msg", [
    (dict(rho=[0.2, 0.5, 0.8], loss=[1.0, 2.0]), "differ in length"),
    (dict(rho=[0.2, np.nan, 0.8], loss=[1.0, 2.0, 3.0]), "non-finite"),
    (dict(rho=[0.2, 0.5, 0.8], loss=[1.0, 2.0, 3.0], seeds=[0, 1]), "seeds and rho differ"),
    (dict(rho=[0.2, 0.5, 0.8], loss=[1.0, 2.0, 3.0], level=1.5), "level must be"),
    (dict(rho=[0.2, 0.5, 0.8], loss=[1.0, 2.0, 3.0], n_boot=10), "n_boot must be"),
])
def test_bad_input_is_refused_in_one_line(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        fit_u_curve(**kwargs)


def test_power_formulas():
    assert noise_dof(5, 1) == 2 and noise_dof(5, 3) == 8
    assert mde_of(0.01, 8, [3] * 5) < mde_of(0.01, 2, [1] * 5)
    need = seeds_needed(0.014, 0.01, 5)
    assert need is not None and mde_of(0.01, noise_dof(5, need), [need] * 5) <= 0.014
    assert mde_of(0.01, noise_dof(5, need - 1), [need - 1] * 5) > 0.014 if need > 2 else True
    assert math.isnan(mde_of(0.01, 0, [1] * 5))


def test_csv_entry_point_prints_the_fit_json(tmp_path, capsys):
    path = tmp_path / "r.csv"
    rows = ["rho,seed,val_loss"] + [f"{r},{s},{truth(r) + 0.001 * s}" for r in GRID5 for s in (0, 1)]
    path.write_text("\n".join(rows))
    assert fit_main(["--csv", str(path), "--n-boot", "300"]) == 0
    out = capsys.readouterr()
    fit = json.loads(out.out)
    assert fit["verdict"] == "U" and out.err.startswith("verdict: U")
    two = tmp_path / "two.csv"
    two.write_text("rho,seed,val_loss\n1.0,0,2.1\n0.6,0,2.0\n")
    assert fit_main(["--csv", str(two), "--n-boot", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "insufficient"


def test_csv_with_budgets_fits_each_and_the_trend(tmp_path, capsys):
    path = tmp_path / "b.csv"
    rows = ["budget,rho,seed,val_loss"]
    for b, shift in ((1e13, 0.0), (1e14, 0.05)):
        rows += [f"{b},{r},{s},{truth(r - shift) + 0.001 * np.sin(9 * r + s)}" for r in GRID5 for s in (0, 1, 2)]
    path.write_text("\n".join(rows))
    assert fit_main(["--csv", str(path), "--n-boot", "300"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["fits"]) == {"1e+13", "1e+14"}
    slope = out["trend"]["rho_star"]["slope_per_decade"]
    lo, hi = out["trend"]["rho_star"]["slope_ci"]
    assert lo < slope < hi and slope == pytest.approx(0.05, abs=0.02)


def test_csv_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("rho,val_loss\n1.0,2.0\n")
    assert fit_main(["--csv", str(bad)]) == 2
    assert "missing column(s) ['seed']" in capsys.readouterr().err


def test_gain_point_is_a_lower_bound_inside_its_interval_even_with_a_failed_run():
    """The gain point is the band's 75% lower bound: close below a clear gain, inside its interval."""
    rho, seed = design(GRID5, 2)
    y = truth(rho) + 1e-3 * np.sin(11 * rho + 3 * seed)
    y[3] = math.nan  # rho 0.4, seed 1 failed
    f = fit_u_curve(rho, y, seed, n_boot=500)
    gain = truth(1.0) - truth(RHO_TRUE)
    assert f.gain_estimator == "75% lower bound" and f.n_points == 9
    assert gain - 3e-3 <= f.gain_vs_moe <= gain + 5e-4, (f.gain_vs_moe, gain)
    assert f.gain_vs_moe_ci[0] <= f.gain_vs_moe <= f.gain_vs_moe_ci[1]
    flat = fit_u_curve(rho[seed == 0], 2.0 + 1e-3 * np.sin(11 * rho[seed == 0]), n_boot=500)
    lo, hi = flat.gain_vs_moe_ci
    assert flat.gain_estimator == "75% lower bound" and lo <= flat.gain_vs_moe <= hi
