"""Benchmark: the hierarchy statistics — batched layer permutations and spatial bootstraps.

NSD-like sizes by default: 20,000 vertices, 24 layers (depths in [0, 1]), 10,000
permutations; for the bootstrap 1,000 test images, 200 resamples and 5,000 reliable
vertices.

permutations
    gradbrain: :func:`gradbrain.hierarchy.layer_permutation_test` (Spearman) — every
    permutation at once, through per-layer sums of the ranked targets.
    Reference: a loop of ``scipy.stats.spearmanr`` on the permuted depths, timed on
    ``--reference-perms`` permutations and scaled to the same count (said so in the
    output); the statistics of those permutations are compared exactly.
bootstrap
    gradbrain: :func:`gradbrain.hierarchy.bootstrap_spatial_score` (resamples batched as
    weighted sums of the test rows).
    Reference: a numpy loop (resample rows, per-layer column correlations, best layer,
    ``scipy.stats.spearmanr``), timed on ``--reference-boots`` resamples and scaled; the
    scores of those resamples are compared.

The last line is machine-readable::

    RESULT perm_seconds=<s> perm_speedup=<x> boot_seconds=<s> boot_speedup=<y> max_diff=<d>

Usage: ``python benchmarks/bench_hierarchy.py [--vertices 20000] [--device cuda]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import stats

from gradbrain import hierarchy


def _time(fn, repeats: int = 1):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def _columns_r(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vertices", type=int, default=20_000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--perms", type=int, default=10_000)
    parser.add_argument("--reference-perms", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--boot-vertices", type=int, default=5000)
    parser.add_argument("--boots", type=int, default=200)
    parser.add_argument("--reference-boots", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device "
          f"{args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}")

    # ---------------------------------------------------------------- permutations
    depth = np.linspace(0, 1, args.layers)
    coordinate = rng.uniform(0, 100, args.vertices)
    best = np.clip((coordinate / 100 * args.layers + rng.normal(0, 4, args.vertices))
                   .astype(int), 0, args.layers - 1)
    ours_s, ours = _time(lambda: hierarchy.layer_permutation_test(
        best, coordinate, depth, n_perm=args.perms, seed=args.seed, device=args.device), 3)
    perms = ours["permutations"][:args.reference_perms]

    def reference():
        return np.array([stats.spearmanr(depth[perm][best], coordinate).statistic
                         for perm in perms])

    ref_s, ref_null = _time(reference)
    ref_scaled = ref_s * args.perms / len(perms)
    perm_diff = float(np.max(np.abs(ref_null - ours["null"][:len(perms)])))
    print(f"\npermutations: {args.perms} of {args.layers} layers over {args.vertices} vertices")
    print(f"  gradbrain (batched)          {ours_s:9.3f} s")
    print(f"  scipy spearmanr loop         {ref_scaled:9.1f} s  (timed {len(perms)}, "
          f"scaled x{args.perms / len(perms):.0f})")
    print(f"  speed-up {ref_scaled / ours_s:.0f}x; max |ρ diff| {perm_diff:.2e}")

    # ---------------------------------------------------------------- bootstrap
    n_test, n_v, n_l = args.test_images, args.boot_vertices, args.layers
    coordinate_b = rng.uniform(0, 100, n_v)
    preferred = np.clip((coordinate_b / 100 * n_l).astype(int), 0, n_l - 1)
    y = rng.standard_normal((n_test, n_v)).astype(np.float32)
    prediction = np.empty((n_l, n_test, n_v), np.float32)
    for layer in range(n_l):
        noise = np.where(preferred == layer, 2.0, 3.0).astype(np.float32)
        prediction[layer] = y + noise * rng.standard_normal((n_test, n_v), dtype=np.float32)
    indices = rng.integers(0, n_test, (args.boots, n_test))
    ours_b, boot = _time(lambda: hierarchy.bootstrap_spatial_score(
        prediction, y, coordinate_b, depth, boot_indices=indices, device=args.device))

    def reference_boot():
        out = []
        for rows in indices[:args.reference_boots]:
            r = np.stack([_columns_r(prediction[k, rows].astype(float), y[rows].astype(float))
                          for k in range(n_l)])
            out.append(stats.spearmanr(depth[r.argmax(0)], coordinate_b).statistic)
        return np.array(out)

    ref_b, ref_samples = _time(reference_boot)
    ref_b_scaled = ref_b * args.boots / args.reference_boots
    boot_diff = float(np.max(np.abs(ref_samples - boot["samples"][:args.reference_boots])))
    print(f"\nspatial bootstrap: {args.boots} resamples of {n_test} test images, {n_l} layers, "
          f"{n_v} vertices")
    print(f"  gradbrain (batched)          {ours_b:9.3f} s")
    print(f"  numpy/scipy loop             {ref_b_scaled:9.1f} s  (timed "
          f"{args.reference_boots}, scaled x{args.boots / args.reference_boots:.0f})")
    print(f"  speed-up {ref_b_scaled / ours_b:.1f}x; max |ρ diff| {boot_diff:.2e}; "
          f"95 % CI {boot['spearman_ci'][0]:.3f} … {boot['spearman_ci'][1]:.3f}")
    print(f"RESULT perm_seconds={ours_s:.4f} perm_speedup={ref_scaled / ours_s:.1f} "
          f"boot_seconds={ours_b:.3f} boot_speedup={ref_b_scaled / ours_b:.2f} "
          f"max_diff={max(perm_diff, boot_diff):.2e}")


if __name__ == "__main__":
    main()
