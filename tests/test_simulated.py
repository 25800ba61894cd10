"""The simulated study: determinism, shapes, noise ceiling, planted signatures, files."""

import numpy as np
import pytest
from scipy import stats

from gradbrain.data import Study, load_study, noise_ceiling
from gradbrain.data.simulated import make_study

N_IMAGES = 40


@pytest.fixture(scope="module")
def feats(cnn):
    from gradbrain import features as gf
    from gradbrain.data import load_embedded

    return gf.extract(cnn, load_embedded(N_IMAGES), losses=("ce",), pool="mean")


@pytest.fixture(scope="module")
def studies(feats):
    """One study per gradient truth, same seed."""
    return {truth: make_study(0, n_images=N_IMAGES, gradient_truth=truth, features=feats)
            for truth in ("none", "forward", "backprop", "paper")}


def test_same_seed_same_study_other_seed_differs(feats, studies):
    again = make_study(0, n_images=N_IMAGES, gradient_truth="paper", features=feats)
    np.testing.assert_array_equal(again.betas, studies["paper"].betas)
    np.testing.assert_array_equal(again.epochs.get_data(), studies["paper"].epochs.get_data())
    other = make_study(1, n_images=N_IMAGES, gradient_truth="paper", features=feats)
    assert not np.allclose(other.betas, again.betas)


def test_shapes_and_dtypes(studies):
    study = studies["paper"]
    n_vertices = len(study.vertices)
    assert study.betas.shape == (N_IMAGES, 3, n_vertices) and study.betas.dtype == np.float32
    for name in ("hemi", "hierarchy", "ncsnr"):
        assert getattr(study, name).shape == (n_vertices,)
    assert set(study.hemi) == {"left", "right"}
    assert study.vertices.max() < 10242 and (study.hierarchy >= 0).all()
    assert (study.ncsnr > 0).all()
    epochs = study.epochs
    assert len(epochs.ch_names) == 272
    assert epochs.times[0] == pytest.approx(-0.1) and epochs.times[-1] == pytest.approx(1.3)
    assert epochs.info["sfreq"] == 100.0 and len(epochs.times) == 141
    n_test = int((study.split == "test").sum())
    assert len(epochs) == (N_IMAGES - n_test) + 12 * n_test
    meta = epochs.metadata
    assert set(meta.columns) >= {"image_id", "repeat", "split"}
    assert (meta.groupby("image_id").size().loc[meta.image_id[meta.split == "test"]] == 12).all()
    np.testing.assert_array_equal(np.asarray(study.image_ids)[meta.image_index], meta.image_id)


def test_planted_noise_ceiling_matches_split_half_reliability(studies):
    """Pairwise repeat correlations, stepped up to 3 repeats (Spearman–Brown), vs NC."""
    study = studies["none"]
    b = study.betas.astype(float)
    b = (b - b.mean(0)) / b.std(0)
    pairs = [(0, 1), (0, 2), (1, 2)]
    rho1 = np.mean([(b[:, i] * b[:, j]).mean(0) for i, j in pairs], axis=0)
    n = b.shape[1]
    empirical = 100 * n * rho1 / (1 + (n - 1) * rho1)
    planted = study.noise_ceiling()
    assert abs(empirical.mean() - planted.mean()) < 3.0  # percentage points, over vertices
    assert np.corrcoef(empirical, planted)[0, 1] > 0.5
    np.testing.assert_allclose(planted, noise_ceiling(study.ncsnr, 3))


def _gradient_coefficient(study):
    """Per vertex, least-squares weight of the planted gradient signal in the mean betas."""
    y = study.mean_betas()
    a = study.truth["signal_activation"]
    g = study.truth["signal_gradient"]
    coefs = np.zeros(y.shape[1])
    for v in np.flatnonzero(np.abs(g).sum(0) > 0):
        design = np.column_stack([a[:, v], g[:, v], np.ones(len(y))])
        coefs[v] = np.linalg.lstsq(design, y[:, v], rcond=None)[0][1]
    return coefs


def test_none_truth_is_activation_plus_noise_only(studies):
    study = studies["none"]
    assert not study.truth["signal_gradient"].any() and (study.truth["gradient_layer"] == -1).all()
    y, a = study.mean_betas(), study.truth["signal_activation"]
    slope = (y * a).mean(0) / (a * a).mean(0)
    residual = y - slope * a
    expected = (1 / study.ncsnr) ** 2 / study.betas.shape[1]
    ratio = residual.var(0).mean() / expected.mean()
    assert 0.85 < ratio < 1.1  # what remains is the noise of the mean of repeats


