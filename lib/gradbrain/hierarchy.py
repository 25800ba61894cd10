"""Layer-to-brain hierarchy: best layers, spatial and temporal scores, the backprop tests.

Summaries (best layer per target, hierarchy regions, layer profiles, recovery of a
planted truth) feed the scores of Raugel et al. (2025) — spatial (best-layer depth vs
distance from V1) and temporal (peak latency vs depth) — and the tests of what a
biological backprop predicts, each against an explicit null (:func:`run`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ._utils import check_in_allowed

__all__ = ["best_layer", "chosen_layers", "cv_correlation", "SELECTIONS", "hierarchy_regions",
           "layer_profiles", "reliable_targets",
           "recovery", "summarize_fmri", "temporal_score", "backprop_latency_prediction",
           "summarize_meg", "temporal_table", "layer_permutation_test", "spatial_score",
           "bootstrap_spatial_score", "hierarchy_units", "unit_coordinates", "unit_best_layer",
           "profile_centre", "profile_permutation_test", "SPATIAL_STATISTICS",
           "group_test", "group_estimate", "above_chance",
           "HierarchyResult", "run", "GRADIENT_PARTS", "simulate_tests", "study_sizes",
           "error_rates",
           "model_null_p", "write_reference", "TEST_TRUTHS", "VERDICT_BACKPROP",
           "VERDICT_PAPER", "ESTIMATES", "equivalence", "divergence_p",
           "divergence_rates", "power_curve", "read_power_curve", "power_curve_summary",
           "POWER_CURVE"]

#: What :func:`run` tests of the gradients: as extracted, or beyond activations.
GRADIENT_PARTS = ("whole", "unique")
#: Where :func:`run` chooses which vertices enter and each vertex's best layer.
SELECTIONS = ("train", "test")
#: What a unit's layer is in :func:`run`'s spatial tests: the centre of mass of its
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
    ``peak`` (n_targets,) the best score.
    """
    scores = np.asarray(scores, dtype=float)
    depth = np.asarray(depth, dtype=float)
    if scores.ndim != 2 or scores.shape[0] != len(depth):
        raise ValueError(
            f"'scores' must have shape (n_layers={len(depth)}, n_targets); got {scores.shape}."
        )
    filled = np.where(np.isfinite(scores), scores, -np.inf)
    index = filled.argmax(0)
    return {"index": index, "depth": depth[index],
            "peak": scores[index, np.arange(scores.shape[1])]}


def hierarchy_regions(coordinate: np.ndarray, n_regions: int = 4) -> np.ndarray:
    """Split targets into ``n_regions`` equal-count bins of the hierarchy coordinate.

    Returns
    -------
    ndarray of str, shape (n_targets,): ``"1 (early)"`` … ``"n (high-level)"``.
    """
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
        One signal of :func:`gradbrain.analysis.encoding.fmri_encoding`: ``r_nc`` and ``cv_r2``, each
        of shape (n_layers, n_targets).
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


def recovery(recovered: np.ndarray, planted: np.ndarray) -> dict:
    """How well a recovered per-target quantity matches the planted one.

    Returns
    -------
    dict with Pearson ``r`` and Spearman ``rho``.
    """
    recovered, planted = np.asarray(recovered, float), np.asarray(planted, float)
    return {"r": float(stats.pearsonr(recovered, planted).statistic),
            "rho": float(stats.spearmanr(recovered, planted).statistic)}


def summarize_fmri(study, best: dict, reliable: np.ndarray, regions: np.ndarray) -> str:
    """What an fMRI encoding run found, in words (Markdown bullet list).

    Parameters
    ----------
    study : Study
    best : dict of str to dict
        Signal → :func:`best_layer` output; must hold ``"activation"``.
    reliable : ndarray of bool, shape (n_vertices,)
    regions : ndarray of str, shape (n_vertices,)
        From :func:`hierarchy_regions` (first and last names = early and high-level).
    """
    names = sorted(set(regions))  # "1 (early)" … "n (high-level)"
    early, late = regions == names[0], regions == names[-1]
    act = recovery(best["activation"]["depth"][reliable], study.hierarchy[reliable])
    lines = [f"- Activations: the best layer's depth correlates with distance from V1 "
             f"(Spearman ρ = {act['rho']:.2f}, {int(reliable.sum())} reliable vertices)."]
    for signal, b in best.items():
        if signal == "activation":
            continue
        lines.append(
            f"- {signal}: median peak score {np.nanmedian(b['peak'][reliable & early]):.2f} in "
            f"the earliest quarter of the hierarchy vs "
            f"{np.nanmedian(b['peak'][reliable & late]):.2f} in the highest quarter."
        )
    if study.truth and "preferred_depth" in study.truth:
        rec = recovery(best["activation"]["depth"][reliable],
                       study.truth["preferred_depth"][reliable])
        lines.append(f"- Simulated study: the recovered layer map matches the planted one "
                     f"(r = {rec['r']:.2f}, Spearman ρ = {rec['rho']:.2f}).")
    return "\n".join(lines)


MIN_TIMED_LAYERS = 3  # layers with a latency a temporal score needs


def _n_timed(latency) -> int:
    """Layers with a latency (a significant peak, see :func:`gradbrain.analysis.encoding.meg_encoding`)."""
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


def summarize_meg(results: dict, study=None) -> str:
    """What an MEG encoding run found, in words (Markdown bullet list).

    Parameters
    ----------
    results : dict
        Output of :func:`gradbrain.analysis.encoding.meg_encoding`.
    study : Study, optional
        A simulated study's planted latencies are compared with the recovered ones.
    """
    lines = []
    for signal, res in results.items():
        timed = _n_timed(res["latency"])
        if timed < MIN_TIMED_LAYERS:
            lines.append(f"- {signal}: {timed} of {len(res['latency'])} layers peak above "
                         "chance — too few for a temporal score; best r(t) = "
                         f"{np.max(res['peak']):.3f}.")
            continue
        score = temporal_score(res["latency"], res["depth"], boot_latency=res["boot_latency"])
        lo, hi = score["pearson_ci"]
        if lo > 0 or hi < 0:
            finding = f"deeper layers peak {'later' if score['pearson'] > 0 else 'earlier'}"
        else:
            finding = "no reliable relation between depth and latency"
        lines.append(
            f"- {signal}: peak latencies {np.nanmin(res['latency']):.0f}–"
            f"{np.nanmax(res['latency']):.0f} ms; {finding} (temporal score r = "
            f"{score['pearson']:.2f}, 95 % bootstrap CI [{lo:.2f}, {hi:.2f}], p = "
            f"{score['p_pearson']:.2g} across {score['n_layers']} layers); best r(t) = "
            f"{np.max(res['peak']):.3f}."
        )
    truth = getattr(study, "truth", None) or {}
    planted = {"activation": truth.get("activation_latency")}
    if truth.get("gradient_truth") not in (None, "none"):
        planted[f"gradient ({truth['gradient_loss']})"] = truth.get("gradient_latency")
    for signal, values in planted.items():
        if values is None or signal not in results:
            continue
        found = results[signal]["latency"]
        timed = np.isfinite(found)
        if timed.sum() < MIN_TIMED_LAYERS:
            continue
        rec = recovery(found[timed], np.asarray(values)[timed])
        lines.append(f"- Simulated study, {signal}: recovered vs planted latencies r = "
                     f"{rec['r']:.2f} (Spearman ρ = {rec['rho']:.2f}), median |error| "
                     f"{np.nanmedian(np.abs(found - values)):.0f} ms.")
    return "\n".join(lines)


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


# --------------------------------------------------------------------------- scores and tests

ALTERNATIVES = ("greater", "less", "two-sided")


def _layer_sum_correlation(values, counts, sums, target_norm: float, rank: bool):
    """Correlation across targets of their layer's value with their centred target.

    Only per-layer quantities are needed: ``counts`` (targets per layer) and ``sums``
    (sum of the centred, maybe ranked, targets per layer). Rows are evaluated at once:
    ``values``, ``counts`` and ``sums`` broadcast to (n_rows, n_layers). With ``rank``
    the layer values are replaced by the average rank their (tied) targets take.

    Returns
    -------
    Tensor of shape (n_rows,).
    """
    import torch

    values, counts, sums = torch.broadcast_tensors(values, counts, sums)
    if rank:
        order = torch.argsort(values, dim=1)
        sorted_counts = counts.gather(1, order)
        average = torch.cumsum(sorted_counts, 1) - sorted_counts + (sorted_counts + 1) / 2
        values = torch.empty_like(values).scatter_(1, order, average)
    n = counts.sum(1, keepdim=True)
    mean = (values * counts).sum(1, keepdim=True) / n
    spread = torch.sqrt(((values - mean) ** 2 * counts).sum(1)) * target_norm
    return (values * sums).sum(1) / spread


def _permutation_p(statistic: float, null: np.ndarray, alternative: str) -> float:
    """``(1 + #{null as extreme as statistic}) / (1 + n_perm)``, ties within 1e-12
    counting as extreme."""
    if alternative == "greater":
        extreme = null >= statistic - 1e-12
    elif alternative == "less":
        extreme = null <= statistic + 1e-12
    else:
        extreme = np.abs(null) >= abs(statistic) - 1e-12
    return float((1 + np.sum(extreme)) / (1 + len(null)))


