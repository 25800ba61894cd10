"""gradbrain.stats: bootstrap intervals against scipy.stats.bootstrap on the same resamples."""

import numpy as np
import pytest
from scipy import stats
from scipy.stats._resampling import BootstrapResult

from gradbrain.stats import INTERVALS, bootstrap_interval


def _scipy_interval(data, statistic, samples, method, ci):
    """scipy's interval computed from *our* resamples (``bootstrap_result`` with no new
    resample): its own estimate, jackknife and quantiles."""
    given = BootstrapResult(confidence_interval=None, bootstrap_distribution=samples,
                            standard_error=None)
    out = stats.bootstrap((data,), statistic, n_resamples=0, bootstrap_result=given,
                          method=method, confidence_level=ci)
    return out.confidence_interval.low, out.confidence_interval.high


@pytest.mark.parametrize("method", ["percentile", "basic", "BCa"])
@pytest.mark.parametrize("ci", [0.9, 0.95])
def test_bootstrap_interval_equals_scipy_on_the_same_resamples(method, ci):
    """A skewed statistic (sd of exponential data) on 999 resamples: the same interval
    as scipy.stats.bootstrap computes from those resamples."""
    rng = np.random.default_rng(3)
    x = rng.exponential(size=25)
    rows = rng.integers(0, len(x), (999, len(x)))
    samples = np.array([np.std(x[r]) for r in rows])
    jackknife = np.array([np.std(np.delete(x, i)) for i in range(len(x))])
    ours = bootstrap_interval(np.std(x), samples, ci=ci, method=method.lower(),
                              jackknife=jackknife)
    np.testing.assert_allclose(ours, _scipy_interval(x, np.std, samples, method, ci),
                               rtol=1e-12)


def test_bootstrap_interval_methods_differ_where_the_resamples_are_biased():
    """Resamples all below the estimate (a biased statistic): percentile lies below it,
    basic above it (reflected), BCa undefined."""
    samples = np.linspace(0.60, 0.80, 201)
    pct = bootstrap_interval(0.85, samples, method="percentile")
    basic = bootstrap_interval(0.85, samples, method="basic")
    assert pct[1] < 0.85 < basic[0]
    np.testing.assert_allclose(basic, (2 * 0.85 - pct[1], 2 * 0.85 - pct[0]))
    assert np.isnan(bootstrap_interval(0.85, samples, method="bca",
                                       jackknife=np.linspace(0.8, 0.9, 10))).all()


def test_bootstrap_interval_drops_nan_resamples_and_refuses_bad_input():
    samples = np.array([0.1, np.nan, 0.2, 0.3, 0.4, 0.5])
    assert bootstrap_interval(0.3, samples, ci=0.5, method="percentile") == (0.2, 0.4)
    assert np.isnan(bootstrap_interval(0.3, [np.nan, np.nan])).all()
    assert np.isnan(bootstrap_interval(np.nan, samples)).all()
    assert INTERVALS == ("percentile", "basic", "bca")
    with pytest.raises(ValueError, match="'method' must be one of"):
        bootstrap_interval(0.3, samples, method="studentised")
    with pytest.raises(ValueError, match="method='bca' needs 'jackknife'"):
        bootstrap_interval(0.3, samples, method="bca")
    with pytest.raises(ValueError, match="'jackknife' must be 3 or more finite"):
        bootstrap_interval(0.3, samples, method="bca", jackknife=[0.1, np.nan, 0.2])
    with pytest.raises(ValueError, match="'ci' must be a number in"):
        bootstrap_interval(0.3, samples, ci=95)


def test_wilson_interval_equals_scipy_and_always_holds_its_estimate():
    """The Wilson interval of every k of n (n <= 60) equals scipy's, and holds k/n exactly
    (rounding had put the upper bound of 20 of 20 a hair below 1, and a figure's error
    bar failed on the negative length)."""
    from gradbrain.stats import _wilson

    for n in range(1, 61):
        for k in range(n + 1):
            low, high = _wilson(k, n)
            ci = stats.binomtest(k, n).proportion_ci(method="wilson")
            assert low == pytest.approx(ci.low, abs=1e-12)
            assert high == pytest.approx(ci.high, abs=1e-12)
            assert low <= k / n <= high, (k, n, low, high)
    assert np.isnan(_wilson(0, 0)).all()
