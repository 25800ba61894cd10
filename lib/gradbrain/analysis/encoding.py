"""Encoding models of a study's responses: every layer's features → every target.

Arrays in, arrays out lives in the kernels (:mod:`gradbrain.ridge`, :mod:`gradbrain.meg`);
this module takes a :class:`~gradbrain.data.Study` and its
:class:`~gradbrain.features.Features`, checks that they belong together, splits the
study's images, and calls the kernels per layer and signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm import tqdm

from .._utils import (atomic_path, check_in_allowed, check_positive_int_or_none,
                      discard_unreadable, get_data_home, hash_arrays, hash_update_array)
from ..features import gradient_part, resolve_loss, signals
from ..meg import (_latencies, average_by_image, bootstrap_curves, encode_time_resolved,
                   peak_permutation_test)
from ..ridge import (DEFAULT_ALPHAS, PARTITION, _finite_columns, _scatter_targets,
                     _warn_non_finite, layerwise_scores, noise_normalised, standardize,
                     variance_partition)

__all__ = ["fmri_encoding", "fmri_partition", "meg_encoding", "meg_partition",
           "check_same_images", "Encoding", "EncodingSpec", "check_encoding",
           "ENCODING_CACHE_VERSION"]

MODALITIES = ("fmri", "meg")
#: Part of every cached encoding's key: bump it when a change to the encodings (or the
#: kernels under them) changes their results, so that cached ones are computed again.
ENCODING_CACHE_VERSION = 1


@dataclass(frozen=True)
class EncodingSpec:
    """What an encoding was fitted on: enough to refuse it where it does not belong.

    Attributes
    ----------
    modality : {"fmri", "meg"}
    model, weights, pool : str
        The features' model, weights (in words) and pooling.
    layers : tuple of str
        Layers encoded, in forward order.
    losses : tuple of str
        Losses whose gradients were encoded (one signal each, beside ``"activation"``).
    gradient_part : {"whole", "unique"}
        Gradients as extracted, or their part beyond activations
        (:func:`gradbrain.features.beyond_activations`).
    image_ids : tuple of str
        The study's images, in its order.
    """

    modality: str
    model: str
    weights: str
    pool: str
    layers: tuple
    losses: tuple
    gradient_part: str
    image_ids: tuple

    @classmethod
    def of(cls, modality: str, features) -> "EncodingSpec":
        """The spec of an encoding of ``features`` for ``modality``."""
        check_in_allowed("modality", modality, MODALITIES)
        return cls(modality=modality, model=features.model, weights=features.weights,
                   pool=features.pool, layers=tuple(features.layers),
                   losses=tuple(features.losses), gradient_part=gradient_part(features),
                   image_ids=tuple(features.image_ids))

    def differences(self, wanted: "EncodingSpec", loss: str | None = None) -> list[str]:
        """What differs from ``wanted``, in words (empty when this encoding serves it).

        ``losses`` need not be equal: the encoding serves ``wanted`` when it holds
        ``loss`` (default: all of ``wanted.losses``).
        """
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(wanted, f.name)
            if f.name == "losses":
                missing = [x for x in ([loss] if loss else theirs) if x not in mine]
                if missing:
                    out.append(f"losses: fitted on {list(mine)}, asked for {missing}")
            elif f.name == "image_ids":
                if mine != theirs:
                    out.append(f"images: fitted on {len(mine)} images, asked for "
                               f"{len(theirs)} (ids or order differ)")
            elif mine != theirs:
                shown = (lambda v: list(v)) if isinstance(mine, tuple) else repr
                out.append(f"{f.name.replace('_', ' ')}: fitted on {shown(mine)}, asked for "
                           f"{shown(theirs)}")
        return out


class Encoding(dict):
    """The results of one encoding: signal name → its arrays, plus what it was fitted on.

    A ``dict`` (``results["activation"]["r"]`` as before) whose :attr:`spec` records the
    modality, features, gradient part, layers and images, so that a precomputed
    encoding handed to the backprop tests is checked against what they are asked
    (:func:`check_encoding`).

    Parameters
    ----------
    results : dict of str to dict
        Signal name (:func:`gradbrain.features.signal_name`) → arrays.
    spec : EncodingSpec
    """

    def __init__(self, results, spec: EncodingSpec):
        super().__init__(results)
        if not isinstance(spec, EncodingSpec):
            raise TypeError(f"'spec' must be an EncodingSpec; got {type(spec).__name__}.")
        self.spec = spec

    def __repr__(self) -> str:
        s = self.spec
        return (f"Encoding({s.modality}, {s.model}, {len(s.layers)} layers, signals "
                f"{list(self)}, gradients: {s.gradient_part}, {len(s.image_ids)} images)")


def check_encoding(results, *, name: str, modality: str, features, loss: str,
                   part: str | None = None) -> Encoding:
    """Refuse a precomputed encoding that was not fitted on what a test is asked.

    Parameters
    ----------
    results : Encoding
        From :func:`fmri_encoding` or :func:`meg_encoding`.
    name : str
        The parameter it came in (for the message), e.g. ``"fmri"``.
    modality : {"fmri", "meg"}
    features : Features
        The features the test uses (after any :func:`~gradbrain.features.beyond_activations`).
    loss : str
        The gradient loss the test uses.
    part : {"whole", "unique"} or None
        The gradient part the test uses, when ``features`` are not yet transformed to it
        (default: that of ``features``).

    Returns
    -------
    Encoding
        ``results``, checked.

    Raises
    ------
    TypeError
        ``results`` is not an :class:`Encoding` (e.g. a plain dict: what it was fitted on
        is unknown).
    ValueError
        It was fitted on other features, layers, images, gradient part or losses; the
        message names each difference with both values.
    """
    fit = f"gradbrain.analysis.encoding.{modality}_encoding"
    if not isinstance(results, Encoding):
        raise TypeError(f"'{name}' must be the result of {fit} (it records what it was "
                        f"fitted on); got a {type(results).__name__}. Pass {name}=None to "
                        "fit it here.")
    wanted = EncodingSpec.of(modality, features)
    if part is not None:
        wanted = replace(wanted, gradient_part=part)
    differences = results.spec.differences(wanted, loss)
    if differences:
        raise ValueError(f"'{name}' was fitted on something else than this test asks for — "
                         + "; ".join(differences) + f". Refit it with {fit}(study, features) "
                         f"on the features the test uses, or pass {name}=None.")
    return results


def check_same_images(study, features) -> None:
    """Raise unless ``features`` were extracted on ``study``'s images, in its order."""
    if list(features.image_ids) != list(study.image_ids):
        raise ValueError(
            "'features' were not extracted on the study's images (image ids differ); extract "
            "them with gradbrain.features.extract(model, study.images)."
        )


