"""Time-resolved MEG analyses: when does each layer's signal best predict the brain?

Encoding
    One layer's features → every sensor at every time point. All (sensor × time)
    targets form ONE ridge problem: the features' factorisation is shared by every
    target and each target gets its own alpha (see :mod:`gradbrain.ridge`).
Decoding
    Sensors → an image property (a category, or image features as in back-to-back
    regression) at every time point. Here the inputs change with time, so the ridge
    problems of all time points are solved together: one batched Gram matrix and one
    batched eigendecomposition per fold for every time point at once.
Peak latency
    As in Raugel et al. (2025): the mean time of the window where a layer's score is
    at least 95 % of its maximum, with bootstrap confidence intervals over test images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator

from ._utils import check_in_allowed, moved_names, resolve_device
from .ridge import (DEFAULT_ALPHAS, SCORINGS, RidgeCV, _check_alphas, _is_complement,
                    _refuse_fit_params, check_folds, pearson_r, shuffled_correlations)

__all__ = ["average_by_image", "encode_time_resolved", "decode_time_resolved",
           "decode_category", "SlidingRidgeCV", "peak_latency", "bootstrap_curves",
           "peak_permutation_test", "step_down_max_p", "summarize_partition"]


def average_by_image(epochs, image_ids: Sequence[str]) -> np.ndarray:
    """Average the trials of each image (repeats), in the order of ``image_ids``.

    Parameters
    ----------
    epochs : mne.BaseEpochs
        With ``metadata["image_id"]``.
    image_ids : sequence of str
        Images to return; each must have at least one trial.

    Returns
    -------
    ndarray of shape (n_images, n_channels, n_times), in the epochs' units (T).
    """
    if epochs.metadata is None or "image_id" not in epochs.metadata:
        raise ValueError("'epochs' need metadata with an 'image_id' column (one row per trial).")
    trial_ids = epochs.metadata["image_id"].to_numpy()
    missing = sorted(set(image_ids) - set(trial_ids))
    if missing:
        raise ValueError(f"No trials for {len(missing)} image(s), e.g. {missing[:3]}.")
    data = epochs.get_data(copy=False)
    out = np.empty((len(image_ids),) + data.shape[1:], dtype=np.float64)
    for i, image_id in enumerate(image_ids):
        out[i] = data[trial_ids == image_id].mean(axis=0)
    return out


def encode_time_resolved(X_train, Y_train, X_test, Y_test, *, alphas=DEFAULT_ALPHAS, cv=5,
                         groups=None, device=None, dtype=None, targets_batch=None,
                         alpha_per: str = "target", return_prediction: bool = False) -> dict:
    """Encode every sensor at every time point from one feature matrix, as one problem.

    Parameters
    ----------
    X_train : array of shape (n_train, n_features)
    Y_train : array of shape (n_train, n_channels, n_times)
        MEG per training image (e.g. :func:`average_by_image`), any unit.
    X_test : array of shape (n_test, n_features)
    Y_test : array of shape (n_test, n_channels, n_times)

    alphas, cv, groups, device, targets_batch
        As in :class:`gradbrain.ridge.RidgeCV` (``groups``: labels of the training
        images, for group splitters).
    dtype : torch.dtype or None
        Compute precision; None means float32.
    alpha_per : {"target", "time"}
        One alpha per sensor × time point, or one per time point shared by all sensors
        (chosen on their mean score; a loop of scikit-learn ``RidgeCV(cv=...)`` over
        time points does the latter).
    return_prediction : bool
        Also return the test predictions.

    Returns
    -------
    dict with ``r`` (n_channels, n_times) Pearson correlation on the test images,
    ``alpha`` (n_channels, n_times) the alpha chosen per sensor and time point and, with
    ``return_prediction``, ``prediction`` (n_test, n_channels, n_times) in the units of
    ``Y_test``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 3))                                # (n_images, n_features)
    >>> Y = np.einsum("nf,fct->nct", X, rng.normal(size=(3, 4, 6)))  # 4 sensors, 6 times
    >>> out = encode_time_resolved(X[:30], Y[:30], X[30:], Y[30:], alphas=[1e-3, 1.0])
    >>> out["r"].shape, bool((out["r"] > 0.99).all())
    ((4, 6), True)
    """
    Y_train, Y_test = _as_meg("Y_train", Y_train), _as_meg("Y_test", Y_test)
    if Y_train.shape[1:] != Y_test.shape[1:]:
        raise ValueError(
            "'Y_train' and 'Y_test' must have shape (n_images, n_channels, n_times) with the "
            f"same channels and times; got {Y_train.shape} and {Y_test.shape}."
        )
    for name, X, Y in (("X_train", X_train, Y_train), ("X_test", X_test, Y_test)):
        if len(X) != len(Y):
            raise ValueError(f"'{name}' has {len(X)} rows but the MEG has {len(Y)} images; "
                             "give one feature row per image, in the same order.")
    check_in_allowed("alpha_per", alpha_per, ("target", "time"))
    shape = Y_train.shape[1:]
    per_target = True if alpha_per == "target" else np.tile(np.arange(shape[1]), shape[0])
    # RidgeCV rescales every target exactly (powers of two): MEG in tesla (~1e-13) is safe
    model = RidgeCV(alphas=alphas, cv=cv, device=device, dtype=dtype or torch.float32,
                    targets_batch=targets_batch, alpha_per_target=per_target)
    model.fit(X_train, Y_train.reshape(len(Y_train), -1), groups=groups)
    prediction = model.predict(X_test)
    r = pearson_r(Y_test.reshape(len(Y_test), -1), prediction)
    out = {"r": r.reshape(shape), "alpha": model.alpha_.reshape(shape)}
    if return_prediction:
        out["prediction"] = prediction.reshape((len(Y_test),) + shape)
    return out


def peak_latency(times: np.ndarray, curve: np.ndarray, threshold: float = 0.95) -> float:
    """Peak latency of a score time course, as in Raugel et al. (2025).

    The mean time of the contiguous window around the maximum where the score is at
    least ``threshold`` × its maximum.

    Parameters
    ----------
    times : ndarray of shape (n_times,)
        Seconds (or ms: the result has the same unit).
    curve : ndarray of shape (n_times,)
        Score over time (e.g. r averaged over sensors); its maximum must be positive.

    Examples
    --------
    >>> import numpy as np
    >>> times = np.array([0.0, 10.0, 20.0, 30.0, 40.0])           # ms
    >>> peak_latency(times, np.array([0.0, 0.2, 1.0, 0.97, 0.1]))  # window ≥ 95 % of the peak
    25.0
    """
    times, curve = np.asarray(times, float), np.asarray(curve, float)
    if times.shape != curve.shape or curve.ndim != 1:
        raise ValueError(f"'times' and 'curve' must be 1-D of equal length; got {times.shape} "
                         f"and {curve.shape}.")
    if not 0 < threshold <= 1:
        raise ValueError(f"'threshold' must be in (0, 1]; got {threshold}.")
    if not np.isfinite(curve).any():
        raise ValueError("'curve' has no finite value (all NaN or infinite): no peak latency "
                         "to report.")
    peak = int(np.nanargmax(curve))
    if not curve[peak] > 0:
        raise ValueError("The score never rises above 0: no peak latency to report.")
    above = curve >= threshold * curve[peak]
    start, stop = peak, peak
    while start > 0 and above[start - 1]:
        start -= 1
    while stop < len(curve) - 1 and above[stop + 1]:
        stop += 1
    return float(times[start : stop + 1].mean())


# --------------------------------------------------------------------------- decoding


def _as_meg(name: str, array) -> np.ndarray:
    """Validate MEG data of shape (n_trials, n_channels, n_times) as a numpy array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"'{name}' must hold numbers; got dtype {array.dtype}.")
    if array.ndim != 3:
        raise ValueError(f"'{name}' must have shape (n_trials, n_channels, n_times); got "
                         f"{array.shape}.")
    if 0 in array.shape:
        raise ValueError(f"'{name}' is empty (shape {array.shape}): it needs trials, channels "
                         "and time points.")
    if not np.isfinite(array.sum(dtype=np.float64)):
        raise ValueError(f"'{name}' contains NaN or infinite values.")
    return array


