"""Activations and one-pass gradients, checked against independent references."""

import warnings
from contextlib import nullcontext

import numpy as np
import pandas as pd
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


def _reference_gradients(model, images, losses, pool, loss_seed=0, reference=None):
    """Per image alone (batch of 1) and per layer, a separate autograd call."""
    from gradbrain.data import load_embedded

    x = model.preprocess(images)
    heads = gf._LossHeads(model, loss_seed, torch.device("cpu"))
    with torch.no_grad():
        teacher = heads.dino_scores(gf._embed(model.module, gf._teacher_view(x)))
        # the centre: mean teacher output over the reference set (default: 64 embedded images)
        x_ref = model.preprocess(reference if reference is not None else load_embedded(64))
        center = heads.dino_scores(gf._embed(model.module, gf._teacher_view(x_ref))).mean(0)
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
    images = small_images[:2] if which == "vit" else small_images[:3]  # ViT: 2 keep it quick
    losses = ("dino", "ce", "proj")
    # the ViT gets a 16-image DINO reference set (the default 64 is covered by the CNN)
    reference = list(small_images.images) * 3 if which == "vit" else None  # 18 images
    with pytest.warns(UserWarning, match="random") if which == "vit" else nullcontext():
        feats = gf.extract(model, images, losses=losses, pool=pool, batch_size=2,
                           dino_reference=reference)
    ref_acts, ref_grads = _reference_gradients(model, images, losses, pool, reference=reference)
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
        with warnings.catch_warnings():  # DINOv3's random ce head (tested on its own)
            warnings.filterwarnings("ignore", message=".*uses a fixed random.*")
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
    assert len(list(partial.glob("*.npz"))) == 2
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
        (lambda: gf.extract(3, x), TypeError, "'model' must be a registry or timm name"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_float32_is_the_default_precision_on_every_device(cnn, small_images):
    """bfloat16 flips near-tied self-labels of the ce loss (benchmarks/bench_precision.py),
    so no device gets it unless asked; asked for on the CPU, it runs and differs."""
    for device in ("cpu", "cuda"):
        assert gf._resolve_dtype(None, torch.device(device)) == torch.float32
    x = small_images[:2]
    default = gf.extract(cnn, x, losses=("ce",), cache=False)
    f32 = gf.extract(cnn, x, losses=("ce",), dtype=torch.float32, cache=False)
    b16 = gf.extract(cnn, x, losses=("ce",), dtype="bfloat16", cache=False)
    for layer in cnn.layers:
        np.testing.assert_array_equal(default.gradients["ce"][layer], f32.gradients["ce"][layer])
        assert b16.gradients["ce"][layer].dtype == np.float32
    assert any(not np.array_equal(b16.activations[l], f32.activations[l]) for l in cnn.layers)


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


def test_category_decoding_equals_a_loop_choosing_alpha_by_leave_one_out():
    """Reference written from the docstring: per outer fold, standardise on the training
    images, pick the alpha whose leave-one-out ridge predictions of the ±1-coded classes
    have the least squared error (a plain loop over left-out images), refit, predict."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    # classes hidden under a large nuisance that two other columns reveal: a small alpha
    # unmixes it, a large one does not, so the per-fold choice decides the accuracy
    rng = np.random.default_rng(0)
    classes = np.array(["a", "b", "c"])
    labels = np.repeat(classes, 10)
    nuisance = rng.normal(size=(30, 3))
    code = rng.normal(size=(3, 3))[np.repeat([0, 1, 2], 10)]
    x = np.hstack([code + 0.3 * rng.normal(size=(30, 3)) + 6 * nuisance, nuisance,
                   rng.normal(size=(30, 4))])
    alphas = (0.1, 10.0, 1000.0)
    accuracies = []
    for train, test in StratifiedKFold(4, shuffle=True, random_state=3).split(x, labels):
        scaler = StandardScaler().fit(x[train])
        xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
        coded = np.where(labels[train][:, None] == classes, 1.0, -1.0)
        errors = []
        for alpha in alphas:
            err = 0.0
            for i in range(len(train)):
                keep = np.arange(len(train)) != i
                fit = Ridge(alpha=alpha).fit(xtr[keep], coded[keep])
                err += ((fit.predict(xtr[i:i + 1]) - coded[i]) ** 2).sum()
            errors.append(err)
        fit = Ridge(alpha=alphas[int(np.argmin(errors))]).fit(xtr, coded)
        predicted = classes[fit.predict(xte).argmax(1)]
        accuracies.append(np.mean(predicted == labels[test]))
    ours = gf.category_decoding({"x": x}, labels, cv=4, seed=3, alphas=alphas)
    assert ours["x"] == pytest.approx(np.mean(accuracies), abs=1e-12)


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


# --------------------------------------------------------------------------- heads, any timm model


def _quiet_timm(name, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def test_ce_head_is_recorded_and_a_random_fallback_warns(cnn, vit, small_images):
    """Supervised models use their own classifier silently; DINO falls back to a random
    head with a warning; Features.meta says which head every loss used."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained = gf.extract(cnn, small_images[:1], losses=("ce", "proj"), cache=False)
    assert trained.meta["heads"]["ce"] == "the model's own classifier (1000 classes)"
    assert "256-d projection" in trained.meta["heads"]["proj"]
    with pytest.warns(UserWarning, match="'ce' on dinov3_vits16 uses a fixed random"):
        dino = gf.extract(vit, small_images[:1], losses=("ce",), cache=False)
    assert "no classifier" in dino.meta["heads"]["ce"]


def test_clip_ce_is_zero_shot_against_class_embeddings_or_a_random_head(small_images):
    """CLIP's classifier slot is its 768→512 image projection, not classes. With text
    embeddings, "ce" is CLIP's zero-shot classifier (100 × cosine); reference written
    from that formula on the projection weights, in float64."""
    from gradbrain import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = models.load("clip_vitb16")  # random init, the pretrained config
    assert clip.module.num_classes == 512 and clip.spec.classifier == "projection"
    texts = np.random.default_rng(0).normal(size=(7, 512)).astype(np.float32)
    x = clip.preprocess(small_images[:2])
    heads = gf._LossHeads(clip, 0, torch.device("cpu"), texts)
    embedding = gf._embed(clip.module, x).detach()
    w, b = clip.module.head.weight.double(), clip.module.head.bias
    z = embedding.double() @ w.T + (b.double() if b is not None else 0)
    t = torch.as_tensor(texts, dtype=torch.float64)
    logits = 100 * (z / z.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    np.testing.assert_allclose(heads.logits(embedding).double().numpy(), logits.numpy(),
                               atol=1e-3)  # float32 cosines × 100
    reference = torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum")
    assert float(heads.loss("ce", embedding, None, None)) == pytest.approx(float(reference),
                                                                          rel=1e-3)
    feats = gf.extract(clip, small_images[:1], losses=("ce",), layers=["blocks.11"],
                       class_embeddings=texts, cache=False)
    assert feats.meta["heads"]["ce"].startswith("zero-shot") and "7 class" in feats.meta["heads"]["ce"]
    with pytest.warns(UserWarning, match="512-d image projection"):
        gf.extract(clip, small_images[:1], losses=("ce",), layers=["blocks.11"], cache=False)
    with pytest.raises(ValueError, match=r"shape \(n_classes >= 2, 512\)"):
        gf.extract(clip, small_images[:1], losses=("ce",), class_embeddings=texts[:, :10])


def test_dino_gradient_of_an_image_does_not_depend_on_its_companions(cnn, small_images):
    alone = gf.extract(cnn, small_images[:1], losses=("dino",), cache=False)
    among = gf.extract(cnn, small_images[:4], losses=("dino",), cache=False)
    for layer in cnn.layers:
        _assert_close(among.gradients["dino"][layer][:1], alone.gradients["dino"][layer])
    assert alone.meta["dino_reference"] == "the first 64 embedded images"
    with pytest.raises(ValueError, match="needs at least 16"):
        gf.extract(cnn, small_images[:1], losses=("dino",), dino_reference=small_images[:4])


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "vit_tiny_patch16_224"])
def test_any_timm_model_gives_the_per_layer_autograd_gradients(name, small_images):
    """Two timm models outside the registry: a CNN whose embedding (1,024, after its conv
    head) is wider than num_features, and a ViT; layers are the top-level blocks."""
    from gradbrain import models

    module = _quiet_timm(name)
    model = models.wrap(module, weights="random init")
    assert model.layers == [f"blocks.{i}" for i in range(len(module.blocks))]
    assert model.spec.family == ("vit" if "vit" in name else "cnn")
    images = small_images[:2]
    losses = ("dino", "ce", "proj")
    feats = gf.extract(module, images, losses=losses, cache=False)  # a bare module works
    ref_acts, ref_grads = _reference_gradients(model, images, losses, "mean")
    for layer in model.layers:
        _assert_close(feats.activations[layer], ref_acts[layer])
        for loss in losses:
            _assert_close(feats.gradients[loss][layer], ref_grads[loss][layer])


