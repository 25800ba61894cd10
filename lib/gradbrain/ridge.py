"""Cross-validated ridge regression with one alpha per target, in torch (CPU or CUDA).

The encoding models of the study map every layer's features onto every brain target
(vertex, or sensor × time point): ``Y ≈ X W``, with ``W`` regularised by a ridge
penalty whose strength ``alpha`` is chosen per target by cross-validation (10
log-spaced alphas 1e0…1e8 and 5 folds, the protocol of Raugel et al. 2025; any
scikit-learn splitter, with groups), then refit on all training data.

Algorithm (same protocol as himalaya's ``RidgeCV``: per-fold centring, negative mean
squared error averaged over folds, argmax per target):

* X and Y are centred once; each fold's training means are removed exactly.
* Per fold, one eigendecomposition of the training Gram matrix — ``X_tr^T X_tr``
  (p × p, primal) when samples outnumber features, else ``X_tr X_tr^T`` (dual, the
  kernel form) — in float64, the only place that needs it.
* ``X_tr^T Y_tr`` is not recomputed per fold: ``X^T Y`` is formed once and each fold
  whose training set is every sample it does not hold out (K-fold, leave-one-out,
  group K-fold) subtracts its held-out part; other folds (ShuffleSplit,
  TimeSeriesSplit, gapped lists) sum over their own training samples.
* All alphas are scored at once: one large matmul yields the held-out predictions of
  every alpha, ``(n_alphas · n_test, rank) @ (rank, n_targets)``.
* Targets are processed in batches sized from the free memory, so very many targets
  (163,842 vertices) never sit on the device at once; results stream back to the host.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.model_selection import check_cv

from ._utils import check_in_allowed, check_positive_int_or_none, moved_names, resolve_device

__all__ = [
    "RidgeCV", "check_folds", "encoding_scores", "layerwise_scores",
    "noise_normalised", "pearson_r", "shuffled_correlations", "variance_partition", "PARTITION", "PARTITION_SCORES", "DEFAULT_ALPHAS", "SCORINGS", "standardize",
    "standardizer",
]

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(0, 8, 10))  # 1e0 … 1e8
SCORINGS = ("neg_mean_squared_error", "r2")


# --------------------------------------------------------------------------- checks


def _check_tensor(name: str, values: torch.Tensor, *, allow_1d: bool = False) -> torch.Tensor:
    """Validate a torch input the way scikit-learn's ``check_array`` validates arrays."""
    values = values.detach()  # fitting never needs the caller's autograd graph
    if values.is_complex():
        raise ValueError(f"Complex data not supported: {name} has dtype {values.dtype}; pass "
                         "its real part or magnitude.")
    if not (values.is_floating_point() or values.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold numbers; got a tensor of dtype {values.dtype}.")
    if values.ndim == 1 and not allow_1d:
        raise ValueError(f"Expected 2D array, got 1D array instead: {name} has shape "
                         f"{tuple(values.shape)}. Reshape your data either using "
                         "X.reshape(-1, 1) if your data has a single feature or X.reshape(1, -1) "
                         "if it contains a single sample.")
    if values.ndim not in ((1, 2) if allow_1d else (2,)):
        shape = "(n_samples, n_targets) or (n_samples,)" if allow_1d else "(n_samples, n_features)"
        raise ValueError(f"{name} must have shape {shape}; got {tuple(values.shape)}.")
    if values.shape[0] == 0:
        raise ValueError(f"Found array with 0 sample(s) (shape={tuple(values.shape)}) while a "
                         f"minimum of 1 is required: {name} is empty.")
    if values.ndim == 2 and values.shape[1] == 0:
        raise ValueError(f"Found array with 0 feature(s) (shape={tuple(values.shape)}) while a "
                         f"minimum of 1 is required: {name} has no columns.")
    # one float64 sum instead of a boolean mask: NaN and inf propagate into it
    if not bool(torch.isfinite(values.sum(dtype=torch.float64))):
        raise ValueError(f"Input {name} contains NaN or infinity; remove or impute them before "
                         "fitting.")
    return values


def _refuse_fit_params(estimator: str, fit_params: dict) -> None:
    """One clear error for fit arguments scikit-learn's estimators take and ours do not."""
    if "sample_weight" in fit_params:
        raise ValueError(
            f"{estimator}.fit does not take 'sample_weight': every sample counts once. To "
            "weight samples, repeat rows in proportion to their weights, or fit "
            "scikit-learn's RidgeCV, which takes sample_weight (on the CPU).")
    if fit_params:
        raise TypeError(f"{estimator}.fit got unexpected argument(s) {sorted(fit_params)}; it "
                        "takes X, y and groups.")


def _check_pandas_missing(name: str, values) -> None:
    """A pandas input with NaN or ``pd.NA`` gets a message naming its columns."""
    isna = getattr(values, "isna", None)
    if isna is None:
        return
    missing = isna()
    if getattr(missing, "ndim", 1) == 2:
        columns = [str(c) for c, bad in missing.any(axis=0).items() if bad]
    else:
        columns = [str(getattr(values, "name", name))] if bool(missing.any()) else []
    if columns:
        raise ValueError(f"Input {name} contains NaN or pandas missing values (pd.NA) in "
                         f"column(s) {columns[:5]}; impute or drop them before fitting.")


def _to_tensor(array, device, dtype, scale=None) -> torch.Tensor:
    """Array or tensor → tensor on ``device`` in ``dtype``, multiplied by ``scale`` first.

    The scale (a power of two, per column or scalar) is applied in the input's own
    precision before the cast, so float64 values beyond float32's range still arrive
    finite; powers of two scale exactly.
    """
    if isinstance(array, torch.Tensor):
        tensor = array.detach().to(device=device)
    else:
        with warnings.catch_warnings():  # read-only arrays (pandas): nothing is written
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.as_tensor(np.asarray(array), device=device)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    if scale is not None:
        scale = torch.as_tensor(scale, device=device, dtype=tensor.dtype)
        tensor = tensor * scale
    return tensor.to(dtype=dtype)


def _pow2_scale(max_abs) -> np.ndarray:
    """Powers of two that bring ``max_abs`` into [0.5, 1) (1 where it is 0)."""
    max_abs = np.asarray(max_abs, dtype=np.float64)
    _, exponent = np.frexp(np.where(max_abs > 0, max_abs, 1.0))
    exponent = np.where(max_abs > 0, exponent, 0)
    return np.ldexp(1.0, np.clip(-exponent, -400, 400).astype(int))


def _max_abs(values, axis=None) -> np.ndarray:
    """Largest absolute value (per column with ``axis=0``), without an |x| copy."""
    if isinstance(values, torch.Tensor):
        low, high = (values.amin(), values.amax()) if axis is None else \
            (values.amin(axis), values.amax(axis))
        return torch.maximum(-low, high).double().cpu().numpy()
    return np.maximum(-np.min(values, axis=axis), np.max(values, axis=axis)).astype(np.float64)


def _check_alphas(alphas, *, allow_zero: bool = False) -> np.ndarray:
    """Validate regularisation strengths; returns a float64 ndarray (n_alphas,).

    Each entry must be a real number (strings and booleans are refused, not converted)
    and > 0 (≥ 0 with ``allow_zero``: alpha 0 is least squares, minimum-norm where X
    is rank-deficient).
    """
    import numbers

    example = "e.g. alphas=np.logspace(0, 8, 10)"
    if isinstance(alphas, torch.Tensor):
        alphas = alphas.detach().cpu().numpy()
    if isinstance(alphas, (str, bytes)) or not np.iterable(alphas):
        alphas = [alphas]
    if isinstance(alphas, np.ndarray) and alphas.ndim > 1:
        raise ValueError(f"'alphas' must be 1-D; got shape {alphas.shape}. {example}")
    items = list(alphas)
    if not items:
        raise ValueError(f"'alphas' is empty; give at least one value. {example}")
    for i, a in enumerate(items):
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, numbers.Real):
            raise TypeError(f"alphas[{i}] must be an instance of float, not "
                            f"{type(a).__name__}. {example}")
    for i, a in enumerate(items):
        if not np.isfinite(a) or a < 0 or (a == 0 and not allow_zero):
            raise ValueError(f"alphas[{i}] == {a}, must be {'>=' if allow_zero else '>'} 0.0 "
                             f"(and finite). {example}")
    return np.asarray(items, dtype=np.float64)