def layer_permutation_test(layer_index, target, values, *, mask=None, method: str = "spearman",
                           alternative: str = "greater", n_perm: int = 10_000, seed: int = 0,
                           device=None) -> dict:
    """Correlation between a per-layer value and a per-target quantity, against shuffled layers.

    Each target (vertex, or layer) is assigned a layer (e.g. its best-predicting one);
    the statistic is the correlation, across targets, between the assigned layer's
    ``values`` (e.g. its depth) and ``target`` (e.g. distance from V1). The null
    distribution shuffles which value belongs to which layer — the layers' order means
    nothing — while keeping which targets share a layer.

    Every permutation is evaluated at once, on the device: the correlation only depends
    on per-layer sums of the (ranked) targets, so the cost is n_perm × n_layers whatever
    the number of targets (10,000 permutations over 20,000 vertices take milliseconds).

    Parameters
    ----------
    layer_index : ndarray of shape (n_targets,), int
        Layer assigned to each target, in 0 … n_layers − 1.
    target : ndarray of shape (n_targets,)
    values : ndarray of shape (n_layers,)
        Value of each layer (depth in [0, 1], backward rank, …); distinct values.
    mask : ndarray of bool, shape (n_targets,), optional
        Targets to use (NaN targets are always left out).
    method : {"spearman", "pearson"}
    alternative : {"greater", "less", "two-sided"}
    n_perm : int
        Number of random permutations.
    seed : int

    Returns
    -------
    dict with ``statistic`` (the observed correlation), ``p_value`` ((1 + #null as
    extreme) / (1 + n_perm)), ``min_p`` (the smallest p-value this test can give on
    these targets, see below), ``null`` (n_perm,), ``permutations`` (n_perm, n_layers)
    (row ``k``: the layer whose value layer ``l`` takes), ``n_targets`` and
    ``n_layers_used`` (k, the layers assigned to at least one target).

    Notes
    -----
    Only the k layers that targets use matter, so the null has k! distinct Spearman
    statistics (the order of their values) and L!/(L−k)! Pearson ones: even a perfect
    ordering gets p ≈ 1/k! (Spearman; 2/k! two-sided), never below 1/(1 + n_perm). A
    perfectly ordered map over 3 of 12 layers cannot reach p < 0.16: check ``min_p``
    against α before reading a non-significant result as evidence.
    """
    import torch
    from scipy.stats import rankdata

    from ._utils import resolve_device

    check_in_allowed("method", method, ("spearman", "pearson"))
    check_in_allowed("alternative", alternative, ALTERNATIVES)
    index = np.asarray(layer_index)
    target = np.asarray(target, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError(f"'values' (one per layer, e.g. the layers' depth) must be a 1-D array "
                         f"of finite numbers; got {values!r}.")
    if index.shape != target.shape or index.ndim != 1:
        raise ValueError(f"'layer_index' and 'target' must be 1-D of equal length; got "
                         f"{index.shape} and {target.shape}.")
    if index.size and (index.min() < 0 or index.max() >= len(values)):
        raise ValueError(f"'layer_index' must hold layers 0 … {len(values) - 1}.")
    keep = np.isfinite(target) & (np.ones(len(target), bool) if mask is None
                                  else np.asarray(mask, bool))
    index, target = index[keep], target[keep]
    if len(np.unique(index)) < 2 or len(target) < 3:
        raise ValueError("A layer permutation test needs at least 3 targets assigned to at "
                         f"least 2 different layers; got {len(target)} targets in "
                         f"{len(np.unique(index))} layer(s).")
    if n_perm < 1:
        raise ValueError(f"'n_perm' must be a positive integer; got {n_perm!r}.")
    if np.ptp(target) == 0:  # no variation: the correlation is undefined, not 0
        return {"statistic": np.nan, "p_value": np.nan, "min_p": np.nan,
                "null": np.full(n_perm, np.nan), "permutations": np.empty((0, len(values)), int),
                "n_targets": len(target), "n_layers_used": int(len(np.unique(index)))}
    device = resolve_device(device)
    f64 = dict(device=device, dtype=torch.float64)
    n_layers, n = len(values), len(target)
    t = rankdata(target) if method == "spearman" else target
    t = t - t.mean()
    counts = torch.as_tensor(np.bincount(index, minlength=n_layers), **f64)
    sums = torch.as_tensor(np.bincount(index, weights=t, minlength=n_layers), **f64)
    generator = torch.Generator(device=device).manual_seed(seed)
    perms = torch.argsort(torch.rand(n_perm, n_layers, generator=generator, device=device), 1)
    perms = torch.cat([torch.arange(n_layers, device=device)[None], perms])  # row 0: observed
    x = torch.as_tensor(values, **f64)[perms]                            # (1 + n_perm, L)
    r = _layer_sum_correlation(x, counts, sums, float(np.sqrt(np.sum(t * t))),
                               rank=method == "spearman").cpu().numpy()
    statistic, null = float(r[0]), r[1:]
    used = len(np.unique(index))
    return {"statistic": statistic, "p_value": _permutation_p(statistic, null, alternative),
            "min_p": min_p_value(used, n_layers, method=method, alternative=alternative,
                                 n_perm=n_perm),
            "null": null, "permutations": perms[1:].cpu().numpy(), "n_targets": int(n),
            "n_layers_used": int(used)}


def min_p_value(n_used: int, n_layers: int, *, method: str = "spearman",
                alternative: str = "greater", n_perm: int | None = None) -> float:
    """Smallest p-value a layer permutation test can reach.

    Parameters
    ----------
    n_used : int
        Layers assigned to at least one target (k).
    n_layers : int
        Layers whose values are shuffled (L).
    method : {"spearman", "pearson"}
        Spearman depends only on the order of the k used layers' values (k! outcomes);
        Pearson on the values themselves (L!/(L−k)! outcomes).
    alternative : {"greater", "less", "two-sided"}
        Two-sided doubles the floor (the reversed order is as extreme).
    n_perm : int or None
        Random permutations: the p-value is never below 1/(1 + n_perm).
    """
    from math import factorial, perm

    outcomes = factorial(n_used) if method == "spearman" else perm(n_layers, n_used)
    floor = (2.0 if alternative == "two-sided" else 1.0) / outcomes
    if n_perm is not None:
        floor = max(floor, 1.0 / (1 + n_perm))
    return float(min(1.0, floor))


def profile_permutation_test(profile, target, values, *, mask=None, method: str = "spearman",
                             alternative: str = "greater", n_perm: int = 10_000, seed: int = 0,
                             chunk: int = 2000) -> dict:
    """Correlation between targets' profile centres and a per-target quantity, against
    shuffled layers.

    The whole-profile counterpart of :func:`layer_permutation_test`: each target's
    value is the centre of mass of the layers' ``values`` weighted by its profile
    (:func:`profile_centre`) instead of its best layer's value. The null shuffles which
    value belongs to which layer, keeping every target's profile, so targets with
    similar profiles stay alike in every shuffle.

    Parameters
    ----------
    profile : ndarray of shape (n_layers, n_targets)
        Score of every layer for every target (e.g. :func:`unit_best_layer`'s
        ``profile``).
    target : ndarray of shape (n_targets,)
        E.g. the units' distance from V1, or another signal's centres.
    values : ndarray of shape (n_layers,)
        Value of each layer (depth in [0, 1], …); finite.
    mask : ndarray of bool, shape (n_targets,), optional
        Targets to use (NaN targets and flat profiles are always left out).
    method : {"spearman", "pearson"}
    alternative : {"greater", "less", "two-sided"}
    n_perm, seed : int
        Random permutations of the layers and their seed.
    chunk : int
        Permutations evaluated at once (memory: chunk × n_targets floats).

    Returns
    -------
    dict with ``statistic``, ``p_value`` ((1 + #null as extreme) / (1 + n_perm)),
    ``min_p`` (the floor: the larger of 1 / (1 + n_perm) and 1 / n_layers!, twice that
    two-sided), ``null``
    (n_perm,), ``permutations`` (n_perm, n_layers) (row ``k``: the layer whose value
    layer ``l`` takes), ``centres`` (n_targets,) the observed centres (NaN where left
    out) and ``n_targets``.
    """
    from scipy.stats import rankdata

    check_in_allowed("method", method, ("spearman", "pearson"))
    check_in_allowed("alternative", alternative, ALTERNATIVES)
    profile = np.asarray(profile, dtype=float)
    target = np.asarray(target, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError(f"'values' (one per layer, e.g. the layers' depth) must be a 1-D array "
                         f"of finite numbers; got {values!r}.")
    if profile.ndim != 2 or profile.shape != (len(values), len(target)) or target.ndim != 1:
        raise ValueError(f"'profile' must be (n_layers, n_targets) = ({len(values)}, "
                         f"{len(target)}) for these 'values' and 'target'; got {profile.shape}.")
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"'n_perm' must be a positive integer; got {n_perm!r}.")
    weights = _profile_weights(profile)
    total = weights.sum(0)
    keep = np.isfinite(target) & (total > 0)
    if mask is not None:
        keep &= np.asarray(mask, bool)
    centres = np.full(len(target), np.nan)
    weights = weights[:, keep] / total[keep]
    target = target[keep]
    centres[keep] = values @ weights
    if len(target) < 3:
        raise ValueError("A profile permutation test needs at least 3 targets with a "
                         f"profile that is not flat; got {len(target)}.")
    out = {"centres": centres, "n_targets": int(len(target))}
    if np.ptp(target) == 0 or np.ptp(centres[keep]) == 0:  # undefined, not 0
        return {**out, "statistic": np.nan, "p_value": np.nan, "min_p": np.nan,
                "null": np.full(n_perm, np.nan),
                "permutations": np.empty((0, len(values)), int)}
    rng = np.random.default_rng(seed)
    t = rankdata(target) if method == "spearman" else target
    t = (t - t.mean()) / np.linalg.norm(t - t.mean())
    n_layers = len(values)
    perms = np.argsort(rng.random((n_perm, n_layers)), axis=1)
    perms = np.concatenate([np.arange(n_layers)[None], perms])        # row 0: observed
    r = np.empty(len(perms))
    for start in range(0, len(perms), chunk):
        x = values[perms[start:start + chunk]] @ weights                   # (chunk, n)
        if method == "spearman":
            x = rankdata(x, axis=1)
        x = x - x.mean(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            r[start:start + chunk] = (x @ t) / np.linalg.norm(x, axis=1)
    statistic, null = float(r[0]), r[1:]
    return {**out, "statistic": statistic,
            "p_value": _permutation_p(statistic, null, alternative),
            "min_p": min_p_value(n_layers, n_layers, method="pearson",
                                 alternative=alternative, n_perm=n_perm),
            "null": null, "permutations": perms[1:]}


def _both_profile_correlations(profile, target, values, **kwargs) -> dict:
    """Spearman and Pearson :func:`profile_permutation_test`, keyed as
    :func:`_both_correlations`."""
    out = {}
    for method in ("spearman", "pearson"):
        test = profile_permutation_test(profile, target, values, method=method, **kwargs)
        out[method], out[f"p_{method}"] = test["statistic"], test["p_value"]
        out[f"min_p_{method}"] = test["min_p"]
        out["n_targets"] = test["n_targets"]
    return out


def spatial_score(best_layer_index, hierarchy_coordinate, depth, *, mask=None,
                  n_perm: int = 10_000, seed: int = 0, device=None) -> dict:
    """Spatial score: correlation of each target's best-layer depth with its hierarchy position.

    Parameters
    ----------
    best_layer_index : ndarray of shape (n_targets,), int
        Best-predicting layer per vertex (or ROI), see :func:`best_layer`.
    hierarchy_coordinate : ndarray of shape (n_targets,)
        Position in the cortical hierarchy: Euclidean distance from V1 (mm), as Raugel
        et al. (2025).
    depth : ndarray of shape (n_layers,)
        Relative layer depth in [0, 1].
    mask : ndarray of bool, optional
        Reliably predicted targets (see :func:`reliable_targets`).

    Returns
    -------
    dict with ``spearman`` and ``pearson`` correlations, ``p_spearman`` and ``p_pearson``
    (one-sided, greater, against shuffled layer depths) and ``n_targets``.
    """
    return _both_correlations(best_layer_index, hierarchy_coordinate, depth, mask=mask,
                              n_perm=n_perm, seed=seed, device=device)


def _no_correlation(n_targets: int) -> dict:
    """The keys of :func:`_both_correlations`, NaN: a score that cannot be computed."""
    return {**{key: np.nan for key in ("spearman", "p_spearman", "min_p_spearman",
                                       "pearson", "p_pearson", "min_p_pearson")},
            "n_targets": int(n_targets)}


def _both_correlations(layer_index, target, values, **kwargs) -> dict:
    """Spearman and Pearson :func:`layer_permutation_test` with their p-values."""
    out = {}
    for method in ("spearman", "pearson"):
        test = layer_permutation_test(layer_index, target, values, method=method, **kwargs)
        out[method], out[f"p_{method}"] = test["statistic"], test["p_value"]
        out[f"min_p_{method}"] = test.get("min_p", np.nan)
        out["n_targets"] = test["n_targets"]
    return out


def bootstrap_spatial_score(prediction, y_test, hierarchy_coordinate, depth, *, mask=None,
                            units=None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                            boot_indices=None, statistic: str = "best", device=None,
                            batch: int = 64) -> dict:
    """Bootstrap over test images of the spatial score (Spearman).

    Each resample draws test images with replacement, recomputes every layer's test
    correlation at every vertex, takes each vertex's best layer and correlates its depth
    with the hierarchy coordinate — the whole chain that produced the spatial score, with
    the fitted models held fixed. All resamples of a batch run at once on the device
    (weighted sums of the test rows), one layer at a time.

    Parameters
    ----------
    prediction : ndarray of shape (n_layers, n_test, n_targets)
        Each layer's test-set prediction (``fmri_encoding(..., return_prediction=True)``).
    y_test : ndarray of shape (n_test, n_targets)
        Measured test responses.
    hierarchy_coordinate : ndarray of shape (n_targets,)
        Distance from V1 (mm) or the planted coordinate.
    depth : ndarray of shape (n_layers,)
        Relative layer depth in [0, 1] (distinct values).
    mask : ndarray of bool, shape (n_targets,), optional
        Targets that enter the score (as for the point estimate).
    units : ndarray of int, shape (n_targets,), optional
        Unit of every target (:func:`hierarchy_units`; -1: none). Each resample then
        averages its targets' r per unit and layer before taking each unit's best layer,
        and correlates those with the units' median coordinates — the chain of
        :func:`unit_best_layer` and :func:`spatial_score` on units.
    n_boot, ci, seed
        Resamples, interval coverage and seed.
    boot_indices : ndarray of int, shape (n_boot, n_test), optional
        The resamples to use (rows of test images) instead of drawing them.
    statistic : {"best", "centre"}
        A target's (or unit's) layer depth: its best layer's (argmax of r), or the
        centre of mass of the depths weighted by its whole profile of r
        (:func:`profile_centre`; ties between centres get consecutive ranks).

    Returns
    -------
    dict with ``samples`` (n_boot,) the Spearman ρ of each resample (NaN when every
    target picks the same layer) and ``spearman_ci`` (low, high).
    """
    import torch
    from scipy.stats import rankdata

    from ._utils import resolve_device

    prediction = np.asarray(prediction, dtype=float)
    y_test = np.asarray(y_test, dtype=float)
    coordinate = np.asarray(hierarchy_coordinate, dtype=float)
    depth = np.asarray(depth, dtype=float)
    if prediction.ndim != 3 or prediction.shape[1:] != y_test.shape \
            or prediction.shape[0] != len(depth) or coordinate.shape != y_test.shape[1:]:
        raise ValueError(
            "Shapes must be prediction (n_layers, n_test, n_targets), y_test (n_test, "
            "n_targets), hierarchy_coordinate (n_targets,) and depth (n_layers,); got "
            f"{prediction.shape}, {y_test.shape}, {coordinate.shape} and {depth.shape}.")
    keep = np.isfinite(coordinate) if mask is None else np.asarray(mask, bool) & \
        np.isfinite(coordinate)
    n_layers, n_test = len(depth), y_test.shape[0]
    if units is not None:
        units = np.asarray(units)
        if units.shape != coordinate.shape:
            raise ValueError(f"'units' must label every target, shape {coordinate.shape}; "
                             f"got {units.shape}.")
        keep &= units >= 0
        unit_coordinate = unit_coordinates(coordinate, units)
        present = np.bincount(units[keep], minlength=len(unit_coordinate)) > 0
        if present.sum() < 3:
            raise ValueError(f"A spatial score needs at least 3 units with targets; got "
                             f"{int(present.sum())}.")
    if keep.sum() < 3:
        raise ValueError(f"A spatial score needs at least 3 targets; the mask keeps "
                         f"{int(keep.sum())}.")
    if boot_indices is None:
        if n_boot < 1:
            raise ValueError(f"'n_boot' must be a positive integer; got {n_boot!r}.")
        boot_indices = np.random.default_rng(seed).integers(0, n_test, (n_boot, n_test))
    boot_indices = np.asarray(boot_indices)
    if boot_indices.ndim != 2 or boot_indices.min() < 0 or boot_indices.max() >= n_test:
        raise ValueError(f"'boot_indices' must be (n_boot, n) rows of test images 0 … "
                         f"{n_test - 1}.")
    check_in_allowed("statistic", statistic, SPATIAL_STATISTICS[::-1])
    device = resolve_device(device)
    f64 = dict(device=device, dtype=torch.float64)
    P = torch.as_tensor(prediction[:, :, keep], **f64)
    P = P - P.mean(1, keepdim=True)
    Y = torch.as_tensor(y_test[:, keep], **f64)
    Y = Y - Y.mean(0, keepdim=True)
    if units is None:
        t = torch.as_tensor(rankdata(coordinate[keep]), **f64)
        average = None
    else:  # (kept targets, present units): the mean over each unit's targets
        t = torch.as_tensor(rankdata(unit_coordinate[present]), **f64)
        column = np.cumsum(present) - 1
        average = torch.zeros(int(keep.sum()), int(present.sum()), **f64)
        average[torch.arange(int(keep.sum())), torch.as_tensor(column[units[keep]])] = 1.0
        average = average / average.sum(0, keepdim=True)
    t = t - t.mean()
    depth_t = torch.as_tensor(depth, **f64)
    n_targets = len(t)
    samples = []
    for start in range(0, len(boot_indices), batch):
        rows = torch.as_tensor(boot_indices[start:start + batch], device=device)
        W = torch.zeros(len(rows), n_test, **f64).scatter_add_(
            1, rows, torch.ones(rows.shape, **f64))
        W = W / W.sum(1, keepdim=True)                              # (b, n_test)
        my = W @ Y
        vy = W @ (Y * Y) - my * my
        best_r = torch.full((len(rows), n_targets), -torch.inf, **f64)
        best = torch.zeros(len(rows), n_targets, dtype=torch.long, device=device)
        profile = []
        for layer in range(n_layers):
            X = P[layer]
            mx = W @ X
            r = (W @ (X * Y) - mx * my) / torch.sqrt((W @ (X * X) - mx * mx) * vy)
            if average is not None:
                r = torch.nan_to_num(r, nan=0.0) @ average
            if statistic == "centre":
                profile.append(r)
                continue
            r = torch.nan_to_num(r, nan=-torch.inf)
            better = r > best_r
            best_r = torch.where(better, r, best_r)
            best = torch.where(better, torch.full_like(best, layer), best)
        if statistic == "centre":   # Spearman of the profile centres with the coordinate
            profile = torch.stack(profile, 1)                             # (b, L, n)
            finite = torch.isfinite(profile)
            low = torch.where(finite, profile, torch.inf).amin(1, keepdim=True)
            weight = torch.where(finite, profile - low, torch.zeros_like(profile))
            centre = (depth_t[None, :, None] * weight).sum(1) / weight.sum(1)
            ranks = torch.argsort(torch.argsort(centre, 1), 1).to(torch.float64)
            ranks = ranks - ranks.mean(1, keepdim=True)
            rho = (ranks @ t) / (torch.linalg.norm(ranks, dim=1) * torch.linalg.norm(t))
            rho[~torch.isfinite(centre).all(1)] = torch.nan
            samples.append(rho.cpu().numpy())
            continue
        # Spearman of best-layer depth with the coordinate, from per-layer counts and sums
        counts = torch.zeros(len(rows), n_layers, **f64).scatter_add_(
            1, best, torch.ones(best.shape, **f64))
        sums = torch.zeros(len(rows), n_layers, **f64).scatter_add_(
            1, best, t.expand(len(rows), -1))
        samples.append(_layer_sum_correlation(depth_t, counts, sums,
                                              float(torch.sqrt((t * t).sum())),
                                              rank=True).cpu().numpy())
    samples = np.concatenate(samples)
    samples[~np.isfinite(samples)] = np.nan
    return {"samples": samples, "spearman_ci": _bootstrap_ci(samples, ci)}


def group_test(values, *, alternative: str = "greater", alpha: float = 0.05) -> pd.DataFrame:
    """Across-subject Wilcoxon signed-rank tests against 0, FDR-corrected across statistics.

    Parameters
    ----------
    values : DataFrame
        One row per subject, one column per statistic (e.g. each signal's spatial score).
    alternative : {"greater", "less", "two-sided"}
    alpha : float
        FDR level (Benjamini–Hochberg, MNE's ``fdr_correction``).

    Returns
    -------
    DataFrame indexed by statistic with ``median``, ``n_subjects``, ``W``, ``p``,
    ``min_p`` (the smallest p the exact test can give: 1/2^n one-sided, 2/2^n
    two-sided), ``can_reach_alpha`` (False: with so few subjects the test cannot be
    significant, whatever the data — e.g. 4 subjects, two-sided: 0.125; see
    :func:`group_estimate`), ``p_fdr`` and ``significant``.
    """
    from mne.stats import fdr_correction

    check_in_allowed("alternative", alternative, ALTERNATIVES)
    values = pd.DataFrame(values)
    if len(values) < 2:
        raise ValueError(f"A group test needs at least 2 subjects (rows); got {len(values)}.")
    rows = {}
    for column in values:
        x = values[column].dropna().to_numpy(float)
        test = stats.wilcoxon(x, alternative=alternative)
        floor = min(1.0, (2.0 if alternative == "two-sided" else 1.0) / 2 ** len(x))
        rows[column] = {"median": float(np.median(x)), "n_subjects": len(x),
                        "W": float(test.statistic), "p": float(test.pvalue), "min_p": floor,
                        "can_reach_alpha": floor < alpha}
    table = pd.DataFrame(rows).T.infer_objects()
    significant, p_fdr = fdr_correction(table["p"].to_numpy(float), alpha=alpha)
    table["p_fdr"], table["significant"] = p_fdr, significant
    return table


def above_chance(y_test, predictions, *, units=None, n_perm: int = 1000, seed: int = 0,
                 alpha: float = 0.05, device=None) -> dict:
    """Does a signal predict each target (or unit) above chance? Permutation test + FDR.

    The statistic of a target is its best layer's test-set Pearson r (the maximum over
    layers); its null comes from shuffling the test images against the predictions (the
    same shuffles for every layer and target), taking the maximum over layers there
    too, so choosing the best layer on the test set is part of the null. p-values are
    ``(1 + #{null ≥ observed}) / (1 + n_perm)`` and are corrected across targets with
    Benjamini–Hochberg (false discovery rate ``alpha``). The tests of :func:`run` ask
    *where* and *when* a signal is best; this asks first whether it predicts the brain
    at all.

    Parameters
    ----------
    y_test : array of shape (n_test, n_targets)
        Test responses (e.g. ``fmri_encoding(..., return_prediction=True)["y_test"]``).
    predictions : array of shape (n_layers, n_test, n_targets)
        Each layer's predictions of them.
    units : array of int, shape (n_targets,), or None
        Test units instead of targets: a unit's score per layer is the mean r of its
        targets (:func:`hierarchy_units`; -1: left out).
    n_perm : int
        Shuffles; the smallest p-value is ``1 / (1 + n_perm)``.
    seed : int
        Seed of the shuffles.
    alpha : float
        FDR level.

    Returns
    -------
    dict with, per target or unit (n,): ``r`` the best layer's r, ``best_layer`` its
    index, ``p_value``, ``q_value`` (BH-adjusted) and ``significant`` (q < alpha);
    targets with non-finite or constant responses get NaN and are not counted. Also
    ``n_tested`` and ``min_p``.
    """
    import torch

    from ._utils import resolve_device
    from .ridge import check_test_predictions, shuffled_correlations

    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"'n_perm' must be a positive integer; got {n_perm!r}.")
    y_test, predictions = check_test_predictions(y_test, predictions)
    n, k = y_test.shape
    tested = (np.isfinite(y_test).all(0) & (y_test.std(0) > 0)
              & np.isfinite(predictions).all((0, 1)))
    device = resolve_device(device)
    if units is not None:
        units = np.asarray(units)
        if units.shape != (k,):
            raise ValueError(f"'units' must give every target a unit (or -1), shape ({k},); "
                             f"got {units.shape}.")
        keep = tested & (units >= 0)
        n_out = int(units.max()) + 1 if keep.any() else 0
        average = np.zeros((n_out, k))
        if n_out:
            average[units[keep], np.flatnonzero(keep)] = 1.0
            counts = average.sum(1, keepdims=True)
            average = np.divide(average, counts, out=np.zeros_like(average), where=counts > 0)
        tested_out = average.sum(1) > 0
        average = torch.as_tensor(average, device=device, dtype=torch.float32)
    else:
        n_out, tested_out = k, tested
    rng = np.random.default_rng(seed)
    orders = np.concatenate([np.arange(n)[None],
                             np.stack([rng.permutation(n) for _ in range(n_perm)])])
    observed, exceed = None, torch.zeros(n_out, device=device)
    for r in shuffled_correlations(y_test, predictions, orders, device=device):
        if units is not None:  # (B, k, L) → (B, units, L)
            r = torch.einsum("bkl,uk->bul", r, average)
        if observed is None:
            observed = r[0]
            best_r, best_index = observed.max(1)
            r = r[1:]
        exceed += (r.amax(2) >= best_r - 1e-6).sum(0)
    p = ((1 + exceed) / (1 + n_perm)).cpu().numpy()
    best_r, best_index = best_r.cpu().numpy().astype(float), best_index.cpu().numpy()
    p[~tested_out], best_r[~tested_out] = np.nan, np.nan
    q = np.full(n_out, np.nan)
    if tested_out.any():
        q[tested_out] = stats.false_discovery_control(p[tested_out], method="bh")
    return {"r": best_r, "best_layer": best_index, "p_value": p, "q_value": q,
            "significant": np.nan_to_num(q, nan=1.0) < alpha,
            "n_tested": int(tested_out.sum()), "min_p": 1 / (1 + n_perm)}


def group_estimate(values, ci_low, ci_high, *, ci: float = 0.95,
                   alpha: float = 0.05) -> pd.DataFrame:
    """Combine per-subject estimates and their intervals into group estimates.

    Each subject's statistic comes with a bootstrap interval over test images; its
    standard error is taken as the interval's width over ``2 z`` (a normal
    approximation). Two inverse-variance combinations:

    * **fixed effect** — about *these* subjects, generalising over images: the
      precision-weighted mean, a z-test. It can reach α with a single subject.
      Computed directly (statsmodels needs two subjects; its ``mean_effect_fe`` is the
      same number).
    * **random effects** — about *people* (statsmodels' ``combine_effects``):
      Paule–Mandel between-subject variance τ²
      (≥ 0; the generalised Q statistic equals n − 1) and the Hartung–Knapp–Sidik–
      Jonkman interval, a t-test with n − 1 degrees of freedom, with its scale
      truncated at 1 (q* = max(1, q), Röver, Knapp & Friede 2015): the plain HKSJ
      variance ``q / Σw`` *shrinks* below the fixed-effect one when subjects agree
      more than their intervals say (``q < 1``) — 4 subjects of se 0.10 with
      estimates 0.095–0.105 got p = 2e-5 against the fixed effect's 0.044 — and is 0
      (p NaN) when they agree exactly. With the truncation it is never narrower than
      the random-effects variance ``1 / Σw``. It can reach α with 2 or more subjects,
      unlike an exact Wilcoxon test over 4 subjects (:func:`group_test`, smallest
      two-sided p 0.125, given beside it as ``wilcoxon_floor``), at the price of
      assuming normal subject effects.

    Parameters
    ----------
    values, ci_low, ci_high : DataFrame
        One row per subject, one column per statistic (same shape): the estimates and
        their ``ci`` bootstrap bounds. Subjects with a missing value or bound, or a
        zero-width interval, are left out of that statistic.
    ci : float
        Level of the given intervals (and of the intervals returned).
    alpha : float
        FDR level (Benjamini–Hochberg across statistics) of ``significant``.

    Returns
    -------
    DataFrame indexed by statistic with ``n_subjects``, ``fixed``, ``fixed_low``,
    ``fixed_high``, ``p_fixed``, ``random``, ``random_low``, ``random_high``,
    ``p_random``, ``tau2``, ``i2`` (share of variance between subjects), ``q_hksj``
    (the HKSJ scale q before truncation), ``wilcoxon_floor`` (the smallest two-sided p
    an exact signed-rank test over these subjects can give, ``2 / 2^n``: the
    assumption-free test's reach, to read beside ``p_random``), ``p_random_fdr`` and
    ``significant`` (random effects, FDR). NaN where a statistic has too few subjects
    (random effects need 2).
    """
    from mne.stats import fdr_correction
    from statsmodels.stats.meta_analysis import combine_effects

    values, ci_low, ci_high = (pd.DataFrame(x) for x in (values, ci_low, ci_high))
    if not (values.shape == ci_low.shape == ci_high.shape) or not (
            list(values.columns) == list(ci_low.columns) == list(ci_high.columns)):
        raise ValueError(f"'values', 'ci_low' and 'ci_high' must have the same subjects and "
                         f"statistics; got shapes {values.shape}, {ci_low.shape}, "
                         f"{ci_high.shape}.")
    if not 0 < ci < 1:
        raise ValueError(f"'ci' must be the intervals' level in (0, 1), e.g. 0.95; got {ci!r}.")
    z = stats.norm.ppf((1 + ci) / 2)
    rows = {}
    for column in values:
        x = values[column].to_numpy(float)
        se = (ci_high[column].to_numpy(float) - ci_low[column].to_numpy(float)) / (2 * z)
        keep = np.isfinite(x) & np.isfinite(se) & (se > 0)
        x, var = x[keep], se[keep] ** 2
        row = {"n_subjects": int(keep.sum()),
               "wilcoxon_floor": min(1.0, 2.0 / 2 ** int(keep.sum()))}
        if len(x) >= 1:
            fixed = float(np.sum(x / var) / np.sum(1 / var))
            sd = float(np.sqrt(1 / np.sum(1 / var)))
            row.update(fixed=fixed, fixed_low=fixed - z * sd, fixed_high=fixed + z * sd,
                       p_fixed=float(2 * stats.norm.sf(abs(fixed) / sd)))
        if len(x) >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # per-subject t intervals need n: unused
                res = combine_effects(x, var, method_re="iterated", alpha=1 - ci)
            q = float(res.scale_hksj_re)   # Σ w_re (x − μ)² / (n − 1)
            sd = float(np.sqrt(max(1.0, q) * res.var_eff_w_re))
            t = stats.t.ppf((1 + ci) / 2, len(x) - 1)
            random = float(res.mean_effect_re)
            row.update(random=random, random_low=random - t * sd, random_high=random + t * sd,
                       p_random=float(2 * stats.t.sf(abs(random) / sd, len(x) - 1)),
                       tau2=float(res.tau2), q_hksj=q,
                       # I² = max(0, (Q − df) / Q); 0 when subjects agree exactly
                       i2=max(0.0, 1 - (len(x) - 1) / res.q) if res.q > 0 else 0.0)
        rows[column] = row
    columns = ["n_subjects", "fixed", "fixed_low", "fixed_high", "p_fixed", "random",
               "random_low", "random_high", "p_random", "tau2", "i2", "q_hksj",
               "wilcoxon_floor"]
    table = pd.DataFrame(rows).T.reindex(columns=columns).astype(float)
    table["n_subjects"] = table["n_subjects"].astype(int)
    table["p_random_fdr"], table["significant"] = np.nan, False
    tested = table["p_random"].notna()
    if tested.any():
        significant, p_fdr = fdr_correction(table.loc[tested, "p_random"].to_numpy(),
                                            alpha=alpha)
        table.loc[tested, "p_random_fdr"] = p_fdr
        table.loc[tested, "significant"] = significant
    return table


# --------------------------------------------------------------------------- the study's tests


def _verdicts(tests: pd.DataFrame) -> tuple[dict, bool, bool]:
    """From test rows (``prediction``, ``holds``): whether each prediction holds (all its
    parts), whether the study is consistent with backprop (1 and 2), and whether it shows
    the paper's finding (3)."""
    predictions = {key: bool(group.holds.all()) for key, group in tests.groupby("prediction")}
    return (predictions, predictions.get("1 spatial", False)
            and predictions.get("2 temporal", False), predictions.get("3 where", False))


def _verdict_rows(truth: str, seed: int, consistent: bool, paper: bool) -> list[dict]:
    """The two verdict rows of a simulated study in :func:`simulate_tests`' table."""
    return [{"truth": truth, "seed": seed, "prediction": "verdict", "part": part,
             "value": float(holds), "p_value": np.nan, "holds": bool(holds)}
            for part, holds in ((VERDICT_BACKPROP, consistent), (VERDICT_PAPER, paper))]


def _pct(rate: float, low: float, high: float) -> str:
    """A rate and its interval as percentages: ``"80 % [49–94 %]"``."""
    return f"{100 * rate:.0f} % [{100 * low:.0f}–{100 * high:.0f} %]"


def _bootstrap_ci(samples, ci: float) -> tuple[float, float]:
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (np.nan, np.nan)
    low, high = np.quantile(samples, [(1 - ci) / 2, (1 + ci) / 2])
    return float(low), float(high)


#: The estimates of :func:`run` (key → name, unit, default equivalence margin or None);
#: a biological backprop predicts 0 for each. The timing gap has no equivalence test:
#: its prediction (:func:`backprop_latency_prediction`) assumes when the backward pass
#: starts and how fast it runs, so a gap measures the distance from that model only.
ESTIMATES = {
    "spatial": ("spatial: gradient − activation score", "Spearman ρ", 0.3),
    "temporal": ("temporal: gradient order − activation order", "Spearman ρ", 0.3),
    "timing": ("timing: gradient − backprop-predicted latency", "ms", None),
}


def _spearman(x, y) -> float:
    """Spearman ρ over the pairs where both are finite; NaN with < 3 pairs or no spread."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < MIN_TIMED_LAYERS or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return np.nan
    return float(stats.spearmanr(x[ok], y[ok]).statistic)


def _timing_gap(grad_latency, act_latency, backward_rank) -> float:
    """Median over timed gradient layers of (latency − backprop-predicted latency), ms."""
    grad_latency = np.asarray(grad_latency, float)
    if not np.isfinite(act_latency).any() or not np.isfinite(grad_latency).any():
        return np.nan
    gap = grad_latency - backprop_latency_prediction(act_latency, backward_rank)
    return float(np.nanmedian(gap))


def equivalence(value: float, samples, *, margin: float | None, alpha: float = 0.05,
                ci: float = 0.95) -> dict:
    """An estimate against 0 with bootstrap intervals: different, equivalent or neither.

    ``diverges``: the ``ci`` percentile interval excludes 0. ``equivalent``: two one-sided
    tests (TOST) at ``alpha`` reject both ``θ ≤ −margin`` and ``θ ≥ margin``, i.e. the
    ``1 − 2α`` percentile interval lies inside ``(−margin, margin)``; ``p_tost`` is the
    larger of the two one-sided bootstrap p-values ``(1 + #{samples beyond the bound}) /
    (1 + n)``. When neither holds the data cannot tell.

    Parameters
    ----------
    value : float
        The estimate on the data.
    samples : array of shape (n_boot,)
        Its bootstrap resamples (NaN ones are left out).
    margin : float or None
        Equivalence margin, in the estimate's unit; None: no equivalence test
        (``p_tost`` NaN, ``equivalent`` False).

    Returns
    -------
    dict with ``value``, ``ci_low``, ``ci_high``, ``tost_low``, ``tost_high``,
    ``p_tost``, ``diverges``, ``equivalent`` and ``n_boot`` (usable resamples).
    """
    if margin is not None and not margin > 0:
        raise ValueError(f"'margin' must be positive (in the estimate's unit); got {margin!r}.")
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    low, high = _bootstrap_ci(samples, ci)
    tost_low, tost_high = _bootstrap_ci(samples, 1 - 2 * alpha)
    n = len(samples)
    p_tost = (max(1 + np.sum(samples <= -margin), 1 + np.sum(samples >= margin)) / (1 + n)
              if n and np.isfinite(value) and margin is not None else np.nan)
    return {"value": float(value), "ci_low": low, "ci_high": high, "tost_low": tost_low,
            "tost_high": tost_high, "p_tost": p_tost,
            "diverges": bool(np.isfinite(value) and (low > 0 or high < 0)),
            "equivalent": bool(np.isfinite(p_tost) and p_tost < alpha), "n_boot": n}


@dataclass
class HierarchyResult:
    """What :func:`run` computed.

    Attributes
    ----------
    scores : DataFrame
        One row per (modality, signal): spatial or temporal score (Spearman and
        Pearson), its p-value against shuffled layers, the number of targets, and the
        Spearman's bootstrap interval over test images (``spearman_ci_low``,
        ``spearman_ci_high``; NaN when ``n_boot`` is 0 or predictions were not kept).
    tests : DataFrame
        One row per prediction part: ``prediction`` (``"1 spatial"``, ``"2 temporal"``,
        ``"3 where"``), ``part``, ``statistic``, ``value``, ``p_value`` or bootstrap
        ``ci_low``/``ci_high``, ``min_p`` (the smallest p-value the test could give on
        these data, NaN where not computed) and ``can_reach_alpha`` (False where
        ``min_p`` ≥ α: a non-significant result is then no evidence either way),
        ``null`` (in words) and ``holds``.
    predictions : dict of str to bool
        Whether each prediction holds (all its parts).
    consistent_with_backprop : bool
        Predictions 1 (spatial) and 2 (temporal) both hold at ``alpha``.
    paper_finding : bool
        Prediction 3 holds: gradients predict high-level more than early cortex and
        late more than early latencies.
    alpha : float
    signal : str
        The gradient signal tested (e.g. ``"gradient (ce)"``).
    fmri, meg : dict or None
        The encoding results (:func:`gradbrain.analysis.encoding.fmri_encoding`,
        :func:`gradbrain.analysis.encoding.meg_encoding`).
    best : dict
        Best-layer maps per signal (:func:`chosen_layers`: chosen as ``select_on`` says,
        ``peak`` the test score there).
    reliable : ndarray of bool or None
        Vertices with NC ≥ ``min_noise_ceiling``.
    masks : dict of str to ndarray of bool
        Per signal, the vertices its spatial tests used (reliable and predicted, on the
        scores ``select_on`` names).
    units : ndarray of int, shape (n_vertices,), or None
        Unit of every vertex in the spatial tests (-1: not reliable).
    unit_best : dict of str to dict
        Per signal, :func:`unit_best_layer` on those units.
    gradient_part : {"whole", "unique"}
        Whether the gradients were tested as extracted or beyond activations.
    spatial_statistic : {"centre", "best"}
        A unit's layer in the spatial tests: its profile centre or its best layer.
    above_chance : DataFrame or None
        Does each signal predict the brain at all? One row per (modality, signal,
        level): ``level`` ("reliable vertices", "units", "time points"), ``n_tested``,
        ``n_significant`` (Benjamini–Hochberg q < α; :func:`above_chance` for fMRI, the
        per-time test of :func:`gradbrain.analysis.encoding.meg_encoding` for MEG), ``share``,
        ``best_r`` (the largest best-layer r), ``min_p`` (smallest attainable p) and,
        for time points, the first and last significant time (``first_ms``,
        ``last_ms``). None when ``n_perm_chance`` was 0.
    estimates : DataFrame
        How far the gradients are from what a biological backprop predicts, as
        estimates (backprop predicts 0 for each; :data:`ESTIMATES`): ``estimate``,
        ``unit``, ``value``, its ``ci`` bootstrap interval over test images
        (``ci_low``/``ci_high``), the ``1 − 2α`` interval (``tost_low``/``tost_high``),
        ``margin``, ``p_tost``, ``diverges`` (interval excludes 0) and ``equivalent``
        (TOST within ±margin) — :func:`equivalence`. Empty without bootstrap.
    chance_maps : dict
        Per signal, :func:`above_chance` on the reliable vertices (``"vertices"``, arrays
        of length n_vertices, NaN outside them) and on the units (``"units"``).
    verdict_rates : dict
        After :meth:`calibrate`: per verdict (:data:`VERDICT_BACKPROP`,
        :data:`VERDICT_PAPER`) its row of :func:`error_rates`.
    loss : str
        The loss whose gradients were tested.
    ci : float
        Level of the bootstrap confidence intervals.
    """

    scores: pd.DataFrame
    tests: pd.DataFrame
    predictions: dict
    consistent_with_backprop: bool
    paper_finding: bool
    alpha: float
    signal: str
    fmri: dict | None = None
    meg: dict | None = None
    best: dict = field(default_factory=dict)
    reliable: np.ndarray | None = None
    masks: dict = field(default_factory=dict)
    loss: str = ""
    ci: float = 0.95
    units: np.ndarray | None = None
    unit_best: dict = field(default_factory=dict)
    gradient_part: str = "whole"
    spatial_statistic: str = "centre"
    verdict_rates: dict = field(default_factory=dict)
    above_chance: pd.DataFrame | None = None
    chance_maps: dict = field(default_factory=dict)
    estimates: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def signal_name(self) -> str:
        """The tested gradient signal, in words."""
        return (f"unique part of the {self.signal} signal (beyond activations)"
                if self.gradient_part == "unique" else f"{self.signal} signal")

    def calibrate(self, simulated: pd.DataFrame) -> "HierarchyResult":
        """Judge every test against its model-based null, and attach its error rates.

        Parameters
        ----------
        simulated : DataFrame
            :func:`simulate_tests` run on the features and settings of this result.

        Returns
        -------
        HierarchyResult
            A copy whose ``tests`` gain ``p_model`` and ``model_min_p``
            (:func:`model_null_p` and its floor ``1 / (1 + n)``), ``holds_nominal`` (the
            previous ``holds``), ``null_used`` and the error rates of the test as decided
            (``fpr``/``power`` with Wilson bounds, :func:`error_rates`: model-based,
            leaving each simulated study out, or nominal). A test whose model-based null
            can reach α (``model_min_p < alpha``: at least ``1 / alpha`` simulated
            studies per null truth) now holds iff ``p_model < alpha``; the others keep
            their nominal decision. Predictions and verdicts are recomputed from
            ``holds``; the summary quotes every test's rates. The ``estimates`` gain the
            error rates of their equivalence decisions (``fpr``: "equivalent" declared
            where backprop's prediction is false; ``power``: declared under
            ``backprop``), where the simulated table has them, and a model-based test
            of divergence: ``p_backprop`` (:func:`divergence_p`), its floor
            ``backprop_min_p``, ``diverges_model`` and that decision's error rates
            (``div_fpr`` under ``backprop``, ``div_power`` under the other truths;
            :func:`divergence_rates`), and ``backprop_mean``, the contrast's mean over
            the simulated backprop studies (what a planted backprop gives on these
            features, against the 0 of an ideal one).
        """
        import copy

        nominal = error_rates(simulated).set_index("part")
        tests = self.tests.copy()
        p_model, floor = [], []
        for row in tests.itertuples():
            if row.part in TEST_TRUTHS:
                p, n = model_null_p(row.part, row.value, simulated)
            else:  # a modality missing from the study
                p, n = np.nan, 0
            p_model.append(p)
            floor.append(1 / (1 + n) if n else np.nan)
        tests["holds_nominal"] = tests.holds
        tests["p_model"], tests["model_min_p"] = p_model, floor
        usable = (tests.model_min_p < self.alpha).to_numpy()
        model = (error_rates(simulated, null="model", alpha=self.alpha).set_index("part")
                 if usable.any() else nominal)
        for column in ("fpr", "fpr_low", "fpr_high", "power", "power_low", "power_high",
                       "n_null", "n_power"):
            tests[column] = [(model if use else nominal).at[part, column]
                             if part in nominal.index else np.nan
                             for part, use in zip(tests.part, usable)]
        tests["null_used"] = np.where(usable, "model-based", "nominal")
        tests["holds"] = np.where(usable, tests.p_model < self.alpha, tests.holds_nominal)
        tests["holds"] = tests.holds.astype(bool)
        tests["can_reach_alpha"] = np.where(usable, True, tests.can_reach_alpha)
        out = copy.copy(self)
        out.tests = tests
        out.predictions, out.consistent_with_backprop, out.paper_finding = _verdicts(tests)
        verdict_tests = {VERDICT_BACKPROP: ("1 spatial", "2 temporal"),
                         VERDICT_PAPER: ("3 where",)}
        out.verdict_rates = {}
        for name, predictions in verdict_tests.items():
            mine = usable[tests.prediction.isin(predictions).to_numpy()]
            rates = model if mine.size and mine.all() else nominal
            out.verdict_rates[name] = rates.loc[name].to_dict() if name in rates.index else {}
        if len(self.estimates):   # how often "equivalent" is declared, wrongly and rightly
            estimates = self.estimates.copy()
            for column in ("fpr", "fpr_low", "fpr_high", "power", "power_low", "power_high",
                           "n_null", "n_power"):
                estimates[column] = [nominal.at[name, column] if name in nominal.index
                                     else np.nan for name in estimates.estimate]
            # divergence against simulated backprop studies (and its own error rates)
            rows = [divergence_p(e.estimate, e.value, simulated)
                    for e in estimates.itertuples()]
            estimates["p_backprop"] = [p for p, _ in rows]
            estimates["backprop_min_p"] = [1 / (1 + n) if n else np.nan for _, n in rows]
            estimates["diverges_model"] = (estimates.p_backprop < self.alpha) & (
                estimates.backprop_min_p < self.alpha)
            planted = simulated[simulated.truth == "backprop"]
            estimates["backprop_mean"] = [
                float(planted.value[planted.part == name].mean())
                if (planted.part == name).any() else np.nan for name in estimates.estimate]
            rates = divergence_rates(simulated, alpha=self.alpha).set_index("estimate")
            for column in ("div_fpr", "div_fpr_low", "div_fpr_high", "n_div_null",
                           "div_power", "div_power_low", "div_power_high", "n_div_power"):
                estimates[column] = [rates.at[name, column] if name in rates.index
                                     else np.nan for name in estimates.estimate]
            out.estimates = estimates
        return out

    def table(self) -> pd.DataFrame:
        """One tidy row per signal (activation, then gradient): scores and verdicts.

        Returns
        -------
        DataFrame with columns ``feature`` (``"activation"`` or ``"gradient"``), ``loss``
        (empty for activations), and where fMRI was tested ``fmri_score`` (median over
        reliable vertices of the test r/√NC at each vertex's best layer, chosen as
        ``select_on`` said), ``spatial``, ``spatial_p`` (Spearman; shuffled
        layers), ``spatial_ci_low`` and ``spatial_ci_high`` (bootstrap over test images);
        where MEG was tested ``meg_score`` (best r(t) over layers),
        ``temporal``, ``temporal_p``, ``temporal_ci_low`` and ``temporal_ci_high``
        (Spearman; bootstrap over test images); ``ci`` the intervals' level; and
        ``consistent_with_backprop`` and
        ``paper_finding`` (gradient row only; missing for the activation row).
        """
        by = self.scores.set_index(["score", "signal"]) if len(self.scores) else None

        def score_columns(kind: str, signal: str) -> dict:
            found = by.loc[(kind, signal)]
            return {kind: float(found["spearman"]), f"{kind}_p": float(found["p_spearman"]),
                    f"{kind}_ci_low": float(found["spearman_ci_low"]),
                    f"{kind}_ci_high": float(found["spearman_ci_high"])}

        rows = []
        for feature, signal in (("activation", "activation"), ("gradient", self.signal)):
            row: dict = {"feature": feature, "loss": self.loss if feature == "gradient" else ""}
            if self.fmri is not None and signal in self.best:
                peak = self.best[signal]["peak"]
                keep = self.reliable if self.reliable is not None else slice(None)
                row["fmri_score"] = float(np.nanmedian(peak[keep])) if np.size(peak[keep]) \
                    else np.nan
                row.update(score_columns("spatial", signal))
            if self.meg is not None and signal in self.meg:
                row["meg_score"] = float(np.max(self.meg[signal]["peak"]))
                row.update(score_columns("temporal", signal))
            row["ci"] = self.ci
            if feature == "gradient":
                row["consistent_with_backprop"] = self.consistent_with_backprop
                row["paper_finding"] = self.paper_finding
            rows.append(row)
        return pd.DataFrame(rows)

    def save(self, path, **labels) -> Path:
        """Write :meth:`table` to a CSV file, atomically (what a sweep collects).

        Parameters
        ----------
        path : path-like
            The ``.csv`` file to write; its folder is created.
        **labels
            Constant columns put first, e.g. ``model="resnet50", subject=1``.

        Returns
        -------
        Path of the written file.
        """
        from ._utils import atomic_path

        path = Path(path).expanduser()
        if path.suffix != ".csv":
            raise ValueError(f"Result tables are written as CSV; got {str(path)!r}, give a "
                             "path ending in '.csv'.")
        table = self.table()
        for i, (key, value) in enumerate(labels.items()):
            table.insert(i, key, value)
        with atomic_path(path, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False)
        return path

    def _chance_lines(self) -> list[str]:
        """The above-chance results of both signals, in words."""
        if self.above_chance is None or self.above_chance.empty:
            return []
        parts = []
        for row in self.above_chance.itertuples():
            what = f"{row.n_significant} of {row.n_tested} {row.level}"
            if row.level == "time points" and row.n_significant:
                what += f" (first at {row.first_ms:.0f} ms, last at {row.last_ms:.0f} ms)"
            parts.append((row.signal, what))
        by_signal = {}
        for signal, what in parts:
            by_signal.setdefault(signal, []).append(what)
        said = "; ".join(f"{signal} {', '.join(whats)}" for signal, whats in by_signal.items())
        return [f"- Above chance at all (best layer vs shuffled test images, "
                f"Benjamini–Hochberg FDR q < {self.alpha}): {said}."]

    def _estimate_lines(self) -> list[str]:
        """The estimates against backprop's predictions, in words."""
        if self.estimates is None or self.estimates.empty:
            return []
        lines = [f"- Estimates (a biological backprop predicts 0 for each; "
                 f"{100 * self.ci:.0f} % bootstrap intervals over test images; equivalence "
                 f"by two one-sided tests at α = {self.alpha} within ±margin):"]
        for row in self.estimates.itertuples():
            if not np.isfinite(row.value):
                lines.append(f"  - {row.estimate}: not estimable here.")
                continue
            number = (f"{row.value:+.0f} {row.unit} [{row.ci_low:+.0f}, {row.ci_high:+.0f}]"
                      if row.unit == "ms" else
                      f"{row.value:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}] {row.unit}")
            margin = f"±{row.margin:g}{' ms' if row.unit == 'ms' else ''}"
            if not np.isfinite(row.margin):   # no equivalence test: the interval only
                word = ("**differs** from that prediction" if row.diverges else
                        "consistent with that prediction (its interval holds 0)")
                lines.append(f"  - {row.estimate}: {number}; {word} — which assumes the "
                             "backward pass starts when the forward sweep ends and runs at "
                             "its pace.")
                continue
            if row.diverges and not row.equivalent:
                word = f"**differs** from backprop's prediction (and is not within {margin})"
            elif row.equivalent and not row.diverges:
                word = f"**equivalent** to backprop's prediction within {margin}"
            elif row.equivalent:
                word = f"differs from 0 but lies within {margin} (equivalent at that margin)"
            else:
                word = (f"**inconclusive**: the interval holds 0 and reaches beyond {margin}")
            rates = ""
            if np.isfinite(getattr(row, "power", np.nan)):
                power = _pct(row.power, row.power_low, row.power_high)
                rates = (f" (\"equivalent\" was declared in {power} of {int(row.n_power)} "
                         f"simulated backprop studies and, wrongly, in "
                         f"{_pct(row.fpr, row.fpr_low, row.fpr_high)} of {int(row.n_null)} "
                         "others)")
            model = ""
            if np.isfinite(getattr(row, "p_backprop", np.nan)):
                verdict = ("**diverges from backprop**" if row.diverges_model else
                           "not shown to diverge from backprop")
                if row.backprop_min_p >= self.alpha:
                    verdict = "cannot be judged against simulated backprop (too few studies)"
                centred = (f"whose contrast averages {row.backprop_mean:+.2f} on these "
                           "features, where an ideal backprop gives 0"
                           if np.isfinite(getattr(row, "backprop_mean", np.nan)) else
                           "whose contrasts need not be centred on 0 on real features")
                model = (f" Against {int(row.n_div_null)} studies simulated with a planted "
                         f"backprop ({centred}): "
                         f"{verdict}, p = {row.p_backprop:.3g} (this decision: false "
                         f"divergence {_pct(row.div_fpr, row.div_fpr_low, row.div_fpr_high)}, "
                         f"power {_pct(row.div_power, row.div_power_low, row.div_power_high)}"
                         f" of {int(row.n_div_power)}).")
            lines.append(f"  - {row.estimate}: {number}; {word}{rates}.{model}")
        return lines

    def summary(self) -> str:
        """The conclusion, in words, from the computed tests (Markdown)."""
        names = {"1 spatial": "Spatial prediction (gradient of layer l where activation l is, "
                              "ordered along the hierarchy)",
                 "2 temporal": "Temporal prediction (gradients after the forward sweep, top "
                               "layer first)",
                 "3 where": "The paper's positive finding (gradients predict high-level "
                            "cortex and late latencies)"}
        lines, untested, failing = self._chance_lines(), [], []
        for key, holds in self.predictions.items():
            parts = self.tests[self.tests.prediction == key]
            missing = parts[parts.statistic == "available"]
            parts = parts[parts.statistic != "available"]
            failed = [p for p, ok in zip(parts.part, parts.holds) if not ok]
            absent = " and ".join(m.replace(" data", "") for m in missing.part)
            if parts.empty:
                verdict = f"**not tested** (no {absent} data in this study)"
                untested.append(key)
            else:
                verdict = "**holds**" if not failed else (
                    "**does not hold** (fails: " + "; ".join(failed) + ")")
                if failed:
                    failing.append(key)
                if len(missing):
                    verdict += f"; its {absent} part was not tested (no {absent} data)"
                    untested.append(key)
            lines.append(f"- {names[key]}: {verdict}.")
        blind = self.tests[~self.tests["can_reach_alpha"]] if "can_reach_alpha" in self.tests \
            else self.tests.iloc[:0]
        for _, row in blind.iterrows():
            lines.append(f"- Caution: \"{row.part}\" could not reach α = {self.alpha} on these "
                         f"data (smallest attainable p = {row.min_p:.3g}): its failure is no "
                         "evidence against the prediction.")
        backprop = {"1 spatial", "2 temporal"}
        if backprop & set(failing) or not backprop & set(untested):
            verdict = "consistent" if self.consistent_with_backprop else "**not consistent**"
            verdict = f"is {verdict} with a biological backpropagation (predictions 1 and 2)"
        else:
            verdict = ("**cannot be judged** against a biological backpropagation: prediction "
                       + " and ".join(sorted(p.split()[0] for p in backprop & set(untested)))
                       + " was not tested (give the chapter a study with both fMRI and MEG, "
                       "or a MEG study next to the fMRI one)")
        finding = ("is" if self.paper_finding else
                   "is not fully tested" if "3 where" in untested and "3 where" not in failing
                   else "is not")
        if "fpr" in self.tests:  # calibrated: quote each test's measured error rates
            lines.append("- Error rates measured on studies simulated from these features, "
                         "sizes and noise (false positives under the truths where a test "
                         "must fail; power under the one where it must hold; Wilson 95 %):")
            for row in self.tests.itertuples():
                if not np.isfinite(row.fpr):
                    continue
                null = ("its model-based null (p = {:.3g})".format(row.p_model)
                        if row.null_used == "model-based" else
                        "its nominal null (too few simulated studies for a model-based one)")
                fpr = _pct(row.fpr, row.fpr_low, row.fpr_high)
                power = _pct(row.power, row.power_low, row.power_high)
                lines.append(f"  - \"{row.part}\": false positives {fpr} of {row.n_null}, "
                             f"power {power} of {row.n_power}; judged against {null}.")
            rates = self.verdict_rates.get(VERDICT_BACKPROP, {})
            if rates and np.isfinite(rates.get("power", np.nan)) and not untested:
                power = _pct(rates["power"], rates["power_low"], rates["power_high"])
                fpr = _pct(rates["fpr"], rates["fpr_low"], rates["fpr_high"])
                verdict += (f" (as a test, this verdict found a planted backprop in {power} "
                            f"of {rates['n_power']} simulated studies and claimed one where "
                            f"there was none in {fpr} of {rates['n_null']})")
        lines += self._estimate_lines()
        lines.append(f"- Conclusion at α = {self.alpha}: the {self.signal_name} {verdict}; "
                     f"the paper's positive finding {finding} reproduced.")
        return "\n".join(lines)


def run(study, features=None, *, loss: str | None = None, alpha: float = 0.05,
        min_noise_ceiling: float = 10.0, min_score: float = 0.1, n_units: int = 20,
        n_perm: int = 10_000,
        n_boot: int = 1000, ci: float = 0.95, seed: int = 0, cv: int = 5, device=None,
        fmri: dict | None = None, meg: dict | None = None, meg_study=None,
        meg_features=None, gradient_part: str = "whole", n_perm_chance: int = 1000,
        margins: dict | None = None, select_on: str = "train",
        spatial_statistic: str = "centre", progress: bool = False) -> HierarchyResult:
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
       activation peak score) and (b) gradients peak later than activations (median latency difference,
       bootstrap CI above 0).

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
    fmri, meg : dict or None
        Precomputed encoding results, to skip refitting.
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
        null truths better (book, Methods: "Which spatial statistic").
    margins : dict or None
        Equivalence margins of the estimates (:data:`ESTIMATES`: ``"spatial"`` and
        ``"temporal"``, in Spearman ρ, default 0.3; ``"timing"``, in ms, default None:
        no equivalence test); keys left out keep their default.

    Returns
    -------
    HierarchyResult
    """
    from .features import beyond_activations, extract, resolve_loss
    from .analysis.encoding import fmri_encoding, meg_encoding

    for name, value in (("alpha", alpha), ("ci", ci)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"'{name}' must be a number between 0 and 1 (e.g. {name}="
                             f"{0.05 if name == 'alpha' else 0.95}); got {value!r}.")
    for name, value, low in (("n_perm", n_perm, 1), ("n_boot", n_boot, 0),
                             ("n_perm_chance", n_perm_chance, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"'{name}' must be an integer >= {low}; got {value!r}.")
    if features is None:
        if not study.truth:
            raise ValueError("'features' are needed for real data: extract them with "
                             "gradbrain.features.extract(model, study.images).")
        from . import models

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
    if gradient_part == "unique":
        if study.betas is not None or meg_study is None:
            features = beyond_activations(features, study.split == "train", loss=loss,
                                          cv=cv, device=device)
        if meg_study is not None:
            meg_features = beyond_activations(meg_features, meg_study.split == "train",
                                              loss=loss, cv=cv, device=device)
    signal = f"gradient ({loss})"
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
        fmri = fmri or fmri_encoding(study, features, cv=cv, device=device, progress=progress,
                                     return_prediction=n_boot > 0 or n_perm_chance > 0)
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
        meg = meg or meg_encoding(meg_study, meg_features, cv=cv, n_boot=n_boot, ci=ci, seed=seed,
                                  device=device, progress=progress)
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
        consistent_with_backprop=consistent, paper_finding=paper, alpha=alpha, signal=signal, fmri=fmri, meg=meg,
        best=best, reliable=reliable, masks=usable, loss=loss, ci=ci,
        units=units if study.betas is not None else None,
        unit_best=unit_best if study.betas is not None else {},
        gradient_part=gradient_part, spatial_statistic=spatial_statistic,
        above_chance=chance if len(chance) else None,
        chance_maps=chance_maps, estimates=pd.DataFrame(estimates),
    )


# --------------------------------------------------------------------------- error rates

#: For every test part of :func:`run`: the planted truths of
#: :func:`gradbrain.data.simulated.make_study` under which it must not hold (its nulls),
#: and the truth under which it should (its power).
TEST_TRUTHS = {
    "gradient and activation layer maps agree": (("none", "paper"), "backprop"),
    "gradient spatial score > 0": (("none", "paper"), "backprop"),
    "gradients after the forward sweep": (("none", "forward"), "backprop"),
    "gradient latency follows the autograd order": (("none", "forward", "paper"), "backprop"),
    "gradients gain more in high-level than early cortex": (("none", "forward", "backprop"),
                                                            "paper"),
    "gradients peak later than activations": (("none", "forward"), "paper"),
}
#: Rows of :func:`simulate_tests` for the two verdicts of a simulated study.
VERDICT_BACKPROP = "verdict: consistent with backprop"
VERDICT_PAPER = "verdict: the paper's finding"
TEST_TRUTHS[VERDICT_BACKPROP] = (("none", "forward", "paper"), "backprop")
TEST_TRUTHS[VERDICT_PAPER] = (("none", "forward", "backprop"), "paper")
#: The estimates' equivalence decisions (rows ``prediction == "estimate"`` of
#: :func:`simulate_tests`; not decided against model-based nulls): equivalent to
#: backprop only under ``backprop`` (and, in space, under ``forward``, whose gradients
#: sit where activations do).
TEST_TRUTHS[ESTIMATES["spatial"][0]] = (("none", "paper"), "backprop")
TEST_TRUTHS[ESTIMATES["temporal"][0]] = (("none", "forward", "paper"), "backprop")


def _simulated_tests(features, truth: str, seed: int, n_images: int, noise: float,
                     modalities: dict, run_kwargs: dict, n_threads: int | None,
                     cache_dir: Path | None = None, study_kwargs: dict | None = None
                     ) -> list[dict]:
    """Simulate one study from ``features`` and judge it as :func:`run` does.

    With ``cache_dir``, the study's rows are read from / written to
    ``<cache_dir>/<truth>-<seed>.csv`` (atomically), so an interrupted series resumes.
    """
    import torch

    from ._utils import atomic_path, discard_unreadable
    from .data.simulated import make_study

    path = cache_dir / f"{truth}-{seed}.csv" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            cached = pd.read_csv(path)
            missing = {"truth", "seed", "prediction", "part", "value", "p_value", "holds"} \
                - set(cached.columns)
            if missing or not {VERDICT_BACKPROP, VERDICT_PAPER} <= set(cached.part):
                raise ValueError("not a whole simulated study (columns or verdict rows "
                                 "missing: truncated?)")
            return cached.to_dict("records")
        except (OSError, ValueError, pd.errors.ParserError) as err:
            discard_unreadable(path, err, what="Cached simulated study",
                               then="it is simulated again")
    if n_threads:
        torch.set_num_threads(n_threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = make_study(seed, n_images=n_images, features=features, gradient_truth=truth,
                           noise=noise, gradient_loss=run_kwargs.get("loss") or
                           features.losses[0], **modalities, **(study_kwargs or {}))
        # the above-chance tests describe a study and do not enter its verdicts: skipped
        result = run(study, features, seed=seed, **{**run_kwargs, "n_perm_chance": 0})
    rows = [{"truth": truth, "seed": seed, "prediction": t.prediction, "part": t.part,
             "value": t.value, "p_value": t.p_value, "holds": bool(t.holds)}
            for t in result.tests.itertuples()]
    rows += [{"truth": truth, "seed": seed, "prediction": "estimate", "part": e.estimate,
              "value": e.value, "p_value": e.p_tost, "holds": bool(e.equivalent)}
             for e in result.estimates.itertuples()   # n_boot 0: no decision to keep
             if e.estimate in TEST_TRUTHS and run_kwargs.get("n_boot", 1000) > 0]
    # the verdict rows last: a cached study that has them was written whole
    rows += _verdict_rows(truth, seed, result.consistent_with_backprop, result.paper_finding)
    if path is not None:
        with atomic_path(path, suffix=".csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    return rows


#: Bump when a change to the simulation or the tests changes simulated statistics: cached
#: and shipped tables of :func:`simulate_tests` carry it in their key.
SIMULATION_VERSION = 4   # 2: the estimates' equivalence rows; 3: selection on training CV;
#                          4: spatial tests on profile centres (run's spatial_statistic)
_REFERENCE = Path(__file__).parent / "reference"


def _simulation_key(features, n_images: int, noise: float, modalities: dict,
                    run_kwargs: dict, sizes: dict | None = None) -> dict:
    """Every setting that changes :func:`simulate_tests`' rows (not the seeds, not the
    device), with :func:`run`'s defaults filled in; ``sizes`` (the study sizes that are
    not make_study's defaults) only where given, so that keys of default-sized studies,
    and the shipped tables they find, stay as they were."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(run).parameters.items()
                if p.default is not inspect.Parameter.empty}
    settings = {name: run_kwargs.get(name, defaults[name]) for name in (
        "alpha", "min_noise_ceiling", "min_score", "n_units", "n_perm", "n_boot", "ci", "cv",
        "gradient_part", "select_on", "spatial_statistic")}
    loss = run_kwargs.get("loss") or features.losses[0]
    return {"version": SIMULATION_VERSION, "model": features.model,
            "weights": features.weights, "pool": features.pool, "loss": loss,
            "n_images": int(n_images), "noise": float(noise), **modalities,
            **{k: (float(v) if isinstance(v, float) else v) for k, v in settings.items()},
            **{k: int(v) for k, v in (sizes or {}).items()}}