def _as_targets(name: str, values, n: int) -> tuple[np.ndarray, bool]:
    """Targets (n,) or (n, k) as float64 (n, k), and whether they were 1-D."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if values.dtype.kind not in "fiub":
        raise ValueError(f"'{name}' must hold numbers; got dtype {values.dtype}.")
    raveled = values.ndim == 1
    values = values.astype(np.float64).reshape(len(values), -1) if values.ndim in (1, 2) \
        else values
    if values.ndim != 2 or len(values) != n or values.shape[1] == 0:
        raise ValueError(f"'{name}' must have shape (n={n},) or (n, n_targets) with one row per "
                         f"trial; got {np.shape(values)}.")
    if not np.isfinite(values).all():
        raise ValueError(f"'{name}' contains NaN or infinite values.")
    return values, raveled


def _time_major(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, c, T) array → contiguous float64 tensor (T, n, c), in one copy."""
    source = torch.as_tensor(array, device=device).permute(2, 0, 1)
    return torch.empty(source.shape, device=device, dtype=torch.float64).copy_(source)


def decode_time_resolved(meg_train, y_train, meg_test, y_test=None, *, alphas=DEFAULT_ALPHAS,
                         cv="loo", groups=None, standardize: bool = True, device=None) -> dict:
    """Decode targets from the sensors at every time point (ridge, one alpha per target).

    At time ``t`` the model is ``y ≈ X_t w_t + b_t`` with ``X_t`` the (standardised)
    sensor values of each trial and an unpenalised intercept. ``alpha`` is chosen per
    time point and target by cross-validation, then the model is refit on all training
    trials. All time points are solved together: one batched Gram matrix and one
    batched eigendecomposition (float64) per fit, every alpha scored from it.

    With ``cv="loo"`` this is, time point by time point, scikit-learn's default
    ``RidgeCV(alphas)`` (efficient leave-one-out: residuals ``(y - ŷ) / (1 - h)`` from
    the hat-matrix diagonal), i.e. MNE's ``SlidingEstimator(make_pipeline(
    StandardScaler(), RidgeCV(alphas)))`` run once per target. With an int or a
    splitter it is the same pipeline with ``RidgeCV(alphas, cv=splitter,
    scoring="neg_mean_squared_error")``: negative MSE averaged over folds, as
    :class:`~gradbrain.ridge.RidgeCV`. Any splitter is exact, including those that
    leave trials out of both sets (``ShuffleSplit``, ``TimeSeriesSplit``) and group
    splitters (``GroupKFold`` with ``groups``: e.g. the image of each trial, so that
    repeats of one image never sit on both sides of a fold).

    Parameters
    ----------
    meg_train : array of shape (n_train, n_channels, n_times)
        Training trials (or per-image averages).
    y_train : array of shape (n_train,) or (n_train, n_targets)
        What to decode: a continuous target, one-hot categories, image features…
    meg_test : array of shape (n_test, n_channels, n_times)
    y_test : array of shape (n_test,) or (n_test, n_targets), optional
        When given, the Pearson correlation of prediction and truth is returned.
    alphas : array-like of shape (n_alphas,)
    cv : "loo", int or scikit-learn splitter
        How alphas are chosen: efficient leave-one-out, or folds over the training
        trials (an int means ``KFold(cv)``).
    groups : array-like of shape (n_train,), optional
        Group label of each training trial, for group splitters.
    standardize : bool
        Z-score each sensor at each time point with the training trials' mean and
        standard deviation (as ``StandardScaler``), so that alphas mean the same thing
        whatever the MEG units.
    device : str, torch.device or None

    Returns
    -------
    dict with ``prediction`` (n_test, n_times, n_targets), ``alpha`` (n_times,
    n_targets) and, with ``y_test``, ``r`` (n_times, n_targets); the target axis is
    dropped when ``y_train`` is 1-D.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 3))
    >>> meg = np.einsum("nf,fct->nct", X, rng.normal(size=(3, 4, 6)))  # (n_trials, 4, 6 times)
    >>> out = decode_time_resolved(meg[:30], X[:30, 0], meg[30:], X[30:, 0], alphas=[1e-3, 1.0])
    >>> out["r"].shape, out["prediction"].shape, bool((out["r"] > 0.99).all())
    ((6,), (10, 6), True)
    """
    meg_train, meg_test = _as_meg("meg_train", meg_train), _as_meg("meg_test", meg_test)
    if meg_train.shape[1:] != meg_test.shape[1:]:
        raise ValueError("'meg_train' and 'meg_test' must have the same channels and times; "
                         f"got {meg_train.shape[1:]} and {meg_test.shape[1:]}.")
    y, raveled = _as_targets("y_train", y_train, len(meg_train))
    yt = None
    if y_test is not None:
        yt, _ = _as_targets("y_test", y_test, len(meg_test))
        if yt.shape[1] != y.shape[1]:
            raise ValueError(f"'y_test' must have {y.shape[1]} target(s) like 'y_train'; got "
                             f"shape {np.shape(y_test)}.")
    fit = _fit_sliding(meg_train, y, alphas, cv, groups, standardize, device)
    prediction = _predict_sliding(fit, meg_test)                         # (n_test, T, k)
    out = {"prediction": prediction, "alpha": fit["alpha"]}
    if yt is not None:
        out["r"] = np.stack([pearson_r(yt, prediction[:, t]) for t in range(prediction.shape[1])])
    if raveled:
        out = {key: value[..., 0] for key, value in out.items()}
    return out


