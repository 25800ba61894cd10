"""Layer-to-brain summaries: best layer per target, hierarchy regions, recovery checks.

(The spatial and temporal hierarchy scores and the backprop-order tests build on these.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["best_layer", "hierarchy_regions", "layer_profiles", "reliable_targets",
           "recovery"]


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