def _fingerprint(features, loss: str) -> np.ndarray:
    """Per layer, mean and sd of the activations and of the ``loss`` gradients (float64):
    what identifies the features of a shipped table across machines, whose last bits
    differ."""
    values = []
    for layer in features.layers:
        for array in (features.activations[layer], features.gradients[loss][layer]):
            array = np.asarray(array, dtype=np.float64)
            values += [array.mean(), array.std()]
    return np.array(values)


def _shipped_simulations(key: dict, fingerprint: np.ndarray,
                         pattern: str = "simulated_tests-*.json") -> pd.DataFrame | None:
    """A table shipped in ``gradbrain/reference`` for these settings and features (its
    key file's name matching ``pattern``)."""
    import json

    for meta_path in sorted(_REFERENCE.glob(pattern)):
        meta = json.loads(meta_path.read_text())
        shipped = np.asarray(meta["fingerprint"], dtype=np.float64)
        if meta["key"] == key and shipped.shape == fingerprint.shape and np.allclose(
                shipped, fingerprint, rtol=1e-3, atol=1e-6 * np.abs(shipped).max()):
            return pd.read_csv(meta_path.with_suffix(".csv.gz"))
    return None


def write_reference(simulated: pd.DataFrame, features, *, n_images: int | None = None,
                    noise: float = 1.0, simulate_fmri: bool = True, simulate_meg: bool = True,
                    name: str, note: str = "", **run_kwargs) -> Path:
    """Ship a table of :func:`simulate_tests` with the library (maintainers' tool).

    Writes ``gradbrain/reference/simulated_tests-<name>.csv.gz`` and its key (the
    settings and a fingerprint of ``features``) as ``.json``; :func:`simulate_tests`
    then reads its studies instead of simulating them whenever it is called with the
    same settings on the same features. Give the same arguments as to that call.
    """
    import json

    from ._utils import atomic_path

    modalities = {"fmri": bool(simulate_fmri), "meg": bool(simulate_meg)}
    n_images = features.n_images if n_images is None else n_images
    key = _simulation_key(features, n_images, noise, modalities, run_kwargs)
    base = _REFERENCE / f"simulated_tests-{name}"
    with atomic_path(base.with_suffix(".csv.gz"), suffix=".csv.gz") as tmp:
        simulated.to_csv(tmp, index=False)
    meta = {"key": key, "fingerprint": _fingerprint(features, key["loss"]).tolist(),
            "n_studies": int(simulated[["truth", "seed"]].drop_duplicates().shape[0]),
            "note": note}
    with atomic_path(base.with_suffix(".json"), suffix=".json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return base.with_suffix(".json")


def simulate_tests(features, *, n_images: int | None = None, noise: float = 1.0,
                   truths=("none", "forward", "backprop", "paper"), n_seeds: int = 20,
                   first_seed: int = 1000, n_jobs: int = 1, simulate_fmri: bool = True,
                   simulate_meg: bool = True, images=None, n_test: int | None = None,
                   n_fmri_repeats: int | None = None, n_meg_test_repeats: int | None = None,
                   cache=True, progress: bool = True, **run_kwargs) -> pd.DataFrame:
    """Run every test of :func:`run` on studies simulated from the chapter's own features.

    For each planted truth and seed, :func:`gradbrain.data.simulated.make_study` builds
    fMRI and MEG responses from ``features`` (the model the chapter tests, on the
    embedded images) and :func:`run` judges them with the same settings. The table this
    returns gives each test's false-positive rate and power (:func:`error_rates`) and its
    model-based null (:meth:`HierarchyResult.calibrate`) on these very features, sizes
    and noise — not on idealised layer-specific features, whose layers do not share
    information the way a real network's do.

    Parameters
    ----------
    features : Features
        Extracted on the first ``n_images`` embedded images
        (:func:`gradbrain.data.load_embedded`), or on ``images``, with the tested loss.
    n_images : int or None
        Images per simulated study; default ``features.n_images``.
    noise : float
        Noise scale of the simulated studies (``make_study``'s ``noise``).
    truths : sequence of {"none", "forward", "backprop", "paper"}
        Planted gradient truths to simulate.
    n_seeds : int
        Studies per truth (seeds ``first_seed`` … ``first_seed + n_seeds - 1``; keep them
        apart from the seed of the study under test).
    n_jobs : int
        Studies simulated in parallel (processes; each keeps to its share of the cores).
    simulate_fmri, simulate_meg : bool
        Modalities of the simulated studies (as in the study under test: an fMRI-only
        study needs no simulated MEG).
    images : ImageSet or None
        The stimuli ``features`` were extracted on, when they are not the embedded ones
        (e.g. a real study's ``images``): the studies are then simulated at that study's
        size from its own features.
    n_test, n_fmri_repeats, n_meg_test_repeats : int or None
        Test images, fMRI repeats per image and MEG repeats per test image of the
        simulated studies (e.g. a real study's); None: ``make_study``'s defaults (a
        fifth of the images, 3, 12).
    cache : bool or path-like
        Keep every simulated study's rows under ``<cache>/simulated_tests/<key>/``
        (True: ``$GRADBRAIN_DATA``), keyed on every setting that changes them and on the
        features; an interrupted call resumes. Studies of a table shipped with the
        library for the same settings and features (``gradbrain/reference``, written by
        :func:`write_reference`) are read from it. False: always simulate.
    **run_kwargs
        Passed to :func:`run` (``loss``, ``alpha``, ``n_perm``, ``n_boot``, ``cv``,
        ``min_noise_ceiling``, ``min_score``, ``n_units``, ``gradient_part``, ``device``).

    Returns
    -------
    DataFrame
        One row per (truth, seed, test part): ``truth``, ``seed``, ``prediction``,
        ``part``, ``value`` (the test's statistic; larger is more evidence for it),
        ``p_value`` and ``holds``; plus the two verdict rows per study
        (:data:`VERDICT_BACKPROP`, :data:`VERDICT_PAPER`, value 1.0 or 0.0).
    """
    import os

    from tqdm import tqdm

    from .data.simulated import GRADIENT_TRUTHS

    truths = [truths] if isinstance(truths, str) else list(truths)
    for truth in truths:
        check_in_allowed("truths", truth, GRADIENT_TRUTHS)
    for name, value in (("n_seeds", n_seeds), ("n_jobs", n_jobs), ("first_seed", first_seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (
                0 if name == "first_seed" else 1):
            kind = "non-negative" if name == "first_seed" else "positive"
            raise ValueError(f"'{name}' must be a {kind} integer; got {value!r}.")
    if "seed" in run_kwargs or "fmri" in run_kwargs or "meg" in run_kwargs:
        raise ValueError("'seed', 'fmri' and 'meg' are set per simulated study; do not pass "
                         "them to simulate_tests.")
    if not (simulate_fmri or simulate_meg):
        raise ValueError("At least one of 'simulate_fmri' and 'simulate_meg' must be True.")
    modalities = {"fmri": bool(simulate_fmri), "meg": bool(simulate_meg)}
    n_images = features.n_images if n_images is None else n_images
    sizes = {name: value for name, value in (
        ("n_test", n_test), ("n_fmri_repeats", n_fmri_repeats),
        ("n_meg_test_repeats", n_meg_test_repeats)) if value is not None}
    study_kwargs = {**sizes, **({"images": images} if images is not None else {})}
    jobs = [(truth, first_seed + s) for truth in truths for s in range(n_seeds)]
    rows, cache_dir = [], None
    if cache is not False:
        import json

        from ._utils import get_data_home, hash_arrays

        key = _simulation_key(features, n_images, noise, modalities, run_kwargs, sizes)
        shipped = _shipped_simulations(key, _fingerprint(features, key["loss"]))
        if shipped is not None:
            wanted, have = set(jobs), set(zip(shipped.truth, shipped.seed))
            rows += shipped[[job in wanted for job in zip(shipped.truth, shipped.seed)]] \
                .to_dict("records")
            jobs = [job for job in jobs if job not in have]
        settings = np.frombuffer(json.dumps(key, sort_keys=True).encode(), dtype=np.uint8)
        digest = hash_arrays([settings, *(features.activations[layer]
                                          for layer in features.layers),
                              *(features.gradients[key["loss"]][layer]
                                for layer in features.layers)])
        root = get_data_home() if cache is True else Path(cache).expanduser()
        cache_dir = root / "simulated_tests" / digest
    bar = tqdm(total=len(jobs), desc="simulated studies", disable=not progress or not jobs)
    if n_jobs == 1:
        for truth, seed in jobs:
            rows += _simulated_tests(features, truth, seed, n_images, noise, modalities,
                                     run_kwargs, None, cache_dir, study_kwargs)
            bar.update()
    elif jobs:
        from joblib import Parallel, delayed

        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)  # the cores this process may use
        threads = max(1, cores // n_jobs)
        for done in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(  # joblib ≥ 1.4
                delayed(_simulated_tests)(features, truth, seed, n_images, noise, modalities,
                                          run_kwargs, threads, cache_dir, study_kwargs)
                for truth, seed in jobs):
            rows += done
            bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    order = {truth: i for i, truth in enumerate(truths)}
    return table.sort_values(["truth", "seed"], key=lambda c: c.map(order) if c.name == "truth"
                             else c, kind="stable").reset_index(drop=True)


def study_sizes(study, meg_study=None) -> dict:
    """A study's images and sizes, as :func:`simulate_tests` takes them, to measure error
    rates at that study's own size (e.g. NSD's or THINGS-MEG's) from its own features.

    The simulated studies carry every modality on ``study``'s images; a separate MEG
    study (other images) lends only its number of repeats per test image.

    Parameters
    ----------
    study : Study
        With ``images`` and ``split``; ``betas`` (n_images, n_repeats, n_vertices) and/or
        ``epochs`` (metadata ``image_id``, ``split``).
    meg_study : Study or None
        A separate MEG study.

    Returns
    -------
    dict with ``images`` (``study.images``), ``n_test`` (its test images) and, per
    modality present, ``n_fmri_repeats`` (``betas.shape[1]``) and ``n_meg_test_repeats``
    (the median number of trials of a test image).
    """
    if study.images is None:
        raise ValueError(f"Study {study.name!r} has no images: simulating at its size needs "
                         "them (for THINGS-MEG give things['images_dir']).")
    sizes = {"images": study.images, "n_test": int((np.asarray(study.split) == "test").sum())}
    if study.betas is not None:
        sizes["n_fmri_repeats"] = int(study.betas.shape[1])
    epochs = (meg_study if meg_study is not None else study).epochs
    if epochs is not None:
        meta = epochs.metadata
        trials = meta[meta["split"] == "test"].groupby("image_id").size()
        if len(trials):
            sizes["n_meg_test_repeats"] = int(np.median(trials))
    return sizes


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of a binomial proportion k / n (NaN for n = 0)."""
    if n == 0:
        return (np.nan, np.nan)
    z = stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _leave_one_out(simulated: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Each simulated study's tests decided by :func:`model_null_p` against all the
    *other* simulated studies (and its verdicts recomputed from those decisions)."""
    estimates = [name for name, _, _ in ESTIMATES.values()]
    tests = simulated[~simulated.part.isin((VERDICT_BACKPROP, VERDICT_PAPER, *estimates))]
    rows = []
    for (truth, seed), study in tests.groupby(["truth", "seed"], sort=False):
        others = tests[~((tests.truth == truth) & (tests.seed == seed))]
        decided = study[["truth", "seed", "prediction", "part", "value"]].copy()
        decided["p_value"] = [model_null_p(row.part, row.value, others)[0]
                              for row in study.itertuples()]
        decided["holds"] = decided.p_value < alpha
        _, consistent, paper = _verdicts(decided)
        rows += decided.to_dict("records") + _verdict_rows(truth, seed, consistent, paper)
    return pd.DataFrame(rows)


def error_rates(simulated: pd.DataFrame, *, null: str = "nominal",
                alpha: float = 0.05) -> pd.DataFrame:
    """False-positive rate and power of every test, from :func:`simulate_tests`' table.

    Parameters
    ----------
    simulated : DataFrame
        The output of :func:`simulate_tests`.
    null : {"nominal", "model"}
        Rates of the tests as :func:`run` decided them, or as decided against their
        model-based nulls (:func:`model_null_p`), each simulated study against all the
        others (leave one out: its p-value floor is ``1 / n`` with ``n`` studies per
        truth).
    alpha : float
        Level of the model-based decisions.

    Returns
    -------
    DataFrame, one row per test part (in :data:`TEST_TRUTHS` order), with
    ``null_truths``, ``fpr`` (fraction of studies under those truths in which the test
    held), ``fpr_low``/``fpr_high`` (Wilson 95 %), ``n_null``, ``worst_null`` and
    ``worst_fpr`` (the null truth with the highest rate, and that rate), ``power_truth``,
    ``power``, ``power_low``/``power_high``, ``n_power``, and one ``held_<truth>``
    column per simulated truth. Rates without simulated studies are NaN.
    """
    missing = {"truth", "part", "holds"} - set(simulated.columns)
    if missing:
        raise ValueError(f"'simulated' must be the table of simulate_tests(); it lacks the "
                         f"columns {sorted(missing)}.")
    check_in_allowed("null", null, ("nominal", "model"))
    if null == "model":
        missing = {"seed", "prediction", "value"} - set(simulated.columns)
        if missing:
            raise ValueError(f"Model-based rates need the columns {sorted(missing)} of "
                             "simulate_tests()' table.")
        simulated = _leave_one_out(simulated, alpha)
    truths = list(dict.fromkeys(simulated.truth))
    rows = []
    for part, (nulls, power_truth) in TEST_TRUTHS.items():
        mine = simulated[simulated.part == part]
        if mine.empty:
            continue
        held = mine.groupby("truth").holds.agg(["sum", "count"])
        null = held.loc[held.index.intersection(nulls)]
        k, n = int(null["sum"].sum()), int(null["count"].sum())
        rates = (null["sum"] / null["count"]).sort_values(ascending=False)
        hit = held.loc[[power_truth]] if power_truth in held.index else held.iloc[:0]
        kp, npow = int(hit["sum"].sum()), int(hit["count"].sum())
        row = {"part": part, "null_truths": ", ".join(nulls),
               "fpr": k / n if n else np.nan, **dict(zip(("fpr_low", "fpr_high"),
                                                          _wilson(k, n))),
               "n_null": n, "worst_null": rates.index[0] if len(rates) else "",
               "worst_fpr": float(rates.iloc[0]) if len(rates) else np.nan,
               "power_truth": power_truth, "power": kp / npow if npow else np.nan,
               **dict(zip(("power_low", "power_high"), _wilson(kp, npow))), "n_power": npow}
        for truth in truths:
            row[f"held_{truth}"] = (float(held.loc[truth, "sum"] / held.loc[truth, "count"])
                                    if truth in held.index else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


#: Where :func:`read_power_curve` finds the shipped grid (``benchmarks/power_curve.py``).
POWER_CURVE = _REFERENCE / "power_curve.csv.gz"
_POWER_LABELS = ("weights", "n_images", "n_test", "noise")


def power_curve(simulations: dict) -> pd.DataFrame:
    """Error rates of every test along a grid of models, sizes and noise levels.

    Parameters
    ----------
    simulations : dict
        ``(weights, n_images, n_test, noise)`` → the table :func:`simulate_tests` made
        at that grid point (``weights`` a label such as ``"ImageNet"``; ``n_test`` the
        study's test images).

    Returns
    -------
    DataFrame: :func:`error_rates` of each point (nominal decisions, as :func:`run`
    made them), with ``weights``, ``n_images``, ``n_test`` and ``noise`` first, then
    ``n_seeds`` (studies per truth) and ``version`` (:data:`SIMULATION_VERSION`) last.
    """
    if not simulations:
        raise ValueError("'simulations' is empty: give at least one grid point.")
    frames = []
    for point, simulated in simulations.items():
        if not isinstance(point, tuple) or len(point) != len(_POWER_LABELS):
            raise ValueError(f"Keys of 'simulations' must be tuples {_POWER_LABELS}; got "
                             f"{point!r}.")
        rates = error_rates(simulated)
        for name, value in reversed(list(zip(_POWER_LABELS, point))):
            rates.insert(0, name, value)
        rates["n_seeds"] = int(simulated.groupby("truth").seed.nunique().min())
        rates["version"] = SIMULATION_VERSION
        frames.append(rates)
    return pd.concat(frames, ignore_index=True)


def read_power_curve(path=None) -> pd.DataFrame:
    """The shipped power curve (:func:`power_curve` of ``benchmarks/power_curve.py``).

    Parameters
    ----------
    path : path-like or None
        Another table written the same way; default :data:`POWER_CURVE`.

    Returns
    -------
    DataFrame. A table made by another :data:`SIMULATION_VERSION` (its tests have
    changed since) is returned with a warning.
    """
    path = Path(POWER_CURVE if path is None else path)
    if not path.exists():
        raise FileNotFoundError(f"No power curve at {path}: make one with "
                                "'python benchmarks/power_curve.py --ship'.")
    table = pd.read_csv(path)
    missing = {*_POWER_LABELS, "part", "power", "fpr"} - set(table.columns)
    if missing:
        raise ValueError(f"{path} is not a power curve: it lacks the columns "
                         f"{sorted(missing)}.")
    made = set(table["version"]) if "version" in table else {"unknown"}
    if made != {SIMULATION_VERSION}:
        warnings.warn(f"The power curve {path.name} was made by simulation version "
                      f"{', '.join(map(str, sorted(made, key=str)))}, not "
                      f"{SIMULATION_VERSION}: the tests changed since. Rerun "
                      "'python benchmarks/power_curve.py --ship'.", UserWarning, stacklevel=2)
    return table


def power_curve_summary(table: pd.DataFrame, *, part: str = VERDICT_BACKPROP,
                        target: float = 0.8, noise: float = 1.0) -> str:
    """What sample size the ``part`` needs, in words, per set of weights (Markdown).

    Parameters
    ----------
    table : DataFrame
        :func:`power_curve` or :func:`read_power_curve`.
    part : str
        The test or verdict (default: "consistent with backprop").
    target : float
        Power a size must reach — its Wilson lower bound, so that a lucky few seeds do
        not count.
    noise : float
        The noise level the sentence is about.

    Returns
    -------
    str, one paragraph per ``weights``.
    """
    rows = table[(table.part == part) & np.isclose(table.noise, noise)]
    if rows.empty:
        raise ValueError(f"The table has no rows for {part!r} at noise {noise}; it has "
                         f"noise levels {sorted(set(table.noise))}.")
    lines = []
    for weights, mine in rows.groupby("weights", sort=False):
        mine = mine.sort_values("n_images")
        sizes = "; ".join(
            f"{r.n_images} images ({r.n_test} test): power "
            f"{_pct(r.power, r.power_low, r.power_high)}, false positives "
            f"{_pct(r.fpr, r.fpr_low, r.fpr_high)}" for r in mine.itertuples())
        enough = mine[mine.power_low >= target]
        if len(enough):
            need = (f"**{enough.n_images.iloc[0]} images** are enough for a power of "
                    f"{100 * target:.0f} % (lower bound of its interval)")
        else:
            best = mine.loc[mine.power.idxmax()]
            need = (f"**No size tried is enough** for a power of {100 * target:.0f} % (lower "
                    f"bound of its interval; best: {100 * best.power:.0f} % at "
                    f"{best.n_images} images) — "
                    "more images, or more seeds to narrow the intervals, are needed")
        lines.append(f"- {weights} weights, noise {noise:g} ({int(mine.n_seeds.min())} "
                     f"studies per truth and size): {sizes}. {need}.")
    return "\n".join(lines)


def model_null_p(part: str, value: float, simulated: pd.DataFrame) -> tuple[float, int]:
    """p-value of one test's statistic against its model-based null.

    The null distribution is the statistic of the same test on studies simulated from
    the same features, sizes and noise under each truth in which the test must not hold
    (:data:`TEST_TRUTHS`); a simulated study in which the test could not be computed
    (NaN) counts as no evidence. Per null truth ``p_t = (1 + #{sim ≥ value}) / (1 + n_t)``
    (valid for a study drawn like the simulated ones, as the observed statistic is then
    exchangeable with them); the composite p is the largest ``p_t``.

    Returns
    -------
    (p, n) : the p-value (NaN if ``value`` is NaN or no null studies exist) and the
    smallest number of null studies per truth (its floor is ``1 / (1 + n)``); ``n`` is 0
    when a null truth was not simulated at all, since the composite null then does not
    cover it (and :meth:`HierarchyResult.calibrate` keeps the nominal decision).
    """
    nulls = TEST_TRUTHS[part][0]
    mine = simulated[(simulated.part == part) & simulated.truth.isin(nulls)]
    counts = mine.groupby("truth").size()
    n_min = 0 if set(nulls) - set(counts.index) else int(counts.min())
    if not np.isfinite(value) or mine.empty:
        return np.nan, n_min
    p = 0.0
    for _, group in mine.groupby("truth"):
        sims = group.value.to_numpy(float)
        exceed = int(np.sum(np.nan_to_num(sims, nan=-np.inf) >= value))
        p = max(p, (1 + exceed) / (1 + len(sims)))
    return p, n_min


def divergence_p(estimate: str, value: float, simulated: pd.DataFrame) -> tuple[float, int]:
    """p-value of "the gradients diverge from backprop", against simulated backprop.

    The null is the estimate (:data:`ESTIMATES`, spatial or temporal contrast) in studies
    simulated from the same features, sizes and noise under the ``backprop`` truth: a
    contrast is only evidence of divergence if real backprop rarely gives one as low —
    the contrasts are biased on real features (e.g. gradient maps noisier than
    activation maps), which an interval around 0 ignores. One-sided (lower: less
    aligned or less ordered than backprop), ``p = (1 + #{sim ≤ value}) / (1 + n)``;
    simulated studies whose contrast is NaN are left out.

    Returns
    -------
    (p, n): NaN and 0 where the value is NaN or no simulated backprop study has the
    estimate (e.g. the timing gap, which simulated tables do not keep).
    """
    if "prediction" not in simulated:
        return np.nan, 0
    sims = simulated[(simulated.prediction == "estimate") & (simulated.part == estimate)
                     & (simulated.truth == "backprop")].value.to_numpy(float)
    sims = sims[np.isfinite(sims)]
    if not np.isfinite(value) or not len(sims):
        return np.nan, len(sims)
    return (1 + int(np.sum(sims <= value))) / (1 + len(sims)), len(sims)


def divergence_rates(simulated: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Error rates of the model-based divergence decision (:func:`divergence_p` < α).

    False divergence: each simulated ``backprop`` study judged against the *other*
    backprop studies (leave one out). Power: each study of a truth under which backprop's
    prediction is false (:data:`TEST_TRUTHS`) judged against all backprop studies; a
    study whose contrast is NaN counts as a detection (it has no gradient order or map
    to speak of — the chapter's study would be "not estimable", not "equivalent").

    Returns
    -------
    DataFrame, one row per estimate with simulated rows: ``div_fpr``, ``div_fpr_low``,
    ``div_fpr_high``, ``n_div_null``, ``div_power``, ``div_power_low``,
    ``div_power_high``, ``n_div_power`` (Wilson 95 %).
    """
    columns = ["estimate", "div_fpr", "div_fpr_low", "div_fpr_high", "n_div_null",
               "div_power", "div_power_low", "div_power_high", "n_div_power"]
    rows = []
    if "prediction" not in simulated:
        return pd.DataFrame(rows, columns=columns)
    estimates = simulated[simulated.prediction == "estimate"]
    for name, group in estimates.groupby("part", sort=False):
        backprop = group[group.truth == "backprop"].value.to_numpy(float)
        if not len(backprop):
            continue
        finite = backprop[np.isfinite(backprop)]
        false = [(1 + int(np.sum(np.delete(finite, i) <= v))) / len(finite) < alpha
                 for i, v in enumerate(finite)]
        nulls = TEST_TRUTHS.get(name, ((), ""))[0]
        others = group[group.truth.isin(nulls)].value.to_numpy(float)
        found = [True if not np.isfinite(v) else
                 (1 + int(np.sum(finite <= v))) / (1 + len(finite)) < alpha for v in others]
        k, n, kp, npow = sum(false), len(false), sum(found), len(found)
        rows.append({"estimate": name, "div_fpr": k / n if n else np.nan,
                     **dict(zip(("div_fpr_low", "div_fpr_high"), _wilson(k, n))),
                     "n_div_null": n, "div_power": kp / npow if npow else np.nan,
                     **dict(zip(("div_power_low", "div_power_high"), _wilson(kp, npow))),
                     "n_div_power": npow})
    return pd.DataFrame(rows, columns=columns)

