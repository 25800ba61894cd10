"""Encoders as instruments: predict a study's brain responses to images nobody showed it.

An :class:`Encoder` is a fitted encoding model of one study — per target (an fMRI
vertex, or an MEG sensor × time point), the layer chosen on the training images'
cross-validation and its ridge read-out — that keeps its model, so that it can predict
the response to **any** image: :meth:`Encoder.predict` extracts the same features (same
weights, pooling, loss and loss heads) and reads them out. It can be built from a
layer's **activations** or from its backpropagated **gradients**. On those predictions
one runs in-silico experiments (Meta's TRIBE v2 made the idea central): contrasts of
image sets (:func:`contrast`; intact vs phase-:func:`scramble`\\ d, one category vs the
rest) and preferred images (:func:`synthesize`, gradient ascent on pixels; for a
gradient encoder a second-order derivative).

On a simulated study every in-silico answer can be checked:
:func:`gradbrain.data.simulated.planted_response` gives the response the planted truth
gives to the same images.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from tqdm import tqdm

from .. import __version__
from .._utils import atomic_path, check_in_allowed, resolve_device
from ..data import ImageSet, load_folder
from ..features import (LOSSES, Features, beyond_activations, differentiable_features,
                        extract)
from ..models import LoadedModel
from ..ridge import DEFAULT_ALPHAS, RidgeCV, pearson_r, standardizer
from .encoding import _meg_split, check_same_images

__all__ = ["Encoder", "fit_encoder", "scramble", "phase_scramble", "contrast", "Contrast",
           "contrast_by_hierarchy", "contrast_over_time", "hierarchy_bins", "synthesize",
           "SIGNALS", "MODALITIES"]

SIGNALS = ("activation", "gradient")
MODALITIES = ("fmri", "meg")
GRADIENT_PARTS = ("whole", "unique")
_FORMAT = "gradbrain-encoder-1"


# --------------------------------------------------------------------------- the encoder


@dataclass
class _Readout:
    """One layer's part of an encoder: its targets and their ridge read-out."""

    targets: np.ndarray        # (n_l,) target indices
    coef: np.ndarray           # (n_l, n_features) on standardised features, float32
    intercept: np.ndarray      # (n_l,)
    mean: np.ndarray           # (n_features,) training mean of the layer's features
    scale: np.ndarray          # (n_features,) training sd (inf where constant: feature → 0)


@dataclass
class _Residualizer:
    """What the activations of all layers predict of one layer's gradient (the map that
    :func:`gradbrain.features.beyond_activations` fitted on the training images)."""

    act_mean: list             # per layer (p_k,) training mean of the activations
    act_scale: list            # per layer (p_k,) training sd × √p_k (inf where constant)
    x_mean: np.ndarray         # (P,) mean of the scaled activations over training images
    weights: np.ndarray        # (P, p_l) ridge weights onto the z-scored gradient
    y_mean: np.ndarray         # (p_l,) training mean of the z-scored gradient
    g_mean: np.ndarray         # (p_l,) training mean of the gradient
    g_scale: np.ndarray        # (p_l,) its sd, 0 where constant (nothing predicted)


