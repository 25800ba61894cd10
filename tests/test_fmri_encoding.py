"""fMRI encoding on the simulated study recovers the planted layer map."""

import copy

import numpy as np
import pytest

from gradbrain import hierarchy
from gradbrain.data.simulated import make_study
from gradbrain.analysis.encoding import fmri_encoding, fmri_partition

N_IMAGES = 120


@pytest.fixture(scope="module")
def encoded(cnn):
    from gradbrain import features as gf
    from gradbrain.data import load_embedded

    feats = gf.extract(cnn, load_embedded(N_IMAGES), losses=("ce",), pool="mean")
    study = make_study(0, n_images=N_IMAGES, gradient_truth="none", features=feats,
                       meg=False, noise=0.5)
    return study, feats, fmri_encoding(study, feats, device="cpu")


def test_planted_layer_map_is_recovered(encoded):
    study, feats, results = encoded
    best = hierarchy.best_layer(results["activation"]["r_nc"], feats.depth)
    reliable = hierarchy.reliable_targets(study.noise_ceiling(), best["peak"])
    assert reliable.mean() > 0.5
    rec = hierarchy.recovery(best["depth"][reliable], study.truth["preferred_depth"][reliable])
    assert rec["r"] > 0.6, rec


def test_scores_have_documented_shapes_and_units(encoded):
    study, feats, results = encoded
    assert set(results) == {"activation", "gradient (ce)"}
    for out in results.values():
        assert out["r"].shape == (len(feats.layers), study.n_vertices)
        assert np.all(np.abs(out["r"]) <= 1)
        np.testing.assert_allclose(out["r_nc"], out["r"] / np.sqrt(study.noise_ceiling() / 100))


def test_features_of_other_images_are_refused(encoded, cnn):
    from gradbrain import features as gf
    from gradbrain.data import load_embedded

    study, _, _ = encoded
    other = gf.extract(cnn, load_embedded(12), losses=("ce",))
    with pytest.raises(ValueError, match="not extracted on the study's images"):
        fmri_encoding(study, other)


def test_best_layer_and_regions():
    scores = np.array([[0.1, 0.5, np.nan], [0.3, 0.2, 0.4]])
    best = hierarchy.best_layer(scores, np.array([0.0, 1.0]))
    np.testing.assert_array_equal(best["index"], [1, 0, 1])
    np.testing.assert_allclose(best["peak"], [0.3, 0.5, 0.4])
    regions = hierarchy.hierarchy_regions(np.arange(8.0), 4)
    assert list(regions) == ["1 (early)"] * 2 + ["2"] * 2 + ["3"] * 2 + ["4 (high-level)"] * 2
    with pytest.raises(ValueError, match="'scores' must have shape"):
        hierarchy.best_layer(scores, np.array([0.0]))
    # a target no layer scores has no best layer (issue 30: it got layer 0)
    unscored = hierarchy.best_layer(np.array([[np.nan, 0.2], [np.nan, 0.1]]),
                                    np.array([0.0, 1.0]))
    assert np.isnan(unscored["depth"][0]) and np.isnan(unscored["peak"][0])
    assert unscored["depth"][1] == 0.0 and unscored["peak"][1] == 0.2


def test_summary_reports_recovery(encoded):
    study, feats, results = encoded
    best = {s: hierarchy.best_layer(out["r_nc"], feats.depth) for s, out in results.items()}
    reliable = hierarchy.reliable_targets(study.noise_ceiling(), best["activation"]["peak"])
    text = hierarchy.summarize_fmri(study, best, reliable,
                                    hierarchy.hierarchy_regions(study.hierarchy))
    assert "Simulated study: the recovered layer map matches the planted one" in text
    assert "gradient (ce): median peak score" in text


def test_partition_credits_a_no_gradient_brain_to_activations(encoded):
    """Planted truth 'none': the brain follows activations only, so what a layer's
    gradients add to its activations is (close to) nothing at every vertex, while the
    activations keep a unique part; shapes, order and bad layers as documented."""
    study, feats, _ = encoded
    layers = feats.layers[4::8]
    part = fmri_partition(study, feats, layers=layers[::-1], device="cpu")
    assert part["layers"] == layers and part["unique_gradient"].shape == (
        len(layers), study.betas.shape[2])
    reliable = study.noise_ceiling() > 10
    unique = part["unique_gradient"][:, reliable]
    assert np.abs(np.median(unique, 1)).max() < 0.01
    assert np.mean(unique > 0.05) < 0.05            # a few vertices by chance at most
    assert (np.median(part["unique_activation"][:, reliable], 1) > 0.1).all()
    np.testing.assert_allclose(part["shared"], part["r2_activation"] + part["r2_gradient"]
                               - part["r2_joint"], atol=1e-12)
    with pytest.raises(ValueError, match="'layers' must be some of the features' layers"):
        fmri_partition(study, feats, layers=["nope"])


