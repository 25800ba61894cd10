"""False-positive rate and power of every hierarchy test, on a real model's features.

Studies are simulated (:func:`gradbrain.data.simulated.make_study`) from the features of
the model the book runs (EfficientNet-Lite0, ImageNet weights, shipped) — not from
idealised layer-specific features — under each planted truth, for many seeds; each is
judged by :func:`gradbrain.hierarchy.run` exactly as chapter 04 does. For every test
row, the truths under which it must not hold give its false-positive rate, the truth
under which it should hold its power (each with a Wilson 95 % interval):

======================================  ========================  ==============
test (part)                             null truths               power truth
======================================  ========================  ==============
1 spatial: layer maps agree             none, paper               backprop
1 spatial: gradient spatial score > 0   none, paper               backprop
2 temporal: after the forward sweep     none, forward             backprop
2 temporal: follows the autograd order  none, forward, paper      backprop
3 where: gain high-level vs early       none, forward, backprop   paper
3 where: gradients peak later           none, forward             paper
======================================  ========================  ==============

The last line is machine-readable::

    RESULT max_test_fpr=<worst test's rate> min_power=<weakest test's power> ...

Usage: ``python benchmarks/fpr_hierarchy.py [--seeds 20] [--n-images 200] [--device cuda]
[--truths none forward]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

NULLS = {
    "gradient and activation layer maps agree": (("none", "paper"), "backprop"),
    "gradient spatial score > 0": (("none", "paper"), "backprop"),
    "gradients after the forward sweep": (("none", "forward"), "backprop"),
    "gradient latency follows the autograd order": (("none", "forward", "paper"), "backprop"),
    "gradients gain more in high-level than early cortex": (("none", "forward", "backprop"),
                                                            "paper"),
    "gradients peak later than activations": (("none", "forward"), "paper"),
}
TRUTHS = ("none", "forward", "backprop", "paper")


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of a binomial proportion k / n."""
    if n == 0:
        return (np.nan, np.nan)
    z = 1.959964
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--n-perm", type=int, default=2000)
    parser.add_argument("--n-boot", type=int, default=100)
    parser.add_argument("--device", default=None)
    parser.add_argument("--truths", nargs="+", default=list(TRUTHS), choices=TRUTHS,
                        help="truths to simulate (rates of the others print as NaN)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    from gradbrain import features as gf
    from gradbrain import hierarchy, models
    from gradbrain.data import load_embedded
    from gradbrain.data.simulated import make_study

    model = models.load("efficientnet_lite0.imagenet", weights="pretrained")
    feats = gf.extract(model, load_embedded(args.n_images), losses=("ce",),
                       device=args.device, cache=False)
    rows, start = [], time.perf_counter()
    for truth in args.truths:
        for seed in range(args.seeds):
            study = make_study(seed, n_images=args.n_images, features=feats,
                               gradient_truth=truth, noise=args.noise)
            result = hierarchy.run(study, feats, n_perm=args.n_perm, n_boot=args.n_boot,
                                   seed=seed, device=args.device)
            for _, test in result.tests.iterrows():
                rows.append({"truth": truth, "seed": seed, "part": test.part,
                             "holds": bool(test.holds)})
            rows.append({"truth": truth, "seed": seed, "part": "verdict: consistent",
                         "holds": bool(result.consistent_with_backprop)})
        done = pd.DataFrame([r for r in rows if r["truth"] == truth])
        rates = done.groupby("part", sort=False).holds.mean()
        print(f"{truth}: {args.seeds} seeds done ({time.perf_counter() - start:.0f} s); held: "
              + "; ".join(f"{part} {rate:.2f}" for part, rate in rates.items()), flush=True)
    table = pd.DataFrame(rows)
    lines = []
    for part, (nulls, power_truth) in {**NULLS, "verdict: consistent": (
            ("none", "forward", "paper"), "backprop")}.items():
        null = table[(table.part == part) & table.truth.isin(nulls)].holds
        hit = table[(table.part == part) & (table.truth == power_truth)].holds
        fpr, power = null.mean(), hit.mean()
        lines.append({"test": part, "fpr": fpr, "fpr_ci": wilson(int(null.sum()), len(null)),
                      "n_null": len(null), "power": power,
                      "power_ci": wilson(int(hit.sum()), len(hit)), "n_power": len(hit)})
        per_truth = {t: table[(table.part == part) & (table.truth == t)].holds.mean()
                     for t in TRUTHS}
        print(f"{part:<52} FPR {fpr:.2f} [{lines[-1]['fpr_ci'][0]:.2f}, "
              f"{lines[-1]['fpr_ci'][1]:.2f}] (n={len(null)})  power {power:.2f} "
              f"[{lines[-1]['power_ci'][0]:.2f}, {lines[-1]['power_ci'][1]:.2f}]  by truth "
              + " ".join(f"{t}={v:.2f}" for t, v in per_truth.items()))
    tests = [line for line in lines if not line["test"].startswith("verdict")]
    verdict = lines[-1]
    print(f"RESULT max_test_fpr={max(t['fpr'] for t in tests):.3f} "
          f"min_power={min(t['power'] for t in tests):.3f} verdict_fpr={verdict['fpr']:.3f} "
          f"verdict_power={verdict['power']:.3f} seeds={args.seeds} n_images={args.n_images}")


if __name__ == "__main__":
    main()