def _partition_inputs(study, features, loss, layers) -> tuple[str, list, np.ndarray]:
    """The gradient loss, the layers (in forward order) and their depth, checked."""
    check_same_images(study, features)
    loss = resolve_loss(features, loss)
    layers = list(features.layers) if layers is None else list(layers)
    if not layers or any(layer not in features.layers for layer in layers):
        raise ValueError(f"'layers' must be some of the features' layers {features.layers}; "
                         f"got {layers!r}.")
    layers = [layer for layer in features.layers if layer in layers]
    depth = np.asarray(features.depth, float)[[list(features.layers).index(x) for x in layers]]
    return loss, layers, depth


def _partition_layers(features, loss, layers, train, test, Y_train, Y_test, *,
                      desc: str = "variance partition", progress: bool = False,
                      **kwargs) -> dict:
    """:func:`variance_partition` of each layer's activations and ``loss`` gradients;
    per component (renamed for activations and gradients) the values stacked over
    layers, (n_layers, n_targets)."""
    names = dict(zip((*PARTITION, "ratio", "cv_r2_joint"),
                     ("r2_activation", "r2_gradient", "r2_joint", "unique_activation",
                      "unique_gradient", "shared", "ratio", "cv_r2_joint")))
    out = {name: [] for name in names.values()}
    for layer in tqdm(layers, desc=desc, disable=not progress):
        act = np.asarray(features.activations[layer])
        grad = np.asarray(features.gradients[loss][layer])
        parts = variance_partition(act[train], grad[train], Y_train, act[test], grad[test],
                                   Y_test, **kwargs)
        for name, renamed in names.items():
            out[renamed].append(parts[name])
    return {name: np.stack(values) for name, values in out.items()}


def fmri_partition(study, features, *, loss: str | None = None, layers=None,
                   alphas=DEFAULT_ALPHAS, cv=5, band_ratios=(0.1, 1.0, 10.0), device=None,
                   progress: bool = False) -> dict:
    """Per layer and vertex: what a layer's gradients add to its activations, and back.

    :func:`variance_partition` of every layer's activations (band A) and gradients
    (band B, of ``loss``) on the study's training/test split, mean betas over repeats.

    Parameters
    ----------
    study : Study
        With ``betas`` and ``split``.
    features : Features
        Extracted on ``study.images``.
    loss : str or None
        Gradient signal; default the features' first loss.
    layers : sequence of str or None
        Layers to partition (default all), in the features' order.
    band_ratios
        As in :func:`variance_partition`.

    Returns
    -------
    dict with ``layers``, ``depth`` (n_layers,), ``loss``, ``ratio`` (n_layers,
    n_vertices) the joint model each vertex kept, ``cv_r2_joint`` (n_layers, n_vertices)
    its cross-validated R² on the training images, and, per :data:`PARTITION` component
    renamed ``r2_activation``, ``r2_gradient``, ``r2_joint``, ``unique_activation``,
    ``unique_gradient`` and ``shared``, an array (n_layers, n_vertices) of test R².
    """
    if study.betas is None:
        raise ValueError(f"Study {study.name!r} has no fMRI data (betas is None).")
    loss, layers, depth = _partition_inputs(study, features, loss, layers)
    train = np.flatnonzero(study.split == "train")
    test = np.flatnonzero(study.split == "test")
    Y = study.mean_betas()
    parts = _partition_layers(features, loss, layers, train, test, Y[train], Y[test],
                              alphas=alphas, cv=cv, band_ratios=band_ratios, device=device,
                              progress=progress)
    return {"layers": layers, "depth": depth, "loss": loss, **parts}


