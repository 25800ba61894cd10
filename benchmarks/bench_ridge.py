"""Benchmark: gradbrain's RidgeCV vs himalaya's RidgeCV (torch backend) and scikit-learn.

Same problem, same folds (KFold(5), unshuffled), same alphas, measured side by side in one
run. Prints the times, the speed-up over himalaya, the fraction of identical alphas, the
largest prediction difference, and the share of the machine's matmul roofline that
gradbrain reaches (GEMM GFLOP/s measured in the same run; the algorithm's FLOPs counted).
Then the same comparison with ShuffleSplit(5, train_size=0.6, test_size=0.2) folds, whose
training sets leave samples out (gradbrain's direct path; himalaya given the same splits).
Both libraries run in float32 (gradbrain: ``dtype=torch.float32``, the encoding default).

Default problem: n=2000 samples, p=768 features, v=20,000 targets, 5 folds, 10 alphas
(1e0…1e8), float32. The last line is machine-readable::

    RESULT speedup_vs_himalaya=<x> roofline_share=<y> alpha_agreement=<z> max_pred_rel_diff=<w> device=<cpu|cuda> alpha_agreement_exact=<e> alpha_agreement_himalaya64=<h> shufflesplit_speedup=<s> shufflesplit_alpha_agreement=<a>

(``alpha_agreement`` compares with himalaya in the same precision (float32);
``alpha_agreement_exact`` with gradbrain's own float64 fit and ``alpha_agreement_himalaya64``
with himalaya run in float64: they tell whose float32 rounding decided the near-ties.)

Usage: ``python benchmarks/bench_ridge.py [--n 2000 --p 768 --v 20000] [--device cuda]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.model_selection import KFold, ShuffleSplit

from gradbrain.ridge import RidgeCV


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def gemm_gflops(n, p, v, device, repeats=3) -> float:
    """Measured float32 GEMM rate on a matmul shaped like the kernel's largest one."""
    a = torch.randn(10 * (n // 5), p, device=device)
    b = torch.randn(p, v, device=device)
    a @ b
    seconds, _ = timed(lambda: a @ b, device, repeats)
    return 2 * a.shape[0] * p * v / seconds / 1e9


def algorithm_flops(n, p, v, n_folds, n_alphas) -> float:
    """FLOPs of gradbrain's primal path (matmuls only; eigh and element-wise work excluded)."""
    n_test = n / n_folds
    total = 2 * n * p * v                                # X^T Y, once
    per_fold = (2 * n_test * p * v                       # held-out part of X^T Y
                + 2 * p * p * v                          # V^T X_tr^T Y_tr
                + 2 * n_test * p * v                     # A^T Y_te (alpha-dependent cross term)
                + 2 * n_alphas * n_test * p * v          # predictions of every alpha
                + 2 * (n - n_test) * p * p)              # training Gram matrix
    refit = 2 * n * p * p + 4 * p * p * v                # Gram, V^T (X^T Y), V (…)
    return total + n_folds * per_fold + refit


def make_problem(n, p, v, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p), dtype=np.float32)
    W = rng.standard_normal((p, v), dtype=np.float32) / np.sqrt(p)
    snr = np.exp(rng.uniform(np.log(0.01), np.log(3.0), v)).astype(np.float32)
    Y = (X @ W) * snr + rng.standard_normal((n, v), dtype=np.float32)
    X_new = rng.standard_normal((200, p), dtype=np.float32)
    return X, Y, X_new


def interleaved(first, second, repeats: int, device) -> tuple[tuple, tuple]:
    """Time two functions in alternation (this machine is noisy): for each, the median
    time (s) and its last result."""
    times, results = ([], []), [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            seconds, results[i] = timed(fn, device, 1)
            times[i].append(seconds)
    return ((statistics.median(times[0]), results[0]),
            (statistics.median(times[1]), results[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--p", type=int, default=768)
    parser.add_argument("--v", type=int, default=20000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    alphas = np.logspace(0, 8, 10)
    folds = KFold(args.folds)
    X, Y, X_new = make_problem(args.n, args.p, args.v)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"n={args.n} p={args.p} v={args.v}, {args.folds} folds, {len(alphas)} alphas, float32, "
          f"median of {args.repeats}")

    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV

    backend = set_backend("torch_cuda" if device.type == "cuda" else "torch", on_error="raise")
    Xd, Yd = backend.asarray(X), backend.asarray(Y)

    ours_fn = lambda: RidgeCV(alphas=alphas, cv=folds, device=device,  # noqa: E731
                              dtype=torch.float32).fit(Xd, Yd)
    theirs_fn = lambda: HimalayaRidgeCV(  # noqa: E731
        alphas=alphas, cv=folds, fit_intercept=True, solver_params={"warn": False}).fit(Xd, Yd)
    ours_fn(), theirs_fn()  # warm-up
    (t_ours, ours), (t_theirs, theirs) = interleaved(ours_fn, theirs_fn, args.repeats, device)
    gflops = gemm_gflops(args.n, args.p, args.v, device)
    flops = algorithm_flops(args.n, args.p, args.v, args.folds, len(alphas))

    exact = RidgeCV(alphas=alphas, cv=folds, device=device, dtype=torch.float64).fit(X, Y)
    exact_agreement = float(np.mean(np.isclose(ours.alpha_, exact.alpha_, rtol=1e-5)))
    their_alphas = np.asarray(backend.to_numpy(theirs.best_alphas_))
    their_exact = float(np.mean(np.isclose(their_alphas, exact.alpha_, rtol=1e-5)))
    theirs64 = HimalayaRidgeCV(alphas=alphas, cv=folds, fit_intercept=True,
                               solver_params={"warn": False}).fit(
        backend.asarray(X.astype(np.float64)), backend.asarray(Y.astype(np.float64)))
    vs_theirs64 = float(np.mean(np.isclose(
        ours.alpha_, np.asarray(backend.to_numpy(theirs64.best_alphas_)), rtol=1e-5)))
    agreement = float(np.mean(np.isclose(ours.alpha_, their_alphas, rtol=1e-5)))
    same = np.isclose(ours.alpha_, their_alphas, rtol=1e-5)
    pred_ours = ours.predict(X_new)
    pred_theirs = np.asarray(backend.to_numpy(theirs.predict(backend.asarray(X_new))))
    rel_diff = float(np.abs(pred_ours[:, same] - pred_theirs[:, same]).max()
                     / np.abs(pred_theirs[:, same]).max())
    print(f"gradbrain RidgeCV   {t_ours:8.2f} s  ({flops / 1e9:.0f} GFLOP → "
          f"{flops / t_ours / 1e9:.0f} GFLOP/s)")
    print(f"himalaya RidgeCV    {t_theirs:8.2f} s")
    print(f"GEMM roofline       {gflops:8.0f} GFLOP/s (float32, measured now)")
    print(f"speed-up over himalaya {t_theirs / t_ours:.2f}; roofline share "
          f"{flops / t_ours / 1e9 / gflops:.2f}")
    print(f"identical alphas: {agreement:.5f} of targets; max prediction difference "
          f"(relative to max |prediction|, targets with identical alphas): {rel_diff:.2e}")
    print(f"identical alphas with a float64 fit (exact reference): gradbrain {exact_agreement:.5f}, "
          f"himalaya {their_exact:.5f}; gradbrain (float32) vs himalaya run in float64: "
          f"{vs_theirs64:.5f}")

    # ShuffleSplit: training sets that leave samples out (no "all minus held-out" shortcut)
    shuffle = list(ShuffleSplit(args.folds, train_size=0.6, test_size=0.2,
                                random_state=0).split(X))
    ss_ours_fn = lambda: RidgeCV(alphas=alphas, cv=shuffle, device=device,  # noqa: E731
                                 dtype=torch.float32).fit(Xd, Yd)
    ss_theirs_fn = lambda: HimalayaRidgeCV(  # noqa: E731
        alphas=alphas, cv=shuffle, fit_intercept=True, solver_params={"warn": False}).fit(Xd, Yd)
    (ss_t_ours, ss_ours), (ss_t_theirs, ss_theirs) = interleaved(ss_ours_fn, ss_theirs_fn,
                                                                  args.repeats, device)
    ss_agreement = float(np.mean(np.isclose(
        ss_ours.alpha_, np.asarray(backend.to_numpy(ss_theirs.best_alphas_)), rtol=1e-5)))
    print(f"ShuffleSplit({args.folds}, 0.6/0.2): gradbrain {ss_t_ours:.2f} s, himalaya "
          f"{ss_t_theirs:.2f} s -> {ss_t_theirs / ss_t_ours:.2f}x; identical alphas "
          f"{ss_agreement:.5f}")

    if not args.skip_sklearn:
        from sklearn.linear_model import Ridge

        def brute():
            scores = np.zeros((len(alphas), args.v))
            for i, alpha in enumerate(alphas):
                for train, test in folds.split(X):
                    model = Ridge(alpha=alpha).fit(X[train], Y[train])
                    scores[i] += -((model.predict(X[test]) - Y[test]) ** 2).mean(0)
            return alphas[scores.argmax(0)]

        start = time.perf_counter()
        sk_alphas = brute()
        t_sk = time.perf_counter() - start
        print(f"scikit-learn Ridge per fold × alpha {t_sk:8.2f} s (one run); identical alphas "
              f"vs gradbrain {np.mean(np.isclose(ours.alpha_, sk_alphas)):.5f}; speed-up "
              f"{t_sk / t_ours:.1f}")
    print(f"RESULT speedup_vs_himalaya={t_theirs / t_ours:.3f} "
          f"roofline_share={flops / t_ours / 1e9 / gflops:.3f} alpha_agreement={agreement:.5f} "
          f"max_pred_rel_diff={rel_diff:.2e} device={device.type} "
          f"alpha_agreement_exact={exact_agreement:.5f} "
          f"alpha_agreement_himalaya64={vs_theirs64:.5f} "
          f"shufflesplit_speedup={ss_t_theirs / ss_t_ours:.3f} "
          f"shufflesplit_alpha_agreement={ss_agreement:.5f}")


if __name__ == "__main__":
    main()
