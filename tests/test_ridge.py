"""Ridge kernel against independent references: scikit-learn brute force and himalaya."""

import numpy as np
from scipy import stats
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gradbrain.ridge import (DEFAULT_ALPHAS, RidgeCV, encoding_scores, layerwise_scores,
                             pearson_r, standardize)


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
    ours = RidgeCV(alphas=alphas, device="cpu", dtype=torch.float32).fit(X, Y)
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
    assert ours.alpha_ == reference.alpha_ and isinstance(ours.alpha_, float)
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
    (np.full((10, 3), np.nan), np.zeros(10), "Input X contains NaN"),
    (np.zeros((10, 3)), np.full(10, np.inf), "Input y contains infinity"),
    (np.zeros((10, 3)), np.zeros(9), "inconsistent numbers of samples"),
    (np.zeros((0, 3)), np.zeros(0), "0 sample"),
    (np.zeros((10, 3)), np.zeros((10, 0)), r"0 feature\(s\) \(shape=\(10, 0\)\)"),
    (np.zeros(10), np.zeros(10), "Expected a 2-dimensional container|Expected 2D array"),
])
def test_bad_inputs_each_give_one_clear_error(X, y, match):
    with pytest.raises(ValueError, match=match):
        RidgeCV(device="cpu").fit(X, y)


def test_bad_alphas_and_predict_shape(rng):
    X, Y = _problem(rng, 20, 3, 2)
    with pytest.raises(ValueError, match=r"alphas\[0\] == -1.0, must be >= 0"):
        RidgeCV(alphas=[-1.0, 1.0], device="cpu").fit(X, Y)
    with pytest.raises(TypeError, match=r"alphas\[1\] must be an instance of float, not str"):
        RidgeCV(alphas=[1.0, "10"], device="cpu").fit(X, Y)
    model = RidgeCV(device="cpu").fit(X, Y)
    with pytest.raises(ValueError, match="X has 4 features, but RidgeCV is expecting 3"):
        model.predict(np.zeros((2, 4)))


# --------------------------------------------------------------------------- every splitter


def _per_fold_reference(X, Y, alphas, folds, fit_intercept=True):
    """A plain scikit-learn loop: Ridge per fold and alpha, MSE averaged, argmax, refit."""
    scores = np.zeros((len(alphas), Y.shape[1]))
    for i, alpha in enumerate(alphas):
        for train, test in folds:
            fit = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="svd")
            fit.fit(X[train], Y[train])
            scores[i] -= ((fit.predict(X[test]) - Y[test]) ** 2).mean(0)
    scores /= len(folds)
    best = np.asarray(alphas)[scores.argmax(0)]
    coef = np.stack([Ridge(alpha=a, fit_intercept=fit_intercept, solver="svd")
                     .fit(X, Y[:, t]).coef_ for t, a in enumerate(best)])
    return scores, best, coef


