"""Layer-to-brain summaries: best layers, hierarchy units and regions, layer profiles and
their centres, and the spatial and temporal scores of Raugel et al. (2025).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .._utils import check_in_allowed
from ..stats import check_level


#: What :func:`backprop_tests` tests of the gradients: as
#: extracted, or beyond activations.
GRADIENT_PARTS = ("whole", "unique")


#: Where :func:`backprop_tests` chooses which vertices enter and each vertex's best layer.
SELECTIONS = ("train", "test")


#: What a unit's layer is in :func:`backprop_tests`'s spatial tests: the centre of mass of its
#: whole layer profile (:func:`profile_centre`), or its best layer (argmax).
SPATIAL_STATISTICS = ("centre", "best")


def best_layer(scores: np.ndarray, depth: np.ndarray) -> dict:
    """Best-predicting layer of every target.

    Parameters
    ----------
    scores : ndarray of shape (n_layers, n_targets)
        Encoding score of each layer (e.g. NC-normalised r).
    depth : ndarray of shape (n_layers,)
        Relative layer depth in [0, 1].

    Returns
    -------
    dict with ``index`` (n_targets,) int, ``depth`` (n_targets,) in [0, 1] and
    ``peak`` (n_targets,) the best score; a target without a finite score gets NaN depth
    and peak (its ``index`` is 0 and means nothing).
    """
    scores = np.asarray(scores, dtype=float)
    depth = np.asarray(depth, dtype=float)
    if scores.ndim != 2 or scores.shape[0] != len(depth):
        raise ValueError(
            f"'scores' must have shape (n_layers={len(depth)}, n_targets); got {scores.shape}."
        )
    filled = np.where(np.isfinite(scores), scores, -np.inf)
    index = filled.argmax(0)
    scored = np.isfinite(scores).any(0)   # a target no layer scores has no best layer
    return {"index": index, "depth": np.where(scored, depth[index], np.nan),
            "peak": np.where(scored, scores[index, np.arange(scores.shape[1])], np.nan)}


def hierarchy_regions(coordinate: np.ndarray, n_regions: int = 4) -> np.ndarray:
    """Split targets into ``n_regions`` equal-count bins of the hierarchy coordinate.

    Returns
    -------
    ndarray of str, shape (n_targets,): ``"1 (early)"`` … ``"n (high-level)"``.
    """
    if isinstance(n_regions, bool) or not isinstance(n_regions, (int, np.integer)) \
            or n_regions < 1:
        raise ValueError(f"'n_regions' must be a positive integer (bins of the hierarchy "
                         f"coordinate), e.g. n_regions=4; got {n_regions!r}.")
    coordinate = np.asarray(coordinate, dtype=float)
    edges = np.quantile(coordinate, np.linspace(0, 1, n_regions + 1)[1:-1])
    index = np.searchsorted(edges, coordinate, side="right")
    names = [f"{i + 1}" for i in range(n_regions)]
    names[0] += " (early)"
    names[-1] += " (high-level)"
    return np.asarray(names)[index]


def hierarchy_units(coordinate: np.ndarray, mask: np.ndarray | None = None,
                    n_units: int = 20) -> np.ndarray:
    """Equal-count bins of the hierarchy coordinate: the units of the spatial tests.

    Neighbouring vertices share noise and signal, so tests that count vertices as
    independent observations are anticonservative, and a vertex's best layer is a noisy
    argmax that a bootstrap over images pushes further from the truth. Averaging the
    vertices of a bin before taking its best layer removes both problems.

    Parameters
    ----------
    coordinate : ndarray of shape (n_targets,)
        Hierarchy coordinate (distance from V1, mm).
    mask : ndarray of bool, shape (n_targets,), or None
        Targets that get a unit (e.g. reliable vertices); the others get -1.
    n_units : int
        Number of bins (fewer when the mask keeps fewer targets).

    Returns
    -------
    ndarray of int, shape (n_targets,): unit 0 … n_units - 1 in order of the coordinate,
    or -1.
    """
    coordinate = np.asarray(coordinate, dtype=float)
    mask = np.isfinite(coordinate) if mask is None else np.asarray(mask, bool) & \
        np.isfinite(coordinate)
    units = np.full(len(coordinate), -1)
    n = int(min(n_units, mask.sum()))
    if n < 1:
        return units
    order = np.flatnonzero(mask)[np.argsort(coordinate[mask], kind="stable")]
    units[order] = np.arange(len(order)) * n // len(order)
    return units


def unit_coordinates(coordinate: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Median coordinate of each unit's targets, shape (n_units,)."""
    coordinate, units = np.asarray(coordinate, float), np.asarray(units)
    return np.array([np.median(coordinate[units == u]) for u in range(units.max() + 1)])


