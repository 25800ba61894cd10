"""Time-resolved MEG encoding and peak latencies."""

import numpy as np
from scipy import stats
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from gradbrain import meg
from gradbrain.analysis import encoding
from gradbrain.ridge import pearson_r


def test_batched_encoding_equals_a_per_time_point_scikit_learn_loop(rng):
    """One problem over (sensors × times) = a loop of per-time brute-force fits."""
    n, p, c, t = 60, 6, 3, 4
    X = rng.normal(size=(n, p))
    Y = np.einsum("np,pct->nct", X, rng.normal(size=(p, c, t))) + rng.normal(size=(n, c, t))
    alphas = np.logspace(-1, 4, 6)
    out = meg.encode_time_resolved(X[:45], Y[:45], X[45:], Y[45:], alphas=alphas, cv=3,
                                   device="cpu", dtype=torch.float64)
    for ti in range(t):
        y_train = Y[:45, :, ti]
        scores = np.zeros((len(alphas), c))
        for i, alpha in enumerate(alphas):
            for train, test in KFold(3).split(X[:45]):
                fit = Ridge(alpha=alpha).fit(X[:45][train], y_train[train])
                scores[i] -= ((fit.predict(X[:45][test]) - y_train[test]) ** 2).mean(0)
        best = alphas[scores.argmax(0)]
        np.testing.assert_allclose(out["alpha"][:, ti], best)
        for ci in range(c):
            pred = Ridge(alpha=best[ci]).fit(X[:45], y_train[:, ci]).predict(X[45:])
            r = np.corrcoef(pred, Y[45:, ci, ti])[0, 1]
            assert out["r"][ci, ti] == pytest.approx(r, abs=1e-5)


def test_peak_latency_is_the_mean_of_the_window_around_the_maximum():
    times = np.arange(10) * 10.0
    curve = np.array([0, 0.2, 0.96, 1.0, 0.97, 0.5, 0.99, 0.3, 0, 0])
    assert meg.peak_latency(times, curve) == pytest.approx(30.0)  # 20, 30, 40 ms; not 60
    with pytest.raises(ValueError, match="never rises above 0"):
        meg.peak_latency(times, -np.ones(10))
    with pytest.raises(ValueError, match="1-D of equal length"):
        meg.peak_latency(times, curve[:5])


def test_average_by_image_equals_numpy_reference(cnn):
    from gradbrain import features as gf
    from gradbrain.data import load_embedded
    from gradbrain.data.simulated import make_study

    feats = gf.extract(cnn, load_embedded(20), losses=("ce",))
    study = make_study(0, n_images=20, features=feats, fmri=False)
    ids = list(np.asarray(study.image_ids)[study.split == "test"])
    averaged = meg.average_by_image(study.epochs, ids)
    data, meta = study.epochs.get_data(), study.epochs.metadata
    for i, image_id in enumerate(ids):
        np.testing.assert_allclose(averaged[i], data[(meta.image_id == image_id).to_numpy()].mean(0))
    with pytest.raises(ValueError, match="No trials for 1 image"):
        meg.average_by_image(study.epochs, ids + ["nope"])


# --------------------------------------------------------------------------- decoding


def _sliding(alphas, cv=None):
    from mne.decoding import SlidingEstimator
    from sklearn.linear_model import RidgeCV as SkRidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ridge = (SkRidgeCV(alphas=alphas) if cv is None else
             SkRidgeCV(alphas=alphas, cv=KFold(cv), scoring="neg_mean_squared_error"))
    return SlidingEstimator(make_pipeline(StandardScaler(), ridge), verbose=False)


def _decoding_problem(rng, n=80, c=12, t=5, k=3):
    meg_data = rng.normal(size=(n, c, t)) * 1e-13 + 3e-13  # tesla-like scale and offset
    W = rng.normal(size=(c, t, k)) * rng.uniform(0, 1, t)[None, :, None]
    y = np.einsum("nct,ctk->nk", meg_data / 1e-13, W) + rng.normal(size=(n, k))
    return meg_data, y