def _fit_sliding(meg_train: np.ndarray, y: np.ndarray, alphas, cv, groups, standardize: bool,
                 device) -> dict:
    """Fit the ridge of every time point at once (see :func:`decode_time_resolved`).

    Returns
    -------
    dict with tensors ``coef`` (T, c, k) on the standardised sensors, ``mean`` and
    ``sd`` (T, 1, c) of the standardisation, ``mx`` (T, c) and ``my`` (k,) the centres
    of the fit, and ``alpha`` ndarray (T, k).
    """
    alphas_np = _check_alphas(alphas)
    device = resolve_device(device)
    loo = isinstance(cv, str)
    if loo and cv != "loo":
        raise ValueError(f"'cv' must be 'loo', an int or a scikit-learn splitter; got {cv!r}.")
    if loo and groups is not None:
        raise ValueError("'groups' need a group splitter (e.g. cv=GroupKFold(5) or "
                         "LeaveOneGroupOut()); cv='loo' leaves out single trials.")
    folds = [] if loo else check_folds(cv, len(y), y=y[:, 0] if y.shape[1] == 1 else y,
                                       groups=groups)
    if len(y) < 3 or (folds and min(len(tr) for tr, _ in folds) < 2):
        raise ValueError(f"Too few training trials ({len(y)}) for cv={cv!r}.")

    f64 = dict(device=device, dtype=torch.float64)
    X = _time_major(meg_train, device)                                   # (T, n, c)
    if standardize:
        sd, mean = torch.std_mean(X, dim=1, correction=0, keepdim=True)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        X.sub_(mean).div_(sd)
    else:
        mean = torch.zeros((X.shape[0], 1, X.shape[2]), **f64)
        sd = torch.ones_like(mean)
    Y = torch.as_tensor(y, **f64)                                        # (n, k)
    A = torch.as_tensor(alphas_np, **f64)
    gram, x_sum = X.transpose(1, 2) @ X, X.sum(1)                        # (T, c, c), (T, c)
    xty, y_sum = X.transpose(1, 2) @ Y, Y.sum(0)                         # (T, c, k), (k,)

    def solve(train=None, test=None):
        """Centred Gram eigendecomposition and rotated X^T y of the training trials.

        ``None``: every trial. A fold whose training set is every trial not held out
        subtracts the held-out part from the full sums; any other fold (ShuffleSplit,
        TimeSeriesSplit, gapped lists) sums over its training trials.
        """
        if train is None:
            n_tr, g, xs, xy, ys = len(Y), gram, x_sum, xty, y_sum
        elif _is_complement(train, test, len(Y)):
            held_out = torch.as_tensor(test, device=device)
            x_out, y_out = X[:, held_out], Y[held_out]
            n_tr = len(Y) - len(test)
            g = gram - x_out.transpose(1, 2) @ x_out
            xs, ys = x_sum - x_out.sum(1), y_sum - y_out.sum(0)
            xy = xty - x_out.transpose(1, 2) @ y_out
        else:
            kept = torch.as_tensor(train, device=device)
            x_in, y_in = X[:, kept], Y[kept]
            n_tr = len(train)
            g, xy = x_in.transpose(1, 2) @ x_in, x_in.transpose(1, 2) @ y_in
            xs, ys = x_in.sum(1), y_in.sum(0)
        mx, my = xs / n_tr, ys / n_tr
        g = g - n_tr * mx[:, :, None] * mx[:, None, :]
        xy = xy - n_tr * mx[:, :, None] * my[None, None, :]
        eigval, V = torch.linalg.eigh(g)
        return eigval.clamp_min(0), V, V.transpose(1, 2) @ xy, mx, my

    n_alphas, (n_times, _, n_channels), n_targets = len(A), X.shape, Y.shape[1]
    # targets per chunk: the predictions of every alpha at once stay under ~64 M numbers
    chunk = max(1, min(n_targets, 2**26 // (n_alphas * n_times * len(Y))))

    def held_out_scores(P, Z, eigval, y_c, hat=None):
        """-mean((y - ŷ)²) over held-out trials, (n_alphas, T, k); LOO-corrected with ``hat``."""
        inv = 1.0 / (eigval[:, :, None] + A)                            # (T, c, n_alphas)
        out = torch.empty((n_alphas, n_times, n_targets), **f64)
        for s0 in range(0, n_targets, chunk):
            z = Z[:, :, None, s0:s0 + chunk] * inv[:, :, :, None]        # (T, c, a, kc)
            pred = P @ z.reshape(n_times, n_channels, -1)               # (T, n, a·kc)
            pred = pred.reshape(n_times, P.shape[1], n_alphas, -1).permute(2, 0, 1, 3)
            residual = y_c[..., s0:s0 + chunk] - pred                   # (a, T, n, kc)
            if hat is not None:
                residual /= 1 - hat
            out[..., s0:s0 + chunk] = -residual.square_().mean(2)
        return out

    if loo:
        full = eigval, V, Z, mx, my = solve()
        P = X @ V - (mx[:, None, :] @ V)                                # (T, n, c)
        # hat-matrix diagonal of every alpha: 1/n (intercept) + Σ_k P_ik² / (λ_k + α)
        hat = 1 / len(Y) + P.square() @ (1.0 / (eigval[:, :, None] + A))  # (T, n, n_alphas)
        scores = held_out_scores(P, Z, eigval, Y - my, hat.permute(2, 0, 1)[..., None])
    else:
        scores = torch.zeros((n_alphas, n_times, n_targets), **f64)
        for train, test in folds:
            eigval, V, Z, mx, my = solve(train, test)
            held_out = torch.as_tensor(test, device=device)
            P = X[:, held_out] @ V - (mx[:, None, :] @ V)                # (T, n_te, c)
            scores += held_out_scores(P, Z, eigval, Y[held_out] - my)
        scores /= len(folds)
        full = solve()
    best = scores.argmax(0)                                             # (T, k), first max
    eigval, V, Z, mx, my = full
    coef = V @ (Z / (eigval[:, :, None] + A[best][:, None, :]))          # (T, c, k)
    return {"coef": coef, "mean": mean, "sd": sd, "mx": mx, "my": my,
            "alpha": alphas_np[best.cpu().numpy()]}


def _predict_sliding(fit: dict, meg: np.ndarray) -> np.ndarray:
    """Predictions of a :func:`_fit_sliding` model, ndarray (n_trials, T, k)."""
    X = _time_major(meg, fit["coef"].device).sub_(fit["mean"]).div_(fit["sd"])
    prediction = (X - fit["mx"][:, None, :]) @ fit["coef"] + fit["my"]   # (T, n, k)
    return prediction.permute(1, 0, 2).cpu().numpy()


def decode_category(meg_train, labels_train, meg_test, labels_test, *, alphas=DEFAULT_ALPHAS,
                    cv="loo", groups=None, standardize: bool = True, device=None) -> dict:
    """Decode the category of each trial over time (one-vs-rest ridge, argmax).

    The one-hot category codes are decoded with :func:`decode_time_resolved`; a test
    trial's predicted category is the one whose decoded value rises most above its
    training frequency (the intercept), so that a decoder with nothing to go on guesses
    at chance, 1 / n_categories, rather than always naming the most frequent category.

    Parameters
    ----------
    meg_train, meg_test : arrays of shape (n_trials, n_channels, n_times)
    labels_train, labels_test : sequences of str (or int), lengths n_train and n_test
        Test labels must be among the training labels.
    cv, groups
        As in :func:`decode_time_resolved`.

    Returns
    -------
    dict with ``accuracy`` (n_times,) fraction of correctly decoded test trials,
    ``chance`` (1 / n_categories) and ``categories`` (the classes, sorted).
    """
    labels_train, labels_test = np.asarray(labels_train), np.asarray(labels_test)
    for name, labels, meg_data in (("labels_train", labels_train, meg_train),
                                   ("labels_test", labels_test, meg_test)):
        if labels.ndim != 1 or len(labels) != len(meg_data):
            raise ValueError(f"'{name}' must hold one label per trial ({len(meg_data)}); got "
                             f"shape {labels.shape}.")
    categories = np.unique(labels_train)
    if len(categories) < 2:
        raise ValueError("'labels_train' must hold at least 2 categories to decode.")
    unknown = sorted(set(labels_test.tolist()) - set(categories.tolist()))
    if unknown:
        raise ValueError(f"'labels_test' has categories absent from training: {unknown[:3]}.")
    one_hot = (labels_train[:, None] == categories[None, :]).astype(float)
    out = decode_time_resolved(meg_train, one_hot, meg_test, alphas=alphas, cv=cv,
                               groups=groups, standardize=standardize, device=device)
    evidence = out["prediction"] - one_hot.mean(0)                      # priors removed
    decoded = categories[evidence.argmax(2)]                            # (n_test, T)
    accuracy = (decoded == labels_test[:, None]).mean(0)
    return {"accuracy": accuracy, "chance": 1 / len(categories), "categories": categories}


class SlidingRidgeCV(BaseEstimator):
    """A scikit-learn estimator that decodes at every time point (MNE's SlidingEstimator).

    ``SlidingRidgeCV(alphas)`` behaves as MNE's ``SlidingEstimator(make_pipeline(
    StandardScaler(), RidgeCV(alphas)))``: one standardised ridge per time point, its
    alpha chosen by efficient leave-one-out (``cv="loo"``) or by folds — but every time
    point is fitted at once (:func:`decode_time_resolved`). It works inside
    scikit-learn's ``cross_val_score``/``cross_val_predict`` and pipelines.

    Parameters
    ----------
    alphas, cv, standardize, device
        As in :func:`decode_time_resolved`.
    scoring : {"r2", "neg_mean_squared_error"}
        What :meth:`score` returns per time point (averaged over targets).

    Attributes
    ----------
    coef_ : ndarray of shape (n_times, n_channels, n_targets)
        Weights on the standardised sensors (channels flattened when X has several
        feature axes).
    mean_, scale_ : ndarray of shape (n_times, n_channels)
        The training trials' sensor means and standard deviations (``StandardScaler``).
    alpha_ : ndarray of shape (n_times, n_targets), or (n_times,) for 1-D y
    features_shape_ : tuple
        The feature axes of X (``(n_channels,)`` for MEG epochs).
    n_times_ : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(40, 5, 3)), rng.normal(size=40)
    >>> SlidingRidgeCV().fit(X, y).predict(X).shape
    (40, 3)
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, cv="loo", standardize: bool = True, device=None,
                 scoring: str = "r2"):
        self.alphas = alphas
        self.cv = cv
        self.standardize = standardize
        self.device = device
        self.scoring = scoring

    @staticmethod
    def _flatten(X) -> np.ndarray:
        """(n_trials, *features, n_times) → (n_trials, n_features, n_times)."""
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        X = np.asarray(X)
        if X.ndim < 3:
            raise ValueError(f"X must have shape (n_trials, n_channels, n_times) (or more "
                             f"feature axes before the time axis); got {X.shape}.")
        return X.reshape(X.shape[0], -1, X.shape[-1])

    def fit(self, X, y, groups=None, **fit_params):
        """Fit on MEG ``X`` (n_trials, n_channels, n_times) and ``y`` (n_trials[, n_targets]).

        ``groups`` (n_trials,) labels trials for group splitters. No other fit argument is
        taken (``sample_weight`` gets one clear error).
        """
        _refuse_fit_params(type(self).__name__, fit_params)
        shape = np.shape(X)
        X = _as_meg("X", self._flatten(X))
        y_2d, raveled = _as_targets("y", y, len(X))
        self._fit = _fit_sliding(X, y_2d, self.alphas, self.cv, groups, self.standardize,
                                 self.device)
        self.coef_ = self._fit["coef"].cpu().numpy()
        self.mean_ = self._fit["mean"][:, 0].cpu().numpy()
        self.scale_ = self._fit["sd"][:, 0].cpu().numpy()
        self.alpha_ = self._fit["alpha"][..., 0] if raveled else self._fit["alpha"]
        self.features_shape_ = tuple(shape[1:-1])
        self.n_times_ = X.shape[2]
        self._raveled = raveled
        return self

    def predict(self, X) -> np.ndarray:
        """Predictions, ndarray of shape (n_trials, n_times[, n_targets])."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "coef_")
        shape = np.shape(X)
        X = _as_meg("X", self._flatten(X))
        if tuple(shape[1:-1]) != self.features_shape_ or X.shape[2] != self.n_times_:
            raise ValueError(f"X has features {tuple(shape[1:-1])} × {X.shape[2]} times but the "
                             f"model was fitted on {self.features_shape_} × {self.n_times_}.")
        prediction = _predict_sliding(self._fit, X)
        return prediction[..., 0] if self._raveled else prediction

    def transform(self, X) -> np.ndarray:
        """The decoded values, as :meth:`predict`: a pipeline step's per-time features."""
        return self.predict(X)

    def score(self, X, y) -> np.ndarray:
        """Score per time point (averaged over targets), ndarray of shape (n_times,)."""
        from sklearn.metrics import mean_squared_error, r2_score

        check_in_allowed("scoring", self.scoring, SCORINGS)
        prediction = self.predict(X)
        y_2d, _ = _as_targets("y", y, len(prediction))
        pred = prediction.reshape(len(prediction), self.n_times_, -1)
        if self.scoring == "r2":
            return np.array([r2_score(y_2d, pred[:, t]) for t in range(self.n_times_)])
        return np.array([-mean_squared_error(y_2d, pred[:, t]) for t in range(self.n_times_)])


# --------------------------------------------------------------------------- bootstrap


def _test_arrays(Y_test, predictions) -> tuple[np.ndarray, np.ndarray]:
    """Test responses (float64) and per-layer predictions of them, shapes checked."""
    Y_test = np.asarray(Y_test, dtype=np.float64)
    predictions = np.asarray(predictions)
    if predictions.ndim != 4 or predictions.shape[1:] != Y_test.shape:
        raise ValueError("'predictions' must have shape (n_layers,) + Y_test.shape = "
                         f"(n_layers, {', '.join(map(str, Y_test.shape))}); got "
                         f"{predictions.shape}.")
    return Y_test, predictions


def bootstrap_curves(Y_test, predictions, *, n_boot: int = 1000, seed: int = 0,
                     device=None, chunk: int = 100) -> np.ndarray:
    """Score time courses on test images resampled with replacement.

    Every layer is scored on the same resamples (a paired bootstrap), so differences
    between layers — and statistics of all layers, such as a temporal score — get
    confidence intervals too.

    Parameters
    ----------
    Y_test : array of shape (n_test, n_channels, n_times)
        Measured responses of the test images.
    predictions : array of shape (n_layers, n_test, n_channels, n_times)
        Each layer's predictions of ``Y_test``.
    n_boot : int
        Number of resamples.
    seed : int
        Seed of the resampling.

    Returns
    -------
    ndarray of shape (n_boot, n_layers, n_times)
        Pearson r across the resampled images, averaged over sensors.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y_test = rng.normal(size=(10, 4, 6))                        # (n_test, sensors, times)
    >>> predictions = y_test[None] + rng.normal(size=(2, 10, 4, 6))  # 2 layers
    >>> bootstrap_curves(y_test, predictions, n_boot=5).shape       # (n_boot, n_layers, n_times)
    (5, 2, 6)
    """
    Y_test, predictions = _test_arrays(Y_test, predictions)
    if n_boot < 1:
        raise ValueError(f"'n_boot' must be a positive integer; got {n_boot!r}.")
    device = resolve_device(device)
    n, c, t = Y_test.shape
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])

    def centred(a):
        a = torch.as_tensor(a.reshape(n, c * t), device=device, dtype=torch.float64)
        return a - a.mean(0)

    y = centred(Y_test)
    out = np.empty((n_boot, len(predictions), t))
    for start in range(0, n_boot, chunk):
        w = torch.as_tensor(counts[start:start + chunk], device=device, dtype=torch.float64) / n
        my, myy = w @ y, w @ (y * y)
        var_y = myy - my**2
        for layer, prediction in enumerate(predictions):
            p = centred(prediction)
            mp, mpp, myp = w @ p, w @ (p * p), w @ (y * p)
            denom = torch.sqrt((var_y * (mpp - mp**2)).clamp_min(0))
            r = torch.where(denom > 0, (myp - my * mp) / denom, torch.zeros_like(denom))
            out[start:start + chunk, layer] = r.reshape(-1, c, t).mean(1).cpu().numpy()
    return out