def cv_correlation(cv_r2) -> np.ndarray:
    """Out-of-fold R² as a correlation: sign(R²)·√|R²|.

    A prediction's R² is at most its squared correlation with the data (the R² of its
    best linear rescaling), so √R² is a lower bound of the out-of-fold r where R² > 0;
    below 0 the sign keeps "worse than the mean" below 0.

    Parameters
    ----------
    cv_r2 : array-like
        Out-of-fold R² (e.g. ``cv_r2`` of :func:`gradbrain.ridge.layerwise_scores`).

    Returns
    -------
    ndarray of the same shape
    """
    cv_r2 = np.asarray(cv_r2, dtype=float)
    return np.sign(cv_r2) * np.sqrt(np.abs(cv_r2))


def chosen_layers(encoding: dict, depth: np.ndarray, noise_ceiling, *,
                  select_on: str = "train") -> dict:
    """Each target's best layer, chosen on training CV (or the test set) and scored on test.

    Parameters
    ----------
    encoding : dict
        One signal of :func:`gradbrain.analysis.encoding.fmri_encoding`: ``r_nc`` and
        ``cv_r2``, each of shape (n_layers, n_targets).
    depth : ndarray of shape (n_layers,)
    noise_ceiling : ndarray of shape (n_targets,)
        NC in percent; the training scores are normalised by it as the test ones are.
    select_on : {"train", "test"}
        Choose on the training images' out-of-fold score (:func:`cv_correlation` of
        ``cv_r2`` over √NC) or on the test score ``r_nc``.

    Returns
    -------
    dict with ``index`` (n_targets,) int, ``depth`` (n_targets,), ``chosen_score``
    (n_targets,) the score the choice was made on, at the chosen layer (r / √NC), and
    ``peak`` (n_targets,) the test ``r_nc`` at the chosen layer — not biased by the
    choice when it was made on training CV.
    """
    check_in_allowed("select_on", select_on, SELECTIONS)
    r_nc = np.asarray(encoding["r_nc"], dtype=float)
    if select_on == "train":
        if "cv_r2" not in encoding:
            raise ValueError("These encoding results have no training-CV scores ('cv_r2'; "
                             "results from an older gradbrain): recompute them with "
                             "gradbrain.analysis.encoding.fmri_encoding, or pass select_on='test'.")
        nc = np.asarray(noise_ceiling, dtype=float) / 100
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(nc > 0, cv_correlation(encoding["cv_r2"]) / np.sqrt(nc), np.nan)
    else:
        score = r_nc
    chosen = best_layer(score, depth)
    columns = np.arange(r_nc.shape[1])
    return {"index": chosen["index"], "depth": chosen["depth"],
            "chosen_score": chosen["peak"], "peak": r_nc[chosen["index"], columns]}


def unit_best_layer(scores: np.ndarray, units: np.ndarray, depth: np.ndarray, *,
                    mask: np.ndarray | None = None) -> dict:
    """Best layer of every unit, from its targets' scores averaged per layer.

    Parameters
    ----------
    scores : ndarray of shape (n_layers, n_targets)
        Encoding score per layer and target (test-set r).
    units : ndarray of int, shape (n_targets,)
        From :func:`hierarchy_units` (-1: no unit).
    mask : ndarray of bool, shape (n_targets,), or None
        Targets whose scores enter the averages.

    Returns
    -------
    dict with ``index`` and ``depth`` (n_units,), ``profile`` (n_layers, n_units) the
    averaged scores and ``present`` (n_units,) bool: units with at least one target.
    """
    scores, units = np.asarray(scores, float), np.asarray(units)
    depth = np.asarray(depth, float)
    keep = units >= 0 if mask is None else (units >= 0) & np.asarray(mask, bool)
    n_units = int(units.max()) + 1
    total = np.zeros((len(depth), n_units))
    count = np.bincount(units[keep], minlength=n_units).astype(float)
    for layer in range(len(depth)):
        total[layer] = np.bincount(units[keep], weights=np.nan_to_num(scores[layer, keep]),
                                   minlength=n_units)
    with np.errstate(invalid="ignore", divide="ignore"):
        profile = total / count
    present = count > 0
    index = np.where(present, np.nan_to_num(profile, nan=-np.inf).argmax(0), 0)
    centre = profile_centre(profile, depth)   # units without targets: NaN (0/0 profile)
    return {"index": index, "depth": depth[index], "centre": centre, "profile": profile,
            "present": present}


