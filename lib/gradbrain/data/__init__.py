"""Data: stimulus images (embedded or the user's), and the studies built on them.

``images`` → stimuli; ``study`` → the :class:`Study` container every dataset returns;
``simulated`` → the embedded study with a planted truth; ``nsd`` and ``things_meg`` →
the real datasets (NSD fMRI, THINGS-MEG); ``geometry`` → fsaverage5
and CTF-275 geometry that ship offline.
"""

import os
from pathlib import Path

from .._utils import check_in_allowed, get_data_home
from .images import EMBEDDED_SOURCES, N_EMBEDDED, ImageSet, load_embedded, load_folder
from .study import Study, noise_ceiling

__all__ = [
    "DATASETS", "EMBEDDED_SOURCES", "N_EMBEDDED", "ImageSet", "Study", "get_data_home",
    "load_embedded", "load_folder", "load_study", "noise_ceiling", "shown_path", "study_path",
]

DATASETS = ("simulated", "nsd", "things")


def study_path(profile: str, dataset: str, study_dir=None) -> Path:
    """Where the data chapter saves (and later chapters load) a profile's study.

    Parameters
    ----------
    profile : str
        Name of the parameter profile (e.g. ``"demo"``).
    dataset : {"simulated", "nsd", "things"}
        The dataset the study holds.
    study_dir : path-like or None
        A folder chosen by the user; returned as given (``~`` expanded) when set.

    Returns
    -------
    Path
        ``study_dir``, or ``$GRADBRAIN_DATA/studies/<profile>-<dataset>``
        (:func:`get_data_home`).

    Examples
    --------
    >>> study_path("demo", "simulated", "/data/my-study").as_posix()
    '/data/my-study'
    """
    if study_dir:
        return Path(study_dir).expanduser()
    if not isinstance(profile, str) or not profile or "/" in profile or "\\" in profile:
        raise ValueError(f"'profile' must be a profile's name (e.g. 'demo'), not a path; "
                         f"got {profile!r}. Give a folder as study_dir instead.")
    check_in_allowed("dataset", dataset, DATASETS)
    return get_data_home() / "studies" / f"{profile}-{dataset}"


def shown_path(path) -> str:
    """A path as a page shows it: under the data home as ``$GRADBRAIN_DATA/…``, under
    the home folder as ``~/…``, else as given — no user's machine layout in a book.

    Examples
    --------
    >>> import os
    >>> os.environ["GRADBRAIN_DATA"] = "/tmp/gb-doc"
    >>> shown_path("/tmp/gb-doc/studies/demo-simulated")
    '$GRADBRAIN_DATA/studies/demo-simulated'
    >>> shown_path("relative/folder")
    'relative/folder'
    >>> del os.environ["GRADBRAIN_DATA"]
    """
    path = Path(path).expanduser()
    if not path.is_absolute():
        return path.as_posix()
    home = Path(os.environ.get("GRADBRAIN_DATA", Path.home() / "gradbrain_data")).expanduser()
    for base, shown in ((home, "$GRADBRAIN_DATA"), (Path.home(), "~")):
        for spelling in (base, base.resolve()):   # as set, and with links resolved
            if path == spelling or spelling in path.parents:
                rest = path.relative_to(spelling).as_posix()
                return shown if rest == "." else f"{shown}/{rest}"
    return path.as_posix()


def load_study(dataset: str = "simulated", **params) -> Study:
    """One entry point for every dataset the book runs on.

    Parameters
    ----------
    dataset : {"simulated", "nsd", "things"}
        ``"simulated"``: :func:`gradbrain.data.simulated.make_study` with ``params``.
        ``"things"``: THINGS-MEG, :func:`gradbrain.data.things_meg.load_subject` with
        ``params`` (``subject``, ``root``, ...). ``"nsd"``: the Natural Scenes Dataset,
        :func:`gradbrain.data.nsd.load_subject` with ``params`` (``subject``, ``images``,
        ``sessions``, ``source``, ...).
    **params
        Passed to the dataset's loader.
    """
    check_in_allowed("dataset", dataset, DATASETS)
    if dataset == "simulated":
        from .simulated import make_study

        return make_study(**params)
    if dataset == "things":
        from .things_meg import load_subject

        return load_subject(**params)
    from .nsd import load_subject

    return load_subject(**params)
