"""Which layer statistic separates a planted backprop from its nulls? Argmax vs whole profile.

Neighbouring layers share most of their information, so a unit's best layer (argmax of
its layer profile) and a layer's peak latency (the window around the maximum of its
score course) are fragile. This benchmark simulates studies from the features of the
model the book runs (EfficientNet-Lite0, ImageNet weights, 200 embedded images, noise 1)
under the four planted truths, fits them once with :func:`gradbrain.analysis.backprop.backprop_tests`,
keeps every unit's layer profile and every layer's MEG score course, and computes
candidate statistics on them:

- space (tests 1a/1b, units of the distance from V1): ``best`` (argmax layer),
  ``centre`` (centre of mass of the depths, weighted by the profile above its lowest
  layer: :func:`gradbrain.hierarchy.profile_centre`), ``centre_mean`` (weighted by the
  profile above its mean, clipped at 0) and ``top3`` (mean depth of the 3 best layers);
- time (test 2b, latency against the autograd order, over layers whose peak is above
  chance): ``peak`` (the Raugel et al. window ≥ 0.95 × maximum), ``peak0.8``,
  ``peak0.5`` (wider windows), ``centre_mean`` (centre of mass over the signal's
  above-chance times of the course above the mean over layers), ``centre_pos`` (of the
  positive course there), ``centre_half`` (of the course above half its maximum) and
  ``trend`` (Spearman over above-chance times of the time and of ρ(t), the correlation
  across layers between score and autograd rank at time t), and ``neighbours``: the
  peak latency of each layer's **own** contribution — its gradient features with what a
  ridge read-out of the adjacent layers' gradient features predicts of them removed
  (cross-fitted on the training images, as ``features.beyond_activations`` does with
  all activations), encoded again, gated by the same peak permutation test.

For each, under ``backprop`` (where the test should hold) against its null truths
(space: ``none``, ``paper``; time: ``none``, ``forward``, ``paper``): the area under
the ROC curve against the worst null truth and the share of backprop studies whose
statistic exceeds every null study's ("power over all nulls", what a model-based null
with this many studies rejects at its floor). Each study is cached in
``--cache-dir`` (atomically), so an interrupted run resumes. Ends with::

    RESULT spatial_best_auc=… spatial_centre_auc=… spatial_best_power=…
    spatial_centre_power=… temporal_peak_auc=… temporal_best_alternative_auc=…
    temporal_peak_power=… temporal_best_alternative_power=… temporal_neighbours_auc=…
    temporal_neighbours_power=… seeds=…

Usage: ``python benchmarks/layer_statistics.py [--seeds 12] [--first-seed 1000]
[--jobs 2] [--cache-dir DIR]``. 12 seeds per truth (48 studies): 19 min on 2 CPU cores
(13 for the fits, 6 for the neighbour-residualised encodings).
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from gradbrain.hierarchy import profile_centre
from gradbrain.hierarchy.verdicts import _spearman  # _spearman: ρ over finite pairs

TRUTHS = ("backprop", "none", "forward", "paper")
NULLS = {"1a": ("none", "paper"), "1b": ("none", "paper"), "2b": ("none", "forward", "paper")}
SPATIAL = ("best", "centre", "centre_mean", "top3")
TEMPORAL = ("peak", "peak0.8", "peak0.5", "centre_mean", "centre_pos", "centre_half", "trend",
            "neighbours")


def _features(n_images: int):
    from gradbrain import features as gf
    from gradbrain import models
    from gradbrain.data import load_embedded

    model = models.load("efficientnet_lite0.imagenet", weights="pretrained")
    return gf.extract(model, load_embedded(n_images), losses=("ce",), cache=True)


def _cached_study_record(job, suffix: str, compute) -> Path:
    """``compute(feats, study)``'s record for the job's simulated study, cached (atomically)
    as ``<truth>-<seed><suffix>.pkl``; a quiet single-threaded worker computes it."""
    truth, seed, n_images, cache_dir = job
    path = cache_dir / f"{truth}-{seed}{suffix}.pkl"
    if path.exists():
        return path
    import torch

    from gradbrain._utils import atomic_path
    from gradbrain.data.simulated import make_study

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    feats = _features(n_images)
    study = make_study(seed, n_images=n_images, features=feats, gradient_truth=truth,
                       noise=1.0, gradient_loss="ce")
    record = compute(feats, study)
    with atomic_path(path, suffix=".pkl") as tmp:
        tmp.write_bytes(pickle.dumps(record))
    return path


def _profiles_and_courses(feats, study) -> dict:
    """Fit the study as the chapter does; keep profiles and score courses."""
    from gradbrain import hierarchy
    from gradbrain.analysis import backprop

    seed = study.truth["seed"]
    result = backprop.backprop_tests(study, feats, seed=seed, n_perm=2000, n_boot=20,
                                     n_perm_chance=0)
    record = {"truth": study.truth["gradient_truth"], "seed": seed,
              "coord": hierarchy.unit_coordinates(study.hierarchy, result.units),
              "rank": feats.backward_rank("ce"), "depth": np.asarray(feats.depth)}
    for name, key in (("activation", "act"), (result.signal, "grad")):
        record[f"{key}_profile"] = result.unit_best[name]["profile"]
        record[f"{key}_present"] = result.unit_best[name]["present"]
        for item in ("curve", "p_peak", "significant_time", "times"):
            record[f"{key}_{item}"] = result.meg[name][item]
    return record


def _beyond_neighbours(feats, study) -> dict:
    """Encode the MEG from each layer's gradients beyond its neighbours' gradients."""
    import torch

    from gradbrain import meg
    from gradbrain.analysis import encoding
    from gradbrain.features import RESIDUAL_ALPHAS, _block_scaled, _cross_fitted_residual
    from gradbrain.ridge import standardize

    train, test, Y_train, Y_test = encoding._meg_split(study, 5)
    folds = np.array_split(np.arange(len(train)), 5)
    grads = [feats.gradients["ce"][layer] for layer in feats.layers]
    curves, predictions = [], []
    for i, own in enumerate(grads):
        around = [grads[j] for j in (i - 1, i + 1) if 0 <= j < len(grads)]
        X = torch.as_tensor(_block_scaled(around, train), dtype=torch.float64)
        residual, _ = _cross_fitted_residual(own, X, train, test, folds, RESIDUAL_ALPHAS)
        X_train, X_test = standardize(residual[train], residual[test])
        out = meg.encode_time_resolved(X_train, Y_train, X_test, Y_test, cv=5,
                                       return_prediction=True)
        curves.append(out["r"].mean(0))
        predictions.append(out["prediction"].astype(np.float32))
    shuffled = meg.peak_permutation_test(Y_test, np.stack(predictions), n_perm=200,
                                         seed=study.truth["seed"])
    return {"curve": np.stack(curves), "p_peak": shuffled["p_value"]}


def simulate(job) -> Path:
    """Simulate and fit one study; cache its profiles and score courses."""
    return _cached_study_record(job, "", _profiles_and_courses)


def neighbour_courses(job) -> Path:
    """Encode the MEG of one study from each layer's gradients beyond its neighbours'."""
    return _cached_study_record(job, "-neighbours", _beyond_neighbours)


def unit_depth(profile: np.ndarray, depth: np.ndarray, how: str) -> np.ndarray:
    """Each unit's layer depth from its profile (n_layers, n_units)."""
    filled = np.nan_to_num(profile, nan=-np.inf)
    if how == "best":
        return depth[filled.argmax(0)]
    if how == "centre":
        return profile_centre(profile, depth)
    if how == "centre_mean":
        weight = np.nan_to_num(np.clip(profile - np.nanmean(profile, 0), 0, None))
    else:  # top3
        weight = np.zeros_like(profile)
        np.put_along_axis(weight, np.argsort(-filled, 0)[:3], 1.0, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (depth @ weight) / weight.sum(0)


def layer_latency(curve: np.ndarray, times: np.ndarray, how: str,
                  window: np.ndarray) -> np.ndarray:
    """Each layer's latency (ms) from its score course (n_layers, n_times)."""
    from gradbrain.meg import peak_latency

    if how.startswith("peak"):
        threshold = float(how[4:]) if len(how) > 4 else 0.95
        return np.array([peak_latency(times, c, threshold) if c.max() > 0 else np.nan
                         for c in curve])
    window = window if window.any() else np.ones(len(times), bool)
    if how == "centre_mean":
        weight = np.clip(curve - curve.mean(0), 0, None) * window
    elif how == "centre_pos":
        weight = np.clip(curve, 0, None) * window
    else:  # centre_half
        weight = np.where(curve >= 0.5 * curve.max(1, keepdims=True), curve, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weight @ times) / weight.sum(1)


def statistics(record: dict) -> dict:
    """Every candidate statistic of one study."""
    depth, rank, coord = record["depth"], record["rank"].astype(float), record["coord"]
    out = {"truth": record["truth"], "seed": record["seed"]}
    grad_present = record["grad_present"]
    both = grad_present & record["act_present"]
    for how in SPATIAL:
        grad = unit_depth(record["grad_profile"], depth, how)
        act = unit_depth(record["act_profile"], depth, how)
        out[f"1b {how}"] = _spearman(grad[grad_present], coord[grad_present])
        out[f"1a {how}"] = _spearman(grad[both], act[both])
    curve, times = record["grad_curve"], record["grad_times"]
    window = record["grad_significant_time"]
    timed = record["grad_p_peak"] < 0.05
    for how in TEMPORAL[:-2]:
        latency = layer_latency(curve, times, how, window)
        latency[~timed] = np.nan
        out[f"2b {how}"] = _spearman(latency, rank) if np.isfinite(latency).sum() >= 3 \
            else np.nan
    rho = np.array([_spearman(curve[:, k], rank) for k in range(curve.shape[1])])
    out["2b trend"] = _spearman(times[window], rho[window]) if window.sum() >= 3 else np.nan
    own = record["neighbours"]
    latency = layer_latency(own["curve"], times, "peak", window)
    latency[own["p_peak"] >= 0.05] = np.nan
    out["2b neighbours"] = _spearman(latency, rank) if np.isfinite(latency).sum() >= 3 \
        else np.nan
    return out


def separation(table: pd.DataFrame) -> pd.DataFrame:
    """Per statistic: means per truth, AUC against each null truth, power over all nulls."""
    rows = []
    for column in table.columns[2:]:
        test = column.split()[0]
        hits = np.nan_to_num(table.loc[table.truth == "backprop", column].to_numpy(float),
                             nan=-np.inf)
        row = {"test": test, "statistic": column.split()[1]}
        aucs, above = [], []
        for null in NULLS[test]:
            values = np.nan_to_num(table.loc[table.truth == null, column].to_numpy(float),
                                   nan=-np.inf)
            aucs.append(np.mean(hits[:, None] > values[None]) +
                        0.5 * np.mean(hits[:, None] == values[None]))
            above.append(hits > values.max())
        for truth in TRUTHS:
            row[f"mean_{truth}"] = table.loc[table.truth == truth, column].mean()
        row["worst_auc"] = min(aucs)
        row["power_over_all_nulls"] = float(np.mean(np.all(above, axis=0)))
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from gradbrain._utils import get_data_home

    cache_dir = args.cache_dir or get_data_home() / "benchmarks" / "layer_statistics"
    cache_dir.mkdir(parents=True, exist_ok=True)
    _features(args.n_images)  # extracted once, cached, before the workers start
    jobs = [(truth, seed, args.n_images, cache_dir) for seed in
            range(args.first_seed, args.first_seed + args.seeds) for truth in TRUTHS]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            paths = list(tqdm(pool.map(simulate, jobs), total=len(jobs), desc="studies"))
            extra = list(tqdm(pool.map(neighbour_courses, jobs), total=len(jobs),
                              desc="beyond neighbours"))
    else:
        paths = [simulate(job) for job in tqdm(jobs, desc="studies")]
        extra = [neighbour_courses(job) for job in tqdm(jobs, desc="beyond neighbours")]
    records = [{**pickle.loads(p.read_bytes()), "neighbours": pickle.loads(e.read_bytes())}
               for p, e in zip(paths, extra)]
    table = pd.DataFrame([statistics(record) for record in records])
    result = separation(table)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(result.round(3).to_string(index=False))
    pick = result.set_index(["test", "statistic"])
    alternatives = pick.loc["2b"].drop("peak")
    best_alt = alternatives.worst_auc.idxmax()
    print(f"RESULT spatial_best_auc={pick.at[('1b', 'best'), 'worst_auc']:.3f} "
          f"spatial_centre_auc={pick.at[('1b', 'centre'), 'worst_auc']:.3f} "
          f"spatial_best_power={pick.at[('1b', 'best'), 'power_over_all_nulls']:.3f} "
          f"spatial_centre_power={pick.at[('1b', 'centre'), 'power_over_all_nulls']:.3f} "
          f"temporal_peak_auc={pick.at[('2b', 'peak'), 'worst_auc']:.3f} "
          f"temporal_best_alternative_auc={alternatives.at[best_alt, 'worst_auc']:.3f} "
          f"temporal_peak_power={pick.at[('2b', 'peak'), 'power_over_all_nulls']:.3f} "
          f"temporal_best_alternative_power="
          f"{alternatives.at[best_alt, 'power_over_all_nulls']:.3f} "
          f"temporal_best_alternative={best_alt} "
          f"temporal_neighbours_auc={pick.at[('2b', 'neighbours'), 'worst_auc']:.3f} "
          f"temporal_neighbours_power="
          f"{pick.at[('2b', 'neighbours'), 'power_over_all_nulls']:.3f} seeds={args.seeds}")


if __name__ == "__main__":
    main()
