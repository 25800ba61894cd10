"""Shared helpers: parameter validation, data home, hashing and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch


def check_in_allowed(name: str, value, allowed: Iterable) -> None:
    """Raise a ValueError naming the parameter, the allowed values and what was given."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"'{name}' must be one of {list(allowed)}; got {value!r}. "
            f"e.g. {name}={allowed[0]!r}"
        )


def get_data_home(data_home: str | os.PathLike | None = None) -> Path:
    """Folder for caches and downloaded data, created on demand.

    Order: the argument, the ``GRADBRAIN_DATA`` environment variable, then
    ``~/gradbrain_data``.
    """
    if data_home is None:
        data_home = os.environ.get("GRADBRAIN_DATA", Path.home() / "gradbrain_data")
    path = Path(data_home).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Nothing partial is left behind: on error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix or "".join(path.suffixes) or ".tmp", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def hash_update_array(h: "hashlib._Hash", array) -> None:
    """Feed an array's dtype, shape and bytes into a running hash."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())


def hash_arrays(arrays: Iterable) -> str:
    """Hex digest of a sequence of arrays (dtype, shape and values)."""
    h = hashlib.blake2b(digest_size=16)
    for array in arrays:
        hash_update_array(h, array)
    return h.hexdigest()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``None`` / ``"cuda"`` / ``"cpu"`` into a usable device.

    ``None`` picks CUDA when available. Asking for CUDA where there is none warns
    and falls back to the CPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            "device='cuda' was asked for but CUDA is not available; running on the CPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return device
