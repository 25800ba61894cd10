"""A simulated study with a planted ground truth, built from real model features.

Brain responses to the embedded images are generated from the per-layer activations
and gradients of a real network (by default the ImageNet EfficientNet-Lite0 that ships
offline), in the same :class:`~gradbrain.data.study.Study` structure the NSD and
THINGS-MEG loaders return. Every later chapter can therefore be run on it and checked
against a known answer.

fMRI
    Vertices of the occipital and ventral/lateral temporal cortex of fsaverage5, both
    hemispheres. Each vertex's hierarchy coordinate is its Euclidean distance (mm) from
    a V1 seed at the occipital pole (the coordinate of Raugel et al. 2025); its planted
    preferred layer depth rises with that distance, with scatter. Its response is a
    random linear read-out of that layer's activations (plus gradients, depending on
    the truth), scaled to unit variance across images, plus Gaussian noise with a
    per-vertex level σ: ``ncsnr = 1 / σ`` is known exactly. Three repeats per image.
MEG
    272 CTF axial gradiometers, −100…1300 ms. Layer ``l``'s activation signal peaks at
    a latency rising with depth (70 → 250 ms) with a smooth sensor pattern moving
    from occipital to temporal sensors. Test images are shown ``n_meg_test_repeats``
    times, the others once.

Gradient truths
    ``"none"``: gradients carry no brain signal.
    ``"forward"``: the gradient of layer l appears where and when activation l does.
    ``"backprop"``: what a biological backprop predicts — the gradient of layer l is
    expressed in the vertices (and sensors) of activation l, but arrives after the
    forward sweep, in the measured autograd order (top layer first): 300 → 500 ms.
    ``"paper"``: what the paper reports — gradients (of layers drawn at random) are
    expressed in every vertex, with a share of the response that rises along the
    hierarchy (a fifth of ``gradient_weight`` at V1, all of it from the 95th percentile
    of the distance from V1 on: "specifically in higher-level" areas, so that whether
    they gain more there is measured, not planted by exclusion), and at late, unordered
    latencies (350–600 ms, random across layers), in temporal sensors. (How each truth is
    planted is versioned for the simulated tables:
    :data:`gradbrain.hierarchy.calibration.TRUTH_VERSION`.)

Divergent truths (what a *wrong* backprop order looks like; the alternatives against
which the divergence test's power is measured)
    ``"reversed"``: gradients are expressed at backprop's places and times, but in the
    reverse order — the gradient of layer l where activation L−1−l is, and after the
    forward sweep bottom layer first.
    ``"shuffled"``: the same, in a random order — the gradient of layer l where and when
    backprop would put the gradient of layer π(l), for a permutation π drawn from the
    seed.
    ``"partial"``: the lower half of the layers (``L // 2``) in backprop's order, the
    upper half in reverse among themselves — an order that is right early in the
    hierarchy and wrong late, as when only high-level areas carry a misplaced backward
    signal (nothing is drawn for it).

Nuisances (what a real backprop could differ in without ceasing to be one)
    ``gradient_weight`` (the share of the planted variance gradients carry),
    ``latency_jitter`` (ms, sd of a Gaussian offset added to every gradient layer's
    latency) and ``activation_leakage`` (the share of each gradient signal that is in
    fact a read-out of the *same layer's activations*: a backward signal contaminated by
    the forward activity it is computed from, expressed at the gradient's places and
    times, so that activation encoders also find a late, backprop-timed response). At
    their defaults (0.5, 0, 0) the simulator draws nothing for them, so studies made
    before they existed are unchanged; the leaked read-outs come from a generator of
    their own, so a leaky study shares every other draw (split, read-outs, noise) with
    the same seed's study without leakage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import features as gf
from .. import models
from .._utils import check_in_allowed
from .geometry import HEMIS, ctf_info, distance_from, posterior_vertices, v1_seed
from .images import N_EMBEDDED, ImageSet, load_embedded
from .study import Study

__all__ = ["GRADIENT_TRUTHS", "DIVERGENT_TRUTHS", "ALL_TRUTHS", "make_study",
           "describe_truth", "default_n_test", "estimate_noise", "planted_response"]

GRADIENT_TRUTHS = ("none", "forward", "backprop", "paper")
#: Backprop's places and times in a wrong order (see the module docstring).
DIVERGENT_TRUTHS = ("reversed", "shuffled", "partial")
ALL_TRUTHS = GRADIENT_TRUTHS + DIVERGENT_TRUTHS

#: Latencies (s) of the planted MEG signals.
_ACT_LATENCY = (0.070, 0.250)       # first → last layer
_BACKPROP_LATENCY = (0.300, 0.500)  # first → last gradient produced by autograd
_PAPER_LATENCY = (0.350, 0.600)     # range of the unordered late gradient latencies
_MEG_WIDTH = 0.030                  # s, sd of each Gaussian time course
_MEG_SIGNAL_T = 100e-15             # T per unit of planted signal at a pattern's peak sensor
_MEG_NOISE_T = 200e-15              # T, single-trial noise sd at noise=1
_LEAK_STREAM = 0x1EA4               # second entropy word of the leaked read-outs' generator
_PAPER_EARLY_SHARE = 0.2            # "paper": share of gradient_weight at V1 (all of it at
                                    # the top of the hierarchy, linear in between)



def default_n_test(n_images: int) -> int:
    """Test images of a simulated study of ``n_images`` unless told: a fifth, at least 2."""
    return max(2, n_images // 5)


def _zscore_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and sds over rows (float64), the statistics :func:`_zscore` uses."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=0), x.std(axis=0)


def _apply_zscore(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """``(x - mean) / sd`` column-wise, 0 where ``sd`` is 0."""
    x = np.asarray(x, dtype=np.float64)
    return np.divide(x - mean, sd, out=np.zeros(np.broadcast_shapes(x.shape, np.shape(mean))),
                     where=sd > 0)


def _zscore(x: np.ndarray) -> np.ndarray:
    """Column-wise z-score over rows; constant columns become 0."""
    return _apply_zscore(x, *_zscore_stats(x))


def _readout(z: np.ndarray, n_out: int, rng: np.random.Generator,
             record: list | None = None) -> np.ndarray:
    """Random linear read-out of standardised features, scaled to unit variance.

    ``record``, when given, receives ``(weights, mean, sd)``: the read-out matrix
    (n_features, n_out) and the statistics that scaled its output, so that the same
    read-out can be applied to other images (:func:`planted_response`).
    """
    weights = rng.standard_normal((z.shape[1], n_out))
    raw = z @ weights
    mean, sd = _zscore_stats(raw)
    if record is not None:
        record.append((weights, mean, sd))
    return _apply_zscore(raw, mean, sd)


#: Median of the per-vertex noise factor U (log-uniform in [0.5, 2.5]) of _simulate_fmri.
_MEDIAN_NOISE_FACTOR = float(np.sqrt(0.5 * 2.5))


def estimate_noise(study) -> float:
    """The ``noise`` of :func:`make_study` that matches a study's fMRI noise ceilings.

    The simulator gives vertex v a noise sd ``noise × U_v`` against a signal sd of 1, so
    its ``ncsnr = 1 / (noise × U_v)`` with ``U`` log-uniform in [0.5, 2.5] (median
    √1.25). This inverts the median: ``noise = median(1 / ncsnr) / √1.25`` over the
    vertices with a finite, positive ncsnr. On a simulated study it recovers the noise
    it was made with (within the sampling error of a median over thousands of
    vertices); on real data it is the simulator's noise whose median noise ceiling is
    the study's, an assumption that the shape of the ncsnr distribution does not matter.

    Parameters
    ----------
    study : Study
        With ``ncsnr`` (n_vertices,), dimensionless.

    Returns
    -------
    float
        The noise scale (dimensionless, ≥ 0).
    """
    ncsnr = getattr(study, "ncsnr", None)
    if ncsnr is None:
        raise ValueError(f"Study {getattr(study, 'name', '?')!r} has no fMRI noise ceilings "
                         "(ncsnr): the noise cannot be estimated from it; give the noise "
                         "explicitly (e.g. noise=1.0) and say it is assumed.")
    ncsnr = np.asarray(ncsnr, dtype=float)
    ok = np.isfinite(ncsnr) & (ncsnr > 0)
    if not ok.any():
        if np.any(np.isposinf(ncsnr)):
            return 0.0
        raise ValueError("No vertex has a finite, positive ncsnr: the noise cannot be "
                         "estimated; give it explicitly.")
    return float(np.median(1.0 / ncsnr[ok]) / _MEDIAN_NOISE_FACTOR)


def _check(seed, n_images, gradient_truth, noise, gradient_weight, n_test, sfreq, fmri, meg,
           n_fmri_repeats=3, n_meg_test_repeats=12, n_available=N_EMBEDDED,
           source="the embedded stimulus set", latency_jitter=0.0, activation_leakage=0.0):
    check_in_allowed("gradient_truth", gradient_truth, ALL_TRUTHS)
    if isinstance(activation_leakage, bool) or not isinstance(
            activation_leakage, (int, float, np.integer, np.floating)) \
            or not 0 <= activation_leakage < 1:
        raise ValueError(f"'activation_leakage' must be in [0, 1) (share of each gradient "
                         f"signal read out from the same layer's activations); got "
                         f"{activation_leakage!r}. e.g. activation_leakage=0.5")
    if isinstance(latency_jitter, bool) or not isinstance(latency_jitter, (int, float,
                                                                           np.floating)) \
            or not np.isfinite(latency_jitter) or latency_jitter < 0:
        raise ValueError(f"'latency_jitter' must be a finite number of ms >= 0 (sd of each "
                         f"gradient layer's latency offset); got {latency_jitter!r}. "
                         "e.g. latency_jitter=30")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"'seed' must be an integer; got {type(seed).__name__}. e.g. seed=0")
    if seed < 0:
        raise ValueError(f"'seed' must be a non-negative integer; got {seed}. e.g. seed=0")
    for name, value in (("n_fmri_repeats", n_fmri_repeats),
                        ("n_meg_test_repeats", n_meg_test_repeats)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"'{name}' must be a positive integer (repeats per image); got "
                             f"{value!r}. e.g. {name}=3")
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) \
            or not 10 <= n_images <= n_available:
        raise ValueError(
            f"'n_images' must be an integer between 10 and {n_available} ({source}); "
            f"got {n_images!r}. e.g. n_images={min(200, n_available)}"
        )
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)) \
            or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"'noise' must be a finite number ≥ 0 (noise sd scale); got {noise!r}. "
                         "e.g. noise=1.0")
    if isinstance(gradient_weight, bool) or not isinstance(
            gradient_weight, (int, float, np.integer, np.floating)) or not 0 <= gradient_weight < 1:
        raise ValueError(
            f"'gradient_weight' must be in [0, 1) (share of planted variance carried by "
            f"gradients); got {gradient_weight!r}. e.g. gradient_weight=0.5"
        )
    if n_test is not None and (isinstance(n_test, bool) or not isinstance(
            n_test, (int, np.integer)) or not 2 <= n_test <= n_images - 2):
        raise ValueError(f"'n_test' must be between 2 and n_images - 2; got {n_test!r}.")
    if isinstance(sfreq, bool) or not isinstance(sfreq, (int, float, np.integer, np.floating)) \
            or not np.isfinite(sfreq) or sfreq <= 0:
        raise ValueError(f"'sfreq' must be a finite positive number (Hz); got {sfreq!r}. "
                         "e.g. sfreq=100")
    if not (fmri or meg):
        raise ValueError("At least one of 'fmri' and 'meg' must be True.")


def make_study(
    seed: int = 0,
    *,
    model: str = "efficientnet_lite0.imagenet",
    weights: str | None = "pretrained",
    n_images: int | None = None,
    gradient_truth: str = "paper",
    noise: float = 1.0,
    gradient_loss: str = "ce",
    gradient_weight: float = 0.5,
    latency_jitter: float = 0.0,
    activation_leakage: float = 0.0,
    n_test: int | None = None,
    fmri: bool = True,
    meg: bool = True,
    sfreq: float = 100.0,
    n_fmri_repeats: int = 3,
    n_meg_test_repeats: int = 12,
    features=None,
    images=None,
    cache=True,
    progress: bool = False,
) -> Study:
    """Simulate fMRI and MEG responses to images (the embedded ones by default) with a
    planted truth.

    Parameters
    ----------
    seed : int
        Seed of every random choice (read-outs, scatter, noise, split). Same seed, same study.
    model, weights : str
        Registry model and weights whose features generate the responses.
    n_images : int or None
        Number of stimuli: the first ``n_images`` of ``images`` (10 … their number);
        default 200 embedded images, or all of ``images``.
    gradient_truth : {"none", "forward", "backprop", "paper", "reversed", "shuffled", \
"partial"}
        What gradients do in the simulated brain (see the module docstring).
    noise : float
        Scale of the noise (0 = noiseless). fMRI noise sd per vertex is
        ``noise × U`` with U log-uniform in [0.5, 2.5] (signal sd = 1).
    gradient_loss : str
        Loss whose gradients are planted (see :mod:`gradbrain.features`).
    gradient_weight : float
        Share of the planted variance carried by gradients where they are expressed
        (under ``"paper"``, at the top of the hierarchy; less below it, see above).
    latency_jitter : float
        Sd (ms) of a Gaussian offset drawn for every gradient layer's MEG latency (0:
        none, nothing drawn).
    activation_leakage : float
        Share (0–1) of the variance of each gradient signal that is a read-out of the same
        layer's activations instead of its gradients (0: none, nothing drawn). The
        gradient signal of layer l becomes ``√(1−λ)·g_l + √λ·a'_l``, standardised, with
        ``a'_l`` a fresh random read-out of activation l, in fMRI (at the gradient's
        vertices) and MEG (at the gradient's latency and pattern).
    n_test : int or None
        Number of test images (shown with repeats in MEG); default
        :func:`default_n_test` (``n_images // 5``, at least 2).
    fmri, meg : bool
        Which modalities to simulate.
    sfreq : float
        MEG sampling rate (Hz).
    n_fmri_repeats, n_meg_test_repeats : int
        Repeats per image in fMRI, and per test image in MEG.
    features : Features or None
        Precomputed features of ``model`` on the stimuli (must hold ``gradient_loss``);
        extracted (and cached) when None.
    images : ImageSet or None
        The stimuli; default the embedded set (:func:`gradbrain.data.load_embedded`).
        Give a real study's images, with ``features`` extracted on them, to simulate a
        study of its size (e.g. NSD's or THINGS-MEG's number of images, test images and
        repeats) from the very features its chapter encodes.
    cache : bool or path-like
        Feature cache (see :func:`gradbrain.features.extract`).

    Returns
    -------
    Study
        With ``truth`` holding the planted quantities: per vertex ``preferred_layer``,
        ``preferred_depth``, ``gradient_layer`` (−1 = none), ``gradient_weight``,
        ``signal_activation`` / ``signal_gradient`` (n_images, n_vertices); per layer
        ``activation_latency`` / ``gradient_latency`` (ms; NaN = none); and the
        settings.
    """
    check_in_allowed("gradient_loss", gradient_loss, gf.LOSSES)
    if images is None:
        n_images = 200 if n_images is None else n_images
        _check(seed, n_images, gradient_truth, noise, gradient_weight, n_test, sfreq, fmri,
               meg, n_fmri_repeats, n_meg_test_repeats, latency_jitter=latency_jitter,
               activation_leakage=activation_leakage)
        images = load_embedded(n_images)
        source = "embedded images"
    else:
        if not hasattr(images, "ids") or not hasattr(images, "images"):
            raise TypeError(f"'images' must be an ImageSet (e.g. a study's .images); got "
                            f"{type(images).__name__}.")
        n_images = len(images.ids) if n_images is None else n_images
        _check(seed, n_images, gradient_truth, noise, gradient_weight, n_test, sfreq, fmri,
               meg, n_fmri_repeats, n_meg_test_repeats, n_available=len(images.ids),
               source="the images given", latency_jitter=latency_jitter,
               activation_leakage=activation_leakage)
        images = images[:n_images] if n_images < len(images.ids) else images
        source = "images given"
    if features is None:
        loaded = models.load(model, weights=weights)
        features = gf.extract(loaded, images, losses=(gradient_loss,), pool="mean", cache=cache,
                              progress=progress)
    elif features.image_ids != images.ids or gradient_loss not in features.gradients:
        raise ValueError(
            f"'features' must be extracted on the first {n_images} {source} with loss "
            f"{gradient_loss!r}; got {features.n_images} images and losses {features.losses}."
        )
    layers, depth = list(features.layers), np.asarray(features.depth, dtype=float)
    stats = {"activation": [_zscore_stats(features.activations[l]) for l in layers],
             "gradient": [_zscore_stats(features.gradients[gradient_loss][l]) for l in layers]}
    act = [_apply_zscore(features.activations[l], *s) for l, s in zip(layers, stats["activation"])]
    grad = [_apply_zscore(features.gradients[gradient_loss][l], *s)
            for l, s in zip(layers, stats["gradient"])]

    rng = np.random.default_rng(seed)
    n_test = n_test if n_test is not None else default_n_test(n_images)
    split = np.full(n_images, "train", dtype="<U5")
    split[rng.permutation(n_images)[:n_test]] = "test"
    truth = {
        "gradient_truth": gradient_truth, "seed": int(seed), "model": features.model,
        "weights": features.weights, "gradient_loss": gradient_loss, "noise": float(noise),
        "layers": layers, "depth": depth, "gradient_weight_setting": float(gradient_weight),
        "backward_rank": features.backward_rank(gradient_loss),
        "latency_jitter": float(latency_jitter),
        "activation_leakage": float(activation_leakage),
        # how each image's features were standardised (per layer, concatenated over
        # layers): what planted_response needs to read out images the study never showed
        **{f"feature_{what}_{signal}": np.concatenate([s[i] for s in stats[signal]])
           for signal in stats for i, what in enumerate(("mean", "sd"))},
        "feature_dims": np.array([features.activations[l].shape[1] for l in layers]),
        "gradient_feature_dims": np.array([features.gradients[gradient_loss][l].shape[1]
                                           for l in layers]),
    }
    if gradient_truth == "shuffled":   # drawn after the split, before either modality
        truth["gradient_order"] = rng.permutation(len(layers))
    study = Study(
        name=f"simulated ({gradient_truth}, seed {seed})", image_ids=list(images.ids),
        images=images, split=split, truth=truth,
    )
    # the leaked read-outs' own generator: every other draw stays the leak-free study's
    leak_rng = np.random.default_rng([int(seed), _LEAK_STREAM]) if activation_leakage else None
    if fmri:
        _simulate_fmri(study, act, grad, depth, gradient_truth, noise, gradient_weight,
                       n_fmri_repeats, rng, leak_rng)
    if meg:
        _simulate_meg(study, act, grad, depth, gradient_truth, noise, gradient_weight,
                      n_meg_test_repeats, sfreq, rng, leak_rng)
    return study


def _leaky(gradient: np.ndarray, leaked: np.ndarray, leakage: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``√(1−λ)·gradient + √λ·leaked`` standardised column-wise (both unit-variance
    read-outs), with the mean and sd that standardised it."""
    mixed = np.sqrt(1 - leakage) * gradient + np.sqrt(leakage) * leaked
    mean, sd = _zscore_stats(mixed)
    return _apply_zscore(mixed, mean, sd), mean, sd


def _simulate_fmri(study, act, grad, depth, gradient_truth, noise, gradient_weight, n_repeats,
                   rng, leak_rng=None):
    vertices, hemi, hierarchy = [], [], []
    for h in HEMIS:
        verts = posterior_vertices(h)
        vertices.append(verts)
        hemi.append(np.full(len(verts), h))
        hierarchy.append(distance_from(h, v1_seed(h), verts))
    vertices, hemi, hierarchy = map(np.concatenate, (vertices, hemi, hierarchy))
    n_vertices, n_layers = len(vertices), len(depth)

    relative = np.clip(hierarchy / np.quantile(hierarchy, 0.95), 0, 1)
    preferred_depth = np.clip(relative + rng.normal(0, 0.08, n_vertices), 0, 1)
    preferred_layer = np.abs(preferred_depth[:, None] - depth[None, :]).argmin(axis=1)

    if gradient_truth in ("forward", "backprop"):
        gradient_layer = preferred_layer.copy()
    elif gradient_truth in DIVERGENT_TRUTHS:   # backprop's places, in a wrong layer order
        gradient_layer = _wrong_order(study.truth, n_layers)[preferred_layer]
    elif gradient_truth == "paper":   # everywhere, of layers unrelated to the place
        gradient_layer = rng.integers(0, n_layers, n_vertices)
    else:
        gradient_layer = np.full(n_vertices, -1)
    weight = np.where(gradient_layer >= 0, gradient_weight, 0.0)
    if gradient_truth == "paper":     # a share rising along the hierarchy
        weight = weight * (_PAPER_EARLY_SHARE + (1 - _PAPER_EARLY_SHARE) * relative)

    n = study.n_images
    signal_act = np.zeros((n, n_vertices))
    signal_grad = np.zeros((n, n_vertices))
    # the read-outs, recorded: per signal, the weights (flattened, layer by layer) and the
    # mean and sd that scaled each vertex's read-out
    recorded = {s: {"weights": [], "mean": np.zeros(n_vertices), "sd": np.zeros(n_vertices)}
                for s in ("activation", "gradient")}
    for l in range(n_layers):
        for name, chosen, z, out in (("activation", preferred_layer, act, signal_act),
                                     ("gradient", gradient_layer, grad, signal_grad)):
            where = np.flatnonzero(chosen == l)
            if where.size:
                record = []
                out[:, where] = _readout(z[l], where.size, rng, record)
                weights, mean, sd = record[0]
                recorded[name]["weights"].append(weights.ravel())
                recorded[name]["mean"][where], recorded[name]["sd"][where] = mean, sd
    leakage = study.truth["activation_leakage"]
    if leak_rng is not None:
        # a read-out of activation l at the vertices of gradient l, mixed into it
        leak = {"weights": [], "mean": np.zeros(n_vertices), "sd": np.zeros(n_vertices)}
        signal_leak = np.zeros((n, n_vertices))
        for l in range(n_layers):
            where = np.flatnonzero(gradient_layer == l)
            if where.size:
                record = []
                signal_leak[:, where] = _readout(act[l], where.size, leak_rng, record)
                leak["weights"].append(record[0][0].ravel())
                leak["mean"][where], leak["sd"][where] = record[0][1], record[0][2]
        signal_grad, leak_mean, leak_sd = _leaky(signal_grad, signal_leak, leakage)
        study.truth.update({
            "fmri_readout_weights_leak": (np.concatenate(leak["weights"]) if leak["weights"]
                                          else np.zeros(0)),
            "fmri_readout_mean_leak": leak["mean"], "fmri_readout_sd_leak": leak["sd"],
            "fmri_leak_mean": leak_mean, "fmri_leak_sd": leak_sd})
    mixed = np.sqrt(1 - weight) * signal_act + np.sqrt(weight) * signal_grad
    mixed_mean, mixed_sd = _zscore_stats(mixed)
    signal = _apply_zscore(mixed, mixed_mean, mixed_sd)

    sigma = noise * np.exp(rng.uniform(np.log(0.5), np.log(2.5), n_vertices))
    betas = signal[:, None, :] + sigma * rng.standard_normal((n, n_repeats, n_vertices))
    with np.errstate(divide="ignore"):
        ncsnr = np.where(sigma > 0, 1.0 / np.where(sigma > 0, sigma, 1), np.inf)

    study.betas = betas.astype(np.float32)
    study.vertices, study.hemi, study.hierarchy, study.ncsnr = vertices, hemi, hierarchy, ncsnr
    study.truth.update({
        "preferred_layer": preferred_layer, "preferred_depth": preferred_depth,
        "gradient_layer": gradient_layer, "gradient_weight": weight,
        "signal_activation": signal_act.astype(np.float32),
        "signal_gradient": signal_grad.astype(np.float32),
        **{f"fmri_readout_{what}_{name}": (np.concatenate(r["weights"]) if r["weights"]
                                           else np.zeros(0)) if what == "weights" else r[what]
           for name, r in recorded.items() for what in ("weights", "mean", "sd")},
        "fmri_signal_mean": mixed_mean, "fmri_signal_sd": mixed_sd,
    })


def _wrong_order(truth: dict, n_layers: int) -> np.ndarray:
    """Of a divergent truth: ``order[k]`` is the layer whose gradient is expressed where
    (and when) backprop would express the gradient of layer k."""
    if truth["gradient_truth"] == "reversed":
        return np.arange(n_layers)[::-1].copy()
    if truth["gradient_truth"] == "partial":   # right below the middle, reversed above it
        half = n_layers // 2
        return np.concatenate([np.arange(half), np.arange(half, n_layers)[::-1]])
    return np.asarray(truth["gradient_order"])


def _sensor_xy(info) -> np.ndarray:
    """2-D sensor positions in [-1, 1] (x: left → right, y: back → front)."""
    pos = np.array([ch["loc"][:3] for ch in info["chs"]])
    xy = pos[:, :2] / np.abs(pos[:, :2]).max()
    return xy


def _pattern(xy: np.ndarray, centre: np.ndarray, width: float = 0.3) -> np.ndarray:
    """Smooth bump over the sensors, peak 1 at the sensor nearest ``centre``."""
    bump = np.exp(-np.sum((xy - centre) ** 2, axis=1) / (2 * width**2))
    return bump / bump.max()


def _simulate_meg(study, act, grad, depth, gradient_truth, noise, gradient_weight, n_repeats,
                  sfreq, rng, leak_rng=None):
    import mne

    info = ctf_info(sfreq)
    times = np.arange(round(-0.1 * sfreq), round(1.3 * sfreq) + 1) / sfreq
    xy = _sensor_xy(info)
    n_layers, n_components = len(depth), 2

    # Spatial patterns: occipital midline (early layers) → left/right temporal (deep layers).
    patterns = np.array([
        [_pattern(xy, np.array([side * (0.15 + 0.55 * d), -0.85 + 0.7 * d])) for side in (-1, 1)]
        for d in depth
    ])  # (n_layers, n_components, n_channels)
    act_latency = _ACT_LATENCY[0] + (_ACT_LATENCY[1] - _ACT_LATENCY[0]) * depth
    if gradient_truth == "forward":
        grad_latency, grad_patterns = act_latency.copy(), patterns
    elif gradient_truth == "backprop":
        rank = study.truth["backward_rank"] / max(n_layers - 1, 1)  # 0 = produced first
        grad_latency = _BACKPROP_LATENCY[0] + (_BACKPROP_LATENCY[1] - _BACKPROP_LATENCY[0]) * rank
        grad_patterns = patterns
    elif gradient_truth in DIVERGENT_TRUTHS:
        # the gradient of layer order[k] takes backprop's slot of layer k: its pattern
        # and its latency
        rank = study.truth["backward_rank"] / max(n_layers - 1, 1)
        slot = _BACKPROP_LATENCY[0] + (_BACKPROP_LATENCY[1] - _BACKPROP_LATENCY[0]) * rank
        order = _wrong_order(study.truth, n_layers)
        grad_latency, grad_patterns = np.empty(n_layers), np.empty_like(patterns)
        grad_latency[order], grad_patterns[order] = slot, patterns
    elif gradient_truth == "paper":
        grad_latency = rng.permutation(np.linspace(*_PAPER_LATENCY, n_layers))
        grad_patterns = np.repeat(patterns[-1:], n_layers, axis=0)  # high-level sensors only
    else:
        grad_latency, grad_patterns = np.full(n_layers, np.nan), None
    jitter = study.truth.get("latency_jitter", 0.0)
    if jitter and grad_patterns is not None:
        grad_latency = grad_latency + rng.normal(0.0, jitter / 1000, n_layers)

    # basis[l, k] = pattern ⊗ time course; amplitudes come from per-image read-outs
    basis = _meg_basis(patterns, times, act_latency)
    records = {"activation": [], "gradient": []}
    amplitudes = np.stack([_readout(a, n_components, rng, records["activation"])
                           for a in act], axis=1)
    scale_act = np.sqrt(1 - gradient_weight) if grad_patterns is not None else 1.0
    signal = scale_act * np.einsum("ilk,lkct->ict", amplitudes, basis)
    if grad_patterns is not None:
        g_basis = _meg_basis(grad_patterns, times, grad_latency)
        g_amplitudes = np.stack([_readout(g, n_components, rng, records["gradient"])
                                 for g in grad], axis=1)
        if leak_rng is not None:   # each gradient layer's amplitudes mixed with activation's
            records["leak"] = []
            leaked = np.stack([_readout(a, n_components, leak_rng, records["leak"])
                               for a in act], axis=1)
            g_amplitudes, leak_mean, leak_sd = _leaky(
                g_amplitudes.reshape(len(g_amplitudes), -1),
                leaked.reshape(len(leaked), -1), study.truth["activation_leakage"])
            g_amplitudes = g_amplitudes.reshape(leaked.shape)
            study.truth.update({"meg_leak_mean": leak_mean.reshape(n_layers, n_components),
                                "meg_leak_sd": leak_sd.reshape(n_layers, n_components)})
        signal += np.sqrt(gradient_weight) * np.einsum("ilk,lkct->ict", g_amplitudes, g_basis)

    # trials: one per training image, n_repeats per test image, in random order
    image_index = np.concatenate([
        np.flatnonzero(study.split == "train"),
        np.repeat(np.flatnonzero(study.split == "test"), n_repeats),
    ])
    image_index = image_index[rng.permutation(len(image_index))]
    repeat = np.zeros(len(image_index), dtype=int)
    for i in np.unique(image_index):
        where = np.flatnonzero(image_index == i)
        repeat[where] = np.arange(len(where))
    data = _MEG_SIGNAL_T * signal[image_index]
    data += noise * _MEG_NOISE_T * rng.standard_normal(data.shape)
    data = data.astype(np.float32).astype(np.float64)  # single precision, as in -epo.fif files

    metadata = pd.DataFrame({
        "image_id": np.asarray(study.image_ids)[image_index],
        "image_index": image_index,
        "repeat": repeat,
        "split": study.split[image_index],
        "category": np.asarray(study.images.labels)[image_index],
    })
    events = np.column_stack([np.arange(len(image_index)) * 10 * int(sfreq),
                              np.zeros(len(image_index), int), image_index + 1])
    study.epochs = mne.EpochsArray(data, info, events=events, tmin=times[0], metadata=metadata,
                                   event_id={f"image{i}": i + 1 for i in np.unique(image_index)},
                                   baseline=None, verbose="error")
    study.truth.update({
        "activation_latency": 1000 * act_latency,
        "gradient_latency": 1000 * grad_latency,
        "meg_patterns": patterns,
        # what planted_response needs to give the noiseless MEG of any image
        "meg_times_s": times, "meg_activation_latency_s": act_latency,
        "meg_gradient_latency_s": grad_latency,
        "meg_gradient_patterns": (grad_patterns if grad_patterns is not None
                                  else np.zeros((0,) + patterns.shape[1:])),
        "meg_activation_scale": float(scale_act),
        **{f"meg_readout_{what}_{name}": (
            np.concatenate([r[0].ravel() for r in rec] or [np.zeros(0)]) if what == "weights"
            else np.array([r[1 if what == "mean" else 2] for r in rec]).reshape(
                len(rec), n_components))
           for name, rec in records.items() for what in ("weights", "mean", "sd")},
    })


def _meg_basis(patterns: np.ndarray, times: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """Pattern ⊗ Gaussian time course per layer and component, (n_layers, n_components,
    n_channels, n_times); ``times`` and ``latency`` in s."""
    courses = np.exp(-((times[None, :] - latency[:, None]) ** 2) / (2 * _MEG_WIDTH**2))
    return patterns[:, :, :, None] * courses[:, None, None, :]


def describe_truth(study: Study) -> str:
    """The planted truth of a simulated study, in words (Markdown bullet list)."""
    t = study.truth
    if not t:
        return "- This study has no planted truth (real data)."
    latency = np.asarray(t.get("gradient_latency", [np.nan]), dtype=float)
    span = (f"{np.nanmin(latency):.0f}–{np.nanmax(latency):.0f} ms"
            if np.isfinite(latency).any() else "")
    descriptions = {
        "none": "gradients carry **no** brain signal: only activations drive the responses.",
        "forward": ("the gradient of each layer is expressed **where and when** that layer's "
                    "activation is: same vertices, same latency."),
        "backprop": ("what a biological backprop predicts: the gradient of layer *l* is "
                     "expressed in the vertices of activation *l*, but arrives **after** the "
                     "forward sweep and in the measured autograd order, top layer first "
                     f"({span})."),
        "reversed": ("backprop's places and times in the **reverse** order: the gradient "
                     "of layer *l* is expressed where activation *L−1−l* is, after the "
                     f"forward sweep, bottom layer first ({span})."),
        "shuffled": ("backprop's places and times in a **random** layer order: the "
                     "gradient of layer *l* is expressed where and when backprop would "
                     f"put another layer's ({span})."),
        "partial": ("backprop's places and times in a **partly wrong** order: the lower "
                    "half of the layers where and when backprop puts them, the upper half "
                    f"in reverse among themselves ({span})."),
        "paper": ("what the paper reports: gradients are expressed **more in high-level** "
                  f"vertices (a share of the response rising from {_PAPER_EARLY_SHARE:.0%} "
                  "of the gradient weight at V1 to all of it at the top of the hierarchy) "
                  f"and at **late** latencies ({span}), with no relation between a "
                  "gradient's layer and its place or time."),
    }
    lines = [
        f"- Responses were generated from **{t['model']}** ({t['weights']}), "
        f"{len(t['layers'])} layers, with gradients of the `{t['gradient_loss']}` loss.",
        f"- Gradient truth **`{t['gradient_truth']}`**: {descriptions[t['gradient_truth']]}",
    ]
    if study.hierarchy is not None and "preferred_depth" in t:
        r = np.corrcoef(study.hierarchy, t["preferred_depth"])[0, 1]
        lines.append(f"- fMRI: the planted layer depth rises with distance from V1 (r = {r:.2f} "
                     "across vertices).")
    if "activation_latency" in t:
        lines.append(f"- MEG: activation latency rises with depth from "
                     f"{np.min(t['activation_latency']):.0f} to "
                     f"{np.max(t['activation_latency']):.0f} ms.")
    lines.append(f"- Where expressed, gradients carry {t['gradient_weight_setting']:.0%} of the "
                 "planted response variance"
                 + (" at the top of the hierarchy (fMRI), less below it."
                    if t["gradient_truth"] == "paper" else "."))
    if t.get("latency_jitter"):
        lines.append(f"- Each gradient layer's latency is offset by a Gaussian draw of sd "
                     f"{t['latency_jitter']:.0f} ms.")
    if t.get("activation_leakage"):
        lines.append(f"- {t['activation_leakage']:.0%} of each gradient signal's variance is "
                     "a read-out of the same layer's activations (leakage), at the "
                     "gradient's places and times.")
    return "\n".join(lines)


#: Truth keys planted_response reads, per modality.
_PLANTED_KEYS = {
    "fmri": ("feature_mean_activation", "fmri_readout_weights_activation", "fmri_signal_mean"),
    "meg": ("feature_mean_activation", "meg_readout_weights_activation", "meg_times_s"),
}


def _layer_blocks(flat: np.ndarray, dims) -> list[np.ndarray]:
    """Split a concatenation over layers into one block per layer of ``dims`` entries."""
    return np.split(np.asarray(flat), np.cumsum(dims)[:-1])


def _planted_features(study: Study, images, features, net, device, cache, progress):
    """The features planted_response reads out: given (checked) or extracted."""
    t = study.truth
    if features is None:
        if net is None:
            untrained = str(t.get("weights", "")).startswith("random init")
            net = models.load(t["model"], weights=None if untrained else "pretrained")
        if net.name != t["model"]:
            raise ValueError(f"'net' must be the model the study was simulated from "
                             f"({t['model']!r}); got {net.name!r}.")
        if isinstance(images, ImageSet) and len(images) == 0:
            raise ValueError("'images' is empty; give at least one image.")
        features = gf.extract(net, images, losses=(t["gradient_loss"],), pool="mean",
                              device=device, cache=cache, progress=progress)
    if features.model != t["model"] or features.pool != "mean" \
            or t["gradient_loss"] not in features.gradients \
            or list(features.layers) != list(t["layers"]):
        raise ValueError(
            f"'features' must be extracted from {t['model']} with pool='mean', every layer "
            f"and the loss {t['gradient_loss']!r} (what the study was simulated from); got "
            f"{features.model}, pool {features.pool!r}, losses {features.losses}.")
    dims = [features.activations[l].shape[1] for l in features.layers]
    if dims != list(np.asarray(t["feature_dims"])):
        raise ValueError(f"'features' have layer widths {dims}; the study was simulated from "
                         f"widths {list(t['feature_dims'])}. Extract them with the same model.")
    return features


def planted_response(study: Study, images, modality: str = "fmri", *, features=None,
                     net=None, device=None, cache=True, progress: bool = False) -> np.ndarray:
    """The noiseless response a simulated study's planted truth gives to any images.

    The same read-outs, applied exactly as :func:`make_study` applied them to the
    study's own images: each layer's features are standardised with the mean and sd of
    the study's images, read out with the study's random weights, and scaled with the
    study's statistics — so on the study's own images this is the noiseless part of
    its responses, and on images it never showed, the response its simulated brain
    would have given. It depends on the study's seed, not on its noise level.

    Parameters
    ----------
    study : Study
        A simulated study (``make_study`` of this version or later).
    images : ImageSet, sequence of PIL images or float tensor
        Any images (as :func:`gradbrain.features.extract` takes them).
    modality : {"fmri", "meg"}
    features : Features or None
        Features of ``images`` from the study's model (pool ``"mean"``, all layers, its
        gradient loss); extracted when None.
    net : LoadedModel or None
        The study's model, when already loaded (default: loaded from the truth's name
        and weights).
    device, cache, progress
        As :func:`gradbrain.features.extract` takes them.

    Returns
    -------
    ndarray
        fMRI: (n_images, n_vertices), in the units of ``study.betas`` (the planted signal
        has unit variance over the study's images). MEG: (n_images, n_channels,
        n_times), tesla.
    """
    check_in_allowed("modality", modality, ("fmri", "meg"))
    t = study.truth
    if not t:
        raise ValueError(f"Study {study.name!r} has no planted truth (real data): there is no "
                         "planted response to give; score encoders on its test images.")
    missing = [k for k in _PLANTED_KEYS[modality] if k not in t]
    if missing:
        has = "betas" if modality == "fmri" else "epochs"
        if getattr(study, has) is None:
            raise ValueError(f"Study {study.name!r} has no {modality} data ({has} is None).")
        raise ValueError(f"Study {study.name!r} was simulated before its read-outs were "
                         f"recorded (no {missing[0]!r} in its truth); remake it with "
                         "gradbrain.data.simulated.make_study.")
    features = _planted_features(study, images, features, net, device, cache, progress)
    layers, loss = list(features.layers), t["gradient_loss"]
    n_images = features.n_images
    standardised = {}
    for signal, per_layer in (("activation", features.activations),
                              ("gradient", features.gradients[loss])):
        dims = t["feature_dims"] if signal == "activation" else t["gradient_feature_dims"]
        means = _layer_blocks(t[f"feature_mean_{signal}"], dims)
        sds = _layer_blocks(t[f"feature_sd_{signal}"], dims)
        standardised[signal] = [_apply_zscore(per_layer[l], m, s)
                                for l, m, s in zip(layers, means, sds)]
    if modality == "fmri":
        n_vertices = len(t["preferred_layer"])
        out = {}
        leakage = float(t.get("activation_leakage", 0.0))
        for signal, chosen in (("activation", t["preferred_layer"]),
                               ("gradient", t["gradient_layer"]),
                               *((("leak", t["gradient_layer"]),) if leakage else ())):
            flat = np.asarray(t[f"fmri_readout_weights_{signal}"])
            response, start = np.zeros((n_images, n_vertices)), 0
            read = standardised["activation" if signal == "leak" else signal]
            for l, z in enumerate(read):
                where = np.flatnonzero(chosen == l)
                if where.size:
                    weights = flat[start:start + z.shape[1] * where.size].reshape(
                        z.shape[1], where.size)
                    start += weights.size
                    response[:, where] = _apply_zscore(
                        z @ weights, t[f"fmri_readout_mean_{signal}"][where],
                        t[f"fmri_readout_sd_{signal}"][where])
            out[signal] = response
        if leakage:
            mixed = np.sqrt(1 - leakage) * out["gradient"] + np.sqrt(leakage) * out["leak"]
            out["gradient"] = _apply_zscore(mixed, t["fmri_leak_mean"], t["fmri_leak_sd"])
        weight = np.asarray(t["gradient_weight"])
        mixed = np.sqrt(1 - weight) * out["activation"] + np.sqrt(weight) * out["gradient"]
        return _apply_zscore(mixed, t["fmri_signal_mean"], t["fmri_signal_sd"])

    def amplitudes(signal):
        read = standardised["activation" if signal == "leak" else signal]
        flat = np.asarray(t[f"meg_readout_weights_{signal}"])
        n_components = t[f"meg_readout_mean_{signal}"].shape[1]
        blocks = _layer_blocks(flat, [z.shape[1] * n_components for z in read])
        return np.stack([
            _apply_zscore(z @ w.reshape(z.shape[1], n_components),
                          t[f"meg_readout_mean_{signal}"][l], t[f"meg_readout_sd_{signal}"][l])
            for l, (z, w) in enumerate(zip(read, blocks))], axis=1)

    times = np.asarray(t["meg_times_s"])
    basis = _meg_basis(np.asarray(t["meg_patterns"]), times, t["meg_activation_latency_s"])
    signal = t["meg_activation_scale"] * np.einsum("ilk,lkct->ict", amplitudes("activation"),
                                                   basis)
    if len(t["meg_gradient_patterns"]):
        g_basis = _meg_basis(np.asarray(t["meg_gradient_patterns"]), times,
                             t["meg_gradient_latency_s"])
        gradient = amplitudes("gradient")
        leakage = float(t.get("activation_leakage", 0.0))
        if leakage:
            mixed = np.sqrt(1 - leakage) * gradient + np.sqrt(leakage) * amplitudes("leak")
            gradient = _apply_zscore(mixed, t["meg_leak_mean"], t["meg_leak_sd"])
        signal += np.sqrt(t["gradient_weight_setting"]) * np.einsum(
            "ilk,lkct->ict", gradient, g_basis)
    return _MEG_SIGNAL_T * signal
