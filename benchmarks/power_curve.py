"""Power and false-positive rate of the hierarchy verdicts against sample size and noise.

For each (number of images, noise level) of a grid, studies are simulated from the
features of the model the book runs (EfficientNet-Lite0, ImageNet weights, shipped) on
that many embedded images, under a planted backprop (power) and under truths where
backprop's predictions are false (false positives), and judged as chapter 04 does
(:func:`gradbrain.hierarchy.simulate_tests`, nominal decisions; cached, so an
interrupted run resumes). It prints, per grid point, how often each test and verdict
held under each truth, then a table and one machine-readable line whose values are
comma-separated lists, one entry per grid point in the table's order::

    RESULT power=…,… fpr=…,… n_images=…,… noise=…,… model=… seeds=…

``power``: the backprop verdict under ``backprop``; ``fpr``: the same verdict under the
other simulated truths, pooled. With few seeds per point the intervals are wide: the
curve shows a trend, not a calibration.

Usage: ``python benchmarks/power_curve.py [--n-images 120 200] [--noise 0.5 1 2]
[--seeds 4] [--truths backprop none] [--jobs 2]``.
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
    args = parser.parse_args(argv)
    if "backprop" not in args.truths or len(args.truths) < 2:
        parser.error("--truths needs 'backprop' (power) and at least one other (FPR)")
    warnings.simplefilter("ignore")
    from gradbrain import features as gf
    from gradbrain import hierarchy, models
    from gradbrain.data import load_embedded

    model = models.load("efficientnet_lite0.imagenet", weights="pretrained")
    results = []
    for n_images in args.n_images:
        feats = gf.extract(model, load_embedded(n_images), losses=("ce",),
                           device=args.device, cache=True)
        for noise in args.noise:
            start = time.perf_counter()
            sims = hierarchy.simulate_tests(
                feats, noise=noise, truths=args.truths, n_seeds=args.seeds,
                first_seed=args.first_seed, n_jobs=args.jobs, n_perm=args.n_perm,
                n_boot=args.n_boot, device=args.device, progress=False)
            rates = hierarchy.error_rates(sims).set_index("part")
            verdict = sims[sims.part == hierarchy.VERDICT_BACKPROP]
            power = verdict[verdict.truth == "backprop"].holds.mean()
            fpr = verdict[verdict.truth != "backprop"].holds.mean()
            results.append({"n_images": n_images, "noise": noise, "power": power,
                            "fpr": fpr, "seconds": time.perf_counter() - start})
            print(f"\n{n_images} images, noise {noise}: "
                  f"{sims[['truth', 'seed']].drop_duplicates().shape[0]} studies in "
                  f"{results[-1]['seconds']:.0f} s")
            held = [c for c in rates.columns if c.startswith("held_")]
            print(rates[held].round(2).to_string())
    table = pd.DataFrame(results)
    print("\n" + table.round(3).to_string(index=False))
    def joined(column, fmt):
        return ",".join(format(v, fmt) for v in table[column])

    print(f"RESULT power={joined('power', '.3f')} fpr={joined('fpr', '.3f')} "
          f"n_images={joined('n_images', 'd')} noise={joined('noise', 'g')} "
          f"model=efficientnet_lite0.imagenet seeds={args.seeds}")


if __name__ == "__main__":
    main()