@pytest.mark.parametrize("cv", ["loo", 4])
def test_decoding_equals_mne_sliding_estimator(rng, cv):
    """Same alphas, same predictions as SlidingEstimator(StandardScaler + RidgeCV), per target."""
    X, y = _decoding_problem(rng)
    alphas = np.logspace(-2, 4, 7)
    ours = meg.decode_time_resolved(X[:60], y[:60], X[60:], y[60:], alphas=alphas, cv=cv,
                                    device="cpu")
    assert ours["prediction"].shape == (20, 5, 3) and ours["r"].shape == (5, 3)
    for k in range(3):
        reference = _sliding(alphas, None if cv == "loo" else cv).fit(X[:60], y[:60, k])
        np.testing.assert_allclose(ours["prediction"][:, :, k], reference.predict(X[60:]),
                                   rtol=1e-8, atol=1e-10)
        chosen = [est.steps[-1][1].alpha_ for est in reference.estimators_]
        np.testing.assert_array_equal(ours["alpha"][:, k], chosen)
    single = meg.decode_time_resolved(X[:60], y[:60, 0], X[60:], alphas=alphas, cv=cv,
                                      device="cpu")
    assert single["prediction"].shape == (20, 5) and "r" not in single
    np.testing.assert_allclose(single["prediction"], ours["prediction"][:, :, 0], rtol=1e-10)


def test_category_decoding_finds_the_planted_window(rng):
    """Category information planted from 30 to 60 ms only: chance (1/3) before, high during."""
    n, c, times = 150, 20, np.arange(-20, 100, 10)
    labels = rng.choice(["cat", "dog", "car"], n, p=[0.6, 0.2, 0.2])  # one frequent category
    patterns = {name: rng.normal(size=c) for name in ("cat", "dog", "car")}
    data = rng.normal(size=(n, c, len(times)))
    window = (times >= 30) & (times <= 60)
    for i, label in enumerate(labels):
        data[i][:, window] += 1.5 * patterns[label][:, None]
    out = meg.decode_category(data[:100], labels[:100], data[100:], labels[100:], device="cpu")
    assert out["chance"] == pytest.approx(1 / 3)
    assert out["accuracy"][window].min() > 0.9
    assert out["accuracy"][times < 0].mean() < 0.45  # guessing, not the majority category
    with pytest.raises(ValueError, match="absent from training"):
        meg.decode_category(data[:100], labels[:100], data[100:], np.full(50, "eel"))


def test_decoding_bad_inputs(rng):
    X, y = _decoding_problem(rng, n=20)
    with pytest.raises(ValueError, match=r"must have shape \(n_trials, n_channels, n_times\)"):
        meg.decode_time_resolved(X[:, :, 0], y, X)
    with pytest.raises(ValueError, match=r"'y_train' must have shape \(n=20,\)"):
        meg.decode_time_resolved(X, y[:5], X)
    with pytest.raises(ValueError, match="'cv' must be 'loo', an int"):
        meg.decode_time_resolved(X, y, X, cv="kfold")
    with pytest.raises(ValueError, match=r"'y_test' must have shape \(n=20,\)"):
        meg.decode_time_resolved(X, y, X, y_test=y[:7])
    with pytest.raises(ValueError, match="'meg_train' is empty"):
        meg.decode_time_resolved(X[:, :0], y, X[:, :0])
    with pytest.raises(ValueError, match="'groups' need a group splitter"):
        meg.decode_time_resolved(X, y, X, groups=np.arange(20))
    with pytest.raises(ValueError, match=r"fold 0's test indices run from 18 to 25"):
        meg.decode_time_resolved(X, y, X, cv=[(np.arange(10), np.arange(18, 26))])
    with pytest.raises(ValueError, match="is not a device torch knows"):
        meg.decode_time_resolved(X, y, X, device="gpu")
    with pytest.raises(ValueError, match=r"'labels_test' must hold one label per trial \(20\)"):
        meg.decode_category(X, np.arange(20) % 2, X, np.arange(19) % 2)
    grad = torch.as_tensor(X).requires_grad_()
    out = meg.decode_time_resolved(grad, y, grad, cv=3)  # used detached, as RidgeCV does
    np.testing.assert_allclose(out["prediction"],
                               meg.decode_time_resolved(X, y, X, cv=3)["prediction"])
    X[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="'meg_train' contains NaN"):
        meg.decode_time_resolved(X, y, X)


