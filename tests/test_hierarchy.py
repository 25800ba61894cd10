"""Hierarchy scores and the backprop tests: against scipy/MNE and against planted truths."""

import copy
import dataclasses
import inspect
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.meta_analysis import combine_effects
from test_meg import _planted_features

from gradbrain import hierarchy
from gradbrain import stats as gstats
from gradbrain.analysis import simulation
from gradbrain.analysis.backprop import backprop_tests
from gradbrain.analysis.encoding import Encoding, check_encoding, fmri_encoding
from gradbrain.data import simulated
from gradbrain.data.simulated import make_study
from gradbrain.hierarchy import calibration


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_layer_permutation_test_equals_scipy_for_every_permutation(rng, method):
    """Observed and null correlations = scipy's on the same relabelled layers."""
    depth = np.linspace(0, 1, 7)
    index = rng.integers(0, 7, 300)
    target = index + rng.normal(0, 3, 300)
    target[:5] = np.nan  # left out
    out = hierarchy.layer_permutation_test(index, target, depth, method=method, n_perm=50,
                                           device="cpu")
    reference = stats.spearmanr if method == "spearman" else stats.pearsonr
    keep = np.isfinite(target)
    assert out["statistic"] == pytest.approx(reference(depth[index][keep], target[keep])[0],
                                             abs=1e-12)
    for perm, null in zip(out["permutations"][:10], out["null"][:10]):
        assert null == pytest.approx(reference(depth[perm][index][keep], target[keep])[0],
                                     abs=1e-12)
    expected_p = (1 + np.sum(out["null"] >= out["statistic"])) / 51
    assert out["p_value"] == pytest.approx(expected_p) and out["n_targets"] == 295


def test_permutation_p_values_are_calibrated_under_the_null(rng):
    """No relation planted: p < 0.05 in about 5 % of 400 draws; a planted one: always."""
    depth = np.linspace(0, 1, 10)
    p_null = [hierarchy.layer_permutation_test(rng.integers(0, 10, 200), rng.normal(size=200),
                                               depth, n_perm=200, seed=s, device="cpu")["p_value"]
              for s in range(400)]
    assert 0.02 < np.mean(np.array(p_null) < 0.05) < 0.09
    index = rng.integers(0, 10, 200)
    planted = hierarchy.layer_permutation_test(index, -index + rng.normal(0, 2, 200), depth,
                                               alternative="less", device="cpu")
    assert planted["p_value"] < 0.001 and planted["statistic"] < -0.6


def test_permutation_test_bad_inputs():
    depth = np.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="'layer_index' must hold layers 0 … 2"):
        hierarchy.layer_permutation_test([0, 3, 1], [1.0, 2, 3], depth)
    with pytest.raises(ValueError, match="at least 2 different layers"):
        hierarchy.layer_permutation_test([1, 1, 1], [1.0, 2, 3], depth)
    constant = hierarchy.layer_permutation_test([0, 1, 2], [5.0, 5, 5], depth)
    assert np.isnan(constant["statistic"]) and np.isnan(constant["p_value"])
    assert np.isnan(constant["min_p"]) and constant["n_layers_used"] == 3  # same keys
    with pytest.raises(ValueError, match="'alternative' must be one of"):
        hierarchy.layer_permutation_test([0, 1, 2], [1.0, 2, 3], depth, alternative="up")


def test_p_value_floor_counts_the_layers_targets_use():
    """Exhaustive reference: a perfectly ordered map over k = 3 of L = 5 layers, every
    one of the 5! assignments of depths to layers scored with scipy; the exact p-value
    is the share at least as large as the observed ρ, i.e. 1/3!, whatever L is."""
    from itertools import permutations

    values = np.linspace(0, 1, 5)
    index = np.repeat([0, 2, 4], 10)       # layers 1 and 3 win no vertex
    target = np.repeat([1.0, 2.0, 3.0], 10)
    observed = stats.spearmanr(values[index], target).statistic
    null = [stats.spearmanr(np.asarray(p)[index], target).statistic
            for p in permutations(values)]
    exact = np.mean(np.asarray(null) >= observed - 1e-12)
    assert exact == pytest.approx(1 / 6)
    assert hierarchy.min_p_value(3, 5) == pytest.approx(exact)
    test = hierarchy.layer_permutation_test(index, target, values, n_perm=20_000)
    assert test["min_p"] == pytest.approx(1 / 6) and test["n_layers_used"] == 3
    assert test["p_value"] == pytest.approx(1 / 6, abs=0.01)  # the floor is reached
    assert hierarchy.min_p_value(3, 12) == pytest.approx(1 / 6)  # not 1/12!
    assert hierarchy.min_p_value(3, 12, alternative="two-sided") == pytest.approx(2 / 6)
    assert hierarchy.min_p_value(3, 12, method="pearson") == pytest.approx(1 / (12 * 11 * 10))
    assert hierarchy.min_p_value(12, 12, n_perm=99) == pytest.approx(0.01)


def test_spatial_and_temporal_scores(rng):
    depth = np.linspace(0, 1, 8)  # 8! orders: the planted one is rarely drawn by chance
    coordinate = rng.uniform(0, 80, 400)
    index = np.clip((coordinate / 10).astype(int), 0, 7)
    out = hierarchy.spatial_score(index, coordinate, depth, n_perm=500, device="cpu")
    assert out["spearman"] > 0.9 and out["p_spearman"] < 0.01 and out["n_targets"] == 400
    depth = np.linspace(0, 1, 5)
    latency = np.array([100, 120, np.nan, 150, 170.0])
    boot = latency + rng.normal(0, 5, (200, 5))
    score = hierarchy.temporal_score(latency, depth, boot_latency=boot)
    assert score["n_layers"] == 4 and score["spearman"] == pytest.approx(1.0)
    assert score["pearson"] == pytest.approx(
        stats.pearsonr(depth[[0, 1, 3, 4]], latency[[0, 1, 3, 4]])[0])
    assert 0.5 < score["pearson_ci"][0] <= score["pearson"] <= score["pearson_ci"][1]
    with pytest.raises(ValueError, match="at least 3 layers with a peak latency"):
        hierarchy.temporal_score([np.nan, np.nan, 1.0], depth[:3])


def _bootstrap_problem(rng, n_layers=5, n_test=30, n_targets=60):
    """Test predictions of 5 layers; each target best predicted by the layer its
    coordinate prefers (noise 0.8 against 2.0 elsewhere)."""
    depth = np.linspace(0, 1, n_layers)
    coordinate = rng.uniform(0, 80, n_targets)
    preferred = np.clip((coordinate / 80 * n_layers).astype(int), 0, n_layers - 1)
    y = rng.standard_normal((n_test, n_targets))
    noise = np.where(np.arange(n_layers)[:, None] == preferred[None], 0.8, 2.0)
    prediction = y[None] + noise[:, None, :] * rng.standard_normal((n_layers, n_test, n_targets))
    mask = rng.random(n_targets) > 0.2
    return depth, coordinate, y, prediction, mask


def test_bootstrap_spatial_score_equals_a_resampling_loop(rng):
    """Each resample: correlations on resampled test rows, best layer, Spearman (scipy)."""
    depth, coordinate, y, prediction, mask = _bootstrap_problem(rng)
    n_layers, n_test, n_targets = prediction.shape
    indices = rng.integers(0, n_test, (40, n_test))
    indices[0] = np.arange(n_test)  # the identity resample is the point estimate
    out = hierarchy.bootstrap_spatial_score(prediction, y, coordinate, depth, mask=mask,
                                            boot_indices=indices, batch=16, device="cpu")
    expected = []
    for rows in indices:
        r = np.array([[np.corrcoef(prediction[k, rows, v], y[rows, v])[0, 1]
                       for v in range(n_targets)] for k in range(n_layers)])
        best = r.argmax(0)
        expected.append(stats.spearmanr(depth[best[mask]], coordinate[mask]).statistic)
    np.testing.assert_allclose(out["samples"], expected, atol=1e-10)
    r_full = np.array([[np.corrcoef(prediction[k, :, v], y[:, v])[0, 1]
                        for v in range(n_targets)] for k in range(n_layers)])
    point = hierarchy.spatial_score(r_full.argmax(0), coordinate, depth, mask=mask, n_perm=10)
    assert out["samples"][0] == pytest.approx(point["spearman"], abs=1e-10)
    assert out["value"] == pytest.approx(point["spearman"], abs=1e-10)
    # the interval: basic by default (reflected about the estimate), or percentile, or
    # BCa from the leave-one-out estimates (here computed by the loop)
    q_low, q_high = np.quantile(expected, [0.025, 0.975])
    low, high = out["spearman_ci"]
    assert (low, high) == pytest.approx((2 * out["value"] - q_high, 2 * out["value"] - q_low))
    assert 0 < low < high  # the planted order survives resampling
    kw = dict(mask=mask, boot_indices=indices, batch=16, device="cpu")
    percentile = hierarchy.bootstrap_spatial_score(prediction, y, coordinate, depth,
                                                   interval="percentile", **kw)
    assert percentile["spearman_ci"] == pytest.approx((q_low, q_high))
    jackknife = []
    for left_out in range(n_test):
        rows = np.delete(np.arange(n_test), left_out)
        r = np.array([[np.corrcoef(prediction[k, rows, v], y[rows, v])[0, 1]
                       for v in range(n_targets)] for k in range(n_layers)])
        jackknife.append(stats.spearmanr(depth[r.argmax(0)[mask]], coordinate[mask]).statistic)
    bca = hierarchy.bootstrap_spatial_score(prediction, y, coordinate, depth, interval="bca",
                                            **kw)
    assert bca["spearman_ci"] == pytest.approx(gstats.bootstrap_interval(
        point["spearman"], expected, method="bca", jackknife=jackknife))
    with pytest.raises(ValueError, match="'interval' must be one of"):
        hierarchy.bootstrap_spatial_score(prediction, y, coordinate, depth, interval="t", **kw)
    with pytest.raises(ValueError, match="Shapes must be prediction"):
        hierarchy.bootstrap_spatial_score(prediction[:, :-1], y, coordinate, depth)
    with pytest.raises(ValueError, match="'boot_indices' must be"):
        hierarchy.bootstrap_spatial_score(prediction, y, coordinate, depth,
                                          boot_indices=indices + n_test)


