"""MNE's SlidingEstimator tests, run on gradbrain's SlidingRidgeCV.

Ported from ``mne/decoding/tests/test_search_light.py`` (mne-tools/mne-python, main as
of 2026-08), adapting only the API calls and keeping the assertions. MNE's base
estimator is any scikit-learn model; ours is always a standardised ridge, so
``SlidingEstimator(make_pipeline(StandardScaler(), RidgeCV(alphas)))`` is the
reference wherever MNE compared with itself (n_jobs=1 vs 2, manual scoring).

Not applicable, with the reason:

* classifier parts (LogisticRegression, ``predict_proba``, ``decision_function``,
  ``roc_auc`` scoring, BaggingClassifier, OneVsRest) — a regression decoder
  (:func:`gradbrain.meg.decode_category` decodes categories on top of it);
* ``sample_weight``, ``n_jobs``, ``verbose`` (test_verbose_arg) — one batched fit, no
  weights, no workers or progress to report;
* the ``repr`` strings ("<SlidingEstimator(… fitted with 10 estimators>") — MNE's own;
* ``GeneralizingEstimator`` (test_generalization_light, test_gl_score_branches) — no
  temporal generalisation in the book;
* test_sklearn_compliance (``parametrize_with_checks`` with ``allow_2d=True``) — the
  estimator takes (n_trials, n_channels, n_times) MEG, not the 2-D data of the checks.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import is_classifier
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline

from gradbrain.meg import SlidingRidgeCV


def make_data():
    """Make data (MNE's make_data, unchanged)."""
    n_epochs, n_chan, n_time = 50, 32, 10
    rng = np.random.default_rng(0)
    X = rng.random((n_epochs, n_chan, n_time))
    y = np.arange(n_epochs) % 2
    for ii in range(n_time):
        coef = rng.standard_normal(n_chan)
        X[y == 0, :, ii] += coef
        X[y == 1, :, ii] -= coef
    return X, y


def _mne_reference(alphas):
    from mne.decoding import SlidingEstimator
    from sklearn.linear_model import RidgeCV as SkRidgeCV
    from sklearn.preprocessing import StandardScaler

    return SlidingEstimator(make_pipeline(StandardScaler(), SkRidgeCV(alphas=alphas)),
                            verbose=False)


def test_search_light_basic():
    """Test SlidingRidgeCV (MNE's test_search_light_basic, regression parts)."""
    X, y = make_data()
    n_epochs, _, n_time = X.shape
    # init
    sl = SlidingRidgeCV(alphas="foo")
    with pytest.raises((ValueError, TypeError), match="must be"):
        sl.fit(X, y)
    sl = SlidingRidgeCV(device="cpu")
    assert not is_classifier(sl)
    # fit
    sl.fit(X, y)
    pytest.raises(ValueError, sl.fit, X[1:], y)
    pytest.raises(ValueError, sl.fit, X[:, :, 0], y)

    # transforms
    pytest.raises(ValueError, sl.predict, X[:, :, :2])
    y_trans = sl.transform(X)
    assert X.dtype == float
    assert y_trans.dtype == float
    y_pred = sl.predict(X)
    assert y_pred.dtype == np.dtype(float)
    assert_array_equal(y_pred.shape, [n_epochs, n_time])

    # score
    score = sl.score(X, y)
    assert_array_equal(score.shape, [n_time])
    assert np.sum(np.abs(score)) != 0
    assert score.dtype == np.dtype(float)

    # Scoring method
    for scoring in ["foo", 999]:
        sl = SlidingRidgeCV(scoring=scoring, device="cpu")
        sl.fit(X, y)
        pytest.raises((ValueError, TypeError), sl.score, X, y)

    # Check that scoring was applied adequately (MNE: against each estimator's scorer;
    # here: against MNE's SlidingEstimator of the same pipeline)
    alphas = np.logspace(-2, 4, 7)
    rng = np.random.default_rng(0)
    X_new = rng.standard_normal(X.shape)
    ours = SlidingRidgeCV(alphas=alphas, device="cpu").fit(X, y)
    reference = _mne_reference(alphas).fit(X, y)
    assert_allclose(ours.score(X_new, y), reference.score(X_new, y), rtol=1e-8)
    assert_allclose(ours.predict(X_new), reference.predict(X_new), rtol=1e-8, atol=1e-10)

    # pipeline
    pipe = make_pipeline(SlidingRidgeCV(device="cpu"), LinearRegression())
    pipe.fit(X, y)
    pipe.predict(X)

    # n-dimensional feature space
    X = rng.random((10, 3, 4, 2))
    y = np.arange(10) % 2
    pipe = SlidingRidgeCV(device="cpu")
    y_pred = pipe.fit(X, y).predict(X)
    assert_array_equal(pipe.features_shape_, [3, 4])
    assert_array_equal(y_pred.shape, [10, 2])


def test_cross_val_predict():
    """Test cross_val_predict (MNE's test_cross_val_predict, regression part)."""
    rng = np.random.default_rng(42)
    X = rng.standard_normal((10, 1, 3))
    y = rng.integers(0, 2, 10)
    estimator = SlidingRidgeCV(device="cpu")
    prediction = cross_val_predict(estimator, X, y, cv=2)
    assert prediction.shape == (10, 3)
