"""gradbrain: do backpropagated gradients follow the brain's visual hierarchy?

The shared library behind the gradbrain book. Modules follow the pipeline:
``data`` (stimuli, simulated and real studies) → ``models`` / ``features``
(activations and backpropagated gradients) → ``book`` (the papermill runner).
"""

from __future__ import annotations

__version__ = "0.1.0"

# torchvision (and so timm) fails to import when a CUDA torchvision wheel meets a
# CPU-only torch. The missing operator schemas are defined ahead when the version files
# show that mismatch; torchvision itself is imported only by what needs it (models).
from ._compat import prepare_torchvision as _prepare_torchvision

_prepare_torchvision()

__all__ = ["__version__"]