def test_timm_names_load_and_layers_follow_feature_info_without_a_container():
    from gradbrain import models

    with pytest.warns(UserWarning, match="randomly initialised"):
        loaded = models.load("resnet18")
    info = [entry["module"] for entry in loaded.module.feature_info]
    assert loaded.layers == info == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert loaded.spec.classifier == "classes" and not loaded.spec.study
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE|hub"):
        models.load("resnet18", weights="pretrained")
    with pytest.raises(ValueError, match="any timm model name"):
        models.load("no_such_net")


def test_channels_last_stages_are_pooled_over_space(small_images):
    """Swin stages output (n, H, W, C): pooled over H and W, not over W and C."""
    from gradbrain import models

    module = _quiet_timm("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 1, 1),
                         num_heads=(1, 1, 1, 1))
    model = models.wrap(module)
    assert model.spec.channels_last and model.layers == [f"layers.{i}" for i in range(4)]
    kept = {}
    handle = module.get_submodule("layers.2").register_forward_hook(
        lambda m, i, out: kept.__setitem__("out", out))
    x = model.preprocess(small_images[:2])
    with torch.no_grad():
        module.forward_features(x)
    handle.remove()
    feats = gf.extract(model, x, losses=(), cache=False)
    expected = kept["out"].double().mean(dim=(1, 2)).numpy()
    assert feats.activations["layers.2"].shape == (2, 96)
    _assert_close(feats.activations["layers.2"], expected)