def _splitters(n):
    """Each kind of splitter a neuroscientist uses, with the groups it needs."""
    from sklearn.model_selection import (GroupKFold, LeaveOneGroupOut, LeaveOneOut,
                                         ShuffleSplit, TimeSeriesSplit)

    groups = np.repeat(np.arange(n // 6), 6)[:n]  # e.g. sessions of 6 images
    gapped = [(np.arange(0, 20), np.arange(25, 35)), (np.arange(15, 40), np.arange(45, n)),
              (np.r_[0:10, 30:n], np.arange(12, 24))]
    return {
        "KFold": (KFold(5), None),
        "shuffled KFold": (KFold(4, shuffle=True, random_state=1), None),
        "LeaveOneOut": (LeaveOneOut(), None),
        "ShuffleSplit": (ShuffleSplit(5, train_size=0.5, test_size=0.2, random_state=0), None),
        "TimeSeriesSplit": (TimeSeriesSplit(4), None),
        "GroupKFold": (GroupKFold(3), groups),
        "LeaveOneGroupOut": (LeaveOneGroupOut(), groups),
        "list with gaps": (gapped, None),
        "boolean masks": ([(np.arange(n) % 3 != k, np.arange(n) % 3 == k) for k in range(3)],
                          None),
    }


@pytest.mark.parametrize("name", list(_splitters(60)))
@pytest.mark.parametrize("n,p", [(60, 5), (60, 45)])  # primal, and dual where a fold has n_tr < p
def test_every_splitter_equals_a_per_fold_scikit_learn_loop(rng, name, n, p):
    """Issue #13: ShuffleSplit etc. once gave alphas 15x off; now exact to 1e-10 in float64."""
    X, Y = _problem(rng, n, p, 4)
    alphas = np.logspace(-2, 3, 6)
    cv, groups = _splitters(n)[name]
    folds = [(np.flatnonzero(tr) if np.asarray(tr).dtype == bool else tr,
              np.flatnonzero(te) if np.asarray(te).dtype == bool else te)
             for tr, te in (cv.split(X, Y, groups) if hasattr(cv, "split") else cv)]
    model = RidgeCV(alphas=alphas, cv=cv, device="cpu", dtype=torch.float64)
    model.fit(X, Y, groups=groups)
    scores, best, coef = _per_fold_reference(X, Y, alphas, folds)
    np.testing.assert_allclose(model.cv_scores_, scores, rtol=1e-10)
    np.testing.assert_array_equal(model.alpha_, best)
    np.testing.assert_allclose(model.coef_, coef, rtol=1e-8, atol=1e-10)


def test_the_shufflesplit_example_of_the_issue(rng):
    """The reported case: ShuffleSplit(5, .5/.2) on 60×5 data picks scikit-learn's alpha."""
    from sklearn.model_selection import GridSearchCV, ShuffleSplit

    X = rng.normal(size=(60, 5))
    y = X @ rng.normal(size=5) + 0.3 * rng.normal(size=60)
    cv = ShuffleSplit(5, train_size=0.5, test_size=0.2, random_state=0)
    alphas = np.logspace(-2, 3, 6)
    ours = RidgeCV(alphas=alphas, cv=cv, dtype=torch.float64, device="cpu").fit(X, y)
    search = GridSearchCV(Ridge(), {"alpha": alphas}, cv=cv,
                          scoring="neg_mean_squared_error").fit(X, y)
    assert ours.alpha_ == search.best_params_["alpha"]
    np.testing.assert_allclose(ours.cv_scores_[:, 0], search.cv_results_["mean_test_score"],
                               rtol=1e-10)


def test_sample_weight_gets_one_clear_error_with_what_to_do_instead(rng):
    """scikit-learn's RidgeCV takes fit(X, y, sample_weight=); ours names the argument
    and the alternatives (repeat rows, or scikit-learn's), for both estimators, before
    any work; a misspelt fit argument is named too."""
    from gradbrain.meg import SlidingRidgeCV

    X, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    for estimator, data in ((RidgeCV(device="cpu"), X),
                            (SlidingRidgeCV(device="cpu"), rng.normal(size=(20, 2, 4)))):
        with pytest.raises(ValueError, match="does not take 'sample_weight'.*repeat rows"):
            estimator.fit(data, y, sample_weight=np.ones(20))
        with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['grups'\]"):
            estimator.fit(data, y, grups=np.zeros(20))
        assert not hasattr(estimator, "coef_")


def test_groups_reach_the_splitter(rng):
    from sklearn.model_selection import GroupKFold

    X, Y = _problem(rng, 40, 4, 2)
    with pytest.raises(ValueError, match="'groups' parameter should not be None"):
        RidgeCV(cv=GroupKFold(4), device="cpu").fit(X, Y)
    with pytest.raises(ValueError, match=r"'groups' must hold one label per sample, shape \(40,\)"):
        RidgeCV(cv=GroupKFold(4), device="cpu").fit(X, Y, groups=np.arange(39))


@pytest.mark.parametrize("cv,match", [
    ([(np.arange(10), np.arange(55, 61))], r"indices run from 55 to 60 but there are 60 samples"),
    ([(np.arange(10), np.array([], int))], "fold 0 has no test samples"),
    ([(np.ones(59, bool), np.ones(60, bool))], r"boolean mask needs one entry per sample, \(60,\)"),
    ([(np.arange(10) - 1, np.arange(20, 30))], r"indices run from -1 to 8"),
    (1, "'cv' must be an integer >= 2"),
    ("kfold", "'cv' must be an integer >= 2, a scikit-learn splitter"),
])
def test_bad_folds_are_refused_before_any_work(rng, cv, match):
    X, Y = _problem(rng, 60, 3, 2)
    with pytest.raises(ValueError, match=match):
        RidgeCV(cv=cv, device="cpu").fit(X, Y)


# --------------------------------------------------------------------------- scale and dtype


@pytest.mark.parametrize("y_scale", [1e-25, 1e-13, 1e20])
def test_alphas_do_not_depend_on_the_scale_of_y(rng, y_scale):
    """float32 once collapsed every alpha to the first for y near 1e-25 (issue #13)."""
    X, Y = _problem(rng, 80, 6, 12)
    alphas = np.logspace(-1, 5, 7)
    exact = RidgeCV(alphas=alphas, device="cpu", dtype=torch.float64).fit(X, Y)
    assert len(set(exact.alpha_)) > 1
    small = RidgeCV(alphas=alphas, device="cpu", dtype=torch.float32).fit(
        X.astype(np.float32), (Y * y_scale).astype(np.float32))
    np.testing.assert_array_equal(small.alpha_, exact.alpha_)
    np.testing.assert_allclose(small.coef_ / y_scale, exact.coef_, rtol=1e-3,
                               atol=1e-4 * np.abs(exact.coef_).max())
    np.testing.assert_allclose(small.cv_scores_ / y_scale**2, exact.cv_scores_, rtol=1e-3)


def test_float64_values_beyond_float32_range(rng):
    """y of 1e39 fits in float32 (exact rescaling); coefficients that overflow are refused."""
    X, Y = _problem(rng, 50, 4, 3)
    exact = RidgeCV(device="cpu", dtype=torch.float64).fit(X, Y)
    big = RidgeCV(device="cpu", dtype=torch.float64).fit(X, Y * 1e39)
    np.testing.assert_array_equal(big.alpha_, exact.alpha_)
    np.testing.assert_allclose(big.coef_, exact.coef_ * 1e39, rtol=1e-9)
    tiny_x = RidgeCV(device="cpu", dtype=torch.float32).fit(X * 2.0**-90, Y)
    scaled = RidgeCV(alphas=np.asarray(tiny_x.alphas) * 2.0**180, device="cpu",
                     dtype=torch.float32).fit(X, Y)
    np.testing.assert_array_equal(tiny_x.alpha_ * 2.0**180, scaled.alpha_)
    with pytest.raises(ValueError, match="overflow float32.*dtype=torch.float64"):
        RidgeCV(device="cpu", dtype=torch.float32).fit(X, Y * 1e39)


def test_dtype_follows_the_input_unless_asked(rng):
    """scikit-learn's rule: float64 inside, results in X's precision; float32 on request."""
    X, Y = _problem(rng, 40, 5, 2)
    as_64 = RidgeCV(device="cpu").fit(X, Y)
    assert as_64.coef_.dtype == np.float64 and as_64.predict(X).dtype == np.float64
    as_32 = RidgeCV(device="cpu").fit(X.astype(np.float32), Y.astype(np.float32))
    assert as_32.coef_.dtype == np.float32
    np.testing.assert_allclose(as_32.coef_, as_64.coef_, rtol=1e-4, atol=1e-6)
    asked = RidgeCV(device="cpu", dtype=torch.float32).fit(X, Y)
    assert asked.coef_.dtype == np.float32
    with pytest.raises(ValueError, match="'dtype' must be torch.float32, torch.float64 or None"):
        RidgeCV(device="cpu", dtype=torch.float16).fit(X, Y)


def test_shapes_follow_scikit_learn(rng):
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    X, Y = _problem(rng, 40, 5, 1)
    for y in (Y[:, 0], Y):  # (n,) and (n, 1)
        ours = RidgeCV(alphas=[1.0, 10.0], cv=KFold(4), device="cpu").fit(X, y)
        theirs = SkRidgeCV(alphas=[1.0, 10.0], cv=KFold(4),
                           scoring="neg_mean_squared_error").fit(X, y)
        assert ours.coef_.shape == theirs.coef_.shape
        assert np.shape(ours.intercept_) == np.shape(theirs.intercept_)
        assert ours.predict(X).shape == theirs.predict(X).shape
        assert np.ndim(ours.alpha_) == np.ndim(ours.best_score_) == (0 if y.ndim == 1 else 1)
        np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-8)
    assert isinstance(ours.intercept_, np.ndarray)
    single = RidgeCV(device="cpu").fit(X, Y[:, 0])
    assert isinstance(single.intercept_, np.floating) and isinstance(single.alpha_, float)


def test_r2_scoring_equals_scikit_learn_ridgecv(rng):
    """scoring="r2" is scikit-learn's RidgeCV(cv=...) default; MSE is himalaya's."""
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    X, Y = _problem(rng, 45, 6, 5)
    alphas = np.logspace(-2, 4, 13)
    for scoring in ("r2", "neg_mean_squared_error"):
        ours = RidgeCV(alphas=alphas, cv=KFold(5), scoring=scoring, device="cpu",
                       dtype=torch.float64, alpha_per_target=False).fit(X, Y)
        theirs = SkRidgeCV(alphas=alphas, cv=KFold(5), scoring=scoring).fit(X, Y)
        assert ours.alpha_ == theirs.alpha_
        assert ours.best_score_ == pytest.approx(theirs.best_score_, rel=1e-9)
        np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-8)
    with pytest.raises(ValueError, match="'scoring' must be one of"):
        RidgeCV(scoring="accuracy", device="cpu").fit(X, Y)


