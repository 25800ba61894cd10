"""Power and false-positive rate of the hierarchy verdicts against sample size and noise.

For each (weights, number of images, noise level) of a grid, studies are simulated from
the features of the model the book runs (EfficientNet-Lite0: its ImageNet weights,
shipped, and a random-init control) on that many embedded images, under a planted
backprop (power) and under truths where backprop's predictions are false (false
positives), and judged as chapter 04 does (:func:`gradbrain.hierarchy.simulate_tests`,
nominal decisions; cached, so an interrupted run resumes). It prints, per grid point, how
often each test and verdict held under each truth, then a table and one machine-readable
line whose values are comma-separated lists, one entry per grid point in the table's
order::

    RESULT power=…,… fpr=…,… n_images=…,… noise=…,… model=…,… seeds=…

``power``: the backprop verdict under ``backprop``; ``fpr``: the same verdict under the
other simulated truths, pooled. With few seeds per point the intervals are wide: the
curve shows a trend, not a calibration. ``--ship`` writes every test's rates at every
point (:func:`gradbrain.hierarchy.power_curve`) where chapter 04 reads them
(:data:`gradbrain.hierarchy.POWER_CURVE`).

Usage: ``python benchmarks/power_curve.py [--weights pretrained random] [--n-images 120
200] [--noise 0.5 1 2] [--seeds 4] [--truths backprop none] [--jobs 2] [--ship]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import pandas as pd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, nargs="+", default=[120, 200])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=2000)
    parser.add_argument("--truths", nargs="+", default=["backprop", "none"],
                        choices=("none", "forward", "backprop", "paper"))
    parser.add_argument("--n-perm", type=int, default=2000)
    parser.add_argument("--n-boot", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1, help="studies simulated in parallel")
    parser.add_argument("--device", default=None)
    parser.add_argument("--weights", nargs="+", default=["pretrained", "random"],
                        choices=("pretrained", "random"),
                        help="ImageNet weights, and/or the random-init control (seed 0)")
    parser.add_argument("--ship", action="store_true",
                        help="write the table chapter 04 reads (gradbrain/reference)")
    args = parser.parse_args(argv)
    if "backprop" not in args.truths or len(args.truths) < 2:
        parser.error("--truths needs 'backprop' (power) and at least one other (FPR)")
    warnings.simplefilter("ignore")
    from gradbrain import features as gf
    from gradbrain import hierarchy, models
    from gradbrain.analysis import simulation
    from gradbrain._utils import atomic_path
    from gradbrain.data import load_embedded
    from gradbrain.data.simulated import default_n_test

    labels = {"pretrained": "ImageNet", "random": "random-init"}
    results, simulations = [], {}
    for weights in args.weights:
        model = models.load("efficientnet_lite0.imagenet",
                            weights="pretrained" if weights == "pretrained" else None)
        for n_images in args.n_images:
            feats = gf.extract(model, load_embedded(n_images), losses=("ce",),
                               device=args.device, cache=True)
            for noise in args.noise:
                start = time.perf_counter()
                sims = simulation.simulate_tests(
                    feats, noise=noise, truths=args.truths, n_seeds=args.seeds,
                    first_seed=args.first_seed, n_jobs=args.jobs, n_perm=args.n_perm,
                    n_boot=args.n_boot, device=args.device, progress=False)
                simulations[labels[weights], n_images, default_n_test(n_images), noise] = sims
                rates = hierarchy.error_rates(sims).set_index("part")
                verdict = rates.loc[hierarchy.VERDICT_BACKPROP]
                results.append({"weights": labels[weights], "n_images": n_images,
                                "noise": noise, "power": verdict.power, "fpr": verdict.fpr,
                                "seconds": time.perf_counter() - start})
                print(f"\n{labels[weights]}, {n_images} images, noise {noise}: "
                      f"{sims[['truth', 'seed']].drop_duplicates().shape[0]} studies in "
                      f"{results[-1]['seconds']:.0f} s")
                held = [c for c in rates.columns if c.startswith("held_")]
                print(rates[held].round(2).to_string())
    table = pd.DataFrame(results)
    print("\n" + table.round(3).to_string(index=False))
    if args.ship:
        curve = hierarchy.power_curve(simulations)
        with atomic_path(hierarchy.POWER_CURVE, suffix=".csv.gz") as tmp:
            curve.to_csv(tmp, index=False)
        print(f"wrote {hierarchy.POWER_CURVE}")

    def joined(column, fmt):
        return ",".join(format(v, fmt) for v in table[column])

    models_ = ",".join(f"efficientnet_lite0.{'imagenet' if w == 'ImageNet' else 'random'}"
                       for w in table.weights)
    print(f"RESULT power={joined('power', '.3f')} fpr={joined('fpr', '.3f')} "
          f"n_images={joined('n_images', 'd')} noise={joined('noise', 'g')} "
          f"model={models_} seeds={args.seeds}")


if __name__ == "__main__":
    main()