def test_a_failed_device_move_is_undone_before_the_error(cnn, monkeypatch):
    """A move that fails half-way (e.g. out of GPU memory after some blocks moved) is
    undone: the module is sent back to the device it was on, then the error raised."""
    calls = []
    real_to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        if self is cnn.module:
            calls.append(torch.device(args[0]))
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory (simulated)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    with pytest.raises(RuntimeError, match="simulated"):
        gf._move(cnn.module, torch.device("cuda"))
    assert calls == [torch.device("cuda"), torch.device("cpu")]


# --------------------------------------------------------------------------- beyond activations


def _toy_features(rng, n=60):
    acts = {"a": rng.normal(size=(n, 5)), "b": rng.normal(size=(n, 30)) * 7 + 2}
    stacked = np.concatenate(list(acts.values()), axis=1)
    shared = rng.normal(size=(n, 8))
    grads = {"a": stacked @ rng.normal(size=(35, 8)) * 0.3 + shared,  # partly predicted
             "b": rng.normal(size=(n, 4)) * 3 + 1}                   # not at all
    return gf.Features(model="toy", weights="none", layers=["a", "b"],
                       depth=np.array([0.0, 1.0]), activations=acts, gradients={"ce": grads},
                       backward_order={"ce": ["b", "a"]}, image_ids=[str(i) for i in range(n)],
                       labels=[""] * n, pool="mean"), shared