def test_pandas_inputs_feature_names_and_no_warning(rng):
    import warnings

    import pandas as pd

    X, Y = _problem(rng, 30, 3, 2)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not writable, feature names…: nothing may warn
        model = RidgeCV(device="cpu").fit(frame, pd.DataFrame(Y))
        model.predict(frame)
    assert list(model.feature_names_in_) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="feature names"):
        model.predict(frame.rename(columns={"a": "z"}))
    frame["b"] = pd.array([1, None] + [2] * 28, dtype="Int64")
    with pytest.raises(ValueError, match=r"pandas missing values \(pd.NA\) in column\(s\) \['b'\]"):
        RidgeCV(device="cpu").fit(frame, Y)


@pytest.mark.parametrize("bad,error,match", [
    ("sparse", TypeError, "Sparse data was passed"),
    ("object", ValueError, "could not convert string to float"),
    ("complex", ValueError, "Complex data not supported"),
])
def test_inputs_that_are_not_dense_numbers(rng, bad, error, match):
    import scipy.sparse

    X, Y = _problem(rng, 20, 3, 2)
    X = {"sparse": scipy.sparse.csr_matrix(X), "object": np.full((20, 3), "a", dtype=object),
         "complex": X + 1j}[bad]
    with pytest.raises(error, match=match):
        RidgeCV(device="cpu").fit(X, Y)