def fmri_encoding(study, features, *, alphas=DEFAULT_ALPHAS, cv=5, groups=None, device=None,
                  dtype=None, standardize_features: bool = True, progress: bool = False,
                  return_prediction: bool = False, only=None,
                  vertices_chunk: int | None = None, targets_batch: int | None = None,
                  cache=None) -> dict:
    """Encode a study's fMRI from every layer's activations and gradients.

    The test set is held out as NSD does: images with ``study.split == "test"`` (NSD's
    shared images) are never used for fitting, choosing alphas or standardising the
    features (each layer's columns are z-scored on the training images, see
    ``standardize_features`` of :func:`layerwise_scores`). Responses are the mean over
    repeats; scores are NC-normalised with ``study.noise_ceiling()``.

    Parameters
    ----------
    study : Study
        With ``betas`` (n_images, n_repeats, n_vertices) and ``split``.
    features : Features
        Extracted on ``study.images`` (same image ids, same order).
    cv, groups
        Folds that choose the alphas; ``groups`` (n_images,) labels every image (e.g.
        its NSD session) for group splitters — only the training images' labels are used.
    return_prediction : bool
        Also keep each layer's test-set prediction and the test responses (for
        bootstraps over test images; n_layers × n_test × n_vertices float32 per signal).
    only : sequence of str or None
        Encode these signals alone (names as returned, e.g. ``["gradient (ce)"]``);
        None: every signal of ``features``.
    vertices_chunk : int or None
        Vertices encoded at a time: the repeats of one chunk of vertices are averaged,
        split, fitted and scored by every layer and signal before the next chunk is
        read, so memory holds ``study.betas`` plus one chunk's working copies, never a
        full-size copy of the responses. None: every vertex at once when that needs
        about 1 GiB or less (64 bytes per image and vertex: 200 images on all 20,484
        fsaverage5 vertices need 0.26 GiB), else chunks of 512 MiB of averaged responses
        and their train and test rows (4,473 vertices at NSD's 10,000 images). Results
        do not depend on it beyond float32 rounding; each chunk repeats the layers' fold
        factorisations (``benchmarks/bench_encoding_memory.py`` measures the cost).
    targets_batch : int or None
        Targets per batch inside the ridge (:class:`~gradbrain.ridge.RidgeCV`): bounds
        its all-alpha prediction buffer (n_alphas × fold size × batch). None: the
        ridge's default (a quarter of free memory) for an encoding in one piece, 1024 in
        chunks.
    cache : bool, path-like or None
        Keep the encoding on disk and reuse it (True: ``$GRADBRAIN_DATA/encodings``; a
        folder; None or False: no cache). The key covers every input the encoding reads
        — the study's betas, noise ceilings and split, the features encoded, and the
        arguments above except ``device``, ``progress``, ``vertices_chunk`` and
        ``targets_batch`` (results agree within float32 rounding) — so that chapters
        and runs with the same inputs fit once. An encoding kept with predictions
        serves a call without them. Only folds given as a number are cached.

    Returns
    -------
    Encoding
        A dict, signal name (``"activation"``, ``"gradient (ce)"``, …) → the output of
        :func:`~gradbrain.ridge.layerwise_scores`, with ``.spec`` recording what was
        fitted: ``r``, ``r_nc`` and ``alpha`` of shape (n_layers, n_vertices), and
        ``layers``; if asked, ``prediction`` (n_layers, n_test, n_vertices) and
        ``y_test`` (n_test, n_vertices). Vertices without data (NaN) score NaN.
    """
    check_same_images(study, features)
    if study.betas is None:
        raise ValueError(f"Study {study.name!r} has no fMRI data (betas is None).")
    train = np.flatnonzero(study.split == "train")
    test = np.flatnonzero(study.split == "test")
    if len(test) == 0 or len(train) < 2 * (cv if isinstance(cv, int) else 2):
        raise ValueError(
            f"The study needs test images and enough training images; got {len(train)} "
            f"train and {len(test)} test."
        )
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (study.n_images,):
            raise ValueError(f"'groups' must label every image of the study, shape "
                             f"({study.n_images},); got {groups.shape}.")
        groups = groups[train]
    nc = study.noise_ceiling()
    if not np.any(nc > 0):
        raise ValueError(f"Study {study.name!r} has a noise ceiling of 0 (or NaN) at every "
                         "vertex, so every normalised score would be NaN: check its ncsnr.")
    chosen = _chosen_signals(features, only)
    n_vertices = study.n_vertices
    chunk = _vertices_chunk(vertices_chunk, study.n_images, n_vertices)
    folder = _cache_dir(cache) if isinstance(cv, (int, np.integer)) else None
    inputs = None if folder is None else _inputs_digest(
        features, chosen, [study.betas, study.ncsnr, study.split]
        + ([] if groups is None else [groups]))

    def path(with_prediction):
        if folder is None:
            return None
        settings = {"alphas": [float(a) for a in np.atleast_1d(alphas)], "cv": int(cv),
                    "dtype": str(dtype), "standardize_features": bool(standardize_features),
                    "return_prediction": with_prediction}
        return _cache_path(folder, "fmri", settings, inputs)

    return _cached(path(bool(return_prediction)),
                   lambda: _fmri_fit(study, features, chosen, train, test, nc, chunk,
                                     alphas=alphas, cv=cv, groups=groups, device=device,
                                     dtype=dtype, targets_batch=targets_batch,
                                     standardize_features=standardize_features,
                                     progress=progress, return_prediction=return_prediction),
                   also=None if return_prediction or folder is None else path(True),
                   strip=("prediction", "y_test"))


