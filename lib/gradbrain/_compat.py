"""Import-time compatibility shims (torchvision on a CPU-only torch build)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

# Schemas of torchvision's C++ operators. A CUDA build of torchvision imported next to
# a CPU build of torch cannot load its compiled extension, yet its Python side still
# registers fake/meta kernels for these operators at import time and fails with
# "operator torchvision::nms does not exist". Defining the schemas (no kernels) lets
# the import finish; transforms and models work, the compiled ops stay unavailable.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
    "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

_FRAGMENT: torch.library.Library | None = None
shim_applied = False  #: True once the torchvision work-around had to act.


def _define_missing_torchvision_schemas() -> None:
    """Define the torchvision operator schemas that are not registered yet."""
    global _FRAGMENT
    if _FRAGMENT is None:
        _FRAGMENT = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        name = schema.split("(", 1)[0]
        if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not _has_schema(name):
            _FRAGMENT.define(schema)


def _has_schema(name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def torchvision_is_cuda_build_beside_cpu_torch() -> bool:
    """Whether the installed torchvision is a CUDA build and torch a CPU-only one — read
    from torchvision's version file, without importing torchvision (which loads
    ``torch._dynamo``: seconds, tens of seconds on a loaded machine)."""
    if torch.version.cuda is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return False
    found = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
    return bool(found) and "+cu" in found.group(1)


def prepare_torchvision() -> None:
    """Make a later ``import torchvision`` (or ``import timm``) work on a CPU torch with a
    CUDA torchvision, without importing either now: the missing operator schemas are
    defined ahead, only when the version files show that mismatch."""
    global shim_applied
    if "torchvision" not in sys.modules and torchvision_is_cuda_build_beside_cpu_torch():
        _define_missing_torchvision_schemas()
        shim_applied = True


def import_torchvision():
    """Import torchvision, working around a CPU torch / CUDA torchvision mismatch.

    Acts only when the plain import fails with the missing-operator error; a
    matching torch/torchvision pair imports untouched.
    """
    global shim_applied
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or "does not exist" not in str(err):
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        _define_missing_torchvision_schemas()
        import torchvision
        shim_applied = True
    return torchvision