@pytest.mark.parametrize("truth", ["forward", "backprop"])
def test_forward_and_backprop_express_gradients_where_activations_are(studies, truth):
    study = studies[truth]
    t = study.truth
    np.testing.assert_array_equal(t["gradient_layer"], t["preferred_layer"])
    coefs = _gradient_coefficient(study)
    assert np.median(coefs) > 0.4  # sqrt(0.5) ≈ 0.7 before re-standardisation


def test_paper_truth_gradients_everywhere_more_high_without_order(studies):
    """Version 2 of the ``paper`` truth: gradients in every vertex, their share of the
    response rising along the hierarchy (not excluded from early cortex, so that
    prediction 3a measures something), of layers unrelated to the place."""
    from gradbrain.hierarchy.calibration import TRUTH_VERSION

    assert TRUTH_VERSION["paper"] == 2
    study = studies["paper"]
    t = study.truth
    assert (t["gradient_layer"] >= 0).all()
    # the gradient signal's weight recovered from the betas by least squares (not read
    # from the truth) is present in early cortex and larger high up
    coefs = _gradient_coefficient(study)
    low, high = np.quantile(study.hierarchy, [0.2, 0.8])
    early, late = coefs[study.hierarchy <= low], coefs[study.hierarchy >= high]
    assert np.median(early) > 0.15
    assert np.median(late) > np.median(early) + 0.2
    assert stats.spearmanr(study.hierarchy, coefs).statistic > 0.3
    rho = stats.spearmanr(study.hierarchy, t["gradient_layer"]).statistic
    assert abs(rho) < 0.15  # a gradient's layer is unrelated to its place
    assert np.nanmin(t["gradient_latency"]) >= 350


def test_meg_latencies_of_each_truth(studies):
    act = studies["none"].truth["activation_latency"]
    assert np.all(np.diff(act) > 0) and act[0] == pytest.approx(70) and act[-1] == pytest.approx(250)
    assert np.isnan(studies["none"].truth["gradient_latency"]).all()
    np.testing.assert_allclose(studies["forward"].truth["gradient_latency"], act)
    back = studies["backprop"].truth
    assert np.all(np.diff(back["gradient_latency"]) < 0)  # top layer first
    assert back["gradient_latency"].min() > act.max()      # after the forward sweep
    paper = studies["paper"].truth["gradient_latency"]
    assert not np.all(np.diff(paper) < 0) and not np.all(np.diff(paper) > 0)


def test_meg_data_carry_late_signal_only_when_gradients_do(studies):
    """Per-sensor variance across test images of the averaged MEG, 300–600 ms over the
    pre-stimulus baseline (95th percentile over sensors: the patterns are local)."""
    def late_over_baseline(study):
        test = study.epochs["split == 'test'"]
        data = np.stack([test[f"image_id == '{i}'"].get_data().mean(0)
                         for i in np.unique(test.metadata.image_id)])
        times = test.times
        late = data[:, :, (times >= 0.3) & (times <= 0.6)].var(0).mean(1)
        base = data[:, :, times < 0].var(0).mean(1)
        return np.percentile(late / base, 95)

    assert late_over_baseline(studies["none"]) < 1.6
    assert late_over_baseline(studies["backprop"]) > 3.0
    assert late_over_baseline(studies["paper"]) > 3.0


def test_save_load_round_trip_is_exact(studies, tmp_path):
    study = studies["backprop"]
    back = Study.load(study.save(tmp_path / "study"))
    for name in ("betas", "vertices", "hemi", "hierarchy", "ncsnr", "split"):
        np.testing.assert_array_equal(getattr(back, name), getattr(study, name))
    assert back.image_ids == study.image_ids and back.name == study.name
    assert set(back.truth) == set(study.truth)
    for key, value in study.truth.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(back.truth[key], value)
        else:
            assert back.truth[key] == value
    np.testing.assert_array_equal(back.epochs.get_data(), study.epochs.get_data())
    assert back.epochs.metadata.equals(study.epochs.metadata)
    assert back.images.ids == study.images.ids
    np.testing.assert_array_equal(np.asarray(back.images.images[3]), np.asarray(study.images.images[3]))
    assert [p.name for p in (tmp_path).iterdir()] == ["study"]  # nothing partial left


