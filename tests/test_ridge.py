"""Ridge kernel against independent references: scikit-learn brute force and himalaya."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from gradbrain.ridge import RidgeCV, encoding_scores, layerwise_scores, pearson_r


def _problem(rng, n, p, v, constant_column=False):
    X = rng.normal(size=(n, p)) + 3.0
    if constant_column:
        X[:, 1] = 7.0
    W = rng.normal(size=(p, v)) * rng.uniform(0.02, 1, v)
    Y = X @ W + rng.normal(size=(n, v)) * rng.uniform(0.5, 5, v) + 2.0
    return X, Y


def _brute_force(X, Y, alphas, cv, fit_intercept=True):
    """scikit-learn Ridge fitted per fold and per alpha, negative MSE, argmax per target."""
    folds = list(KFold(cv).split(X))
    scores = np.zeros((len(alphas), Y.shape[1]))
    for i, alpha in enumerate(alphas):
        for train, test in folds:
            model = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="svd")
            model.fit(X[train], Y[train])
            scores[i] += -((model.predict(X[test]) - Y[test]) ** 2).mean(0)
    scores /= len(folds)
    best = np.asarray(alphas)[scores.argmax(0)]
    coef = np.stack([Ridge(alpha=a, fit_intercept=fit_intercept, solver="svd")
                     .fit(X, Y[:, t]).coef_ for t, a in enumerate(best)])
    return scores, best, coef


@pytest.mark.parametrize("n,p", [(80, 12), (30, 60)])  # n > p (primal) and n < p (dual)
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_matches_scikit_learn_brute_force(rng, n, p, fit_intercept):
    X, Y = _problem(rng, n, p, 9, constant_column=True)
    alphas = np.logspace(-1, 5, 9)
    model = RidgeCV(alphas=alphas, cv=4, fit_intercept=fit_intercept, device="cpu",
                    dtype=torch.float64).fit(X, Y)
    scores, best, coef = _brute_force(X, Y, alphas, 4, fit_intercept)
    np.testing.assert_allclose(model.cv_scores_, scores, rtol=1e-8)
    np.testing.assert_array_equal(model.alpha_, best)
    np.testing.assert_allclose(model.coef_, coef, rtol=1e-6, atol=1e-9)
    refs = [Ridge(alpha=a, fit_intercept=fit_intercept).fit(X, Y[:, t]) for t, a in enumerate(best)]
    np.testing.assert_allclose(model.predict(X), np.column_stack([r.predict(X) for r in refs]),
                               rtol=1e-6, atol=1e-8)


def test_float32_predictions_within_1e4(rng):
    X, Y = _problem(rng, 200, 40, 50)
    alphas = np.logspace(0, 6, 7)
    ours = RidgeCV(alphas=alphas, device="cpu").fit(X, Y)
    exact = RidgeCV(alphas=alphas, device="cpu", dtype=torch.float64).fit(X, Y)
    assert (ours.alpha_ == exact.alpha_).mean() >= 0.98
    same = ours.alpha_ == exact.alpha_
    pred, ref = ours.predict(X)[:, same], exact.predict(X)[:, same]
    assert np.abs(pred - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("n,p", [(90, 15), (40, 70)])
def test_matches_himalaya_with_the_same_folds(rng, n, p):
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV

    set_backend("torch", on_error="raise")
    try:
        X, Y = _problem(rng, n, p, 20)
        alphas = np.logspace(0, 6, 10)
        folds = KFold(5)
        theirs = HimalayaRidgeCV(alphas=alphas, cv=folds, fit_intercept=True,
                                 solver_params={"warn": False}).fit(X, Y)
        ours = RidgeCV(alphas=alphas, cv=folds, device="cpu", dtype=torch.float64).fit(X, Y)
        their_alphas = np.asarray(theirs.best_alphas_.cpu())
        np.testing.assert_allclose(ours.alpha_, their_alphas, rtol=1e-5)
        their_pred = np.asarray(theirs.predict(X).cpu())
        np.testing.assert_allclose(ours.predict(X), their_pred, rtol=1e-4, atol=1e-6)
    finally:
        set_backend("numpy")


def test_single_target_and_single_alpha(rng):
    X, Y = _problem(rng, 50, 6, 1)
    model = RidgeCV(alphas=[3.0], device="cpu", dtype=torch.float64).fit(X, Y[:, 0])
    reference = Ridge(alpha=3.0).fit(X, Y[:, 0])
    assert model.coef_.shape == (6,) and isinstance(model.intercept_, float)
    np.testing.assert_allclose(model.coef_, reference.coef_, rtol=1e-8)
    np.testing.assert_allclose(model.predict(X), reference.predict(X), rtol=1e-8)
    assert model.cv_scores_.shape == (1, 1)


@pytest.mark.parametrize("targets_batch", [None, 4])
def test_one_alpha_for_all_targets_matches_scikit_learn_ridgecv(rng, targets_batch):
    """alpha_per_target=False = scikit-learn RidgeCV(cv=KFold) with the same scoring."""
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    X, Y = _problem(rng, 70, 9, 10)
    alphas = np.logspace(-2, 5, 8)
    ours = RidgeCV(alphas=alphas, cv=4, device="cpu", dtype=torch.float64,
                   alpha_per_target=False, targets_batch=targets_batch).fit(X, Y)
    reference = SkRidgeCV(alphas=alphas, cv=KFold(4), scoring="neg_mean_squared_error").fit(X, Y)
    np.testing.assert_array_equal(ours.alpha_, np.full(10, reference.alpha_))
    np.testing.assert_allclose(ours.coef_, reference.coef_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ours.predict(X), reference.predict(X), rtol=1e-7)
    per_target = RidgeCV(alphas=alphas, cv=4, device="cpu", dtype=torch.float64).fit(X, Y)
    assert len(set(per_target.alpha_)) > 1  # the problem does have target-specific alphas
    # one alpha per group of targets = scikit-learn's RidgeCV on each group
    groups = np.repeat([0, 1], 5)
    grouped = RidgeCV(alphas=alphas, cv=4, device="cpu", dtype=torch.float64,
                      alpha_per_target=groups, targets_batch=targets_batch).fit(X, Y)
    for g in (0, 1):
        ref = SkRidgeCV(alphas=alphas, cv=KFold(4), scoring="neg_mean_squared_error")
        ref.fit(X, Y[:, groups == g])
        np.testing.assert_array_equal(grouped.alpha_[groups == g], ref.alpha_)
        np.testing.assert_allclose(grouped.coef_[groups == g], ref.coef_, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match=r"one group label per target \(shape \(10,\)\)"):
        RidgeCV(alpha_per_target=[0, 1], device="cpu").fit(X, Y)


def test_target_batches_give_the_same_result(rng):
    X, Y = _problem(rng, 60, 8, 11)
    whole = RidgeCV(device="cpu", dtype=torch.float64).fit(X, Y)
    batched = RidgeCV(device="cpu", dtype=torch.float64, targets_batch=3).fit(X, Y)
    np.testing.assert_array_equal(whole.alpha_, batched.alpha_)
    np.testing.assert_allclose(whole.coef_, batched.coef_, rtol=1e-10)


def test_accepts_torch_inputs_and_is_sklearn_compatible(rng):
    from sklearn.base import clone

    X, Y = _problem(rng, 40, 5, 3)
    model = RidgeCV(device="cpu").fit(torch.as_tensor(X), torch.as_tensor(Y))
    assert model.predict(torch.as_tensor(X)).shape == (40, 3)
    np.testing.assert_array_equal(clone(model).get_params()["alphas"], model.alphas)
    assert "RidgeCV(device='cpu')" == repr(model)
    assert model.score(X, Y) > 0  # R² of the fitted data


@pytest.mark.parametrize("X,y,match", [
    (np.full((10, 3), np.nan), np.zeros(10), "X contains NaN or inf"),
    (np.zeros((10, 3)), np.full(10, np.inf), "y contains NaN or inf"),
    (np.zeros((10, 3)), np.zeros(9), "same number of samples"),
    (np.zeros((0, 3)), np.zeros(0), "X is empty"),
    (np.zeros((10, 3)), np.zeros((10, 0)), "y is empty"),
    (np.zeros(10), np.zeros(10), r"X must have shape \(n_samples, n_features\)"),
])
def test_bad_inputs_each_give_one_clear_error(X, y, match):
    with pytest.raises(ValueError, match=match):
        RidgeCV(device="cpu").fit(X, y)


def test_bad_alphas_and_predict_shape(rng):
    X, Y = _problem(rng, 20, 3, 2)
    with pytest.raises(ValueError, match="'alphas' must be a non-empty 1-D array of positive"):
        RidgeCV(alphas=[0.0, 1.0], device="cpu").fit(X, Y)
    model = RidgeCV(device="cpu").fit(X, Y)
    with pytest.raises(ValueError, match="X has 4 features but the model was fitted on 3"):
        model.predict(np.zeros((2, 4)))


def test_pearson_and_encoding_scores(rng):
    from scipy.stats import pearsonr

    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    np.testing.assert_allclose(pearson_r(a, b), [pearsonr(a[:, i], b[:, i])[0] for i in range(4)])
    X = rng.normal(size=(120, 10))
    Y = X @ rng.normal(size=(10, 5)) + rng.normal(size=(120, 5))
    out = encoding_scores(X[:90], Y[:90], X[90:], Y[90:], noise_ceiling=np.full(5, 64.0),
                          device="cpu")
    assert out["r"].shape == (5,) and (out["r"] > 0.8).all()
    np.testing.assert_allclose(out["r_nc"], out["r"] / 0.8)


def test_layerwise_scores_pick_the_layer_that_generated_the_data(rng):
    feats = {f"layer{i}": rng.normal(size=(100, 8)) for i in range(3)}
    Y = feats["layer1"] @ rng.normal(size=(8, 6)) + 0.5 * rng.normal(size=(100, 6))
    train, test = np.arange(80), np.arange(80, 100)
    out = layerwise_scores(feats, Y[train], Y[test], train, test, device="cpu")
    assert out["r"].shape == (3, 6) and out["layers"] == list(feats)
    assert (out["r"].argmax(0) == 1).all()


def test_layerwise_predictions_equal_scikit_learn(rng):
    """The kept test predictions are those of scikit-learn's RidgeCV with the same folds."""
    from sklearn.linear_model import RidgeCV as SkRidgeCV
    from sklearn.model_selection import KFold

    feats = {f"layer{i}": rng.normal(size=(100, 8)) for i in range(2)}
    Y = feats["layer1"] @ rng.normal(size=(8, 3)) + 0.5 * rng.normal(size=(100, 3))
    train, test = np.arange(80), np.arange(80, 100)
    alphas = np.logspace(-2, 4, 7)
    out = layerwise_scores(feats, Y[train], Y[test], train, test, alphas=alphas, cv=5,
                           device="cpu", dtype=torch.float64, return_prediction=True)
    assert out["prediction"].shape == (2, 20, 3) and out["prediction"].dtype == np.float32
    for k, layer in enumerate(feats):
        X = feats[layer]
        for j in range(3):  # one alpha per target: one scikit-learn model per target
            sk = SkRidgeCV(alphas=alphas, cv=KFold(5), scoring="neg_mean_squared_error")
            sk.fit(X[train], Y[train, j])
            np.testing.assert_allclose(out["prediction"][k, :, j], sk.predict(X[test]),
                                       rtol=1e-4, atol=1e-4)
    assert "prediction" not in layerwise_scores(feats, Y[train], Y[test], train, test,
                                                device="cpu")