def test_tensors_that_require_grad_and_devices(rng):
    X, Y = _problem(rng, 30, 4, 2)
    Xt = torch.as_tensor(X, dtype=torch.float64).requires_grad_()
    ours = RidgeCV(device="cpu").fit(Xt, torch.as_tensor(Y))
    reference = RidgeCV(device="cpu").fit(X, Y)
    np.testing.assert_allclose(ours.coef_, reference.coef_, rtol=1e-12)
    assert ours.predict(Xt).shape == (30, 2)
    for device, match in (("gpu", "is not a device torch knows"),
                          ("mps", "must be the CPU or a CUDA GPU"), (3, "must be a string")):
        with pytest.raises((ValueError, TypeError), match=match):
            RidgeCV(device=device).fit(X, Y)


def test_alpha_zero_is_least_squares_minimum_norm(rng):
    from sklearn.linear_model import LinearRegression

    for n, p in ((40, 10), (15, 30)):
        X, Y = _problem(rng, n, p, 2)
        ours = RidgeCV(alphas=[0.0], device="cpu", dtype=torch.float64).fit(X, Y)
        reference = LinearRegression().fit(X, Y)
        np.testing.assert_allclose(ours.coef_, reference.coef_, rtol=1e-6, atol=1e-8)


def test_pearson_and_encoding_scores(rng):
    from scipy.stats import pearsonr

    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    np.testing.assert_allclose(pearson_r(a, b), [pearsonr(a[:, i], b[:, i])[0] for i in range(4)])
    a[3, 1], b[:, 2] = np.nan, 1.0
    a[:, 3] = 2.0
    r = pearson_r(a, b)
    assert np.isnan(r[1]) and r[2] == 0.0 and np.isnan(r[3])  # no data / no prediction / no variance
    assert r[0] == pytest.approx(pearsonr(a[:, 0], b[:, 0])[0])
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
            sk = make_pipeline(StandardScaler(), SkRidgeCV(
                alphas=alphas, cv=KFold(5), scoring="neg_mean_squared_error"))
            sk.fit(X[train], Y[train, j])
            np.testing.assert_allclose(out["prediction"][k, :, j], sk.predict(X[test]),
                                       rtol=1e-4, atol=1e-4)
    assert "prediction" not in layerwise_scores(feats, Y[train], Y[test], train, test,
                                                device="cpu")
    raw = layerwise_scores(feats, Y[train], Y[test], train, test, alphas=alphas, cv=5,
                           device="cpu", dtype=torch.float64, return_prediction=True,
                           standardize_features=False)
    sk = SkRidgeCV(alphas=alphas, cv=KFold(5)).fit(feats["layer0"][train], Y[train, 0])
    np.testing.assert_allclose(raw["prediction"][0, :, 0], sk.predict(feats["layer0"][test]),
                               rtol=1e-4, atol=1e-4)


