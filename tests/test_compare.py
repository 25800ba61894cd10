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
