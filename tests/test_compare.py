"""Model comparison: one tidy table over models, features and losses."""

import numpy as np
import pytest

from gradbrain import compare
from gradbrain.data.simulated import make_study


@pytest.fixture(scope="module")
def study(cnn):
    from gradbrain import features as gf
    from gradbrain.data import load_embedded

    feats = gf.extract(cnn, load_embedded(40), losses=("ce",))
    return make_study(0, n_images=40, features=feats, gradient_truth="paper")


# `make test-slow`: ~30 s; `make test` runs compare.run end to end in the tiny book's
# model-comparison chapter (tests/test_book.py)
@pytest.mark.slow
def test_one_row_per_model_and_signal_with_weights_labelled(study):
    table = compare.run(["efficientnet_lite0.imagenet", "dinov3_vits16"], study,
                        weights={"efficientnet_lite0.imagenet": "pretrained"},
                        losses=("ce",), n_perm=200, n_boot=20, device="cpu")
    assert list(table["model"]) == ["efficientnet_lite0.imagenet"] * 2 + ["dinov3_vits16"] * 2
    assert list(table["feature"]) == ["activation", "gradient"] * 2
    assert list(table["trained"]) == [True, True, False, False]
    assert table.loc[2, "weights"].startswith("random init")
    for column in ("fmri_score", "spatial", "spatial_p", "meg_score", "temporal",
                   "temporal_p", "temporal_ci_low", "temporal_ci_high"):
        assert np.isfinite(table.loc[:1, column].to_numpy(float)).all(), column
    assert (table.loc[:1, "temporal_ci_low"] <= table.loc[:1, "temporal_ci_high"]).all()
    # random-init DINOv3 blocks are near-identity (LayerScale 1e-5): every layer peaks at
    # the same time, so its temporal score is undefined rather than made up
    assert np.isfinite(table.loc[2:, ["fmri_score", "meg_score"]].to_numpy(float)).all()
    assert table.loc[table.feature == "gradient", "consistent_with_backprop"].notna().all()
    # the model that generated the responses predicts them better than a random ViT
    fmri = table[table.feature == "activation"].set_index("model")["fmri_score"]
    assert fmri["efficientnet_lite0.imagenet"] > fmri["dinov3_vits16"]


def test_bad_model_lists(study):
    with pytest.raises(ValueError, match="'model_names' is empty"):
        compare.run([], study)
    with pytest.raises(ValueError, match=r"Unknown model\(s\) \['alexnet'\]"):
        compare.run(["alexnet"], study)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_names=["dinov3_vits16", "dinov3_vits16"]), r"lists \['dinov3_vits16'\] more than"),
    (dict(weights={"dinov3_vits1": "pretrained"}), r"'weights' names \['dinov3_vits1'\]"),
    (dict(alpha=2), "'alpha' must be a number in"),
    (dict(n_perm=0), "'n_perm' must be an integer >= 1"),
    (dict(n_boot=-1), "'n_boot' must be an integer >= 0"),
    (dict(seed=1.5), "'seed' must be an integer"),
    (dict(cv=1), "'cv' must be an integer >= 2"),
    (dict(losses=("mse",)), "'losses' must be one of"),
    (dict(losses=()), "'losses' is empty"),
    (dict(pool="max"), "'pool' must be one of"),
    (dict(model_names=["efficientnet_lite0.imagenet"], pool="cls"), "needs a class token"),
])
def test_bad_inputs_are_refused_before_any_model_runs(study, monkeypatch, kwargs, match):
    """Issue 30: a misspelt weights key was ignored, a model listed twice ran twice, and
    alpha=2 was refused only after 59 s of work. Every check now comes first."""
    from gradbrain import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    kwargs = {"model_names": ["dinov3_vits16"], **kwargs}
    with pytest.raises(ValueError, match=match):
        compare.run(kwargs.pop("model_names"), study, **kwargs)