def peak_permutation_test(Y_test, predictions, *, n_perm: int = 200, seed: int = 0,
                          device=None, max_elements: int = 20_000_000) -> dict:
    """Does each layer predict the test responses above chance at any time point?

    A max-statistic permutation test over time: the test images are shuffled relative
    to the predictions (the same shuffles for every layer), each shuffle gives a score
    time course (Pearson r across images, averaged over sensors) and its maximum over
    time; a layer's p-value is the share of shuffles whose maximum reaches the observed
    one, ``(1 + #{null max ≥ observed max}) / (1 + n_perm)`` (computed in float32; ties
    within 1e-6 count as reached). Taking the maximum over
    time controls the family-wise error over time points, so a layer whose course never
    rises above noise has no peak to speak of — and no latency.

    Over **layers** too: ``p_fwer`` is the step-down max-statistic p-value
    (:func:`step_down_max_p`): layers are ranked by their observed peak, and the
    ``k``-th is compared with the shuffles' maximum over itself and every lower-ranked
    layer. It controls the family-wise error over layers and time points at once (of
    17 layers that predict nothing, about half the studies have one with an uncorrected
    ``p_value < 0.05``). Every layer's statistic is a Pearson r over the same test
    images, so their nulls share a scale.

    The same shuffles also test each **time point**: there the statistic is the best
    layer's score (the maximum over layers, so choosing the layer is part of the null),
    and ``p_time`` is its permutation p-value — correct it over time points (e.g.
    Benjamini–Hochberg, as :func:`gradbrain.analysis.encoding.meg_encoding` does).

    Parameters
    ----------
    Y_test : array of shape (n_test, n_channels, n_times)
        Measured responses of the test images.
    predictions : array of shape (n_layers, n_test, n_channels, n_times)
        Each layer's predictions of ``Y_test``.
    n_perm : int
        Number of shuffles (the smallest p-value is ``1 / (1 + n_perm)``; 200 resolve
        p = 0.05 to about ±0.015).
    seed : int
        Seed of the shuffles.

    Returns
    -------
    dict with ``p_value`` (n_layers,) per layer, ``p_fwer`` (n_layers,) corrected over
    layers, ``peak`` (n_layers,) the observed maximum of the course, ``null_max``
    (n_perm, n_layers), ``p_time`` (n_times,) the per-time p-value
    of the best layer and ``best_curve`` (n_times,) the best layer's score at each time.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y_test = rng.normal(size=(10, 4, 6))
    >>> predictions = np.stack([y_test, rng.normal(size=(10, 4, 6))])  # predicts, does not
    >>> out = peak_permutation_test(y_test, predictions, n_perm=20)
    >>> [round(float(p), 3) for p in out["p_value"]]               # floor 1 / 21
    [0.048, 0.619]
    >>> [round(float(p), 3) for p in out["p_fwer"]]
    [0.048, 0.619]
    """
    Y_test, predictions = _test_arrays(Y_test, predictions)
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"'n_perm' must be a positive integer; got {n_perm!r}.")
    n, c, t = Y_test.shape
    n_layers = predictions.shape[0]
    rng = np.random.default_rng(seed)
    orders = np.concatenate([np.arange(n)[None],
                             np.stack([rng.permutation(n) for _ in range(n_perm)])])
    # (B, channel × time, n_layers) → (B, n_times, n_layers) sensor-mean courses
    curves = torch.cat([r.reshape(len(r), c, t, n_layers).mean(1) for r in
                        shuffled_correlations(Y_test.reshape(n, c * t),
                                              predictions.reshape(n_layers, n, c * t), orders,
                                              device=device, max_elements=max_elements)])
    observed, null = curves[0], curves[1:]
    peak, null_max = observed.amax(0), null.amax(1)
    best, null_best = observed.amax(1), null.amax(2)
    p = (1 + (null_max >= peak - 1e-6).sum(0)) / (1 + n_perm)
    p_time = (1 + (null_best >= best - 1e-6).sum(0)) / (1 + n_perm)
    return {"p_value": p.cpu().numpy(),
            "p_fwer": step_down_max_p(peak.cpu().numpy(), null_max.cpu().numpy()),
            "peak": peak.cpu().numpy(),
            "null_max": null_max.cpu().numpy(), "p_time": p_time.cpu().numpy(),
            "best_curve": best.cpu().numpy()}