def test_peak_scores_are_not_inflated_on_responses_without_image_information(encoded):
    """Check the selection-free peak scores (issue 28): betas of pure noise, next to noise
    ceilings that promise signal (as NSD's ncsnr files would if the betas were mixed
    up), give a median peak score over reliable vertices within 0.02 of 0; choosing the
    best layer and the reliable vertices on the test scores instead (as chapter 02 did)
    gives a clearly positive median — the test can tell the two apart."""
    study, feats, _ = encoded
    null = copy.copy(study)
    null.betas = np.random.default_rng(5).standard_normal(study.betas.shape).astype(np.float32)
    results = fmri_encoding(null, feats, device="cpu")
    nc = null.noise_ceiling()
    best, reliable = hierarchy.peak_scores(results, feats.depth, nc)
    assert reliable.sum() > 100
    for signal in results:
        assert abs(np.median(best[signal]["peak"][reliable])) <= 0.02, signal
    # the test-selected peaks of the same data
    test_best = {signal: hierarchy.best_layer(out["r_nc"], feats.depth)
                 for signal, out in results.items()}
    test_reliable = hierarchy.reliable_targets(nc, test_best["activation"]["peak"])
    assert np.median(test_best["activation"]["peak"][test_reliable]) > 0.1
    # on the planted study the same estimator finds the signal
    best, reliable = hierarchy.peak_scores(encoded[2], feats.depth, study.noise_ceiling())
    assert np.median(best["activation"]["peak"][reliable]) > 0.3
    with pytest.raises(ValueError, match="must hold the 'activation' signal"):
        hierarchy.peak_scores({"gradient (ce)": results["gradient (ce)"]}, feats.depth, nc)


def _first_layers(feats, k):
    """``feats`` restricted to its first ``k`` layers (a faster encoding)."""
    out = copy.copy(feats)
    keep = feats.layers[:k]
    out.activations = {layer: feats.activations[layer] for layer in keep}
    out.gradients = {loss: {layer: g[layer] for layer in keep}
                     for loss, g in feats.gradients.items()}
    return out


