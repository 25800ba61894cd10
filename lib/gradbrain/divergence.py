"""Does a study's gradient order *diverge* from backprop? A test a true backprop passes.

The replication's headline is a negative: the gradients' spatial and temporal orders
diverge from what a biological backprop would produce.
:func:`gradbrain.analysis.backprop.backprop_tests` measures two contrasts for which an
ideal backprop predicts 0 (:data:`hierarchy.ESTIMATES`):

* spatial — the gradient spatial score minus the activation one;
* temporal — how well gradient latencies follow the autograd order minus how well
  activation latencies follow depth.

On a real network neither is centred on 0 under a planted backprop, and where it sits
depends on nuisances a real brain does not tell us: how much of the response gradients
carry, the noise, how precisely each gradient is timed. A null made of one point of
that space (the simulator's default gradient weight) calls any other backprop
"divergent" (issue 28: a backprop at gradient weight 0.25 got p = 0.043). Here the null
is a **family** of planted backprops — one *cell* per setting of the nuisances
(:data:`DEFAULT_FAMILY`) — and a contrast diverges only when it is extreme against
**every** cell (the largest of the per-cell p-values, a composite null), with Holm's
correction across the contrasts tested. Its power is measured against backprop's places
and times in a wrong order (the ``reversed``, ``shuffled`` and ``partial`` truths of
:func:`gradbrain.data.simulated.make_study`: all layers reversed, a random order, and
the upper half of the layers reversed with the lower half right).

What is estimated and what is assumed: the noise is estimated from the study's noise
ceilings (:func:`gradbrain.data.simulated.estimate_noise`). The gradient weight is
located, not assumed: every simulated study records its gradient strength per contrast
(gradient peak score over activation peak score, on fMRI for the spatial contrast and on
MEG for the temporal one, :func:`gradient_strength`), and each contrast is judged only
against the cells of the gradient weights whose median strengths (fitted non-decreasing
in the weight: weights whose strengths tie are pooled) bracket the study's,
and any cell whose strengths span it (a backprop much weaker than the data show is no
candidate). The latency jitter and the activation leakage (a share of each gradient
signal that is a read-out of its layer's activations, at the gradient's places and
times) are not estimated: their cells are judged whenever their gradient weight is, or
their simulated strengths span the study's. The decision is valid for any backprop
inside the family's span (not outside it), and its error rates are measured with the
same rule.

Simulated studies are drawn from a reserved block of seeds (:func:`calibration_seeds`),
disjoint from the seeds used to choose any statistic (1000–1011,
``benchmarks/layer_statistics.py``) and from the seed of the study under test.
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from tqdm import tqdm

from . import hierarchy
from .analysis.backprop import backprop_tests
from ._utils import (atomic_path, check_in_allowed, discard_unreadable, get_data_home,
                     hash_arrays, usable_cores)
from .data.simulated import DIVERGENT_TRUTHS, make_study
from .hierarchy import calibration
from .stats import _pct, _wilson, check_level

__all__ = ["DEFAULT_FAMILY", "NUISANCES", "CONTRASTS", "FIRST_CALIBRATION_SEED",
           "SELECTION_SEEDS", "calibration_seeds", "simulate_family", "divergence_test",
           "family_rates", "gradient_strength", "judge", "write_family_reference", "summarize"]

#: The contrasts judged for divergence (keys of :data:`hierarchy.ESTIMATES`), and the one
#: modality each depends on (its studies are simulated with that modality alone).
CONTRASTS = ("spatial", "temporal")
_MODALITY = {"spatial": "fmri", "temporal": "meg"}
#: Cells of the backprop null family: the nuisances a real backprop may differ in.
DEFAULT_FAMILY = (
    {"gradient_weight": 0.1, "latency_jitter": 0.0},
    {"gradient_weight": 0.25, "latency_jitter": 0.0},
    {"gradient_weight": 0.5, "latency_jitter": 0.0},
    {"gradient_weight": 0.9, "latency_jitter": 0.0},
    {"gradient_weight": 0.5, "latency_jitter": 40.0},
    {"gradient_weight": 0.5, "latency_jitter": 0.0, "activation_leakage": 0.5},
)
#: The nuisances a cell sets (in this order in a cell's key), with their defaults.
NUISANCES = {"gradient_weight": 0.5, "latency_jitter": 0.0, "activation_leakage": 0.0}
#: Where the divergent truths are simulated (their power is stated at this cell).
DIVERGENT_CELL = {"gradient_weight": 0.5, "latency_jitter": 0.0, "activation_leakage": 0.0}
#: Seeds used to choose the spatial and temporal statistics (never calibrate with them).
SELECTION_SEEDS = calibration.SELECTION_SEEDS
#: Start of the reserved block of calibration seeds (each cell has its own sub-block).
FIRST_CALIBRATION_SEED = 20_000_000
_CELL_STRIDE = 100_000
#: Bump when a change alters the simulated contrasts (it is part of every cache key).
FAMILY_VERSION = 1
#: Bump one contrast's version when a change alters that contrast alone (its cached and
#: shipped studies are then simulated again; the other contrast's stay). temporal 2: MEG
#: latencies gated with the step-down max statistic over layers; spatial 2: each study's
#: gradient strength recorded (:func:`gradient_strength`); temporal 3: its strength too.
CONTRAST_VERSION = {"spatial": 2, "temporal": 3}
_REFERENCE = calibration._REFERENCE
_NAMES = {key: hierarchy.ESTIMATES[key][0] for key in CONTRASTS}


def calibration_seeds(n: int, *, cell: int = 0, exclude=()) -> list[int]:
    """Seeds of the simulated studies of one family cell, from the reserved block.

    Parameters
    ----------
    n : int
        How many.
    cell : int
        Index of the cell (each cell draws from its own sub-block, so cells are
        independent).
    exclude : iterable of int
        Seeds never to use (e.g. the seed of the simulated study under test); the block
        skips them and continues.

    Returns
    -------
    list of int
        ``n`` seeds ≥ :data:`FIRST_CALIBRATION_SEED`, none in :data:`SELECTION_SEEDS` or
        ``exclude``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"'n' must be a positive integer (studies per cell); got {n!r}.")
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 0:
        raise ValueError(f"'cell' must be a non-negative integer; got {cell!r}.")
    banned = set(int(x) for x in exclude) | set(SELECTION_SEEDS)
    seeds, seed = [], FIRST_CALIBRATION_SEED + cell * _CELL_STRIDE
    while len(seeds) < n:
        if seed not in banned:
            seeds.append(seed)
        seed += 1
    return seeds