def profile_centre(profile, values) -> np.ndarray:
    """Centre of mass of a per-layer value, weighted by each target's whole layer profile.

    The weight of layer ``l`` for a target is its score above the target's lowest layer,
    ``profile[l] − min(profile)``; the centre is the weighted mean of ``values`` (e.g.
    depth). Unlike the argmax of :func:`unit_best_layer`, it moves smoothly with the
    whole profile, so two neighbouring layers that predict almost equally well do not
    flip it from one to the other.

    Parameters
    ----------
    profile : ndarray of shape (n_layers, n_targets)
        Score of every layer for every target (e.g. mean test r of a unit's vertices).
        NaN scores get weight 0.
    values : ndarray of shape (n_layers,)
        Value of each layer (relative depth in [0, 1], backward rank, …).

    Returns
    -------
    ndarray of shape (n_targets,)
        In the unit of ``values``; NaN for a target whose profile is flat or all NaN.
    """
    profile = np.asarray(profile, dtype=float)
    values = np.asarray(values, dtype=float)
    if profile.ndim != 2 or values.shape != profile.shape[:1]:
        raise ValueError(f"'profile' must be (n_layers, n_targets) and 'values' (n_layers,); "
                         f"got {profile.shape} and {values.shape}.")
    weights = _profile_weights(profile)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values @ weights) / weights.sum(0)


def _profile_weights(profile: np.ndarray) -> np.ndarray:
    """Each column's scores above its lowest finite score (NaN → 0), shape kept."""
    finite = np.isfinite(profile)
    low = np.min(np.where(finite, profile, np.inf), axis=0)
    return np.where(finite, profile - low, 0.0)


def layer_profiles(scores: dict, depth: np.ndarray, regions: np.ndarray,
                   mask: np.ndarray | None = None) -> pd.DataFrame:
    """Mean score per layer and region, for every signal.

    Parameters
    ----------
    scores : dict of str to ndarray of shape (n_layers, n_targets)
        Signal name → scores.
    regions : ndarray of shape (n_targets,)
        Region label of each target (see :func:`hierarchy_regions`).
    mask : ndarray of bool, shape (n_targets,), or None
        Targets to include (e.g. reliable ones).

    Returns
    -------
    DataFrame with columns signal, region, depth, score.
    """
    mask = np.ones(len(regions), bool) if mask is None else np.asarray(mask)
    rows = []
    for signal, values in scores.items():
        for region in np.unique(regions):
            where = mask & (regions == region)
            for d, layer_scores in zip(depth, values):
                rows.append({"signal": signal, "region": region, "depth": float(d),
                             "score": float(np.nanmean(layer_scores[where]))})
    return pd.DataFrame(rows)


def reliable_targets(noise_ceiling: np.ndarray, peak_score: np.ndarray, *,
                     min_noise_ceiling: float = 10.0, min_score: float = 0.0) -> np.ndarray:
    """Targets with NC ≥ ``min_noise_ceiling`` (percent) and a peak score > ``min_score``."""
    return (np.asarray(noise_ceiling) >= min_noise_ceiling) & (np.asarray(peak_score) > min_score)