def test_beyond_activations_equals_scikit_learn_cross_fitted_ridge(rng):
    """Alpha = sklearn RidgeCV's (same folds, MSE); training residuals = cross_val_predict
    of sklearn Ridge; test residuals = Ridge fitted on all training images."""
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    feats, _ = _toy_features(rng)
    train = np.arange(60) < 45
    out = gf.beyond_activations(feats, train, device="cpu")
    alphas = np.concatenate([np.logspace(-3, -1, 3), np.logspace(0, 8, 10)])
    # the predictors, built by hand: each layer z-scored on training rows, divided by √dim
    blocks = []
    for a in feats.activations.values():
        z = (a - a[train].mean(0)) / a[train].std(0)
        blocks.append(z / np.sqrt(a.shape[1]))
    X = np.concatenate(blocks, axis=1)
    for layer in feats.layers:
        G = feats.gradients["ce"][layer]
        mean, std = G[train].mean(0), G[train].std(0)
        Z = (G - mean) / std
        ref = RidgeCV(alphas=alphas, cv=KFold(5), scoring="neg_mean_squared_error")
        alpha = ref.fit(X[train], Z[train]).alpha_
        assert out.meta["residual_alpha"]["ce"][layer] == alpha
        predicted = np.empty_like(Z)
        predicted[train] = cross_val_predict(Ridge(alpha=alpha), X[train], Z[train], cv=KFold(5))
        predicted[~train] = Ridge(alpha=alpha).fit(X[train], Z[train]).predict(X[~train])
        np.testing.assert_allclose(out.gradients["ce"][layer], G - (mean + std * predicted),
                                   rtol=1e-5, atol=1e-5 * np.abs(G).max())
    assert out.activations is feats.activations and out.meta["gradients"] == "beyond activations"
    assert out.backward_order == feats.backward_order and out.layers == feats.layers


def test_beyond_activations_removes_what_activations_carry(rng):
    """Gradients that copy the activations vanish; independent ones are left nearly intact."""
    feats, shared = _toy_features(rng, n=200)
    acts = feats.activations
    feats.gradients["ce"]["a"] = np.concatenate([acts["a"], acts["b"][:, :3]], axis=1) * 2.0
    train = np.arange(200) < 160
    out = gf.beyond_activations(feats, train, device="cpu").gradients["ce"]
    copied, fresh = feats.gradients["ce"]["a"], feats.gradients["ce"]["b"]
    assert out["a"][~train].var() < 0.05 * copied[~train].var()
    r = [np.corrcoef(out["b"][~train, j], fresh[~train, j])[0, 1] for j in range(4)]
    assert min(r) > 0.9


def test_beyond_activations_bad_inputs(rng):
    feats, _ = _toy_features(rng)
    with pytest.raises(ValueError, match="'train' must be a boolean mask over the 60 images"):
        gf.beyond_activations(feats, np.arange(40))
    with pytest.raises(ValueError, match="too few for 5-fold"):
        gf.beyond_activations(feats, np.arange(60) < 8)
    with pytest.raises(ValueError, match="'cv' must be an integer >= 2"):
        gf.beyond_activations(feats, np.arange(60) < 40, cv=1)
    with pytest.raises(ValueError, match="'loss' must be one of"):
        gf.beyond_activations(feats, np.arange(60) < 40, loss="dino")
    with pytest.raises(ValueError, match="'alphas' must be a 1-D array of positive"):
        gf.beyond_activations(feats, np.arange(60) < 40, alphas=[0.0, 1.0])


