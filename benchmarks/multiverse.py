"""Does the demo's headline survive other reasonable settings? A multiverse of the spatial
divergence decision.

Chapter 04 judges the demo study (simulated, seed 0, ``paper`` truth, 200 embedded images,
EfficientNet-Lite0 with its ImageNet weights) with one choice of the settings a careful
analyst could have made otherwise: the number of hierarchy units, the peak-score
threshold ``min_score``, the noise-ceiling threshold ``min_noise_ceiling`` (%), how a
unit's layer is read (``spatial_statistic``) and where the vertices and best layers are
chosen (``select_on``). Here each setting is changed one at a time, and at every setting
the whole decision is made again as the chapter makes it: the study's spatial contrast
(gradient spatial score minus the activation one) against the backprop family simulated
*at that setting* (:func:`gradbrain.divergence.simulate_family`: every cell of
:data:`~gradbrain.divergence.DEFAULT_FAMILY`, the study's noise, fMRI-only studies from the
reserved calibration seeds; the cells judged chosen by the study's gradient strength at
that setting, :func:`gradbrain.divergence.gradient_strength`), with the family's own
false-divergence rate (worst cell, each study left out) and power against the wrong
orders at that setting. Only the spatial contrast is judged, as the demo judges it. The
decision is then read at three levels (``--alphas``); a level below the family's floor
``1 / (1 + n)`` cannot be reached and is marked so.

Usage: ``python benchmarks/multiverse.py [--seeds 20] [--seeds-divergent 10] [--jobs 2]
[--out table.csv]``. The families are cached under ``$GRADBRAIN_DATA``, so an interrupted
run resumes. Last line::

    RESULT settings=… diverges=… (settings where the spatial contrast diverges at 0.05)
           contrast_min=… contrast_max=… p_max=… fpr_worst_max=… power_reversed_min=…
           power_shuffled_min=… power_partial_min=…
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

#: The demo's settings (params/demo.yaml, chapter 04), and the alternatives tried.
DEFAULTS = {"n_units": 20, "min_score": 0.1, "min_noise_ceiling": 10.0,
            "spatial_statistic": "centre", "select_on": "train"}
ALTERNATIVES = {"n_units": [10, 40], "min_score": [0.05, 0.2],
                "min_noise_ceiling": [5.0, 20.0], "spatial_statistic": ["best"],
                "select_on": ["test"]}


def settings_grid() -> list[dict]:
    """The demo's settings, then each alternative with the others at the demo's."""
    grid = [dict(DEFAULTS)]
    for name, values in ALTERNATIVES.items():
        grid += [{**DEFAULTS, name: value} for value in values]
    return grid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="studies per backprop cell")
    parser.add_argument("--seeds-divergent", type=int, default=10,
                        help="studies per wrong order")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.05, 0.10])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the table here (CSV)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import gradbrain  # noqa: F401  (torchvision work-around before timm)
    from gradbrain import divergence, models
    from gradbrain import features as gf
    from gradbrain.analysis.backprop import backprop_tests
    from gradbrain.analysis.encoding import fmri_encoding
    from gradbrain.data import load_embedded, simulated

    warnings.filterwarnings("ignore")
    net = models.load("efficientnet_lite0.imagenet", weights="pretrained")
    feats = gf.extract(net, load_embedded(200), losses=("ce",), pool="mean")
    # the demo study as chapter 00 makes it (its fMRI does not depend on the MEG part)
    study = simulated.make_study(0, n_images=200, features=feats, gradient_truth="paper",
                                 noise=1.0, gradient_loss="ce", meg=False)
    encoding = fmri_encoding(study, feats, cv=5)
    name = divergence._NAMES["spatial"]
    rows, start = [], time.perf_counter()
    for setting in settings_grid():
        changed = [k for k in setting if setting[k] != DEFAULTS[k]]
        label = ", ".join(f"{k}={setting[k]}" for k in changed) or "the demo's"
        result = backprop_tests(study, feats, loss="ce", cv=5, n_perm=99, n_boot=0,
                                n_perm_chance=0, fmri=encoding, **setting)
        value = float(result.estimates.set_index("estimate").value.get(name, np.nan))
        table = divergence.simulate_family(
            feats, noise=1.0, n_seeds=args.seeds, n_seeds_divergent=args.seeds_divergent,
            simulate_meg=False, n_jobs=args.jobs, loss="ce", cv=5,
            exclude_seeds=[0], progress=not args.no_progress, **setting)
        judged = divergence.divergence_test({"spatial": value}, table, alpha=0.05,
                                            strengths=divergence.gradient_strength(result))
        judged = judged.set_index("contrast").loc["spatial"]
        rates = divergence.family_rates(table, n_contrasts=1).set_index("what")
        rates = rates[rates.contrast == "spatial"]
        row = {"setting": label, "contrast": value, "strength": float(judged.strength),
               "cells_judged": judged.cells_judged, "p_worst": float(judged.p_worst),
               "worst_cell": judged.worst_cell, "floor": float(judged.min_p),
               "fpr_worst": float(rates.loc["false divergence, worst cell", "rate"])}
        for truth in simulated.DIVERGENT_TRUTHS:
            what = f"power vs {truth}"
            row[f"power_{truth}"] = float(rates.loc[what, "rate"]) if what in rates.index \
                else np.nan
        for alpha in args.alphas:
            row[f"diverges_{alpha:g}"] = ("floor" if judged.min_p >= alpha
                                          else bool(judged.p_worst < alpha))
        rows.append(row)
        print(f"{label}: contrast {value:+.3f}, p = {judged.p_worst:.3f} "
              f"({judged.worst_cell}), floor {judged.min_p:.3f}", flush=True)
    took = time.perf_counter() - start
    out = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(out.round(3).to_string(index=False))
    print(f"{len(out)} settings in {took:.0f} s ({args.seeds} studies per backprop cell, "
          f"{args.seeds_divergent} per wrong order)")
    if args.out:
        out.to_csv(args.out, index=False)
    at = out["diverges_0.05"] if "diverges_0.05" in out else pd.Series(dtype=object)
    print("RESULT " + " ".join([
        f"settings={len(out)}", f"diverges={int((at == True).sum())}",  # noqa: E712
        f"contrast_min={out.contrast.min():.3f}", f"contrast_max={out.contrast.max():.3f}",
        f"p_max={out.p_worst.max():.3f}", f"fpr_worst_max={out.fpr_worst.max():.3f}",
        *(f"power_{t}_min={out[f'power_{t}'].min():.3f}"
          for t in simulated.DIVERGENT_TRUTHS)]))


if __name__ == "__main__":
    main()