def test_layer_scores_do_not_depend_on_the_features_units(rng):
    """Gradients are ~1e-4 the size of activations: with every layer standardised on the
    training images, scaling a layer's features changes neither alphas nor scores (without
    it, the smallest alpha of the grid shrank small features to a constant)."""
    feats = {"layer": rng.normal(size=(100, 8))}
    Y = feats["layer"] @ rng.normal(size=(8, 4)) + rng.normal(size=(100, 4))
    train, test = np.arange(80), np.arange(80, 100)
    out = layerwise_scores(feats, Y[train], Y[test], train, test, device="cpu",
                           dtype=torch.float64)
    small = layerwise_scores({"layer": 1e-5 * feats["layer"]}, Y[train], Y[test], train, test,
                             device="cpu", dtype=torch.float64)
    np.testing.assert_allclose(small["r"], out["r"], rtol=1e-6)
    np.testing.assert_array_equal(small["alpha"], out["alpha"])
    raw = layerwise_scores({"layer": 1e-5 * feats["layer"]}, Y[train], Y[test], train, test,
                           device="cpu", dtype=torch.float64, standardize_features=False)
    assert (raw["alpha"] == DEFAULT_ALPHAS[0]).all() and (raw["cv_r2"] < 0.01).all()


def test_standardize_is_scikit_learns_standard_scaler_fitted_on_training_rows(rng):
    train, test = rng.normal(3, 2, size=(30, 4)), rng.normal(size=(5, 4))
    train[:, 2] = 7.0                                       # a constant column → 0
    scaler = StandardScaler().fit(train)
    got_train, got_test = standardize(train, test)
    np.testing.assert_allclose(got_train, scaler.transform(train), atol=1e-12)
    np.testing.assert_allclose(got_test[:, [0, 1, 3]], scaler.transform(test)[:, [0, 1, 3]])
    assert (got_test[:, 2] == 0).all() and (got_train[:, 2] == 0).all()
    assert standardize(train.astype(np.float32), test)[0].dtype == np.float32
    with pytest.raises(ValueError, match="same columns"):
        standardize(train, test[:, :3])


def test_cv_r2_is_scikit_learns_out_of_fold_score_and_ignores_the_test_set(rng):
    """``cv_r2``: the held-out MSE of scikit-learn's Ridge on the same folds at the chosen
    alpha, over the training variance; replacing the test responses leaves it unchanged."""
    from sklearn.metrics import mean_squared_error

    feats = {f"layer{i}": rng.normal(size=(100, 8)) for i in range(2)}
    Y = feats["layer1"] @ rng.normal(size=(8, 3)) + rng.normal(size=(100, 3))
    train, test = np.arange(80), np.arange(80, 100)
    alphas = np.logspace(-2, 4, 7)
    out = layerwise_scores(feats, Y[train], Y[test], train, test, alphas=alphas, cv=KFold(5),
                           device="cpu", dtype=torch.float64)
    assert out["cv_r2"].shape == (2, 3)
    for k, layer in enumerate(feats):
        X = StandardScaler().fit_transform(feats[layer][train])   # on all training rows
        for j in range(3):
            mse = np.mean([mean_squared_error(
                Y[train][te, j], Ridge(alpha=out["alpha"][k, j]).fit(X[tr], Y[train][tr, j])
                .predict(X[te])) for tr, te in KFold(5).split(X)])
            np.testing.assert_allclose(out["cv_r2"][k, j], 1 - mse / Y[train, j].var(),
                                       rtol=1e-6)
    assert (out["cv_r2"][1] > out["cv_r2"][0]).all()   # the generating layer wins
    noise = Y.copy()
    noise[test] = rng.normal(size=(20, 3))
    other = layerwise_scores(feats, noise[train], noise[test], train, test, alphas=alphas,
                             cv=KFold(5), device="cpu", dtype=torch.float64)
    np.testing.assert_array_equal(other["cv_r2"], out["cv_r2"])
    assert not np.allclose(other["r"], out["r"])