def test_non_finite_pixels_of_a_correctly_sized_batch_are_named(cnn):
    """Check the NaN/inf guard on an input that passes every other check (issue 30: it
    crashed with AttributeError, and its old test stopped at the size check)."""
    x = torch.zeros(3, 3, 224, 224)
    x[1, 0, 5, 5] = float("nan")
    x[2, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite pixel values \(image\(s\) \[1, 2\]\)"):
        gf.extract(cnn, x, losses=("ce",), cache=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_preprocessing_equals_preprocessing_the_whole_set_first(cnn, small_images,
                                                                       monkeypatch, num_workers):
    """Issue 33: extract preprocessed every image up front and kept the whole tensor
    (0.6 MiB per image at 224 px). PIL images are now preprocessed batch by batch (in
    DataLoader workers when asked): the features must be those of the whole tensor, and
    the whole set is never preprocessed at once."""
    reference = gf.extract(cnn, cnn.preprocess(small_images), losses=("dino", "ce"),
                           batch_size=4)
    calls = []
    real = cnn.transform

    def counted():
        transform = real()
        return lambda image: calls.append(1) or transform(image)
    monkeypatch.setattr(cnn, "transform", counted)
    monkeypatch.setattr(cnn, "preprocess", lambda *a: pytest.fail("whole set preprocessed"))
    streamed = gf.extract(cnn, small_images, losses=("dino", "ce"), batch_size=4,
                          num_workers=num_workers)
    for layer in cnn.layers:
        np.testing.assert_array_equal(streamed.activations[layer], reference.activations[layer])
        for loss in ("dino", "ce"):
            np.testing.assert_array_equal(streamed.gradients[loss][layer],
                                          reference.gradients[loss][layer])
    assert streamed.image_ids == list(small_images.ids)
    if num_workers == 0:   # workers count in their own processes
        # the 64 DINO reference images, then each image once (its teacher view and its
        # student pass share the preprocessed batch)
        assert len(calls) == 64 + len(small_images)


def test_images_read_from_files_are_extracted_as_if_held(cnn, small_images, tmp_path,
                                                        monkeypatch):
    """An image set of files (ImageFiles, what the NSD and THINGS loaders give; issue 33)
    gives the features and cache key of the same images held in memory, and each image
    is read once per use — for the cache key, for its batch — never all at once up front."""
    from gradbrain.data.images import ImageFiles

    images = small_images[:5]
    paths = [tmp_path / f"{i}.png" for i in images.ids]
    for image, path in zip(images.images, paths):
        image.save(path)
    on_disk = ImageSet(images=ImageFiles(paths), ids=images.ids, labels=images.labels)
    held = gf.extract(cnn, images, losses=("ce",), batch_size=2, cache=tmp_path / "cache")
    reads = []
    real = ImageFiles._read
    monkeypatch.setattr(ImageFiles, "_read", lambda self, i: reads.append(self.paths[i])
                        or real(self, i))
    monkeypatch.setattr(gf, "_extract_batch", lambda *a, **k: pytest.fail("recomputed"))
    cached = gf.extract(cnn, on_disk, losses=("ce",), batch_size=2, cache=tmp_path / "cache")
    assert cached.meta["cache_key"] == held.meta["cache_key"] and len(reads) == 5
    monkeypatch.undo()
    monkeypatch.setattr(ImageFiles, "_read", lambda self, i: reads.append(self.paths[i])
                        or real(self, i))
    reads.clear()
    fresh = gf.extract(cnn, on_disk, losses=("ce",), batch_size=2, cache=False)
    assert sorted(reads) == sorted(paths)     # no cache key: read for its batch alone
    for layer in cnn.layers:
        np.testing.assert_array_equal(fresh.activations[layer], held.activations[layer])
        np.testing.assert_array_equal(fresh.gradients["ce"][layer],
                                      held.gradients["ce"][layer])


def test_cache_key_is_the_images_content_not_their_ids(cnn, small_images, tmp_path,
                                                       monkeypatch):
    """The key comes from one digest per image (no copy of the preprocessed set): the same
    pixels under other ids find the cache; one changed pixel does not."""
    first = gf.extract(cnn, small_images[:3], losses=("ce",), cache=tmp_path)
    renamed = ImageSet(images=list(small_images.images[:3]), ids=["a", "b", "c"],
                       labels=["x"] * 3)
    monkeypatch.setattr(gf, "_extract_batch", lambda *a, **k: pytest.fail("recomputed"))
    again = gf.extract(cnn, renamed, losses=("ce",), cache=tmp_path)
    assert again.image_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(again.activations[cnn.layers[-1]],
                                  first.activations[cnn.layers[-1]])
    as_list = gf.extract(cnn, list(small_images.images[:3]), losses=("ce",), cache=tmp_path)
    assert as_list.meta["cache_key"] == first.meta["cache_key"]
    changed = [im.copy() for im in small_images.images[:3]]
    changed[1].putpixel((0, 0), (0, 0, 0) if changed[1].getpixel((0, 0)) != (0, 0, 0)
                        else (255, 255, 255))
    monkeypatch.undo()
    other = gf.extract(cnn, changed, losses=("ce",), cache=tmp_path)
    assert other.meta["cache_key"] != first.meta["cache_key"]
    with pytest.raises(ValueError, match="'num_workers' must be an integer >= 0"):
        gf.extract(cnn, small_images[:2], losses=("ce",), num_workers=-1)


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "levit_128s"])
def test_ce_on_a_distilled_model_uses_timms_own_logits(name, small_images):
    """Issue 30: ``ce`` crashed on distilled timm models ('tuple' object is not callable:
    their classifier is (head, head_dist)). Independent reference: the cross-entropy of
    timm's own eval forward, ``module(x)``, against its argmax, by autograd per image."""
    from gradbrain import models

    module = _quiet_timm(name)
    torch.manual_seed(0)   # timm zero-initialises DeiT's heads: no gradient to compare
    for head in module.get_classifier():
        torch.nn.init.normal_(getattr(head, "linear", head).weight, std=0.02)
    model = models.wrap(module, weights="random init", pretrained=False)
    images = small_images[:2]
    feats = gf.extract(model, images, losses=("ce",), cache=False)
    assert "distillation heads" in feats.meta["heads"]["ce"]
    x = model.preprocess(images)
    for i in range(len(x)):
        kept = {}
        handles = [module.get_submodule(l).register_forward_hook(
            lambda m, inp, out, l=l: kept.__setitem__(l, out)) for l in model.layers]
        logits = module(x[i:i + 1].clone().requires_grad_(True))     # timm's eval forward
        for h in handles:
            h.remove()
        value = torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum")
        largest = 0.0   # (the last ViT block's patch tokens reach no head: 0 there)
        for layer in model.layers:
            (g,) = torch.autograd.grad(value, kept[layer], retain_graph=True)
            reference = _pool_reference(g, "mean", model.num_prefix_tokens)
            largest = max(largest, float(np.abs(reference).max()))
            _assert_close(feats.gradients["ce"][layer][i:i + 1], reference)
        assert largest > 0


