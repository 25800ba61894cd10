"""What a chapter starts from: its study, its model and the features of one on the other.

Chapters 02–04 each open the same way — load the study the data chapter saved, load
the model, extract its features on the study's images — and say which data and
weights they ran on. :func:`chapter_inputs` does it once for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import __version__, models
from ..data import Study, study_path
from ..features import Features, extract

__all__ = ["ChapterInputs", "chapter_inputs"]


@dataclass
class ChapterInputs:
    """A chapter's study, model and features.

    Attributes
    ----------
    study : Study
    net : LoadedModel
        The model (:func:`gradbrain.models.load`).
    features : Features
        ``net``'s features on ``study.images`` (n_images = ``study.n_images``).
    path : Path or None
        Where the study was loaded from (None: given in memory).
    profile : str
        The parameter profile the chapter runs on.
    """

    study: Study
    net: models.LoadedModel
    features: Features
    path: Path | None
    profile: str

    def ran_on(self) -> str:
        """Which data and weights the chapter ran on, in words (two lines)."""
        source = f"{self.study.name} (from {self.path})" if self.path else self.study.name
        return (f"This chapter ran on profile '{self.profile}': {source},\n"
                f"features of {self.net.label}: {self.net.weights}; gradbrain {__version__}.")


def chapter_inputs(profile: str, dataset: str, *, model: str, weights=None, losses=("ce",),
                   pool: str = "mean", device=None, cache=True, study_dir=None,
                   study: Study | None = None, progress: bool = False) -> ChapterInputs:
    """Load a chapter's study and model and extract the model's features on its images.

    Parameters
    ----------
    profile : str
        The parameter profile (names the study folder, see
        :func:`gradbrain.data.study_path`).
    dataset : {"simulated", "nsd", "things"}
    model : str
        Registry name (:func:`gradbrain.models.list_models`).
    weights : str, path or None
        As :func:`gradbrain.models.load` takes them.
    losses, pool, device, cache
        As :func:`gradbrain.features.extract` takes them.
    study_dir : path-like or None
        A study folder chosen by the user (default: where the data chapter saved it).
    study : Study or None
        A study already in memory (e.g. read by a real-data loader); then nothing is
        loaded from disk.

    Returns
    -------
    ChapterInputs
    """
    path = None
    if study is None:
        path = study_path(profile, dataset, study_dir)
        study = Study.load(path)   # a missing study: one error naming the data chapter
    if study.images is None:
        raise ValueError(f"Study {study.name!r} has no images to extract features from (for "
                         "THINGS-MEG, give things['images_dir']).")
    net = models.load(model, weights=weights)
    features = extract(net, study.images, losses=tuple(losses), pool=pool, device=device,
                       cache=cache, progress=progress)
    return ChapterInputs(study=study, net=net, features=features, path=path, profile=profile)