def _fmri_fit(study, features, chosen, train, test, nc, chunk, *, alphas, cv, groups, device,
              dtype, targets_batch, standardize_features, progress,
              return_prediction) -> "Encoding":
    """:func:`fmri_encoding`'s fits, chunk by chunk of vertices (inputs checked)."""
    n_vertices = study.n_vertices
    if targets_batch is None and chunk < n_vertices:
        targets_batch = _CHUNK_TARGETS_BATCH
    chunks = [slice(s, min(s + chunk, n_vertices)) for s in range(0, n_vertices, chunk)]
    parts = {name: [] for name in chosen}
    y_test, n_bad = [], 0
    for sl in tqdm(chunks, desc="vertex chunks", disable=not progress or len(chunks) == 1):
        Y = study.betas[:, :, sl].mean(axis=1)                      # (n_images, chunk)
        Y_train, Y_test = Y[train], Y[test]
        del Y
        if return_prediction:
            y_test.append(Y_test)
        finite = _finite_columns(Y_train) & _finite_columns(Y_test)
        n_bad += int((~finite).sum())
        if not finite.all():
            Y_train, Y_test = Y_train[:, finite], Y_test[:, finite]
        for name, per_layer in chosen.items():
            if finite.any():
                part = layerwise_scores(
                    per_layer, Y_train, Y_test, train, test, alphas=alphas, cv=cv,
                    groups=groups, device=device, dtype=dtype, targets_batch=targets_batch,
                    standardize_features=standardize_features,
                    progress=progress and len(chunks) == 1, return_prediction=return_prediction)
                part["r_nc"] = noise_normalised(part["r"], nc[sl][finite])
            else:  # a chunk of vertices without data: nothing to fit
                part = {key: np.empty((len(per_layer), 0)) for key in _SCORES}
                if return_prediction:
                    part["prediction"] = np.empty((len(per_layer), len(test), 0), np.float32)
            parts[name].append({key: _scatter_targets(value, finite)
                                for key, value in part.items() if key != "layers"})
        del Y_train, Y_test
    if n_bad == n_vertices:
        raise ValueError("Every target holds NaN or inf values; nothing to fit.")
    if n_bad:
        _warn_non_finite(n_bad, n_vertices)
    out = {}
    for name, per_layer in chosen.items():
        keys = list(parts[name][0])
        out[name] = {"layers": list(per_layer),
                     **{key: np.concatenate([p[key] for p in parts[name]], axis=-1)
                        for key in keys}}
    if return_prediction:
        y_test = np.concatenate(y_test, axis=1)
        for result in out.values():
            result["y_test"] = y_test
    return Encoding(out, EncodingSpec.of("fmri", features))


_SCORES = ("r", "alpha", "cv_r2", "r_nc")
#: working memory of an encoding in one piece, bytes per image and vertex (the averaged
#: responses, their train and test rows and the ridge's buffers, float32), and the most
#: an encoding may take that way before it goes by chunks of vertices
_WHOLE_BYTES_PER_VALUE, _WHOLE_MAX_BYTES = 64, 2**30
#: a chunk's averaged responses and their train and test rows (12 bytes per image and
#: vertex), and the ridge's target batches when in chunks
_CHUNK_BYTES, _CHUNK_TARGETS_BATCH = 512 * 2**20, 1024


