"""Coverage of the spatial score's bootstrap intervals: percentile, basic and BCa.

The spatial score (Spearman ρ between each unit's layer-profile centre and its place in
the hierarchy, :func:`gradbrain.hierarchy.bootstrap_spatial_score`) is computed from
test-set correlations, which noise attenuates; its bootstrap over test images attenuates
them again. Here the truth is known: every target has a population correlation with each
layer's prediction (a Gaussian profile in depth around a preferred depth that rises with
the hierarchy coordinate, peak ``--amplitude``), so the noise-free score is the same
chain on those correlations. Each replicate draws ``--n-test`` test images from that
population, bootstraps the score (``--n-boot`` resamples, as chapter 04 does) and asks
whether each interval contains the noise-free score.

Settings: per target (``--targets`` targets) and on units (``--units``: targets averaged
per hierarchy unit first, as chapter 04 does), at each amplitude.

``--calibrated C`` adds a fourth interval, measured but not used by the library: the
basic interval with its two tail levels calibrated by a double bootstrap (each outer
resample resampled ``C`` times; Beran's prepivoting of the basic root, each tail
separately): each tail's level is chosen so that the inner basic intervals of the outer
resamples miss the estimate on that side in (1 − ci) / 2 of them. It costs ``C`` times
the resamples.

Usage: ``python benchmarks/bootstrap_coverage.py [--replicates 200] [--amplitude 0.3
0.5 0.8] [--calibrated 50]``. Last line::

    RESULT coverage_percentile=… coverage_basic=… coverage_bca=… [coverage_calibrated=…]
           (the lowest over the settings) replicates=… nominal=…
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats


def population_score(rho, depth, coordinate, units, n_units):
    """The profile-centre spatial score on population correlations (n_layers, n_targets)."""
    from gradbrain.hierarchy import profile_centre, unit_coordinates

    if n_units:
        rho = np.stack([rho[:, units == u].mean(1) for u in range(n_units)], 1)
        coordinate = unit_coordinates(coordinate, units)
    return stats.spearmanr(profile_centre(rho, depth), coordinate).statistic


def calibrated_basic(value, outer, inner, ci):
    """The basic interval with tail levels calibrated by a double bootstrap.

    ``outer`` (B,) are the resamples' estimates, ``inner`` (B, C) the estimates of each
    outer resample resampled again. An outer resample's inner basic interval covers
    ``value`` from above at tail level ``a`` when ``a <= u_b``, with ``u_b`` the share of
    its inner estimates at or below ``2·outer_b − value``; from below when ``a <= 1 −
    u_b``. Each tail's level is the ``(1 − ci) / 2`` quantile of those shares, so that
    the inner intervals cover ``value`` as often as the outer interval should cover the
    truth; the levels then give the outer basic interval (NaN resamples left out).
    """
    finite = np.isfinite(outer)
    outer, inner = outer[finite], inner[finite]
    if outer.size == 0 or not np.isfinite(value):
        return (np.nan, np.nan)
    below = np.where(np.isfinite(inner), inner <= (2 * outer - value)[:, None], np.nan)
    u = np.nanmean(below, 1)
    tail = (1 - ci) / 2
    floor = 0.5 / outer.size          # a level the B resamples can still resolve
    upper_level = max(float(np.nanquantile(u, tail)), floor)
    lower_level = max(float(np.nanquantile(1 - u, tail)), floor)
    return (2 * value - float(np.quantile(outer, 1 - lower_level)),
            2 * value - float(np.quantile(outer, upper_level)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--amplitude", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--unit-targets", type=int, default=400)
    parser.add_argument("--units", type=int, default=20)
    parser.add_argument("--ci", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrated", type=int, default=0, metavar="C",
                        help="also the double-bootstrap calibrated basic interval, with C "
                             "inner resamples per outer one (0: not measured)")
    args = parser.parse_args(argv)

    import gradbrain  # noqa: F401  (torch/torchvision set-up)
    from gradbrain.hierarchy import bootstrap_spatial_score, hierarchy_units
    from gradbrain.stats import _wilson

    depth = np.linspace(0, 1, args.n_layers)
    rng = np.random.default_rng(args.seed)
    methods = ("percentile", "basic", "bca") + (("calibrated",) if args.calibrated else ())
    lowest = dict.fromkeys(methods, 1.0)
    start = time.perf_counter()
    print(f"{'setting':<24} {'noise-free':>10} {'estimate':>9} "
          + " ".join(f"{m:>20}" for m in methods))
    for n_units, n_targets in ((0, args.targets), (args.units, args.unit_targets)):
        for amplitude in args.amplitude:
            coordinate = rng.uniform(0, 1, n_targets)
            preferred = coordinate + rng.normal(0, 0.15, n_targets)
            rho = amplitude * np.exp(-(depth[:, None] - preferred[None]) ** 2 / (2 * 0.25**2))
            units = (hierarchy_units(coordinate, None, n_units) if n_units
                     else np.zeros(n_targets, int))
            truth = population_score(rho, depth, coordinate, units, n_units)
            hits = {m: 0 for m in methods}
            estimates = []
            for rep in range(args.replicates):
                y = rng.standard_normal((args.n_test, n_targets))
                noise = rng.standard_normal((args.n_layers, args.n_test, n_targets))
                prediction = rho[:, None] * y[None] + np.sqrt(1 - rho[:, None] ** 2) * noise
                boot_rows = rng.integers(0, args.n_test, (args.n_boot, args.n_test))
                for method in methods[:3]:
                    out = bootstrap_spatial_score(
                        prediction, y, coordinate, depth, units=units if n_units else None,
                        boot_indices=boot_rows, statistic="centre", interval=method,
                        ci=args.ci, device="cpu")
                    low, high = out["spearman_ci"]
                    hits[method] += bool(low <= truth <= high)
                estimates.append(out["value"])
                if args.calibrated:   # one call: the outer resamples, then their inner ones
                    inner = np.take_along_axis(
                        np.repeat(boot_rows[:, None, :], args.calibrated, 1),
                        rng.integers(0, args.n_test, (args.n_boot, args.calibrated,
                                                      args.n_test)), 2)
                    nested = bootstrap_spatial_score(
                        prediction, y, coordinate, depth, units=units if n_units else None,
                        boot_indices=np.concatenate([boot_rows, inner.reshape(-1, args.n_test)]),
                        statistic="centre", interval="percentile", device="cpu", batch=2048)
                    samples = nested["samples"]
                    low, high = calibrated_basic(
                        nested["value"], samples[:args.n_boot],
                        samples[args.n_boot:].reshape(args.n_boot, args.calibrated), args.ci)
                    hits["calibrated"] += bool(low <= truth <= high)
            name = f"{'units' if n_units else 'targets'} {n_targets}, ρ {amplitude:g}"
            cells = []
            for method in methods:
                rate = hits[method] / args.replicates
                low, high = _wilson(hits[method], args.replicates)
                cells.append(f"{100 * rate:5.1f} % [{100 * low:3.0f}–{100 * high:3.0f}]")
                lowest[method] = min(lowest[method], rate)
            print(f"{name:<24} {truth:10.3f} {np.mean(estimates):9.3f} "
                  + " ".join(f"{c:>20}" for c in cells), flush=True)
    print(f"({args.replicates} replicates per setting, {args.n_test} test images, "
          f"{args.n_boot} resamples; {time.perf_counter() - start:.0f} s)")
    print("RESULT " + " ".join(f"coverage_{m}={lowest[m]:.3f}" for m in methods)
          + f" replicates={args.replicates} nominal={args.ci}")


if __name__ == "__main__":
    main()