@dataclass
class Encoder:
    """A fitted encoding model that predicts a study's responses to any image.

    Build it with :func:`fit_encoder`; save and load it with :meth:`save` /
    :meth:`load`.

    Attributes
    ----------
    net : LoadedModel or None
        The model whose features it reads (None until :meth:`load` is given one).
    signal : {"activation", "gradient"}
    loss : str
        Gradient loss (also recorded for activation encoders, unused there).
    modality : {"fmri", "meg"}
    gradient_part : {"whole", "unique"}
    layer_names : list of str
        The model's layers, in forward order.
    target_layer : ndarray of int, shape (n_targets,)
        Index into ``layer_names`` of each target's layer.
    alphas : ndarray of shape (n_targets,)
        Each target's ridge penalty (on standardised features).
    targets : DataFrame
        One row per target: fMRI ``study_index`` (position among the study's
        vertices), ``vertex``, ``hemi``, ``hierarchy`` (mm from V1), ``noise_ceiling``
        (%); MEG ``channel``, ``time_ms``.
    scores : dict of str to ndarray of shape (n_targets,)
        ``cv_r2``: the chosen layer's cross-validated R² on the training images;
        ``test_r``: Pearson r of the prediction on the study's test images.
    meta : dict
        Model, weights (words and ``weights_digest``), study, signal, loss, pool, CV
        folds, sizes, library version.
    """

    net: LoadedModel | None
    signal: str
    loss: str
    modality: str
    gradient_part: str
    pool: str
    loss_seed: int
    layer_names: list
    target_layer: np.ndarray
    alphas: np.ndarray
    targets: pd.DataFrame
    scores: dict
    meta: dict
    readouts: dict = field(repr=False)          # layer → _Readout
    residualizers: dict = field(default_factory=dict, repr=False)  # layer → _Residualizer
    meg_shape: tuple | None = None              # (n_channels, n_times)

    def __repr__(self) -> str:
        return (f"Encoder({self.signal}{'' if self.signal == 'activation' else f' ({self.loss})'}"
                f", {self.modality}, {self.meta.get('model')}, {self.n_targets} targets, "
                f"median test r {np.nanmedian(self.scores['test_r']):.2f})")

    @property
    def n_targets(self) -> int:
        return len(self.target_layer)

    @property
    def layers(self) -> np.ndarray:
        """Each target's layer name, shape (n_targets,)."""
        return np.asarray(self.layer_names, dtype=object)[self.target_layer]

    # ------------------------------------------------------------------ predicting

    def _check_net(self) -> LoadedModel:
        if self.net is None:
            raise ValueError("This encoder has no model: load it with Encoder.load(path, net) "
                             "and the model it was fitted with.")
        return self.net

    def features(self, images, *, batch_size: int = 16, device=None, cache=True,
                 progress: bool = False) -> dict[str, np.ndarray]:
        """The features this encoder reads of ``images``: layer → (n_images, dim),
        after residualising for ``gradient_part="unique"`` (not yet standardised)."""
        net = self._check_net()
        if isinstance(images, (str, os.PathLike)):
            images = load_folder(images)
        losses = () if self.signal == "activation" else (self.loss,)
        if self.gradient_part == "unique":
            losses = (self.loss,)
        features = extract(net, images, losses=losses, pool=self.pool, batch_size=batch_size,
                           device=device, cache=cache, loss_seed=self.loss_seed,
                           progress=progress)
        if self.signal == "activation":
            return dict(features.activations)
        grads = features.gradients[self.loss]
        if self.gradient_part == "whole":
            return dict(grads)
        acts = [np.asarray(features.activations[l], dtype=np.float64) for l in self.layer_names]
        return {l: self._residual(l, acts, np.asarray(grads[l], dtype=np.float64))
                for l in self.readouts}

    def _residual(self, layer, acts, grad):
        r = self.residualizers[layer]
        x = np.concatenate([(a - m) / s for a, m, s in zip(acts, r.act_mean, r.act_scale)], 1)
        predicted = (x - r.x_mean) @ r.weights + r.y_mean
        return grad - (r.g_mean + r.g_scale * predicted)

    def predict(self, images, *, batch_size: int = 16, device=None, cache=True,
                progress: bool = False) -> np.ndarray:
        """Predicted responses to any images.

        Parameters
        ----------
        images : ImageSet, folder, sequence of PIL images or preprocessed float tensor
            As :func:`gradbrain.features.extract` takes them, or the path of a folder of
            images (:func:`gradbrain.data.load_folder`); any size (the model's own
            preprocessing resizes them).
        batch_size, device, cache, progress
            Of the feature extraction.

        Returns
        -------
        ndarray
            fMRI: (n_images, n_targets), in the units of the study's betas. MEG:
            (n_images, n_channels, n_times), in the units of its epochs (T).
        """
        if isinstance(images, ImageSet) and len(images) == 0:
            raise ValueError("'images' is empty; give at least one image.")
        per_layer = self.features(images, batch_size=batch_size, device=device, cache=cache,
                                  progress=progress)
        n_images = len(next(iter(per_layer.values())))
        out = np.zeros((n_images, self.n_targets))
        for layer, r in self.readouts.items():
            z = (np.asarray(per_layer[layer], dtype=np.float64) - r.mean) / r.scale
            out[:, r.targets] = z @ r.coef.T.astype(np.float64) + r.intercept
        return out.reshape((n_images, *self.meg_shape)) if self.meg_shape else out

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write to one ``.npz`` file (arrays + the metadata as JSON), atomically.

        Raises
        ------
        FileExistsError
            ``path`` exists and is not a saved encoder (it is not this program's to
            replace).
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        if path.exists() and not _is_encoder_file(path):
            raise FileExistsError(f"{str(path)!r} exists and is not a saved encoder: "
                                  "Encoder.save would replace it. Choose another path.")
        arrays = {"target_layer": self.target_layer, "alphas": self.alphas,
                  **{f"score_{k}": v for k, v in self.scores.items()}}
        for name in self.targets.columns:
            column = self.targets[name].to_numpy()
            arrays[f"target_{name}"] = column.astype(str) if column.dtype == object else column
        for i, (layer, r) in enumerate(self.readouts.items()):
            for key in ("targets", "coef", "intercept", "mean", "scale"):
                arrays[f"readout{i}_{key}"] = getattr(r, key)
        for i, (layer, r) in enumerate(self.residualizers.items()):
            for key in ("x_mean", "weights", "y_mean", "g_mean", "g_scale"):
                arrays[f"residual{i}_{key}"] = getattr(r, key)
            for k, (m, s) in enumerate(zip(r.act_mean, r.act_scale)):
                arrays[f"residual{i}_act{k}_mean"], arrays[f"residual{i}_act{k}_scale"] = m, s
        header = {
            "format": _FORMAT, "signal": self.signal, "loss": self.loss,
            "modality": self.modality, "gradient_part": self.gradient_part, "pool": self.pool,
            "loss_seed": self.loss_seed, "layer_names": list(self.layer_names),
            "readout_layers": list(self.readouts), "residual_layers": list(self.residualizers),
            "target_columns": list(self.targets.columns),
            "meg_shape": list(self.meg_shape) if self.meg_shape else None, "meta": self.meta,
        }
        arrays["header"] = np.array(json.dumps(header, default=_json_default))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, net: LoadedModel | None = None) -> "Encoder":
        """Read an encoder written by :meth:`save`.

        Parameters
        ----------
        path : path-like
        net : LoadedModel or None
            The model it was fitted with (needed to predict). A model whose weights
            differ from the encoder's (``meta["weights_digest"]``) is refused.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No saved encoder at {str(path)!r}.")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            header = json.loads(str(arrays.pop("header")))
            if header.get("format") != _FORMAT:
                raise ValueError(f"format {header.get('format')!r}")
        except Exception as err:
            raise ValueError(f"{str(path)!r} is not a saved encoder, or it is damaged "
                             f"({type(err).__name__}: {err}); refit it with fit_encoder.") from err
        meta = header["meta"]
        if net is not None:
            _check_same_model(net, meta)
        readouts = {
            layer: _Readout(*(arrays[f"readout{i}_{k}"]
                              for k in ("targets", "coef", "intercept", "mean", "scale")))
            for i, layer in enumerate(header["readout_layers"])}
        residualizers = {}
        for i, layer in enumerate(header["residual_layers"]):
            n = len(header["layer_names"])
            residualizers[layer] = _Residualizer(
                act_mean=[arrays[f"residual{i}_act{k}_mean"] for k in range(n)],
                act_scale=[arrays[f"residual{i}_act{k}_scale"] for k in range(n)],
                **{k: arrays[f"residual{i}_{k}"]
                   for k in ("x_mean", "weights", "y_mean", "g_mean", "g_scale")})
        targets = pd.DataFrame({c: arrays[f"target_{c}"] for c in header["target_columns"]})
        return cls(net=net, signal=header["signal"], loss=header["loss"],
                   modality=header["modality"], gradient_part=header["gradient_part"],
                   pool=header["pool"], loss_seed=header["loss_seed"],
                   layer_names=header["layer_names"], target_layer=arrays["target_layer"],
                   alphas=arrays["alphas"], targets=targets,
                   scores={k[len("score_"):]: v for k, v in arrays.items()
                           if k.startswith("score_")},
                   meta=meta, readouts=readouts, residualizers=residualizers,
                   meg_shape=tuple(header["meg_shape"]) if header["meg_shape"] else None)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _is_encoder_file(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            return "header" in data.files and \
                json.loads(str(data["header"])).get("format") == _FORMAT
    except Exception:
        return False


def _check_same_model(net: LoadedModel, meta: dict) -> None:
    if not isinstance(net, LoadedModel):
        raise TypeError(f"'net' must be a gradbrain.models.LoadedModel; got "
                        f"{type(net).__name__}.")
    if net.name != meta["model"] or net.fingerprint() != meta["weights_digest"]:
        raise ValueError(
            f"This encoder was fitted on {meta['model']} with {meta['weights']} (weights digest "
            f"{meta['weights_digest'][:12]}…); the model given is {net.name} with {net.weights} "
            f"(digest {net.fingerprint()[:12]}…). Its read-outs mean nothing on other "
            "weights: load the model it was fitted with, or refit.")


# --------------------------------------------------------------------------- fitting


def _check_fit_inputs(study, net, signal, loss, modality, gradient_part, cv, min_noise_ceiling):
    check_in_allowed("signal", signal, SIGNALS)
    check_in_allowed("modality", modality, MODALITIES)
    check_in_allowed("gradient_part", gradient_part, GRADIENT_PARTS)
    check_in_allowed("loss", loss, LOSSES)
    if gradient_part == "unique" and signal != "gradient":
        raise ValueError("gradient_part='unique' is the part of gradients beyond activations: "
                         "it needs signal='gradient'.")
    if not isinstance(net, LoadedModel):
        raise TypeError(f"'net' must be a gradbrain.models.LoadedModel "
                        f"(gradbrain.models.load); got {type(net).__name__}.")
    if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ValueError(f"'cv' must be an integer >= 2 (folds of the training images); got "
                         f"{cv!r}.")
    if isinstance(min_noise_ceiling, bool) or not isinstance(
            min_noise_ceiling, (int, float, np.floating)) or not 0 <= min_noise_ceiling < 100:
        raise ValueError(f"'min_noise_ceiling' must be a noise ceiling in percent, in [0, 100); "
                         f"got {min_noise_ceiling!r}.")
    if modality == "fmri" and study.betas is None:
        raise ValueError(f"Study {study.name!r} has no fMRI data (betas is None); use "
                         "modality='meg'.")
    if modality == "meg" and study.epochs is None:
        raise ValueError(f"Study {study.name!r} has no MEG data (epochs is None); use "
                         "modality='fmri'.")
    if study.images is None:
        raise ValueError(f"Study {study.name!r} has no images: an encoder needs them to "
                         "extract features.")


def _fmri_targets(study, min_noise_ceiling):
    """Training/test rows and responses of the reliable vertices, and their table."""
    train = np.flatnonzero(study.split == "train")
    test = np.flatnonzero(study.split == "test")
    Y = study.mean_betas()
    nc = study.noise_ceiling()
    keep = np.isfinite(Y).all(0) & np.isfinite(nc) & (nc >= min_noise_ceiling)
    if not keep.any():
        raise ValueError(f"No vertex of study {study.name!r} has a noise ceiling of at least "
                         f"{min_noise_ceiling}% (and finite data): lower 'min_noise_ceiling'.")
    table = pd.DataFrame({"study_index": np.flatnonzero(keep),
                          "vertex": np.asarray(study.vertices)[keep],
                          "hemi": np.asarray(study.hemi).astype(str)[keep],
                          "hierarchy": np.asarray(study.hierarchy, dtype=float)[keep],
                          "noise_ceiling": nc[keep]})
    return train, test, Y[train][:, keep], Y[test][:, keep], table, None


def _meg_targets(study, cv):
    train, test, Y_train, Y_test = _meg_split(study, cv)
    n_channels, n_times = Y_train.shape[1:]
    times = 1000 * study.epochs.times
    table = pd.DataFrame({"channel": np.repeat(study.epochs.ch_names, n_times),
                          "time_ms": np.tile(times, n_channels)})
    return (train, test, Y_train.reshape(len(train), -1), Y_test.reshape(len(test), -1),
            table, (n_channels, n_times))


def _fit_residualizers(features: Features, residuals: Features, loss: str,
                       train: np.ndarray) -> dict:
    """The map :func:`beyond_activations` fitted on all training images, per layer, in
    closed form (ridge with its chosen alpha), so that new images get the residual the
    study's test images got."""
    rows = np.flatnonzero(train)
    acts = [np.asarray(features.activations[l], dtype=np.float64) for l in features.layers]
    act_mean, act_scale, blocks = [], [], []
    for a in acts:
        m, s = a[rows].mean(0), a[rows].std(0)
        scale = np.where(s > 0, s, np.inf) * np.sqrt(a.shape[1])
        act_mean.append(m)
        act_scale.append(scale)
        blocks.append((a[rows] - m) / scale)
    X = np.concatenate(blocks, 1)
    x_mean = X.mean(0)
    Xc = torch.as_tensor(X - x_mean, dtype=torch.float64)
    eigval, eigvec = torch.linalg.eigh(Xc @ Xc.T)
    eigval = eigval.clamp_min(0)
    out = {}
    for layer in features.layers:
        alpha = residuals.meta["residual_alpha"][loss][layer]
        G = np.asarray(features.gradients[loss][layer], dtype=np.float64)
        g_mean, g_sd = G[rows].mean(0), G[rows].std(0)
        Y = (G[rows] - g_mean) / np.where(g_sd > 0, g_sd, 1.0) * (g_sd > 0)
        y_mean = Y.mean(0)
        dual = eigvec @ ((eigvec.T @ torch.as_tensor(Y - y_mean)) / (eigval + alpha)[:, None])
        weights = (Xc.T @ dual).numpy()                                   # (P, p_l)
        out[layer] = _Residualizer(act_mean=act_mean, act_scale=act_scale, x_mean=x_mean,
                                   weights=weights, y_mean=y_mean, g_mean=g_mean,
                                   g_scale=g_sd * (g_sd > 0))
    return out