def _sliding_per_fold_reference(X, y, X_test, alphas, folds):
    """StandardScaler on all training trials, then a per-fold Ridge loop, per time point."""
    from sklearn.preprocessing import StandardScaler

    prediction = np.empty((len(X_test), X.shape[2], y.shape[1]))
    chosen = np.empty((X.shape[2], y.shape[1]))
    for t in range(X.shape[2]):
        scaler = StandardScaler().fit(X[:, :, t])
        Z, Z_test = scaler.transform(X[:, :, t]), scaler.transform(X_test[:, :, t])
        scores = np.zeros((len(alphas), y.shape[1]))
        for i, alpha in enumerate(alphas):
            for train, test in folds:
                fit = Ridge(alpha=alpha).fit(Z[train], y[train])
                scores[i] -= ((fit.predict(Z[test]) - y[test]) ** 2).mean(0)
        best = scores.argmax(0)
        for k in range(y.shape[1]):
            chosen[t, k] = alphas[best[k]]
            prediction[:, t, k] = Ridge(alpha=alphas[best[k]]).fit(Z, y[:, k]).predict(Z_test)
    return prediction, chosen


@pytest.mark.parametrize("name", ["KFold", "shuffled KFold", "LeaveOneOut", "ShuffleSplit",
                                  "TimeSeriesSplit", "GroupKFold", "list with gaps"])