@pytest.mark.slow
def test_basic_interval_of_the_spatial_score_covers_the_noise_free_score_more_often(rng):
    """200 studies drawn from a population whose correlations are known (units of
    targets, as chapter 04 scores them): the percentile interval, whose resamples are
    attenuated twice, almost never covers the noise-free score; the basic interval
    mostly does, though still below its nominal 95 % (87 % [82-91 %] measured by
    benchmarks/bootstrap_coverage.py: not yet the coverage issue 28 asks for)."""
    n_layers, n_targets, n_test, n_boot = 6, 400, 40, 200
    depth = np.linspace(0, 1, n_layers)
    coordinate = rng.uniform(0, 1, n_targets)
    preferred = coordinate + rng.normal(0, 0.15, n_targets)
    rho = 0.5 * np.exp(-(depth[:, None] - preferred[None]) ** 2 / (2 * 0.25**2))
    units = hierarchy.hierarchy_units(coordinate, None, 20)
    profile = np.stack([rho[:, units == u].mean(1) for u in range(20)], 1)
    truth = stats.spearmanr(hierarchy.profile_centre(profile, depth),
                            hierarchy.unit_coordinates(coordinate, units)).statistic
    hits = {"basic": 0, "percentile": 0}
    for _ in range(200):
        y = rng.standard_normal((n_test, n_targets))
        prediction = rho[:, None] * y[None] + np.sqrt(1 - rho[:, None] ** 2) \
            * rng.standard_normal((n_layers, n_test, n_targets))
        rows = rng.integers(0, n_test, (n_boot, n_test))
        for interval in hits:
            low, high = hierarchy.bootstrap_spatial_score(
                prediction, y, coordinate, depth, units=units, boot_indices=rows,
                statistic="centre", interval=interval, device="cpu")["spearman_ci"]
            hits[interval] += bool(low <= truth <= high)
    assert hits["basic"] / 200 >= 0.80
    assert hits["percentile"] / 200 <= 0.10


def test_backprop_latency_prediction_mirrors_the_forward_sweep():
    act = np.array([100.0, 125, 150, 175, 200])
    rank = np.array([4, 3, 2, 1, 0])  # autograd: top layer first
    np.testing.assert_allclose(hierarchy.backprop_latency_prediction(act, rank),
                               [325, 300, 275, 250, 225])


def test_group_test_is_wilcoxon_with_benjamini_hochberg(rng):
    values = pd.DataFrame({"strong": rng.normal(1, 0.3, 12), "none": rng.normal(0, 1, 12),
                           "weak": rng.normal(0.4, 1, 12)})
    table = gstats.group_test(values)
    p = np.array([stats.wilcoxon(values[c], alternative="greater").pvalue for c in values])
    order = np.argsort(p)
    bh = np.minimum.accumulate((p[order] * 3 / np.arange(1, 4))[::-1])[::-1]
    expected = np.empty(3)
    expected[order] = np.minimum(bh, 1)
    np.testing.assert_allclose(table.loc[list(values), "p"], p)
    np.testing.assert_allclose(table.loc[list(values), "p_fdr"], expected)
    assert table.loc["strong", "significant"] and not table.loc["none", "significant"]
    with pytest.raises(ValueError, match="at least 2 subjects"):
        gstats.group_test(values.iloc[:1])


def test_group_estimate_is_inverse_variance_and_hksj_random_effects(rng):
    """Fixed effect = precision-weighted mean (z-test); random effects = Paule–Mandel τ²
    (generalised Q = n − 1, or τ² = 0) with the Hartung–Knapp–Sidik–Jonkman t
    interval — written out here from the formulas; with 4 consistent subjects it
    reaches α where Wilcoxon cannot."""
    n = 4
    values = pd.DataFrame({"strong": [0.50, 0.62, 0.41, 0.70],
                           "none": [0.05, -0.03, 0.02, -0.06]})
    half = pd.DataFrame({"strong": [0.10, 0.20, 0.15, 0.10], "none": [0.2, 0.3, 0.25, 0.2]})
    table = gstats.group_estimate(values, values - half, values + half)
    z = stats.norm.ppf(0.975)
    for column in values:
        x, var = values[column].to_numpy(), (half[column].to_numpy() / z) ** 2
        w = 1 / var
        fixed = np.sum(w * x) / np.sum(w)
        tau2 = row_tau2 = table.loc[column, "tau2"]
        w_re = 1 / (var + tau2)
        random = np.sum(w_re * x) / np.sum(w_re)
        q_generalised = np.sum(w_re * (x - random) ** 2)
        if row_tau2 > 0:
            assert q_generalised == pytest.approx(n - 1, rel=1e-4)
        else:
            assert tau2 == 0 and q_generalised <= n - 1
        q_hksj = np.sum(w_re * (x - random) ** 2) / (n - 1)
        sd_hksj = np.sqrt(max(1.0, q_hksj) / w_re.sum())   # truncated at q* = max(1, q)
        row = table.loc[column]
        assert row.fixed == pytest.approx(fixed)
        assert row.p_fixed == pytest.approx(2 * stats.norm.sf(abs(fixed) * np.sqrt(w.sum())))
        assert row.random == pytest.approx(random)
        t = stats.t.ppf(0.975, n - 1)
        assert (row.random_low, row.random_high) == pytest.approx(
            (random - t * sd_hksj, random + t * sd_hksj))
        assert row.p_random == pytest.approx(2 * stats.t.sf(abs(random) / sd_hksj, n - 1))
        assert row.q_hksj == pytest.approx(q_hksj)
        # statsmodels: the wider of its random-effects t interval (scale 1) and its
        # HKSJ interval (scale q), which is what q* = max(1, q) gives
        _, re_t, _, re_hksj = combine_effects(x, var, method_re="iterated").conf_int(
            use_t=True)
        ref = max((re_t, re_hksj), key=lambda ci: ci[1] - ci[0])
        assert (row.random_low, row.random_high) == pytest.approx(ref, rel=1e-6)
        assert row.wilcoxon_floor == 2 / 2 ** n
    assert table.loc["strong", "significant"] and table.loc["strong", "p_random"] < 0.01
    assert table.loc["strong", "tau2"] > 0 and table.loc["none", "tau2"] == 0  # both cases
    wilcoxon = gstats.group_test(values, alternative="two-sided")
    assert wilcoxon.loc["strong", "min_p"] == 0.125 and not wilcoxon.loc["strong",
                                                                          "can_reach_alpha"]
    # subjects without an interval are left out; one subject: a fixed effect only
    one = gstats.group_estimate(values.iloc[:1], (values - half).iloc[:1],
                                   (values + half).iloc[:1])
    assert one.loc["strong", "n_subjects"] == 1 and np.isfinite(one.loc["strong", "fixed"])
    assert np.isnan(one.loc["strong", "p_random"]) and not one.loc["strong", "significant"]
    with pytest.raises(ValueError, match="same subjects and statistics"):
        gstats.group_estimate(values, values.iloc[:2], values)


def test_group_estimate_random_effects_never_narrower_than_fixed_when_subjects_agree():
    """Check the HKSJ truncation q* = max(1, q) (issue 28): 4 subjects of se 0.10 whose
    estimates agree more than their intervals say. Untruncated HKSJ gave p = 2e-5
    against the fixed effect's 0.044, and identical estimates gave NaN."""
    z = stats.norm.ppf(0.975)
    half = pd.DataFrame({"close": [0.1 * z] * 4, "identical": [0.1 * z] * 4})
    values = pd.DataFrame({"close": [0.095, 0.1, 0.105, 0.1],
                           "identical": [0.1, 0.1, 0.1, 0.1]})
    table = gstats.group_estimate(values, values - half, values + half)
    for column in values:
        row = table.loc[column]
        assert row.tau2 == 0 and row.q_hksj < 1 and row.i2 == 0
        # by hand: τ² = 0, so var = max(1, q) / Σw = 0.01 / 4, t with 3 df
        mean, sd = values[column].mean(), np.sqrt(0.01 / 4)
        assert row.random == pytest.approx(mean)
        assert row.p_random == pytest.approx(2 * stats.t.sf(mean / sd, 3))
        assert row.p_fixed == pytest.approx(2 * stats.norm.sf(mean / sd))
        assert row.p_random > row.p_fixed and row.p_random > 0.1
        assert row.random_high - row.random_low >= row.fixed_high - row.fixed_low
        assert row.wilcoxon_floor == 0.125


# --------------------------------------------------------------------------- run()

N_IMAGES = 200


def test_above_chance_equals_a_loop_with_benjamini_hochberg(rng):
    """Per target: the best layer's r and a p-value over the same shuffles as an explicit
    scipy loop (maximum over layers in the null too); FDR decisions = MNE's BH; units
    average their targets' r before the maximum."""
    from mne.stats import fdr_correction

    n, k, n_perm = 15, 9, 40
    y = rng.normal(size=(n, k))
    P = np.stack([y + rng.normal(scale=s, size=y.shape) for s in (0.3, 3.0, 30.0)])
    y[:, 8] = 1.0   # constant: not tested
    out = hierarchy.above_chance(y, P, n_perm=n_perm, seed=4, device="cpu")
    order = np.random.default_rng(4)
    shuffles = [order.permutation(n) for _ in range(n_perm)]

    def best(yy, targets):
        return max(np.mean([stats.pearsonr(yy[:, t], P[layer][:, t])[0] for t in targets])
                   for layer in range(3))

    for t in range(8):
        observed = best(y, [t])
        null = np.array([best(y[s], [t]) for s in shuffles])
        assert out["r"][t] == pytest.approx(observed, abs=1e-5)
        assert out["p_value"][t] == pytest.approx((1 + np.sum(null >= observed - 1e-6))
                                                  / (1 + n_perm))
    assert np.isnan(out["p_value"][8]) and not out["significant"][8] and out["n_tested"] == 8
    reject, _ = fdr_correction(out["p_value"][:8], alpha=0.05)
    np.testing.assert_array_equal(out["significant"][:8], reject)
    units = np.array([0, 0, 0, 1, 1, -1, 2, 2, 2])
    grouped = hierarchy.above_chance(y, P, units=units, n_perm=n_perm, seed=4, device="cpu")
    for u, targets in enumerate(([0, 1, 2], [3, 4], [6, 7])):   # 8 has no data
        observed = best(y, targets)
        null = np.array([best(y[s], targets) for s in shuffles])
        assert grouped["r"][u] == pytest.approx(observed, abs=1e-5)
        assert grouped["p_value"][u] == pytest.approx((1 + np.sum(null >= observed - 1e-6))
                                                      / (1 + n_perm))
    with pytest.raises(ValueError, match="'units' must give every target"):
        hierarchy.above_chance(y, P, units=units[:3])
    with pytest.raises(ValueError, match="'predictions' \\(n_layers"):
        hierarchy.above_chance(y, P[0])