def test_targets_without_data_score_nan_not_zero(rng):
    """NSD has vertices that are NaN on every trial: their r is NaN (issue #13), others intact."""
    feats = {f"layer{i}": rng.normal(size=(100, 8)) for i in range(2)}
    Y = feats["layer1"] @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(100, 5))
    train, test = np.arange(80), np.arange(80, 100)
    clean = layerwise_scores(feats, Y[train], Y[test], train, test, device="cpu",
                             noise_ceiling=np.full(5, 50.0), return_prediction=True)
    Y_bad = Y.copy()
    Y_bad[:, 1] = np.nan          # a vertex without data
    Y_bad[90, 3] = np.inf         # one corrupt test value
    with pytest.warns(RuntimeWarning, match="2 of 5 targets hold NaN or inf"):
        out = layerwise_scores(feats, Y_bad[train], Y_bad[test], train, test, device="cpu",
                               noise_ceiling=np.full(5, 50.0), return_prediction=True)
    for key in ("r", "r_nc", "alpha", "cv_r2"):
        assert np.isnan(out[key][:, [1, 3]]).all()
        np.testing.assert_allclose(out[key][:, [0, 2, 4]], clean[key][:, [0, 2, 4]], rtol=1e-5)
    assert np.isnan(out["prediction"][:, :, 1]).all()
    with pytest.warns(RuntimeWarning):
        single = encoding_scores(feats["layer0"][train], Y_bad[train], feats["layer0"][test],
                                 Y_bad[test], device="cpu")
    assert np.isnan(single["r"][[1, 3]]).all() and np.isfinite(single["r"][[0, 2, 4]]).all()
    with pytest.raises(ValueError, match="Every target holds NaN"):
        encoding_scores(feats["layer0"][train], np.full((80, 2), np.nan),
                        feats["layer0"][test], np.zeros((20, 2)), device="cpu")


# --------------------------------------------------------------------------- variance partition


def _partition_data(rng, n_train=80, n_test=40, p_a=6, p_b=5, n_targets=4, mix=0.0):
    a = rng.normal(size=(n_train + n_test, p_a))
    b = rng.normal(size=(n_train + n_test, p_b)) + mix * a[:, :p_b]
    return a, b