def _check_cells(family) -> list[dict]:
    cells = [dict(c) for c in family]
    if not cells:
        raise ValueError("'family' must hold at least one cell, e.g. "
                         "[{'gradient_weight': 0.5, 'latency_jitter': 0.0}].")
    for cell in cells:
        unknown = set(cell) - set(NUISANCES)
        if unknown:
            raise ValueError(f"Unknown nuisance(s) {sorted(unknown)} in family cell {cell}; "
                             f"allowed: {', '.join(map(repr, NUISANCES))}.")
        for name, default in NUISANCES.items():
            cell.setdefault(name, default)
        w, j, leak = (cell[name] for name in NUISANCES)
        if not 0 < float(w) < 1 or not 0 <= float(j) < 1000 or not 0 <= float(leak) < 1:
            raise ValueError(f"Family cell {cell}: 'gradient_weight' must be in (0, 1), "
                             "'latency_jitter' in [0, 1000) ms and 'activation_leakage' in "
                             "[0, 1).")
        for name in NUISANCES:
            cell[name] = float(cell[name])
    return cells


def _setting(cell: dict) -> tuple[float, float, float]:
    """A cell's nuisances as a key: (gradient weight, latency jitter, activation leakage)."""
    return tuple(float(cell.get(name, default)) for name, default in NUISANCES.items())


