"""Studies simulated from a model's own features and judged as the chapter judges a study:
the tables behind error rates and model-based nulls.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._utils import (atomic_path, check_in_allowed, discard_unreadable, get_data_home,
                      hash_arrays, usable_cores)
from ..data import load_embedded, simulated
from ..features import extract
from .backprop import backprop_tests
from ..hierarchy import calibration
from ..hierarchy.calibration import (FIRST_SIMULATION_SEED, SELECTION_SEEDS, SIMULATION_VERSION,
                                     TRUTH_VERSION, _fingerprint, _shipped_simulations)
from ..hierarchy.verdicts import TEST_TRUTHS, VERDICT_BACKPROP, VERDICT_PAPER, _verdict_rows

__all__ = ["SIMULATION_IMAGES", "simulate_tests", "simulation_design", "study_sizes",
           "write_reference"]


def _simulated_tests(features, truth: str, seed: int, n_images: int, noise: float,
                     modalities: dict, run_kwargs: dict, n_threads: int | None,
                     cache_dir: Path | None = None, study_kwargs: dict | None = None
                     ) -> list[dict]:
    """Simulate one study from ``features`` and judge it as :func:`backprop_tests` does.

    With ``cache_dir``, the study's rows are read from / written to
    ``<cache_dir>/<truth>[-v<version>]-<seed>.csv`` (atomically), so an interrupted series
    resumes; the truth's version
    (:data:`~gradbrain.hierarchy.calibration.TRUTH_VERSION`, when not 1) in the name, so
    that a truth planted anew is simulated anew.
    """
    version = TRUTH_VERSION[truth]
    name = f"{truth}{'' if version == 1 else f'-v{version}'}-{seed}.csv"
    path = cache_dir / name if cache_dir is not None else None
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
        study = simulated.make_study(seed, n_images=n_images, features=features,
                                     gradient_truth=truth, noise=noise,
                                     gradient_loss=run_kwargs.get("loss") or features.losses[0],
                                     **modalities, **(study_kwargs or {}))
        # the above-chance tests describe a study and do not enter its verdicts: skipped
        result = backprop_tests(study, features, seed=seed,
                                **{**run_kwargs, "n_perm_chance": 0})
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


def _simulation_key(features, n_images: int, noise: float, modalities: dict,
                    run_kwargs: dict, sizes: dict | None = None) -> dict:
    """Every setting that changes :func:`simulate_tests`' rows (not the seeds, not the
    device), with :func:`backprop_tests`'s defaults filled in; ``sizes`` (the study sizes that are
    not make_study's defaults) only where given, so that keys of default-sized studies,
    and the shipped tables they find, stay as they were."""
    defaults = {name: p.default for name, p in inspect.signature(backprop_tests).parameters.items()
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


def write_reference(simulated_table: pd.DataFrame, features, *, n_images: int | None = None,
                    noise: float = 1.0, simulate_fmri: bool = True, simulate_meg: bool = True,
                    name: str, note: str = "", **run_kwargs) -> Path:
    """Ship a table of :func:`simulate_tests` with the library (maintainers' tool).

    Writes ``gradbrain/reference/simulated_tests-<name>.csv.gz`` and its key (the
    settings and a fingerprint of ``features``) as ``.json``; :func:`simulate_tests`
    then reads its studies instead of simulating them whenever it is called with the
    same settings on the same features. Give the same arguments as to that call.
    """
    modalities = {"fmri": bool(simulate_fmri), "meg": bool(simulate_meg)}
    n_images = features.n_images if n_images is None else n_images
    key = _simulation_key(features, n_images, noise, modalities, run_kwargs)
    base = calibration._REFERENCE / f"simulated_tests-{name}"   # read now: tests patch it
    table = simulated_table.assign(truth_version=simulated_table.truth.map(TRUTH_VERSION))
    with atomic_path(base.with_suffix(".csv.gz"), suffix=".csv.gz") as tmp:
        table.to_csv(tmp, index=False)
    meta = {"key": key, "fingerprint": _fingerprint(features, key["loss"]).tolist(),
            "n_studies": int(table[["truth", "seed"]].drop_duplicates().shape[0]),
            "note": note}
    with atomic_path(base.with_suffix(".json"), suffix=".json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return base.with_suffix(".json")


def simulate_tests(features, *, n_images: int | None = None, noise: float = 1.0,
                   truths=("none", "forward", "backprop", "paper"), n_seeds: int = 20,
                   first_seed: int = FIRST_SIMULATION_SEED, exclude_seeds=(),
                   n_jobs: int = 1,
                   simulate_fmri: bool = True,
                   simulate_meg: bool = True, images=None, n_test: int | None = None,
                   n_fmri_repeats: int | None = None, n_meg_test_repeats: int | None = None,
                   cache=True, progress: bool = True, **run_kwargs) -> pd.DataFrame:
    """Run every test of :func:`backprop_tests` on studies simulated from the chapter's own
    features.

    For each planted truth and seed, :func:`gradbrain.data.simulated.make_study` builds
    fMRI and MEG responses from ``features`` (the model the chapter tests, on the
    embedded images) and :func:`backprop_tests` judges them with the same settings. The table this
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
        Studies per truth: the first ``n_seeds`` seeds from ``first_seed`` on that are not
        in ``exclude_seeds`` nor among the seeds that chose the statistics
        (:data:`gradbrain.hierarchy.calibration.SELECTION_SEEDS`, 1000–1011).
    first_seed : int
        Start of the seeds; default the reserved block
        (:data:`~gradbrain.hierarchy.calibration.FIRST_SIMULATION_SEED`, 10,000,000), far
        from the small seeds a study or a sweep subject is made with.
    exclude_seeds : iterable of int
        Seeds never simulated: the seed of a simulated study under test, so that it is
        never among its own null (a sweep subject seeded 1000 would otherwise be).
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
        Passed to :func:`backprop_tests` (``loss``, ``alpha``, ``n_perm``, ``n_boot``, ``cv``,
        ``min_noise_ceiling``, ``min_score``, ``n_units``, ``gradient_part``, ``device``).

    Returns
    -------
    DataFrame
        One row per (truth, seed, test part): ``truth``, ``seed``, ``prediction``,
        ``part``, ``value`` (the test's statistic; larger is more evidence for it),
        ``p_value`` and ``holds``; plus the two verdict rows per study
        (:data:`VERDICT_BACKPROP`, :data:`VERDICT_PAPER`, value 1.0 or 0.0).
    """
    from tqdm import tqdm

    truths = [truths] if isinstance(truths, str) else list(truths)
    for truth in truths:
        check_in_allowed("truths", truth, simulated.GRADIENT_TRUTHS)
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
    excluded = {int(x) for x in exclude_seeds} | set(SELECTION_SEEDS)
    seeds = [seed for seed in range(first_seed, first_seed + n_seeds + len(excluded))
             if seed not in excluded][:n_seeds]
    jobs = [(truth, seed) for truth in truths for seed in seeds]
    rows, cache_dir = [], None
    if cache is not False:
        key = _simulation_key(features, n_images, noise, modalities, run_kwargs, sizes)
        shipped = _shipped_simulations(key, _fingerprint(features, key["loss"]))
        if shipped is not None:
            # rows of a truth planted anew since they were shipped: dropped
            made = shipped.pop("truth_version") if "truth_version" in shipped else 1
            shipped = shipped[np.asarray(made) == shipped.truth.map(TRUTH_VERSION).to_numpy()]
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

        cores = usable_cores()
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


#: Where a chapter's calibration studies take their images from when the study is real.
SIMULATION_IMAGES = ("embedded", "study")


def simulation_design(study, features, *, net=None, meg_study=None, images: str = "embedded",
                      noise: float | None = None, n_images: int = 200, pool: str = "mean",
                      device=None, cache=True) -> dict:
    """The features, noise and sizes a chapter simulates its calibration studies from.

    * A simulated study: its own features, sizes and noise (the noise it was made with).
    * Real data, ``images="study"``: its own images and features at its own size
      (:func:`study_sizes`).
    * Real data, ``images="embedded"``: the same model's features on ``n_images``
      embedded images (sizes far below a real study's).

    On real data the noise, unless given, is estimated from the study's fMRI noise
    ceilings (:func:`gradbrain.data.simulated.estimate_noise`); a study without them
    (MEG only) gets 1.0, and the description says it is assumed.

    Parameters
    ----------
    study, features : Study, Features
        The chapter's study and its features.
    net : LoadedModel or None
        The model (needed for ``images="embedded"`` on real data).
    meg_study : Study or None
        A separate MEG study (lends its repeats per test image to the sizes).
    images : {"embedded", "study"}
    noise : float or None
        The noise of the simulated studies; None: as above.
    n_images, pool, device, cache
        Embedded images and how their features are extracted.

    Returns
    -------
    dict with ``features`` (Features), ``noise`` (float), ``sizes`` (dict, the keyword
    arguments of :func:`simulate_tests` that fix the study size; empty for the default
    size) and ``description`` (str, in words).
    """
    check_in_allowed("images", images, SIMULATION_IMAGES)
    if noise is not None and (isinstance(noise, bool) or not np.isfinite(noise) or noise < 0):
        raise ValueError(f"'noise' must be a finite number >= 0 or None; got {noise!r}.")
    sizes = {}
    if study.truth:
        design, level, said = features, study.truth["noise"], "the study's own"
    else:
        if noise is None and getattr(study, "ncsnr", None) is not None:
            level, said = simulated.estimate_noise(study), "estimated from its noise ceilings"
        else:
            level, said = 1.0, "assumed"
        if images == "study":
            design, sizes = features, study_sizes(study, meg_study)
        else:
            if net is None:
                raise ValueError("'net' (the chapter's model) is needed to simulate real data "
                                 "on embedded images; or pass images='study'.")
            design = extract(net, load_embedded(n_images), losses=tuple(features.losses),
                             pool=pool, device=device, cache=cache)
    if noise is not None:
        level, said = float(noise), "given"
    shape = (f"{design.n_images} images of this study, {sizes['n_test']} test" if sizes
             else f"{design.n_images} images")
    return {"features": design, "noise": float(level), "sizes": sizes,
            "description": f"{shape}, noise {level:.3g} ({said})"}
