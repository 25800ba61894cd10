"""The backprop tests of one study: encode its responses from the features, then judge the
spatial and temporal predictions (:func:`backprop_tests`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .. import models
from .._utils import check_in_allowed, signal_name
from ..features import beyond_activations, extract, resolve_loss
from .encoding import Encoding, EncodingSpec, check_encoding, fmri_encoding, meg_encoding
from ..hierarchy.inference import (_both_correlations, _both_profile_correlations, _no_correlation,
                                   above_chance, bootstrap_spatial_score, layer_permutation_test,
                                   profile_permutation_test, spatial_score)
from ..hierarchy.result import HierarchyResult
from ..hierarchy.scores import (GRADIENT_PARTS, MIN_TIMED_LAYERS, SELECTIONS, SPATIAL_STATISTICS,
                                _n_timed, chosen_layers, hierarchy_units, temporal_score,
                                unit_best_layer, unit_coordinates)
from ..hierarchy.verdicts import ESTIMATES, _spearman, _timing_gap, _verdicts
from ..stats import _bootstrap_ci, check_level, equivalence

__all__ = ["backprop_tests"]


def backprop_tests(study, features=None, *, loss: str | None = None, alpha: float = 0.05,
                   min_noise_ceiling: float = 10.0, min_score: float = 0.1, n_units: int = 20,
                   n_perm: int = 10_000, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                   cv: int = 5, device=None, fmri: Encoding | None = None,
                   meg: Encoding | None = None, meg_study=None, meg_features=None,
                   gradient_part: str = "whole", n_perm_chance: int = 1000,
                   margins: dict | None = None, select_on: str = "train",
                   spatial_statistic: str = "centre", progress: bool = False,
                   activations_from: HierarchyResult | None = None,
                   cache=None) -> HierarchyResult:
    """Test whether a study's gradient signals follow the brain's hierarchies like backprop.

    Predictions (each with its null; all one-sided at ``alpha``):

    1. **spatial** — (a) the gradient layer map agrees with the activation one
       (Spearman across units, vs shuffled gradient layer depths) and (b) the gradient
       spatial score is positive (vs shuffled depths). Units are ``n_units`` equal-count
       bins of the hierarchy coordinate over reliable vertices
       (:func:`hierarchy_units`), so neighbouring vertices are not counted as
       independent and the bootstrap interval is not biased by per-vertex argmax noise.
       A unit's layer is read from its usable vertices' mean test r per layer
       (:func:`unit_best_layer`): by default the centre of mass of the depths over that
       whole profile (``spatial_statistic="centre"``, :func:`profile_centre`), or its
       argmax (``"best"``, Raugel et al.'s best layer);
    2. **temporal** — (a) gradients arrive after the forward sweep: median gradient
       latency minus the latest activation latency, bootstrap CI above 0; (b) in the
       measured autograd order: gradient latency rises with backward rank (Spearman,
       vs shuffled layers), i.e. a negative temporal score;
    3. **where** (the paper's positive finding, not a backprop prediction) — (a)
       gradients gain on activations more in high-level than in early cortex (top vs
       bottom quarter of the units, Mann–Whitney on the units' mean gradient minus
       activation peak score) and (b) gradients peak later than activations (median
       latency difference, bootstrap CI above 0).

    With ``gradient_part="unique"`` every test runs on the gradients' unique part: each
    layer's gradient features with what a ridge read-out of all activation layers
    predicts of them removed (:func:`gradbrain.features.beyond_activations`, fitted on
    each study's training images). Gradients share much of their image information with
    activations, so on the whole gradients a brain signal carried by activations alone
    can pass tests meant for gradients. The unique part is a description, not a cure:
    with fewer training images than activation features the read-out is regularised and
    leaves activation information in the residuals, and on EfficientNet-Lite0's features
    its tests were measured *less* specific than the whole gradients' (book, Methods).
    Judge verdicts against model-based nulls (:meth:`HierarchyResult.calibrate`).

    A prediction whose modality is missing (no fMRI, or no MEG) does not hold; the
    summary says it was not tested. Real data come in two studies (NSD fMRI, THINGS-MEG,
    on different images): give the MEG one as ``meg_study`` with its features.

    Parameters
    ----------
    study : Study
        fMRI (``betas``, ``hierarchy``, ``ncsnr``) and/or MEG (``epochs``).
    features : Features or None
        Extracted on ``study.images``; None (simulated studies only) re-extracts the
        features of the model and loss that generated the study.
    loss : str or None
        Gradient signal to test; default the first loss of ``features``.
    min_noise_ceiling, min_score : float
        Vertices enter the spatial tests if NC ≥ ``min_noise_ceiling`` (%) and the
        signal's peak score (r / √NC, at the layer chosen as ``select_on`` says) >
        ``min_score``.
    select_on : {"train", "test"}
        Where the choices made before testing are made: which vertices a signal
        predicts (the ``min_score`` mask) and each vertex's best layer, at which its
        score (``best[signal]["peak"]``, the gains of prediction 3a) is read on the test
        images. ``"train"`` (default) chooses on the training images' out-of-fold scores
        (``cv_r2`` of :func:`gradbrain.analysis.encoding.fmri_encoding`, as a correlation √R² over
        √NC, a lower bound of the out-of-fold r), so the test set is not used both to
        choose and to measure: a peak over layers chosen on the test set is biased up by
        the noise of the layers' scores. ``"test"`` chooses on the test scores (before
        version 3 of the simulated tables). Either way the units' layer profiles (and
        their centres or best layers) of the spatial scores are a test-set measurement,
        resampled by their bootstrap and permuted by their null.
    n_units : int
        Bins of the hierarchy coordinate the spatial tests count as observations.
    n_perm, n_boot, ci, seed : int, int, float, int
        Permutations, bootstrap resamples, interval coverage and seed.
    fmri, meg : Encoding or None
        Precomputed encodings (:func:`~gradbrain.analysis.encoding.fmri_encoding`,
        :func:`~gradbrain.analysis.encoding.meg_encoding`), to skip refitting. Each is
        refused, before any work, unless it was fitted on these features (model,
        weights, pooling, layers, images, the loss tested) and on this
        ``gradient_part`` (:func:`~gradbrain.analysis.encoding.check_encoding`).
    meg_study, meg_features : Study and Features, or None
        A separate MEG study (e.g. THINGS-MEG next to NSD) and the same model's features
        on its images; by default ``study``'s own MEG.
    gradient_part : {"whole", "unique"}
        Test the gradient features as extracted, or their part beyond activations.
        Precomputed ``fmri``/``meg`` results must have been computed on the same part.
    n_perm_chance : int
        Shuffles of the test images for the above-chance tests of each signal (per
        reliable vertex and unit, :func:`above_chance`; per MEG time point, those of
        :func:`gradbrain.analysis.encoding.meg_encoding`); 0 skips them (``above_chance`` is None).
        They describe; they do not enter the verdicts.
    spatial_statistic : {"centre", "best"}
        A unit's layer in the spatial tests, their bootstrap and the spatial estimate:
        the centre of mass of its whole layer profile (default) or its best layer. On
        EfficientNet-Lite0's features the centre separates a planted backprop from the
        null truths better (book, Validation: "Which spatial statistic").
    margins : dict or None
        Equivalence margins of the estimates (:data:`ESTIMATES`: ``"spatial"`` and
        ``"temporal"``, in Spearman ρ, default 0.3; ``"timing"``, in ms, default None:
        no equivalence test); keys left out keep their default.
    activations_from : HierarchyResult or None
        A run on the same study and features whose activation encodings this one reuses
        instead of refitting them (e.g. the other ``gradient_part``: activations are the
        same in both). Refused, naming the difference, unless it was fitted on the same
        model, weights, pooling, layers and images with the same ``cv``, ``n_boot``,
        ``ci`` and ``seed`` (and kept the test predictions when this run needs them).
    cache : bool, path-like or None
        Keep the encodings this run fits on disk and reuse kept ones (see
        :func:`~gradbrain.analysis.encoding.fmri_encoding`; True:
        ``$GRADBRAIN_DATA/encodings``); None: no cache.

    Returns
    -------
    HierarchyResult
    """
    check_level("alpha", alpha)
    check_level("ci", ci)
    for name, value, low in (("n_perm", n_perm, 1), ("n_boot", n_boot, 0),
                             ("n_perm_chance", n_perm_chance, 0), ("seed", seed, 0),
                             ("n_units", n_units, 3)):   # 3: the fewest a rank test can order
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"'{name}' must be an integer >= {low}; got {value!r}.")
    if isinstance(min_noise_ceiling, bool) or not isinstance(
            min_noise_ceiling, (int, float, np.floating)) or not 0 <= min_noise_ceiling < 100:
        raise ValueError(f"'min_noise_ceiling' must be a noise ceiling in percent, in [0, 100), "
                         f"e.g. min_noise_ceiling=10; got {min_noise_ceiling!r}.")
    if features is None:
        if not study.truth:
            raise ValueError("'features' are needed for real data: extract them with "
                             "gradbrain.features.extract(model, study.images).")
        untrained = str(study.truth.get("weights", "")).startswith("random init")
        loaded = models.load(study.truth["model"], weights=None if untrained else "pretrained")
        features = extract(loaded, study.images, losses=(study.truth["gradient_loss"],),
                           pool="mean", device=device, progress=progress)
    loss = resolve_loss(features, loss)
    check_in_allowed("gradient_part", gradient_part, GRADIENT_PARTS)
    check_in_allowed("select_on", select_on, SELECTIONS)
    check_in_allowed("spatial_statistic", spatial_statistic, SPATIAL_STATISTICS)
    margins = dict(margins or {})
    unknown = set(margins) - set(ESTIMATES)
    if unknown:
        raise ValueError(f"'margins' keys must be among {sorted(ESTIMATES)}; got "
                         f"{sorted(unknown)}.")
    margins = {key: margins.get(key, default) for key, (_, _, default) in ESTIMATES.items()}
    if meg_study is not None and (meg_features is None or list(meg_features.layers) != list(
            features.layers) or loss not in meg_features.losses):
        raise ValueError("'meg_features' must be the same model's features (same layers, "
                         f"with the {loss!r} loss) extracted on meg_study.images.")
    if fmri is not None:   # refused before any work if fitted on something else
        check_encoding(fmri, name="fmri", modality="fmri", features=features, loss=loss,
                       part=gradient_part)
    if meg is not None:
        check_encoding(meg, name="meg", modality="meg", loss=loss, part=gradient_part,
                       features=meg_features if meg_study is not None else features)
    if gradient_part == "unique":
        if study.betas is not None or meg_study is None:
            features = beyond_activations(features, study.split == "train", loss=loss,
                                          cv=cv, device=device)
        if meg_study is not None:
            meg_features = beyond_activations(meg_features, meg_study.split == "train",
                                              loss=loss, cv=cv, device=device)
    signal = signal_name(loss)
    settings = {"cv": cv, "n_boot": n_boot, "ci": ci, "seed": seed,
                "predictions": n_boot > 0 or n_perm_chance > 0}
    reused = _reusable_activations(activations_from, settings, {
        "fmri": features if study.betas is not None and fmri is None else None,
        "meg": (meg_features if meg_study is not None else features) if meg is None else None})
    depth = np.asarray(features.depth, float)
    n_layers = len(depth)
    kw = dict(n_perm=n_perm, seed=seed, device=device)
    scores, tests = [], []

    def add_test(prediction, part, statistic, value, holds, null, p=np.nan, low=np.nan,
                 high=np.nan, min_p=np.nan):
        tests.append({"prediction": prediction, "part": part, "statistic": statistic,
                      "value": value, "p_value": p, "min_p": min_p,
                      "can_reach_alpha": not (min_p >= alpha), "ci_low": low,
                      "ci_high": high, "null": null, "holds": bool(holds)})

    best, reliable, usable, chance, chance_maps = {}, None, {}, [], {}
    spatial_boot, estimates = {}, []

    def add_estimate(key, value, samples):
        name, unit, _ = ESTIMATES[key]
        estimates.append({"estimate": name, "unit": unit, "backprop_predicts": 0.0,
                          "margin": np.nan if margins[key] is None else float(margins[key]),
                          **equivalence(value, samples, margin=margins[key], alpha=alpha,
                                        ci=ci)})
    if study.betas is not None:
        if fmri is None:
            fmri = fmri_encoding(study, features, cv=cv, device=device, progress=progress,
                                 return_prediction=n_boot > 0 or n_perm_chance > 0,
                                 only=[signal] if "fmri" in reused else None, cache=cache)
            if "fmri" in reused:
                fmri = Encoding({"activation": reused["fmri"], **fmri}, fmri.spec)
        nc = study.noise_ceiling()
        best = {name: chosen_layers(out, depth, nc, select_on=select_on)
                for name, out in fmri.items()}
        reliable = nc >= min_noise_ceiling
        usable = {name: reliable & (b["chosen_score"] > min_score) for name, b in best.items()}
        units = hierarchy_units(study.hierarchy, reliable, n_units)
        coordinate = unit_coordinates(study.hierarchy, units) if units.max() >= 0 else \
            np.zeros(0)
        unit_best = {name: unit_best_layer(fmri[name]["r"], units, depth, mask=usable[name])
                     for name in ("activation", signal)} if len(coordinate) else {}
        for name in ("activation", signal):
            if n_perm_chance and "prediction" in fmri[name] and reliable.any():
                out = fmri[name]
                vertices = above_chance(out["y_test"][:, reliable],
                                        out["prediction"][:, :, reliable],
                                        n_perm=n_perm_chance, seed=seed, alpha=alpha,
                                        device=device)
                for key in ("r", "p_value", "q_value", "best_layer", "significant"):
                    full = np.full(len(reliable), False if key == "significant" else np.nan)
                    full[reliable] = vertices[key]
                    vertices[key] = full
                chance_maps[name] = {"vertices": vertices, "units": above_chance(
                    out["y_test"], out["prediction"], units=units, n_perm=n_perm_chance,
                    seed=seed, alpha=alpha, device=device)}
                for level, res in (("reliable vertices", vertices),
                                   ("units", chance_maps[name]["units"])):
                    chance.append({"modality": "fMRI", "signal": name, "level": level,
                                   "n_tested": res["n_tested"],
                                   "n_significant": int(res["significant"].sum()),
                                   "best_r": float(np.nanmax(res["r"], initial=np.nan)),
                                   "min_p": res["min_p"]})
        centres = spatial_statistic == "centre"
        label = f"Spearman ρ ({'profile centres' if centres else 'best layers'})"
        of_units = "units, whole profiles" if centres else "units"

        def varied(name, where):
            """At least 3 units in ``where``, not all at one layer (or one centre)."""
            value = unit_best[name]["centre" if centres else "index"]
            where = where & np.isfinite(value)
            return where.sum() >= 3 and np.ptp(value[where]) > 0

        for name in ("activation", signal):
            present = unit_best[name]["present"] if unit_best else np.zeros(0, bool)
            if not unit_best or not varied(name, present):
                s = _no_correlation(present.sum())  # too few units, or one layer everywhere
            elif centres:
                s = _both_profile_correlations(unit_best[name]["profile"], coordinate, depth,
                                               mask=present, n_perm=n_perm, seed=seed)
            else:
                s = spatial_score(unit_best[name]["index"], coordinate, depth, mask=present,
                                  **kw)
            low = high = np.nan
            if n_boot > 0 and "prediction" in fmri[name] and present.sum() >= 3:
                boot = bootstrap_spatial_score(
                    fmri[name]["prediction"], fmri[name]["y_test"], study.hierarchy, depth,
                    mask=usable[name], units=units, n_boot=n_boot, ci=ci, seed=seed,
                    statistic=spatial_statistic, device=device)
                low, high = boot["spearman_ci"]
                spatial_boot[name] = boot["samples"]
            scores.append({"modality": "fMRI", "signal": name, "score": "spatial", **s,
                           "spearman_ci_low": low, "spearman_ci_high": high})
        both = (unit_best[signal]["present"] & unit_best["activation"]["present"]
                if unit_best else np.zeros(0, bool))
        if both.sum() >= 3 and varied(signal, both) and varied("activation", both):
            if centres:
                agree = profile_permutation_test(unit_best[signal]["profile"],
                                                 unit_best["activation"]["centre"], depth,
                                                 mask=both, n_perm=n_perm, seed=seed)
            else:
                agree = layer_permutation_test(unit_best[signal]["index"],
                                               unit_best["activation"]["depth"], depth,
                                               mask=both, **kw)
            add_test("1 spatial", "gradient and activation layer maps agree", label,
                     agree["statistic"], agree["p_value"] < alpha,
                     f"shuffled gradient layers ({of_units})", p=agree["p_value"],
                     min_p=agree["min_p"])
        else:
            add_test("1 spatial", "gradient and activation layer maps agree", "Spearman ρ",
                     np.nan, False, f"fewer than 3 units, or one layer in all ({both.sum()})")
        grad_spatial = scores[-1]
        if len(spatial_boot) == 2:   # paired: the same image resamples for both signals
            with np.errstate(invalid="ignore"):
                add_estimate("spatial", grad_spatial["spearman"] - scores[-2]["spearman"],
                             spatial_boot[signal] - spatial_boot["activation"])
        elif n_boot == 0:   # the contrast without an interval (what calibrations need)
            add_estimate("spatial", grad_spatial["spearman"] - scores[-2]["spearman"], [])
        add_test("1 spatial", "gradient spatial score > 0", label,
                 grad_spatial["spearman"], grad_spatial["p_spearman"] < alpha,
                 f"shuffled layer depths ({of_units})", p=grad_spatial["p_spearman"],
                 min_p=grad_spatial["min_p_spearman"])
        # gain of gradients over activations per unit; top vs bottom quarter of the units
        gain = best[signal]["peak"] - best["activation"]["peak"]
        n_found = len(coordinate)
        unit_gain = np.array([gain[units == u].mean() for u in range(n_found)])
        quarter = n_found // 4
        if quarter >= 3:
            high, early = unit_gain[-quarter:], unit_gain[:quarter]
            test = stats.mannwhitneyu(high, early, alternative="greater")
            add_test("3 where", "gradients gain more in high-level than early cortex",
                     "median gain, high − early", float(np.median(high) - np.median(early)),
                     test.pvalue < alpha, f"Mann–Whitney U, {quarter} vs {quarter} units",
                     p=float(test.pvalue), min_p=1 / math.comb(2 * quarter, quarter))
    else:
        for prediction, part in (("1 spatial", "fMRI data"), ("3 where", "fMRI data")):
            add_test(prediction, part, "available", np.nan, False, "no fMRI in this study")

    if meg_study is None:
        meg_study, meg_features = study, features
    if meg_study.epochs is not None:
        if meg is None:
            meg = meg_encoding(meg_study, meg_features, cv=cv, n_boot=n_boot, ci=ci, seed=seed,
                               device=device, progress=progress,
                               only=[signal] if "meg" in reused else None, cache=cache)
            if "meg" in reused:
                meg = Encoding({"activation": reused["meg"], **meg}, meg.spec)
        act, grad = meg["activation"], meg[signal]
        for name in ("activation", signal) if n_perm_chance and "p_time" in act else ():
            res, times = meg[name], meg[name]["times"]
            found = times[res["significant_time"]]
            chance.append({"modality": "MEG", "signal": name, "level": "time points",
                           "n_tested": len(times),
                           "n_significant": int(res["significant_time"].sum()),
                           "best_r": float(np.max(res["best_curve"])),
                           "min_p": 1 / (1 + res["n_perm"]),
                           "first_ms": found.min() if len(found) else np.nan,
                           "last_ms": found.max() if len(found) else np.nan})
        layers = np.arange(n_layers)
        for name, res in (("activation", act), (signal, grad)):
            timed = _n_timed(res["latency"]) >= MIN_TIMED_LAYERS
            row = {"modality": "MEG", "signal": name, "score": "temporal",
                   **(_both_correlations(layers, res["latency"], depth,
                                         alternative="two-sided", **kw)
                      if timed else _no_correlation(_n_timed(res["latency"])))}
            boot = res.get("boot_latency")
            row["spearman_ci_low"], row["spearman_ci_high"] = (
                temporal_score(res["latency"], res["depth"], boot_latency=boot, ci=ci)
                ["spearman_ci"] if boot is not None and timed else (np.nan, np.nan))
            scores.append(row)

        def latency_gap(prediction, part, statistic, summarize_activation):
            """Median gradient latency minus a summary of the activation latencies: > 0?"""
            with warnings.catch_warnings():  # a resample without latencies gives NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                samples = (np.nanmedian(grad["boot_latency"], 1)
                           - summarize_activation(act["boot_latency"], axis=1))
                value = np.nanmedian(grad["latency"]) - summarize_activation(act["latency"])
            low, high = _bootstrap_ci(samples, ci)
            add_test(prediction, part, statistic, float(value), low > 0,
                     "bootstrap over test images", low=low, high=high)

        latency_gap("2 temporal", "gradients after the forward sweep",
                    "median gradient − latest activation latency (ms)", np.nanmax)
        rank = features.backward_rank(loss).astype(float)
        if _n_timed(grad["latency"]) >= MIN_TIMED_LAYERS:
            order = layer_permutation_test(layers, grad["latency"], rank, **kw)
            add_test("2 temporal", "gradient latency follows the autograd order",
                     "Spearman ρ (latency, backward rank)", order["statistic"],
                     order["p_value"] < alpha, "shuffled layers", p=order["p_value"],
                     min_p=order["min_p"])
        else:
            add_test("2 temporal", "gradient latency follows the autograd order",
                     "Spearman ρ (latency, backward rank)", np.nan, False,
                     f"fewer than {MIN_TIMED_LAYERS} layers with a significant peak "
                     f"({_n_timed(grad['latency'])})")
        latency_gap("3 where", "gradients peak later than activations",
                    "median latency difference (ms)", np.nanmedian)
        boots = grad.get("boot_latency", ())
        if len(boots) or n_boot == 0:
            # paired: both signals' courses were resampled on the same test images (no
            # resamples with n_boot 0: the contrasts without intervals, as calibrations
            # need them)
            pairs = list(zip(boots, act.get("boot_latency", ())))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                add_estimate("temporal", _spearman(rank, grad["latency"])
                             - _spearman(depth, act["latency"]),
                             [_spearman(rank, g) - _spearman(depth, a) for g, a in pairs])
                add_estimate("timing", _timing_gap(grad["latency"], act["latency"], rank),
                             [_timing_gap(g, a, rank) for g, a in pairs])
    else:
        for prediction, part in (("2 temporal", "MEG data"), ("3 where", "MEG data")):
            add_test(prediction, part, "available", np.nan, False, "no MEG in this study")

    tests = pd.DataFrame(tests)
    predictions, consistent, paper = _verdicts(tests)
    if chance:
        chance = pd.DataFrame(chance)
        chance.insert(5, "share", chance.n_significant / chance.n_tested.clip(lower=1))
    return HierarchyResult(
        scores=pd.DataFrame(scores), tests=tests, predictions=predictions,
        consistent_with_backprop=consistent, paper_finding=paper, alpha=alpha, signal=signal,
        fmri=fmri, meg=meg,
        best=best, reliable=reliable, masks=usable, loss=loss, ci=ci,
        units=units if study.betas is not None else None,
        unit_best=unit_best if study.betas is not None else {},
        gradient_part=gradient_part, spatial_statistic=spatial_statistic,
        above_chance=chance if len(chance) else None,
        chance_maps=chance_maps, estimates=pd.DataFrame(estimates), settings=settings,
    )


def _reusable_activations(previous: HierarchyResult | None, settings: dict,
                          wanted: dict) -> dict:
    """The activation encodings of ``previous`` that a run with ``settings`` on the
    features in ``wanted`` (modality → features, None: not fitted here) can use as its
    own; refused with the differences named."""
    if previous is None:
        return {}
    if not isinstance(previous, HierarchyResult):
        raise TypeError(f"'activations_from' must be a HierarchyResult (of backprop_tests); "
                        f"got {type(previous).__name__}.")
    problems = [f"{key}: {previous.settings.get(key)!r} there, {value!r} here"
                for key, value in settings.items() if key != "predictions"
                and previous.settings.get(key) != value]
    if settings["predictions"] and not previous.settings.get("predictions"):
        problems.append("test predictions: not kept there, needed here")
    out = {}
    for modality, features in wanted.items():
        encoding = getattr(previous, modality)
        if features is None or encoding is None:
            continue
        spec = EncodingSpec.of(modality, features)
        differ = [d for d in encoding.spec.differences(spec, loss=features.losses[0])
                  if not d.startswith(("gradient part", "losses"))]
        problems += [f"{modality} {d}" for d in differ]
        out[modality] = encoding["activation"]
    if problems:
        raise ValueError("'activations_from' was not run on what this run is asked, so its "
                         "activation encodings cannot be reused: " + "; ".join(problems)
                         + ". Pass activations_from=None to fit them here.")
    return out
