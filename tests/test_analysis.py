"""The analysis layer's chapter helpers: what a chapter starts from, what it simulates."""

import copy

import numpy as np
import pytest

from gradbrain import features as gf
from gradbrain.analysis.chapter import chapter_inputs
from gradbrain.analysis.simulation import simulation_design, study_sizes
from gradbrain.data import study_path
from gradbrain.data.simulated import estimate_noise, make_study

N_IMAGES = 12


@pytest.fixture(scope="module")
def saved(cnn, tmp_path_factory):
    """A small simulated study saved where the data chapter saves it (profile 'unit'), in
    the test session's data home (tests/conftest.py points $GRADBRAIN_DATA there for each
    test; a module fixture runs before that, so it names the folder itself)."""
    from gradbrain.data import load_embedded

    feats = gf.extract(cnn, load_embedded(N_IMAGES), losses=("ce",), pool="mean",
                       cache=False)
    study = make_study(0, n_images=N_IMAGES, features=feats, gradient_truth="backprop",
                       noise=0.7, n_test=3)
    study.save(tmp_path_factory.getbasetemp() / "data_home" / "studies" / "unit-simulated")
    return study, feats


def test_chapter_inputs_load_the_saved_study_and_its_features(saved, cnn):
    """Check the study, model and features against a separate load and extraction."""
    study, feats = saved
    inputs = chapter_inputs("unit", "simulated", model="efficientnet_lite0.imagenet",
                            weights="pretrained", losses=["ce"])
    assert inputs.study.image_ids == study.image_ids
    np.testing.assert_array_equal(inputs.study.betas, study.betas)
    assert inputs.features.layers == feats.layers
    for layer in feats.layers:
        np.testing.assert_allclose(inputs.features.gradients["ce"][layer],
                                   feats.gradients["ce"][layer], rtol=1e-5, atol=1e-12)
    assert inputs.net.weights == cnn.weights
    said = inputs.ran_on()
    assert said.startswith(f"This chapter ran on profile 'unit': {study.name} (from ")
    assert "(from $GRADBRAIN_DATA/studies/unit-simulated)" in said and cnn.weights in said
    assert inputs.path == study_path("unit", "simulated")


def test_chapter_inputs_use_a_study_in_memory_and_name_a_missing_one(saved):
    study, _ = saved
    inputs = chapter_inputs("other", "nsd", model="efficientnet_lite0.imagenet",
                            weights="pretrained", study=study)
    assert inputs.study is study and inputs.path is None and "(from" not in inputs.ran_on()
    with pytest.raises(FileNotFoundError, match="running the data chapter"):
        chapter_inputs("never-saved", "simulated", model="efficientnet_lite0.imagenet")
    imageless = copy.copy(study)
    imageless.images = None
    with pytest.raises(ValueError, match="has no images"):
        chapter_inputs("unit", "things", model="efficientnet_lite0.imagenet", study=imageless)


def test_simulation_design_of_a_simulated_study_is_its_own(saved):
    study, feats = saved
    design = simulation_design(study, feats)
    assert design["features"] is feats and design["noise"] == 0.7 and design["sizes"] == {}
    assert design["description"] == f"{N_IMAGES} images, noise 0.7 (the study's own)"
    assert simulation_design(study, feats, noise=2.0)["noise"] == 2.0


def test_simulation_design_of_real_data_estimates_its_noise(saved):
    """Check that real data (no planted truth) get the noise of their noise ceilings,
    at their own size with images='study'; a study without ceilings gets 1.0, assumed."""
    study, feats = saved
    real = copy.copy(study)
    real.truth = {}
    design = simulation_design(real, feats, images="study")
    assert design["noise"] == pytest.approx(estimate_noise(real))
    assert "estimated from its noise ceilings" in design["description"]
    sizes = study_sizes(real)
    assert design["sizes"] == sizes and sizes["n_test"] == 3 and design["features"] is feats
    meg_only = copy.copy(real)
    meg_only.ncsnr = None
    assert simulation_design(meg_only, feats, images="study")["noise"] == 1.0
    assert "(assumed)" in simulation_design(meg_only, feats, images="study")["description"]
    with pytest.raises(ValueError, match="'images' must be one of"):
        simulation_design(real, feats, images="nsd")
    with pytest.raises(ValueError, match="'net' .* is needed"):
        simulation_design(real, feats, images="embedded")
    with pytest.raises(ValueError, match="'noise' must be a finite number"):
        simulation_design(real, feats, noise=-1.0)


def test_demo_study_is_the_data_chapters_demo_parameters():
    """DEMO_STUDY must be what the data chapter runs on the demo profile: the profile's
    00_data block and the notebook's own defaults (papermill's parameters cell)."""
    import ast
    from pathlib import Path

    import nbformat

    from gradbrain import book
    from gradbrain.analysis.chapter import DEMO_STUDY

    root = Path(__file__).resolve().parents[1]
    profile = dict(book.load_profile(root, "demo")["notebooks"]["00_data"])
    assert profile.pop("dataset") == "simulated"
    assert DEMO_STUDY == profile
    nb = nbformat.read(str(root / "notebooks" / "00_data.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    defaults = {node.targets[0].id: ast.literal_eval(node.value)
                for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)}
    assert {k: defaults[k] for k in DEMO_STUDY} == DEMO_STUDY


def test_a_chapter_opened_alone_builds_the_demo_study_and_nothing_else(monkeypatch, tmp_path):
    """Colab/Binder: chapters 02-06 on the demo profile build the demo's study when the data
    chapter never ran (and save it where that chapter would); other profiles, and a folder
    the user chose, still say which chapter makes it."""
    from gradbrain.analysis import chapter
    from gradbrain.data import Study, load_study

    small = {**chapter.DEMO_STUDY, "n_images": 12}
    monkeypatch.setattr(chapter, "DEMO_STUDY", small)
    monkeypatch.setenv("GRADBRAIN_DATA", str(tmp_path / "home"))
    study, path, built = chapter.chapter_study("demo", "simulated")
    assert built and path == study_path("demo", "simulated") and path.is_dir()
    reference = load_study("simulated", **small)          # what chapter 00 would make
    assert study.digest() == reference.digest() == Study.load(path).digest()
    again, _, built_again = chapter.chapter_study("demo", "simulated")
    assert not built_again and again.digest() == reference.digest()
    for args in (("tiny", "simulated"), ("demo", "simulated", tmp_path / "mine")):
        with pytest.raises(FileNotFoundError, match="00_data"):
            chapter.chapter_study(*args)
    assert not (tmp_path / "mine").exists()
    assert not study_path("tiny", "simulated").exists()