def test_vertices_in_chunks_give_the_whole_study_fit(encoded):
    """Chunks of vertices (issue 33) give what the kernel gives on the whole averaged
    response matrix: ``ridge.layerwise_scores`` on ``Study.mean_betas()`` (the kernel is
    checked against scikit-learn in test_ridge). Vertices without data, a whole chunk of
    them among them, score NaN, with one warning for the study."""
    from gradbrain.features import signals
    from gradbrain.ridge import layerwise_scores

    study, feats, _ = encoded
    feats = _first_layers(feats, 4)
    study = copy.copy(study)
    study.betas = study.betas[:, :, :24].copy()
    study.ncsnr = study.ncsnr[:24]
    study.betas[:, :, 8:16] = np.nan          # the second chunk of 8: no data at all
    study.betas[3, 1, 20] = np.inf            # one bad repeat
    with pytest.warns(RuntimeWarning, match="9 of 24 targets hold NaN") as caught:
        chunked = fmri_encoding(study, feats, device="cpu", vertices_chunk=8,
                                targets_batch=3, return_prediction=True)
    assert sum("hold NaN" in str(w.message) for w in caught) == 1
    Y = study.mean_betas()
    train, test = np.flatnonzero(study.split == "train"), np.flatnonzero(study.split == "test")
    bad = np.zeros(24, bool)
    bad[8:16] = bad[20] = True
    for name, per_layer in signals(feats).items():
        with pytest.warns(RuntimeWarning):
            whole = layerwise_scores(per_layer, Y[train], Y[test], train, test,
                                     noise_ceiling=study.noise_ceiling(), return_prediction=True)
        out = chunked[name]
        assert out["layers"] == whole["layers"]
        for key in ("r", "r_nc", "cv_r2", "alpha", "prediction"):
            assert out[key].shape == whole[key].shape, key
            assert np.isnan(out[key][..., bad]).all(), key
        np.testing.assert_array_equal(out["alpha"], whole["alpha"])
        for key in ("r", "r_nc", "cv_r2"):
            np.testing.assert_allclose(out[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
        # float32 predictions: batches of other sizes round differently
        np.testing.assert_allclose(out["prediction"], whole["prediction"], atol=1e-4)
        np.testing.assert_array_equal(out["y_test"], Y[test])
    with pytest.raises(ValueError, match="'vertices_chunk' must be a positive integer"):
        fmri_encoding(study, feats, vertices_chunk=0)
    study.ncsnr = np.zeros(24)
    with pytest.raises(ValueError, match="noise ceiling of 0 .or NaN. at every vertex"):
        fmri_encoding(study, feats, vertices_chunk=8)


def test_vertices_in_chunks_make_no_full_size_copy_of_the_responses(encoded):
    """Memory (issue 33): in chunks, the numpy side of an encoding never holds a copy of
    the whole averaged response matrix (before, the mean over repeats and its train/test
    rows were three). Measured with tracemalloc, which sees numpy's allocations (the
    ridge's torch buffers are bounded by ``targets_batch``; the benchmark
    ``bench_encoding_memory.py`` measures the process's peak RSS)."""
    import tracemalloc

    study, feats, _ = encoded
    study = copy.copy(study)                    # responses large beside one small layer
    study.betas = np.tile(study.betas, (1, 1, 8))
    study.ncsnr = np.tile(study.ncsnr, 8)
    full_size = 4 * study.n_images * study.n_vertices            # float32 averaged responses
    feats_one = _first_layers(feats, 1)
    feats_one.gradients = {}
    tracemalloc.start()
    try:
        for chunk in (study.n_vertices, 1024):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            out = fmri_encoding(study, feats_one, device="cpu", vertices_chunk=chunk)
            current, peak = tracemalloc.get_traced_memory()
            transient = peak - current
            del out
            if chunk == study.n_vertices:
                assert transient > full_size, (transient, full_size)   # the test can fail
            else:
                assert transient < 0.3 * full_size, (transient, full_size)
            assert current - before > 0
    finally:
        tracemalloc.stop()


def test_fmri_encodings_are_cached_on_every_input_they_read(encoded, tmp_path, monkeypatch):
    """Issue 33: an fMRI encoding kept on disk is the one computed afresh; one kept with
    test predictions serves a call without them; other betas, noise ceilings or alphas
    miss the cache; folds given as an object are not cached."""
    from sklearn.model_selection import KFold

    from gradbrain.analysis import encoding

    study, feats, _ = encoded
    feats = _first_layers(feats, 3)
    fresh = fmri_encoding(study, feats, device="cpu", return_prediction=True)
    fmri_encoding(study, feats, device="cpu", return_prediction=True, cache=tmp_path)
    monkeypatch.setattr(encoding, "_fmri_fit", lambda *a, **k: pytest.fail("refitted"))
    for with_prediction in (True, False):
        again = fmri_encoding(study, feats, device="cpu", cache=tmp_path,
                              return_prediction=with_prediction)
        assert again.spec == fresh.spec
        for name in fresh:
            expected = {k: v for k, v in fresh[name].items()
                        if with_prediction or k not in ("prediction", "y_test")}
            assert again[name].keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(again[name][key], value, err_msg=key)
                else:
                    assert again[name][key] == value
    monkeypatch.undo()
    calls = []
    real = encoding._fmri_fit
    monkeypatch.setattr(encoding, "_fmri_fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    changed = copy.copy(study)
    changed.betas = study.betas.copy()
    changed.betas[0, 0, 0] += 1.0
    fmri_encoding(changed, feats, device="cpu", cache=tmp_path)
    changed = copy.copy(study)
    changed.ncsnr = study.ncsnr * 1.01
    fmri_encoding(changed, feats, device="cpu", cache=tmp_path)
    fmri_encoding(study, feats, device="cpu", cache=tmp_path, alphas=[1.0, 10.0])
    fmri_encoding(study, feats, device="cpu", cache=tmp_path, cv=KFold(5))
    assert len(calls) == 4 and len(list(tmp_path.glob("fmri-*.npz"))) == 4