def step_down_max_p(observed, null, *, tol: float = 1e-6) -> np.ndarray:
    """Step-down max-statistic p-values, corrected over a family of tests (Westfall &
    Young 1993): strong control of the family-wise error from shared permutations.

    The tests are ranked by their observed statistic, largest first; the ``k``-th is
    compared with the maximum of the null statistics of itself and of every test ranked
    after it, ``(1 + #{max ≥ observed}) / (1 + n_perm)``, and the p-values are made
    non-decreasing along the ranking.

    Parameters
    ----------
    observed : array of shape (n_tests,)
        Observed statistics (larger is more evidence); NaN: never significant (p = 1).
    null : array of shape (n_perm, n_tests)
        The same statistics under each permutation (the same permutations for all tests).
    tol : float
        Null values within ``tol`` below an observed one count as reaching it (ties).

    Returns
    -------
    ndarray of shape (n_tests,)
        Corrected p-values, in the order of ``observed``; each ≥ its single-test one.

    Examples
    --------
    >>> import numpy as np
    >>> null = np.array([[0.1, 0.5], [0.3, 0.2], [0.6, 0.1]])
    >>> step_down_max_p(np.array([0.55, 0.15]), null).round(3).tolist()
    [0.5, 0.75]
    """
    observed = np.asarray(observed, dtype=float)
    null = np.asarray(null, dtype=float)
    if observed.ndim != 1 or null.ndim != 2 or null.shape[1] != observed.size:
        raise ValueError(f"'observed' must be (n_tests,) and 'null' (n_perm, n_tests); got "
                         f"{observed.shape} and {null.shape}.")
    finite = np.flatnonzero(np.isfinite(observed))
    out = np.ones(observed.size)
    if not finite.size:
        return out
    order = finite[np.argsort(-observed[finite], kind="stable")]
    ranked = np.where(np.isfinite(null[:, order]), null[:, order], -np.inf)
    # column k: the maximum over the tests ranked k, k + 1, ..., last
    successive = np.maximum.accumulate(ranked[:, ::-1], axis=1)[:, ::-1]
    p = (1 + (successive >= observed[order] - tol).sum(0)) / (1 + len(null))
    out[order] = np.maximum.accumulate(p)
    return out


