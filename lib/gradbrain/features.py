"""Per-layer forward activations and backpropagated gradients of a vision model.

For every image and every layer ``l`` of a registry model, :func:`extract` returns

* the pooled **activation** ``h_l`` (what the forward pass computes), and
* the pooled **gradient** ``dL/dh_l`` of a per-image loss ``L`` with respect to that
  layer's output (what backpropagation would send back to that layer),

computing all layers' gradients from ONE backward pass per batch and loss, and
recording the order in which autograd produced them.

Losses (the paper does not publish its loss, so it is a parameter)
------------------------------------------------------------------
``"dino"``
    DINO-style self-distillation between two deterministic views of the image.
    The student sees the preprocessed image (the same input as the activations);
    the teacher (same weights, no gradient) sees it mirrored and zoomed by 15 %.
    Both embeddings go through a fixed random prototype head (L2-normalised
    embedding · L2-normalised random prototypes, 1,024 of them). Loss:
    ``-Σ_k p_t(k) log p_s(k)`` with ``p_t = softmax((t - c) / 0.04)`` (teacher
    centred by ``c`` and sharpened) and ``p_s = softmax(s / 0.1)``. The centre ``c`` is
    the mean teacher output over a fixed reference set (the first 64 embedded images,
    or ``dino_reference``), as DINO's running centre is a statistic of past batches: an
    image's gradient does not depend on the other images extracted with it.
``"ce"``
    Cross-entropy of a classification head against its own top class (a
    "self-label": the model is nudged towards what it already believes). The head
    depends on the model (``ModelSpec.classifier``): a supervised model's own
    classifier; for CLIP, zero-shot classification of the image projection against
    text embeddings of class prompts when ``class_embeddings`` are given; otherwise
    (DINO, CLIP without text embeddings) a fixed random linear head of 1,000 classes,
    with a warning. ``Features.meta["heads"]`` records the head each loss used.
``"proj"``
    Regression of a fixed random projection of the embedding (256 dimensions) onto a
    fixed random target vector: ``½‖P e - y‖²``. A control whose direction has no
    relation to any task.

Every fixed random head is drawn from ``loss_seed`` on the CPU, so results do not
depend on the device. Losses are summed over the images of a batch; since the
models run in eval mode and images do not interact, the gradient at image ``i``
is that of image ``i``'s own loss.

Pooling
-------
A ViT layer outputs tokens (n, n_tokens, dim): ``"cls"`` keeps the class token,
``"mean"`` averages the patch tokens (class and register tokens excluded),
``"cls+mean"`` concatenates both. A CNN layer outputs maps (n, channels, height,
width): ``"mean"`` averages over space (``"cls"`` is refused: there is no class
token). Gradients are pooled exactly like activations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
from ._utils import (atomic_path, check_in_allowed, discard_unreadable, get_data_home,
                     hash_arrays, resolve_device, signal_name, usable_cores)
from .data.images import ImageSet, LazyImages, load_embedded
from .models import LoadedModel, _to_rgb, load, wrap
from .ridge import DEFAULT_ALPHAS

__all__ = [
    "LOSSES", "POOLS", "Features", "extract", "linear_cka", "cka_matrix", "category_decoding",
    "norms_table", "decoding_table", "best_decoding_depths", "signals", "signal_name",
    "beyond_activations",
    "gradient_part", "differentiable_features",
]

LOSSES = ("dino", "ce", "proj")
POOLS = ("cls", "mean", "cls+mean")

# Fixed hyper-parameters of the losses (part of the cache key through the lib version).
_DINO_PROTOTYPES = 1024
_DINO_STUDENT_TEMP = 0.1
_DINO_TEACHER_TEMP = 0.04
_DINO_ZOOM = 1.15
_CE_RANDOM_CLASSES = 1000
_CLIP_LOGIT_SCALE = 100.0  # CLIP's learned temperature, exp(4.6052)
_PROJ_DIM = 256


@dataclass
class Features:
    """Pooled per-layer activations and gradients of one model on one image set.

    Attributes
    ----------
    model : str
        Registry name of the model.
    weights : str
        Where the weights came from, in words.
    layers : list of str
        Layer names in forward order, length n_layers.
    depth : ndarray of shape (n_layers,)
        Relative depth in [0, 1] (0 = first listed layer, 1 = last).
    activations : dict of str to ndarray of shape (n_images, dim_l)
        Pooled forward activation of each layer (float32, the layer's own units).
    gradients : dict of str to dict of str to ndarray of shape (n_images, dim_l)
        ``gradients[loss][layer]``: pooled gradient dL/dh_l of each image's loss with
        respect to that layer's output (float32, units of loss per unit activation).
    backward_order : dict of str to list of str
        Per loss, the layers in the order autograd produced their gradients (measured
        on the first batch). Under backpropagation this is the reverse forward order.
    image_ids : list of str
        Identifier of each image, length n_images.
    labels : list of str
        Category label of each image (empty strings when unknown).
    pool : str
        Pooling used for activations and gradients.
    meta : dict
        Extraction settings: dtype, device, loss seed, cache key, library version.
    """

    model: str
    weights: str
    layers: list[str]
    depth: np.ndarray
    activations: dict[str, np.ndarray]
    gradients: dict[str, dict[str, np.ndarray]]
    backward_order: dict[str, list[str]]
    image_ids: list[str]
    labels: list[str]
    pool: str
    meta: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[str]:
        return list(self.gradients)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def backward_rank(self, loss: str) -> np.ndarray:
        """Position of each layer (forward order) in the measured backward order.

        Returns
        -------
        ndarray of shape (n_layers,), int: 0 = gradient produced first.
        """
        order = self.backward_order[loss]
        return np.array([order.index(layer) for layer in self.layers])

    def save(self, path: str | os.PathLike) -> Path:
        """Write to one ``.npz`` file (atomically). Returns the path."""
        path = Path(path)
        arrays = {f"act/{layer}": a for layer, a in self.activations.items()}
        for loss, per_layer in self.gradients.items():
            arrays.update({f"grad/{loss}/{layer}": g for layer, g in per_layer.items()})
        header = {
            "model": self.model, "weights": self.weights, "layers": self.layers,
            "depth": self.depth.tolist(), "backward_order": self.backward_order,
            "image_ids": self.image_ids, "labels": self.labels, "pool": self.pool,
            "losses": self.losses, "meta": self.meta,
            # what a reader checks the arrays against (a cache file edited, or written
            # by something else, under a valid name is then recomputed, not believed)
            "arrays_digest": _arrays_digest(arrays),
        }
        arrays["header"] = np.array(json.dumps(header))
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Features":
        """Read a file written by :meth:`save`."""
        return cls._read(path)[0]

    @classmethod
    def _read(cls, path) -> tuple["Features", dict]:
        """The features of a file written by :meth:`save`, and its header."""
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            layers = header["layers"]
            activations = {layer: data[f"act/{layer}"] for layer in layers}
            gradients = {
                loss: {layer: data[f"grad/{loss}/{layer}"] for layer in layers}
                for loss in header["losses"]
            }
        return cls(
            model=header["model"], weights=header["weights"], layers=layers,
            depth=np.asarray(header["depth"]), activations=activations, gradients=gradients,
            backward_order=header["backward_order"], image_ids=header["image_ids"],
            labels=header["labels"], pool=header["pool"], meta=header["meta"],
        ), header


# --------------------------------------------------------------------------- inputs


def _as_model(model) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load(model)
    if isinstance(model, torch.nn.Module):
        return wrap(model)
    raise TypeError(
        f"'model' must be a registry or timm name, a timm module or a "
        f"gradbrain.models.LoadedModel; got "
        f"{type(model).__name__}. e.g. model=gradbrain.models.load('dinov3_vits16')"
    )


def _as_batch_tensor(model: LoadedModel, images) -> tuple[torch.Tensor, list[str], list[str]]:
    """Images → (n_images, 3, H, W) float tensor, ids and labels."""
    batches, ids, labels = _as_batches(model, images)
    return batches.tensor(), ids, labels


class _Preprocessed(torch.utils.data.Dataset):
    """PIL images, each preprocessed when it is asked for (in a DataLoader worker when
    there are workers): memory holds the images and a few batches, never the whole
    preprocessed set."""

    def __init__(self, images: list, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(_to_rgb(self.images[index]))


class _ImageBatches:
    """The images of an extraction, handed out batch by batch, preprocessed as they go.

    A float tensor (already preprocessed) is sliced. PIL images are preprocessed one
    batch at a time through a :class:`torch.utils.data.DataLoader` — in
    ``num_workers`` processes, into pinned memory and copied without blocking when the
    device is a GPU — so the next batches are prepared while the model runs on this one.
    """

    def __init__(self, model: LoadedModel, x: torch.Tensor | None = None,
                 images: list | None = None):
        self.model, self.x, self.images = model, x, images
        self.n = len(x) if x is not None else len(images)

    def digest_parts(self) -> list:
        """What identifies the images' content for a cache key: the tensor, or the
        preprocessing and one digest per image (computed image by image, no copy of
        the set)."""
        if self.x is not None:
            return [self.x]
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(self.model.transform()).encode())
        per_image = []
        for image in self.images:
            one = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
            one.update(image.tobytes())
            per_image.append(np.frombuffer(one.digest(), dtype=np.uint8))
        return [np.frombuffer(h.digest(), dtype=np.uint8), *per_image]

    def tensor(self) -> torch.Tensor:
        """All images at once, (n, 3, H, W) (small sets only: the DINO reference)."""
        if self.x is not None:
            return self.x
        return torch.cat([xb for _, _, xb in self.batches([(0, self.n)], torch.device("cpu"))])

    def batches(self, ranges, device: torch.device, num_workers: int = 0):
        """Yield ``(start, stop, x[start:stop] on device)`` for each ``(start, stop)``."""
        ranges = [(int(a), int(b)) for a, b in ranges]
        if self.x is not None:
            for start, stop in ranges:
                yield start, stop, self.x[start:stop].to(device)
            return
        pin = device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            _Preprocessed(self.images, self.model.transform()),
            batch_sampler=[list(range(a, b)) for a, b in ranges], num_workers=num_workers,
            pin_memory=pin, persistent_workers=False)
        for (start, stop), xb in zip(ranges, loader):
            _check_finite(xb, start)
            yield start, stop, xb.to(device, non_blocking=pin)


def _check_finite(x: torch.Tensor, first: int = 0) -> None:
    finite = torch.isfinite(x).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (first + torch.nonzero(~finite).flatten()).tolist()
        raise ValueError(f"'images' hold NaN or infinite pixel values (image(s) {bad[:5]}); "
                         "features of such images are meaningless. Fix or drop those images.")


def _as_batches(model: LoadedModel, images) -> tuple[_ImageBatches, list[str], list[str]]:
    """Images → their batches (:class:`_ImageBatches`), ids and labels; checked."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"'images' tensor must have shape (n_images, 3, height, width); got "
                f"{tuple(x.shape)}. Pass PIL images or an ImageSet to preprocess them."
            )
        if not x.is_floating_point():
            raise ValueError(
                f"'images' tensor must be float (already preprocessed); got {x.dtype}. Pass PIL "
                "images or an ImageSet to use the model's own preprocessing."
            )
        if tuple(x.shape[1:]) != tuple(model.input_size):
            raise ValueError(
                f"'images' tensor has shape {tuple(x.shape[1:])} per image but {model.name} "
                f"expects {tuple(model.input_size)}; preprocess with model.preprocess(images)."
            )
        ids = [str(i) for i in range(len(x))]
        labels = [""] * len(x)
    elif isinstance(images, ImageSet):
        if len(images) == 0:
            raise ValueError("'images' is empty; give at least one image.")
        return (_ImageBatches(model, images=images.images), list(images.ids),
                list(images.labels))
    elif isinstance(images, LazyImages):   # read when used, not here
        if len(images) == 0:
            raise ValueError("'images' is empty; give at least one image.")
        return (_ImageBatches(model, images=images), [str(i) for i in range(len(images))],
                [""] * len(images))
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("'images' is empty; give at least one image.")
        if not all(hasattr(im, "convert") for im in images):
            raise TypeError(
                "'images' must be a float tensor, an ImageSet or a sequence of PIL images; "
                f"got a sequence holding {type(images[0]).__name__}."
            )
        return (_ImageBatches(model, images=list(images)), [str(i) for i in range(len(images))],
                [""] * len(images))
    else:
        raise TypeError(
            "'images' must be a float tensor (n_images, 3, H, W), an ImageSet or a sequence "
            f"of PIL images; got {type(images).__name__}."
        )
    if len(x) == 0:
        raise ValueError("'images' is empty; give at least one image.")
    _check_finite(x)
    # normalised pixels lie within a few units of 0 (|x| <= ~3 for [0, 1] images and
    # timm's mean/std); raw 0..255 values would pass silently as very bright images
    largest = float(x.abs().max())
    if largest > 10:
        raise ValueError(
            f"'images' tensor holds values up to {largest:.1f}: raw 0..255 pixels, not a "
            "preprocessed batch. Pass PIL images or an ImageSet, or preprocess with "
            "model.preprocess(images)."
        )
    return _ImageBatches(model, x=x.float()), ids, labels


