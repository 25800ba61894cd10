"""The divergence test against a family of planted backprops: its false-divergence rate
in every cell of the family and its power against wrong orders, on the book's features.

Studies are simulated from EfficientNet-Lite0's own features (ImageNet weights, the 200
embedded images the demo uses) under a planted backprop in every cell of
:data:`gradbrain.divergence.DEFAULT_FAMILY` (gradient weight 0.1–0.9, latency jitter 0
or 40 ms, activation leakage 0 or 0.5) and under backprop's places and times in a wrong
order (``reversed``, ``shuffled``, and ``partial``: the upper half of the layers
reversed), from the reserved calibration seeds (never the seeds that chose the statistics). Each contrast
is decided as chapter 04 decides it (:func:`gradbrain.divergence.divergence_test`: worst
cell, Holm over the contrasts).

It also prints the decision of the single-point null this replaces (backprop at gradient
weight 0.5 only, :func:`gradbrain.hierarchy.divergence_p`'s rule) on the other cells:
how often it calls a true backprop of another strength divergent.

Usage: ``python benchmarks/divergence_family.py [--seeds 40] [--seeds-divergent 20]
[--contrasts spatial temporal] [--jobs 2] [--noise 1.0] [--ship NAME]``. The table
chapter 04 reads for the demo was made with ``--ship efficientnet_lite0-demo`` (the
arguments are in its ``.json``). Last line::

    RESULT spatial_fpr_worst=… spatial_power_reversed=… spatial_power_shuffled=…
           spatial_power_partial=… temporal_fpr_worst=… temporal_power_reversed=…
           temporal_power_shuffled=… temporal_power_partial=…
           single_point_fpr_w0.1=… single_point_fpr_w0.25=… seeds=… seeds_divergent=…
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--seeds-divergent", type=int, default=20)
    parser.add_argument("--contrasts", nargs="+", default=["spatial", "temporal"],
                        choices=["spatial", "temporal"])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--ship", default=None, help="write the table to gradbrain/reference")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    import gradbrain  # noqa: F401  (torchvision work-around before timm)
    from gradbrain import divergence, models
    from gradbrain import features as gf
    from gradbrain.data import load_embedded

    warnings.filterwarnings("ignore")
    net = models.load("efficientnet_lite0.imagenet", weights="pretrained")
    feats = gf.extract(net, load_embedded(200), losses=("ce",), pool="mean")
    start = time.perf_counter()
    table = divergence.simulate_family(
        feats, noise=args.noise, n_seeds=args.seeds, n_seeds_divergent=args.seeds_divergent,
        simulate_fmri="spatial" in args.contrasts, simulate_meg="temporal" in args.contrasts,
        n_jobs=args.jobs, loss="ce", progress=not args.no_progress)
    took = time.perf_counter() - start
    n_studies = table[["contrast", "truth", "seed", *divergence.NUISANCES]] \
        .drop_duplicates().shape[0]
    print(f"{n_studies} simulated studies in {took:.0f} s")
    rates = divergence.family_rates(table, n_contrasts=len(args.contrasts))
    with pd.option_context("display.width", 160, "display.max_rows", 100):
        print(rates.round(3).to_string(index=False))
    # the single-point null (weight 0.5 only) this replaces, on the other cells
    single = []
    for key in args.contrasts:
        name = divergence._NAMES[key]
        mine = table[(table.estimate == name) & (table.truth == "backprop")]
        point = mine[(mine.gradient_weight == 0.5) & (mine.latency_jitter == 0)
                     & (mine.activation_leakage == 0)].value
        point = point.to_numpy(float)
        point = point[np.isfinite(point)]
        for (w, j, leak), group in mine.groupby(list(divergence.NUISANCES)):
            if (w, j, leak) == (0.5, 0.0, 0.0) or not len(point):
                continue
            v = group.value.to_numpy(float)
            p = (1 + (point[None, :] <= np.nan_to_num(v, nan=-np.inf)[:, None]).sum(1)) \
                / (1 + len(point))
            single.append({"contrast": key, "gradient_weight": w, "latency_jitter": j,
                           "activation_leakage": leak,
                           "single_point_fpr": float(np.mean(p < 0.05)), "n": len(v),
                           "median_contrast": float(np.nanmedian(v))})
    single = pd.DataFrame(single)
    if len(single):
        print("\nthe single-point null (weight 0.5, no jitter) on the other backprop cells:")
        print(single.round(3).to_string(index=False))
    if args.ship:
        path = divergence.write_family_reference(
            table, feats, name=args.ship, noise=args.noise, loss="ce",
            note=f"benchmarks/divergence_family.py --seeds {args.seeds} --seeds-divergent "
                 f"{args.seeds_divergent} --contrasts {' '.join(args.contrasts)} --noise "
                 f"{args.noise}; {n_studies} studies, {took:.0f} s")
        print(f"shipped {path}")

    def rate(key, what):
        found = rates[(rates.contrast == key) & (rates.what == what)]
        return float(found.rate.iloc[0]) if len(found) else float("nan")

    fields = []
    for key in ("spatial", "temporal"):
        fields += [f"{key}_fpr_worst={rate(key, 'false divergence, worst cell'):.3f}",
                   f"{key}_power_reversed={rate(key, 'power vs reversed'):.3f}",
                   f"{key}_power_shuffled={rate(key, 'power vs shuffled'):.3f}",
                   f"{key}_power_partial={rate(key, 'power vs partial'):.3f}"]
    for w in (0.1, 0.25):
        mine = single[(single.gradient_weight == w) & (single.latency_jitter == 0)
                      & (single.activation_leakage == 0)] \
            if len(single) else single
        value = float(mine.single_point_fpr.max()) if len(mine) else float("nan")
        fields.append(f"single_point_fpr_w{w:g}={value:.3f}")
    print("RESULT " + " ".join(fields) + f" seeds={args.seeds} "
          f"seeds_divergent={args.seeds_divergent}")


if __name__ == "__main__":
    main()