def _vertices_chunk(requested, n_images: int, n_vertices: int) -> int:
    """Vertices per chunk of :func:`fmri_encoding`: the requested number; or every
    vertex when the encoding in one piece needs at most :data:`_WHOLE_MAX_BYTES`; or
    :data:`_CHUNK_BYTES` of responses and their copies."""
    check_positive_int_or_none("vertices_chunk", requested)
    if requested is not None:
        return min(int(requested), n_vertices)
    if _WHOLE_BYTES_PER_VALUE * n_images * n_vertices <= _WHOLE_MAX_BYTES:
        return n_vertices
    return max(1, min(n_vertices, _CHUNK_BYTES // (12 * n_images)))


# ---------------------------------------------------------------------- on-disk cache


def _cache_dir(cache) -> Path | None:
    """None (no cache), the data home's ``encodings`` folder (True) or a given folder."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return get_data_home() / "encodings"
    if isinstance(cache, (str, os.PathLike)):
        return Path(cache).expanduser()
    raise ValueError(f"'cache' must be True, False, None or a folder; got {cache!r}.")


def _inputs_digest(features, signals_: dict, arrays) -> str:
    """Digest of what an encoding reads: the features encoded (``signals_``, with the
    features' model, weights, pooling, image ids and gradient part) and ``arrays``, the
    study's responses and whatever else of it the encoding reads."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([features.model, features.weights, features.pool,
                         list(features.image_ids), gradient_part(features), list(signals_)],
                        default=str).encode())
    hash_update_array(h, np.asarray(features.depth, dtype=float))
    for per_layer in signals_.values():
        for layer, values in per_layer.items():
            h.update(layer.encode())
            hash_update_array(h, values)
    for value in arrays:
        value = np.asarray(value)
        hash_update_array(h, value.astype("S") if value.dtype.kind == "U" else value)
    return h.hexdigest()


def _cache_path(folder: Path | None, modality: str, settings: dict, inputs: str) -> Path | None:
    """Where the encoding of ``inputs`` (:func:`_inputs_digest`) with ``settings`` (the
    JSON-able arguments that change the result; not the device, nor the chunking) is
    cached, or None without a cache folder."""
    if folder is None:
        return None
    key = hashlib.blake2b(json.dumps([modality, ENCODING_CACHE_VERSION, settings, inputs],
                                     default=str).encode(), digest_size=16).hexdigest()
    return folder / f"{modality}-{key}.npz"


def _encoding_digest(arrays: dict) -> str:
    """Digest of a cached encoding's arrays (names in sorted order, each array's dtype,
    shape and values), written with them and checked when they are read."""
    names = sorted(k for k in arrays if k != "header")
    return hash_arrays([np.frombuffer(json.dumps(names).encode(), np.uint8)]
                       + [arrays[k] for k in names])


def _save_encoding(path: Path, encoding: "Encoding") -> None:
    """Write ``encoding`` to ``path`` (npz: arrays by ``<signal index>/<key>``, the rest,
    the spec and a digest of the arrays as a JSON ``header``), atomically."""
    arrays, layout = {}, {"spec": asdict(encoding.spec), "signals": []}
    for i, (name, result) in enumerate(encoding.items()):
        plain = {}
        for key, value in result.items():
            if isinstance(value, np.ndarray):
                arrays[f"{i}/{key}"] = value
            else:
                plain[key] = value.tolist() if isinstance(value, np.generic) else value
        layout["signals"].append({"name": name, "plain": plain})
    layout["arrays_digest"] = _encoding_digest(arrays)   # as the feature cache does
    arrays["header"] = np.array(json.dumps(layout))   # as Features.save and Encoder.save
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _load_encoding(path: Path | None) -> "Encoding | None":
    """The cached encoding at ``path``, or None (missing; unreadable ones are named and
    deleted, and the encoding computed again)."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            layout = json.loads(str(npz["header"]))
            arrays = {key: npz[key] for key in npz.files if key != "header"}
        if "arrays_digest" not in layout:
            raise ValueError("it was written before cached encodings carried a digest of "
                             "their arrays")
        if layout["arrays_digest"] != _encoding_digest(arrays):
            raise ValueError("its arrays do not match the digest written with them "
                             "(edited, or written by something else)")
        results = {}
        for i, signal in enumerate(layout["signals"]):
            prefix = f"{i}/"
            results[signal["name"]] = {
                **signal["plain"],
                **{key[len(prefix):]: value for key, value in arrays.items()
                   if key.startswith(prefix)}}
        spec = EncodingSpec(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in layout["spec"].items()})
    except Exception as err:  # a file cut short or not ours: numpy, zipfile, json, key errors
        discard_unreadable(path, err, what="Cached encoding", then="it is computed again",
                           stacklevel=3)
        return None
    return Encoding(results, spec)


def _cached(path: Path | None, compute, *, also: Path | None = None, strip=()):
    """The encoding cached at ``path`` (or at ``also``, less the keys ``strip``), or
    ``compute()`` — then cached at ``path``."""
    found = _load_encoding(path)
    if found is None and also is not None:
        found = _load_encoding(also)
        if found is not None:
            found = Encoding({name: {k: v for k, v in result.items() if k not in strip}
                              for name, result in found.items()}, found.spec)
    if found is not None:
        return found
    encoding = compute()
    if path is not None:
        _save_encoding(path, encoding)
    return encoding


def _chosen_signals(features, only) -> dict:
    """:func:`~gradbrain.features.signals` of ``features``, restricted to ``only``."""
    every = signals(features)
    if only is None:
        return every
    only = [only] if isinstance(only, str) else list(only)
    unknown = [name for name in only if name not in every]
    if unknown or not only:
        raise ValueError(f"'only' must name signals of these features, {list(every)}; got "
                         f"{only!r}.")
    return {name: every[name] for name in only}


def _meg_split(study, cv) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and test images that have trials, and their MEG averaged over repeats:
    ``(train, test, Y_train, Y_test)``, Y of shape (n, n_channels, n_times)."""
    ids = np.asarray(study.image_ids)
    shown = set(study.epochs.metadata["image_id"])
    train = np.flatnonzero((study.split == "train") & np.isin(ids, list(shown)))
    test = np.flatnonzero((study.split == "test") & np.isin(ids, list(shown)))
    if len(test) < 3 or len(train) < 2 * (cv if isinstance(cv, int) else 2):
        raise ValueError(f"The MEG study needs test images and enough training images; got "
                         f"{len(train)} train and {len(test)} test images with trials.")
    return (train, test, average_by_image(study.epochs, ids[train]),
            average_by_image(study.epochs, ids[test]))