def test_decoding_every_splitter_equals_a_per_fold_loop(rng, name):
    """Issue #13: TimeSeriesSplit once differed from MNE/scikit-learn by 0.30 in R²."""
    from sklearn.model_selection import (GroupKFold, LeaveOneOut, ShuffleSplit,
                                         TimeSeriesSplit)

    X, y = _decoding_problem(rng, n=48, c=6, t=3, k=2)
    groups = np.repeat(np.arange(8), 6)  # e.g. the repeats of one image stay together
    splitters = {
        "KFold": (KFold(4), None), "shuffled KFold": (KFold(4, shuffle=True, random_state=0), None),
        "LeaveOneOut": (LeaveOneOut(), None),
        "ShuffleSplit": (ShuffleSplit(4, train_size=0.5, test_size=0.25, random_state=0), None),
        "TimeSeriesSplit": (TimeSeriesSplit(3), None), "GroupKFold": (GroupKFold(4), groups),
        "list with gaps": ([(np.arange(0, 20), np.arange(24, 34)),
                            (np.arange(10, 40), np.arange(42, 48))], None),
    }
    cv, g = splitters[name]
    folds = list(cv.split(X, y, g)) if hasattr(cv, "split") else cv
    alphas = np.logspace(-2, 4, 7)
    ours = meg.decode_time_resolved(X, y, X[:10], alphas=alphas, cv=cv,
                                    groups=g, device="cpu")
    reference, chosen = _sliding_per_fold_reference(X, y, X[:10], alphas, folds)
    np.testing.assert_array_equal(ours["alpha"], chosen)
    np.testing.assert_allclose(ours["prediction"], reference, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_curves_equal_a_numpy_loop(rng):
    n, c, t = 15, 4, 6
    Y = rng.normal(size=(n, c, t))
    predictions = Y[None] + rng.normal(size=(2, n, c, t)) * np.array([0.5, 2.0])[:, None, None, None]
    curves = meg.bootstrap_curves(Y, predictions, n_boot=7, seed=3, device="cpu", chunk=3)
    draws = np.random.default_rng(3).integers(0, n, (7, n))  # the same resamples, in order
    for b, rows in enumerate(draws):
        for layer in range(2):
            r = pearson_r(Y[rows].reshape(n, -1), predictions[layer][rows].reshape(n, -1))
            np.testing.assert_allclose(curves[b, layer], r.reshape(c, t).mean(0), atol=1e-10)
    with pytest.raises(ValueError, match=r"'predictions' must have shape \(n_layers,\)"):
        meg.bootstrap_curves(Y, predictions[0])


# --------------------------------------------------------------------------- a study


def _planted_features(n_images, n_layers=6, dim=8, seed=0):
    """Layer features that share nothing: each layer's planted MEG signal is its own."""
    from gradbrain.data import load_embedded
    from gradbrain.features import Features

    rng = np.random.default_rng(seed)
    images = load_embedded(n_images)
    layers = [f"layer{i}" for i in range(n_layers)]

    def draw():
        return {layer: rng.normal(size=(n_images, dim)).astype(np.float32) for layer in layers}

    return Features(model="planted", weights="independent Gaussian features", layers=layers,
                    depth=np.linspace(0, 1, n_layers), activations=draw(),
                    gradients={"ce": draw()}, backward_order={"ce": layers[::-1]},
                    image_ids=list(images.ids), labels=list(images.labels), pool="mean")


@pytest.fixture(scope="module")
def planted():
    return _planted_features(252)


@pytest.mark.parametrize("truth,seed", [("backprop", 0), ("backprop", 1), ("paper", 0)])
def test_planted_latencies_are_recovered_within_one_sample(planted, truth, seed):
    """With layer-specific signals, every peak latency lands within one sample (10 ms)."""
    from gradbrain.data.simulated import make_study
    from gradbrain.hierarchy import temporal_score

    study = make_study(seed, n_images=252, features=planted, fmri=False, gradient_truth=truth,
                       noise=0.5)
    results = encoding.meg_encoding(study, planted, n_boot=50, device="cpu")
    step = 1000 / study.epochs.info["sfreq"]
    act, grad = results["activation"], results["gradient (ce)"]
    assert np.abs(act["latency"] - study.truth["activation_latency"]).max() <= step + 1e-9
    assert np.abs(grad["latency"] - study.truth["gradient_latency"]).max() <= step + 1e-9
    assert act["r"].shape == (6, 272, len(study.epochs.times))
    assert np.all(act["latency_ci"][:, 0] <= act["latency"] + 1e-9)
    assert np.all(act["latency_ci"][:, 1] >= act["latency"] - 1e-9)
    assert temporal_score(act["latency"], act["depth"])["pearson"] > 0.95
    grad_score = temporal_score(grad["latency"], grad["depth"])["pearson"]
    if truth == "backprop":  # top layer's gradient first: latency falls with depth
        assert grad_score < -0.95
    else:
        expected = temporal_score(study.truth["gradient_latency"], grad["depth"])["pearson"]
        assert grad_score == pytest.approx(expected, abs=0.1)


def test_peak_permutation_test_equals_a_loop_and_is_calibrated(rng):
    """p-values equal an explicit loop over the same shuffles (scipy's Pearson r per
    sensor and time), and under the null they are uniform (false-positive rate ≈ α)."""
    n, c, t, n_perm = 12, 3, 5, 30
    Y = rng.normal(size=(n, c, t))
    P = np.stack([Y + rng.normal(scale=s, size=Y.shape) for s in (0.5, 50.0)])
    out = meg.peak_permutation_test(Y, P, n_perm=n_perm, seed=3, device="cpu")

    def peak(y, p):
        return max(np.mean([stats.pearsonr(y[:, ch, k], p[:, ch, k])[0] for ch in range(c)])
                   for k in range(t))

    order = np.random.default_rng(3)
    shuffles = [order.permutation(n) for _ in range(n_perm)]
    for layer in range(2):
        observed = peak(Y, P[layer])
        null = np.array([peak(Y[s], P[layer]) for s in shuffles])
        assert out["peak"][layer] == pytest.approx(observed, abs=1e-5)
        np.testing.assert_allclose(out["null_max"][:, layer], null, atol=1e-5)
        assert out["p_value"][layer] == pytest.approx(
            (1 + np.sum(null >= observed - 1e-6)) / (1 + n_perm))
    assert out["p_value"][0] == 1 / (1 + n_perm)   # a real signal: smallest p
    # per time point: the best layer's sensor-mean r, maximum over layers in the null too
    for k in range(t):
        def best(y, k=k):
            return max(np.mean([stats.pearsonr(y[:, ch, k], P[layer][:, ch, k])[0]
                                for ch in range(c)]) for layer in range(2))
        null = np.array([best(Y[s]) for s in shuffles])
        assert out["best_curve"][k] == pytest.approx(best(Y), abs=1e-5)
        assert out["p_time"][k] == pytest.approx((1 + np.sum(null >= best(Y) - 1e-6))
                                                 / (1 + n_perm))
    # calibration: 200 null data sets, 4 layers each
    p_values = np.concatenate([
        meg.peak_permutation_test(rng.normal(size=(20, 4, 6)), rng.normal(size=(4, 20, 4, 6)),
                                  n_perm=99, seed=k, device="cpu")["p_value"]
        for k in range(50)])
    rate = np.mean(p_values < 0.05)
    assert 0.02 <= rate <= 0.09, rate   # 200 tests: a binomial 99.8 % interval around 0.05
    with pytest.raises(ValueError, match="'n_perm' must be a positive integer"):
        meg.peak_permutation_test(Y, P, n_perm=0)
    with pytest.raises(ValueError, match="'predictions' must have shape"):
        meg.peak_permutation_test(Y, P[0])


def test_step_down_max_p_equals_westfall_young_by_hand(rng):
    """Independent reference: Westfall & Young's step-down algorithm written as its
    definition (for each rank, the share of permutations whose maximum over the
    remaining tests reaches the observed statistic; then the running maximum)."""
    observed = rng.normal(size=9)
    observed[[2, 5]] += 2.0
    null = rng.normal(size=(199, 9))
    null[:, 3] *= 2.0                         # tests need not share one null spread
    ranks = np.argsort(-observed)
    expected, running = np.empty(9), 0.0
    for k, test in enumerate(ranks):
        remaining = null[:, ranks[k:]].max(1)
        running = max(running, (1 + np.sum(remaining >= observed[test] - 1e-6)) / 200)
        expected[test] = running
    out = meg.step_down_max_p(observed, null)
    np.testing.assert_allclose(out, expected)
    # never below the single-test p, never above the single-step (max over all) one
    single = (1 + (null >= observed - 1e-6).sum(0)) / 200
    one_step = (1 + (null.max(1)[:, None] >= observed - 1e-6).sum(0)) / 200
    assert (out >= single - 1e-12).all() and (out <= one_step + 1e-12).all()
    # a NaN statistic is never significant and does not enter the others' maxima
    with_nan = observed.copy()
    with_nan[0] = np.nan
    nan_null = null.copy()
    nan_null[:, 0] = 1e9
    out_nan = meg.step_down_max_p(with_nan, nan_null)
    assert out_nan[0] == 1.0
    np.testing.assert_allclose(out_nan[1:], meg.step_down_max_p(observed[1:], null[:, 1:]))
    with pytest.raises(ValueError, match="'null' \\(n_perm, n_tests\\)"):
        meg.step_down_max_p(observed, null[:, :3])


def test_latency_gate_controls_the_family_wise_error_over_layers(rng):
    """16 layers that predict nothing beside one that does: the corrected gate gives a
    noise layer a latency in at most ~5 % of the data sets (measured 3.8 % of 400); the
    uncorrected one did in 43 % (issue 28). The layer with a real peak still passes."""
    n_sets, any_corrected, any_single, found = 150, 0, 0, 0
    for k in range(n_sets):
        Y = rng.normal(size=(24, 3, 8))
        P = rng.normal(size=(17, 24, 3, 8))
        P[0, :, :, 4] = Y[:, :, 4] + 0.8 * rng.normal(size=(24, 3))   # layer 0 predicts
        out = meg.peak_permutation_test(Y, P, n_perm=99, seed=k, device="cpu")
        any_corrected += bool((out["p_fwer"][1:] < 0.05).any())
        any_single += bool((out["p_value"][1:] < 0.05).any())
        found += bool(out["p_fwer"][0] < 0.05)
    # 150 sets: a binomial 99 % upper bound on a 5 % rate is ~0.10
    assert any_corrected / n_sets <= 0.10, any_corrected / n_sets
    assert any_single / n_sets >= 0.3, any_single / n_sets
    assert found / n_sets >= 0.95, found / n_sets


def test_layers_without_signal_get_no_latency(planted):
    """Gradient features of pure noise: every curve still has a maximum, but the peak test
    gives (almost) no layer a latency; the planted activations keep theirs."""
    from gradbrain.data.simulated import make_study

    study = make_study(0, n_images=252, features=planted, fmri=False, gradient_truth="none",
                       noise=0.5)
    results = encoding.meg_encoding(study, planted, n_boot=20, n_perm=200, device="cpu")
    act, grad = results["activation"], results["gradient (ce)"]
    assert act["significant"].all() and np.isfinite(act["latency"]).all()
    assert grad["significant"].sum() <= 1 and np.isnan(grad["latency"]).sum() >= 5
    assert np.isnan(grad["boot_latency"][:, ~grad["significant"]]).all()
    assert (grad["p_peak_fwer"][~grad["significant"]] >= 0.05).all()
    assert (grad["p_peak_fwer"] >= grad["p_peak"] - 1e-6).all()   # p_peak is float32
    # above chance per time point (BH over time): the activations' planted peaks are
    # found, noise gradients (almost) never are; q = scipy's BH of p
    assert act["significant_time"].sum() >= 5 and grad["significant_time"].sum() <= 2
    np.testing.assert_allclose(act["q_time"], stats.false_discovery_control(act["p_time"]))
    assert (act["q_time"] >= act["p_time"] - 1e-12).all()
    ungated = encoding.meg_encoding(study, planted, n_boot=0, n_perm=10, latency_alpha=1.0,
                               device="cpu")["gradient (ce)"]
    assert np.isfinite(ungated["latency"]).sum() >= 5   # what the gate removes
    # n_boot=0 (backprop_tests allows it): latencies without intervals
    assert ungated["boot_latency"].shape == (0, 6) and np.isnan(ungated["latency_ci"]).all()
    with pytest.raises(ValueError, match="'latency_alpha' must be in"):
        encoding.meg_encoding(study, planted, latency_alpha=0)
    with pytest.raises(ValueError, match="'n_boot' must be an integer >= 0"):
        encoding.meg_encoding(study, planted, n_boot=-1)
    # what the chapters print and draw copes with a signal left without latencies
    from gradbrain import hierarchy, plotting

    grad["latency"][:] = np.nan
    table = hierarchy.temporal_table(results).set_index("signal")
    assert table.loc["gradient (ce)", "layers timed"] == "0 of 6"
    assert np.isnan(table.loc["gradient (ce)", "temporal score (Pearson r)"])
    assert table.loc["activation", "temporal score (Pearson r)"] > 0.9
    assert "0 of 6 layers peak above chance" in hierarchy.summarize_meg(results, study)
    assert plotting.plot_topomaps(grad["r"], study.epochs.info, grad["times"], [0, 5],
                                  grad["latency"], names=grad["layers"], title="") is None


def test_meg_encoding_bad_inputs(planted):
    from gradbrain.data.simulated import make_study

    study = make_study(0, n_images=252, features=planted, meg=False)
    with pytest.raises(ValueError, match="has no MEG data"):
        encoding.meg_encoding(study, planted)
    other = _planted_features(40)
    study = make_study(0, n_images=252, features=planted, fmri=False)
    with pytest.raises(ValueError, match="image ids differ"):
        encoding.meg_encoding(study, other)


def test_one_alpha_per_time_point_equals_scikit_learn_ridgecv_per_time(rng):
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    n, p, c, t = 50, 5, 4, 3
    X = rng.normal(size=(n, p))
    Y = np.einsum("np,pct->nct", X, rng.normal(size=(p, c, t)) * [0.05, 1, 5]) \
        + rng.normal(size=(n, c, t))
    alphas = np.logspace(-1, 4, 6)
    out = meg.encode_time_resolved(X[:40], Y[:40], X[40:], Y[40:], alphas=alphas, cv=4,
                                   device="cpu", dtype=torch.float64, alpha_per="time")
    for ti in range(t):
        ref = SkRidgeCV(alphas=alphas, cv=KFold(4), scoring="neg_mean_squared_error")
        ref.fit(X[:40], Y[:40, :, ti])
        np.testing.assert_array_equal(out["alpha"][:, ti], ref.alpha_)
        r = pearson_r(Y[40:, :, ti], ref.predict(X[40:]))
        np.testing.assert_allclose(out["r"][:, ti], r, atol=1e-8)
    with pytest.raises(ValueError, match="'alpha_per' must be one of"):
        meg.encode_time_resolved(X[:40], Y[:40], X[40:], Y[40:], alpha_per="sensor")


def test_meg_partition_finds_late_gradients_only_where_planted(planted):
    """Truth 'paper': each layer's gradients carry a late (350-600 ms) signal of their own,
    so what they add to their activations peaks at the planted gradient latency and what
    activations add at the planted activation latency; before onset both sit at 0. The
    courses are variance_partition's per-target parts averaged over the sensors some
    layer's joint model predicts on training folds."""
    from gradbrain.data.simulated import make_study
    from gradbrain.ridge import variance_partition

    study = make_study(0, n_images=252, features=planted, fmri=False, gradient_truth="paper",
                       noise=0.5, sfreq=50.0)   # 20 ms steps: half the targets
    layers = planted.layers[::3]
    part = encoding.meg_partition(study, planted, layers=layers, device="cpu")
    times = part["times"]
    assert part["unique_gradient"].shape == (2, len(times)) and part["layers"] == layers
    # the same numbers from variance_partition on each layer, selected and averaged here
    ids = np.asarray(study.image_ids)
    train, test = np.flatnonzero(study.split == "train"), np.flatnonzero(study.split == "test")
    Y_train = meg.average_by_image(study.epochs, ids[train])
    Y_test = meg.average_by_image(study.epochs, ids[test])
    n_channels, n_times = Y_test.shape[1:]
    direct = [variance_partition(
        planted.activations[layer][train], planted.gradients["ce"][layer][train],
        Y_train.reshape(len(train), -1), planted.activations[layer][test],
        planted.gradients["ce"][layer][test], Y_test.reshape(len(test), -1),
        score="signed_r2", device="cpu") for layer in layers]
    selected = np.max([d["cv_r2_joint"].reshape(n_channels, n_times) for d in direct], 0) > 0
    np.testing.assert_array_equal(part["selected"], selected)
    assert 0 < selected.sum() < selected.size
    for name, key in (("unique_gradient", "unique_b"), ("unique_activation", "unique_a")):
        expected = [np.nanmean(np.where(selected, d[key].reshape(n_channels, n_times),
                                        np.nan), 0) for d in direct]
        np.testing.assert_allclose(part[name], expected, atol=1e-9)
    # planted truths: each part peaks where its signal was planted, not before onset
    step = 1000 / study.epochs.info["sfreq"]
    index = [planted.layers.index(layer) for layer in layers]
    np.testing.assert_allclose(times[part["unique_gradient"].argmax(1)],
                               study.truth["gradient_latency"][index], atol=2 * step)
    np.testing.assert_allclose(times[part["unique_activation"].argmax(1)],
                               study.truth["activation_latency"][index], atol=2 * step)
    before = times < 0
    assert part["prestimulus"]["unique_gradient"] == np.abs(
        part["unique_gradient"][:, before]).max() < 0.02
    assert part["unique_gradient"].max() > 10 * part["prestimulus"]["unique_gradient"]
    # what the chapter prints and draws
    after = part["unique_gradient"][:, ~before]
    layer, time = np.unravel_index(after.argmax(), after.shape)
    text = meg.summarize_partition(part)
    assert (f"gradients add to their activations: at most {after.max():.3f} "
            f"({layers[layer]}, {times[~before][time]:.0f} ms)") in text
    assert f"a median of {np.median(selected[:, ~before].sum(0)):.0f} of 272" in text
    from gradbrain import plotting

    fig = plotting.plot_time_courses({"gradients add": {
        "times": times, "depth": part["depth"], "curve": part["unique_gradient"],
        "prestimulus": part["prestimulus"]["unique_gradient"]}})
    band = fig.axes[0].patches[0].get_y(), fig.axes[0].patches[0].get_height()
    bound = part["prestimulus"]["unique_gradient"]
    np.testing.assert_allclose(band, (-bound, 2 * bound))
    np.testing.assert_allclose(part["shared"], part["r2_activation"] + part["r2_gradient"]
                               - part["r2_joint"], atol=1e-9)
    with pytest.raises(ValueError, match="'layers' must be some"):
        encoding.meg_partition(study, planted, layers=[])
    with pytest.raises(ValueError, match="'min_cv_r2' must be a number below 1"):
        encoding.meg_partition(study, planted, min_cv_r2="0")
    with pytest.raises(ValueError, match="'score' must be one of"):
        encoding.meg_partition(study, planted, layers=layers[:1], score="r")


def test_meg_partition_without_gradient_signal_credits_activations(planted):
    """Truth 'none': gradients carry nothing of their own, so what they add stays near 0
    at every time point while what activations add rises; with every sensor kept
    (``min_cv_r2=None``) the mean runs over all 272."""
    from gradbrain.data.simulated import make_study

    study = make_study(1, n_images=252, features=planted, fmri=False, gradient_truth="none",
                       noise=0.5, sfreq=50.0)
    part = encoding.meg_partition(study, planted, layers=planted.layers[1::3], min_cv_r2=None,
                             device="cpu")
    assert (part["n_selected"] == 272).all() and part["selected"].all()
    assert np.abs(part["unique_gradient"]).max() < 0.02
    assert part["unique_activation"].max() > 0.1


def test_meg_encodings_are_cached_on_every_input_they_read(tmp_path, monkeypatch):
    """An encoding kept on disk (issue 33: chapters refitted what others had fitted) is
    the one computed afresh, array for array; another setting, or other responses, miss
    the cache; a cache file cut short is named, deleted and computed again."""
    import copy

    from gradbrain.data.simulated import make_study

    planted = _planted_features(60, n_layers=3)
    study = make_study(0, n_images=60, features=planted, fmri=False, gradient_truth="none",
                       noise=0.5)
    settings = dict(n_boot=5, n_perm=20, device="cpu", only=["activation"])
    fresh = encoding.meg_encoding(study, planted, cache=tmp_path, **settings)   # a miss
    files = list(tmp_path.glob("meg-*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(encoding, "_meg_fit", lambda *a, **k: pytest.fail("refitted"))
    again = encoding.meg_encoding(study, planted, cache=tmp_path, **settings)
    assert again.spec == fresh.spec
    for name in fresh:
        assert again[name].keys() == fresh[name].keys()
        for key, value in fresh[name].items():
            if isinstance(value, np.ndarray):
                assert again[name][key].dtype == value.dtype, key
                np.testing.assert_array_equal(again[name][key], value, err_msg=key)
            else:
                assert again[name][key] == value, key
    monkeypatch.undo()
    calls = []
    real = encoding._meg_fit
    monkeypatch.setattr(encoding, "_meg_fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    encoding.meg_encoding(study, planted, cache=tmp_path, **{**settings, "n_boot": 6})
    other = copy.copy(study)
    other.epochs = study.epochs.copy()
    other.epochs._data[0, 0, 0] += 1.0
    encoding.meg_encoding(other, planted, cache=tmp_path, **settings)
    assert len(calls) == 2 and len(list(tmp_path.glob("meg-*.npz"))) == 3
    files[0].write_bytes(files[0].read_bytes()[:200])
    with pytest.warns(RuntimeWarning, match="Cached encoding .* is unreadable"):
        healed = encoding.meg_encoding(study, planted, cache=tmp_path, **settings)
    assert len(calls) == 3
    np.testing.assert_array_equal(healed["activation"]["r"], fresh["activation"]["r"])
    # a file whose arrays were changed after it was written (here: one score, in a
    # well-formed npz with the header it was written with) is not served
    with np.load(files[0]) as npz:
        arrays = {key: npz[key] for key in npz.files}
    edited = next(key for key in arrays if key.endswith("/r"))
    arrays[edited] = arrays[edited] + 1.0
    with open(files[0], "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(RuntimeWarning, match="do not match the digest"):
        again = encoding.meg_encoding(study, planted, cache=tmp_path, **settings)
    assert len(calls) == 4
    np.testing.assert_array_equal(again["activation"]["r"], fresh["activation"]["r"])