def _with_nuisances(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every nuisance column (a table made before a nuisance existed gets
    its default, which is what its studies were simulated with)."""
    missing = {name: default for name, default in NUISANCES.items() if name not in table}
    return table.assign(**missing) if missing else table


def _family_key(features, n_images, noise, run_kwargs, sizes) -> dict:
    """Every setting that changes the simulated contrasts (not the seeds, cells, device,
    n_perm, n_boot or alpha, which do not)."""
    defaults = {name: p.default for name, p in inspect.signature(backprop_tests)
                .parameters.items() if p.default is not inspect.Parameter.empty}
    settings = {name: run_kwargs.get(name, defaults[name]) for name in (
        "min_noise_ceiling", "min_score", "n_units", "cv", "gradient_part", "select_on",
        "spatial_statistic")}
    loss = run_kwargs.get("loss") or features.losses[0]
    return {"family_version": FAMILY_VERSION, "model": features.model,
            "weights": features.weights, "pool": features.pool, "loss": loss,
            "n_images": int(n_images), "noise": round(float(noise), 6),
            **{k: (float(v) if isinstance(v, float) else v) for k, v in settings.items()},
            **{k: int(v) for k, v in (sizes or {}).items()}}


def _one_study(features, contrast, truth, seed, cell, noise, n_images, run_kwargs,
               n_threads, cache_dir, study_kwargs) -> list[dict]:
    """One contrast of one simulated study, made with its modality alone (cached as one
    small CSV)."""
    version = CONTRAST_VERSION[contrast]
    leak = cell.get("activation_leakage", 0.0)
    name = (f"{contrast}{'' if version == 1 else f'-v{version}'}-{truth}"
            f"-w{cell['gradient_weight']:g}-j{cell['latency_jitter']:g}"
            f"{f'-l{leak:g}' if leak else ''}-{seed}.csv")
    path = cache_dir / name if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            cached = pd.read_csv(path)
            if list(cached.estimate) != [_NAMES[contrast]] or "value" not in cached \
                    or "strength" not in cached:
                raise ValueError("not a whole simulated study (truncated?)")
            return _with_nuisances(cached).to_dict("records")
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
            discard_unreadable(path, err, what="Cached simulated contrasts",
                               then="the study is simulated again")
    if n_threads:
        import torch

        torch.set_num_threads(n_threads)
    loss = run_kwargs.get("loss") or features.losses[0]
    modalities = {m: m == _MODALITY[contrast] for m in ("fmri", "meg")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = make_study(seed, n_images=n_images, features=features, gradient_truth=truth,
                           noise=noise, gradient_loss=loss, **cell, **modalities,
                           **(study_kwargs or {}))
        # the contrasts' point values do not depend on the permutations or the bootstrap
        result = backprop_tests(study, features, seed=seed,
                               **{**run_kwargs, "n_perm": 99, "n_boot": 0,
                                  "n_perm_chance": 0})
    values = result.estimates.set_index("estimate").value if len(result.estimates) \
        else pd.Series(dtype=float)
    label = _NAMES[contrast]
    rows = [{"contrast": contrast, "truth": truth, "seed": int(seed), **cell,
             "estimate": label, "value": float(values.get(label, np.nan)),
             "strength": gradient_strength(result)[contrast]}]
    if path is not None:
        with atomic_path(path, suffix=".csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    return rows


def simulate_family(features, *, noise: float = 1.0, family=DEFAULT_FAMILY,
                    divergent=DIVERGENT_TRUTHS, n_seeds: int = 40,
                    n_seeds_divergent: int = 20, n_images: int | None = None,
                    exclude_seeds=(), simulate_fmri: bool = True, simulate_meg: bool = True,
                    images=None, n_test: int | None = None, n_fmri_repeats: int | None = None,
                    n_meg_test_repeats: int | None = None, n_jobs: int = 1, cache=True,
                    progress: bool = True, **run_kwargs) -> pd.DataFrame:
    """Simulate the backprop null family, and the divergent truths, from a model's features.

    Each simulated study is made by :func:`gradbrain.data.simulated.make_study` from
    ``features`` and judged by :func:`gradbrain.analysis.backprop.backprop_tests` with ``run_kwargs``;
    only its divergence contrasts (:data:`CONTRASTS`) are kept, whose values do not
    depend on the permutations or the bootstrap (so they are skipped: about 40 % of a
    study's cost).

    Parameters
    ----------
    features : Features
        The chapter's features (embedded images, or ``images``).
    noise : float
        Noise of the simulated studies (``make_study``'s), e.g. the study's own from
        :func:`gradbrain.data.simulated.estimate_noise`.
    family : sequence of dict
        The backprop cells: each a setting of ``gradient_weight`` (0–1),
        ``latency_jitter`` (ms) and ``activation_leakage`` (0–1) (:data:`NUISANCES`; an
        unset one takes its default).
    divergent : sequence of {"reversed", "shuffled", "partial"}
        Wrong-order truths simulated at :data:`DIVERGENT_CELL` (the power).
    n_seeds, n_seeds_divergent : int
        Studies per backprop cell, and per divergent truth (0: none).
    exclude_seeds : iterable of int
        Seeds never to simulate (the study under test's own, if simulated).
    simulate_fmri, simulate_meg : bool
        Which contrasts to simulate: the spatial one (fMRI studies) and the temporal one
        (MEG studies). Each contrast depends on its modality alone, so its studies are
        simulated with that modality only.
    images, n_test, n_fmri_repeats, n_meg_test_repeats
        As in :func:`gradbrain.analysis.simulation.simulate_tests` (a real study's own size).
    n_jobs : int
        Studies simulated in parallel (processes).
    cache : bool or path-like
        Each study's contrasts are kept under ``<cache>/divergence_family/<key>/`` (True:
        ``$GRADBRAIN_DATA``), keyed on every setting that changes them and on the
        features; an interrupted call resumes. A table shipped with the library for the
        same key (``gradbrain/reference/divergence_family-*``) is read first.
    **run_kwargs
        Passed to :func:`gradbrain.analysis.backprop.backprop_tests` (``loss``, ``min_noise_ceiling``,
        ``min_score``, ``n_units``, ``cv``, ``gradient_part``, ``select_on``,
        ``spatial_statistic``, ``device``).

    Returns
    -------
    DataFrame
        One row per (contrast, truth, seed, cell): ``contrast``, ``truth``, ``seed``,
        ``gradient_weight``, ``latency_jitter``, ``activation_leakage``, ``estimate``
        (the contrast's name in :data:`hierarchy.ESTIMATES`), ``value`` (Spearman ρ
        difference; NaN where not estimable) and ``strength`` (:func:`gradient_strength` of the study for that
        contrast).
    """
    cells = _check_cells(family)
    divergent = [divergent] if isinstance(divergent, str) else list(divergent)
    for truth in divergent:
        check_in_allowed("divergent", truth, DIVERGENT_TRUTHS)
    for name, value in (("n_seeds", n_seeds), ("n_seeds_divergent", n_seeds_divergent),
                        ("n_jobs", n_jobs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (
                1 if name != "n_seeds_divergent" else 0):
            raise ValueError(f"'{name}' must be a {'positive' if name != 'n_seeds_divergent' else 'non-negative'} "
                             f"integer; got {value!r}.")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"'noise' must be a finite number >= 0; got {noise!r}.")
    forbidden = {"seed", "fmri", "meg", "n_perm", "n_boot", "n_perm_chance"} & set(run_kwargs)
    if forbidden:
        raise ValueError(f"{sorted(forbidden)} are set per simulated study (or unused by the "
                         "contrasts); do not pass them to simulate_family.")
    if not (simulate_fmri or simulate_meg):
        raise ValueError("At least one of 'simulate_fmri' and 'simulate_meg' must be True.")
    contrasts = [c for c, on in (("spatial", simulate_fmri), ("temporal", simulate_meg)) if on]
    n_images = features.n_images if n_images is None else n_images
    sizes = {k: v for k, v in (("n_test", n_test), ("n_fmri_repeats", n_fmri_repeats),
                               ("n_meg_test_repeats", n_meg_test_repeats)) if v is not None}
    study_kwargs = {**sizes, **({"images": images} if images is not None else {})}
    exclude = [int(s) for s in exclude_seeds]
    jobs = [(contrast, "backprop", seed, cell) for contrast in contrasts
            for i, cell in enumerate(cells)
            for seed in calibration_seeds(n_seeds, cell=i, exclude=exclude)]
    if n_seeds_divergent:
        jobs += [(contrast, truth, seed, dict(DIVERGENT_CELL)) for contrast in contrasts
                 for k, truth in enumerate(divergent)
                 for seed in calibration_seeds(n_seeds_divergent, cell=50 + k,
                                               exclude=exclude)]

    def ident(contrast, truth, seed, setting):
        return (str(contrast), str(truth), int(seed), *_setting(setting))
    rows, cache_dir = [], None
    if cache is not False:
        key = _family_key(features, n_images, noise, run_kwargs, sizes)
        loss = key["loss"]
        shipped = calibration._shipped_simulations(key, calibration._fingerprint(features, loss),
                                                 pattern="divergence_family-*.json")
        if shipped is not None:
            # rows of a contrast whose simulation changed since they were shipped: dropped
            made = shipped.get("contrast_version", pd.Series(1, index=shipped.index))
            shipped = _with_nuisances(shipped[made.to_numpy() == shipped.contrast.map(
                CONTRAST_VERSION).to_numpy()])
            idents = [ident(c, t, s, row) for c, t, s, row in zip(
                shipped.contrast, shipped.truth, shipped.seed,
                shipped[list(NUISANCES)].to_dict("records"))]
            want = {ident(*job) for job in jobs}
            rows += shipped[[i in want for i in idents]].to_dict("records")
            have = set(idents)
            jobs = [job for job in jobs if ident(*job) not in have]
        settings = np.frombuffer(json.dumps(key, sort_keys=True).encode(), dtype=np.uint8)
        digest = hash_arrays([settings, *(features.activations[layer]
                                          for layer in features.layers),
                              *(features.gradients[loss][layer] for layer in features.layers)])
        root = get_data_home() if cache is True else Path(cache).expanduser()
        cache_dir = root / "divergence_family" / digest
    args = (noise, n_images, run_kwargs)
    bar = tqdm(total=len(jobs), desc="simulated backprop family", disable=not progress
               or not jobs)
    if n_jobs == 1:
        for contrast, truth, seed, cell in jobs:
            rows += _one_study(features, contrast, truth, seed, cell, *args, None, cache_dir,
                               study_kwargs)
            bar.update()
    elif jobs:
        from joblib import Parallel, delayed

        cores = usable_cores()
        threads = max(1, cores // n_jobs)
        for done in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                delayed(_one_study)(features, contrast, truth, seed, cell, *args, threads,
                                    cache_dir, study_kwargs)
                for contrast, truth, seed, cell in jobs):
            rows += done
            bar.update()
    bar.close()
    columns = ["contrast", "truth", "seed", *NUISANCES, "estimate", "value", "strength"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["contrast", "truth", *NUISANCES, "seed"],
                             kind="stable").reset_index(drop=True)


def write_family_reference(table: pd.DataFrame, features, *, name: str, noise: float = 1.0,
                           n_images: int | None = None, note: str = "", **run_kwargs) -> Path:
    """Ship a table of :func:`simulate_family` with the library (maintainers' tool).

    Writes ``gradbrain/reference/divergence_family-<name>.csv.gz`` and its key (``.json``);
    :func:`simulate_family` then reads its studies whenever it is called with the same
    settings on the same features. Give the same settings as to that call.
    """
    n_images = features.n_images if n_images is None else n_images
    key = _family_key(features, n_images, noise, run_kwargs, {})
    base = _REFERENCE / f"divergence_family-{name}"
    table = _with_nuisances(table).assign(
        contrast_version=table.contrast.map(CONTRAST_VERSION))
    with atomic_path(base.with_suffix(".csv.gz"), suffix=".csv.gz") as tmp:
        table.to_csv(tmp, index=False)
    meta = {"key": key, "fingerprint": calibration._fingerprint(features, key["loss"]).tolist(),
            "n_studies": int(table[["contrast", "truth", "seed", *NUISANCES]]
                             .drop_duplicates().shape[0]),
            "note": note}
    with atomic_path(base.with_suffix(".json"), suffix=".json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return base.with_suffix(".json")


def gradient_strength(result) -> dict:
    """How strongly a study's gradients predict its responses relative to its activations:
    the nuisance of the backprop family that the data tell.

    Spatial (fMRI): the median over reliable vertices of the gradient signal's peak score
    divided by the activation signal's (both r / √NC at each vertex's chosen layer,
    ``result.best[signal]["peak"]``). On the demo's features it rises with a planted
    backprop's gradient weight (medians over 40 studies: 0.60 at weight 0.1, 0.63 at 0.25,
    0.93 at 0.5, 2.42 at 0.9; Methods), so it places a study among the family's cells.
    Temporal (MEG): the best layer's peak of the gradient signal's test-set course (r
    averaged over sensors, maximum over time, ``result.meg[signal]["peak"]``) divided by
    the activation signal's. It rises with the strong weights but ties at the two weakest
    (medians over 40 studies: 0.56 at weight 0.1, 0.56 at 0.25, 0.76 at 0.5, 1.84 at
    0.9), which :func:`divergence_test` then judges together.

    Parameters
    ----------
    result : HierarchyResult
        :func:`gradbrain.analysis.backprop.backprop_tests` of the study.

    Returns
    -------
    dict with ``"spatial"`` and ``"temporal"`` (float; NaN where not measurable).
    """
    out = {key: np.nan for key in CONTRASTS}
    signals = ("activation", getattr(result, "signal", None))
    best, reliable = getattr(result, "best", None), getattr(result, "reliable", None)
    if best and reliable is not None and all(s in best for s in signals):
        out["spatial"] = _ratio([np.asarray(best[s]["peak"], dtype=float)
                                 [np.asarray(reliable, bool)] for s in signals], np.median)
    meg = getattr(result, "meg", None)
    if meg is not None and all(s in meg and "peak" in meg[s] for s in signals):
        out["temporal"] = _ratio([np.asarray(meg[s]["peak"], dtype=float) for s in signals],
                                 np.max)
    return out


def _ratio(pair: list, summary) -> float:
    """summary(gradient values) / summary(activation values) over their finite values;
    NaN where either has none or the activation's is not positive."""
    act, grad = (v[np.isfinite(v)] for v in pair)
    if not act.size or not grad.size or summary(act) <= 0:
        return np.nan
    return float(summary(grad) / summary(act))


def _strengths(rows: pd.DataFrame) -> np.ndarray:
    """The rows' recorded gradient strengths (NaN where the table records none)."""
    return (rows.strength.to_numpy(float) if "strength" in rows
            else np.full(len(rows), np.nan))


def _cells(table: pd.DataFrame, estimate: str):
    """Per backprop cell, its settings, seeds, contrast values and gradient strengths
    (NaN when the table has none)."""
    mine = _with_nuisances(table[(table.truth == "backprop") & (table.estimate == estimate)])
    for setting, group in mine.groupby(list(NUISANCES), sort=True):
        yield (tuple(float(x) for x in setting), group.seed.to_numpy(),
               group.value.to_numpy(float), _strengths(group))


def _retained(cells: list, strength: float) -> list:
    """The cells a study of this gradient ``strength`` is judged against.

    Strength rises with the gradient weight, but only on average: where two weights give
    strengths alike (the weakest ones, whose gradient encoders predict mostly what the
    activations carry), their medians may fall in either order. The per-weight medians
    are therefore fitted by isotonic regression (non-decreasing in the weight; pooled
    where they are not), and the weight that gives the study's strength lies between the
    fitted levels that bracket it: the cells of every weight at those levels are kept,
    and any other cell whose simulated strengths span the study's (sampling spread).
    Where strength does not rise with the weight at all, the fit is one level and every
    cell is kept; so is every cell when a strength is unknown.

    Cells with activation leakage do not enter the fit (leakage lowers the strength a
    weight gives, so they would pull their weight's level down): they are kept like the
    others, when their weight is at a bracketing level or their strengths span the
    study's.
    """
    if not cells or not np.isfinite(strength):
        return cells
    medians, spans = {}, []
    for (weight, _, leakage), _, _, values in cells:
        finite = values[np.isfinite(values)]
        if not finite.size:
            return cells
        if not leakage:
            medians.setdefault(weight, []).append(np.median(finite))
        spans.append((finite.min(), finite.max()))
    if not medians:   # leaky cells only: judged by their spans alone
        return [cell for cell, (lo, hi) in zip(cells, spans) if lo <= strength <= hi] or cells
    weights = sorted(medians)
    fitted = IsotonicRegression(increasing=True).fit_transform(
        weights, [float(np.mean(medians[w])) for w in weights],
        sample_weight=[len(medians[w]) for w in weights])
    below, above = fitted[fitted <= strength], fitted[fitted >= strength]
    level_low = below.max() if below.size else above.min()
    level_high = above.min() if above.size else below.max()
    bracket = {w for w, f in zip(weights, fitted) if level_low <= f <= level_high}
    return [cell for cell, (lo, hi) in zip(cells, spans)
            if cell[0][0] in bracket or lo <= strength <= hi]


def _worst_p(value: float, cells, strength: float = np.nan
             ) -> tuple[float, tuple | None, int, list]:
    """Largest per-cell one-sided p = (1 + #{sim ≤ value}) / (1 + n) over the cells
    retained for ``strength`` (:func:`_retained`); a simulated NaN (no gradient order to
    speak of) counts as a contrast as low as any. Also returns the retained settings."""
    worst, where, n_min = np.nan, None, 0
    used = _retained(cells, strength)
    for setting, _, values, _ in used:
        n = len(values)
        if n == 0:
            continue
        below = int(np.sum(np.nan_to_num(values, nan=-np.inf) <= value))
        p = (1 + below) / (1 + n)
        n_min = n if n_min == 0 else min(n_min, n)
        if not p <= worst:   # also when worst is NaN
            worst, where = p, setting
    return worst, where, n_min, [cell[0] for cell in used]


def _settings_text(settings: list) -> str:
    return "; ".join(f"weight {w:g}" + (f", jitter {j:g} ms" if j else "")
                     + (f", leakage {leak:g}" if leak else "") for w, j, leak in settings)


def _cell_text(setting: tuple) -> str:
    """A cell in words, as the rate tables and the decision name it."""
    w, j, leak = setting
    return (f"gradient weight {w:g}, latency jitter {j:g} ms"
            + (f", activation leakage {leak:g}" if leak else ""))


def _holm(p: dict) -> dict:
    """Holm-adjusted p-values of the finite entries of ``p`` (NaN stays NaN)."""
    finite = sorted((v, k) for k, v in p.items() if np.isfinite(v))
    adjusted, running, m = {k: np.nan for k in p}, 0.0, len(finite)
    for i, (v, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * v))
        adjusted[k] = running
    return adjusted


def divergence_test(values: dict, table: pd.DataFrame, *, alpha: float = 0.05,
                    strengths: dict | None = None) -> pd.DataFrame:
    """Decide, per contrast, whether a study's gradients diverge from *any* backprop of
    the family that could have given its data.

    For each contrast, the p-value against a cell is the share of that cell's
    simulated backprop studies whose contrast is as low or lower, ``(1 + #{sim ≤
    value}) / (1 + n)`` (one-sided: less aligned or ordered than backprop); the
    composite p is the largest over the cells judged (valid whichever of them is true),
    and the contrasts are corrected together by Holm. A contrast is NaN (not estimable:
    e.g. fewer than 3 timed gradient layers) gives no decision.

    The cells judged: with the study's gradient strength (``strengths``,
    :func:`gradient_strength`) and a table that records the simulated studies' own, the
    cells of the gradient weights whose median strengths bracket the study's, and any
    cell whose simulated strengths span it (:func:`_retained`) — a backprop much weaker
    or stronger than the data show is not a candidate (a weight-0.1 backprop's spatial
    contrast reaches −1.3, lower than a partly wrong order gives at weight 0.5).
    Otherwise every cell.

    Parameters
    ----------
    values : dict of str to float
        Contrast key (``"spatial"``, ``"temporal"``) or its estimate name → the study's
        value.
    table : DataFrame
        :func:`simulate_family`'s rows.
    alpha : float
        Family-wise level across the contrasts.
    strengths : dict of str to float, or None
        The study's gradient strength per contrast key (:func:`gradient_strength`); None
        or NaN: judged against every cell.

    Returns
    -------
    DataFrame, one row per contrast: ``contrast``, ``estimate``, ``value``, ``strength``,
    ``p_worst``, ``worst_cell`` (the cell that gave it, as text), ``cells_judged`` (the
    cells judged against, as text), ``n_judged`` (how many), ``n_cells`` (cells
    simulated), ``n_per_cell`` (fewest studies in a cell judged), ``min_p`` (the floor
    ``1 / (1 + n_per_cell)``), ``p_holm``, ``diverges`` and ``can_reach_alpha`` (the
    floor is below the level Holm's first step needs, ``alpha / m``).
    """
    check_level("alpha", alpha)
    missing = {"truth", "estimate", "value", "gradient_weight", "latency_jitter"} - set(table)
    if missing:
        raise ValueError(f"'table' must be simulate_family's output; it lacks {sorted(missing)}.")
    strengths = strengths or {}
    rows, p = [], {}
    for key in CONTRASTS:
        name = _NAMES[key]
        value = values.get(key, values.get(name, np.nan))
        value = float(value) if value is not None else np.nan
        strength = strengths.get(key, np.nan)
        strength = float(strength) if strength is not None else np.nan
        cells = list(_cells(table, name))
        if np.isfinite(value):
            worst, where, n_min, used = _worst_p(value, cells, strength)
        else:
            worst, where, used = np.nan, None, []
            n_min = min((len(c[2]) for c in cells), default=0)
        p[key] = worst
        rows.append({"contrast": key, "estimate": name, "value": value,
                     "strength": strength, "p_worst": worst,
                     "worst_cell": _cell_text(where) if where else "",
                     "cells_judged": _settings_text(used), "n_judged": len(used),
                     "n_cells": len(cells), "n_per_cell": n_min,
                     "min_p": 1 / (1 + n_min) if n_min else np.nan})
    adjusted = _holm(p)
    m = max(1, sum(np.isfinite(v) for v in p.values()))
    out = pd.DataFrame(rows)
    out["p_holm"] = [adjusted[k] for k in out.contrast]
    out["diverges"] = (out.p_holm < alpha).to_numpy()
    out["can_reach_alpha"] = (out.min_p < alpha / m).to_numpy()
    return out


def _wilson_row(k: int, n: int) -> tuple[float, float, float]:
    low, high = _wilson(k, n)
    return (k / n if n else np.nan, low, high)


def family_rates(table: pd.DataFrame, *, alpha: float = 0.05, n_contrasts: int = 2
                 ) -> pd.DataFrame:
    """Error rates of :func:`divergence_test`'s decision, per contrast, on the family.

    False divergence: each simulated backprop study judged against the family with
    itself left out, at ``alpha`` (Holm's largest level, so an upper bound of the
    rate of the corrected decision); reported per cell and, as ``fpr``, for the worst
    cell. Power: each study of a divergent truth judged against the whole family at
    ``alpha / n_contrasts`` (Holm's first, smallest level: a lower bound); a NaN
    contrast counts as not detected. Every study is judged as :func:`divergence_test`
    judges one: against the cells its own gradient strength retains (when the table
    records strengths), so the rates are those of that decision.

    Returns
    -------
    DataFrame, one row per (contrast, what): ``contrast``, ``what`` (``"false
    divergence, weight w, jitter j ms"``, ``"false divergence, worst cell"`` or ``"power
    vs <truth>"``), ``rate``, ``low``, ``high`` (Wilson 95 %), ``k``, ``n``.
    """
    rows = []
    for key in CONTRASTS:
        name = _NAMES[key]
        cells = list(_cells(table, name))
        if not cells:
            continue
        worst = None
        for i, (setting, seeds, values, strengths) in enumerate(cells):
            decisions = []
            for j, v in enumerate(values):
                if not np.isfinite(v):
                    continue
                loo = [c if k != i else (c[0], np.delete(c[1], j), np.delete(c[2], j),
                                         np.delete(c[3], j))
                       for k, c in enumerate(cells)]
                p = _worst_p(v, loo, strengths[j])[0]
                decisions.append(p < alpha)
            k, n = int(np.sum(decisions)), len(decisions)
            rate, low, high = _wilson_row(k, n)
            what = (f"false divergence, weight {setting[0]:g}, jitter {setting[1]:g} ms"
                    + (f", leakage {setting[2]:g}" if setting[2] else ""))
            row = {"contrast": key, "what": what, "rate": rate, "low": low, "high": high,
                   "k": k, "n": n}
            rows.append(row)
            if n and (worst is None or rate > worst["rate"]):
                worst = {**row, "what": "false divergence, worst cell"}
        if worst is not None:
            rows.append(worst)
        others = table[(table.truth != "backprop") & (table.estimate == name)]
        for truth, group in others.groupby("truth", sort=True):
            found = [np.isfinite(v) and _worst_p(v, cells, st)[0] < alpha / n_contrasts
                     for v, st in zip(group.value.to_numpy(float), _strengths(group))]
            k, n = int(np.sum(found)), len(found)
            rate, low, high = _wilson_row(k, n)
            rows.append({"contrast": key, "what": f"power vs {truth}", "rate": rate,
                         "low": low, "high": high, "k": k, "n": n})
    return pd.DataFrame(rows, columns=["contrast", "what", "rate", "low", "high", "k", "n"])


def judge(result, table: pd.DataFrame):
    """A :class:`~gradbrain.hierarchy.HierarchyResult` whose estimates are judged for
    divergence against the backprop family (its ``divergence`` and ``divergence_rates``
    attributes set; its summary then uses them).

    Parameters
    ----------
    result : HierarchyResult
    table : DataFrame
        :func:`simulate_family` on the features and settings of ``result``.

    Returns
    -------
    HierarchyResult (a copy).
    """
    values = {}
    if result.estimates is not None and len(result.estimates):
        by = result.estimates.set_index("estimate").value
        values = {key: float(by.get(_NAMES[key], np.nan)) for key in CONTRASTS}
    out = copy.copy(result)
    out.divergence = divergence_test(values, table, alpha=result.alpha,
                                     strengths=gradient_strength(result))
    n = max(1, int(np.isfinite(out.divergence.p_worst).sum()))   # the contrasts judged
    out.divergence_rates = family_rates(table, alpha=result.alpha, n_contrasts=n)
    return out


def summarize(divergence: pd.DataFrame, rates: pd.DataFrame, *, alpha: float = 0.05) -> str:
    """What the divergence test found, in words (Markdown bullets)."""
    lines = []
    for row in divergence.itertuples():
        mine = rates[rates.contrast == row.contrast] if len(rates) else rates
        fpr = mine[mine.what == "false divergence, worst cell"]
        power = mine[mine.what.str.startswith("power vs")]
        rate_text = ""
        if len(fpr):
            f = fpr.iloc[0]
            rate_text += (f" This decision called a planted backprop divergent in "
                          f"{_pct(f.rate, f.low, f.high)} of {int(f.n)} studies of "
                          "its worst cell")
        if len(power):
            said = "; ".join(f"{_pct(p.rate, p.low, p.high)} of {int(p.n)} "
                             f"{p.what.removeprefix('power vs ')}" for p in power.itertuples())
            rate_text += f", and found a wrong order in {said} studies"
        if rate_text:
            rate_text += "."
        if not np.isfinite(row.value):
            lines.append(f"- {row.estimate}: not estimable here, so not judged.")
            continue
        if not row.n_cells:
            lines.append(f"- {row.estimate} = {row.value:+.2f}: **not judged** against the "
                         "family — no backprop study of it was simulated at these settings.")
            continue
        if not row.can_reach_alpha:
            verdict = (f"**cannot be judged** (with {row.n_per_cell} studies per cell the "
                       f"smallest p is {row.min_p:.3g}, above the level Holm needs)")
        elif row.diverges:
            verdict = "**diverges from every backprop of the family**"
        else:
            verdict = ("**not shown to diverge**: some planted backprop of the family "
                       "gives a contrast as low")
        judged = (f"{row.n_judged} of the {row.n_cells} cells, those whose gradient strength "
                  f"brackets the study's {row.strength:.2f} ({row.cells_judged})"
                  if np.isfinite(getattr(row, "strength", np.nan)) else f"{row.n_cells} cells")
        lines.append(f"- {row.estimate} = {row.value:+.2f}: {verdict} (worst cell: "
                     f"{row.worst_cell}; p = {row.p_worst:.3g}, Holm-adjusted "
                     f"{row.p_holm:.3g}; judged against {judged}, ≥ {row.n_per_cell} "
                     f"studies each).{rate_text}")
    return "\n".join(lines)
