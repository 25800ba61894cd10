"""Benchmark: gradbrain's time-resolved MEG encoding and decoding vs scikit-learn and MNE.

THINGS-MEG-like sizes by default: 1,500 images/trials (1,200 fit, 300 scored), 272
sensors, 141 time points, 768 features, 10 alphas (1e0…1e8 for encoding, 1e-2…1e6 for
decoding on standardised sensors). Every comparison uses the same data, the same
cross-validation and the same scoring, and prints the largest score difference.

encoding
    gradbrain: ONE ridge problem over all sensors × time points (38,352 targets; one
    factorisation of the features serves them all), K-fold (5) — run with one alpha per
    time point shared by the sensors (``alpha_per="time"``) to match the reference, and
    with gradbrain's default one alpha per sensor × time point (timed too).
    Reference: a loop over time points of scikit-learn
    ``RidgeCV(alphas, cv=KFold(5), scoring="neg_mean_squared_error")`` (272 targets each).
decoding
    gradbrain: :func:`gradbrain.meg.decode_time_resolved` (efficient leave-one-out,
    every time point in one batched Gram + eigh).
    Reference: MNE ``SlidingEstimator(make_pipeline(StandardScaler(), RidgeCV(alphas)))``
    (scikit-learn's default RidgeCV: the same efficient leave-one-out), one target; and
    64 targets, for which SlidingEstimator runs once per target.

The last line is machine-readable::

    RESULT encoding_speedup=<x> decoding_speedup=<y> decoding64_speedup=<z> max_score_diff=<w>

Usage: ``python benchmarks/bench_meg.py [--trials 1500 --features 768] [--device cuda]``
(``--targets-measured 16`` times the 64-target decoding reference on 16 targets and
scales it, saying so; ``--times-measured 20`` does the same for the encoding reference,
on 20 evenly spaced time points of ``--times``, its scores compared there; the defaults
run everything).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.linear_model import RidgeCV as SkRidgeCV
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gradbrain import meg
from gradbrain.ridge import pearson_r


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def make_data(n, c, t, p, seed=0):
    """Features → MEG through a few latent components with smooth time courses."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, 32)) @ rng.standard_normal((32, p))
         + 0.5 * rng.standard_normal((n, p))).astype(np.float32)
    times = np.linspace(-0.1, 1.3, t)
    k = 8
    courses = np.exp(-((times[None] - rng.uniform(0.05, 0.5, (k, 1))) ** 2) / (2 * 0.05**2))
    amplitude = X @ rng.standard_normal((p, k)) / np.sqrt(p)
    patterns = rng.standard_normal((k, c))
    Y = np.einsum("nk,kc,kt->nct", amplitude, patterns, courses)
    Y += 2.0 * rng.standard_normal((n, c, t))
    return X, (1e-13 * Y).astype(np.float32), amplitude


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1500)
    parser.add_argument("--channels", type=int, default=272)
    parser.add_argument("--times", type=int, default=141)
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--targets-measured", type=int, default=None,
                        help="run the per-target reference on this many of --targets and "
                             "scale its time (default: all)")
    parser.add_argument("--times-measured", type=int, default=None,
                        help="run the encoding reference (one scikit-learn fit per time "
                             "point) on this many evenly spaced time points and scale its "
                             "time (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-encoding", action="store_true",
                        help="decoding only (encoding_speedup is then reported as nan)")
    args = parser.parse_args()
    if args.times_measured is not None and not 1 <= args.times_measured <= args.times:
        parser.error(f"--times-measured must be between 1 and --times ({args.times}); got "
                     f"{args.times_measured}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, c, t, p = args.trials, args.channels, args.times, args.features
    n_fit = int(0.8 * n)
    X, Y, amplitude = make_data(n, c, t, p)
    print(f"{n} trials ({n_fit} fit), {c} sensors, {t} times, {p} features; "
          f"torch threads {torch.get_num_threads()}, device {device}")

    # ------------------------------------------------------------------ encoding
    enc_alphas = np.logspace(0, 8, 10)
    scale = float(np.abs(Y[:n_fit]).max())

    def ours(alpha_per):
        return meg.encode_time_resolved(X[:n_fit], Y[:n_fit], X[n_fit:], Y[n_fit:],
                                        alphas=enc_alphas, cv=5, device=device,
                                        alpha_per=alpha_per)

    # the time points the reference fits: all, or --times-measured evenly spaced ones
    measured = (np.arange(t) if args.times_measured is None
                else np.unique(np.linspace(0, t - 1, args.times_measured).round().astype(int)))

    def sklearn_loop():
        r, alpha = np.empty((c, len(measured))), np.empty(len(measured))
        for i, ti in enumerate(measured):
            model = SkRidgeCV(alphas=enc_alphas, cv=KFold(5),
                              scoring="neg_mean_squared_error")
            model.fit(X[:n_fit], Y[:n_fit, :, ti] / scale)
            r[:, i] = pearson_r(Y[n_fit:, :, ti], model.predict(X[n_fit:]))
            alpha[i] = model.alpha_
        return {"r": r, "alpha": alpha}

    if args.skip_encoding:
        t_ref = t_ours = float("nan")
        enc_diff = 0.0
    else:
        t_ref, t_ours, enc_diff = encoding_comparison(ours, sklearn_loop, device, t,
                                                      measured)

    _decoding(args, X, Y, amplitude, n_fit, t, device, t_ref, t_ours, enc_diff)


def encoding_comparison(ours, sklearn_loop, device, t, measured):
    """Time both encodings; the reference fits the time points ``measured`` only and its
    time is scaled to all ``t`` of them (said when it is), scores compared there."""
    ours("time")  # warm-up (allocations, thread pools)
    t_ours_a, enc = timed(lambda: ours("time"), device)
    t_ref, enc_ref = timed(sklearn_loop, device)
    t_ours_b, _ = timed(lambda: ours("time"), device)
    t_ours = statistics.median([t_ours_a, t_ours_b])
    t_per_target, _ = timed(lambda: ours("target"), device)
    scaled = ""
    if len(measured) < t:
        scaled = (f" (measured on {len(measured)} of {t} time points, {t_ref:.2f} s, "
                  f"scaled by {t / len(measured):.2f})")
        t_ref *= t / len(measured)
    enc_diff = float(np.abs(enc["r"][:, measured] - enc_ref["r"]).max())
    same = float(np.mean(enc["alpha"][0][measured] == enc_ref["alpha"]))
    print(f"encoding: gradbrain one problem {t_ours:.2f} s (alpha per time point, as the "
          f"reference; {t_per_target:.2f} s with one alpha per sensor x time), scikit-learn "
          f"loop over {t} time points {t_ref:.2f} s{scaled} -> {t_ref / t_ours:.1f}x; "
          f"max |r diff| {enc_diff:.2e}, same alpha at {same:.0%} of the time points "
          "compared")
    return t_ref, t_ours, enc_diff


def _decoding(args, X, Y, amplitude, n_fit, t, device, t_ref, t_ours, enc_diff):
    # ------------------------------------------------------------------ decoding
    from mne.decoding import SlidingEstimator

    dec_alphas = np.logspace(-2, 6, 10)
    y1 = amplitude[:, 0]

    def sliding(target):
        est = SlidingEstimator(make_pipeline(StandardScaler(), SkRidgeCV(alphas=dec_alphas)),
                               verbose=False)
        return est.fit(Y[:n_fit], target[:n_fit]).predict(Y[n_fit:])

    def ours_decode(target):
        return meg.decode_time_resolved(Y[:n_fit], target[:n_fit], Y[n_fit:],
                                        alphas=dec_alphas, device=device)["prediction"]

    ours_decode(y1)
    t_dec_a, pred_dec = timed(lambda: ours_decode(y1), device)
    t_dec_ref, pred_dec_ref = timed(lambda: sliding(y1), device)
    t_dec_b, _ = timed(lambda: ours_decode(y1), device)
    t_dec = statistics.median([t_dec_a, t_dec_b])
    dec_diff = float(np.abs(pearson_r(np.tile(y1[n_fit:, None], t), pred_dec)
                            - pearson_r(np.tile(y1[n_fit:, None], t), pred_dec_ref)).max())
    print(f"decoding, 1 target: gradbrain {t_dec:.2f} s, MNE SlidingEstimator {t_dec_ref:.2f} s "
          f"-> {t_dec_ref / t_dec:.1f}x; max |r diff| {dec_diff:.2e}")

    # 64 targets (back-to-back style: decode many image features at once)
    rng = np.random.default_rng(1)
    targets = amplitude @ rng.standard_normal((amplitude.shape[1], args.targets))
    t64, pred64 = timed(lambda: ours_decode(targets), device)
    measured = args.targets_measured or args.targets
    start = time.perf_counter()
    diffs = []
    for k in range(measured):
        ref = sliding(targets[:, k])
        truth = np.tile(targets[n_fit:, k:k + 1], t)
        diffs.append(np.abs(pearson_r(truth, pred64[:, :, k]) - pearson_r(truth, ref)).max())
    t64_ref = (time.perf_counter() - start) * args.targets / measured
    dec64_diff = float(max(diffs))
    note = "" if measured == args.targets else f" (measured on {measured}, scaled)"
    print(f"decoding, {args.targets} targets: gradbrain {t64:.2f} s, SlidingEstimator x "
          f"{args.targets} {t64_ref:.1f} s{note} -> {t64_ref / t64:.1f}x; max |r diff| "
          f"{dec64_diff:.2e}")

    max_diff = max(enc_diff, dec_diff, dec64_diff)
    print(f"RESULT encoding_speedup={t_ref / t_ours:.3f} decoding_speedup={t_dec_ref / t_dec:.3f} "
          f"decoding64_speedup={t64_ref / t64:.3f} max_score_diff={max_diff:.2e}")


if __name__ == "__main__":
    main()
