"""Layer-to-brain summaries: best layer per target, hierarchy regions, recovery checks.

(The spatial and temporal hierarchy scores and the backprop-order tests build on these.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["best_layer", "hierarchy_regions", "layer_profiles", "reliable_targets",
           "recovery", "summarize_fmri"]


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
