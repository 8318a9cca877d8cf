"""Power-law ("infinite memory") fit: recovery, interval coverage, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from sweeps.analysis.fit import expanded_quantiles, fit_power_law


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
