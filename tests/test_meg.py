"""Time-resolved MEG encoding and peak latencies."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from gradbrain import meg


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