def meg_encoding(study, features, *, alphas=DEFAULT_ALPHAS, cv=5, threshold: float = 0.95,
                 n_boot: int = 1000, ci: float = 0.95, seed: int = 0, n_perm: int = 200,
                 latency_alpha: float = 0.05, device=None, dtype=None,
                 standardize_features: bool = True, progress: bool = False,
                 only=None, cache=None) -> dict:
    """Time-resolved encoding of a study's MEG from every layer's activations and gradients.

    Training images (``study.split == "train"``) fit the models and choose the alphas;
    test images, averaged over their repeats, are only used for scoring. Every layer
    of every signal is one :func:`encode_time_resolved` problem; its score time course
    is the test-set Pearson r averaged over sensors, and its peak latency the mean time
    of the window where that course is ≥ ``threshold`` × its maximum (Raugel et al.
    2025), with a percentile bootstrap interval over test images.

    A latency is only given to a layer whose course rises above chance: its peak must
    pass a max-statistic permutation test over time at ``latency_alpha``
    (:func:`peak_permutation_test`, shuffled test images), corrected over the layers
    (step-down max statistic: the family-wise error over layers and time points is at
    most ``latency_alpha``). Other layers get NaN
    latencies (and NaN bootstrap latencies), so temporal scores and latency contrasts
    leave them out — a curve of pure noise still has a maximum, but no latency.

    Parameters
    ----------
    study : Study
        With ``epochs`` whose metadata give each trial's ``image_id``.
    features : Features
        Extracted on ``study.images`` (same image ids, same order).
    threshold : float
        Peak-window threshold (fraction of the maximum).
    n_boot, ci, seed : int, float, int
        Bootstrap resamples of the test images (0: none; the intervals are then NaN),
        interval coverage, and seed.
    n_perm, latency_alpha : int, float
        Shuffles of the peak test and its level (``latency_alpha=1`` keeps every layer's
        latency, as before the gate).
    standardize_features : bool
        Z-score each layer's feature columns on the training images before the ridge
        (:func:`gradbrain.ridge.standardize`), so that one grid of ``alphas`` suits
        activations and gradients alike.
    only : sequence of str or None
        Encode these signals alone (e.g. ``["gradient (ce)"]``); None: every signal.
    cache : bool, path-like or None
        Keep the encoding on disk and reuse it (True: ``$GRADBRAIN_DATA/encodings``; a
        folder; None or False: no cache), keyed on the study's averaged MEG of the
        training and test images, its times, the features encoded and every argument
        above but ``device`` and ``progress``. Only folds given as a number are cached.

    Returns
    -------
    Encoding
        A dict (``.spec`` records what was fitted), signal name (``"activation"``,
        ``"gradient (ce)"``, …) → ``layers``, ``depth``
        (n_layers,), ``times`` (n_times,) ms, ``r`` (n_layers, n_channels, n_times),
        ``curve`` (n_layers, n_times) r averaged over sensors, ``peak`` (n_layers,) its
        maximum, ``latency`` (n_layers,) ms, ``latency_ci`` (n_layers, 2) ms and
        ``boot_latency`` (n_boot, n_layers) ms (NaN where a resampled course never rises
        above 0), ``p_peak`` (n_layers,) the peak test's p-value, ``p_peak_fwer``
        (n_layers,) the same corrected over layers and ``significant`` (n_layers,) bool
        (``p_peak_fwer < latency_alpha``); latencies of layers that are not significant
        are NaN. Above chance per time point: ``best_curve`` (n_times,) the best layer's score,
        ``p_time`` its permutation p-value (maximum over layers in the null),
        ``q_time`` Benjamini–Hochberg-adjusted over time points and
        ``significant_time`` = ``q_time < latency_alpha``; ``n_perm``.
    """
    if study.epochs is None:
        raise ValueError(f"Study {study.name!r} has no MEG data (epochs is None).")
    check_same_images(study, features)
    if not 0 < ci < 1:
        raise ValueError(f"'ci' must be in (0, 1), e.g. 0.95; got {ci!r}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"'n_boot' must be an integer >= 0 (0: no bootstrap); got {n_boot!r}.")
    if isinstance(latency_alpha, bool) or not isinstance(latency_alpha, (int, float)) \
            or not 0 < latency_alpha <= 1:
        raise ValueError(f"'latency_alpha' must be in (0, 1], e.g. 0.05; got {latency_alpha!r}.")
    train, test, Y_train, Y_test = _meg_split(study, cv)
    times = 1000 * study.epochs.times
    chosen = _chosen_signals(features, only)
    folder = _cache_dir(cache) if isinstance(cv, (int, np.integer)) else None
    path = None
    if folder is not None:
        settings = {"alphas": [float(a) for a in np.atleast_1d(alphas)], "cv": int(cv),
                    "threshold": float(threshold), "n_boot": int(n_boot), "ci": float(ci),
                    "seed": int(seed), "n_perm": int(n_perm),
                    "latency_alpha": float(latency_alpha), "dtype": str(dtype),
                    "standardize_features": bool(standardize_features)}
        path = _cache_path(folder, "meg", settings, _inputs_digest(
            features, chosen, [train, test, Y_train, Y_test, times]))
    return _cached(path, lambda: _meg_fit(
        features, chosen, train, test, Y_train, Y_test, times, alphas=alphas, cv=cv,
        threshold=threshold, n_boot=n_boot, ci=ci, seed=seed, n_perm=n_perm,
        latency_alpha=latency_alpha, device=device, dtype=dtype,
        standardize_features=standardize_features, progress=progress))


def _meg_fit(features, chosen, train, test, Y_train, Y_test, times, *, alphas, cv, threshold,
             n_boot, ci, seed, n_perm, latency_alpha, device, dtype, standardize_features,
             progress) -> "Encoding":
    """:func:`meg_encoding`'s fits and tests, signal by signal (inputs checked)."""
    results = {}
    for name, per_layer in chosen.items():
        layers = list(per_layer)
        r, predictions = [], []
        for layer in tqdm(layers, desc=f"MEG encoding, {name}", disable=not progress):
            X = np.asarray(per_layer[layer])
            X_train, X_test = X[train], X[test]
            if standardize_features:
                X_train, X_test = standardize(X_train, X_test)
            out = encode_time_resolved(X_train, Y_train, X_test, Y_test, alphas=alphas, cv=cv,
                                       device=device, dtype=dtype, return_prediction=True)
            r.append(out["r"])
            predictions.append(out["prediction"].astype(np.float32))
        r = np.stack(r)
        curve = r.mean(1)
        predictions = np.stack(predictions)
        boot = (_latencies(times, bootstrap_curves(Y_test, predictions, n_boot=n_boot,
                                                   seed=seed, device=device), threshold)
                if n_boot else np.empty((0, len(layers))))
        shuffled = peak_permutation_test(Y_test, predictions, n_perm=n_perm, seed=seed,
                                         device=device)
        p_peak, p_fwer = shuffled["p_value"], shuffled["p_fwer"]
        q_time = stats.false_discovery_control(shuffled["p_time"], method="bh")
        significant = p_fwer < latency_alpha if latency_alpha < 1 else np.ones(len(layers), bool)
        latency = _latencies(times, curve, threshold)
        latency[~significant] = np.nan
        boot[:, ~significant] = np.nan
        low, high = (1 - ci) / 2, (1 + ci) / 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN interval
            latency_ci = np.stack([np.nanquantile(boot, low, axis=0),
                                   np.nanquantile(boot, high, axis=0)], axis=1)
        results[name] = {
            "layers": layers, "depth": np.asarray(features.depth, dtype=float), "times": times,
            "r": r, "curve": curve, "peak": curve.max(1), "latency": latency,
            "latency_ci": latency_ci, "boot_latency": boot, "p_peak": p_peak,
            "p_peak_fwer": p_fwer,
            "significant": significant, "best_curve": shuffled["best_curve"],
            "p_time": shuffled["p_time"], "q_time": q_time,
            "significant_time": q_time < latency_alpha,
            "n_perm": n_perm,
        }
    return Encoding(results, EncodingSpec.of("meg", features))


def meg_partition(study, features, *, loss: str | None = None, layers=None,
                  alphas=DEFAULT_ALPHAS, cv=5, band_ratios=(0.1, 1.0, 10.0),
                  score: str = "signed_r2", min_cv_r2: float | None = 0.0, device=None,
                  progress: bool = False) -> dict:
    """Over time: what a layer's gradients add to its activations, and back.

    :func:`gradbrain.ridge.variance_partition` of every layer's activations and
    gradients (of ``loss``) on every sensor × time point: training images fit the three
    models and choose their penalties, test images (averaged over repeats) score them.
    Each part is then averaged, per time point, over the sensors that some layer's joint
    model predicts on the training images (cross-validated R² above ``min_cv_r2``): a
    choice made without the test images, so it does not bias the test parts, and it
    keeps sensors without any signal from diluting the mean.

    The default score is sign(r)·r² (``score="signed_r2"``), not R²: THINGS-MEG shows
    training images once and test images 12 times, so test responses are far less noisy
    than training ones and R² charges every model for the single-trial noise its weights
    learnt, against the small variance of averaged responses. On the book's embedded
    default this pushed all-sensor R² parts to about −0.1 at every time point, before
    and after image onset; sign(r)·r² parts sit at 0 before onset.

    The parts are descriptions: no latency is read from them. A course of noise over
    many time points still has a maximum, and shuffling test images is no null for
    "gradients add nothing" when gradients share information with activations (the
    shuffle breaks what they share, too). Compare a rise with the ``prestimulus`` range
    — the largest absolute value any layer's course takes before image onset, where no
    stimulus information can be — and test the unique part with chapter 04's
    model-based nulls (``backprop_tests(gradient_part="unique")``).

    Parameters
    ----------
    study : Study
        With ``epochs`` (metadata ``image_id``) and ``split``.
    features : Features
        Extracted on ``study.images``.
    loss : str or None
        Gradient signal; default the features' first loss.
    layers : sequence of str or None
        Layers to partition (default all), kept in the features' order.
    alphas, cv, band_ratios, score, device
        As in :func:`gradbrain.ridge.variance_partition`.
    min_cv_r2 : float or None
        Keep, per time point, the sensors where the best layer's joint model has a
        training cross-validated R² above this; None keeps every sensor.

    Returns
    -------
    dict with ``layers``, ``depth`` (n_layers,), ``times`` (n_times,) ms, ``loss``,
    ``score``, ``min_cv_r2``, ``selected`` (n_channels, n_times) bool the sensors kept,
    ``n_selected`` (n_times,); as (n_layers, n_times) test scores averaged over the kept
    sensors (NaN at times without any), ``r2_activation``, ``r2_gradient``,
    ``r2_joint``, ``unique_activation``, ``unique_gradient`` and ``shared``; and
    ``prestimulus``, a dict of float per part: the largest absolute value its courses
    take before onset (NaN when the epochs start at onset).
    """
    if study.epochs is None:
        raise ValueError(f"Study {study.name!r} has no MEG data (epochs is None).")
    if min_cv_r2 is not None and not (isinstance(min_cv_r2, (int, float))
                                      and not isinstance(min_cv_r2, bool)
                                      and np.isfinite(min_cv_r2) and min_cv_r2 < 1):
        raise ValueError(f"'min_cv_r2' must be a number below 1 (e.g. 0.0) or None (every "
                         f"sensor); got {min_cv_r2!r}.")
    loss, layers, depth = _partition_inputs(study, features, loss, layers)
    train, test, Y_train, Y_test = _meg_split(study, cv)
    n_channels, n_times = Y_test.shape[1:]
    parts = _partition_layers(
        features, loss, layers, train, test, Y_train.reshape(len(train), -1),
        Y_test.reshape(len(test), -1), desc="variance partition (MEG)", progress=progress,
        alphas=alphas, cv=cv, band_ratios=band_ratios, score=score, device=device)
    parts.pop("ratio")
    shape = (len(layers), n_channels, n_times)
    cv_r2 = parts.pop("cv_r2_joint").reshape(shape)
    finite = np.isfinite(cv_r2).any(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN sensors: not selected
        selected = finite if min_cv_r2 is None else finite & (np.nanmax(cv_r2, 0) > min_cv_r2)
        courses = {name: np.nanmean(np.where(selected, values.reshape(shape), np.nan), 1)
                   for name, values in parts.items()}
    times = 1000 * study.epochs.times
    before = times < 0
    prestimulus = {name: float(np.nanmax(np.abs(course[:, before])))
                   if np.isfinite(course[:, before]).any() else np.nan
                   for name, course in courses.items()}
    return {"layers": layers, "depth": depth, "times": times, "loss": loss, "score": score,
            "min_cv_r2": min_cv_r2, "selected": selected, "n_selected": selected.sum(0),
            **courses, "prestimulus": prestimulus}
