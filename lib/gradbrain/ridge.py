"""Cross-validated ridge regression with one alpha per target, in torch (CPU or CUDA).

The encoding models of the study map every layer's features onto every brain target
(vertex, or sensor × time point): ``Y ≈ X W``, with ``W`` regularised by a ridge
penalty whose strength ``alpha`` is chosen per target by K-fold cross-validation
(10 log-spaced alphas 1e0…1e8 and 5 folds, the protocol of Raugel et al. 2025), then
refit on all training data.

Algorithm (same protocol as himalaya's ``RidgeCV``: per-fold centring, negative mean
squared error averaged over folds, argmax per target):

* X and Y are centred once; each fold's training means are removed exactly.
* Per fold, one eigendecomposition of the training Gram matrix — ``X_tr^T X_tr``
  (p × p, primal) when samples outnumber features, else ``X_tr X_tr^T`` (dual, the
  kernel form) — in float64, the only place that needs it.
* ``X_tr^T Y_tr`` is not recomputed per fold: ``X^T Y`` is formed once and each fold
  subtracts its held-out part.
* All alphas are scored at once: one large matmul yields the held-out predictions of
  every alpha, ``(n_alphas · n_test, rank) @ (rank, n_targets)``.
* Targets are processed in batches sized from the free memory, so very many targets
  (163,842 vertices) never sit on the device at once; results stream back to the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.model_selection import check_cv

from ._utils import resolve_device

__all__ = [
    "RidgeCV", "encoding_scores", "layerwise_scores", "fmri_encoding", "pearson_r", "DEFAULT_ALPHAS",
]

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(0, 8, 10))  # 1e0 … 1e8


# --------------------------------------------------------------------------- checks


def _as_2d(name: str, array, *, allow_1d: bool = False) -> tuple[np.ndarray | torch.Tensor, bool]:
    """Validate one input; returns it (numpy or torch) and whether it was 1-D."""
    if isinstance(array, torch.Tensor):
        values = array
        # one float64 sum instead of a boolean mask: NaN and inf propagate into it
        finite = bool(torch.isfinite(values.sum(dtype=torch.float64))) if values.numel() else True
    else:
        values = np.asarray(array)
        if values.dtype.kind not in "fiub":
            raise ValueError(f"{name} must hold numbers; got dtype {values.dtype}.")
        finite = bool(np.isfinite(values).all()) if values.size else True
    raveled = False
    if values.ndim == 1 and allow_1d:
        values, raveled = values[:, None], True
    if values.ndim != 2:
        shape = "(n_samples, n_targets) or (n_samples,)" if allow_1d else "(n_samples, n_features)"
        raise ValueError(f"{name} must have shape {shape}; got {tuple(values.shape)}.")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(values.shape)}); give at least one "
                         "sample and one column.")
    if not finite:
        raise ValueError(f"{name} contains NaN or inf; remove or impute them before fitting.")
    return values, raveled


def _to_tensor(array, device, dtype) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def _check_alphas(alphas) -> np.ndarray:
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if alphas.ndim != 1 or alphas.size == 0 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError(
            f"'alphas' must be a non-empty 1-D array of positive numbers; got {alphas!r}. "
            "e.g. alphas=np.logspace(0, 8, 10)"
        )
    return alphas


def _targets_batch(n_targets: int, per_target_bytes: int, device: torch.device,
                   requested: int | None) -> int:
    """Targets per batch: the requested size, or what fits in a quarter of free memory."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"'targets_batch' must be a positive integer; got {requested}.")
        return min(requested, n_targets)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(max(1, min(n_targets, (free // 4) // max(per_target_bytes, 1))))


# --------------------------------------------------------------------------- core


def _gram_eigh(xc: torch.Tensor, primal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of the Gram matrix of centred float64 data.

    ``X^T X`` (p × p) in the primal form, ``X X^T`` (n × n) in the dual form; eigenvalues
    clipped at 0 (rounding can make the smallest ones slightly negative).
    """
    eigval, eigvec = torch.linalg.eigh(xc.T @ xc if primal else xc @ xc.T)
    return eigval.clamp_min(0), eigvec


class _Fold:
    """One fold's factorisation: held-out projection ``A`` and its eigenvalues."""

    def __init__(self, X: torch.Tensor, train: np.ndarray, test: np.ndarray, primal: bool,
                 dtype: torch.dtype, center: bool):
        device = X.device
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
        return (1.0 / (self.eigval[None, :] + alphas[:, None])).to(self.A.dtype)


def _fold_scores(fold: _Fold, XtY: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                 alphas: torch.Tensor, work: dict) -> torch.Tensor:
    """Negative MSE of held-out predictions, (n_alphas, n_targets) float64, one target batch.

    ``-mean((y - ŷ)²) = -mean(y²) + 2 mean(y ŷ) - mean(ŷ²)``: only the last two terms
    depend on alpha, and computing them apart keeps their precision in float32 where ŷ
    is tiny (large alphas), so near-ties between alphas resolve as in exact arithmetic.
    ``work`` holds buffers reused across folds (large allocations cost page faults).
    """
    n_alphas, n_test, v = len(alphas), len(fold.test), Y.shape[1]
    y_held = Y[fold.test]
    if fold.center:
        y_train_mean = (Y.sum(0) - y_held.sum(0)) / fold.n_train
    else:
        y_train_mean = torch.zeros_like(Y[0])
    y_test = y_held - y_train_mean                              # (n_test, v)
    r = fold.basis.shape[1]
    Z = _buffer(work, "Z", (r, v), Y)
    if fold.primal:
        # X_tr_c^T Y_tr_c = X^T Y - X_te^T Y_te - n_tr μx μy^T (exact centring, no refit)
        s_train = torch.addmm(XtY, X[fold.test].T, y_held, alpha=-1,
                              out=_buffer(work, "S", XtY.shape, Y))
        s_train.addr_(fold.x_mean, y_train_mean, alpha=-fold.n_train)
        torch.matmul(fold.basis.T, s_train, out=Z)              # (r, v)
    else:
        torch.matmul(fold.basis.T, Y[fold.train] - y_train_mean, out=Z)
    shrink = fold.shrink(alphas)                                 # (n_alphas, r)
    scaled = (shrink[:, None, :] * fold.A[None, :, :]).reshape(n_alphas * n_test, r)
    pred = _buffer(work, "pred", (n_alphas * n_test, v), Y)
    torch.matmul(scaled, Z, out=pred)                            # every alpha in one matmul
    # sum_n y_n ŷ_an = sum_k d_ak (A^T y)_k Z_k: no second pass over the predictions
    cross = shrink @ ((fold.A.T @ y_test) * Z)
    sq = pred.square_().reshape(n_alphas, n_test, v).sum(1)
    gain = (2 * cross - sq) / n_test
    return gain.double() - (y_test.double() ** 2).mean(0)


def _buffer(work: dict, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A reusable buffer of at least ``shape`` (views into one allocation per name)."""
    numel = math.prod(shape)
    buf = work.get(name)
    if buf is None or buf.numel() < numel:
        buf = work[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(*shape)


class RidgeCV(MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Ridge regression with one alpha per target chosen by K-fold cross-validation.

    Solves, per target ``t``, ``w_t = argmin ||X w - y_t||² + α_t ||w||²`` with ``α_t``
    the alpha of ``alphas`` that maximises the negative mean squared error of held-out
    predictions averaged over folds, then refits on all the data given to ``fit``.

    Parameters
    ----------
    alphas : array-like of shape (n_alphas,)
        Positive regularisation strengths to try.
    cv : int or scikit-learn splitter
        Folds; an int means ``KFold(cv)`` (contiguous, unshuffled, as himalaya's).
    fit_intercept : bool
        Centre X and Y (per fold during cross-validation) and fit an intercept.
    device : str, torch.device or None
        ``None``: CUDA when available, else CPU.
    dtype : torch.dtype or None
        Compute precision, default float32 (eigendecompositions always run in float64).
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
    alpha_ : ndarray of shape (n_targets,)
        Selected alpha per target (all equal when ``alpha_per_target=False``).
    coef_ : ndarray of shape (n_targets, n_features), or (n_features,) for 1-D y
        Refit coefficients (scikit-learn layout).
    intercept_ : ndarray of shape (n_targets,), or float for 1-D y
    cv_scores_ : ndarray of shape (n_alphas, n_targets)
        Negative mean squared error averaged over folds, per alpha and target.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.normal(size=(30, 5)), rng.normal(size=(30, 3))
    >>> model = RidgeCV(device="cpu").fit(X, Y)
    >>> model.alpha_.shape, model.coef_.shape, model.predict(X).shape
    ((3,), (3, 5), (30, 3))
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, cv=5, fit_intercept: bool = True, device=None,
                 dtype=None, targets_batch: int | None = None, alpha_per_target: bool = True):
        self.alphas = alphas
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.device = device
        self.dtype = dtype
        self.targets_batch = targets_batch
        self.alpha_per_target = alpha_per_target

    def _setup(self):
        device = resolve_device(self.device)
        dtype = self.dtype or torch.float32
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"'dtype' must be torch.float32 or torch.float64; got {dtype!r}.")
        return device, dtype

    def fit(self, X, y):
        """Fit on X (n_samples, n_features) and y (n_samples, n_targets) or (n_samples,)."""
        X, _ = _as_2d("X", X)
        y, raveled = _as_2d("y", y, allow_1d=True)
        if X.shape[0] != y.shape[0]:
            raise ValueError(
                f"X and y must have the same number of samples; got {X.shape[0]} and {y.shape[0]}."
            )
        alphas_np = _check_alphas(self.alphas)
        device, dtype = self._setup()
        n, p = X.shape
        folds = list(check_cv(self.cv).split(np.zeros(n)))
        if any(len(tr) == 0 or len(te) == 0 for tr, te in folds):
            raise ValueError("Every fold needs training and held-out samples; lower 'cv'.")
        if min(len(tr) for tr, _ in folds) < 2 and self.fit_intercept:
            raise ValueError("Too few samples per fold to fit an intercept; lower 'cv'.")

        Xt = _to_tensor(X, device, dtype)
        x_offset = Xt.mean(0) if self.fit_intercept else torch.zeros(p, device=device, dtype=dtype)
        Xt = Xt - x_offset
        alphas = torch.as_tensor(alphas_np, device=device, dtype=torch.float64)
        primal = p <= min(len(tr) for tr, _ in folds)
        fold_objs = [_Fold(Xt, tr, te, primal, dtype, self.fit_intercept) for tr, te in folds]
        full = _Full(Xt, dtype, primal)

        n_targets = y.shape[1]
        groups = self._alpha_groups(n_targets)
        max_test = max(len(te) for _, te in folds)
        itemsize = 8 if dtype == torch.float64 else 4
        per_target = itemsize * (2 * n + 4 * max(p, n) + 2 * len(alphas_np) * max_test)
        batch = _targets_batch(n_targets, per_target, device, self.targets_batch)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        cv_scores = np.empty((len(alphas_np), n_targets))
        coef = np.empty((n_targets, p), dtype=np_dtype)
        intercept = np.zeros(n_targets, dtype=np_dtype)
        batches = [slice(s, min(s + batch, n_targets)) for s in range(0, n_targets, batch)]

        def centred(sl):
            Yb = _to_tensor(y[:, sl], device, dtype)
            y_offset = Yb.mean(0) if self.fit_intercept else torch.zeros_like(Yb[0])
            Yb = Yb - y_offset
            return Yb, y_offset, (Xt.T @ Yb if primal else None)

        def refit(sl, Yb, y_offset, XtY, best):
            W = full.coefficients(Yb, XtY, alphas[best])                      # (p, v)
            coef[sl] = W.T.cpu().numpy()
            intercept[sl] = (y_offset - x_offset @ W).cpu().numpy()

        for sl in batches:
            Yb, y_offset, XtY = centred(sl)
            work: dict = {}
            scores = sum(_fold_scores(f, XtY, Xt, Yb, alphas, work) for f in fold_objs)
            scores /= len(fold_objs)
            cv_scores[:, sl] = scores.cpu().numpy()
            if groups is None:
                refit(sl, Yb, y_offset, XtY, scores.argmax(0))
            del Yb, XtY, scores, work
        if groups is None:
            self.alpha_ = alphas_np[cv_scores.argmax(0)]
        else:
            # one alpha per group: the best score averaged over its targets, then a second pass
            labels, inverse = np.unique(groups, return_inverse=True)
            sums = np.zeros((len(alphas_np), len(labels)))
            np.add.at(sums.T, inverse, cv_scores.T)
            best = sums.argmax(0)[inverse]                                   # (n_targets,)
            for sl in batches:
                Yb, y_offset, XtY = centred(sl)
                refit(sl, Yb, y_offset, XtY, torch.as_tensor(best[sl], device=device))
                del Yb, XtY
            self.alpha_ = alphas_np[best]
        self.cv_scores_ = cv_scores
        self.coef_ = coef[0] if raveled else coef
        self.intercept_ = float(intercept[0]) if raveled else intercept
        self.n_features_in_ = p
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
        X, _ = _as_2d("X", X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features but the model was fitted on {self.n_features_in_}."
            )
        X = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X, float)
        return X @ np.asarray(self.coef_).T + self.intercept_


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
        shrink = (1.0 / (self.eigval[:, None] + alpha_per_target[None, :])).to(self.basis.dtype)
        if self.primal:
            return self.basis @ (shrink * (self.basis.T @ XtY))
        return self.Xc.T @ (self.basis @ (shrink * (self.basis.T @ Yc)))


# --------------------------------------------------------------------------- scores


def pearson_r(y_true, y_pred) -> np.ndarray:
    """Pearson correlation per column, ndarray of shape (n_targets,) (0 for constant columns)."""
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.divide((a * b).sum(0), denom, out=np.zeros(a.shape[1]), where=denom > 0)


def encoding_scores(X_train, Y_train, X_test, Y_test, *, noise_ceiling=None,
                    alphas=DEFAULT_ALPHAS, cv=5, device=None, dtype=None,
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
    return_prediction : bool
        Also return the test-set prediction (for bootstraps over test images).

    Returns
    -------
    dict with ``r`` (n_targets,) Pearson correlation on the test set, ``r_nc``
    (n_targets,) = r / sqrt(NC / 100), the fraction of the largest correlation the
    noise allows (NaN where NC = 0; only with ``noise_ceiling``), ``alpha``
    (n_targets,) the selected alphas and, if asked, ``prediction`` (n_test, n_targets).
    """
    model = RidgeCV(alphas=alphas, cv=cv, device=device, dtype=dtype,
                    targets_batch=targets_batch).fit(X_train, Y_train)
    prediction = model.predict(X_test)
    r = pearson_r(Y_test, prediction)
    out = {"r": r, "alpha": model.alpha_}
    if return_prediction:
        out["prediction"] = np.asarray(prediction, dtype=np.float32)
    if noise_ceiling is not None:
        nc = np.asarray(noise_ceiling, dtype=float) / 100
        out["r_nc"] = np.divide(r, np.sqrt(nc), out=np.full_like(r, np.nan), where=nc > 0)
    return out


def layerwise_scores(features: dict, Y_train, Y_test, train_index, test_index, *,
                     noise_ceiling=None, alphas=DEFAULT_ALPHAS, cv=5, device=None, dtype=None,
                     progress: bool = False, return_prediction: bool = False) -> dict:
    """Encoding scores of every layer's features in one call.

    Parameters
    ----------
    features : dict of str to ndarray of shape (n_images, n_features_layer)
        One feature matrix per layer (e.g. ``Features.activations``), rows = images.
    Y_train, Y_test : arrays of shape (n_train, n_targets), (n_test, n_targets)
        Responses of the training and test images.
    train_index, test_index : arrays of int
        Rows of the feature matrices for the training and test images.
    return_prediction : bool
        Also return every layer's test-set prediction.

    Returns
    -------
    dict with ``r`` and (with ``noise_ceiling``) ``r_nc``, each ndarray of shape
    (n_layers, n_targets), ``alpha`` (n_layers, n_targets), ``layers`` and, if asked,
    ``prediction`` (n_layers, n_test, n_targets), float32.
    """
    from tqdm import tqdm

    Y_train, _ = _as_2d("Y_train", Y_train, allow_1d=True)
    Y_test, _ = _as_2d("Y_test", Y_test, allow_1d=True)
    device, dtype = resolve_device(device), dtype or torch.float32
    # target-side work done once for all layers: the targets on the device
    Y_train_t = _to_tensor(Y_train, device, dtype)
    results = {"layers": list(features), "r": [], "alpha": []}
    if noise_ceiling is not None:
        results["r_nc"] = []
    if return_prediction:
        results["prediction"] = []
    for layer in tqdm(list(features), desc="layers", disable=not progress):
        X = np.asarray(features[layer])
        out = encoding_scores(X[train_index], Y_train_t, X[test_index], Y_test,
                              noise_ceiling=noise_ceiling, alphas=alphas, cv=cv, device=device,
                              dtype=dtype, return_prediction=return_prediction)
        for key in out:
            results[key].append(out[key])
    for key in ("r", "alpha", "r_nc", "prediction"):
        if key in results:
            results[key] = np.stack(results[key])
    return results


def fmri_encoding(study, features, *, alphas=DEFAULT_ALPHAS, cv=5, device=None, dtype=None,
                  progress: bool = False, return_prediction: bool = False) -> dict:
    """Encode a study's fMRI from every layer's activations and gradients.

    The test set is held out as NSD does: images with ``study.split == "test"`` (NSD's
    shared images) are never used for fitting or choosing alphas. Responses are the
    mean over repeats; scores are NC-normalised with ``study.noise_ceiling()``.

    Parameters
    ----------
    study : Study
        With ``betas`` (n_images, n_repeats, n_vertices) and ``split``.
    features : Features
        Extracted on ``study.images`` (same image ids, same order).
    return_prediction : bool
        Also keep each layer's test-set prediction and the test responses (for
        bootstraps over test images; n_layers × n_test × n_vertices float32 per signal).

    Returns
    -------
    dict of str to dict
        Signal name (``"activation"``, ``"gradient (ce)"``, …) → the output of
        :func:`layerwise_scores`: ``r``, ``r_nc`` and ``alpha`` of shape
        (n_layers, n_vertices), and ``layers``; if asked, ``prediction`` (n_layers,
        n_test, n_vertices) and ``y_test`` (n_test, n_vertices).
    """
    from .features import signals

    if list(features.image_ids) != list(study.image_ids):
        raise ValueError(
            "'features' were not extracted on the study's images (image ids differ); extract "
            "them with gradbrain.features.extract(model, study.images)."
        )
    if study.betas is None:
        raise ValueError(f"Study {study.name!r} has no fMRI data (betas is None).")
    train = np.flatnonzero(study.split == "train")
    test = np.flatnonzero(study.split == "test")
    if len(test) == 0 or len(train) < 2 * (cv if isinstance(cv, int) else 2):
        raise ValueError(
            f"The study needs test images and enough training images; got {len(train)} "
            f"train and {len(test)} test."
        )
    Y = study.mean_betas()
    nc = study.noise_ceiling()
    out = {
        name: layerwise_scores(per_layer, Y[train], Y[test], train, test, noise_ceiling=nc,
                               alphas=alphas, cv=cv, device=device, dtype=dtype,
                               progress=progress, return_prediction=return_prediction)
        for name, per_layer in signals(features).items()
    }
    if return_prediction:
        for result in out.values():
            result["y_test"] = Y[test]
    return out
