"""Data: stimulus images (embedded or the user's), and the studies built on them.

``images`` → stimuli; ``study`` → the :class:`Study` container every dataset returns;
``simulated`` → the embedded study with a planted truth; ``geometry`` → fsaverage5
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
        ``"nsd"`` (Natural Scenes Dataset) and ``"things"`` (THINGS-MEG): the real data.
    **params
        Passed to the dataset's loader.
    """
    check_in_allowed("dataset", dataset, DATASETS)
    if dataset == "simulated":
        from .simulated import make_study

        return make_study(**params)
    name = {"nsd": "Natural Scenes Dataset (NSD)", "things": "THINGS-MEG"}[dataset]
    raise NotImplementedError(
        f"The {name} loader is not part of this version of gradbrain yet (it comes with its "
        "own loader module, gradbrain.data."
        f"{'nsd' if dataset == 'nsd' else 'things_meg'}). Run the chapter with "
        "dataset='simulated' (the demo profile) meanwhile."
    )