def test_images_read_from_files_are_saved_one_at_a_time_and_mixed_sizes_refused(
        studies, tmp_path):
    """A study whose images are files (ImageFiles, as NSD's and THINGS' loaders give
    them; issue 33) saves and loads every pixel; images of two sizes get one clear error
    and leave nothing behind."""
    import copy

    from PIL import Image

    from gradbrain.data import ImageSet
    from gradbrain.data.images import ImageFiles

    study = copy.copy(studies["none"])
    folder = tmp_path / "pictures"
    folder.mkdir()
    paths = []
    for image_id, image in zip(study.images.ids, study.images.images):
        paths.append(folder / f"{image_id}.png")
        image.save(paths[-1])
    study.images = ImageSet(images=ImageFiles(paths), ids=study.images.ids,
                            labels=study.images.labels, sources=study.images.sources)
    back = Study.load(study.save(tmp_path / "study"))
    assert back.digest() == studies["none"].digest() == study.digest()
    for i in (0, len(paths) - 1):
        np.testing.assert_array_equal(np.asarray(back.images.images[i]),
                                      np.asarray(studies["none"].images.images[i]))
    Image.new("RGB", (7, 5)).save(paths[4])
    with pytest.raises(ValueError, match=f"image '{study.images.ids[4]}' is 7 x 5 pixels"):
        study.save(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pictures", "study"]


def test_a_loaded_studys_images_are_read_when_used_and_stay_those_that_were_loaded(
        studies, tmp_path, cnn):
    """Study.load reads no pixels (issue 33: a real study's images are gigabytes); each is
    read from study.h5 when used, subsets included. Saved again at the same path, the
    study loaded before still gives its own images; another process opening the file
    after that save is refused with one clear error, before it does not. Features
    extracted from the loaded images, in DataLoader workers, equal those of the images
    held in memory."""
    import copy
    import pickle
    import tracemalloc

    from gradbrain import features as gf
    from gradbrain.data.study import StoredImages

    original = studies["backprop"]
    path = original.save(tmp_path / "study")
    imageless = copy.copy(original)
    imageless.images = None
    pixel_bytes = sum(np.asarray(im).nbytes for im in original.images.images)

    def peak_of_load(where):
        tracemalloc.start()
        loaded = Study.load(where)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return loaded, peak
    _, without_images = peak_of_load(imageless.save(tmp_path / "imageless"))
    back, peak = peak_of_load(path)
    assert isinstance(back.images.images, StoredImages)
    assert peak - without_images < pixel_bytes / 4      # no decoded copy of the images
    subset = back.images[[3, 1]]
    assert isinstance(subset.images, StoredImages) and subset.ids == [
        original.images.ids[3], original.images.ids[1]]
    np.testing.assert_array_equal(np.asarray(subset.images[0]),
                                  np.asarray(original.images.images[3]))
    np.testing.assert_array_equal(np.asarray(back.images.images[-1]),
                                  np.asarray(original.images.images[-1]))
    assert back.digest() == original.digest()
    few = list(range(0, len(original.images), 8))        # a lazy subset, in 2 workers
    feats_memory = gf.extract(cnn, original.images[few], losses=("ce",), pool="mean")
    feats_stored = gf.extract(cnn, back.images[few], losses=("ce",), pool="mean",
                              num_workers=2)
    for layer in feats_memory.layers:
        np.testing.assert_array_equal(feats_stored.activations[layer],
                                      feats_memory.activations[layer])
    before = pickle.loads(pickle.dumps(back.images.images))   # as a spawned worker gets it
    np.testing.assert_array_equal(np.asarray(before[2]), np.asarray(original.images.images[2]))
    # saved again at the same path, with other images
    other = studies["none"]
    assert other.save(path) == path
    np.testing.assert_array_equal(np.asarray(back.images.images[5]),
                                  np.asarray(original.images.images[5]))
    after = pickle.loads(pickle.dumps(back.images.images))
    with pytest.raises(ValueError, match="was saved again .* Load the study again"):
        after[0]
    np.testing.assert_array_equal(np.asarray(Study.load(path).images.images[5]),
                                  np.asarray(other.images.images[5]))


def test_save_refuses_to_replace_what_is_not_a_study(studies, tmp_path):
    """Check that a file, or a folder holding no study, is left untouched (issue 30: a
    save onto notes.txt moved it aside and the next load deleted it)."""
    study = studies["none"]
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a study folder"):
        study.save(notes)
    assert notes.read_text() == "x"
    with pytest.raises(FileNotFoundError, match="not a saved Study"):
        Study.load(notes)
    assert notes.read_text() == "x"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("y")
    with pytest.raises(FileExistsError, match="holds no saved study"):
        study.save(mine)
    assert (mine / "thesis.tex").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Study.load(study.save(empty)).image_ids == study.image_ids   # empty: fine
    assert Study.load(study.save(empty)).image_ids == study.image_ids   # a study: replaced


@pytest.mark.parametrize("kwargs,error,match", [
    ({"gradient_truth": "backward"}, ValueError, "'gradient_truth' must be one of"),
    ({"n_images": 1000}, ValueError, "'n_images' must be an integer between 10 and 252"),
    ({"noise": -1.0}, ValueError, "'noise' must be a finite number ≥ 0"),
    ({"gradient_weight": 1.0}, ValueError, "'gradient_weight' must be in"),
    ({"n_test": 39}, ValueError, "'n_test' must be between 2"),
    ({"fmri": False, "meg": False}, ValueError, "At least one of"),
    ({"sfreq": 0}, ValueError, "'sfreq' must be a finite positive number"),
    ({"sfreq": float("nan")}, ValueError, "'sfreq' must be a finite positive number"),
    ({"sfreq": float("inf")}, ValueError, "'sfreq' must be a finite positive number"),
    ({"noise": "1.0"}, ValueError, "'noise' must be a finite number"),
    ({"n_test": 2.5}, ValueError, "'n_test' must be between 2"),
    ({"gradient_weight": "half"}, ValueError, "'gradient_weight' must be in"),
    ({"gradient_loss": "mse"}, ValueError, "'gradient_loss' must be one of"),
])
def test_bad_parameters_give_one_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_study(0, **{"n_images": N_IMAGES, **kwargs})


def test_features_must_match_the_images(feats):
    with pytest.raises(ValueError, match="'features' must be extracted on the first 20"):
        make_study(0, n_images=20, features=feats)


def test_a_study_of_other_images_takes_their_ids_and_the_sizes_asked_for(feats):
    """Given images that are not the embedded ones (here: the embedded pixels under other
    ids, as a real study's would be), with features extracted on them, make_study
    simulates the same study as from the embedded images, at the sizes asked for."""
    import dataclasses

    from gradbrain.data import load_embedded

    embedded = load_embedded(N_IMAGES)
    ids = [f"shared{i:04d}" for i in range(N_IMAGES)]
    images = dataclasses.replace(embedded, ids=ids)
    other = dataclasses.replace(feats, image_ids=ids)
    sizes = dict(n_test=6, n_fmri_repeats=2, n_meg_test_repeats=5)
    study = make_study(0, features=other, images=images, gradient_truth="backprop", **sizes)
    reference = make_study(0, n_images=N_IMAGES, features=feats, gradient_truth="backprop",
                           **sizes)
    assert study.image_ids == ids and study.images.ids == ids
    np.testing.assert_array_equal(study.betas, reference.betas)
    np.testing.assert_array_equal(study.split, reference.split)
    np.testing.assert_array_equal(study.epochs.get_data(), reference.epochs.get_data())
    assert (study.split == "test").sum() == 6 and study.betas.shape[1] == 2
    meta = study.epochs.metadata
    assert meta[meta.split == "test"].repeat.max() + 1 == 5
    assert set(meta.image_id) <= set(ids)
    from gradbrain.analysis.simulation import study_sizes

    assert study_sizes(study) == {"images": images, **sizes}   # what simulate_tests takes
    # the first n of them, and clear errors
    assert make_study(0, n_images=20, features=dataclasses.replace(
        other, image_ids=ids[:20], activations={k: v[:20] for k, v in other.activations.items()},
        gradients={"ce": {k: v[:20] for k, v in other.gradients["ce"].items()}},
        labels=other.labels[:20]), images=images, meg=False).image_ids == ids[:20]
    with pytest.raises(ValueError, match=f"between 10 and {N_IMAGES} \\(the images given"):
        make_study(0, n_images=N_IMAGES + 1, features=other, images=images)
    with pytest.raises(ValueError, match="extracted on the first 40 images given"):
        make_study(0, features=feats, images=images)
    with pytest.raises(TypeError, match="'images' must be an ImageSet"):
        make_study(0, features=other, images=ids)


def test_load_study_dispatches_to_the_real_loaders(tmp_path):
    with pytest.raises(FileNotFoundError, match="NSD folder"):
        load_study("nsd", subject=1, source=tmp_path / "no-nsd-here")
    with pytest.raises(FileNotFoundError, match="THINGS-MEG folder"):
        load_study("things", subject=1, root=tmp_path / "no-things-here")
    with pytest.raises(ValueError, match="'dataset' must be one of"):
        load_study("hcp")


def test_noise_ceiling_formula():
    np.testing.assert_allclose(noise_ceiling(np.array([1.0, 0.0]), 3), [75.0, 0.0])
    with pytest.raises(ValueError, match="'n_repeats' must be at least 1"):
        noise_ceiling(np.ones(2), 0)


def test_describe_truth_names_each_truth(studies):
    from gradbrain.data.simulated import describe_truth

    words = {truth: describe_truth(s) for truth, s in studies.items()}
    assert "**no** brain signal" in words["none"]
    assert "**where and when**" in words["forward"]
    assert "**after** the forward sweep" in words["backprop"] and "300–500 ms" in words["backprop"]
    assert "**more in high-level**" in words["paper"] and "20%" in words["paper"]


# --------------------------------------------------------------------- planted_response


@pytest.fixture(scope="module")
def novel_features(cnn):
    """Features of 12 embedded images no study above showed."""
    from gradbrain import features as gf
    from gradbrain.data import load_embedded

    return gf.extract(cnn, load_embedded(N_IMAGES + 12)[N_IMAGES:], losses=("ce",),
                      pool="mean")


@pytest.mark.parametrize("truth, leakage", [("paper", 0.0), ("shuffled", 0.0),
                                            ("backprop", 0.4)])
def test_planted_response_on_the_studys_own_images_is_its_noiseless_response(feats, truth,
                                                                             leakage):
    """With noise 0 a study's betas and MEG trials are its planted response; the
    function, which reapplies the recorded read-outs to features, must give them back
    (with activation leakage too: its read-outs are recorded as well)."""
    from gradbrain.data.simulated import planted_response
    from gradbrain.meg import average_by_image

    study = make_study(4, n_images=N_IMAGES, gradient_truth=truth, noise=0.0, features=feats,
                       latency_jitter=25.0, activation_leakage=leakage)
    fmri = planted_response(study, study.images, features=feats)
    assert fmri.shape == (N_IMAGES, study.betas.shape[2])
    np.testing.assert_array_equal(fmri.astype(np.float32), study.betas[:, 0])
    meg = planted_response(study, study.images, "meg", features=feats)
    trials = average_by_image(study.epochs, study.image_ids)   # every repeat is identical
    assert meg.shape == trials.shape
    np.testing.assert_array_equal(meg.astype(np.float32).astype(np.float64), trials)


def test_planted_response_changes_with_the_images_not_with_the_noise(feats, novel_features):
    from gradbrain.data.simulated import planted_response

    quiet = make_study(5, n_images=N_IMAGES, noise=0.2, features=feats)
    loud = make_study(5, n_images=N_IMAGES, noise=2.0, features=feats)
    other_seed = make_study(6, n_images=N_IMAGES, noise=0.2, features=feats)
    for modality in ("fmri", "meg"):
        a = planted_response(quiet, None, modality, features=novel_features)
        np.testing.assert_array_equal(a, planted_response(loud, None, modality,
                                                          features=novel_features))
        own = planted_response(quiet, None, modality, features=feats)
        assert np.all(np.isfinite(a)) and a.shape[1:] == own.shape[1:]
        # novel images get responses of the planted scale, not copies of the study's
        assert 0.3 < a.std() / own.std() < 3
        unit = own.std()   # MEG is in tesla: compare in units of the planted scale
        assert np.abs(a - own[: len(a)]).max() > 0.1 * unit
        assert np.abs(a - planted_response(other_seed, None, modality,
                                           features=novel_features)).max() > 0.1 * unit


def test_planted_response_survives_save_and_load(feats, novel_features, tmp_path):
    from gradbrain.data.simulated import planted_response

    study = make_study(7, n_images=N_IMAGES, gradient_truth="backprop", features=feats,
                       activation_leakage=0.3)
    back = Study.load(study.save(tmp_path / "study"))
    for modality in ("fmri", "meg"):
        np.testing.assert_array_equal(
            planted_response(back, None, modality, features=novel_features),
            planted_response(study, None, modality, features=novel_features))


def test_planted_response_refuses_what_it_cannot_answer(studies, feats, novel_features, cnn):
    from gradbrain import features as gf
    from gradbrain.data.simulated import planted_response

    study = studies["paper"]
    real = Study(name="real", image_ids=study.image_ids, images=study.images,
                 split=study.split, betas=study.betas)
    with pytest.raises(ValueError, match="no planted truth"):
        planted_response(real, study.images)
    old = Study(name="old", image_ids=study.image_ids, images=study.images,
                split=study.split, betas=study.betas,
                truth={k: v for k, v in study.truth.items() if not k.startswith("fmri_")})
    with pytest.raises(ValueError, match="before its read-outs were recorded"):
        planted_response(old, study.images, features=feats)
    with pytest.raises(ValueError, match="modality"):
        planted_response(study, study.images, "eeg", features=feats)
    some_layers = gf.extract(cnn, study.images[:4], losses=("ce",), layers=cnn.layers[:3])
    with pytest.raises(ValueError, match="every layer"):
        planted_response(study, None, features=some_layers)