def test_above_chance_controls_false_discoveries_and_finds_a_signal(rng):
    """No signal in 100 data sets of 50 targets: BH finds anything in about α of them
    (it controls the family-wise error under the global null), and single p-values are
    uniform; a signal planted in 10 of 50 targets is found there and (almost) only there."""
    any_found, p_all = [], []
    for k in range(100):
        y = rng.normal(size=(20, 50))
        out = hierarchy.above_chance(y, rng.normal(size=(3, 20, 50)), n_perm=99, seed=k,
                                     device="cpu")
        any_found.append(out["significant"].any())
        p_all.append(out["p_value"])
    assert np.mean(any_found) <= 0.12, np.mean(any_found)   # binomial 99 % bound around 0.05
    assert 0.03 <= np.mean(np.concatenate(p_all) < 0.05) <= 0.07
    y = rng.normal(size=(40, 50))
    P = rng.normal(size=(3, 40, 50))
    P[1, :, :10] = y[:, :10] + rng.normal(scale=0.5, size=(40, 10))
    out = hierarchy.above_chance(y, P, n_perm=500, seed=0, device="cpu")
    assert out["significant"][:10].all() and out["significant"][10:].sum() <= 2
    assert (out["best_layer"][:10] == 1).all()


def test_equivalence_is_two_one_sided_tests_on_the_bootstrap(rng):
    """TOST on resamples: equivalent iff both one-sided bootstrap p-values are < α (the
    90 % interval inside ±margin); diverges iff the 95 % interval excludes 0."""
    inside = rng.normal(0.05, 0.05, 2000)
    out = gstats.equivalence(0.05, inside, margin=0.3)
    assert out["equivalent"] and not out["diverges"] and out["n_boot"] == 2000
    low, high = np.quantile(inside, [0.05, 0.95])
    assert (out["tost_low"], out["tost_high"]) == pytest.approx((low, high))
    assert out["p_tost"] == pytest.approx(max(1 + np.sum(inside <= -0.3),
                                              1 + np.sum(inside >= 0.3)) / 2001)
    wide = rng.normal(0.0, 0.3, 2000)   # holds 0 and reaches beyond the margin
    out = gstats.equivalence(0.0, wide, margin=0.3)
    assert not out["equivalent"] and not out["diverges"] and out["p_tost"] > 0.05
    off = np.append(rng.normal(-1.0, 0.1, 2000), np.nan)   # NaN resamples left out
    out = gstats.equivalence(-1.0, off, margin=0.3)
    assert out["diverges"] and not out["equivalent"] and out["n_boot"] == 2000
    out = gstats.equivalence(-1.0, off, margin=None)
    assert out["diverges"] and np.isnan(out["p_tost"]) and not out["equivalent"]
    small = rng.normal(0.1, 0.01, 2000)   # different from 0, yet within the margin
    out = gstats.equivalence(0.1, small, margin=0.3)
    assert out["diverges"] and out["equivalent"]
    with pytest.raises(ValueError, match="'margin' must be positive"):
        gstats.equivalence(0.0, inside, margin=0)


@pytest.fixture(scope="module")
def planted():
    return _planted_features(N_IMAGES)


def _judge(planted, truth, seed):
    study = make_study(seed, n_images=N_IMAGES, features=planted, gradient_truth=truth,
                       noise=0.5)
    return backprop_tests(study, planted, n_perm=2000, n_boot=100, seed=seed, device="cpu",
                         n_perm_chance=200)


# `make test` judges seed 0's backprop and paper studies; `make test-slow` all four truths
# of three simulated participants (make test stays under 5 min on 2 cores)
ALL_TRUTHS = ("backprop", "none", "forward", "paper")


@pytest.mark.parametrize("seed, truths", [
    (0, ("backprop", "paper")),
    pytest.param(0, ALL_TRUTHS, marks=pytest.mark.slow),
    pytest.param(1, ALL_TRUTHS, marks=pytest.mark.slow),
    pytest.param(2, ALL_TRUTHS, marks=pytest.mark.slow)])
