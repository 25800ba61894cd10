"""Data: stimulus images (embedded or the user's), and the studies built on them.

``images`` → stimuli; ``study`` → the :class:`Study` container every dataset returns;
``simulated`` → the embedded study with a planted truth; ``nsd`` and ``things_meg`` →
the real datasets (NSD fMRI, THINGS-MEG); ``geometry`` → fsaverage5
and CTF-275 geometry that ship offline.
"""

from .._utils import check_in_allowed
from .images import EMBEDDED_SOURCES, N_EMBEDDED, ImageSet, load_embedded, load_folder
from .study import Study, noise_ceiling

__all__ = [
    "DATASETS", "EMBEDDED_SOURCES", "N_EMBEDDED", "ImageSet", "Study", "load_embedded",
    "load_folder", "load_study", "noise_ceiling",
]

DATASETS = ("simulated", "nsd", "things")


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