def _check_losses(losses) -> tuple[str, ...]:
    if isinstance(losses, str):
        losses = (losses,)
    if losses is None or not isinstance(losses, (Sequence, set, frozenset)):
        raise TypeError(f"'losses' must be a sequence of loss names from {list(LOSSES)} "
                        f"(or () for activations only); got {losses!r}.")
    losses = tuple(losses)
    for loss in losses:
        check_in_allowed("losses", loss, LOSSES)
    if len(set(losses)) != len(losses):
        raise ValueError(f"'losses' lists a loss twice: {list(losses)}.")
    return losses


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:  # bfloat16 changes verdicts (benchmarks/bench_precision.py)
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"'dtype' must be None, torch.float32, torch.bfloat16 or torch.float16; got "
            f"{dtype!r}. e.g. dtype=torch.float32"
        )
    return dtype


# --------------------------------------------------------------------------- pooling


def _pool(tensor: torch.Tensor, pool: str, n_prefix: int,
          channels_last: bool = False) -> torch.Tensor:
    """(n, tokens, dim), (n, C, H, W) or, ``channels_last``, (n, H, W, C) → (n, dim') float32."""
    if tensor.ndim == 4 and channels_last:
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.ndim == 3:
        cls = tensor[:, 0]
        mean = tensor[:, n_prefix:].mean(dim=1)
    elif tensor.ndim == 4:
        cls, mean = None, tensor.mean(dim=(2, 3))
    elif tensor.ndim == 2:
        cls, mean = None, tensor
    else:
        raise RuntimeError(f"Cannot pool a layer output of shape {tuple(tensor.shape)}.")
    if pool == "mean":
        out = mean
    elif pool == "cls":
        out = cls
    else:
        out = torch.cat([cls, mean], dim=1)
    return out.float()


def _check_pool(model: LoadedModel, pool: str) -> None:
    check_in_allowed("pool", pool, POOLS)
    if "cls" in pool and (model.spec.family != "vit" or model.num_prefix_tokens == 0):
        raise ValueError(
            f"pool={pool!r} needs a class token, but {model.name} ({model.spec.family}) has none; "
            "use pool='mean'."
        )


# --------------------------------------------------------------------------- losses


