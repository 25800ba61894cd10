"""Inference on layer maps: permutation tests over layer depths and profiles, the spatial
bootstrap over test images, and above-chance tests.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from .._utils import check_in_allowed, resolve_device
from ..ridge import check_test_predictions, shuffled_correlations
from .scores import SPATIAL_STATISTICS, _profile_weights, unit_coordinates
from ..stats import ALTERNATIVES, bootstrap_interval




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
    from scipy.stats import rankdata

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
                            batch: int = 64, interval: str = "basic") -> dict:
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
    interval : {"basic", "percentile", "bca"}
        How ``spearman_ci`` is made from the resamples
        (:func:`gradbrain.stats.bootstrap_interval`; ``"bca"`` adds the n_test
        leave-one-out estimates). Default ``"basic"``: test-set noise attenuates the
        score and resampling attenuates it again, so the resamples lie below the
        estimate, which lies below the noise-free score; the percentile interval then
        misses the latter (measured, ``benchmarks/bootstrap_coverage.py``).

    Returns
    -------
    dict with ``samples`` (n_boot,) the Spearman ρ of each resample (NaN when every
    target picks the same layer), ``value`` (the same chain on the test images as
    they are) and ``spearman_ci`` (low, high).
    """
    from scipy.stats import rankdata

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
    check_in_allowed("interval", interval, ("basic", "percentile", "bca"))
    # the estimate (every test image once) and, for BCa, the leave-one-out estimates,
    # computed as extra rows of the same weighted sums (weights: counts / row length)
    n_boot_rows = len(boot_indices)
    extra = [np.arange(n_test)[None, :]]
    if interval == "bca":
        extra.append(np.array([np.delete(np.arange(n_test), i) for i in range(n_test)]))
    drawn = np.stack([np.bincount(row, minlength=n_test) for row in boot_indices]
                     + [np.bincount(row, minlength=n_test) for rows in extra for row in rows])
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
    for start in range(0, len(drawn), batch):
        W = torch.as_tensor(drawn[start:start + batch], **f64)     # times each image drawn
        W = W / W.sum(1, keepdim=True)                              # (b, n_test)
        n_rows = len(W)
        my = W @ Y
        vy = W @ (Y * Y) - my * my
        best_r = torch.full((n_rows, n_targets), -torch.inf, **f64)
        best = torch.zeros(n_rows, n_targets, dtype=torch.long, device=device)
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
        counts = torch.zeros(n_rows, n_layers, **f64).scatter_add_(
            1, best, torch.ones(best.shape, **f64))
        sums = torch.zeros(n_rows, n_layers, **f64).scatter_add_(
            1, best, t.expand(n_rows, -1))
        samples.append(_layer_sum_correlation(depth_t, counts, sums,
                                              float(torch.sqrt((t * t).sum())),
                                              rank=True).cpu().numpy())
    everything = np.concatenate(samples)
    everything[~np.isfinite(everything)] = np.nan
    samples, value = everything[:n_boot_rows], float(everything[n_boot_rows])
    jackknife = everything[n_boot_rows + 1:] if interval == "bca" else None
    if jackknife is not None and not np.isfinite(jackknife).all():
        low_high = (np.nan, np.nan)     # a leave-one-out estimate undefined: no BCa
    else:
        low_high = bootstrap_interval(value, samples, ci=ci, method=interval,
                                      jackknife=jackknife)
    return {"samples": samples, "value": value, "spearman_ci": low_high}


def above_chance(y_test, predictions, *, units=None, n_perm: int = 1000, seed: int = 0,
                 alpha: float = 0.05, device=None) -> dict:
    """Does a signal predict each target (or unit) above chance? Permutation test + FDR.

    The statistic of a target is its best layer's test-set Pearson r (the maximum over
    layers); its null comes from shuffling the test images against the predictions (the
    same shuffles for every layer and target), taking the maximum over layers there
    too, so choosing the best layer on the test set is part of the null. p-values are
    ``(1 + #{null ≥ observed}) / (1 + n_perm)`` and are corrected across targets with
    Benjamini–Hochberg (false discovery rate ``alpha``). The tests of :func:`backprop_tests` ask
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
