"""Shared helpers: parameter validation, data home, hashing and atomic writes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import os
import shutil
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


def check_positive_int_or_none(name: str, value) -> None:
    """Raise a ValueError naming the parameter unless ``value`` is None or an integer >= 1
    (booleans are refused)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < 1):
        raise ValueError(f"'{name}' must be a positive integer or None; got {value!r}.")


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

    Nothing partial is left behind: on error the temporary file is removed. The
    temporary name carries this process's id (``.<name>.tmp-<pid>-…``), so files left
    by a killed process are recognised and removed by the next write to ``path``
    (:func:`clean_stale_temporaries`). The file gets the permissions any new file of
    this process gets (``0o666`` less the umask), not the owner-only ones of a
    temporary file, so that a study saved in a shared folder is readable there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-",
                               suffix=suffix or "".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            default_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity where the OS says; else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a new file (``0o666``) or folder (``0o777``) of this
    process gets, less the umask: temporary files and folders are made owner-only."""
    mask = os.umask(0o022)   # read by setting it and setting it back
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:  # Linux: the state letter follows the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings of ``path`` left by processes that no longer run.

    Temporary files and folders are named ``.<name>.tmp-<pid>-…`` (and
    ``.<name>.old-<pid>-…`` for a folder set aside during a swap, see
    :meth:`gradbrain.data.Study.save`). Those of a live process are left alone. A
    set-aside folder whose swap was cut short — ``path`` itself missing — is moved back
    into place rather than deleted.

    Returns
    -------
    list of Path
        What was removed (or restored).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    cleaned = []
    for entry in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-*-*")):
        kind, _, rest = entry.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            os.replace(entry, path)  # the swap died between "aside" and "in": undo it
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        cleaned.append(entry)
    return cleaned


def discard_unreadable(path: str | os.PathLike, err: BaseException, *, what: str, then: str,
                       stacklevel: int = 2) -> None:
    """Warn that a cached file is unreadable (naming it and the error), and delete it.

    Parameters
    ----------
    path : path-like
        The cached file.
    err : BaseException
        What reading it raised.
    what, then : str
        What the file is (``"Feature cache file"``) and what happens instead
        (``"its features are recomputed"``).
    stacklevel : int
        As for :func:`warnings.warn`, counted from the caller.
    """
    warnings.warn(f"{what} {str(path)!r} is unreadable ({type(err).__name__}: {err}); it was "
                  f"deleted and {then}.", RuntimeWarning, stacklevel=stacklevel + 1)
    Path(path).unlink(missing_ok=True)


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
    """Turn ``None`` / ``"cuda"`` / ``"cuda:N"`` / ``"cpu"`` into a usable device.

    ``None`` picks CUDA when available. Asking for CUDA where there is none warns
    and falls back to the CPU. Any other device (``"gpu"``, ``"mps"``, ``"meta"``…) is
    refused with one clear error, before any work: the kernels need float64 linear
    algebra, which only the CPU and CUDA provide.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hint = "Use device='cpu', 'cuda', 'cuda:N' or None (CUDA when available)."
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"'device' must be a string, a torch.device or None; got "
                        f"{type(device).__name__}. {hint}")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"'device' {device!r} is not a device torch knows. {hint}") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"'device' must be the CPU or a CUDA GPU; got {device!r}. {hint}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            "device='cuda' was asked for but CUDA is not available; running on the CPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return parsed


def moved_names(module: str, moved: dict[str, str]):
    """A module ``__getattr__`` that keeps names moved elsewhere importable for one release.

    Parameters
    ----------
    module : str
        The old module's ``__name__``.
    moved : dict of str to str
        Old name → the module that now holds it (under the same name, or
        ``"module:new_name"`` when it was renamed).

    Returns
    -------
    callable
        To assign to the old module's ``__getattr__`` (PEP 562): resolves a moved name
        from its new home with a :class:`DeprecationWarning` that names it; any other
        unknown name raises :class:`AttributeError` as usual.

    Examples
    --------
    >>> getattr_ = moved_names("old", {"sqrt": "math", "root": "math:sqrt"})
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     getattr_("root")(9.0)
    3.0
    """
    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, _, new = moved[name].partition(":")
        new = new or name
        warnings.warn(f"{module}.{name} moved to {target}.{new}; the old name will be "
                      "removed in the next release.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), new)

    return __getattr__


def signal_name(loss: str | None = None) -> str:
    """The name of a signal in results tables: ``"activation"``, or the gradients of a loss.

    The one place the name is built; results are keyed by it.

    Examples
    --------
    >>> signal_name(), signal_name("ce")
    ('activation', 'gradient (ce)')
    """
    return "activation" if loss is None else f"gradient ({loss})"