def test_variance_partition_equals_scikit_learn_ridge_per_target(rng):
    """R² of A, B and the joint model = scikit-learn Ridge with the alpha GridSearchCV
    picks on the same folds (per target, negative MSE), features scaled as documented;
    the joint model is, per target, the best cross-validated of A, B and A + √r B, and
    its cross-validated R² is 1 − GridSearchCV's best MSE / the training variance. With
    ``score="signed_r2"`` the same models are scored by scipy's sign(r)·r²."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GridSearchCV, KFold

    from gradbrain.ridge import DEFAULT_ALPHAS, variance_partition

    a, b = _partition_data(rng, mix=0.5)
    y = a @ rng.normal(size=(6, 4)) + b @ rng.normal(size=(5, 4)) \
        + rng.normal(scale=3.0, size=(120, 4))
    y[:, 3] = b @ rng.normal(size=5) + rng.normal(scale=1.0, size=120)   # B's alone
    tr, te = slice(0, 80), slice(80, 120)
    out = variance_partition(a[tr], b[tr], y[tr], a[te], b[te], y[te], device="cpu")
    signed = variance_partition(a[tr], b[tr], y[tr], a[te], b[te], y[te], score="signed_r2",
                                device="cpu")

    def scaled(x):
        mean, sd = x[tr].mean(0), x[tr].std(0)
        return (x - mean) / sd / np.sqrt(x.shape[1])

    def fitted(x, t):
        search = GridSearchCV(Ridge(), {"alpha": list(DEFAULT_ALPHAS)}, cv=KFold(5),
                              scoring="neg_mean_squared_error").fit(x[tr], y[tr, t])
        prediction = search.predict(x[te])
        r = stats.pearsonr(y[te, t], prediction).statistic
        return search.best_score_, r2_score(y[te, t], prediction), np.sign(r) * r ** 2

    models = {"r2_a": scaled(a), "r2_b": scaled(b),
              **{r: np.hstack([scaled(a), np.sqrt(r) * scaled(b)]) for r in (0.1, 1.0, 10.0)}}
    reference = {name: np.array([fitted(x, t) for t in range(4)]) for name, x in models.items()}
    stacked = np.stack(list(reference.values()))     # (models, targets, [cv, r2, signed r2])
    kept = stacked[:, :, 0].argmax(0)
    for result, column in ((out, 1), (signed, 2)):
        for name in ("r2_a", "r2_b"):
            np.testing.assert_allclose(result[name], reference[name][:, column], atol=1e-4)
        joint = stacked[kept, np.arange(4), column]
        np.testing.assert_allclose(result["r2_joint"], joint, atol=1e-4)
        np.testing.assert_allclose(result["unique_b"], joint - reference["r2_a"][:, column],
                                   atol=1e-4)
        np.testing.assert_allclose(result["shared"], reference["r2_a"][:, column]
                                   + reference["r2_b"][:, column] - joint, atol=1e-4)
        np.testing.assert_array_equal(result["ratio"], np.array([0, np.inf, 0.1, 1, 10])[kept])
        np.testing.assert_allclose(result["cv_r2_joint"],
                                   1 + stacked[kept, np.arange(4), 0] / y[tr].var(0), atol=1e-4)
    with pytest.raises(ValueError, match="'band_ratios' must be positive"):
        variance_partition(a[tr], b[tr], y[tr], a[te], b[te], y[te], band_ratios=())
    with pytest.raises(ValueError, match="'score' must be one of"):
        variance_partition(a[tr], b[tr], y[tr], a[te], b[te], y[te], score="r")


def test_variance_partition_finds_planted_unique_and_shared_parts(rng):
    """A signal carried by B alone is unique to B; a B that copies A shares it; the
    joint-minus-single partition agrees with himalaya's banded ridge (one penalty per
    band) to within a few hundredths where the bands need similar penalties."""
    from himalaya.backend import set_backend
    from himalaya.ridge import BandedRidgeCV

    from gradbrain.ridge import variance_partition

    n = 400

    def weights(scale=2.0):   # every target gets signal variance scale²
        w = rng.normal(size=(8, 6))
        return scale * w / np.linalg.norm(w, axis=0)

    a, b = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    y = b @ weights() + rng.normal(scale=2.0, size=(n, 6))
    tr, te = slice(0, 300), slice(300, n)
    out = variance_partition(a[tr], b[tr], y[tr], a[te], b[te], y[te], device="cpu")
    # 100 test images: R² differences scatter by a few hundredths
    assert (out["unique_b"] > 0.3).all() and (np.abs(out["unique_a"]) < 0.05).all()
    assert (np.abs(out["shared"]) < 0.05).all()
    echo = a + rng.normal(scale=0.05, size=a.shape)    # B copies A; the signal is A's
    y = a @ weights() + rng.normal(scale=2.0, size=(n, 6))
    out = variance_partition(a[tr], echo[tr], y[tr], a[te], echo[te], y[te], device="cpu")
    assert (out["shared"] > 0.8 * out["r2_a"]).all() and (out["unique_b"] < 0.05).all()
    # against banded ridge on the first data set
    set_backend("numpy", on_error="raise")
    y = b @ weights() + a @ weights(1.0) + rng.normal(scale=2.0, size=(n, 6))
    ours = variance_partition(a[tr], b[tr], y[tr], a[te], b[te], y[te], device="cpu")

    def scaled(x):
        return (x - x[tr].mean(0)) / x[tr].std(0) / np.sqrt(x.shape[1])

    joint = np.hstack([scaled(a), scaled(b)])
    banded = BandedRidgeCV(groups=[0] * 8 + [1] * 8, solver_params=dict(
        n_iter=30, alphas=np.logspace(0, 8, 10), progress_bar=False), random_state=0)
    banded.fit(joint[tr], y[tr] - y[tr].mean(0))
    prediction = banded.predict(joint[te]) + y[tr].mean(0)
    residual = ((y[te] - prediction) ** 2).sum(0)
    r2_banded = 1 - residual / ((y[te] - y[te].mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(ours["r2_joint"], r2_banded, atol=0.05)
    with pytest.raises(ValueError, match="'b_train' and 'b_test' must be"):
        variance_partition(a[tr], b[te], y[tr], a[te], b[te], y[te])
