"""What a chapter read: the inputs the book runner checks before it skips a chapter.

The runner (:mod:`gradbrain.book`) sets ``GRADBRAIN_PROVENANCE`` to a file before it
executes a chapter; library functions that read data a previous chapter (or the user)
wrote — :meth:`gradbrain.data.Study.load`, weights files in
:func:`gradbrain.models.load`, the real-data loaders — call :func:`record_input`, which
appends the input's path and fingerprint to that file. The chapter's stamp keeps the
list; the next run reruns the chapter when any fingerprint changed (the study was
rebuilt with another seed, a checkpoint was replaced), not only when its notebook,
parameters or the library changed. Outside the runner nothing is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ENV = "GRADBRAIN_PROVENANCE"

__all__ = ["ENV", "record_input", "fingerprint", "read_records", "stale_inputs",
           "stored_digest", "digest_in"]


def stored_digest(path: str | os.PathLike) -> str | None:
    """The content digest :meth:`gradbrain.data.Study.save` stored in a study folder
    (the ``digest`` attribute of its ``study.h5``); None if unreadable."""
    import h5py   # import cost: only where a study is read

    try:
        with h5py.File(Path(path) / "study.h5", "r") as f:
            return digest_in(f)
    except (OSError, KeyError, ValueError):
        return None


def digest_in(handle) -> str | None:
    """The content digest :meth:`gradbrain.data.Study.save` stored in an open
    ``study.h5`` (an ``h5py.File``); None if it has none."""
    digest = handle.attrs.get("digest")
    return None if digest is None else str(digest)


def fingerprint(path: str | os.PathLike) -> str | None:
    """A cheap identity of a file or folder's content; None when it does not exist.

    A saved :class:`~gradbrain.data.Study` folder is identified by the content digest
    :meth:`~gradbrain.data.Study.save` stored in it; any other file by its size and
    modification time (ns); any other folder by those of every file inside (hidden
    temporary files left out).
    """
    path = Path(path)
    if path.is_dir() and (path / "study.h5").is_file():
        digest = stored_digest(path)
        if digest is not None:
            return f"study:{digest}"
    if path.is_file():
        stat = path.stat()
        return f"file:{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(path)
            if any(part.startswith(".") for part in relative.parts):
                continue
            stat = file.stat()
            h.update(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return f"tree:{h.hexdigest()}"
    return None


def record_input(path: str | os.PathLike, kind: str = "file") -> None:
    """Note that the running chapter read ``path`` (no-op outside the book runner).

    Parameters
    ----------
    path : path-like
        A file or folder the chapter's results depend on.
    kind : str
        What it is, for the stamp's reader (``"study"``, ``"weights"``, ``"data"``…).
    """
    target = os.environ.get(ENV)
    if not target:
        return
    path = Path(path).expanduser().resolve()
    entry = {"kind": kind, "path": str(path), "fingerprint": fingerprint(path)}
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def read_records(path: str | os.PathLike) -> list[dict]:
    """The inputs recorded in a provenance file, each path once (its last fingerprint)."""
    path = Path(path)
    if not path.is_file():
        return []
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut by a kill: the chapter did not finish anyway
            continue
        entries[entry["path"]] = entry
    return list(entries.values())


def stale_inputs(records: list[dict]) -> list[str]:
    """Paths among ``records`` whose fingerprint changed (or that disappeared)."""
    return [r["path"] for r in records if fingerprint(r["path"]) != r.get("fingerprint")]