def test_run_recovers_each_planted_truth(planted, seed, truths, tmp_path):
    """backprop: consistent with backprop; none, forward, paper: not; paper: paper's finding."""
    verdicts = {truth: _judge(planted, truth, seed) for truth in truths}
    assert verdicts["backprop"].consistent_with_backprop
    for truth in set(truths) - {"backprop"}:
        assert not verdicts[truth].consistent_with_backprop, truth
    assert verdicts["paper"].paper_finding
    # paper fails on space; forward fails on time, not on space
    assert not verdicts["paper"].predictions["1 spatial"]
    if "forward" in verdicts:
        assert not verdicts["none"].paper_finding
        assert verdicts["forward"].predictions["1 spatial"]
        assert not verdicts["forward"].predictions["2 temporal"]
    summary = verdicts["backprop"].summary()
    assert "is consistent with a biological backpropagation" in summary
    tests = verdicts["backprop"].tests
    shuffled = tests[tests.null.str.contains("shuffled")]  # the layer permutation tests
    assert len(shuffled) == 3 and shuffled.min_p.notna().all()
    # a Monte Carlo p-value scatters around the exact floor by its binomial error
    assert (shuffled.p_value >= shuffled.min_p
            - 4 * np.sqrt(shuffled.min_p * (1 - shuffled.min_p) / 2000)).all()
    assert (tests.can_reach_alpha == ~(tests.min_p >= 0.05)).all()
    said = verdicts["paper"].summary()   # a failed test is not called a divergence
    assert re.search(r"\*\*fails the tests\*\* of a biological backpropagation "
                     r"\(predictions? 1( and 2 do| does) not hold", said)
    assert "not consistent" not in said and "reproduced" not in said
    assert "the paper's positive finding is found in this study." in said
    # above chance at all: with no gradient planted, gradients predict no vertex, unit or
    # time point (FDR); the paper's gradients (planted in every vertex, a fifth of their
    # share at V1) predict the units, early ones too, and only late times (350-600 ms)
    chance = {t: v.above_chance.set_index(["signal", "level"]) for t, v in verdicts.items()}
    grad = "gradient (ce)"
    if "none" in verdicts:
        assert chance["none"].loc[(grad, "reliable vertices"), "n_significant"] <= 0.01 * \
            chance["none"].loc[(grad, "reliable vertices"), "n_tested"]
        assert chance["none"].loc[[(grad, "units"), (grad, "time points")],
                                  "n_significant"].sum() <= 1
        assert chance["none"].loc[("activation", "units"), "share"] == 1
    units = verdicts["paper"].chance_maps[grad]["units"]["significant"]
    assert units.mean() >= 0.8 and units[:len(units) // 2].sum() >= 6
    assert chance["paper"].loc[(grad, "time points"), "first_ms"] >= 250
    assert "Above chance at all" in verdicts["paper"].summary()
    # estimates against backprop's predictions (0): equivalent under backprop (within
    # ±0.3), different where the prediction is false; the spatial contrast is the
    # difference of the two spatial scores
    est = {t: v.estimates.set_index("estimate") for t, v in verdicts.items()}
    spatial, temporal, timing = (hierarchy.ESTIMATES[k][0]
                                 for k in ("spatial", "temporal", "timing"))
    assert est["backprop"].loc[[spatial, temporal], "equivalent"].all()
    assert not est["backprop"].loc[[spatial, temporal], "diverges"].any()
    for truth in set(truths) & {"none", "paper"}:
        assert est[truth].loc[spatial, "diverges"] and not est[truth].loc[spatial, "equivalent"]
    if "forward" in verdicts:
        assert est["forward"].loc[spatial, "equivalent"]   # gradients where activations are
        assert est["forward"].loc[temporal, "value"] < -1.5 and est["forward"].loc[
            temporal, "diverges"]
        assert np.isnan(est["none"].loc[temporal, "value"])   # no gradient latency at all
        assert est["forward"].loc[timing, "diverges"] and np.isnan(
            est["forward"].loc[timing, "p_tost"])
    scores = verdicts["paper"].scores.query("score == 'spatial'").set_index("signal")
    assert est["paper"].loc[spatial, "value"] == pytest.approx(
        scores.loc["gradient (ce)", "spearman"] - scores.loc["activation", "spearman"])
    assert "**equivalent** to backprop's prediction within ±0.3" in \
        verdicts["backprop"].summary()

    # the saved table (what a sweep collects) carries the planted orders
    path = verdicts["backprop"].save(tmp_path / "result.csv", model="planted", subject=seed)
    table = pd.read_csv(path).set_index("feature")
    assert list(table.columns[:2]) == ["model", "subject"]
    act, grad = table.loc["activation"], table.loc["gradient"]
    assert act.spatial > 0.5 and act.spatial_p < 0.05 and act.temporal_ci_low > 0
    assert grad.spatial > 0.5 and grad.temporal_ci_high < 0 and grad.loss == "ce"
    assert str(grad.consistent_with_backprop) == "True"
    with pytest.raises(ValueError, match="ending in '.csv'"):
        verdicts["backprop"].save(tmp_path / "result.txt")


def test_unit_best_layer_equals_a_loop(rng):
    scores = rng.normal(size=(5, 300))
    coordinate = rng.uniform(0, 80, 300)
    mask = rng.random(300) > 0.3
    units = hierarchy.hierarchy_units(coordinate, mask, 12)
    assert set(units[mask]) == set(range(12)) and (units[~mask] == -1).all()
    counts = np.bincount(units[mask])
    assert counts.max() - counts.min() <= 1           # equal-count bins
    for u in range(11):                               # in order of the coordinate
        assert coordinate[units == u].max() <= coordinate[units == u + 1].min()
    keep = mask & (rng.random(300) > 0.2)
    out = hierarchy.unit_best_layer(scores, units, np.linspace(0, 1, 5), mask=keep)
    for u in range(12):
        where = keep & (units == u)
        np.testing.assert_allclose(out["profile"][:, u], scores[:, where].mean(1))
        assert out["index"][u] == scores[:, where].mean(1).argmax()
    np.testing.assert_allclose(hierarchy.unit_coordinates(coordinate, units),
                               [np.median(coordinate[units == u]) for u in range(12)])


def test_unit_bootstrap_interval_holds_its_estimate(planted):
    """Per-vertex argmax makes the bootstrap interval of the spatial score sit below the
    estimate; averaging vertices into units first removes that bias. The identity
    resample reproduces the unit estimate exactly."""
    study = make_study(0, n_images=N_IMAGES, features=planted, gradient_truth="backprop",
                       noise=0.5, meg=False)
    fmri = fmri_encoding(study, planted, device="cpu", return_prediction=True)["activation"]
    depth = np.asarray(planted.depth, float)
    reliable = study.noise_ceiling() >= 10
    best = hierarchy.best_layer(fmri["r_nc"], depth)
    usable = reliable & (best["peak"] > 0.1)
    kw = dict(mask=usable, n_boot=100, device="cpu")
    vertex = hierarchy.spatial_score(best["index"], study.hierarchy, depth, mask=usable,
                                     n_perm=10)["spearman"]
    vertex_boot = hierarchy.bootstrap_spatial_score(fmri["prediction"], fmri["y_test"],
                                                    study.hierarchy, depth, **kw)["samples"]
    assert vertex > np.quantile(vertex_boot, 0.975)   # the bias the units remove
    units = hierarchy.hierarchy_units(study.hierarchy, reliable, 20)
    unit = hierarchy.unit_best_layer(fmri["r"], units, depth, mask=usable)
    estimate = hierarchy.spatial_score(unit["index"], hierarchy.unit_coordinates(
        study.hierarchy, units), depth, mask=unit["present"], n_perm=10)["spearman"]
    boot = hierarchy.bootstrap_spatial_score(fmri["prediction"], fmri["y_test"],
                                             study.hierarchy, depth, units=units, **kw)
    assert boot["spearman_ci"][0] <= estimate <= boot["spearman_ci"][1]
    assert abs(np.nanmedian(boot["samples"]) - estimate) < 0.01
    identity = hierarchy.bootstrap_spatial_score(
        fmri["prediction"], fmri["y_test"], study.hierarchy, depth, mask=usable, units=units,
        boot_indices=np.arange(len(fmri["y_test"]))[None], device="cpu")
    assert identity["samples"][0] == pytest.approx(estimate, abs=1e-12)
    with pytest.raises(ValueError, match="'units' must label every target"):
        hierarchy.bootstrap_spatial_score(fmri["prediction"], fmri["y_test"],
                                          study.hierarchy, depth, units=units[:5], n_boot=2)


def test_run_without_meg_cannot_confirm_the_temporal_prediction(planted):
    study = make_study(0, n_images=N_IMAGES, features=planted, gradient_truth="backprop",
                       noise=0.5, meg=False)
    result = backprop_tests(study, planted, n_perm=500, device="cpu")
    assert result.predictions["1 spatial"] and not result.predictions["2 temporal"]
    assert not result.consistent_with_backprop
    summary = result.summary()
    assert "**not tested** (no MEG data in this study)" in summary
    assert "**cannot be judged**" in summary and "prediction 2 was not tested" in summary
    assert "its MEG part was not tested" in summary  # prediction 3's fMRI part ran
    with pytest.raises(ValueError, match="'loss' must be one of the features' losses"):
        backprop_tests(study, planted, loss="dino")


def test_layers_chosen_on_training_cv_score_the_test_set_without_winners_curse(rng):
    """Features unrelated to the targets: a peak over layers chosen on the test set is
    biased up (the maximum of noise); chosen on training CV, its test score is centred on
    0 (within 3 standard errors)."""
    from gradbrain.ridge import layerwise_scores

    n_layers, n_targets = 10, 300
    feats = {f"layer{i}": rng.normal(size=(120, 6)) for i in range(n_layers)}
    Y = rng.normal(size=(120, n_targets))
    train, test = np.arange(90), np.arange(90, 120)
    nc = np.full(n_targets, 100.0)
    out = layerwise_scores(feats, Y[train], Y[test], train, test, noise_ceiling=nc,
                           device="cpu")
    depth = np.linspace(0, 1, n_layers)
    on_test = hierarchy.chosen_layers(out, depth, nc, select_on="test")
    on_train = hierarchy.chosen_layers(out, depth, nc, select_on="train")
    se = out["r"].std() / np.sqrt(n_targets)
    assert on_test["peak"].mean() > 10 * se
    assert abs(on_train["peak"].mean()) < 3 * se
    columns = np.arange(n_targets)
    np.testing.assert_array_equal(on_train["peak"], out["r_nc"][on_train["index"], columns])
    np.testing.assert_array_equal(on_train["index"], np.argmax(out["cv_r2"], 0))
    with pytest.raises(ValueError, match="no training-CV scores"):
        hierarchy.chosen_layers({"r_nc": out["r_nc"]}, depth, nc)


def test_run_chooses_vertices_and_layers_without_the_test_responses(planted):
    """With select_on="train" the masks and best layers stay the same when every test-set
    score is replaced by noise; with "test" they follow the noise."""
    study = make_study(0, n_images=N_IMAGES, features=planted, gradient_truth="paper",
                       noise=0.5, meg=False)
    fmri = fmri_encoding(study, planted, device="cpu")
    scrambled = Encoding({name: {**out, "r": np.random.default_rng(1).normal(0, .3,
                                                                          out["r"].shape)}
                          for name, out in fmri.items()}, fmri.spec)
    for out in scrambled.values():
        out["r_nc"] = out["r"] / np.sqrt(study.noise_ceiling() / 100)
    kw = dict(n_perm=50, n_boot=0, n_perm_chance=0, device="cpu", min_score=0.3)
    results = {(select_on, name): backprop_tests(study, planted, fmri=f, select_on=select_on,
                                                 **kw)
               for select_on in ("train", "test") for name, f in (("fit", fmri),
                                                                   ("noise", scrambled))}
    signal = results["train", "fit"].signal
    for name in ("activation", signal):
        np.testing.assert_array_equal(results["train", "fit"].masks[name],
                                      results["train", "noise"].masks[name])
        np.testing.assert_array_equal(results["train", "fit"].best[name]["index"],
                                      results["train", "noise"].best[name]["index"])
        assert (results["test", "fit"].masks[name] != results["test", "noise"].masks[name]
                ).any()
    with pytest.raises(ValueError, match="'select_on' must be one of"):
        backprop_tests(study, planted, fmri=fmri, select_on="cv", **kw)


def test_run_refuses_an_encoding_fitted_on_something_else(planted):
    """Check that a precomputed encoding is refused, before any work, unless it was
    fitted on what the tests are asked (issue 29: the whole gradients' encoding was
    tested and labelled "unique part"; a plain dict ended in a bare KeyError)."""
    study = make_study(0, n_images=N_IMAGES, features=planted, gradient_truth="none",
                       noise=0.5, meg=False)
    feats = planted
    fmri = fmri_encoding(study, feats, device="cpu")
    assert fmri.spec.gradient_part == "whole" and fmri.spec.losses == ("ce",)
    kw = dict(n_perm=10, n_boot=0, n_perm_chance=0, device="cpu")
    with pytest.raises(ValueError, match=r"'fmri' was fitted on something else than this test "
                       r"asks for — gradient part: fitted on 'whole', asked for 'unique'"):
        backprop_tests(study, feats, fmri=fmri, gradient_part="unique", **kw)
    with pytest.raises(TypeError, match=r"'fmri' must be the result of "
                       r"gradbrain.analysis.encoding.fmri_encoding .* got a dict"):
        backprop_tests(study, feats, fmri={"activation": fmri["activation"]}, **kw)
    with pytest.raises(ValueError, match=r"losses: fitted on \['ce'\], asked for \['dino'\]"):
        check_encoding(fmri, name="fmri", modality="fmri", features=feats, loss="dino")
    fewer = copy.copy(feats)
    fewer.layers = feats.layers[:-1]
    with pytest.raises(ValueError, match="layers: fitted on"):
        check_encoding(fmri, name="fmri", modality="fmri", features=fewer, loss="ce")
    other_model = copy.copy(feats)
    other_model.model = "another"
    with pytest.raises(ValueError, match="model: fitted on 'planted', asked for 'another'"):
        check_encoding(fmri, name="fmri", modality="fmri", loss="ce", features=other_model)
    # an encoding fitted on what is asked is used as it is (no refit): same result
    reused = backprop_tests(study, feats, fmri=fmri, **kw)
    assert reused.fmri is fmri
    pd.testing.assert_frame_equal(reused.tests, backprop_tests(study, feats, **kw).tests)


# the unique part in `make test-slow` (make test stays under 5 min on 2 cores)
@pytest.mark.parametrize("gradient_part", ["whole", pytest.param("unique",
                                                                 marks=pytest.mark.slow)])
def test_run_with_a_separate_meg_study_equals_one_study_with_both(planted, gradient_part):
    """NSD-like fMRI study + THINGS-like MEG study == the same data in one study (the
    unique part is fitted on each study's own training images: here the same ones)."""
    import dataclasses

    study = make_study(0, n_images=N_IMAGES, features=planted, gradient_truth="backprop",
                       noise=0.5)
    fmri_only = dataclasses.replace(study, epochs=None)
    meg_only = dataclasses.replace(study, betas=None, ncsnr=None)
    kw = dict(n_perm=200, n_boot=20, device="cpu", gradient_part=gradient_part,
              n_perm_chance=100)
    both = backprop_tests(study, planted, **kw)
    split = backprop_tests(fmri_only, planted, meg_study=meg_only, meg_features=planted, **kw)
    pd.testing.assert_frame_equal(split.tests, both.tests)
    pd.testing.assert_frame_equal(split.estimates, both.estimates)
    pd.testing.assert_frame_equal(split.above_chance, both.above_chance)
    assert split.consistent_with_backprop and "cannot be judged" not in split.summary()
    with pytest.raises(ValueError, match="'meg_features' must be the same model's"):
        backprop_tests(fmri_only, planted, meg_study=meg_only, **kw)


@pytest.mark.slow
def test_power_and_false_positive_rate_over_20_seeds(planted):
    """Power ≥ 0.9 (backprop judged consistent), false positives ≤ 0.05 (other truths)."""
    seeds = range(20)
    power = np.mean([_judge(planted, "backprop", s).consistent_with_backprop for s in seeds])
    false = [_judge(planted, truth, s).consistent_with_backprop
             for truth in ("none", "forward", "paper") for s in seeds]
    print(f"power {power:.2f}, false-positive rate {np.mean(false):.3f} over {len(seeds)} seeds")
    assert power >= 0.9
    assert np.mean(false) <= 0.05


# --------------------------------------------------------------------------- error rates


def test_error_rates_are_proportions_with_wilson_intervals():
    """Rates = counts over the null truths of each test; intervals = scipy's Wilson."""
    part = "gradient latency follows the autograd order"  # nulls none, forward, paper
    held = {"none": [1, 0, 0, 0], "forward": [0, 0, 0, 0], "paper": [1, 1, 0, 0],
            "backprop": [1, 1, 1, 0]}
    sims = pd.DataFrame([{"truth": t, "seed": s, "part": part, "value": float(h),
                          "holds": bool(h)} for t, hs in held.items()
                         for s, h in enumerate(hs)])
    rates = hierarchy.error_rates(sims).set_index("part").loc[part]
    assert rates.fpr == 3 / 12 and rates.n_null == 12 and rates.power == 3 / 4
    assert rates.worst_null == "paper" and rates.worst_fpr == 0.5
    assert rates.held_forward == 0 and rates.held_backprop == 0.75
    ci = stats.binomtest(3, 12).proportion_ci(method="wilson")
    assert (rates.fpr_low, rates.fpr_high) == pytest.approx((ci.low, ci.high), abs=1e-9)
    ci = stats.binomtest(3, 4).proportion_ci(method="wilson")
    assert (rates.power_low, rates.power_high) == pytest.approx((ci.low, ci.high), abs=1e-9)
    with pytest.raises(ValueError, match="lacks the columns"):
        hierarchy.error_rates(sims.drop(columns="holds"))


def test_model_null_p_counts_exceedances_per_null_truth():
    """p = (1 + #null ≥ observed) / (1 + n), worst null truth; NaN sims are no evidence."""
    part = "gradients gain more in high-level than early cortex"  # nulls none/forward/backprop
    values = {"none": [0.1, 0.3, np.nan, 0.5], "forward": [0.0, 0.0, 0.0, 0.9],
              "backprop": [0.2, 0.2, 0.2, 0.2], "paper": [5.0, 5.0, 5.0, 5.0]}
    sims = pd.DataFrame([{"truth": t, "seed": s, "part": part, "value": v, "holds": False}
                         for t, vs in values.items() for s, v in enumerate(vs)])
    p, n = hierarchy.model_null_p(part, 0.3, sims)
    # none: 0.3 and 0.5 reach 0.3 → 3/5; forward 0.9 → 2/5; backprop none → 1/5; paper ignored
    assert p == pytest.approx(3 / 5) and n == 4
    assert hierarchy.model_null_p(part, 1.0, sims)[0] == pytest.approx(1 / 5)
    assert np.isnan(hierarchy.model_null_p(part, np.nan, sims)[0])
    # a null truth never simulated: the composite null does not cover it (n = 0)
    assert hierarchy.model_null_p(part, 0.3, sims[sims.truth != "forward"])[1] == 0


def test_divergence_is_judged_against_simulated_backprop_by_hand_counts():
    """p = (1 + #{backprop sims ≤ value}) / (1 + n); false divergence leaves each backprop
    study out; power counts the studies of truths where backprop's prediction is false
    (NaN contrasts: detected)."""
    name = hierarchy.ESTIMATES["spatial"][0]
    rows = [{"truth": "backprop", "seed": s, "prediction": "estimate", "part": name,
             "value": float(s), "holds": False} for s in range(21)]
    rows += [{"truth": "backprop", "seed": 99, "prediction": "estimate", "part": name,
              "value": np.nan, "holds": False}]                    # left out
    rows += [{"truth": t, "seed": s, "prediction": "estimate", "part": name,
              "value": v, "holds": False}
             for t, s, v in (("none", 0, -5.0), ("none", 1, np.nan), ("paper", 0, 3.0),
                             ("forward", 0, -9.0))]               # forward: not a null
    sims = pd.DataFrame(rows)
    assert hierarchy.divergence_p(name, -1.0, sims) == (1 / 22, 21)
    assert hierarchy.divergence_p(name, 2.0, sims) == (4 / 22, 21)
    assert np.isnan(hierarchy.divergence_p(name, np.nan, sims)[0])
    assert np.isnan(hierarchy.divergence_p(hierarchy.ESTIMATES["temporal"][0], 0.0, sims)[0])
    rates = hierarchy.divergence_rates(sims).set_index("estimate").loc[name]
    assert rates.n_div_null == 21 and rates.div_fpr == pytest.approx(1 / 21)  # value 0 alone
    assert rates.n_div_power == 3 and rates.div_power == pytest.approx(2 / 3)  # -5 and NaN


def test_error_rate_figure_shows_every_rate_and_marks_the_expected_cells():
    from gradbrain.plotting import plot_error_rates

    rows = [{"truth": t, "seed": s, "part": part, "value": 0.0, "holds": bool((s + i) % 2)}
            for i, part in enumerate(hierarchy.TEST_TRUTHS)
            for t in ("none", "forward", "backprop", "paper") for s in range(3)]
    rates = hierarchy.error_rates(pd.DataFrame(rows))
    fig = plot_error_rates(rates, alpha=0.05)
    ax = fig.axes[0]
    shown = [float(t.get_text()) for t in ax.texts]
    expected = rates[[f"held_{t}" for t in ("none", "forward", "backprop", "paper")]]
    np.testing.assert_allclose(shown, expected.to_numpy().ravel(), atol=0.005)
    assert ax.get_xlabel() and ax.get_ylabel() and fig.axes[1].get_ylabel()  # colour bar
    n_boxes = sum(len(n.split(", ")) + 1 for n in rates.null_truths)
    assert len(ax.patches) == n_boxes


def test_rates_forest_plot_draws_every_rate_and_its_interval_per_rule():
    """Dots at the hand-counted rates, bars at their Wilson bounds, one panel per rule."""
    from gradbrain.plotting import plot_rates_forest

    rows = [{"truth": t, "seed": s, "part": part, "value": 0.0, "holds": bool((s + i) % 2)}
            for i, part in enumerate(hierarchy.TEST_TRUTHS)
            for t in ("none", "forward", "backprop", "paper") for s in range(3)]
    rates = hierarchy.error_rates(pd.DataFrame(rows))
    other = rates.assign(fpr=0.0, fpr_low=0.0, fpr_high=0.1)
    fig = plot_rates_forest({"nominal nulls": rates, "model-based nulls": other}, alpha=0.05)
    assert [ax.get_title() for ax in fig.axes] == ["nominal nulls", "model-based nulls"]
    for ax, table in zip(fig.axes, (rates, other)):
        fpr, power = ax.containers[:2]          # the two series of dots with their bars
        np.testing.assert_allclose(fpr.lines[0].get_xdata(), table.fpr)
        np.testing.assert_allclose(power.lines[0].get_xdata(), table.power)
        assert ax.get_xlabel()
        # the interval of the first test's power: its Wilson bounds
        segment = power.lines[2][0].get_segments()[0]
        np.testing.assert_allclose(sorted(segment[:, 0]),
                                   [table.power_low.iloc[0], table.power_high.iloc[0]])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == rates.part.iloc[0] and len(labels) == len(rates)
    with pytest.raises(ValueError, match="lacks the column"):
        plot_rates_forest({"nominal": rates.drop(columns="fpr_low")})
    with pytest.raises(ValueError, match="'rates' is empty"):
        plot_rates_forest({})


def _verdict_table(held_backprop, held_none):
    part = hierarchy.VERDICT_BACKPROP
    return pd.DataFrame([{"truth": t, "seed": s, "part": part, "value": np.nan,
                          "holds": bool(h)}
                         for t, hs in (("backprop", held_backprop), ("none", held_none))
                         for s, h in enumerate(hs)])


def test_power_curve_counts_each_grid_point_and_says_what_size_is_needed(tmp_path,
                                                                          monkeypatch):
    """Rates per point are hand counts; the sentence names the first size whose Wilson
    lower bound reaches the target, or says that none does."""
    part = hierarchy.VERDICT_BACKPROP
    sims = {("ImageNet", 100, 20, 1.0): _verdict_table([1, 0, 0, 1, 0, 0, 0, 0], [0] * 8),
            ("ImageNet", 200, 40, 1.0): _verdict_table([1] * 20, [1] + [0] * 19),
            ("random-init", 100, 20, 1.0): _verdict_table([0] * 8, [0] * 8),
            ("random-init", 200, 40, 1.0): _verdict_table([1, 1, 0, 0] * 2, [0] * 8)}
    curve = hierarchy.power_curve(sims)
    assert list(curve.columns[:4]) == ["weights", "n_images", "n_test", "noise"]
    rows = curve[curve.part == part].set_index(["weights", "n_images"])
    assert rows.loc[("ImageNet", 100), "power"] == 2 / 8
    assert rows.loc[("ImageNet", 200), "fpr"] == 1 / 20
    assert rows.loc[("random-init", 200), "power"] == 0.5
    assert rows.loc[("ImageNet", 200), "n_seeds"] == 20
    ci = stats.binomtest(20, 20).proportion_ci(method="wilson")
    assert rows.loc[("ImageNet", 200), "power_low"] == pytest.approx(ci.low)
    text = hierarchy.power_curve_summary(curve)
    imagenet, control = text.split("\n")
    assert "**200 images** are enough for a power of 80 %" in imagenet   # 20/20: ≥ 0.84
    assert "**No size tried is enough**" in control and "50 % at 200 images" in control
    assert "100 images (20 test): power 25 % [" in imagenet
    path = tmp_path / "curve.csv.gz"
    curve.to_csv(path, index=False)
    pd.testing.assert_frame_equal(hierarchy.read_power_curve(path), curve)
    assert (curve.version == hierarchy.SIMULATION_VERSION).all()
    curve.assign(version=1).to_csv(path, index=False)
    with pytest.warns(UserWarning, match="made by simulation version 1, not"):
        hierarchy.read_power_curve(path)
    # a truth it simulated planted another way since: warned about, by name; a table
    # from before truths were versioned counts its held_<truth> columns, as version 1
    assert set(curve.truth_versions) == {"backprop:1;none:1"}
    monkeypatch.setitem(calibration.TRUTH_VERSION, "none", 2)
    curve.to_csv(path, index=False)
    with pytest.warns(UserWarning, match=r"simulated the truths \['none'\] as they were"):
        hierarchy.read_power_curve(path)
    curve.drop(columns="truth_versions").to_csv(path, index=False)
    with pytest.warns(UserWarning, match=r"simulated the truths \['none'\]"):
        hierarchy.read_power_curve(path)
    monkeypatch.setitem(calibration.TRUTH_VERSION, "none", 1)
    monkeypatch.setitem(calibration.TRUTH_VERSION, "paper", 7)   # not simulated: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hierarchy.read_power_curve(path)
    with pytest.raises(FileNotFoundError, match="power_curve.py --ship"):
        hierarchy.read_power_curve(tmp_path / "missing.csv.gz")
    with pytest.raises(ValueError, match="no rows for .* at noise 2"):
        hierarchy.power_curve_summary(curve, noise=2.0)
    with pytest.raises(ValueError, match="must be tuples"):
        hierarchy.power_curve({("ImageNet", 100): sims["ImageNet", 100, 20, 1.0]})

    from gradbrain.plotting import plot_power_curve

    fig = plot_power_curve(curve, alpha=0.05)
    assert fig.axes[0].get_title() == "ImageNet weights" and len(fig.axes) == 4
    power_line = fig.axes[0].lines[0]       # ImageNet, power, noise 1
    np.testing.assert_allclose(np.asarray(power_line.get_ydata(), float), [2 / 8, 1.0])
    for ax in fig.axes:
        assert ax.get_ylim() == pytest.approx((-0.03, 1.03))
    assert fig.axes[0].get_ylabel() and fig.axes[2].get_xlabel()


def test_shipped_power_curve_covers_both_weights_and_matches_this_version():
    """Chapter 04 reads it: ImageNet and random-init rows for the backprop verdict at every
    size and noise level, made by this simulation version (no warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curve = hierarchy.read_power_curve()
    verdict = curve[curve.part == hierarchy.VERDICT_BACKPROP]
    assert set(verdict.weights) == {"ImageNet", "random-init"}
    grid = verdict.groupby("weights")[["n_images", "noise"]].apply(
        lambda g: set(map(tuple, g.to_numpy())))
    assert grid["ImageNet"] == grid["random-init"] and len(grid["ImageNet"]) >= 4
    assert verdict[["power", "fpr"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (verdict.power_low <= verdict.power).all() and (verdict.n_power > 0).all()


def test_best_course_figure_marks_exactly_the_significant_times():
    from gradbrain.plotting import plot_best_courses

    times = np.arange(-100, 500, 10.0)
    results = {name: {"times": times, "best_curve": np.sin(times / 100 + k),
                      "significant_time": (times > 100 * k) & (times < 200 + 100 * k)}
               for k, name in enumerate(("activation", "gradient (ce)"))}
    fig = plot_best_courses(results)
    ax = fig.axes[0]
    assert len(ax.collections) == 2   # each signal's bar: one segment per significant time
    for bar, res in zip(ax.collections, results.values()):
        starts = np.array([segment[0, 0] for segment in bar.get_segments()])
        np.testing.assert_allclose(starts + 5, res["times"][res["significant_time"]])
    assert ax.get_xlabel().endswith("(ms)") and ax.get_ylabel()


def test_model_based_rates_leave_each_study_out(rng):
    """Each simulated study judged against all the others, by an explicit loop."""
    part = "gradient latency follows the autograd order"  # nulls none, forward, paper
    truths = ("none", "forward", "paper", "backprop")
    rows = [{"truth": t, "seed": s, "prediction": "2 temporal", "part": part,
             "value": rng.normal(3.0 if t == "backprop" else 0.0), "holds": False}
            for t in truths for s in range(24)]
    sims = pd.DataFrame(rows)
    rates = hierarchy.error_rates(sims, null="model").set_index("part").loc[part]
    held = {t: [] for t in truths}
    for row in rows:
        p = 0.0
        for null in ("none", "forward", "paper"):
            others = [r["value"] for r in rows if r["truth"] == null
                      and (r["truth"], r["seed"]) != (row["truth"], row["seed"])]
            p = max(p, (1 + sum(v >= row["value"] for v in others)) / (1 + len(others)))
        held[row["truth"]].append(p < 0.05)
    assert rates.fpr == pytest.approx(np.mean(held["none"] + held["forward"] + held["paper"]))
    assert rates.power == pytest.approx(np.mean(held["backprop"])) and rates.power > 0.2
    with pytest.raises(ValueError, match="need the columns"):
        hierarchy.error_rates(sims.drop(columns="prediction"), null="model")


@pytest.fixture(scope="module")
def small_planted():
    return _planted_features(60)


def test_simulate_tests_judges_each_truth_as_run_does(small_planted, tmp_path, monkeypatch):
    """Rows = run() on make_study of each truth and seed; cached per study and keyed on
    the settings and features; a shipped table is used only for its own key."""
    import copy

    monkeypatch.setenv("GRADBRAIN_DATA", str(tmp_path / "data"))
    kw = dict(n_perm=200, n_boot=20, device="cpu")
    sims = simulation.simulate_tests(small_planted, truths=("backprop", "none"), n_seeds=1,
                                    first_seed=3, noise=0.5, progress=False, **kw)
    assert list(sims.truth.unique()) == ["backprop", "none"] and set(sims.seed) == {3}
    assert set(sims.part) == set(hierarchy.TEST_TRUTHS)
    study = make_study(3, n_images=60, features=small_planted, gradient_truth="none",
                       noise=0.5)
    direct = backprop_tests(study, small_planted, seed=3, **kw)
    mine = sims[(sims.truth == "none") & ~sims.part.str.startswith("verdict")
                & (sims.prediction != "estimate")]
    np.testing.assert_array_equal(mine.holds.to_numpy(), direct.tests.holds.to_numpy())
    np.testing.assert_allclose(mine.value.to_numpy(float), direct.tests.value.to_numpy(float))
    # the estimates' equivalence decisions (not the timing gap's: it has none)
    mine = sims[(sims.truth == "none") & (sims.prediction == "estimate")]
    decided = direct.estimates[direct.estimates.estimate.isin(hierarchy.TEST_TRUTHS)]
    assert list(mine.part) == list(decided.estimate) and len(mine) == 2
    np.testing.assert_array_equal(mine.holds.to_numpy(), decided.equivalent.to_numpy())
    np.testing.assert_allclose(mine.value.to_numpy(float), decided.value.to_numpy(float))
    verdict = sims.set_index(["truth", "part"]).holds
    assert verdict[("backprop", hierarchy.VERDICT_BACKPROP)]  # planted, layer-specific
    assert not verdict[("none", hierarchy.VERDICT_BACKPROP)]
    # cached per study: a second call reads them (no study is simulated again) ...
    made = []
    real = simulated.make_study
    monkeypatch.setattr(simulated, "make_study", lambda *a, **k: made.append(a) or real(*a, **k))
    again = simulation.simulate_tests(small_planted, truths=("backprop", "none"), n_seeds=1,
                                     first_seed=3, noise=0.5, progress=False, **kw)
    assert made == []
    pd.testing.assert_frame_equal(again, sims, check_dtype=False)
    home = tmp_path / "data" / "simulated_tests"
    assert sorted(p.name for p in home.rglob("*.csv")) == ["backprop-3.csv", "none-3.csv"]
    # a cached study cut short is named, deleted and simulated again
    cut = next(home.rglob("none-3.csv"))
    cut.write_text("\n".join(cut.read_text().splitlines()[:3]))
    with pytest.warns(RuntimeWarning, match="Cached simulated study .* is unreadable"):
        healed = simulation.simulate_tests(small_planted, truths=("backprop", "none"),
                                          n_seeds=1, first_seed=3, noise=0.5, progress=False,
                                          **kw)
    pd.testing.assert_frame_equal(healed, sims, check_dtype=False)
    assert len(made) == 1
    made.clear()
    # ... another setting is another key: simulated anew
    simulation.simulate_tests(small_planted, truths=("none",), n_seeds=1, first_seed=3,
                             noise=0.6, progress=False, **kw)
    assert len(made) == 1 and len(list(home.iterdir())) == 2
    # a table shipped for these settings and features is read instead of simulating
    monkeypatch.setattr(hierarchy.calibration, "_REFERENCE", tmp_path / "reference")
    shipped = sims.assign(value=sims.value.abs() + 100.0)  # recognisable
    simulation.write_reference(shipped, small_planted, noise=0.5, name="test", **kw)
    from_shipped = simulation.simulate_tests(small_planted, truths=("backprop", "none"),
                                            n_seeds=1, first_seed=3, noise=0.5,
                                            progress=False, **kw)
    assert len(made) == 1
    np.testing.assert_allclose(from_shipped.value, shipped.value)
    # a truth planted anew since (its TRUTH_VERSION raised): its shipped and cached rows
    # are not believed, it is simulated again (the other truth still read as shipped)
    monkeypatch.setitem(calibration.TRUTH_VERSION, "none", 2)
    renewed = simulation.simulate_tests(small_planted, truths=("backprop", "none"),
                                       n_seeds=1, first_seed=3, noise=0.5, progress=False,
                                       **kw)
    assert len(made) == 2 and made[-1][0] == 3
    pd.testing.assert_frame_equal(renewed[renewed.truth == "none"].reset_index(drop=True),
                                  sims[sims.truth == "none"].reset_index(drop=True),
                                  check_dtype=False)
    assert (renewed[renewed.truth == "backprop"].value.to_numpy() > 99).all()
    assert "none-v2-3.csv" in {p.name for p in home.rglob("*.csv")}
    monkeypatch.setitem(calibration.TRUTH_VERSION, "none", 1)
    made.pop()
    # not for other settings, nor for other features
    other = simulation.simulate_tests(small_planted, truths=("none",), n_seeds=1, first_seed=3,
                                     noise=0.5, cache=tmp_path / "other", progress=False,
                                     **{**kw, "n_perm": 201})
    assert len(made) == 2 and len(other) == 10   # 6 tests, 2 estimates, 2 verdicts
    changed = copy.copy(small_planted)
    changed.activations = {k: v * 1.01 for k, v in small_planted.activations.items()}
    simulation.simulate_tests(changed, truths=("none",), n_seeds=1, first_seed=3, noise=0.5,
                             cache=tmp_path / "other", progress=False, **kw)
    assert len(made) == 3
    # the seed of a study under test is never among its own null: the next one is taken
    skipped = simulation.simulate_tests(small_planted, truths=("none",), n_seeds=2,
                                        first_seed=3, exclude_seeds=[4], noise=0.5,
                                        progress=False, **kw)
    assert sorted(set(skipped.seed)) == [3, 5] and len(made) == 4   # seed 3 was cached
    # the seeds that chose the statistics (1000-1011) never calibrate; by default the
    # studies come from the reserved block, far from any study's own small seed
    assert 1011 in calibration.SELECTION_SEEDS and 1000 in calibration.SELECTION_SEEDS
    past = simulation.simulate_tests(small_planted, truths=("none",), n_seeds=2,
                                     first_seed=1011, noise=0.5, progress=False, **kw)
    assert sorted(set(past.seed)) == [1012, 1013]
    default = inspect.signature(simulation.simulate_tests).parameters["first_seed"].default
    assert default == calibration.FIRST_SIMULATION_SEED >= 1_000_000
    with pytest.raises(ValueError, match="'truths' must be one of"):
        simulation.simulate_tests(small_planted, truths=("sideways",), progress=False)
    with pytest.raises(ValueError, match="'seed', 'fmri' and 'meg'"):
        simulation.simulate_tests(small_planted, seed=3, progress=False)


def test_simulate_tests_at_another_studys_images_and_sizes(small_planted, tmp_path,
                                                           monkeypatch):
    """With a study's own images (not the embedded ones) and its sizes, the rows are
    run() on make_study of those images and sizes; the sizes enter the cache key only
    when given, so default-sized keys (and the shipped tables they find) are unchanged."""
    import dataclasses

    from gradbrain.data import load_embedded

    monkeypatch.setenv("GRADBRAIN_DATA", str(tmp_path))
    ids = [f"things-{i:03d}" for i in range(60)]
    images = dataclasses.replace(load_embedded(60), ids=ids)
    feats = dataclasses.replace(small_planted, image_ids=ids)
    kw = dict(n_perm=100, n_boot=10, device="cpu")
    sizes = dict(n_test=15, n_meg_test_repeats=4)
    sims = simulation.simulate_tests(feats, images=images, truths=("backprop",), n_seeds=1,
                                    first_seed=5, noise=0.5, simulate_fmri=False,
                                    progress=False, **sizes, **kw)
    study = make_study(5, features=feats, images=images, gradient_truth="backprop",
                       noise=0.5, fmri=False, **sizes)
    direct = backprop_tests(study, feats, seed=5, n_perm_chance=0, **kw)
    assert simulation.study_sizes(study) == {"images": images, **sizes}
    mine = sims[~sims.part.str.startswith("verdict") & (sims.prediction != "estimate")]
    np.testing.assert_array_equal(mine.holds.to_numpy(), direct.tests.holds.to_numpy())
    np.testing.assert_allclose(mine.value.to_numpy(float), direct.tests.value.to_numpy(float))
    modalities = {"fmri": False, "meg": True}
    plain = simulation._simulation_key(feats, 60, 0.5, modalities, kw)
    sized = simulation._simulation_key(feats, 60, 0.5, modalities, kw, sizes)
    assert "n_test" not in plain and sized == {**plain, **sizes}


def test_calibrate_uses_the_model_based_null_where_it_can_reach_alpha(small_planted):
    study = make_study(3, n_images=60, features=small_planted, gradient_truth="backprop",
                       noise=0.5)
    result = backprop_tests(study, small_planted, n_perm=200, n_boot=20, seed=3, device="cpu")
    observed = result.tests.set_index("part").value
    prediction = result.tests.set_index("part").prediction

    estimates = [name for name, _, _ in hierarchy.ESTIMATES.values()]

    def table(n_seeds, below):
        """Null studies all below (or above) the observed value; power studies above all."""
        rows = []
        for part, (nulls, power_truth) in hierarchy.TEST_TRUTHS.items():
            for truth in (*nulls, power_truth):
                for s in range(n_seeds):
                    value = observed.get(part, 1.0)
                    value = (value + 5 if truth == power_truth else
                             value - 1 - 0.01 * s if below else value + 1 + 0.01 * s)
                    rows.append({"truth": truth, "seed": s, "part": part, "value": value,
                                 "holds": truth == power_truth,
                                 "prediction": prediction.get(part, "estimate" if part in
                                                              estimates else "verdict")})
        return pd.DataFrame(rows)

    calibrated = result.calibrate(table(20, below=True))  # every null study below: p = 1/21
    tests = calibrated.tests
    finite = tests.value.notna()
    np.testing.assert_allclose(tests.p_model[finite], 1 / 21)
    assert (tests.null_used[finite] == "model-based").all()
    assert tests.holds[finite].all() and (tests.fpr == 0).all() and (tests.power == 1).all()
    assert (tests.holds_nominal == result.tests.holds).all()
    assert calibrated.consistent_with_backprop == bool(finite.all())
    summary = calibrated.summary()
    assert "power 100 % [" in summary and "model-based null (p = 0.0476)" in summary
    assert "found a planted backprop in 100 %" in summary
    # the estimates gain the error rates of their equivalence decisions (timing: none)
    rates = calibrated.estimates.set_index("estimate")
    decided = [hierarchy.ESTIMATES[k][0] for k in ("spatial", "temporal")]
    assert (rates.loc[decided, "power"] == 1).all() and (rates.loc[decided, "fpr"] == 0).all()
    assert np.isnan(rates.loc[hierarchy.ESTIMATES["timing"][0], "power"])
    assert '"equivalent" was declared in 100 %' in summary
    # what a planted backprop gives (here 1 + 5 in every simulated backprop study)
    assert (rates.loc[decided, "backprop_mean"] == 6).all()
    assert "whose contrast averages +6.00 on these features" in summary
    # every null study above the observed value: nothing holds
    assert not result.calibrate(table(20, below=False)).tests.holds.any()
    # too few null studies (floor 1/11 > α): the nominal decisions stand, rates quoted
    few = result.calibrate(table(10, below=False)).tests
    assert (few.null_used == "nominal").all() and (few.holds == result.tests.holds).all()
    assert "nominal null (too few simulated studies" in result.calibrate(
        table(10, below=False)).summary()


def test_unique_gradients_do_not_pass_for_activations(planted):
    """Gradients that equal the activations (plus a little of their own) pass the spatial
    tests on a no-gradient study as extracted; beyond activations they cannot."""
    import copy

    rng = np.random.default_rng(5)
    echo = copy.copy(planted)
    echo.gradients = {"ce": {layer: a + 0.1 * rng.normal(size=a.shape).astype(np.float32)
                             for layer, a in planted.activations.items()}}
    study = make_study(4, n_images=N_IMAGES, features=echo, gradient_truth="none", noise=0.5,
                       meg=False)
    kw = dict(n_perm=500, n_boot=0, seed=4, device="cpu")
    whole = backprop_tests(study, echo, **kw)
    unique = backprop_tests(study, echo, gradient_part="unique", **kw)
    spatial = "gradient spatial score > 0"
    assert whole.tests.set_index("part").holds[spatial]
    assert not unique.tests.set_index("part").holds[spatial]
    peak = {name: np.nanmedian(r.best[r.signal]["peak"][r.reliable])
            for name, r in (("whole", whole), ("unique", unique))}
    assert peak["whole"] > 0.5 and peak["unique"] < 0.3 * peak["whole"], peak
    assert unique.gradient_part == "unique" and "unique part of the gradient (ce)" in \
        unique.summary()
    with pytest.raises(ValueError, match="'gradient_part' must be one of"):
        backprop_tests(study, echo, gradient_part="residual", **kw)


# --------------------------------------------------------------------------- profile centres

def test_profile_centre_is_the_profile_weighted_mean_depth(rng):
    """Weights: each column's scores above its lowest layer; NaN scores weigh 0; a flat
    (or all-NaN) column has no centre."""
    profile = rng.normal(size=(6, 9))
    depth = np.linspace(0, 1, 6)
    profile[2, 3] = np.nan
    profile[:, 7] = 0.4
    profile[:, 8] = np.nan
    expected = []
    for column in profile.T:
        ok = np.isfinite(column)
        weight = column[ok] - column[ok].min() if ok.any() else np.zeros(0)
        expected.append(np.sum(weight * depth[ok]) / weight.sum() if weight.sum() > 0
                        else np.nan)
    np.testing.assert_allclose(hierarchy.profile_centre(profile, depth), expected)
    # a single-peaked profile's centre lies on the peak's side of the middle
    peaked = np.exp(-((depth[:, None] - np.array([0.1, 0.9])) ** 2) / 0.02)
    centre = hierarchy.profile_centre(peaked, depth)
    assert centre[0] < 0.3 and centre[1] > 0.7
    finite = [0, 1, 2, 4, 5, 6]   # unit_best_layer averages NaN scores as 0
    unit = hierarchy.unit_best_layer(profile[:, finite], np.arange(6), depth)
    np.testing.assert_allclose(unit["centre"], np.asarray(expected)[finite])
    with pytest.raises(ValueError, match="'profile' must be"):
        hierarchy.profile_centre(profile, depth[:-1])


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_profile_permutation_test_equals_scipy_for_every_permutation(rng, method):
    n_layers, n_targets = 7, 25
    depth = np.linspace(0, 1, n_layers)
    target = rng.uniform(0, 80, n_targets)
    preferred = target / 80
    profile = np.exp(-((depth[:, None] - preferred[None]) ** 2) / 0.05) \
        + 0.3 * rng.standard_normal((n_layers, n_targets))
    mask = rng.random(n_targets) > 0.2
    correlate = stats.spearmanr if method == "spearman" else stats.pearsonr
    out = hierarchy.profile_permutation_test(profile, target, depth, mask=mask, method=method,
                                             n_perm=300, seed=3)
    centres = hierarchy.profile_centre(profile, depth)
    assert out["statistic"] == pytest.approx(correlate(centres[mask], target[mask])[0])
    expected = [correlate(hierarchy.profile_centre(profile, depth[perm])[mask],
                          target[mask])[0] for perm in out["permutations"]]
    np.testing.assert_allclose(out["null"], expected, atol=1e-12)
    assert out["p_value"] == pytest.approx(
        (1 + np.sum(np.asarray(expected) >= out["statistic"] - 1e-12)) / 301)
    assert out["statistic"] > 0.8 and out["p_value"] < 0.05 and out["min_p"] == 1 / 301
    less = hierarchy.profile_permutation_test(profile, target, depth, mask=mask, method=method,
                                              alternative="less", n_perm=300, seed=3)
    assert less["p_value"] == pytest.approx(
        (1 + np.sum(np.asarray(expected) <= out["statistic"] + 1e-12)) / 301)
    np.testing.assert_allclose(out["centres"][mask], centres[mask])
    assert np.isnan(out["centres"][~mask]).all() and out["n_targets"] == mask.sum()


def test_profile_permutation_p_values_are_calibrated_under_the_null(rng):
    """Profiles unrelated to the target: p < 0.05 in about 5 % of 300 data sets, though
    neighbouring layers' scores are correlated (smooth profiles)."""
    depth = np.linspace(0, 1, 8)
    p = []
    for _ in range(300):
        peak = rng.uniform(0, 1, 20)
        profile = np.exp(-((depth[:, None] - peak[None]) ** 2) / 0.08) \
            + 0.2 * rng.standard_normal((8, 20))
        p.append(hierarchy.profile_permutation_test(profile, rng.normal(size=20), depth,
                                                    n_perm=199, seed=int(rng.integers(1e6)))
                 ["p_value"])
    p = np.asarray(p)
    assert 0.02 <= np.mean(p < 0.05) <= 0.09
    assert 0.4 <= np.mean(p < 0.5) <= 0.6


def test_profile_permutation_test_bad_inputs(rng):
    depth = np.linspace(0, 1, 4)
    with pytest.raises(ValueError, match="'profile' must be"):
        hierarchy.profile_permutation_test(rng.normal(size=(3, 5)), rng.normal(size=5), depth)
    with pytest.raises(ValueError, match="at least 3 targets"):
        hierarchy.profile_permutation_test(np.ones((4, 5)), rng.normal(size=5), depth)
    with pytest.raises(ValueError, match="'values'"):
        hierarchy.profile_permutation_test(rng.normal(size=(4, 5)), rng.normal(size=5),
                                           [0, np.nan, 1, 2])
    with pytest.raises(ValueError, match="'n_perm'"):
        hierarchy.profile_permutation_test(rng.normal(size=(4, 5)), rng.normal(size=5), depth,
                                           n_perm=0)
    flat_target = hierarchy.profile_permutation_test(rng.normal(size=(4, 5)), np.ones(5),
                                                     depth, n_perm=5)
    assert np.isnan(flat_target["statistic"]) and np.isnan(flat_target["p_value"])


def test_bootstrap_of_profile_centres_equals_a_resampling_loop(rng):
    """statistic="centre": each resample's unit profiles (mean r per unit and layer), their
    centres, and Spearman with the units' median coordinate (scipy)."""
    depth, coordinate, y, prediction, mask = _bootstrap_problem(rng)
    n_layers, n_test, n_targets = prediction.shape
    units = hierarchy.hierarchy_units(coordinate, mask, 8)
    indices = rng.integers(0, n_test, (30, n_test))
    indices[0] = np.arange(n_test)
    out = hierarchy.bootstrap_spatial_score(prediction, y, coordinate, depth, mask=mask,
                                            units=units, boot_indices=indices, batch=8,
                                            statistic="centre", device="cpu")
    unit_coordinate = hierarchy.unit_coordinates(coordinate, units)
    expected = []
    for rows in indices:
        r = np.array([[np.corrcoef(prediction[k, rows, v], y[rows, v])[0, 1]
                       for v in range(n_targets)] for k in range(n_layers)])
        profile = hierarchy.unit_best_layer(r, units, depth, mask=mask)["profile"]
        expected.append(stats.spearmanr(hierarchy.profile_centre(profile, depth),
                                        unit_coordinate).statistic)
    np.testing.assert_allclose(out["samples"], expected, atol=1e-10)
    assert out["spearman_ci"][0] > 0
    with pytest.raises(ValueError, match="'statistic'"):
        hierarchy.bootstrap_spatial_score(prediction, y, coordinate, depth, n_boot=2,
                                          statistic="mean")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_tests_on_real_architectures_features(model, request):
    """Studies simulated from a real network's features (ImageNet EfficientNet-Lite0; a
    random-init DINOv3 ViT-S/16, the only ViT weights offline), not from independent
    planted ones. On both, a study whose gradients carry no signal is not judged
    consistent with backprop. On EfficientNet-Lite0 the planted activation map is
    recovered and a planted backprop is found (seed 7). On the random-init ViT even the
    activation map is not recovered (spatial score about 0, fewer than 3 layers with a
    latency), which is why its benchmark finds no power (book, Methods: "On a ViT's
    features"); rates over many seeds are benchmarks/fpr_hierarchy.py's."""
    import warnings

    from gradbrain.data import load_embedded
    from gradbrain.features import extract

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = extract(request.getfixturevalue(model), load_embedded(160), losses=("ce",),
                        device="cpu")
    for truth in ("none", "backprop"):
        study = make_study(7, n_images=160, features=feats, gradient_truth=truth, noise=1.0,
                           gradient_loss="ce")
        result = backprop_tests(study, feats, n_perm=1000, n_boot=50, n_perm_chance=0,
                               seed=7, device="cpu")
        if truth == "none":
            assert not result.consistent_with_backprop
            assert not result.predictions["1 spatial"]
        if model == "cnn":
            scores = result.scores.set_index(["signal", "score"])
            assert scores.at[("activation", "spatial"), "spearman"] > 0.9, truth
            assert result.consistent_with_backprop == (truth == "backprop")


def test_run_spatial_statistic_is_the_profile_centre_or_the_best_layer(small_planted):
    """Test 1b's value is scipy's Spearman of the units' centres (default) or argmax
    depths (``"best"``) with the units' median distance from V1."""
    study = make_study(3, n_images=60, features=small_planted, gradient_truth="backprop",
                       noise=0.5, meg=False)
    depth = np.asarray(small_planted.depth, float)
    for statistic, label in (("centre", "profile centres"), ("best", "best layers")):
        result = backprop_tests(study, small_planted, n_perm=200, n_boot=0, n_perm_chance=0,
                               seed=3, device="cpu", spatial_statistic=statistic)
        assert result.spatial_statistic == statistic
        unit = result.unit_best[result.signal]
        coordinate = hierarchy.unit_coordinates(study.hierarchy, result.units)
        layer = (hierarchy.profile_centre(unit["profile"], depth) if statistic == "centre"
                 else depth[np.nan_to_num(unit["profile"], nan=-np.inf).argmax(0)])
        expected = stats.spearmanr(layer[unit["present"]],
                                   coordinate[unit["present"]]).statistic
        row = result.tests.set_index("part").loc["gradient spatial score > 0"]
        assert row.value == pytest.approx(expected) and label in row.statistic
    with pytest.raises(ValueError, match="spatial_statistic"):
        backprop_tests(study, small_planted, spatial_statistic="mean")


def test_run_without_bootstrap_gives_the_contrasts_point_values(small_planted):
    """n_boot=0 (what divergence calibrations run): the same contrast values as a
    bootstrapped run, with no interval and no equivalence decision."""
    study = make_study(5, n_images=60, features=small_planted, gradient_truth="backprop",
                       noise=0.5)
    kw = dict(n_perm=50, n_perm_chance=0, seed=5, device="cpu")
    plain = backprop_tests(study, small_planted, n_boot=0, **kw).estimates
    booted = backprop_tests(study, small_planted, n_boot=20, **kw).estimates
    assert list(plain.estimate) == list(booted.estimate) and len(plain) == 3
    np.testing.assert_allclose(plain.value.to_numpy(float), booted.value.to_numpy(float))
    assert plain.ci_low.isna().all() and not plain.equivalent.any()


def test_the_other_gradient_part_reuses_the_activation_encodings_and_gets_the_same_result(
        planted, monkeypatch):
    """Issue 33: chapter 04's second run (the other gradient part) refitted activation
    encodings that do not depend on it. With ``activations_from`` it fits the gradients
    alone, and its result equals a run that refits everything (fMRI and MEG)."""
    from gradbrain.analysis import backprop as bp

    study = make_study(0, n_images=N_IMAGES, features=planted, gradient_truth="backprop",
                       noise=0.5, sfreq=50.0)   # half the MEG time points: a quicker test
    kw = dict(n_perm=20, n_boot=10, n_perm_chance=0, device="cpu", seed=1)
    whole = backprop_tests(study, planted, **kw)
    assert whole.settings == {"cv": 5, "n_boot": 10, "ci": 0.95, "seed": 1,
                              "predictions": True}
    refitted = backprop_tests(study, planted, gradient_part="unique", **kw)
    fitted = []
    for name in ("fmri_encoding", "meg_encoding"):
        real = getattr(bp, name)
        monkeypatch.setattr(bp, name, lambda *a, _real=real, **k: fitted.append(
            k.get("only")) or _real(*a, **k))
    reused = backprop_tests(study, planted, gradient_part="unique", activations_from=whole,
                            **kw)
    assert fitted == [["gradient (ce)"], ["gradient (ce)"]]
    assert reused.fmri["activation"] is whole.fmri["activation"]
    assert reused.meg["activation"] is whole.meg["activation"]
    pd.testing.assert_frame_equal(reused.tests, refitted.tests)
    pd.testing.assert_frame_equal(reused.estimates, refitted.estimates)
    # a run fitted otherwise is refused, naming what differs
    with pytest.raises(ValueError, match=r"cannot be reused: cv: 5 there, 3 here"):
        backprop_tests(study, planted, gradient_part="unique", activations_from=whole,
                       **{**kw, "cv": 3})
    without = dataclasses.replace(whole, settings={**whole.settings, "predictions": False})
    with pytest.raises(ValueError, match="test predictions: not kept there, needed here"):
        backprop_tests(study, planted, activations_from=without, **kw)
    with pytest.raises(TypeError, match="'activations_from' must be a HierarchyResult"):
        backprop_tests(study, planted, activations_from=whole.fmri, **kw)