class _LossHeads:
    """The heads of the losses: the model's own classifier where it has one, else fixed
    random heads drawn on the CPU from ``seed``.

    ``describe`` says, per loss, which head was used (kept in ``Features.meta["heads"]``).
    """

    def __init__(self, model: LoadedModel, seed: int, device: torch.device,
                 class_embeddings: torch.Tensor | None = None):
        module = model.module
        # the width of forward_head(pre_logits=True): wider than num_features where a
        # head MLP/conv sits before the classifier (mobilenetv3_small_050: 1,024 vs 288)
        dim = int(getattr(module, "head_hidden_size", None) or module.num_features)
        g = torch.Generator().manual_seed(seed)
        self.prototypes = F.normalize(torch.randn(_DINO_PROTOTYPES, dim, generator=g), dim=1)
        self.projection = torch.randn(_PROJ_DIM, dim, generator=g) / dim**0.5
        self.target = torch.randn(_PROJ_DIM, generator=g)
        kind = model.spec.classifier
        has_slot = bool(getattr(module, "num_classes", 0))
        self.classifier = module.get_classifier() if has_slot and kind != "none" else None
        # distilled timm models (DeiT, LeViT, EfficientFormer) classify with two heads,
        # (head, head_dist), averaged by their eval forward_head — on two different tokens
        # for DeiT, so the logits are not a function of the pooled embedding: they are
        # taken from forward_head itself
        self.distilled = isinstance(self.classifier, tuple)
        self.forward_head = module.forward_head if self.distilled else None
        ce_dim = int(module.num_classes) if kind == "projection" and has_slot else dim
        self.ce_head = torch.randn(_CE_RANDOM_CLASSES, ce_dim, generator=g) / ce_dim**0.5
        self.class_embeddings = None
        self.ce_random = class_embeddings is None and not (
            kind == "classes" and self.classifier is not None)
        trained = "" if model.pretrained else ", randomly initialised"
        if class_embeddings is not None:
            if kind != "projection" or self.classifier is None:
                raise ValueError(
                    f"'class_embeddings' (a zero-shot head) needs an image-text model whose "
                    f"classifier slot is its image projection (e.g. clip_vitb16); {model.name} "
                    f"has classifier={kind!r}. Leave class_embeddings=None.")
            emb = torch.as_tensor(class_embeddings, dtype=torch.float32)
            if emb.ndim != 2 or emb.shape[1] != ce_dim or len(emb) < 2 \
                    or not torch.isfinite(emb).all():
                raise ValueError(
                    f"'class_embeddings' must be a finite array of shape (n_classes >= 2, "
                    f"{ce_dim}): the text embeddings of the class prompts; got "
                    f"{tuple(emb.shape)}.")
            self.class_embeddings = F.normalize(emb, dim=1)
            self.ce_description = (f"zero-shot: {_CLIP_LOGIT_SCALE:g} × cosine of the image "
                                   f"projection ({ce_dim}-d) with {len(emb)} class embeddings")
        elif kind == "classes" and self.classifier is not None:
            both = (", the mean of its class and distillation heads as timm's eval forward"
                    if self.distilled else "")
            self.ce_description = (f"the model's own classifier ({module.num_classes} "
                                   f"classes{trained}{both})")
        elif kind == "projection" and self.classifier is not None:
            self.ce_description = (f"fixed random {_CE_RANDOM_CLASSES}-class linear head on the "
                                   f"model's {ce_dim}-d image projection (no class embeddings "
                                   f"given: not a zero-shot classifier)")
        else:
            self.ce_description = (f"fixed random {_CE_RANDOM_CLASSES}-class linear head on "
                                   f"the {dim}-d embedding (the model has no classifier)")
        self.describe = {
            "ce": self.ce_description,
            "dino": f"fixed random {_DINO_PROTOTYPES}-prototype head on the {dim}-d embedding",
            "proj": f"fixed random {_PROJ_DIM}-d projection of the {dim}-d embedding",
        }
        self.to(device)

    def to(self, device: torch.device) -> "_LossHeads":
        """Move the fixed heads to ``device`` (the classifier moves with the model)."""
        for name in ("prototypes", "projection", "target", "ce_head", "class_embeddings"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def logits(self, embedding: torch.Tensor,
               features: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores (n, n_classes); ``features`` (``forward_features``' output) are
        needed by distilled models, whose heads read other tokens than the embedding."""
        if self.distilled:
            if features is None:
                raise ValueError("A distilled model's logits need its forward_features "
                                 "output (features=...).")
            return self.forward_head(features).float()
        if self.classifier is None:
            return embedding.float() @ self.ce_head.T
        out = self.classifier(embedding).float()
        if self.class_embeddings is not None:
            return _CLIP_LOGIT_SCALE * F.normalize(out, dim=1) @ self.class_embeddings.T
        return out @ self.ce_head.T if self.ce_random else out

    def dino_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.normalize(embedding.float(), dim=-1) @ self.prototypes.T

    def loss(self, name: str, embedding: torch.Tensor, teacher: torch.Tensor | None,
             center: torch.Tensor | None, features: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Sum over the batch of each image's loss (float32 scalar)."""
        if name == "ce":
            logits = self.logits(embedding, features)
            return F.cross_entropy(logits, logits.argmax(dim=1).detach(), reduction="sum")
        if name == "proj":
            z = embedding.float() @ self.projection.T
            return 0.5 * ((z - self.target) ** 2).sum()
        student = F.log_softmax(self.dino_scores(embedding) / _DINO_STUDENT_TEMP, dim=1)
        p_teacher = F.softmax((teacher - center) / _DINO_TEACHER_TEMP, dim=1)
        return -(p_teacher * student).sum()


def _teacher_view(x: torch.Tensor) -> torch.Tensor:
    """Deterministic second view: mirrored, zoomed by 15 %, centre-cropped back."""
    h, w = x.shape[-2:]
    big = F.interpolate(
        torch.flip(x, dims=[-1]), scale_factor=_DINO_ZOOM, mode="bilinear", align_corners=False
    )
    top, left = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
    return big[..., top : top + h, left : left + w].contiguous()


def _embed(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits embedding (n, num_features)."""
    return module.forward_head(module.forward_features(x), pre_logits=True)


# --------------------------------------------------------------------------- core


class _Capture:
    """Forward hooks that keep each listed layer's output tensor while enabled."""

    def __init__(self, module: torch.nn.Module, layers: Sequence[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.enabled = False
        self._handles = [
            module.get_submodule(layer).register_forward_hook(self._hook(layer)) for layer in layers
        ]

    def _hook(self, layer):
        def hook(_module, _inputs, output):
            if not self.enabled:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if layer in self.outputs:
                raise RuntimeError(f"Layer {layer!r} ran twice in one forward pass.")
            self.outputs[layer] = output
        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _extract_batch(model, heads, capture, x, layers, losses, pool, teacher, center, device,
                   dtype):
    """One batch: returns (activations dict, gradients dict, backward orders)."""
    module = model.module
    pool_args = (pool, model.num_prefix_tokens, model.spec.channels_last)
    capture.outputs = {}
    if not losses:
        with torch.inference_mode(), _autocast(device, dtype):
            capture.enabled = True
            module.forward_features(x)
            capture.enabled = False
        acts = {l: _pool(capture.outputs[l], *pool_args).cpu().numpy() for l in layers}
        return acts, {}, {}
    with torch.enable_grad(), _autocast(device, dtype):
        x = x.detach().requires_grad_(True)  # parameters are frozen: build the graph from x
        capture.enabled = True
        features = module.forward_features(x)
        embedding = module.forward_head(features, pre_logits=True)   # as _embed
        capture.enabled = False
        outputs = [capture.outputs[l] for l in layers]
        acts = {l: _pool(o.detach(), *pool_args).cpu().numpy() for l, o in zip(layers, outputs)}
        grads, orders = {}, {}
        for i, loss_name in enumerate(losses):
            produced: list[str] = []
            handles = [o.register_hook(_order_hook(produced, l)) for l, o in zip(layers, outputs)]
            loss = heads.loss(loss_name, embedding, teacher, center, features)
            gs = torch.autograd.grad(
                loss, outputs, retain_graph=i < len(losses) - 1, allow_unused=True
            )
            for handle in handles:
                handle.remove()
            grads[loss_name] = {
                l: (_pool(g, *pool_args) if g is not None
                    else torch.zeros_like(_pool(o.detach(), *pool_args))).cpu().numpy()
                for l, g, o in zip(layers, gs, outputs)
            }
            orders[loss_name] = produced
    capture.outputs = {}
    return acts, grads, orders


def _order_hook(produced: list, layer: str):
    def hook(grad):
        produced.append(layer)
    return hook


def _cache_key(model, x, layers, losses, pool, dtype, loss_seed, extra=()) -> str:
    """Hex key of everything that changes the result (``x``: the preprocessed images, or
    a list of arrays that identify them, :meth:`_ImageBatches.digest_parts`; ``extra``:
    further arrays, e.g. the DINO reference images and zero-shot class embeddings)."""
    parts = json.dumps({
        "model": model.name, "timm": model.spec.timm_name, "weights": model.fingerprint(),
        "losses": sorted(losses), "pool": pool, "layers": list(layers), "dtype": str(dtype),
        "loss_seed": loss_seed, "version": __version__, "heads": model.spec.classifier,
        "n_extra": [None if a is None else list(np.shape(a)) for a in extra],
    }, sort_keys=True)
    arrays = [np.frombuffer(parts.encode(), dtype=np.uint8),
              *(x if isinstance(x, list) else [x])]
    return hash_arrays(arrays + [np.asarray(a) for a in extra if a is not None])


def _resolve_cache(cache) -> Path | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return get_data_home() / "features"
    return Path(cache).expanduser()


def extract(
    model: LoadedModel | str | torch.nn.Module,
    images,
    *,
    losses: Sequence[str] | str = ("dino", "ce", "proj"),
    pool: str = "mean",
    layers: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    cache: bool | str | os.PathLike | None = None,
    loss_seed: int = 0,
    progress: bool = False,
    dino_reference=None,
    class_embeddings=None,
    num_workers: int | None = None,
) -> Features:
    """Pooled per-layer activations and backpropagated gradients.

    Parameters
    ----------
    model : LoadedModel, str or torch.nn.Module
        From :func:`gradbrain.models.load`; a bare name (registry or any timm model)
        loads random init; a timm module is wrapped with :func:`gradbrain.models.wrap`.
    images : torch.Tensor of shape (n_images, 3, H, W), ImageSet or sequence of PIL images
        A float tensor must already be preprocessed for ``model``; PIL images and image
        sets are preprocessed with the model's own timm config.
    losses : sequence of {"dino", "ce", "proj"}
        Losses whose gradients to compute (see the module docstring); ``()`` extracts
        activations only, under ``torch.inference_mode``.
    pool : {"cls", "mean", "cls+mean"}
        How token sequences / feature maps become vectors (see the module docstring).
    layers : sequence of str or None
        Subset of ``model.layers`` (kept in forward order); ``None`` for all.
    batch_size : int
        Images per forward/backward pass.
    device : str, torch.device or None
        ``None`` uses CUDA when available. Asking for CUDA without it warns and uses the CPU.
    dtype : torch.dtype or None
        Compute precision; ``None`` is float32 on every device. ``torch.bfloat16`` or
        ``torch.float16`` run the model under autocast: faster on a GPU, but not
        equivalent: on EfficientNet-Lite0 bfloat16 changes a layer's gradient by up to
        95 % (CPU) and 265 % (H200) of its norm, as ``ce``'s self-label flips between
        near-tied classes, and changed the hierarchy tests of 3 of 4 simulated studies
        (``benchmarks/bench_precision.py``; Validation, "Numerical precision").
        Outputs are always float32.
    cache : bool, path-like or None
        Folder for a disk cache (``True``: ``$GRADBRAIN_DATA/features``). The key covers
        the model's weights, the preprocessed images, losses, pool, layers, dtype,
        loss seed and library version. Batches are saved as they finish, so an
        interrupted extraction resumes where it stopped.
    loss_seed : int
        Seed of the fixed random loss heads.
    progress : bool
        Show a tqdm progress bar over batches.
    dino_reference : ImageSet, sequence of PIL images, torch.Tensor or None
        Images whose mean teacher output is the ``"dino"`` centre (at least
        16). ``None``: the first 64 embedded images. The centre never depends on the
        images being extracted, so an image's gradient is the same alone or in any set.
    class_embeddings : array of shape (n_classes, projection_dim) or None
        For image-text models (``clip_vitb16``): text embeddings of class prompts, e.g.
        "a photo of a {class}." for the 1,000 ImageNet classes, computed with the
        model's text tower (not shipped by timm). ``"ce"`` then classifies zero-shot;
        without them it uses a fixed random head on the image projection (warned).
    num_workers : int or None
        Processes that preprocess PIL images while the model runs (a
        :class:`torch.utils.data.DataLoader`; batches pinned and copied without blocking
        on a GPU). ``None``: up to 8 on a GPU (the CPU cores are otherwise idle), 0 on the
        CPU (the model needs the cores). Images are preprocessed batch by batch in every
        case, so memory holds the images and a few batches, not the preprocessed set
        (0.6 MiB per image at 224 px). A preprocessed tensor is used as given.

    Warns
    -----
    UserWarning
        When ``"ce"`` uses a fixed random head instead of a classifier the model was
        trained with (DINO, CLIP without ``class_embeddings``).

    Returns
    -------
    Features
        ``activations[layer]`` and ``gradients[loss][layer]``, each of shape
        (n_images, dim_layer); see :class:`Features`.
    """
    model = _as_model(model)
    losses = _check_losses(losses)
    _check_pool(model, pool)
    layers = _check_layers(model, layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"'batch_size' must be a positive integer; got {batch_size!r}.")
    if isinstance(loss_seed, bool) or not isinstance(loss_seed, (int, np.integer)) \
            or loss_seed < 0:
        raise ValueError(f"'loss_seed' must be a non-negative integer (it seeds the fixed "
                         f"random loss heads); got {loss_seed!r}. e.g. loss_seed=0")
    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if num_workers is None:
        num_workers = min(8, usable_cores()) if device.type == "cuda" else 0
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) \
            or num_workers < 0:
        raise ValueError(f"'num_workers' must be an integer >= 0 (0: preprocess in this "
                         f"process) or None; got {num_workers!r}.")
    batches, ids, labels = _as_batches(model, images)
    n = batches.n
    depth = model.depth[[model.layers.index(l) for l in layers]]
    x_ref = _dino_reference(model, dino_reference) if "dino" in losses else None
    if class_embeddings is not None:
        class_embeddings = np.asarray(class_embeddings, dtype=np.float32)
    heads = _LossHeads(model, loss_seed, torch.device("cpu"), class_embeddings)
    if "ce" in losses and heads.ce_random:
        warnings.warn(f"'ce' on {model.name} uses a {heads.ce_description}; its gradients are "
                      "those of an arbitrary classification task, not of a task the model "
                      "was trained on.", UserWarning, stacklevel=2)

    cache_dir = _resolve_cache(cache)
    key = final = partial = None
    if cache_dir is not None:
        key = _cache_key(model, batches.digest_parts(), layers, losses, pool, dtype,
                         loss_seed, extra=(x_ref, class_embeddings))
        final = cache_dir / f"{model.name}-{key}.npz"
        partial = cache_dir / f"{model.name}-{key}.partial"
        if final.is_dir() or partial.exists() and not partial.is_dir():
            # not a file this program wrote: neither read nor deleted, the features are
            # computed without the cache
            what = final if final.is_dir() else partial
            warnings.warn(f"{str(what)!r} is in the way of the feature cache (a "
                          f"{'folder' if what.is_dir() else 'file'} this program did not "
                          "write); the features are computed without caching. Move it away "
                          "to cache them.", RuntimeWarning, stacklevel=2)
            final = partial = None
        elif final.exists():
            cached = _load_cached(final, n, layers, losses, key)
            if cached is not None:
                cached.image_ids, cached.labels = ids, labels
                return cached
        if partial is not None:
            partial.mkdir(parents=True, exist_ok=True)

    module = _move(model.module, device)
    # eval mode for the extraction (dropout off, batch norm on its running statistics:
    # an image's features do not depend on its batch), the caller's modes restored after
    modes = [m.training for m in module.modules()]
    module.eval()
    try:
        heads.to(device)  # drawn on the CPU above, before the cache lookup
        center = None
        if "dino" in losses:
            center = _dino_centre(model, heads, x_ref, batch_size, device, dtype, loss_seed)

        # batches an interrupted run finished are read back; the others are computed,
        # their images preprocessed as they come (the next ones while this one runs)
        plan, start = [], 0
        while start < n:
            done = _find_chunk(partial, start)
            chunk = _read_chunk(done, layers, losses) if done is not None else None
            stop = chunk[0] if chunk is not None else min(start + batch_size, n)
            plan.append((start, stop, chunk))
            start = stop
        todo = batches.batches([(a, b) for a, b, chunk in plan if chunk is None], device,
                               num_workers)
        chunks: list[tuple[dict, dict]] = []
        orders: dict[str, list[str]] = {}
        capture = _Capture(module, layers)
        try:
            bar = tqdm(total=n, desc=f"{model.name}: activations + gradients", unit="img",
                       disable=not progress)
            for start, stop, chunk in plan:
                if chunk is not None:
                    _, acts, grads, batch_orders = chunk
                else:
                    _, _, xb = next(todo)
                    # the DINO teacher reads the same preprocessed batch (an image's
                    # teacher output does not depend on its batch: eval mode)
                    teacher = (_teacher_batch(model, heads, xb, device, dtype)
                               if "dino" in losses else None)
                    acts, grads, batch_orders = _extract_batch(
                        model, heads, capture, xb, layers, losses, pool, teacher, center, device, dtype
                    )
                    if partial is not None:
                        _write_chunk(partial, start, stop, acts, grads, batch_orders)
                if not orders:
                    orders = batch_orders
                chunks.append((acts, grads))
                bar.update(stop - start)
            bar.close()
        finally:
            capture.remove()
            todo.close()
    finally:
        for submodule, mode in zip(module.modules(), modes):
            submodule.training = mode

    features = Features(
        model=model.name,
        weights=model.weights,
        layers=list(layers),
        depth=np.asarray(depth, dtype=float),
        activations={l: np.concatenate([c[0][l] for c in chunks]) for l in layers},
        gradients={
            loss: {l: np.concatenate([c[1][loss][l] for c in chunks]) for l in layers}
            for loss in losses
        },
        backward_order={loss: orders.get(loss, []) for loss in losses},
        image_ids=ids,
        labels=labels,
        pool=pool,
        meta={"dtype": str(dtype), "device": str(device), "loss_seed": loss_seed,
              "cache_key": key, "version": __version__,
              "heads": {loss: heads.describe[loss] for loss in losses},
              "dino_reference": None if x_ref is None else
              ("the first 64 embedded images" if dino_reference is None
               else f"{len(x_ref)} reference images given by the caller")},
    )
    if final is not None:
        features.save(final)
        shutil.rmtree(partial, ignore_errors=True)
    return features


def differentiable_features(model: LoadedModel, x: torch.Tensor, *, loss: str | None = None,
                            layers: Sequence[str] | None = None, pool: str = "mean",
                            loss_seed: int = 0, dino_reference=None) -> dict[str, torch.Tensor]:
    """Pooled per-layer features of a preprocessed batch that keep their graph to ``x``.

    What :func:`extract` computes for one batch — the pooled activations (``loss=None``)
    or the pooled gradients of ``loss`` with respect to each layer's output — but as
    tensors through which autograd can differentiate with respect to the pixels: the
    gradients are taken with ``create_graph=True``, so a function of them has a
    second-order derivative (used to synthesise images for gradient encoders,
    :func:`gradbrain.insilico.synthesize`). The model runs in eval mode, float32, on
    the device of ``x``.

    Parameters
    ----------
    model : LoadedModel
    x : torch.Tensor of shape (n_images, 3, H, W)
        Preprocessed images (``model.preprocess``), float; typically requiring grad.
    loss : {"dino", "ce", "proj"} or None
        None: activations; else that loss's gradients (same heads and ``loss_seed`` as
        :func:`extract`; the DINO teacher and centre are constants, as there).
    layers, pool, loss_seed, dino_reference
        As :func:`extract` takes them.

    Returns
    -------
    dict of str to torch.Tensor of shape (n_images, dim_layer)
        Layer → pooled features, float32, in forward order. With ``x`` as given, they
        equal :func:`extract`'s (to float32 rounding).
    """
    model = _as_model(model)
    _check_pool(model, pool)
    if loss is not None:
        check_in_allowed("loss", loss, LOSSES)
    layers = _check_layers(model, layers)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() \
            or tuple(x.shape[1:]) != tuple(model.input_size):
        raise ValueError(f"'x' must be a float tensor of shape (n_images, "
                         f"{', '.join(map(str, model.input_size))}) (model.preprocess); got "
                         f"{getattr(x, 'shape', type(x).__name__)}.")
    device = x.device
    module = _move(model.module, device)
    modes = [m.training for m in module.modules()]
    module.eval()
    capture = _Capture(module, layers)
    pool_args = (pool, model.num_prefix_tokens, model.spec.channels_last)
    try:
        with torch.enable_grad():
            if loss is not None and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            capture.enabled = True
            features = module.forward_features(x)
            embedding = module.forward_head(features, pre_logits=True)   # as _embed
            capture.enabled = False
            outputs = [capture.outputs[layer] for layer in layers]
            if loss is None:
                return {layer: _pool(o, *pool_args) for layer, o in zip(layers, outputs)}
            heads = _LossHeads(model, loss_seed, device)
            teacher = center = None
            if loss == "dino":
                x_ref = _dino_reference(model, dino_reference)
                center = _dino_centre(model, heads, x_ref, 16, device, torch.float32, loss_seed)
                with torch.no_grad():
                    teacher = heads.dino_scores(_embed(module, _teacher_view(x.detach())))
            value = heads.loss(loss, embedding, teacher, center, features)
            grads = torch.autograd.grad(value, outputs, create_graph=True, allow_unused=True)
            return {layer: (_pool(g, *pool_args) if g is not None
                            else torch.zeros_like(_pool(o, *pool_args)))
                    for layer, g, o in zip(layers, grads, outputs)}
    finally:
        capture.remove()
        capture.outputs = {}
        for submodule, mode in zip(module.modules(), modes):
            submodule.training = mode


def _check_layers(model: LoadedModel, layers) -> list[str]:
    """``layers`` (None: all) as a checked list in forward order."""
    if layers is None:
        return list(model.layers)
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [l for l in layers if l not in model.layers]
    if unknown or not layers:
        raise ValueError(
            f"'layers' must be a non-empty subset of {model.name}'s layers; unknown: "
            f"{unknown}. Valid: {model.layers}"
        )
    return [l for l in model.layers if l in layers]


_DINO_REFERENCE_IMAGES = 64
_DINO_MIN_REFERENCE = 16


def _dino_reference(model: LoadedModel, reference) -> torch.Tensor:
    """Preprocessed images whose mean teacher output centres the DINO teacher."""
    if reference is None:
        reference = load_embedded(_DINO_REFERENCE_IMAGES)
    x_ref = _as_batch_tensor(model, reference)[0]   # a few dozen images: held whole
    if len(x_ref) < _DINO_MIN_REFERENCE:
        raise ValueError(
            f"'dino_reference' holds {len(x_ref)} images; the DINO centre (a mean teacher "
            f"output over 1,024 prototypes) needs at least {_DINO_MIN_REFERENCE}. Pass more "
            "images, or None for the 64 embedded reference images.")
    return x_ref


_CENTRES: dict[str, torch.Tensor] = {}  # DINO centres computed in this process


def _dino_centre(model, heads, x_ref, batch_size, device, dtype, loss_seed) -> torch.Tensor:
    """Mean teacher output over the reference images (n_prototypes,), kept per process."""
    tag = json.dumps([model.fingerprint(), loss_seed, str(dtype)]).encode()
    key = hash_arrays([np.frombuffer(tag, dtype=np.uint8), x_ref])
    if key not in _CENTRES:
        if len(_CENTRES) >= 16:
            _CENTRES.pop(next(iter(_CENTRES)))
        _CENTRES[key] = _teacher_scores(model, heads, _ImageBatches(model, x=x_ref), batch_size,
                                        device, dtype).mean(dim=0)
    return _CENTRES[key].to(device)


def _move(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module.to(device)`` in place; a move that fails half-way is undone first."""
    tensors = list(module.parameters()) + list(module.buffers())
    before = tensors[0].device if tensors else device
    try:
        return module.to(device)
    except BaseException:
        module.to(before)  # parameters moved before the failure go back
        raise


def _teacher_batch(model, heads, xb: torch.Tensor, device, dtype) -> torch.Tensor:
    """DINO teacher prototype scores of the second view of one batch, (n, n_prototypes),
    float32 on ``device``."""
    with torch.no_grad(), _autocast(device, dtype):
        return heads.dino_scores(_embed(model.module, _teacher_view(xb))).float()


def _teacher_scores(model, heads, batches: _ImageBatches, batch_size, device,
                    dtype) -> torch.Tensor:
    """:func:`_teacher_batch` over every image, batch by batch, on the CPU (n, n_prototypes)."""
    n = batches.n
    ranges = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    return torch.cat([_teacher_batch(model, heads, xb, device, dtype).cpu()
                      for _, _, xb in batches.batches(ranges, device)])


def _chunk_name(start: int, stop: int) -> str:
    return f"{start:07d}-{stop:07d}.npz"


def _find_chunk(partial: Path | None, start: int) -> Path | None:
    if partial is None:
        return None
    found = sorted(partial.glob(f"{start:07d}-*.npz"))
    return found[0] if found else None


def _arrays_digest(arrays: dict) -> str:
    """Digest of named arrays (names in sorted order, each array's dtype, shape, values)."""
    names = sorted(k for k in arrays if k.startswith(("act/", "grad/")))
    return hash_arrays([np.frombuffer(json.dumps(names).encode(), np.uint8)]
                       + [arrays[k] for k in names])


def _check_arrays(arrays: dict, n_images: int, stated_digest) -> None:
    """Raise ValueError naming what is wrong with cached feature arrays: a digest that
    does not match, another dtype than float32, non-finite values, another number of
    images, or an activation and a gradient of one layer of different widths."""
    if stated_digest != _arrays_digest(arrays):
        raise ValueError("its arrays do not match the digest written with them (edited, "
                         "or written by something else)")
    for name, values in arrays.items():
        if not name.startswith(("act/", "grad/")):
            continue
        if values.dtype != np.float32:
            raise ValueError(f"{name} is {values.dtype}, not float32")
        if values.ndim != 2 or len(values) != n_images:
            raise ValueError(f"{name} has shape {values.shape}, not ({n_images}, width)")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        if name.startswith("grad/"):
            width = arrays[f"act/{name.split('/', 2)[2]}"].shape[1]
            if values.shape[1] != width:
                raise ValueError(f"{name} is {values.shape[1]} wide, its activation {width}")


def _write_chunk(partial, start, stop, acts, grads, orders) -> None:
    arrays = {f"act/{l}": a for l, a in acts.items()}
    for loss, per_layer in grads.items():
        arrays.update({f"grad/{loss}/{l}": g for l, g in per_layer.items()})
    arrays["orders"] = np.array(json.dumps(orders))
    arrays["digest"] = np.array(_arrays_digest(arrays))
    with atomic_path(partial / _chunk_name(start, stop), suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _read_chunk(path: Path, layers, losses):
    """A cached batch, or None (after deleting it) when the file is unreadable."""
    try:
        start, stop = (int(part) for part in path.stem.split("-"))
        with np.load(path, allow_pickle=False) as data:
            acts = {l: data[f"act/{l}"] for l in layers}
            grads = {loss: {l: data[f"grad/{loss}/{l}"] for l in layers} for loss in losses}
            orders = json.loads(str(data["orders"]))
            stated = str(data["digest"]) if "digest" in data.files else None
            arrays = {k: data[k] for k in data.files if k.startswith(("act/", "grad/"))}
        _check_arrays(arrays, stop - start, stated)
    except _CACHE_ERRORS as err:
        _discard_corrupt(path, err)
        return None
    return stop, acts, grads, orders


# what a truncated, emptied or foreign cache file raises when read
_CACHE_ERRORS = (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile,
                 json.JSONDecodeError)


def _discard_corrupt(path: Path, err: BaseException) -> None:
    """Warn (naming the file) and delete an unreadable cache file: it is recomputed."""
    discard_unreadable(path, err, what="Feature cache file",
                       then="its features are recomputed", stacklevel=3)


def _load_cached(path: Path, n_images: int, layers, losses,
                 key: str | None = None) -> "Features | None":
    """The cached features at ``path``, or None (after deleting it) when unreadable."""
    try:
        cached, header = Features._read(path)
        if cached.layers != list(layers) or sorted(cached.losses) != sorted(losses):
            raise ValueError("its layers or losses differ from the request")
        arrays = {f"act/{l}": a for l, a in cached.activations.items()}
        for loss, per_layer in cached.gradients.items():
            arrays.update({f"grad/{loss}/{l}": g for l, g in per_layer.items()})
        _check_arrays(arrays, n_images, header.get("arrays_digest"))
        if cached.meta.get("cache_key") not in (None, key):
            raise ValueError(f"it was written for cache key {cached.meta['cache_key']}, not "
                             f"{key} (its file name)")
    except _CACHE_ERRORS as err:
        _discard_corrupt(path, err)
        return None
    return cached


# --------------------------------------------------------------------------- analyses


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment between two representations of the same images.

    Parameters
    ----------
    x : ndarray of shape (n_images, dim_x)
    y : ndarray of shape (n_images, dim_y)

    Returns
    -------
    float in [0, 1]: 1 when ``y`` is an orthogonal transform and scaling of ``x``.

    Notes
    -----
    ``CKA = ‖Yc^T Xc‖_F² / (‖Xc^T Xc‖_F ‖Yc^T Yc‖_F)`` with column-centred Xc, Yc
    (Kornblith et al. 2019).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(
            f"linear_cka needs two 2-D arrays with the same number of rows (images); got "
            f"shapes {x.shape} and {y.shape}."
        )
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else 0.0


def cka_matrix(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    """Linear CKA between every representation in ``a`` and every one in ``b``.

    Returns
    -------
    ndarray of shape (len(a), len(b)), rows in ``a``'s order, columns in ``b``'s.
    """
    return np.array([[linear_cka(xa, xb) for xb in b.values()] for xa in a.values()])


def _block_scaled(blocks: Sequence[np.ndarray], train: np.ndarray) -> np.ndarray:
    """Concatenate feature blocks, each z-scored on ``train`` rows and divided by √dim.

    Every block (layer) then adds the same total variance to a ridge kernel, whatever its
    width; columns constant over the training rows become 0.
    """
    out = []
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        mean, std = block[train].mean(axis=0), block[train].std(axis=0)
        out.append(np.where(std > 0, (block - mean) / np.where(std > 0, std, 1), 0.0)
                   / np.sqrt(block.shape[1]))
    return np.concatenate(out, axis=1)


def _ridge_predictions(X: torch.Tensor, Y: torch.Tensor, fit: np.ndarray, apply: np.ndarray,
                       alphas: np.ndarray) -> torch.Tensor:
    """Ridge (with intercept) fit on rows ``fit``, predictions on rows ``apply``, per alpha.

    Dual form through one eigendecomposition of the centred training kernel.

    Returns
    -------
    Tensor of shape (n_alphas, len(apply), n_targets).
    """
    x_fit, y_fit = X[fit], Y[fit]
    x_mean, y_mean = x_fit.mean(0), y_fit.mean(0)
    xc = x_fit - x_mean
    eigval, eigvec = torch.linalg.eigh(xc @ xc.T)
    eigval = eigval.clamp_min(0)
    cross = (X[apply] - x_mean) @ xc.T @ eigvec               # (n_apply, n_fit)
    projected = eigvec.T @ (y_fit - y_mean)                   # (n_fit, n_targets)
    alphas_t = torch.as_tensor(alphas, dtype=X.dtype, device=X.device)
    inverse = 1.0 / (eigval[None, :] + alphas_t[:, None])     # (n_alphas, n_fit)
    return torch.einsum("pf,af,ft->apt", cross, inverse, projected) + y_mean


#: Penalties of the residualising read-outs (:func:`beyond_activations`): the ridge
#: grid extended down to 1e-3, as the feature blocks are standardised.
RESIDUAL_ALPHAS = np.concatenate([np.logspace(-3, -1, 3), DEFAULT_ALPHAS])


def _cross_fitted_residual(G, X: torch.Tensor, train_rows: np.ndarray, test_rows: np.ndarray,
                           folds: list, alphas: np.ndarray) -> tuple[np.ndarray, float]:
    """``G`` (n_images, dim) minus its ridge prediction from ``X``, in ``G``'s units:
    cross-fitted on the training rows (``folds`` index into them), fitted on all of them
    for the test rows; the alpha minimises the held-out MSE of the z-scored ``G``."""
    G = np.asarray(G, dtype=np.float64)
    n_train = len(train_rows)
    mean, std = G[train_rows].mean(axis=0), G[train_rows].std(axis=0)
    scale = np.where(std > 0, std, 1.0)
    Y = torch.as_tensor((G - mean) / scale * (std > 0), dtype=torch.float64, device=X.device)
    held_out = torch.empty((len(alphas), n_train, Y.shape[1]), dtype=torch.float64,
                           device=X.device)
    for fold in folds:
        rest = np.setdiff1d(np.arange(n_train), fold)
        held_out[:, fold] = _ridge_predictions(X, Y, train_rows[rest], train_rows[fold], alphas)
    mse = ((held_out - Y[train_rows][None]) ** 2).mean(dim=(1, 2))
    best = int(torch.argmin(mse))
    predicted = torch.empty_like(Y)
    predicted[train_rows] = held_out[best]
    if len(test_rows):
        predicted[test_rows] = _ridge_predictions(X, Y, train_rows, test_rows,
                                                  alphas[best:best + 1])[0]
    return G - (mean + scale * (std > 0) * predicted.cpu().numpy()), float(alphas[best])


def beyond_activations(features: Features, train, *, loss: str | None = None,
                       alphas=None, cv: int = 5, device=None) -> Features:
    """Gradients with what the activations predict of them removed (their unique part).

    For every layer ``l``, the gradient features ``G_l`` (n_images, dim_l) are regressed
    on the activations of **all** layers (each layer's block z-scored and weighted by
    1/√dim so that every layer counts equally) by ridge regression fitted on the
    training images only, with one alpha per layer chosen by ``cv``-fold
    cross-validation (mean squared error of the z-scored gradient features). What is
    returned for each image is ``G_l`` minus its prediction, in ``G_l``'s own units:

    - training images get their **cross-fitted** residual (predicted by the fold model
      that did not see them), so that they are distributed as the test residuals are;
    - test images get the residual of the model fitted on all training images.

    Encoding a brain signal from these residuals measures the variance of gradients
    beyond what a linear read-out of the activations explains: all variance the two
    share is credited to the activations (the conservative attribution; in ordinary least
    squares the explained variance of ``y ~ residual`` equals R²(activations +
    gradients) − R²(activations), the usual variance-partitioning subtraction).

    Parameters
    ----------
    features : Features
        Extracted activations and gradients.
    train : array-like of bool, shape (n_images,)
        Training images (e.g. ``study.split == "train"``); the regression never sees the
        others.
    loss : str or None
        Gradient loss to residualise; default all of ``features.losses``.
    alphas : array-like or None
        Ridge penalties to choose from (default :data:`RESIDUAL_ALPHAS`:
        :data:`gradbrain.ridge.DEFAULT_ALPHAS` extended down to 1e-3, as the blocks are
        standardised).
    cv : int
        Contiguous folds of the training images (alpha choice and cross-fitting).
    device : str, torch.device or None
        Where the linear algebra runs (float64).

    Returns
    -------
    Features
        Same model, layers, activations and backward order; ``gradients`` holds the
        residuals of the chosen loss(es), float32; ``meta["gradients"]`` says
        ``"beyond activations"`` and ``meta["residual_alpha"][loss]`` the alpha per layer.
    """
    train = np.asarray(train)
    if train.dtype != bool or train.shape != (features.n_images,):
        raise ValueError(f"'train' must be a boolean mask over the {features.n_images} images "
                         f"(e.g. study.split == 'train'); got dtype {train.dtype} and shape "
                         f"{train.shape}.")
    n_train = int(train.sum())
    if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ValueError(f"'cv' must be an integer >= 2 (folds of the training images); got "
                         f"{cv!r}.")
    if n_train < 2 * cv:
        raise ValueError(f"{n_train} training images are too few for {cv}-fold "
                         f"cross-validation; give at least {2 * cv}, or a smaller 'cv'.")
    losses = features.losses if loss is None else [loss]
    for name in losses:
        check_in_allowed("loss", name, features.losses)
    alphas = np.asarray(RESIDUAL_ALPHAS if alphas is None else alphas, dtype=np.float64)
    if alphas.ndim != 1 or not len(alphas) or not np.all(np.isfinite(alphas)) \
            or np.any(alphas <= 0):
        raise ValueError(f"'alphas' must be a 1-D array of positive numbers; got {alphas!r}.")
    device = resolve_device(device)

    train_rows, test_rows = np.flatnonzero(train), np.flatnonzero(~train)
    X = torch.as_tensor(_block_scaled(list(features.activations.values()), train),
                        dtype=torch.float64, device=device)
    folds = np.array_split(np.arange(n_train), cv)
    gradients, chosen = dict(features.gradients), {}
    for name in losses:
        per_layer, chosen[name] = {}, {}
        for layer in features.layers:
            residual, chosen[name][layer] = _cross_fitted_residual(
                features.gradients[name][layer], X, train_rows, test_rows, folds, alphas)
            per_layer[layer] = residual.astype(np.float32)
        gradients[name] = per_layer
    meta = {**features.meta, "gradients": "beyond activations",
            "residual_alpha": {**features.meta.get("residual_alpha", {}), **chosen}}
    return Features(model=features.model, weights=features.weights, layers=list(features.layers),
                    depth=features.depth, activations=features.activations, gradients=gradients,
                    backward_order=features.backward_order, image_ids=list(features.image_ids),
                    labels=list(features.labels), pool=features.pool, meta=meta)


def category_decoding(
    representations: dict[str, np.ndarray], labels: Sequence[str], *, cv: int = 5,
    seed: int = 0, alphas: Sequence[float] = tuple(np.logspace(-2, 6, 17)),
) -> dict[str, float]:
    """Cross-validated accuracy of a linear classifier of ``labels`` from each representation.

    The classifier is scikit-learn's ``RidgeClassifierCV`` on standardised features: one
    ridge regression of the ±1-coded classes, its penalty chosen among ``alphas`` by
    efficient leave-one-out inside each training fold (so the held-out fold never picks
    it). With fewer images than features it is solved in the dual, which keeps a table of
    every layer × signal fast on a laptop (a multinomial logistic regression took minutes
    per model on ill-conditioned random-init features).

    Parameters
    ----------
    representations : dict of str to ndarray of shape (n_images, dim)
    labels : sequence of str, length n_images
    cv : int
        Stratified folds (shuffled with ``seed``).
    alphas : sequence of float
        Candidate ridge penalties (on standardised features).

    Returns
    -------
    dict of str to float: mean held-out accuracy (chance = 1 / n_categories).
    """
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    counts = np.unique(labels, return_counts=True)[1]
    if len(counts) < 2 or counts.min() < cv:
        raise ValueError(
            f"category_decoding needs ≥2 categories with ≥cv={cv} images each; got counts "
            f"{counts.tolist()}. Use more images or a smaller cv."
        )
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.asarray(alphas, float)))
    return {
        name: float(cross_val_score(clf, x, labels, cv=folds).mean())
        for name, x in representations.items()
    }


def resolve_loss(features: Features, loss: str | None) -> str:
    """The gradient loss to use: ``loss``, or the features' first; checked."""
    loss = loss or features.losses[0]
    if loss not in features.losses:
        raise ValueError(f"'loss' must be one of the features' losses {features.losses}; "
                         f"got {loss!r}.")
    return loss


def gradient_part(features: Features) -> str:
    """Whether ``features`` hold the gradients as extracted (``"whole"``) or their part
    beyond activations (``"unique"``, from :func:`beyond_activations`)."""
    return "unique" if features.meta.get("gradients") == "beyond activations" else "whole"


def signals(features: Features) -> dict[str, dict[str, np.ndarray]]:
    """``{"activation": acts, "gradient (ce)": grads_ce, ...}``."""
    out = {signal_name(): features.activations}
    out.update({signal_name(loss): g for loss, g in features.gradients.items()})
    return out


def norms_table(features: Sequence[Features], labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean L2 norm per image of every layer's activation and gradients.

    Returns
    -------
    DataFrame with columns model, layer, depth, signal, norm (one row per
    model × signal × layer).
    """
    labels = labels or [f.model for f in features]
    rows = []
    for label, feats in zip(labels, features):
        for signal, per_layer in signals(feats).items():
            for layer, depth in zip(feats.layers, feats.depth):
                norm = float(np.linalg.norm(per_layer[layer], axis=1).mean())
                rows.append({"model": label, "layer": layer, "depth": float(depth),
                             "signal": signal, "norm": norm})
    return pd.DataFrame(rows)


def decoding_table(features: Sequence[Features], labels: Sequence[str] | None = None, *,
                   targets: Sequence[str] | None = None, cv: int = 5,
                   seed: int = 0) -> pd.DataFrame:
    """Decoding accuracy of a per-image target from every layer's activation and gradients.

    Parameters
    ----------
    features : sequence of Features
        Extracted on the same images, in the same order.
    labels : sequence of str or None
        Name of each Features in the table (default: their model names).
    targets : sequence of str or None
        Class of each image, length n_images (default: each Features' ``labels``).
    cv : int
        Stratified folds, lowered to the size of the smallest class when needed.

    Returns
    -------
    DataFrame with columns model, layer, depth, signal, accuracy (held-out, 0–1) and
    n_images (the images it was measured on).
    """
    labels = labels or [f.model for f in features]
    rows = []
    for label, feats in zip(labels, features):
        y = np.asarray(feats.labels if targets is None else targets)
        if len(y) != feats.n_images:
            raise ValueError(
                f"'targets' has {len(y)} entries but {label} has {feats.n_images} images."
            )
        folds = max(2, min(cv, int(np.unique(y, return_counts=True)[1].min())))
        for signal, per_layer in signals(feats).items():
            scores = category_decoding(per_layer, y, cv=folds, seed=seed)
            for layer, depth in zip(feats.layers, feats.depth):
                rows.append({"model": label, "layer": layer, "depth": float(depth),
                             "signal": signal, "accuracy": scores[layer],
                             "n_images": int(len(y))})
    return pd.DataFrame(rows)


def best_decoding_depths(table: pd.DataFrame) -> pd.DataFrame:
    """Where each signal decodes best, and every depth that decodes as well.

    A single "best depth" misleads when several layers sit at the same accuracy (e.g. all
    at ceiling, 1.00): the arg-max is then whichever comes first. So each (model, signal)
    gets its best accuracy and *all* depths whose accuracy is within one binomial
    standard error of it, ``sqrt(p (1 - p) / n)`` at the best accuracy ``p`` over the
    table's ``n_images`` (with ``p`` kept at least ``1 / n`` from 0 and 1, so that a
    ceiling still has a resolution of one image).

    Parameters
    ----------
    table : DataFrame
        :func:`decoding_table`'s rows (columns model, depth, signal, accuracy, n_images).

    Returns
    -------
    DataFrame, one row per (model, signal): ``model``, ``signal``, ``accuracy`` (the
    best, 0–1), ``depth`` (the first depth that reaches it), ``tolerance`` (the standard
    error), ``n_tied`` (depths within it, this one included), ``tied_from`` and
    ``tied_to`` (their shallowest and deepest depth), ``n_layers`` and ``summary`` (in
    words: "at depth 0.50 (accuracy 0.60)", or "equally well (accuracy 1.00 ± 0.02) at 3
    of 5 depths, 0.25–1.00").
    """
    missing = {"model", "signal", "depth", "accuracy", "n_images"} - set(table.columns)
    if missing:
        raise ValueError(f"'table' must be decoding_table's output; it lacks {sorted(missing)}.")
    rows = []
    for (model, signal), group in table.groupby(["model", "signal"], sort=False):
        group = group.sort_values("depth")
        accuracy = group.accuracy.to_numpy(float)
        if not np.isfinite(accuracy).any():
            raise ValueError(f"No finite decoding accuracy for {model} {signal}.")
        n = int(group.n_images.iloc[0])
        best = float(np.nanmax(accuracy))
        p = min(max(best, 1 / n), 1 - 1 / n)
        tolerance = float(np.sqrt(p * (1 - p) / n))
        tied = group[accuracy >= best - tolerance - 1e-12]
        depth = float(group.depth.to_numpy()[np.nanargmax(accuracy)])
        where = (f"at depth {depth:.2f} (accuracy {best:.2f})" if len(tied) == 1 else
                 f"equally well (accuracy {best:.2f} ± {tolerance:.2f}) at {len(tied)} of "
                 f"{len(group)} depths, {tied.depth.min():.2f}–{tied.depth.max():.2f}")
        rows.append({"model": model, "signal": signal, "accuracy": best, "depth": depth,
                     "tolerance": tolerance, "n_tied": len(tied),
                     "tied_from": float(tied.depth.min()), "tied_to": float(tied.depth.max()),
                     "n_layers": len(group), "summary": where})
    return pd.DataFrame(rows)