def check_folds(cv, n_samples: int, y=None, groups=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds as validated integer index arrays.

    Parameters
    ----------
    cv : int, scikit-learn splitter or iterable of (train, test)
        An int means ``KFold(cv)`` (contiguous, unshuffled). Any splitter works,
        including those whose training and test sets do not cover every sample
        (``ShuffleSplit``, ``TimeSeriesSplit``, gapped lists) and group splitters
        (``GroupKFold``, ``LeaveOneGroupOut``: pass ``groups``). Index arrays and
        boolean masks are accepted.
    n_samples : int
    y : array of shape (n_samples,) or (n_samples, n_targets), optional
        Passed to the splitter (stratified splitters need it).
    groups : array of shape (n_samples,), optional
        Group label of each sample (run, session, image…), for group splitters.

    Returns
    -------
    list of (train, test), each an int64 ndarray of sample indices.

    Examples
    --------
    >>> [test.tolist() for _, test in check_folds(3, 6)]
    [[0, 1], [2, 3], [4, 5]]
    """
    if groups is not None:
        groups = np.asarray(groups)
        if groups.ndim != 1 or len(groups) != n_samples:
            raise ValueError(f"'groups' must hold one label per sample, shape ({n_samples},); "
                             f"got shape {groups.shape}.")
    if isinstance(cv, (bool, np.bool_)) or (isinstance(cv, (int, np.integer)) and cv < 2):
        raise ValueError(f"'cv' must be an integer >= 2, a scikit-learn splitter or a list of "
                         f"(train, test) index arrays; got {cv!r}. e.g. cv=5")
    if isinstance(cv, (int, np.integer)) and cv > n_samples:
        raise ValueError(f"'cv'={cv} folds need at least {cv} samples; got "
                         f"n_samples={n_samples}. Lower 'cv' or give more samples.")
    try:
        splitter = check_cv(cv)
    except (TypeError, ValueError) as err:
        raise ValueError(f"'cv' must be an integer >= 2, a scikit-learn splitter or a list of "
                         f"(train, test) index arrays; got {cv!r}.") from err
    folds = []
    for k, (train, test) in enumerate(splitter.split(np.zeros((n_samples, 1)), y, groups)):
        train, test = (_fold_indices(train, "training", k, n_samples),
                       _fold_indices(test, "test", k, n_samples))
        shared = np.intersect1d(train, test)
        if shared.size:
            raise ValueError(f"cv: fold {k}'s training and test sets share samples "
                             f"{shared[:5].tolist()}: a sample scored on a fold must not be "
                             "fitted on it. Give disjoint (train, test) index arrays.")
        folds.append((train, test))
    if not folds:
        raise ValueError(f"'cv'={cv!r} produced no folds.")
    return folds


def _fold_indices(index, kind: str, k: int, n: int) -> np.ndarray:
    index = np.asarray(index)
    if index.dtype == bool:
        if index.shape != (n,):
            raise ValueError(f"cv: fold {k}'s {kind} mask has shape {index.shape}; a boolean mask "
                             f"needs one entry per sample, ({n},).")
        index = np.flatnonzero(index)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise ValueError(f"cv: fold {k}'s {kind} set must be a 1-D array of sample indices or a "
                         f"boolean mask; got dtype {index.dtype}, shape {index.shape}.")
    if index.size == 0:
        raise ValueError(f"cv: fold {k} has no {kind} samples; every fold needs training and test "
                         "samples (lower 'cv').")
    if index.min() < 0 or index.max() >= n:
        raise ValueError(f"cv: fold {k}'s {kind} indices run from {index.min()} to {index.max()} "
                         f"but there are {n} samples: indices must lie in [0, {n - 1}].")
    return index.astype(np.int64)


def _is_complement(train: np.ndarray, test: np.ndarray, n: int) -> bool:
    """True when train and test are disjoint and together hold every sample once."""
    if len(train) + len(test) != n:
        return False
    counts = np.bincount(train, minlength=n) + np.bincount(test, minlength=n)
    return bool((counts == 1).all())


def _targets_batch(n_targets: int, per_target_bytes: int, device: torch.device,
                   requested: int | None) -> int:
    """Targets per batch: the requested size, or what fits in a quarter of free memory."""
    check_positive_int_or_none("targets_batch", requested)
    if requested is not None:
        return min(int(requested), n_targets)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(max(1, min(n_targets, (free // 4) // max(per_target_bytes, 1))))


# --------------------------------------------------------------------------- core


def _inverse(denominator: torch.Tensor, eigval: torch.Tensor) -> torch.Tensor:
    """``1 / (λ + α)``, 0 where ``λ + α`` is at rounding level (a pseudo-inverse).

    Only alpha = 0 on rank-deficient data reaches the cut-off (relative to the largest
    eigenvalue, as an SVD solver drops negligible singular values); it keeps the
    least-squares limit finite and minimum-norm.
    """
    tol = float(eigval.max()) * eigval.numel() * torch.finfo(torch.float64).eps
    return torch.where(denominator > tol, 1.0 / denominator.clamp_min(tol if tol > 0 else 1e-300),
                       torch.zeros_like(denominator))


def _gram_eigh(xc: torch.Tensor, primal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of the Gram matrix of centred float64 data.

    ``X^T X`` (p × p) in the primal form, ``X X^T`` (n × n) in the dual form; eigenvalues
    clipped at 0 (rounding can make the smallest ones slightly negative).
    """
    eigval, eigvec = torch.linalg.eigh(xc.T @ xc if primal else xc @ xc.T)
    return eigval.clamp_min(0), eigvec


class _Fold:
    """One fold's factorisation: held-out projection ``A`` and its eigenvalues.

    ``complement`` folds (training = every sample not held out, as in K-fold and
    leave-one-out) form their training statistics as "all minus held-out"; the others
    (ShuffleSplit, TimeSeriesSplit, gapped lists…) from their training samples.
    """

    def __init__(self, X: torch.Tensor, train: np.ndarray, test: np.ndarray, primal: bool,
                 dtype: torch.dtype, center: bool):
        device = X.device
        self.complement = _is_complement(train, test, len(X))
        self.train = torch.as_tensor(train, device=device)
        self.test = torch.as_tensor(test, device=device)
        self.n_train = len(train)
        self.center = center
        x_train = X[self.train]
        self.x_mean = x_train.mean(0) if center else torch.zeros_like(x_train[0])  # (p,)
        xc_train = (x_train - self.x_mean).double()
        xc_test = X[self.test] - self.x_mean                 # (n_test, p)
        self.primal = primal
        self.eigval, eigvec = _gram_eigh(xc_train, primal)                  # float64
        self.basis = eigvec.to(dtype)                        # V (p, r) primal, U (n_tr, r) dual
        if primal:
            self.A = xc_test @ self.basis                                    # (n_test, r)
        else:
            self.A = (xc_test.double() @ xc_train.T @ eigvec).to(dtype)      # (n_test, r)

    def shrink(self, alphas: torch.Tensor) -> torch.Tensor:
        """1 / (λ + α) for every alpha, (n_alphas, r), in the compute dtype."""
        return _inverse(self.eigval[None, :] + alphas[:, None], self.eigval).to(self.A.dtype)


def _fold_scores(fold: _Fold, XtY: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                 alphas: torch.Tensor, work: dict, scoring: str) -> torch.Tensor:
    """Held-out score per alpha and target, (n_alphas, n_targets) float64, one target batch.

    ``-mean((y - ŷ)²) = -mean(y²) + 2 mean(y ŷ) - mean(ŷ²)``: only the last two terms
    depend on alpha, and computing them apart keeps their precision in float32 where ŷ
    is tiny (large alphas), so near-ties between alphas resolve as in exact arithmetic.
    With ``scoring="r2"`` the negative MSE becomes ``1 - SSE / SST`` (SST: the held-out
    targets' squared deviations from their own mean, as scikit-learn's ``r2_score``).
    ``work`` holds buffers reused across folds (large allocations cost page faults).
    """
    n_alphas, n_test, v = len(alphas), len(fold.test), Y.shape[1]
    y_held = Y[fold.test]
    # the training targets, unless a complement fold works from the full sums alone
    y_fit = None if fold.complement and fold.primal else Y[fold.train]
    if not fold.center:
        y_train_mean = torch.zeros_like(Y[0])
    elif fold.complement:
        y_train_mean = (Y.sum(0) - y_held.sum(0)) / fold.n_train
    else:
        y_train_mean = y_fit.mean(0)
    y_test = y_held - y_train_mean                              # (n_test, v)
    r = fold.basis.shape[1]
    Z = _buffer(work, "Z", (r, v), Y)
    if fold.primal:
        S = _buffer(work, "S", XtY.shape, Y)
        if fold.complement:
            # X_tr^T Y_tr = X^T Y - X_te^T Y_te (no pass over the training samples)
            s_train = torch.addmm(XtY, X[fold.test].T, y_held, alpha=-1, out=S)
        else:
            s_train = torch.matmul(X[fold.train].T, y_fit, out=S)
        # exact centring: X_tr_c^T Y_tr_c = X_tr^T Y_tr - n_tr μx μy^T
        s_train.addr_(fold.x_mean, y_train_mean, alpha=-fold.n_train)
        torch.matmul(fold.basis.T, s_train, out=Z)              # (r, v)
    else:
        torch.matmul(fold.basis.T, y_fit - y_train_mean, out=Z)
    shrink = fold.shrink(alphas)                                 # (n_alphas, r)
    scaled = (shrink[:, None, :] * fold.A[None, :, :]).reshape(n_alphas * n_test, r)
    pred = _buffer(work, "pred", (n_alphas * n_test, v), Y)
    torch.matmul(scaled, Z, out=pred)                            # every alpha in one matmul
    # sum_n y_n ŷ_an = sum_k d_ak (A^T y)_k Z_k: no second pass over the predictions
    cross = shrink @ ((fold.A.T @ y_test) * Z)
    sq = pred.square_().reshape(n_alphas, n_test, v).sum(1)
    gain = (2 * cross - sq) / n_test
    neg_mse = gain.double() - (y_test.double() ** 2).mean(0)
    if scoring == "neg_mean_squared_error":
        return neg_mse
    held = y_held.double()
    sst = ((held - held.mean(0)) ** 2).sum(0)                    # (v,)
    sse = (-neg_mse * n_test).clamp_min(0)
    # scikit-learn's r2_score (force_finite): 1 for a perfect fit, 0 when SST is 0
    return torch.where(sst > 0, 1 - sse / torch.where(sst > 0, sst, 1),
                       (sse == 0).double())


def _buffer(work: dict, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A reusable buffer of at least ``shape`` (views into one allocation per name)."""
    numel = math.prod(shape)
    buf = work.get(name)
    if buf is None or buf.numel() < numel:
        buf = work[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(*shape)


class RidgeCV(MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Ridge regression with one alpha per target chosen by cross-validation.

    Solves, per target ``t``, ``w_t = argmin ||X w - y_t||² + α_t ||w||²`` with ``α_t``
    the alpha of ``alphas`` with the best held-out score averaged over folds, then
    refits on all the data given to ``fit``.

    A drop-in for scikit-learn's ``RidgeCV(alphas, cv=..., scoring=...)`` (the same
    folds, scores and refit; with ``alpha_per_target=False`` exactly its single alpha)
    that also chooses one alpha per target, runs on CUDA, and scales to hundreds of
    thousands of targets (see the module docstring for the algorithm).

    Parameters
    ----------
    alphas : array-like of shape (n_alphas,)
        Regularisation strengths to try, ≥ 0 (0 is least squares, minimum-norm when X is
        rank-deficient).
    cv : int, scikit-learn splitter or iterable of (train, test)
        Folds; an int means ``KFold(cv)`` (contiguous, unshuffled, as himalaya's). Any
        splitter works, including those whose training and test sets leave samples out
        (``ShuffleSplit``, ``TimeSeriesSplit``, gapped lists) and group splitters
        (``GroupKFold``, ``LeaveOneGroupOut``: pass ``groups`` to :meth:`fit`).
    fit_intercept : bool
        Centre X and Y (per fold during cross-validation) and fit an intercept.
    scoring : {"neg_mean_squared_error", "r2"}
        Held-out score that picks the alphas: negative mean squared error (himalaya's
        default, and what scikit-learn's ``RidgeCV(cv=..., scoring=
        "neg_mean_squared_error")`` uses) or R² (scikit-learn's ``RidgeCV(cv=...)``
        default; 1 − SSE/SST per fold, SST around the held-out mean).
    device : str, torch.device or None
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None``: CUDA when available, else CPU.
    dtype : torch.dtype or None
        Compute precision. ``None`` does as scikit-learn: float64 inside, ``coef_`` and
        ``intercept_`` in the precision of X (float32 for float32 X, else float64).
        ``torch.float32`` is about twice as fast (half the memory traffic) and is the
        default of this module's encoding functions. Its cost: near-ties between alphas
        can resolve differently from exact arithmetic — measured, 86 % of targets got
        another alpha than the float64 fit on near-noiseless targets (noise sd 1e-4 of
        the signal, alphas 1e-6…1e2), 0 % on the benchmark's brain-like problem (alphas
        1e0…1e8, SNR 0.01–3) — and ill-conditioned least squares (alpha → 0) lose about
        4 digits. Coefficients are then float32. Eigendecompositions always run in
        float64.
    targets_batch : int or None
        Targets per batch; ``None`` sizes batches from the free memory.
    alpha_per_target : bool or array-like of shape (n_targets,)
        True (default): each target gets its own alpha. False: one alpha for all
        targets, the one with the best score averaged over targets (as scikit-learn's
        ``RidgeCV(cv=...)`` and himalaya's ``local_alpha=False``). An array of group
        labels: one alpha per group, chosen on the score averaged over its targets
        (e.g. one alpha per MEG time point shared by its sensors).

    Attributes
    ----------
    alpha_ : ndarray of shape (n_targets,), or float
        Selected alpha per target; a float for 1-D y or ``alpha_per_target=False``
        (scikit-learn's layout).
    coef_ : ndarray of shape (n_targets, n_features), or (n_features,) for one target
        Refit coefficients (scikit-learn layout: 1-D for y of shape (n,) and (n, 1)).
    intercept_ : ndarray of shape (n_targets,), or a numpy scalar for 1-D y
    cv_scores_ : ndarray of shape (n_alphas, n_targets)
        The ``scoring`` averaged over folds, per alpha and target.
    best_score_ : ndarray of shape (n_targets,), or float
        The score of the selected alpha (a float, averaged over targets, where
        ``alpha_`` is).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names, when X was a pandas DataFrame with string column names.

    Notes
    -----
    X and y are rescaled internally by powers of two (exact in floating point), with
    alphas rescaled to match: results equal those of the unscaled problem, while
    values far from 1 (MEG in tesla, 1e-25, or float64 values beyond float32's range)
    neither underflow nor overflow in float32. Tensors that require gradients are
    used detached. ``sample_weight`` is not supported (a clear error says so).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.normal(size=(30, 5)), rng.normal(size=(30, 3))
    >>> model = RidgeCV(device="cpu").fit(X, Y)
    >>> model.alpha_.shape, model.coef_.shape, model.predict(X).shape
    ((3,), (3, 5), (30, 3))
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, cv=5, fit_intercept: bool = True,
                 scoring: str = "neg_mean_squared_error", device=None, dtype=None,
                 targets_batch: int | None = None, alpha_per_target: bool = True):
        self.alphas = alphas
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.scoring = scoring
        self.device = device
        self.dtype = dtype
        self.targets_batch = targets_batch
        self.alpha_per_target = alpha_per_target

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    # ------------------------------------------------------------------ inputs

    def _validate(self, X, y="no_validation", *, reset: bool):
        """X (and y) as numpy arrays (scikit-learn's validation) or detached tensors."""
        from sklearn.utils.validation import validate_data

        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y "
                             "is None.")
        if isinstance(X, torch.Tensor) or isinstance(y, torch.Tensor):
            X = _check_tensor("X", X if isinstance(X, torch.Tensor) else torch.as_tensor(
                np.asarray(X)))
            if reset:
                self.n_features_in_ = X.shape[1]
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                                 f"expecting {self.n_features_in_} features as input.")
            if isinstance(y, str) and y == "no_validation":
                return X
            y = _check_tensor("y", y if isinstance(y, torch.Tensor) else torch.as_tensor(
                np.asarray(y)), allow_1d=True)
            if len(X) != len(y):
                raise ValueError(f"X and y must have the same number of samples; got {len(X)} "
                                 f"and {len(y)}.")
            return X, y
        _check_pandas_missing("X", X)
        if isinstance(y, str) and y == "no_validation":
            return validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        _check_pandas_missing("y", y)
        X, y = validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32],
                             multi_output=True, y_numeric=True)
        if y.dtype.kind != "f":
            y = y.astype(np.float64)
        if y.ndim == 2 and y.shape[1] == 0:
            raise ValueError(f"Found array with 0 feature(s) (shape={y.shape}) while a minimum "
                             "of 1 is required: y has no targets.")
        return X, y

    def _dtypes(self, X) -> tuple[torch.dtype, type]:
        """Compute precision, and the numpy dtype of ``coef_``/``intercept_``."""
        if self.dtype is None:  # scikit-learn: float64 inside, results in X's precision
            return torch.float64, (np.float32 if str(X.dtype) in ("float32", "torch.float32")
                                   else np.float64)
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"'dtype' must be torch.float32, torch.float64 or None; got "
                             f"{self.dtype!r}.")
        return self.dtype, (np.float64 if self.dtype == torch.float64 else np.float32)

    # ------------------------------------------------------------------ fit

    def fit(self, X, y, groups=None, **fit_params):
        """Choose the alphas by cross-validation, then refit on all samples.

        Parameters
        ----------
        X : array-like, DataFrame or tensor of shape (n_samples, n_features)
        y : array-like or tensor of shape (n_samples,) or (n_samples, n_targets)
        groups : array-like of shape (n_samples,), optional
            Group labels for group splitters (``GroupKFold``, ``LeaveOneGroupOut``…),
            e.g. the run, session or image of each sample.
        **fit_params
            None are taken: ``sample_weight`` (scikit-learn's) gets one clear error.

        Returns
        -------
        self
        """
        _refuse_fit_params(type(self).__name__, fit_params)
        check_in_allowed("scoring", self.scoring, SCORINGS)
        alphas_np = _check_alphas(self.alphas, allow_zero=True)
        if not isinstance(self.fit_intercept, (bool, np.bool_)):
            raise ValueError(f"'fit_intercept' must be True or False; got {self.fit_intercept!r}.")
        device = resolve_device(self.device)
        X, y = self._validate(X, y, reset=True)
        dtype, np_dtype = self._dtypes(X)
        raveled = y.ndim == 1
        y = y[:, None] if raveled else y
        n, p = X.shape
        n_targets = y.shape[1]
        groups_ = self._alpha_groups(n_targets)
        folds = check_folds(self.cv, n, y=None if isinstance(y, torch.Tensor) else
                            (y[:, 0] if raveled else y), groups=groups)
        if self.fit_intercept and min(len(tr) for tr, _ in folds) < 2:
            raise ValueError("Too few samples per fold to fit an intercept (a fold trains on "
                             "fewer than 2 samples); lower 'cv' or give more samples.")
        targets_batch = self.targets_batch
        _targets_batch(1, 1, device, targets_batch)  # validate before any work

        # exact power-of-two rescaling: X to [0.5, 1), each target to [0.5, 1)
        x_scale = float(_pow2_scale(_max_abs(X)))
        y_scale = _pow2_scale(_max_abs(y, axis=0))                          # (n_targets,)
        Xt = _to_tensor(X, device, dtype, scale=x_scale)
        x_offset = Xt.mean(0) if self.fit_intercept else torch.zeros(p, device=device,
                                                                     dtype=dtype)
        Xt = Xt - x_offset
        alphas = torch.as_tensor(alphas_np * x_scale**2, device=device, dtype=torch.float64)
        primal = p <= min(len(tr) for tr, _ in folds)
        fold_objs = [_Fold(Xt, tr, te, primal, dtype, self.fit_intercept) for tr, te in folds]
        full = _Full(Xt, dtype, primal)

        max_test = max(len(te) for _, te in folds)
        itemsize = 8 if dtype == torch.float64 else 4
        per_target = itemsize * (3 * n + 4 * max(p, n) + 2 * len(alphas_np) * max_test)
        batch = _targets_batch(n_targets, per_target, device, targets_batch)
        cv_scores = np.empty((len(alphas_np), n_targets))
        coef = np.empty((n_targets, p), dtype=np_dtype)
        intercept = np.zeros(n_targets, dtype=np_dtype)
        batches = [slice(s, min(s + batch, n_targets)) for s in range(0, n_targets, batch)]
        # back to the scores' units (R² has none)
        unscale = np.ones(n_targets) if self.scoring == "r2" else 1.0 / y_scale**2

        def centred(sl):
            Yb = _to_tensor(y[:, sl], device, dtype, scale=y_scale[sl])
            y_offset = Yb.mean(0) if self.fit_intercept else torch.zeros_like(Yb[0])
            Yb = Yb - y_offset
            return Yb, y_offset, (Xt.T @ Yb if primal else None)

        def refit(sl, Yb, y_offset, XtY, best):
            W = full.coefficients(Yb, XtY, alphas[best])                      # (p, v) scaled
            ys = torch.as_tensor(y_scale[sl], device=device, dtype=torch.float64)
            with np.errstate(over="ignore"):  # an overflow is reported once, after the loop
                coef[sl] = (W.double() * (x_scale / ys)).T.cpu().numpy()
                intercept[sl] = ((y_offset - x_offset @ W).double() / ys).cpu().numpy()

        for sl in batches:
            Yb, y_offset, XtY = centred(sl)
            work: dict = {}
            scores = sum(_fold_scores(f, XtY, Xt, Yb, alphas, work, self.scoring)
                         for f in fold_objs)
            scores /= len(fold_objs)
            cv_scores[:, sl] = scores.cpu().numpy() * unscale[sl]
            if groups_ is None:
                refit(sl, Yb, y_offset, XtY, scores.argmax(0))
            del Yb, XtY, scores, work
        if groups_ is None:
            best = cv_scores.argmax(0)
        else:
            # one alpha per group: the best score averaged over its targets, then a second pass
            labels, inverse = np.unique(groups_, return_inverse=True)
            sums = np.zeros((len(alphas_np), len(labels)))
            np.add.at(sums.T, inverse, cv_scores.T)
            best = sums.argmax(0)[inverse]                                   # (n_targets,)
            for sl in batches:
                Yb, y_offset, XtY = centred(sl)
                refit(sl, Yb, y_offset, XtY, torch.as_tensor(best[sl], device=device))
                del Yb, XtY
        if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
            raise ValueError(
                f"The fitted coefficients overflow {np_dtype.__name__} (y or 1/X is too large "
                "for that precision); give float64 data, fit with dtype=torch.float64 or "
                "rescale X and y."
            )
        alpha = alphas_np[best]
        best_score = cv_scores[best, np.arange(n_targets)]
        self.cv_scores_ = cv_scores
        single_alpha = raveled or (isinstance(self.alpha_per_target, (bool, np.bool_))
                                   and not self.alpha_per_target)
        # scikit-learn's layout: one alpha (and its mean score) when alphas are not per target,
        # 1-D coefficients for y of shape (n,) and (n, 1)
        self.alpha_ = float(alpha[0]) if single_alpha else alpha
        self.best_score_ = float(best_score.mean()) if single_alpha else best_score
        self.coef_ = coef[0] if n_targets == 1 else coef
        self.intercept_ = intercept[0] if raveled else intercept
        return self

    def _alpha_groups(self, n_targets: int) -> np.ndarray | None:
        """None (one alpha per target) or a group label per target."""
        spec = self.alpha_per_target
        if isinstance(spec, (bool, np.bool_)):
            return None if spec else np.zeros(n_targets, dtype=int)
        groups = np.asarray(spec)
        if groups.shape != (n_targets,):
            raise ValueError(
                f"'alpha_per_target' must be True, False or one group label per target "
                f"(shape ({n_targets},)); got shape {groups.shape}."
            )
        return groups

    def predict(self, X) -> np.ndarray:
        """Predictions (n_samples, n_targets), or (n_samples,) when fitted on 1-D y."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "coef_")
        X = self._validate(X, reset=False)
        if isinstance(X, torch.Tensor):
            X = X.cpu().numpy()
        coef = self.coef_
        if coef.dtype == np.float32 and X.dtype == np.float64:
            # float64 X times float32 coefficients would upcast every coefficient on each
            # call (about 18x slower for the 38,352 MEG targets of a study); the product is
            # taken in the coefficients' precision and returned as float64
            return (X.astype(np.float32) @ coef.T).astype(np.float64) + self.intercept_
        return X @ coef.T + self.intercept_


class _Full:
    """Factorisation of all fitting samples, for the refit."""

    def __init__(self, Xc: torch.Tensor, dtype: torch.dtype, primal: bool):
        self.primal = primal
        self.Xc = Xc
        self.eigval, eigvec = _gram_eigh(Xc.double(), primal)
        self.basis = eigvec.to(dtype)

    def coefficients(self, Yc: torch.Tensor, XtY: torch.Tensor | None,
                     alpha_per_target: torch.Tensor) -> torch.Tensor:
        """Ridge weights (p, v) with one alpha per target column."""
        shrink = _inverse(self.eigval[:, None] + alpha_per_target[None, :],
                          self.eigval).to(self.basis.dtype)
        if self.primal:
            return self.basis @ (shrink * (self.basis.T @ XtY))
        return self.Xc.T @ (self.basis @ (shrink * (self.basis.T @ Yc)))


# --------------------------------------------------------------------------- scores


def pearson_r(y_true, y_pred) -> np.ndarray:
    """Pearson correlation per column.

    Parameters
    ----------
    y_true, y_pred : arrays of shape (n_samples, n_targets) or (n_samples,)

    Returns
    -------
    ndarray of shape (n_targets,). NaN for a target whose values (true or predicted)
    hold NaN or inf, or whose true values are constant (r is undefined there: no data,
    not a failed prediction); 0 where the prediction is constant (a model that
    predicts nothing).

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([[1.0, 1.0], [2.0, 0.0], [3.0, 1.0]])
    >>> pearson_r(y, 2 * y + 1)
    array([1., 1.])
    """
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"'y_true' and 'y_pred' must have the same shape (n_samples, "
                         f"n_targets); got {np.shape(y_true)} and {np.shape(y_pred)}.")
    finite = np.isfinite(a).all(0) & np.isfinite(b).all(0)
    a = np.where(finite, a, 0.0)
    b = np.where(finite, b, 0.0)
    a = a - a.mean(0)
    b = b - b.mean(0)
    ss_a, ss_b = (a * a).sum(0), (b * b).sum(0)
    denom = np.sqrt(ss_a * ss_b)
    r = np.divide((a * b).sum(0), denom, out=np.zeros(a.shape[1]), where=denom > 0)
    r[~finite | (ss_a == 0)] = np.nan
    return r


def check_test_predictions(y_test, predictions) -> tuple[np.ndarray, np.ndarray]:
    """Test responses (float64, (n_test, n_targets)) and per-layer predictions of them
    ((n_layers, n_test, n_targets)), shapes checked."""
    y_test = np.asarray(y_test, dtype=np.float64)
    predictions = np.asarray(predictions)
    if y_test.ndim != 2 or predictions.ndim != 3 or predictions.shape[1:] != y_test.shape:
        raise ValueError(f"'y_test' must be (n_test, n_targets) and 'predictions' (n_layers, "
                         f"n_test, n_targets); got {y_test.shape} and {predictions.shape}.")
    return y_test, predictions


def shuffled_correlations(y_test, predictions, orders, *, device=None,
                          max_elements: int = 20_000_000):
    """Pearson r of every layer's predictions with reordered test responses, per target.

    The kernel of the permutation tests over test images (``gradbrain.meg`` and
    ``gradbrain.hierarchy``): each order reorders the images of ``y_test`` against the
    predictions (the same order for every layer and target), and one batched matrix
    product per target scores every layer on a batch of orders. Computed in float32
    from float64-centred, unit-norm columns.

    Parameters
    ----------
    y_test : array of shape (n_test, n_targets)
        Measured responses (a target: a vertex, or a sensor × time point).
    predictions : array of shape (n_layers, n_test, n_targets)
        Each layer's predictions of ``y_test``.
    orders : array of int, shape (n_orders, n_test)
        Image orders; the identity gives the observed correlations.
    max_elements : int
        Bound on the elements of one batch (orders × targets × images).

    Yields
    ------
    Tensor of shape (batch, n_targets, n_layers), float32 on ``device``
        The correlations of consecutive batches of ``orders``; a target without
        variance (or with non-finite values) gets 0.
    """
    device = resolve_device(device)
    y_test, predictions = check_test_predictions(y_test, predictions)
    n, k = y_test.shape
    orders = torch.as_tensor(np.asarray(orders), device=device)
    if orders.ndim != 2 or orders.shape[1] != n:
        raise ValueError(f"'orders' must have shape (n_orders, {n}); got {tuple(orders.shape)}.")

    def unit(a):  # centred columns of unit norm: their dot product is Pearson's r
        a = torch.as_tensor(np.nan_to_num(a.reshape(-1, n, k), nan=0.0, posinf=0.0,
                                          neginf=0.0), device=device, dtype=torch.float64)
        a = a - a.mean(1, keepdim=True)
        norm = a.norm(dim=1, keepdim=True)
        return (a / torch.where(norm > 0, norm, torch.ones_like(norm))).float()

    # (k, n) responses and (k, n, n_layers) predictions: one small product per target
    Y = unit(y_test)[0].T.contiguous()
    P = unit(predictions).permute(2, 1, 0).contiguous()
    step = max(1, max_elements // (n * k))
    for start in range(0, len(orders), step):
        yield torch.bmm(Y[:, orders[start:start + step]], P).transpose(0, 1)


def _finite_columns(values) -> np.ndarray:
    """Columns (targets) whose values are all finite, ndarray of bool (n_targets,)."""
    if isinstance(values, torch.Tensor):
        return torch.isfinite(values).all(0).cpu().numpy()
    values = np.asarray(values)
    return np.isfinite(values).all(0) if values.dtype.kind in "fc" else \
        np.ones(values.shape[1], bool)


def _scatter_targets(values: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Per-target values of the finite targets (last axis) spread over all targets, NaN
    elsewhere."""
    if finite.all():
        return values
    out = np.full(values.shape[:-1] + (len(finite),), np.nan,
                  dtype=values.dtype if values.dtype.kind == "f" else float)
    out[..., finite] = values
    return out