def peak_scores(encoding: dict, depth, noise_ceiling, *, min_noise_ceiling: float = 10.0,
                min_score: float = 0.0) -> tuple[dict, np.ndarray]:
    """Each target's best layer and its peak score, without a winner's curse.

    The best layer is chosen on the training images' out-of-fold scores and its score
    read on the test images (:func:`chosen_layers`, ``select_on="train"``), and the
    reliable targets are chosen on those training scores too: choosing the layer (or
    the targets) on the test scores and reporting the test score there reports the
    maximum of noisy scores, biased upward — on responses that carry no image
    information at all, the median "peak" was 0.20 (issue 28), against ≈ 0 here.

    Parameters
    ----------
    encoding : dict of str to dict
        Signal → one signal of :func:`gradbrain.analysis.encoding.fmri_encoding` (``r_nc``
        and ``cv_r2``, each of shape (n_layers, n_targets)).
    depth : ndarray of shape (n_layers,)
    noise_ceiling : ndarray of shape (n_targets,)
        NC in percent.
    min_noise_ceiling, min_score : float
        A target is reliable when NC ≥ ``min_noise_ceiling`` and its activations'
        training score at the chosen layer (√R² / √NC, a lower bound of the out-of-fold
        r over √NC) is above ``min_score``.

    Returns
    -------
    best : dict of str to dict
        Signal → :func:`chosen_layers`: ``index``, ``depth``, ``chosen_score`` (training)
        and ``peak`` (test r / √NC at the chosen layer), each (n_targets,).
    reliable : ndarray of bool, shape (n_targets,)
    """
    if "activation" not in encoding:
        raise ValueError(f"'encoding' must hold the 'activation' signal (the reliable targets "
                         f"are chosen on it); got {sorted(encoding)}.")
    best = {name: chosen_layers(out, depth, noise_ceiling, select_on="train")
            for name, out in encoding.items()}
    reliable = reliable_targets(noise_ceiling, best["activation"]["chosen_score"],
                                min_noise_ceiling=min_noise_ceiling, min_score=min_score)
    return best, reliable


def recovery(recovered: np.ndarray, planted: np.ndarray) -> dict:
    """How well a recovered per-target quantity matches the planted one.

    Returns
    -------
    dict with Pearson ``r`` and Spearman ``rho``.
    """
    recovered, planted = np.asarray(recovered, float), np.asarray(planted, float)
    return {"r": float(stats.pearsonr(recovered, planted).statistic),
            "rho": float(stats.spearmanr(recovered, planted).statistic)}


MIN_TIMED_LAYERS = 3  # layers with a latency a temporal score needs


def _n_timed(latency) -> int:
    """Layers with a latency (a significant peak, see
    :func:`gradbrain.analysis.encoding.meg_encoding`)."""
    return int(np.isfinite(np.asarray(latency, float)).sum())


def temporal_score(latency, depth, *, boot_latency=None, ci: float = 0.95) -> dict:
    """Temporal score: correlation between layer depth and peak latency.

    Positive when deeper layers peak later, as a forward sweep predicts; a
    biological backprop predicts a negative score for gradients (the top layer's
    gradient is computed first).

    Parameters
    ----------
    latency : ndarray of shape (n_layers,)
        Peak latency per layer (ms); NaN layers (no peak) are left out.
    depth : ndarray of shape (n_layers,)
        Relative layer depth in [0, 1].
    boot_latency : ndarray of shape (n_boot, n_layers), optional
        Bootstrap latencies (:func:`gradbrain.analysis.encoding.meg_encoding`); gives percentile
        intervals of both correlations.
    ci : float
        Interval coverage.

    Returns
    -------
    dict with ``pearson``, ``spearman`` (correlations), ``p_pearson``, ``p_spearman``
    (two-sided, across layers; NaN when every layer peaks at the same time),
    ``n_layers`` used and, with ``boot_latency``, ``pearson_ci`` and ``spearman_ci``
    (low, high).
    """
    check_level("ci", ci)
    latency, depth = np.asarray(latency, float), np.asarray(depth, float)
    if latency.shape != depth.shape or latency.ndim != 1:
        raise ValueError(f"'latency' and 'depth' must be 1-D of equal length (one value per "
                         f"layer); got {latency.shape} and {depth.shape}.")
    keep = np.isfinite(latency)
    if keep.sum() < MIN_TIMED_LAYERS:
        raise ValueError(f"A temporal score needs at least {MIN_TIMED_LAYERS} layers with a "
                         f"peak latency; got {int(keep.sum())}.")
    if np.ptp(latency[keep]) == 0:  # every layer peaks at the same time: no order to score
        out = {"pearson": np.nan, "p_pearson": np.nan, "spearman": np.nan,
               "p_spearman": np.nan, "n_layers": int(keep.sum())}
    else:
        pearson = stats.pearsonr(depth[keep], latency[keep])
        spearman = stats.spearmanr(depth[keep], latency[keep])
        out = {"pearson": float(pearson.statistic), "p_pearson": float(pearson.pvalue),
               "spearman": float(spearman.statistic), "p_spearman": float(spearman.pvalue),
               "n_layers": int(keep.sum())}
    if boot_latency is not None:
        boot = np.asarray(boot_latency, float)
        if boot.ndim != 2 or boot.shape[1] != len(depth):
            raise ValueError(f"'boot_latency' must have shape (n_boot, n_layers={len(depth)}); "
                             f"got {boot.shape}.")
        samples = {"pearson": [], "spearman": []}
        for row in boot:
            ok = np.isfinite(row)
            if ok.sum() < 3 or np.ptp(row[ok]) == 0:
                continue
            samples["pearson"].append(np.corrcoef(depth[ok], row[ok])[0, 1])
            samples["spearman"].append(stats.spearmanr(depth[ok], row[ok]).statistic)
        for name, values in samples.items():
            out[f"{name}_ci"] = (tuple(np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2]))
                                 if values else (np.nan, np.nan))
    return out