def fit_encoder(study, net: LoadedModel, *, signal: str = "activation", loss: str = "ce",
                modality: str = "fmri", gradient_part: str = "whole", cv: int = 5,
                alphas=DEFAULT_ALPHAS, min_noise_ceiling: float = 10.0, features=None,
                batch_size: int = 16, device=None, cache=True,
                progress: bool = False) -> Encoder:
    """Fit an encoder of a study's responses that can predict them for any image.

    Every layer's features (activations, or gradients of ``loss``) are standardised
    with the training images' statistics and read out by ridge regression with one
    penalty per target (:class:`gradbrain.ridge.RidgeCV`, ``cv`` folds of the training
    images). Each target keeps the layer with the best cross-validated score on the
    training images — as chapter 04 chooses a vertex's layer, without the test images —
    and the study's test images score the result (``scores["test_r"]``).

    Parameters
    ----------
    study : Study
    net : LoadedModel
        The model whose features are read (:func:`gradbrain.models.load`).
    signal : {"activation", "gradient"}
    loss : {"dino", "ce", "proj"}
        Gradient loss (see :mod:`gradbrain.features`).
    modality : {"fmri", "meg"}
        fMRI targets are the study's vertices with a noise ceiling of at least
        ``min_noise_ceiling`` (%); MEG targets are every sensor × time point of the
        responses averaged over an image's repeats.
    gradient_part : {"whole", "unique"}
        Gradients as extracted, or their part beyond what all layers' activations
        predict (:func:`gradbrain.features.beyond_activations`; new images get the
        residual of the map fitted on the training images).
    cv : int
        Folds of the training images.
    alphas : array-like
        Ridge penalties to choose from.
    features : Features or None
        ``net``'s features on ``study.images`` (extracted when None).
    batch_size, device, cache, progress
        Of the feature extraction and the ridge.

    Returns
    -------
    Encoder
    """
    _check_fit_inputs(study, net, signal, loss, modality, gradient_part, cv, min_noise_ceiling)
    losses = () if signal == "activation" else (loss,)
    if features is None:
        features = extract(net, study.images, losses=losses, pool="mean", device=device,
                           cache=cache, batch_size=batch_size, progress=progress)
    else:
        check_same_images(study, features)
        if features.model != net.name or features.weights != net.weights:
            raise ValueError(f"'features' are of {features.model} ({features.weights}), not of "
                             f"'net' {net.name} ({net.weights}); extract them with 'net'.")
        if signal == "gradient" and loss not in features.gradients:
            raise ValueError(f"'features' hold no gradients of loss {loss!r} (they have "
                             f"{features.losses}); extract them with losses=({loss!r},).")
    if modality == "fmri":
        train, test, Y_train, Y_test, table, meg_shape = _fmri_targets(study, min_noise_ceiling)
    else:
        train, test, Y_train, Y_test, table, meg_shape = _meg_targets(study, cv)
    if len(train) < 2 * cv or len(test) < 2:
        raise ValueError(f"The study needs at least {2 * cv} training and 2 test images; got "
                         f"{len(train)} and {len(test)}.")
    residualizers = {}
    if signal == "activation":
        per_layer = features.activations
    elif gradient_part == "unique":
        mask = np.zeros(features.n_images, bool)
        mask[train] = True
        residuals = beyond_activations(features, mask, loss=loss, cv=cv, device=device)
        per_layer = residuals.gradients[loss]
        residualizers = _fit_residualizers(features, residuals, loss, mask)
    else:
        per_layer = features.gradients[loss]

    layers = list(features.layers)
    n_targets = Y_train.shape[1]
    best = np.full(n_targets, -np.inf)
    target_layer = np.zeros(n_targets, dtype=int)
    alpha = np.full(n_targets, np.nan)
    kept: dict = {}
    prediction = np.zeros((len(test), n_targets))
    device_ = resolve_device(device)
    for k, layer in enumerate(tqdm(layers, desc=f"{signal} encoder ({modality})",
                                   disable=not progress)):
        X = np.asarray(per_layer[layer])
        mean, scale = standardizer(X[train])
        Z = (X - mean) / scale
        model = RidgeCV(alphas=alphas, cv=cv, device=device_, dtype=torch.float32)
        model.fit(Z[train].astype(np.float32), Y_train.astype(np.float32))
        score = np.atleast_1d(model.best_score_)
        wins = score > best
        if not wins.any():
            continue
        best[wins], target_layer[wins] = score[wins], k
        alpha[wins] = np.atleast_1d(model.alpha_)[wins]
        coef = np.atleast_2d(model.coef_)
        intercept = np.atleast_1d(model.intercept_)
        prediction[:, wins] = Z[test] @ coef[wins].T.astype(np.float64) + intercept[wins]
        for other in list(kept):   # targets this layer takes from earlier ones
            r = kept[other]
            stay = ~wins[r.targets]
            kept[other] = _Readout(r.targets[stay], r.coef[stay], r.intercept[stay], r.mean,
                                   r.scale)
            if not stay.any():
                del kept[other]
        kept[layer] = _Readout(np.flatnonzero(wins), coef[wins].astype(np.float32),
                               intercept[wins].astype(np.float64), mean, scale)
    variance = Y_train.var(0)
    cv_r2 = np.where(variance > 0, 1 + best / np.where(variance > 0, variance, 1), np.nan)
    test_r = pearson_r(Y_test, prediction)
    meta = {
        "model": net.name, "weights": net.weights, "weights_digest": net.fingerprint(),
        "study": study.name, "study_digest": study.digest(), "signal": signal, "loss": loss,
        "modality": modality, "gradient_part": gradient_part, "pool": "mean", "cv": int(cv),
        "alphas": [float(a) for a in np.atleast_1d(alphas)],
        "min_noise_ceiling": float(min_noise_ceiling) if modality == "fmri" else None,
        "n_train": int(len(train)), "n_test": int(len(test)), "n_targets": int(n_targets),
        "median_test_r": float(np.nanmedian(test_r)), "gradbrain": __version__,
    }
    return Encoder(net=net, signal=signal, loss=loss, modality=modality,
                   gradient_part=gradient_part, pool="mean", loss_seed=0, layer_names=layers,
                   target_layer=target_layer, alphas=alpha, targets=table,
                   scores={"cv_r2": cv_r2, "test_r": test_r}, meta=meta,
                   readouts={l: kept[l] for l in layers if l in kept},
                   residualizers=residualizers, meg_shape=meg_shape)


