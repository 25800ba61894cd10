"""Time-resolved MEG encoding: when does each layer's signal best predict the brain?

The encoding model of one layer maps its features onto every sensor at every time point.
All (sensor × time) targets form ONE ridge problem: the features' factorisation is
shared by every target, and each target gets its own alpha (see :mod:`gradbrain.ridge`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .ridge import DEFAULT_ALPHAS, RidgeCV, pearson_r

__all__ = ["average_by_image", "encode_time_resolved", "peak_latency"]


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
                         device=None, dtype=None, targets_batch=None) -> dict:
    """Encode every sensor at every time point from one feature matrix, as one problem.

    Parameters
    ----------
    X_train : array of shape (n_train, n_features)
    Y_train : array of shape (n_train, n_channels, n_times)
        MEG per training image (e.g. :func:`average_by_image`).
    X_test : array of shape (n_test, n_features)
    Y_test : array of shape (n_test, n_channels, n_times)

    Returns
    -------
    dict with ``r`` (n_channels, n_times) Pearson correlation on the test images and
    ``alpha`` (n_channels, n_times) the alpha chosen per sensor and time point.
    """
    Y_train, Y_test = np.asarray(Y_train), np.asarray(Y_test)
    if Y_train.ndim != 3 or Y_test.ndim != 3 or Y_train.shape[1:] != Y_test.shape[1:]:
        raise ValueError(
            "'Y_train' and 'Y_test' must have shape (n_images, n_channels, n_times) with the "
            f"same channels and times; got {Y_train.shape} and {Y_test.shape}."
        )
    shape = Y_train.shape[1:]
    # MEG in tesla is ~1e-13: rescale so float32 sums stay well inside its range
    scale = float(np.abs(Y_train).max()) or 1.0
    model = RidgeCV(alphas=alphas, cv=cv, device=device, dtype=dtype,
                    targets_batch=targets_batch)
    model.fit(X_train, Y_train.reshape(len(Y_train), -1) / scale)
    r = pearson_r(Y_test.reshape(len(Y_test), -1), model.predict(X_test))
    return {"r": r.reshape(shape), "alpha": model.alpha_.reshape(shape)}


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
    """
    times, curve = np.asarray(times, float), np.asarray(curve, float)
    if times.shape != curve.shape or curve.ndim != 1:
        raise ValueError(f"'times' and 'curve' must be 1-D of equal length; got {times.shape} "
                         f"and {curve.shape}.")
    if not 0 < threshold <= 1:
        raise ValueError(f"'threshold' must be in (0, 1]; got {threshold}.")
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
