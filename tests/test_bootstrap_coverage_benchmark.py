"""The double-bootstrap calibrated interval that ``benchmarks/bootstrap_coverage.py``
measures beside the library's intervals (issue 28: coverage at nominal)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bootstrap_coverage.py"
_spec = importlib.util.spec_from_file_location("bootstrap_coverage_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_calibrated_levels_and_interval_by_hand():
    # u_b = share of row b's inner estimates <= 2 * outer_b - value = [-2, 0, 2, 4]
    outer = np.array([-1.0, 0.0, 1.0, 2.0])
    inner = np.array([[-3.0, -2, -1, 0], [1, 2, 3, 4], [0, 1, 2, 3], [0, 0, 0, 0]])
    # u = [0.5, 0, 0.75, 1]: upper tail level q_0.25(u) = 0.375; lower tail level
    # q_0.25(1 - u) = 0.1875 (both above the floor 0.5 / 4); then the basic interval
    # 2*0 - q_{1-0.1875}(outer) ... 2*0 - q_{0.375}(outer)
    low, high = bench.calibrated_basic(0.0, outer, inner, ci=0.5)
    assert low == pytest.approx(-1.4375)
    assert high == pytest.approx(-0.125)


def test_calibrated_interval_is_the_basic_one_for_a_pivotal_mean(rng):
    """The mean of normal data is pivotal: the inner resamples vary about their outer
    one as the outer ones vary about the estimate, so the calibrated tail levels stay
    near the nominal 2.5 % and the interval near the basic one (scipy's)."""
    from scipy import stats

    x = rng.standard_normal(200)
    n_boot, n_inner = 400, 100
    outer_rows = rng.integers(0, x.size, (n_boot, x.size))
    outer = x[outer_rows].mean(1)
    inner_rows = np.take_along_axis(np.repeat(outer_rows[:, None], n_inner, 1),
                                    rng.integers(0, x.size, (n_boot, n_inner, x.size)), 2)
    inner = x[inner_rows].mean(2)
    low, high = bench.calibrated_basic(x.mean(), outer, inner, ci=0.95)
    basic = stats.bootstrap((x,), np.mean, method="basic", n_resamples=4000,
                            random_state=np.random.default_rng(0)).confidence_interval
    width = basic.high - basic.low
    assert abs(low - basic.low) < 0.3 * width   # at most 0.21 over 20 seeds (B = 400)
    assert abs(high - basic.high) < 0.3 * width


def test_no_finite_resample_gives_no_interval():
    assert np.isnan(bench.calibrated_basic(0.0, np.full(3, np.nan), np.zeros((3, 2)),
                                           ci=0.95)).all()