def _warn_non_finite(n_bad: int, n_targets: int) -> None:
    warnings.warn(
        f"{n_bad} of {n_targets} targets hold NaN or inf values (e.g. NSD vertices without "
        "data); they are left out of the fit and their scores are NaN.",
        RuntimeWarning, stacklevel=3,
    )


def _cv_r2(neg_mse, variance) -> np.ndarray:
    """Cross-validated R² per target from :class:`RidgeCV`'s ``best_score_`` (negative
    mean squared error) and the training variance: 1 − MSE / variance; NaN where the
    variance is 0."""
    variance = np.asarray(variance, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(variance > 0, 1 + np.asarray(neg_mse, float).reshape(-1)
                        / np.where(variance > 0, variance, 1), np.nan)


def encoding_scores(X_train, Y_train, X_test, Y_test, *, noise_ceiling=None,
                    alphas=DEFAULT_ALPHAS, cv=5, groups=None, device=None, dtype=None,
                    targets_batch=None, return_prediction: bool = False) -> dict:
    """Fit on the training set, score on the held-out test set.

    Parameters
    ----------
    X_train : array of shape (n_train, n_features)
    Y_train : array of shape (n_train, n_targets)
    X_test : array of shape (n_test, n_features)
    Y_test : array of shape (n_test, n_targets)
    noise_ceiling : array of shape (n_targets,) or None
        Percent of explainable variance (NSD's NC) of ``Y_test``.
    cv, groups
        Folds that choose the alphas (see :class:`RidgeCV`), and the training samples'
        group labels for group splitters.
    dtype : torch.dtype or None
        Compute precision; None means float32 here (see :class:`RidgeCV`).
    return_prediction : bool
        Also return the test-set prediction (for bootstraps over test images).

    Returns
    -------
    dict with ``r`` (n_targets,) Pearson correlation on the test set, ``r_nc``
    (n_targets,) = r / sqrt(NC / 100), the fraction of the largest correlation the
    noise allows (NaN where NC = 0; only with ``noise_ceiling``), ``alpha``
    (n_targets,) the selected alphas, ``cv_r2`` (n_targets,) the out-of-fold R² of the
    training images at the selected alpha — ``1 − MSE / var(Y_train)``, the held-out MSE
    averaged over the folds that chose the alpha and the variance taken over all
    training images (ddof 0); a score that never looks at the test set, for choosing
    targets and layers before testing — and, if asked, ``prediction`` (n_test,
    n_targets). Targets holding NaN or inf (in training or test responses) are left out
    of the fit with a warning; their ``r``, ``r_nc``, ``alpha``, ``cv_r2`` and
    predictions are NaN.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 5))            # (n_images, n_features)
    >>> Y = X @ rng.normal(size=(5, 3))         # (n_images, n_targets), noiseless
    >>> out = encoding_scores(X[:30], Y[:30], X[30:], Y[30:], alphas=[1e-3, 1.0, 1e3])
    >>> out["r"].shape, bool((out["r"] > 0.99).all()), out["alpha"].tolist()
    ((3,), True, [0.001, 0.001, 0.001])
    """
    return _encoding_scores(X_train, Y_train, X_test, Y_test, noise_ceiling=noise_ceiling,
                            alphas=alphas, cv=cv, groups=groups, device=device, dtype=dtype,
                            targets_batch=targets_batch, return_prediction=return_prediction)


def _encoding_scores(X_train, Y_train, X_test, Y_test, *, noise_ceiling, alphas, cv, groups,
                     device, dtype, targets_batch, return_prediction, all_finite=False
                     ) -> dict:
    """:func:`encoding_scores`; ``all_finite=True`` says the caller has checked that every
    response is finite (:func:`layerwise_scores` checks once for all layers: one pass over
    the responses per layer was about a tenth of a small study's encoding)."""
    Y_train = Y_train if isinstance(Y_train, torch.Tensor) else np.asarray(Y_train)
    Y_test = np.asarray(Y_test)
    if Y_train.ndim == 1:
        Y_train = Y_train[:, None]
    if Y_test.ndim == 1:
        Y_test = Y_test[:, None]
    if Y_train.ndim != 2 or Y_test.ndim != 2 or Y_train.shape[1] != Y_test.shape[1]:
        raise ValueError(f"'Y_train' and 'Y_test' must have shape (n_samples, n_targets) with "
                         f"the same targets; got {tuple(Y_train.shape)} and {Y_test.shape}.")
    if len(X_test) != len(Y_test):
        raise ValueError(f"'X_test' and 'Y_test' must have the same number of samples; got "
                         f"{len(X_test)} and {len(Y_test)}.")
    n_targets = Y_test.shape[1]
    if noise_ceiling is not None and np.shape(noise_ceiling) != (n_targets,):
        raise ValueError(f"'noise_ceiling' must hold one value per target, shape "
                         f"({n_targets},); got {np.shape(noise_ceiling)}.")
    if noise_ceiling is not None and not np.any(np.asarray(noise_ceiling, dtype=float) > 0):
        raise ValueError("'noise_ceiling' is 0 (or NaN) for every target, so every "
                         "normalised score would be NaN: give noise ceilings in percent of "
                         "variance (Study.noise_ceiling()), or noise_ceiling=None.")
    finite = (np.ones(n_targets, bool) if all_finite
              else _finite_columns(Y_train) & _finite_columns(Y_test))
    if not finite.any():
        raise ValueError("Every target holds NaN or inf values; nothing to fit.")
    if not finite.all():
        _warn_non_finite(int((~finite).sum()), n_targets)
        Y_train, Y_test = Y_train[:, finite], Y_test[:, finite]
    model = RidgeCV(alphas=alphas, cv=cv, device=device, dtype=dtype or torch.float32,
                    targets_batch=targets_batch).fit(X_train, Y_train, groups=groups)
    prediction = model.predict(X_test).reshape(len(X_test), -1)           # (n_test, n_targets)
    r = _scatter_targets(pearson_r(Y_test, prediction), finite)
    if isinstance(Y_train, torch.Tensor):
        variance = Y_train.double().var(0, unbiased=False).cpu().numpy()
    else:
        variance = np.asarray(Y_train, dtype=float).var(0)
    cv_r2 = _cv_r2(model.best_score_, variance)
    out = {"r": r, "alpha": _scatter_targets(np.asarray(model.alpha_, dtype=float), finite),
           "cv_r2": _scatter_targets(cv_r2, finite)}
    if return_prediction:
        out["prediction"] = _scatter_targets(np.asarray(prediction, dtype=np.float32), finite)
    if noise_ceiling is not None:
        out["r_nc"] = noise_normalised(r, noise_ceiling)
    return out


def noise_normalised(r, noise_ceiling) -> np.ndarray:
    """Correlations as a fraction of the largest the noise allows: ``r / sqrt(NC / 100)``.

    Parameters
    ----------
    r : array of shape (..., n_targets)
        Pearson correlations on the test set.
    noise_ceiling : array of shape (n_targets,)
        Percent of explainable variance of the test responses (NSD's NC).

    Returns
    -------
    ndarray of the shape of ``r``, float64; NaN where the noise ceiling is 0 or NaN.
    """
    r = np.asarray(r, dtype=float)
    nc = np.asarray(noise_ceiling, dtype=float) / 100
    return np.divide(r, np.sqrt(nc), out=np.full_like(r, np.nan), where=nc > 0)


def layerwise_scores(features: dict, Y_train, Y_test, train_index, test_index, *,
                     noise_ceiling=None, alphas=DEFAULT_ALPHAS, cv=5, groups=None, device=None,
                     dtype=None, standardize_features: bool = True, progress: bool = False,
                     return_prediction: bool = False, targets_batch: int | None = None) -> dict:
    """Encoding scores of every layer's features in one call.

    Parameters
    ----------
    features : dict of str to ndarray of shape (n_images, n_features_layer)
        One feature matrix per layer (e.g. ``Features.activations``), rows = images.
    Y_train, Y_test : arrays of shape (n_train, n_targets), (n_test, n_targets)
        Responses of the training and test images.
    train_index, test_index : arrays of int
        Rows of the feature matrices for the training and test images.
    cv, groups
        Folds that choose the alphas, and the training images' group labels.
    standardize_features : bool
        Z-score each layer's feature columns on the training images first
        (:func:`standardize`), so that ``alphas`` mean the same for every layer and
        signal. Without it, the alphas apply to the features' own units.
    return_prediction : bool
        Also return every layer's test-set prediction.
    targets_batch : int or None
        Targets per batch inside the ridge (see :class:`RidgeCV`).

    Returns
    -------
    dict with ``r`` and (with ``noise_ceiling``) ``r_nc``, each ndarray of shape
    (n_layers, n_targets), ``alpha`` and ``cv_r2`` (n_layers, n_targets; the training
    images' out-of-fold R², see :func:`encoding_scores`), ``layers`` and, if asked,
    ``prediction`` (n_layers, n_test, n_targets), float32. Targets with NaN or inf
    responses get NaN (one warning).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 5))
    >>> Y = X @ rng.normal(size=(5, 3))         # driven by layer1 only
    >>> features = {"layer1": X, "layer2": rng.normal(size=(40, 4))}
    >>> out = layerwise_scores(features, Y[:30], Y[30:], np.arange(30), np.arange(30, 40),
    ...                        alphas=[1e-3, 1.0, 1e3])
    >>> out["layers"], out["r"].shape, out["r"].mean(1).round(1).tolist()
    (['layer1', 'layer2'], (2, 3), [1.0, 0.0])
    """
    from tqdm import tqdm

    Y_train, Y_test = np.asarray(Y_train), np.asarray(Y_test)
    if Y_train.ndim == 1:
        Y_train, Y_test = Y_train[:, None], Y_test.reshape(len(Y_test), -1)
    if Y_train.ndim != 2 or Y_test.ndim != 2 or Y_train.shape[1] != Y_test.shape[1]:
        raise ValueError(f"'Y_train' and 'Y_test' must have shape (n_samples, n_targets) with "
                         f"the same targets; got {Y_train.shape} and {Y_test.shape}.")
    if len(train_index) != len(Y_train) or len(test_index) != len(Y_test):
        raise ValueError(f"'train_index' and 'test_index' must index the rows of Y_train and "
                         f"Y_test; got {len(train_index)} and {len(test_index)} indices for "
                         f"{len(Y_train)} and {len(Y_test)} rows.")
    n_targets = Y_train.shape[1]
    finite = _finite_columns(Y_train) & _finite_columns(Y_test)
    if not finite.any():
        raise ValueError("Every target holds NaN or inf values; nothing to fit.")
    if not finite.all():
        _warn_non_finite(int((~finite).sum()), n_targets)
    nc = None if noise_ceiling is None else np.asarray(noise_ceiling, dtype=float)[finite]
    device, dtype = resolve_device(device), dtype or torch.float32
    # target-side work done once for all layers: the targets on the device
    if not finite.all():  # (a copy of the responses: only when some must go)
        Y_train, Y_test = Y_train[:, finite], Y_test[:, finite]
    Y_train_t = _to_tensor(Y_train, device, dtype)
    results = {"layers": list(features), "r": [], "alpha": [], "cv_r2": []}
    if noise_ceiling is not None:
        results["r_nc"] = []
    if return_prediction:
        results["prediction"] = []
    for layer in tqdm(list(features), desc="layers", disable=not progress):
        X = np.asarray(features[layer])
        X_train, X_test = X[train_index], X[test_index]
        if standardize_features:
            X_train, X_test = standardize(X_train, X_test)
        out = _encoding_scores(X_train, Y_train_t, X_test, Y_test,
                               noise_ceiling=nc, alphas=alphas, cv=cv, groups=groups,
                               device=device, dtype=dtype, targets_batch=targets_batch,
                               return_prediction=return_prediction, all_finite=True)
        for key in out:
            results[key].append(out[key])
    for key in ("r", "alpha", "cv_r2", "r_nc", "prediction"):
        if key in results:
            results[key] = _scatter_targets(np.stack(results[key]), finite)
    return results


def standardize(train, test, *, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Z-score feature columns with the training rows' mean and sd (constant columns → 0).

    What scikit-learn's ``StandardScaler`` fitted on the training rows does, so that one
    grid of alphas fits every layer and signal: gradient features are orders of magnitude
    smaller than activations, and unscaled they met every alpha as an infinite penalty.

    Parameters
    ----------
    train : array of shape (n_train, n_features)
    test : array of shape (n_test, n_features)
    dtype : numpy dtype or None
        Of the results; default that of ``train`` for floats (float64 otherwise).

    Returns
    -------
    (train, test) standardised, of shapes (n_train, n_features) and (n_test, n_features)

    Examples
    --------
    >>> import numpy as np
    >>> train, test = standardize(np.array([[0.0], [2.0]]), np.array([[4.0]]))
    >>> train.ravel().tolist(), test.ravel().tolist()
    ([-1.0, 1.0], [3.0])
    """
    train, test = np.asarray(train), np.asarray(test)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"'train' and 'test' must be 2-D with the same columns; got "
                         f"{train.shape} and {test.shape}.")
    if dtype is None:
        dtype = train.dtype if np.issubdtype(train.dtype, np.floating) else np.float64
    mean, sd = standardizer(train)
    return (((train - mean) / sd).astype(dtype, copy=False),
            ((test - mean) / sd).astype(dtype, copy=False))


def standardizer(train) -> tuple[np.ndarray, np.ndarray]:
    """The column means and sds :func:`standardize` applies, to apply them again later
    (e.g. to new images): ``(x - mean) / sd`` z-scores, and a constant column's sd is
    ``inf``, so that it becomes 0.

    Parameters
    ----------
    train : array of shape (n_train, n_features)

    Returns
    -------
    (mean, sd) : two float64 arrays of shape (n_features,)
    """
    train = np.asarray(train)
    sd = train.std(0, dtype=np.float64)
    return train.mean(0, dtype=np.float64), np.where(sd > 0, sd, np.inf)


def _scaled_band(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A feature band z-scored on its training rows (constant columns → 0) and weighted
    1/√p, so that every band has the same total variance in a joint model."""
    train, test = standardize(train, test, dtype=np.float64)
    weight = 1 / np.sqrt(train.shape[1])
    return train * weight, test * weight


def _test_r2(y_test: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Per target, 1 − SS_res / SS_tot on the test set (scikit-learn's ``r2_score``)."""
    residual = ((y_test - prediction) ** 2).sum(0)
    total = ((y_test - y_test.mean(0)) ** 2).sum(0)
    return np.divide(total - residual, total, out=np.full(len(total), np.nan),
                     where=total > 0)


#: The components :func:`variance_partition` returns, per target.
PARTITION = ("r2_a", "r2_b", "r2_joint", "unique_a", "unique_b", "shared")


#: Test-set scores :func:`variance_partition` can partition.
PARTITION_SCORES = ("r2", "signed_r2")


def _signed_squared_r(y_test: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Per target, sign(r)·r² of the test prediction (r: Pearson correlation)."""
    r = pearson_r(y_test, prediction)
    return np.sign(r) * r ** 2


def variance_partition(a_train, b_train, Y_train, a_test, b_test, Y_test, *,
                       alphas=DEFAULT_ALPHAS, cv=5, band_ratios=(0.1, 1.0, 10.0),
                       score: str = "r2", device=None, dtype=None) -> dict:
    """Unique and shared test-set variance of two feature bands (joint minus single).

    Ridge models (:class:`RidgeCV`, one alpha per target) are fitted on the training
    images and scored on the test images by R² (or sign(r)·r², see ``score``): band A
    alone, band B alone, and the joint model. Each band is z-scored on the training
    images and weighted 1/√p. The joint model is a **banded ridge by grid search**: band B is weighted √r relative to
    A for each ``r`` in ``band_ratios`` (a penalty ratio), and each target keeps, among
    those and the two single bands (r = 0 and ∞), the model with the best cross-validated
    score — so adding a band that carries nothing does not lower the joint score, the
    bias of a joint model with one shared penalty. Then ``unique_b = R²(joint) − R²(A)``
    (what B adds to A), ``unique_a = R²(joint) − R²(B)`` and ``shared = R²(A) + R²(B) −
    R²(joint)``.

    Known bias (stated, not corrected): all three R² are test-set estimates of models
    chosen on training folds, so a unique part can come out slightly negative (or
    positive) by chance; the grid of ratios is coarser than a continuous banded ridge
    (himalaya's ``BandedRidgeCV``, which the tests compare with).

    Parameters
    ----------
    a_train, b_train : arrays of shape (n_train, p_a), (n_train, p_b)
        The two bands on the training images (e.g. a layer's activations and its
        gradients).
    Y_train : array of shape (n_train, n_targets)
    a_test, b_test : arrays of shape (n_test, p_a), (n_test, p_b)
    Y_test : array of shape (n_test, n_targets)
    alphas, cv, device, dtype
        As in :class:`RidgeCV`.
    band_ratios : sequence of float
        Penalty ratios of the joint model's grid (at least one; positive).
    score : {"r2", "signed_r2"}
        The test score that is partitioned: the coefficient of determination (default),
        or the squared Pearson correlation with its sign, sign(r)·r², which ignores the
        scale and offset of the predictions. Use the latter where test responses are
        less noisy than training ones (MEG test images averaged over repeats, training
        images seen once): there R² charges every model for the noise its weights
        learnt from single trials, against the small variance of averaged responses.

    Returns
    -------
    dict of str to ndarray of shape (n_targets,): the :data:`PARTITION` components, as
    fractions of the test variance (or signed squared correlations), ``ratio`` the joint model each target kept (0:
    A alone, inf: B alone) and ``cv_r2_joint`` that model's cross-validated R² on the
    training images (1 − its held-out mean squared error over the training variance;
    it never sees the test images, so it can select targets for the test parts without
    biasing them); NaN for targets with non-finite or constant responses.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    >>> Y = a @ rng.normal(size=(3, 2)) + 0.1 * rng.normal(size=(60, 2))   # band a only
    >>> out = variance_partition(a[:45], b[:45], Y[:45], a[45:], b[45:], Y[45:],
    ...                          alphas=[1e-2, 1.0])
    >>> bool((out["unique_a"] > 0.5).all()), bool((abs(out["unique_b"]) < 0.05).all())
    (True, True)
    """
    Y_train, Y_test = np.asarray(Y_train, np.float64), np.asarray(Y_test, np.float64)
    if Y_train.ndim != 2 or Y_test.ndim != 2 or Y_train.shape[1] != Y_test.shape[1]:
        raise ValueError(f"'Y_train' and 'Y_test' must have shape (n_samples, n_targets) with "
                         f"the same targets; got {Y_train.shape} and {Y_test.shape}.")
    for name, train, test in (("a", a_train, a_test), ("b", b_train, b_test)):
        if np.ndim(train) != 2 or np.ndim(test) != 2 or np.shape(train)[1] != \
                np.shape(test)[1] or len(train) != len(Y_train) or len(test) != len(Y_test):
            raise ValueError(f"'{name}_train' and '{name}_test' must be (n_samples, n_features) "
                             f"with the rows of Y_train and Y_test; got {np.shape(train)} and "
                             f"{np.shape(test)}.")
    check_in_allowed("score", score, PARTITION_SCORES)
    test_score = _test_r2 if score == "r2" else _signed_squared_r
    band_ratios = tuple(float(r) for r in band_ratios)
    if not band_ratios or not all(np.isfinite(r) and r > 0 for r in band_ratios):
        raise ValueError(f"'band_ratios' must be positive finite penalty ratios, e.g. "
                         f"(0.1, 1.0, 10.0); got {band_ratios!r}.")
    finite = _finite_columns(Y_train) & _finite_columns(Y_test) & (Y_test.std(0) > 0)
    out = {name: np.full(Y_test.shape[1], np.nan)
           for name in (*PARTITION, "ratio", "cv_r2_joint")}
    if not finite.any():
        return out
    a = _scaled_band(a_train, a_test)
    b = _scaled_band(b_train, b_test)
    Y_fit, Y_score = Y_train[:, finite], Y_test[:, finite]

    def fit(train, test):
        model = RidgeCV(alphas=alphas, cv=cv, device=device, dtype=dtype or torch.float32)
        model.fit(train, Y_fit)
        prediction = model.predict(test).reshape(len(test), -1)
        return np.asarray(model.best_score_, float), test_score(Y_score, prediction)

    (cv_a, r2_a), (cv_b, r2_b) = fit(*a), fit(*b)
    cv_scores, r2_joint, ratios = [cv_a, cv_b], [r2_a, r2_b], [0.0, np.inf]
    for ratio in band_ratios:
        weight = np.sqrt(ratio)
        score, r2 = fit(np.hstack([a[0], weight * b[0]]), np.hstack([a[1], weight * b[1]]))
        cv_scores.append(score)
        r2_joint.append(r2)
        ratios.append(ratio)
    kept = np.argmax(np.stack(cv_scores), axis=0)
    out["cv_r2_joint"][finite] = _cv_r2(
        np.take_along_axis(np.stack(cv_scores), kept[None], 0)[0], Y_fit.var(0))
    r2 = {"r2_a": r2_a, "r2_b": r2_b,
          "r2_joint": np.take_along_axis(np.stack(r2_joint), kept[None], 0)[0]}
    r2["unique_a"] = r2["r2_joint"] - r2["r2_b"]
    r2["unique_b"] = r2["r2_joint"] - r2["r2_a"]
    r2["shared"] = r2["r2_a"] + r2["r2_b"] - r2["r2_joint"]
    r2["ratio"] = np.asarray(ratios)[kept]
    for name, values in r2.items():
        out[name][finite] = values
    return out


#: Study-level functions that moved to :mod:`gradbrain.analysis.encoding` (old names work,
#: with a DeprecationWarning, for one release).
__getattr__ = moved_names(__name__, {name: "gradbrain.analysis.encoding" for name in (
    "fmri_encoding", "fmri_partition", "check_same_images", "_partition_inputs",
    "_partition_layers")})