def _latencies(times: np.ndarray, curves: np.ndarray, threshold: float) -> np.ndarray:
    """:func:`peak_latency` of every curve along the last axis; NaN where none rises above 0."""
    curves = np.asarray(curves, dtype=float)
    flat = curves.reshape(-1, curves.shape[-1])
    out = np.full(len(flat), np.nan)
    for i, curve in enumerate(flat):
        if np.nanmax(curve) > 0:
            out[i] = peak_latency(times, curve, threshold)
    return out.reshape(curves.shape[:-1])


# --------------------------------------------------------------------------- a study


def summarize_partition(part: dict) -> str:
    """What :func:`gradbrain.analysis.encoding.meg_partition` found, in words (Markdown bullets).

    For each unique part: its largest value after image onset, when and in which layer,
    against the pre-stimulus range; and how many sensors were kept per time point.

    Parameters
    ----------
    part : dict
        Output of :func:`gradbrain.analysis.encoding.meg_partition`.
    """
    times, layers = np.asarray(part["times"], float), part["layers"]
    after = times >= 0
    kept = np.asarray(part["n_selected"])[after]
    n_channels = len(part["selected"])
    rule = ("every sensor" if part["min_cv_r2"] is None else
            f"sensors whose best joint model has a training cross-validated R² above "
            f"{part['min_cv_r2']:g}")
    score = "sign(r)·r²" if part["score"] == "signed_r2" else "R²"
    lines = [f"- Averaged over {rule}: a median of {np.median(kept):.0f} of {n_channels} "
             f"per time point after onset (test {score})."]
    for name, key in (("gradients add to their activations", "unique_gradient"),
                      ("activations add to their gradients", "unique_activation")):
        course = np.asarray(part[key], float)[:, after]
        if not np.isfinite(course).any():
            lines.append(f"- What {name}: no sensor kept after onset.")
            continue
        layer, time = np.unravel_index(np.nanargmax(course), course.shape)
        bound = part["prestimulus"][key]
        against = (f", {course[layer, time] / bound:.1f} × the pre-stimulus range "
                   f"(±{bound:.3f})" if np.isfinite(bound) and bound > 0 else "")
        lines.append(f"- What {name}: at most {course[layer, time]:.3f} ({layers[layer]}, "
                     f"{times[after][time]:.0f} ms){against}.")
    return "\n".join(lines)


#: Study-level functions that moved to :mod:`gradbrain.analysis.encoding` (old names work,
#: with a DeprecationWarning, for one release).
__getattr__ = moved_names(__name__, {name: "gradbrain.analysis.encoding" for name in (
    "meg_encoding", "meg_partition", "_meg_split")})
