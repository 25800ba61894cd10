"""Model comparison: the whole chain for several models on one study, as one tidy table.

For every model: features (activations and gradients of each loss) on the study's
images → fMRI and MEG encoding → :func:`gradbrain.analysis.backprop.backprop_tests` for each loss. Models
without given weights are randomly initialised and labelled so in the table.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from . import models
from .analysis.backprop import backprop_tests
from .analysis.encoding import fmri_encoding, meg_encoding
from ._utils import check_in_allowed
from .features import POOLS, _check_losses, extract
from .stats import check_level

__all__ = ["run"]


def run(model_names: Sequence[str], study, *, weights: Mapping[str, object] | None = None,
        losses: Sequence[str] = ("ce",), pool: str = "mean", alpha: float = 0.05,
        n_perm: int = 10_000, n_boot: int = 1000, seed: int = 0, cv: int = 5, device=None,
        cache=True, progress: bool = False) -> pd.DataFrame:
    """Run the chain for every model and collect one row per (model, signal).

    Parameters
    ----------
    model_names : str or sequence of str
        Registry names (:func:`gradbrain.models.list_models`); one name is one model.
    study : Study
        With fMRI and/or MEG, and ``images``.
    weights : mapping of str to weights, optional
        Per model: ``"pretrained"``, a checkpoint path, or None (random initialisation,
        the default for models not listed).
    losses : sequence of str
        Losses whose gradients are tested (each gets its own rows).
    cache : bool, path-like or None
        Features and encodings kept on disk and reused (True: under
        ``$GRADBRAIN_DATA``, so encodings the other chapters fitted on the same study,
        features and settings are read, not refitted; see
        :func:`~gradbrain.analysis.encoding.fmri_encoding`).

    Returns
    -------
    DataFrame with one row per (model, signal) and columns ``model``, ``weights`` (in
    words), ``trained`` (bool), ``feature`` (``"activation"`` or ``"gradient"``),
    ``loss`` (empty for activations), ``fmri_score`` (median peak r/√NC over reliable
    vertices), ``meg_score`` (best r(t) over layers), ``spatial`` and ``temporal``
    (Spearman), ``spatial_p`` and ``temporal_p`` (shuffled layers), ``spatial_ci_low``,
    ``spatial_ci_high``, ``temporal_ci_low`` and ``temporal_ci_high`` (bootstrap over
    test images), and for gradient rows ``consistent_with_backprop``,
    ``paper_finding`` (see :meth:`gradbrain.hierarchy.HierarchyResult.table`) and
    ``head``: the head the loss used (``Features.meta["heads"]``; a fixed random
    ``ce`` head for models without a classifier, which is not warned here).
    """
    if isinstance(model_names, str):  # one model, not the characters of its name
        model_names = [model_names]
    if not model_names:
        raise ValueError("'model_names' is empty; give registry names, e.g. "
                         "['dinov3_vitb16', 'resnet50'].")
    models.check_names(model_names)
    repeated = sorted({name for name in model_names if list(model_names).count(name) > 1})
    if repeated:
        raise ValueError(f"'model_names' lists {repeated} more than once; give each model "
                         "once.")
    if study.images is None:
        raise ValueError(f"Study {study.name!r} has no images to extract features from.")
    weights = dict(weights or {})
    # everything is checked before the first model runs (each costs minutes)
    stray = sorted(set(weights) - set(model_names))
    if stray:
        raise ValueError(f"'weights' names {stray}, which 'model_names' does not list "
                         f"({list(model_names)}): misspelt? Models not in 'weights' run "
                         "randomly initialised.")
    check_level("alpha", alpha)
    for name, value, low in (("n_perm", n_perm, 1), ("n_boot", n_boot, 0), ("seed", seed, 0),
                             ("cv", cv, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"'{name}' must be an integer >= {low}; got {value!r}.")
    losses = _check_losses(losses)
    if not losses:
        raise ValueError("'losses' is empty: the tests compare gradients of a loss with "
                         "activations; give e.g. losses=['ce'].")
    check_in_allowed("pool", pool, POOLS)
    no_token = [name for name in model_names if "cls" in pool
                and models.get_spec(name).family != "vit"]
    if no_token:
        raise ValueError(f"pool={pool!r} needs a class token, which {no_token} have none "
                         "of; use pool='mean'.")
    rows = []
    for name in model_names:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            loaded = models.load(name, weights=weights.get(name), seed=seed)
        with warnings.catch_warnings():  # the table's 'head' column records the fallback
            warnings.filterwarnings("ignore", message=".*uses a fixed random.*")
            feats = extract(loaded, study.images, losses=tuple(losses), pool=pool,
                            device=device, cache=cache, progress=progress)
        fmri = (fmri_encoding(study, feats, cv=cv, device=device, progress=progress,
                              return_prediction=n_boot > 0, cache=cache)
                if study.betas is not None else None)
        meg = (meg_encoding(study, feats, cv=cv, n_boot=n_boot, seed=seed, device=device,
                            progress=progress, cache=cache)
               if study.epochs is not None else None)
        base = {"model": name, "weights": loaded.weights,
                "trained": bool(loaded.pretrained)}
        for loss in losses:
            # the above-chance tests describe a study and enter neither the table nor a
            # verdict: skipped (n_perm_chance=0), as for simulated studies
            result = backprop_tests(study, feats, loss=loss, alpha=alpha, n_perm=n_perm,
                                   n_boot=n_boot, seed=seed, cv=cv, device=device, fmri=fmri,
                                   meg=meg, n_perm_chance=0)
            table = result.table()
            if loss != losses[0]:  # the activation row once per model
                table = table[table.feature == "gradient"]
            head = feats.meta["heads"][loss]
            rows.extend({**base, **row, "head": head if row["feature"] == "gradient" else None}
                        for row in table.to_dict("records"))
    return pd.DataFrame(rows)

