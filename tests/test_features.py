"""Activations and one-pass gradients, checked against independent references."""

import numpy as np
import pytest
import torch

from gradbrain import features as gf
from gradbrain.data import ImageSet


def _pool_reference(tensor, pool, n_prefix):
    """Pooling written out per case (tokens or maps)."""
    t = tensor.detach().double()
    if t.ndim == 4:
        return t.mean(dim=(2, 3)).numpy()
    parts = {"cls": [t[:, 0]], "mean": [t[:, n_prefix:].mean(1)],
             "cls+mean": [t[:, 0], t[:, n_prefix:].mean(1)]}[pool]
    return torch.cat(parts, dim=1).numpy()


def _reference_gradients(model, images, losses, pool, loss_seed=0):
    """Per image alone (batch of 1) and per layer, a separate autograd call."""
    x = model.preprocess(images)
    heads = gf._LossHeads(model, loss_seed, torch.device("cpu"))
    with torch.no_grad():
        teacher = heads.dino_scores(gf._embed(model.module, gf._teacher_view(x)))
    center = teacher.mean(0)
    n_prefix = model.num_prefix_tokens
    acts = {l: [] for l in model.layers}
    grads = {loss: {l: [] for l in model.layers} for loss in losses}
    for i in range(len(x)):
        kept = {}
        handles = [
            model.module.get_submodule(l).register_forward_hook(
                lambda m, inp, out, l=l: kept.__setitem__(l, out))
            for l in model.layers
        ]
        xi = x[i : i + 1].clone().requires_grad_(True)
        embedding = gf._embed(model.module, xi)
        for h in handles:
            h.remove()
        for l in model.layers:
            acts[l].append(_pool_reference(kept[l], pool, n_prefix))
        for loss in losses:
            value = heads.loss(loss, embedding, teacher[i : i + 1], center)
            for l in model.layers:
                (g,) = torch.autograd.grad(value, kept[l], retain_graph=True)
                grads[loss][l].append(_pool_reference(g, pool, n_prefix))
    acts = {l: np.concatenate(v) for l, v in acts.items()}
    grads = {loss: {l: np.concatenate(v) for l, v in d.items()} for loss, d in grads.items()}
    return acts, grads


def _assert_close(ours, ref):
    scale = float(np.abs(ref).max()) or 1.0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("which,pool", [("vit", "cls+mean"), ("cnn", "mean")])
def test_one_pass_gradients_equal_per_layer_autograd(which, pool, request, small_images):
    model = request.getfixturevalue(which)
    images = small_images[:3]
    losses = ("dino", "ce", "proj")
    feats = gf.extract(model, images, losses=losses, pool=pool, batch_size=2)
    ref_acts, ref_grads = _reference_gradients(model, images, losses, pool)
    for layer in model.layers:
        _assert_close(feats.activations[layer], ref_acts[layer])
        for loss in losses:
            _assert_close(feats.gradients[loss][layer], ref_grads[loss][layer])
            assert np.abs(ref_grads[loss][layer]).max() > 0 or layer == model.layers[-1]


def test_gradients_match_finite_differences(cnn, small_images):
    """The `proj` gradient at the last layer matches a central finite difference."""
    import copy

    x = cnn.preprocess(small_images[:1])
    feats = gf.extract(cnn, x, losses=("proj",), layers=["bn2"], dtype=torch.float32)
    module = copy.deepcopy(cnn.module).double()
    heads = gf._LossHeads(cnn, 0, torch.device("cpu"))
    projection, target = heads.projection.double(), heads.target.double()
    with torch.no_grad():
        h = module.forward_features(x.double())
        direction = torch.randn(h.shape, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)

        def loss_at(t):
            emb = module.forward_head(h + t * direction, pre_logits=True)
            return float(0.5 * ((emb @ projection.T - target) ** 2).sum())  # documented loss

        eps = 1e-4
        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    # The head global-average-pools bn2, so dL/dh is constant over space and equal to
    # its spatial mean (the pooled gradient): <dL/dh, v> = sum_c g_c * sum_yx v_cyx.
    pooled = torch.as_tensor(feats.gradients["proj"]["bn2"], dtype=torch.float64)
    analytic = float((pooled[:, :, None, None] * direction).sum())
    assert analytic == pytest.approx(numeric, rel=1e-4)


def test_shapes_depth_and_backward_order(vit, cnn, small_images):
    for model, pool, dim_last in ((vit, "cls+mean", 2 * 384), (cnn, "mean", 1280)):
        feats = gf.extract(model, small_images, losses=("ce",), pool=pool, batch_size=4)
        assert feats.layers == model.layers
        np.testing.assert_array_equal(feats.depth, model.depth)
        for layer in feats.layers:
            assert feats.activations[layer].shape[0] == len(small_images)
            assert feats.activations[layer].dtype == np.float32
            assert feats.gradients["ce"][layer].shape == feats.activations[layer].shape
        assert feats.activations[feats.layers[-1]].shape == (len(small_images), dim_last)
        # autograd produced the gradients top layer first: exactly the reverse order
        assert feats.backward_order["ce"] == feats.layers[::-1]
        np.testing.assert_array_equal(feats.backward_rank("ce"), np.arange(len(feats.layers))[::-1])
        assert feats.image_ids == small_images.ids


