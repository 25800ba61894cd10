"""Layer-to-brain summaries: best layer per target, hierarchy regions, recovery checks.

(The spatial and temporal hierarchy scores and the backprop-order tests build on these.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["best_layer", "hierarchy_regions", "layer_profiles", "reliable_targets",
           "recovery", "summarize_fmri", "temporal_score", "backprop_latency_prediction",
           "summarize_meg"]


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
        Bootstrap latencies (:func:`gradbrain.meg.meg_encoding`); gives percentile
        intervals of both correlations.
    ci : float
        Interval coverage.

    Returns
    -------
    dict with ``pearson``, ``spearman`` (correlations), ``p_pearson``, ``p_spearman``
    (two-sided, across layers), ``n_layers`` used and, with ``boot_latency``,
    ``pearson_ci`` and ``spearman_ci`` (low, high).
    """
    latency, depth = np.asarray(latency, float), np.asarray(depth, float)
    if latency.shape != depth.shape or latency.ndim != 1:
        raise ValueError(f"'latency' and 'depth' must be 1-D of equal length (one value per "
                         f"layer); got {latency.shape} and {depth.shape}.")
    keep = np.isfinite(latency)
    if keep.sum() < 3:
        raise ValueError(f"A temporal score needs at least 3 layers with a peak latency; got "
                         f"{int(keep.sum())}.")
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
        Output of :func:`gradbrain.meg.meg_encoding`.
    study : Study, optional
        A simulated study's planted latencies are compared with the recovered ones.
    """
    lines = []
    for signal, res in results.items():
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
        rec = recovery(found, values)
        lines.append(f"- Simulated study, {signal}: recovered vs planted latencies r = "
                     f"{rec['r']:.2f} (Spearman ρ = {rec['rho']:.2f}), median |error| "
                     f"{np.nanmedian(np.abs(found - values)):.0f} ms.")
    return "\n".join(lines)