def backprop_latency_prediction(activation_latency, backward_rank) -> np.ndarray:
    """Gradient latencies a biological backprop predicts from the measured forward sweep.

    The backward pass starts when the forward sweep ends (the latest activation peak)
    and visits the layers in the order autograd measured (rank 0 first — the top layer
    under backpropagation), one layer per step of the forward sweep's average pace
    (its latency span divided by the number of steps between layers).

    Parameters
    ----------
    activation_latency : ndarray of shape (n_layers,)
        Peak latency of each layer's activations (ms).
    backward_rank : ndarray of shape (n_layers,), int
        Position of each layer in the measured backward order
        (:meth:`gradbrain.features.Features.backward_rank`).

    Returns
    -------
    ndarray of shape (n_layers,), ms.
    """
    act = np.asarray(activation_latency, float)
    rank = np.asarray(backward_rank, float)
    if act.shape != rank.shape or act.ndim != 1 or not np.isfinite(act).any():
        raise ValueError(f"'activation_latency' and 'backward_rank' must be 1-D of equal length "
                         f"with some finite latency; got {act.shape} and {rank.shape}.")
    finite = np.sort(act[np.isfinite(act)])
    step = (finite[-1] - finite[0]) / max(len(act) - 1, 1)
    return finite[-1] + step * (rank + 1)


def temporal_table(results: dict) -> pd.DataFrame:
    """One row per signal of an MEG encoding run: temporal score and latencies.

    Parameters
    ----------
    results : dict
        Output of :func:`gradbrain.analysis.encoding.meg_encoding`.

    Returns
    -------
    DataFrame with columns signal, layers timed (layers whose course peaks above chance),
    temporal score (Pearson r) with its bootstrap interval, Spearman ρ, p (across layers)
    and the median latency (ms); NaN scores where fewer than 3 layers are timed.
    """
    rows = []
    for signal, res in results.items():
        timed = _n_timed(res["latency"])
        row = {"signal": signal, "layers timed": f"{timed} of {len(res['latency'])}",
               "temporal score (Pearson r)": np.nan, "95 % CI": "", "Spearman ρ": np.nan,
               "p (across layers)": np.nan, "median latency (ms)": np.nan}
        if timed >= MIN_TIMED_LAYERS:
            score = temporal_score(res["latency"], res["depth"],
                                   boot_latency=res.get("boot_latency"))
            row.update({"temporal score (Pearson r)": score["pearson"],
                        "95 % CI": "[{:.2f}, {:.2f}]".format(*score["pearson_ci"])
                        if "pearson_ci" in score else "",
                        "Spearman ρ": score["spearman"], "p (across layers)": score["p_pearson"],
                        "median latency (ms)": float(np.nanmedian(res["latency"]))})
        rows.append(row)
    return pd.DataFrame(rows)