def test_best_decoding_depths_reports_every_depth_tied_at_the_top():
    """Issue 31: a summary named depth 0.31 'best' at accuracy 1.00 although 0.94 was at
    1.00 too. Worked by hand: n = 40, best 1.00 → p clipped to 39/40, standard error
    sqrt(39/40 · 1/40 / 40) = 0.0247; 0.98 is within it, 0.95 and 0.50 are not."""
    depth = [0.0, 0.25, 0.5, 0.75, 1.0]
    table = pd.DataFrame({"model": "m", "signal": "activation", "depth": depth,
                          "accuracy": [0.50, 1.00, 0.95, 0.98, 1.00], "n_images": 40})
    grads = table.assign(signal="gradient (ce)", accuracy=[0.2, 0.4, 0.6, 0.3, 0.1])
    out = gf.best_decoding_depths(pd.concat([table, grads])).set_index("signal")
    act = out.loc["activation"]
    assert act.accuracy == 1.0 and act.depth == 0.25
    assert act.tolerance == pytest.approx(np.sqrt(39 / 40 * 1 / 40 / 40))
    assert (act.n_tied, act.tied_from, act.tied_to, act.n_layers) == (3, 0.25, 1.0, 5)
    assert act.summary == "equally well (accuracy 1.00 ± 0.02) at 3 of 5 depths, 0.25–1.00"
    grad = out.loc["gradient (ce)"]   # sqrt(0.6 · 0.4 / 40) = 0.077: alone at the top
    assert (grad.depth, grad.n_tied, grad.tied_from, grad.tied_to) == (0.5, 1, 0.5, 0.5)
    assert grad.summary == "at depth 0.50 (accuracy 0.60)"
    with pytest.raises(ValueError, match="n_images"):
        gf.best_decoding_depths(table.drop(columns="n_images"))