def test_activation_only_path_matches_and_last_layer_is_the_model_output(cnn, small_images):
    """inference_mode activations equal the gradient path's; bn2 mean = pre-logits."""
    acts_only = gf.extract(cnn, small_images, losses=(), batch_size=4)
    with_grads = gf.extract(cnn, small_images, losses=("proj",), batch_size=3)
    assert acts_only.gradients == {} and acts_only.backward_order == {}
    for layer in cnn.layers:
        np.testing.assert_allclose(acts_only.activations[layer], with_grads.activations[layer],
                                   rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        x = cnn.preprocess(small_images)
        pre_logits = cnn.module.forward_head(cnn.module.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(acts_only.activations["bn2"], pre_logits.numpy(), rtol=1e-5, atol=1e-6)


def test_vit_pooling_against_forward_intermediates(vit, small_images):
    """Block outputs captured by hooks equal timm's own forward_intermediates."""
    feats = gf.extract(vit, small_images[:2], losses=(), pool="cls")
    with torch.no_grad():
        x = vit.preprocess(small_images[:2])
        inter = vit.module.forward_intermediates(x, intermediates_only=True, output_fmt="NLC",
                                                 return_prefix_tokens=True, norm=False)
    for layer, (patches, prefix) in zip(vit.layers, inter):
        np.testing.assert_allclose(feats.activations[layer], prefix[:, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_ce_loss_is_cross_entropy_against_own_argmax(cnn, rng):
    heads = gf._LossHeads(cnn, 0, torch.device("cpu"))
    embedding = torch.as_tensor(rng.normal(size=(3, 1280)), dtype=torch.float32)
    logits = cnn.module.get_classifier()(embedding).double().numpy()
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    expected = -log_p[np.arange(3), logits.argmax(1)].sum()
    assert float(heads.loss("ce", embedding, None, None)) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- cache


def test_cache_hit_returns_identical_arrays_without_recomputing(cnn, small_images, tmp_path,
                                                                monkeypatch):
    first = gf.extract(cnn, small_images, losses=("ce", "proj"), cache=tmp_path, batch_size=4)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.partial"))

    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must not recompute")

    monkeypatch.setattr(gf, "_extract_batch", boom)
    second = gf.extract(cnn, small_images, losses=("ce", "proj"), cache=tmp_path, batch_size=4)
    for layer in cnn.layers:
        np.testing.assert_array_equal(second.activations[layer], first.activations[layer])
        np.testing.assert_array_equal(second.gradients["proj"][layer], first.gradients["proj"][layer])
    assert second.backward_order == first.backward_order


@pytest.mark.parametrize("change", [
    {"losses": ("ce",)}, {"pool": "cls"}, {"layers": ["blocks.3"]},
    {"dtype": torch.bfloat16}, {"loss_seed": 1}, {"images": "other"}, {"weights": "other"},
])
def test_cache_key_changes_with_every_result_parameter(vit, small_images, change):
    base = dict(losses=("ce", "proj"), pool="mean", layers=vit.layers, dtype=torch.float32,
                loss_seed=0)
    x = vit.preprocess(small_images[:2])
    model = vit
    if change.get("images") == "other":
        x = vit.preprocess(small_images[2:4])
    elif change.get("weights") == "other":
        import copy

        model = copy.copy(vit)
        model._fingerprint = "different-weights"
    else:
        base.update(change)
    key = gf._cache_key(model, x, base["layers"], base["losses"], base["pool"], base["dtype"],
                        base["loss_seed"])
    reference = gf._cache_key(vit, vit.preprocess(small_images[:2]), vit.layers, ("ce", "proj"),
                              "mean", torch.float32, 0)
    assert key != reference
    # loss order and batch size do not change results, nor the key
    assert gf._cache_key(vit, vit.preprocess(small_images[:2]), vit.layers, ("proj", "ce"),
                         "mean", torch.float32, 0) == reference


def test_interrupted_extraction_resumes_to_the_same_result(cnn, small_images, tmp_path,
                                                           monkeypatch):
    full = gf.extract(cnn, small_images, losses=("dino", "ce"), batch_size=2)
    real = gf._extract_batch
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gf, "_extract_batch", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        gf.extract(cnn, small_images, losses=("dino", "ce"), batch_size=2, cache=tmp_path)
    partial = next(tmp_path.glob("*.partial"))
    assert len(list(partial.glob("*.npz"))) == 2 and (partial / "teacher.npy").exists()
    assert not list(tmp_path.glob("*.npz"))

    calls["n"] = -100  # no more failures; count what the resumed run computes
    resumed = gf.extract(cnn, small_images, losses=("dino", "ce"), batch_size=2, cache=tmp_path)
    assert calls["n"] == -100 + 1  # only the last of the three batches was computed
    for layer in cnn.layers:
        np.testing.assert_allclose(resumed.activations[layer], full.activations[layer], rtol=1e-6)
        for loss in ("dino", "ce"):
            np.testing.assert_allclose(resumed.gradients[loss][layer], full.gradients[loss][layer],
                                       rtol=1e-5, atol=1e-12)
    assert not list(tmp_path.glob("*.partial"))


def test_save_load_round_trip(cnn, small_images, tmp_path):
    feats = gf.extract(cnn, small_images[:2], losses=("proj",))
    back = gf.Features.load(feats.save(tmp_path / "f.npz"))
    assert back.layers == feats.layers and back.backward_order == feats.backward_order
    assert back.image_ids == feats.image_ids and back.weights == feats.weights
    for layer in feats.layers:
        np.testing.assert_array_equal(back.gradients["proj"][layer], feats.gradients["proj"][layer])


# --------------------------------------------------------------------------- errors


def test_bad_inputs_each_give_one_clear_error(vit, cnn, small_images):
    x = vit.preprocess(small_images[:1])
    cases = [
        (lambda: gf.extract("no_such_model", x), ValueError, "Unknown model 'no_such_model'"),
        (lambda: gf.extract(vit, x[:, :2]), ValueError, r"shape \(n_images, 3, height, width\)"),
        (lambda: gf.extract(vit, x[0]), ValueError, r"shape \(n_images, 3, height, width\)"),
        (lambda: gf.extract(vit, (x * 255).to(torch.uint8)), ValueError, "must be float"),
        (lambda: gf.extract(vit, torch.rand(1, 3, 256, 256) * 255), ValueError,
         "raw 0..255 pixels"),
        (lambda: gf.extract(vit, x, losses=None), TypeError, "'losses' must be a sequence"),
        (lambda: gf.extract(vit, x[..., :128, :128]), ValueError, "expects"),
        (lambda: gf.extract(vit, []), ValueError, "'images' is empty"),
        (lambda: gf.extract(vit, ImageSet([], [], [])), ValueError, "'images' is empty"),
        (lambda: gf.extract(vit, x[:0]), ValueError, "'images' is empty"),
        (lambda: gf.extract(vit, "picture.png"), TypeError, "'images' must be"),
        (lambda: gf.extract(vit, x, losses=("mse",)), ValueError, "'losses' must be one of"),
        (lambda: gf.extract(vit, x, losses=("ce", "ce")), ValueError, "lists a loss twice"),
        (lambda: gf.extract(vit, x, pool="max"), ValueError, "'pool' must be one of"),
        (lambda: gf.extract(cnn, small_images[:1], pool="cls"), ValueError, "has none; use pool='mean'"),
        (lambda: gf.extract(vit, x, layers=["head"]), ValueError, "unknown: \\['head'\\]"),
        (lambda: gf.extract(vit, x, batch_size=0), ValueError, "'batch_size' must be a positive"),
        (lambda: gf.extract(vit, x, dtype=torch.int8), ValueError, "'dtype' must be"),
        (lambda: gf.extract(3, x), TypeError, "'model' must be a registry name"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


# --------------------------------------------------------------------------- analyses


def _hsic_reference(x, y):
    """CKA from Gram matrices with an explicit centring matrix (Kornblith et al. 2019)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_matches_gram_matrix_definition(rng):
    x = rng.normal(size=(30, 7))
    y = x @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(30, 5))
    assert gf.linear_cka(x, y) == pytest.approx(_hsic_reference(x, y), rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert gf.linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0)
    matrix = gf.cka_matrix({"a": x, "b": y}, {"c": y})
    assert matrix.shape == (2, 1) and matrix[1, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number of rows"):
        gf.linear_cka(x, y[:5])


def test_category_decoding_recovers_planted_classes(rng):
    labels = np.repeat(["a", "b", "c"], 20)
    centres = rng.normal(size=(3, 10)) * 4
    separable = centres[np.searchsorted(["a", "b", "c"], labels)] + rng.normal(size=(60, 10))
    noise = rng.normal(size=(60, 10))
    scores = gf.category_decoding({"signal": separable, "noise": noise}, labels)
    assert scores["signal"] > 0.95
    assert scores["noise"] < 0.6
    with pytest.raises(ValueError, match="≥2 categories"):
        gf.category_decoding({"x": noise[:4]}, ["a", "a", "b", "b"])


def test_extraction_runs_in_eval_mode_and_gives_the_callers_mode_back(cnn, small_images):
    """A model left in training mode (batch norm on batch statistics) would make an
    image's features depend on its batch companions; extract uses eval mode itself."""
    reference = gf.extract(cnn, small_images[:4], losses=("ce",), batch_size=1)
    cnn.module.train()
    try:
        together = gf.extract(cnn, small_images[:4], losses=("ce",), batch_size=4)
        assert cnn.module.training and all(m.training for m in cnn.module.modules())
    finally:
        cnn.module.eval()
    for layer in cnn.layers:
        np.testing.assert_allclose(together.activations[layer], reference.activations[layer],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(together.gradients["ce"][layer],
                                   reference.gradients["ce"][layer], rtol=1e-3, atol=1e-8)