# --------------------------------------------------------------------------- stimuli


def phase_scramble(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image with its Fourier phases randomised and its amplitude spectrum kept.

    The same random phase field is added to every colour channel (so colours stay
    coherent); it is the phase of the Fourier transform of real white noise, whose
    Hermitian symmetry keeps the result real.

    Parameters
    ----------
    image : ndarray of shape (height, width, channels) or (height, width)
    rng : numpy Generator

    Returns
    -------
    ndarray of float64, same shape: each channel's amplitude spectrum equals the
    input's (to float rounding); values may leave the input's range.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
        raise ValueError(f"'image' must be (height, width[, channels]) with at least 2 pixels "
                         f"per side; got shape {image.shape}.")
    phase = np.angle(np.fft.fft2(rng.random(image.shape[:2])))
    spectrum = np.fft.fft2(image, axes=(0, 1))
    if image.ndim == 3:
        phase = phase[:, :, None]
    return np.fft.ifft2(spectrum * np.exp(1j * phase), axes=(0, 1)).real


def scramble(images: ImageSet, seed: int = 0) -> ImageSet:
    """Phase-scrambled versions of images: same amplitude spectrum, random phases.

    The classic control of object localisers (intact vs scrambled objects): low-level
    power is kept, shapes and objects are gone. Each image gets its own random phases
    (drawn from ``seed``); the result is rounded and clipped to 8-bit RGB, the only
    form the models take (:func:`phase_scramble` gives the exact float result). Clipping
    bends the spectrum a little: on the embedded images 0.3–23 % of the scrambled
    pixels leave 0…255, and the 8-bit amplitude spectrum correlates 0.96–1.00 with the
    original's.

    Parameters
    ----------
    images : ImageSet
    seed : int

    Returns
    -------
    ImageSet
        Same size and labels; ids get the suffix ``"-scrambled"``.
    """
    if not isinstance(images, ImageSet):
        raise TypeError(f"'images' must be an ImageSet; got {type(images).__name__}.")
    if len(images) == 0:
        raise ValueError("'images' is empty; give at least one image.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"'seed' must be a non-negative integer; got {seed!r}.")
    rng = np.random.default_rng(seed)
    out = [Image.fromarray(np.clip(np.rint(phase_scramble(np.asarray(im.convert("RGB")), rng)),
                                   0, 255).astype(np.uint8)) for im in images.images]
    return ImageSet(images=out, ids=[f"{i}-scrambled" for i in images.ids],
                    labels=list(images.labels),
                    sources=[f"phase-scrambled {s}" for s in images.sources])


# --------------------------------------------------------------------------- contrasts


class Contrast(NamedTuple):
    """A per-target contrast of predicted responses, with its bootstrap interval.

    Each field has the shape of one image's prediction: (n_targets,) for fMRI,
    (n_channels, n_times) for MEG, in the responses' units.
    """

    difference: np.ndarray
    low: np.ndarray
    high: np.ndarray


def contrast(encoder: Encoder, images_a, images_b, *, paired: bool = False,
             n_boot: int = 1000, ci: float = 0.95, seed: int = 0, predictions=None,
             **predict_kwargs) -> Contrast:
    """Predicted mean response to ``images_a`` minus that to ``images_b``, per target.

    Parameters
    ----------
    encoder : Encoder
    images_a, images_b : ImageSet
        Two image sets (e.g. intact images and their :func:`scramble`\\ d versions).
    paired : bool
        The sets are paired image by image (same length; the interval then resamples
        pairs), else resampled independently.
    n_boot, ci, seed
        Percentile bootstrap over images (:func:`scipy.stats.bootstrap`).
    predictions : tuple of two arrays or None
        ``encoder.predict`` of the two sets, when already computed.

    Returns
    -------
    Contrast
        ``difference``, ``low``, ``high``.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"'n_boot' must be a positive integer; got {n_boot!r}.")
    if not isinstance(ci, float) or not 0 < ci < 1:
        raise ValueError(f"'ci' must be a float in (0, 1), e.g. 0.95; got {ci!r}.")
    if predictions is None:
        a = encoder.predict(images_a, **predict_kwargs)
        b = encoder.predict(images_b, **predict_kwargs)
    else:
        a, b = (np.asarray(p, dtype=float) for p in predictions)
    shape = a.shape[1:]
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"The two sets' predictions have different targets: {a.shape} and "
                         f"{b.shape}.")
    if paired and len(a) != len(b):
        raise ValueError(f"paired=True needs sets of the same length; got {len(a)} and "
                         f"{len(b)} images.")
    if min(len(a), len(b)) < 2:
        raise ValueError("Each set needs at least 2 images for a bootstrap interval.")
    rng = np.random.default_rng(seed)
    kwargs = dict(n_resamples=n_boot, confidence_level=ci, method="percentile", axis=0,
                  random_state=rng, vectorized=True, batch=max(1, 2_000_000 // a.size))
    if paired:
        diff = a - b
        result = stats.bootstrap((diff,), np.mean, **kwargs)
        difference = diff.mean(0)
    else:
        result = stats.bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                                 **kwargs)
        difference = a.mean(0) - b.mean(0)
    low, high = result.confidence_interval
    return Contrast(difference.reshape(shape), np.asarray(low).reshape(shape),
                    np.asarray(high).reshape(shape))


def hierarchy_bins(hierarchy, n_bins: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Quantile bins of a hierarchy coordinate: each target's bin (0 … n_bins−1) and
    each bin's median coordinate.

    Parameters
    ----------
    hierarchy : array of shape (n_targets,)
        E.g. distance from V1 (mm).
    n_bins : int

    Returns
    -------
    (bins, centres) : ndarray of int (n_targets,), ndarray (n_bins,) in the units given
    """
    hierarchy = np.asarray(hierarchy, dtype=float)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1 \
            or n_bins > len(hierarchy):
        raise ValueError(f"'n_bins' must be an integer in [1, {len(hierarchy)}]; got "
                         f"{n_bins!r}.")
    edges = np.quantile(hierarchy, np.linspace(0, 1, n_bins + 1))
    bins = np.clip(np.searchsorted(edges[1:-1], hierarchy, side="right"), 0, n_bins - 1)
    centres = np.array([np.median(hierarchy[bins == b]) if np.any(bins == b) else np.nan
                        for b in range(n_bins)])
    return bins, centres


def contrast_by_hierarchy(predictions_a, predictions_b, hierarchy, *, n_bins: int = 5,
                          paired: bool = False, n_boot: int = 1000, ci: float = 0.95,
                          seed: int = 0) -> pd.DataFrame:
    """A contrast of two image sets' responses, averaged over the targets of each
    hierarchy bin, with bootstrap intervals over images.

    Parameters
    ----------
    predictions_a, predictions_b : arrays of shape (n_images_a, n_targets), (n_images_b, n_targets)
        Responses (predicted, or planted) to the two sets.
    hierarchy : array of shape (n_targets,)
        The targets' hierarchy coordinate (mm from V1).
    n_bins, paired, n_boot, ci, seed
        As :func:`hierarchy_bins` and :func:`contrast` take them.

    Returns
    -------
    DataFrame
        One row per bin: ``bin``, ``distance_mm`` (median of the bin), ``n_targets``,
        ``difference``, ``low``, ``high`` (mean of a − mean of b, in the responses' units).
    """
    a, b = np.asarray(predictions_a, float), np.asarray(predictions_b, float)
    bins, centres = hierarchy_bins(hierarchy, n_bins)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != len(bins) or b.shape[1] != len(bins):
        raise ValueError(f"'predictions_a' and 'predictions_b' must be (n_images, n_targets) "
                         f"with {len(bins)} targets (one per hierarchy value); got {a.shape} "
                         f"and {b.shape}.")
    pooled = [np.stack([x[:, bins == k].mean(1) for k in range(n_bins)], 1) for x in (a, b)]
    result = contrast(None, None, None, predictions=pooled, paired=paired, n_boot=n_boot,
                      ci=ci, seed=seed)
    return pd.DataFrame({"bin": np.arange(n_bins), "distance_mm": centres,
                         "n_targets": np.bincount(bins, minlength=n_bins),
                         "difference": result.difference, "low": result.low,
                         "high": result.high})


def contrast_over_time(predictions_a, predictions_b, times, *, paired: bool = False,
                       n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """The size of an MEG contrast over time: the root mean square over sensors of the
    mean difference between two image sets' responses, with bootstrap intervals over
    images.

    Parameters
    ----------
    predictions_a, predictions_b : arrays of shape (n_images, n_channels, n_times)
    times : array of shape (n_times,)
        ms.
    paired, n_boot, ci, seed
        As :func:`contrast` takes them (percentile :func:`scipy.stats.bootstrap`).

    Returns
    -------
    DataFrame with ``time_ms``, ``rms``, ``low``, ``high`` (in the responses' units).
    """
    a, b = np.asarray(predictions_a, float), np.asarray(predictions_b, float)
    times = np.asarray(times, float)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:] or a.shape[2] != len(times):
        raise ValueError(f"'predictions_a' and 'predictions_b' must be (n_images, n_channels, "
                         f"n_times) with {len(times)} times; got {a.shape} and {b.shape}.")
    if paired and len(a) != len(b):
        raise ValueError(f"paired=True needs sets of the same length; got {len(a)} and "
                         f"{len(b)} images.")
    def rms(x, y, axis=0):   # over sensors, of the difference of the image means
        return np.sqrt(((x.mean(axis) - y.mean(axis)) ** 2).mean(0))  # sensors: first left

    result = stats.bootstrap((a, b), rms, paired=paired, vectorized=True, axis=0,
                             n_resamples=n_boot, confidence_level=ci, method="percentile",
                             random_state=np.random.default_rng(seed),
                             batch=max(1, 2_000_000 // a.size))
    low, high = result.confidence_interval
    return pd.DataFrame({"time_ms": times, "rms": rms(a, b), "low": low, "high": high})


# --------------------------------------------------------------------------- synthesis


def _target_mask(encoder: Encoder, targets) -> np.ndarray:
    mask = np.zeros(encoder.n_targets, dtype=bool)
    values = np.asarray(targets)
    if values.dtype == bool:
        if values.size != encoder.n_targets:
            raise ValueError(f"A boolean 'targets' mask must have one entry per target "
                             f"({encoder.n_targets}); got {values.size}.")
        mask[values.ravel()] = True
    else:
        if values.dtype.kind not in "iu" or values.ndim != 1 or (
                values.size and (values.min() < 0 or values.max() >= encoder.n_targets)):
            raise ValueError(f"'targets' must be a boolean mask or indices in [0, "
                             f"{encoder.n_targets}); got {targets!r}.")
        mask[values] = True
    if not mask.any():
        raise ValueError("'targets' selects no target; give at least one.")
    return mask


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-grid**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"),
                 kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"),
                    kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _to_model_input(net: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB images (n, 3, s, s) → the model's input, as its eval transform makes
    it (resize to size / crop_pct, centre crop, normalise), differentiably."""
    config = net.data_config
    size = int(config["input_size"][-1])
    scaled = int(math.floor(size / float(config.get("crop_pct") or 1.0)))
    x = F.interpolate(pixels, size=(scaled, scaled), mode="bilinear", align_corners=False,
                      antialias=pixels.shape[-1] > scaled)
    top = (scaled - size) // 2
    x = x[..., top:top + size, top:top + size]
    mean = torch.tensor(config["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _differentiable_response(encoder: Encoder, x: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Mean predicted response of the masked targets, per image (n,), differentiable."""
    net = encoder.net
    layers = [l for l, r in encoder.readouts.items() if mask[r.targets].any()]
    if encoder.signal == "activation":
        per_layer = differentiable_features(net, x, layers=layers, pool=encoder.pool)
    else:
        per_layer = differentiable_features(net, x, loss=encoder.loss, pool=encoder.pool,
                                            loss_seed=encoder.loss_seed)
        if encoder.gradient_part == "unique":
            acts = differentiable_features(net, x, pool=encoder.pool)
            per_layer = {l: _torch_residual(encoder.residualizers[l], acts, per_layer[l],
                                            encoder.layer_names) for l in layers}
    total = 0.0
    for layer in layers:
        r = encoder.readouts[layer]
        keep = mask[r.targets]
        as_t = (lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=x.device))
        scale = torch.as_tensor(np.asarray(r.scale), dtype=torch.float32, device=x.device)
        z = (per_layer[layer] - as_t(r.mean)) / scale
        total = total + (z @ as_t(r.coef[keep]).T + as_t(r.intercept[keep])).sum(1)
    return total / mask.sum()


def _torch_residual(r: _Residualizer, acts: dict, grad: torch.Tensor, names) -> torch.Tensor:
    as_t = (lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=grad.device))
    x = torch.cat([(acts[l] - as_t(m)) / as_t(s) for l, m, s in zip(names, r.act_mean,
                                                                     r.act_scale)], 1)
    predicted = (x - as_t(r.x_mean)) @ as_t(r.weights) + as_t(r.y_mean)
    return grad - (as_t(r.g_mean) + as_t(r.g_scale) * predicted)


def synthesize(encoder: Encoder, targets, *, steps: int = 64, size: int = 96,
               n_images: int = 1, lr: float = 0.05, jitter: float = 0.06,
               blur_every: int = 4, blur_sigma: float = 0.6, seed: int = 0, device=None,
               progress: bool = False) -> ImageSet:
    """Preferred images of a set of targets: gradient ascent on pixels.

    Maximises the encoder's predicted response, averaged over ``targets``, with respect
    to the pixels of ``size`` × ``size`` RGB images (kept in [0, 1] through a sigmoid),
    seen by the model through its own preprocessing (resize, centre crop, normalise).
    Regularised as usual for feature visualisation: a random shift of up to ``jitter``
    × the image side at every step, and a Gaussian blur every ``blur_every`` steps.
    Adam, ``lr`` on the pixel logits.

    For a gradient encoder the response is a function of backpropagated gradients, so
    its derivative with respect to the pixels is a second-order derivative (autograd
    through ``create_graph=True``): each step costs about three forward passes'
    worth more than an activation encoder's (a forward, a backward with graph, and the
    backward of that).

    Parameters
    ----------
    encoder : Encoder
        With its model (:func:`fit_encoder`, or :meth:`Encoder.load` with ``net``).
    targets : array of bool (n_targets,) or of int
        Targets whose mean predicted response is maximised (e.g. one hierarchy bin).
    steps, size, n_images, lr, jitter, blur_every, blur_sigma, seed
        Optimisation settings; ``seed`` draws the initial noise and the shifts.
    device : str, torch.device or None

    Returns
    -------
    ImageSet
        ``n_images`` RGB images of ``size`` pixels, label ``"synthesized"``; their
        ``sources`` say the encoder, targets and final predicted response.
    """
    net = encoder._check_net()
    mask = _target_mask(encoder, targets)
    for name, value, low in (("steps", steps, 1), ("size", size, 16), ("n_images", n_images, 1),
                             ("blur_every", blur_every, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"'{name}' must be an integer >= {low}; got {value!r}.")
    for name, value in (("lr", lr), ("blur_sigma", blur_sigma)):
        if not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise ValueError(f"'{name}' must be a positive number; got {value!r}.")
    if not isinstance(jitter, (int, float)) or not 0 <= jitter < 0.5:
        raise ValueError(f"'jitter' must be a fraction of the image side in [0, 0.5); got "
                         f"{jitter!r}.")
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(int(seed))
    logits = (0.5 * torch.randn(n_images, 3, size, size, generator=generator)).to(device)
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    shift = int(round(jitter * size))
    for step in tqdm(range(steps), desc="synthesis", disable=not progress):
        optimizer.zero_grad()
        pixels = torch.sigmoid(logits)
        if shift:
            dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
            pixels = torch.roll(pixels, shifts=(dy, dx), dims=(2, 3))
        response = _differentiable_response(encoder, _to_model_input(net, pixels), mask)
        (-response.sum()).backward()
        optimizer.step()
        if (step + 1) % blur_every == 0 and step + 1 < steps:
            with torch.no_grad():
                logits.copy_(_gaussian_blur(logits, blur_sigma))
    final = torch.sigmoid(logits.detach())
    response = _differentiable_response(encoder, _to_model_input(net, final), mask).detach()
    arrays = (final.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    label = f"{encoder.signal}{'' if encoder.signal == 'activation' else f' ({encoder.loss})'}"
    return ImageSet(images=[Image.fromarray(a) for a in arrays],
                    ids=[f"synthesized-{label.replace(' ', '')}-{i}" for i in range(n_images)],
                    labels=["synthesized"] * n_images,
                    sources=[f"synthesized for {int(mask.sum())} targets of a {label} encoder "
                             f"({encoder.modality}), predicted mean response "
                             f"{float(v):.3g}" for v in response.cpu()])
