"""Error rates and model-based nulls from simulated studies' tables, power curves, and the
tables shipped with the library.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .._utils import check_in_allowed
from .verdicts import (ESTIMATES, TEST_TRUTHS, VERDICT_BACKPROP, VERDICT_PAPER, _verdict_rows,
                       _verdicts)
from ..stats import _pct, _wilson


#: Bump when a change to the simulation or the tests changes simulated statistics: cached
#: and shipped tables of :func:`simulate_tests` carry it in their key.
SIMULATION_VERSION = 5   # 2: the estimates' equivalence rows; 3: selection on training CV;
#                          4: spatial tests on profile centres (run's spatial_statistic);
#                          5: MEG latencies gated with the step-down max statistic over
#                          layers; seeds from FIRST_SIMULATION_SEED
#: The version of how each planted truth of :func:`gradbrain.data.simulated.make_study`
#: is planted: a truth's simulated studies (cached, shipped, in a power curve) are
#: simulated again, or warned about, when it changes; the other truths' are kept. 2 of
#: ``paper``: gradients in every vertex, more of them high (1: only in the top 40 % of
#: the hierarchy, an even share there).
TRUTH_VERSION = {"none": 1, "forward": 1, "backprop": 1, "paper": 2, "reversed": 1,
                 "shuffled": 1, "partial": 1}
#: Seeds used to choose the spatial and temporal statistics
#: (``benchmarks/layer_statistics.py``): never used to calibrate or to state power.
SELECTION_SEEDS = range(1000, 1012)
#: Start of the reserved block of seeds of the simulated studies that calibrate a
#: chapter's tests (:func:`gradbrain.analysis.simulation.simulate_tests`); the divergence
#: family draws from its own block (:data:`gradbrain.divergence.FIRST_CALIBRATION_SEED`).
FIRST_SIMULATION_SEED = 10_000_000
_REFERENCE = Path(__file__).resolve().parents[1] / "reference"


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
    for meta_path in sorted(_REFERENCE.glob(pattern)):
        meta = json.loads(meta_path.read_text())
        shipped = np.asarray(meta["fingerprint"], dtype=np.float64)
        if meta["key"] == key and shipped.shape == fingerprint.shape and np.allclose(
                shipped, fingerprint, rtol=1e-3, atol=1e-6 * np.abs(shipped).max()):
            return pd.read_csv(meta_path.with_suffix(".csv.gz"))
    return None


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
        Rates of the tests as :func:`backprop_tests` decided them, or as decided against their
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


def _truth_versions(truths) -> str:
    """``"truth:version;…"`` of the simulated ``truths`` (in that order)."""
    return ";".join(f"{truth}:{TRUTH_VERSION[truth]}" for truth in truths)


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
    DataFrame: :func:`error_rates` of each point (nominal decisions, as :func:`backprop_tests`
    made them), with ``weights``, ``n_images``, ``n_test`` and ``noise`` first, then
    ``n_seeds`` (studies per truth), ``version`` (:data:`SIMULATION_VERSION`) and
    ``truth_versions`` (the truths simulated and how each was planted,
    :data:`TRUTH_VERSION`: ``"backprop:1;none:1"``) last.
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
        rates["truth_versions"] = _truth_versions(sorted(set(simulated.truth)))
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
    changed since), or with a truth planted another way since
    (:data:`TRUTH_VERSION`), is returned with a warning.
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
    # the truths it simulated: recorded; in tables older than that record, the truths
    # of its held_<truth> columns, all planted as version 1
    if "truth_versions" in table:
        made = {pair.partition(":")[::2] for entry in set(table["truth_versions"])
                for pair in str(entry).split(";")}
        made = {(truth, int(version)) for truth, version in made}
    else:
        made = {(column[len("held_"):], 1) for column in table.columns
                if column.startswith("held_")}
    changed = sorted(truth for truth, version in made if TRUTH_VERSION.get(truth) != version)
    if changed:
        warnings.warn(f"The power curve {path.name} simulated the truths {changed} as they "
                      "were planted before (gradbrain.hierarchy.calibration.TRUTH_VERSION "
                      "changed since). Rerun 'python benchmarks/power_curve.py --ship'.",
                      UserWarning, stacklevel=2)
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
