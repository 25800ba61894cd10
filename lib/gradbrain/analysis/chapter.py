"""What a chapter starts from: its study, its model and the features of one on the other.

Chapters 02–06 each open the same way — load the study the data chapter saved, load
the model, extract its features on the study's images — and say which data and
weights they ran on. :func:`chapter_inputs` does it once for all of them, and
:func:`chapter_study` loads the study alone.

A chapter opened on its own (Colab, Binder: the data chapter never ran there) on the
demo profile builds the demo's simulated study, with the data chapter's demo
parameters (:data:`DEMO_STUDY`), instead of failing; any other profile's study must
come from its data chapter, whose parameters only the profile knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import __version__, models
from ..data import Study, load_study, shown_path, study_path
from ..features import Features, extract

__all__ = ["ChapterInputs", "chapter_inputs", "chapter_study", "DEMO_STUDY"]

#: The data chapter's parameters on the demo profile (``params/demo.yaml``, chapter
#: ``00_data``; a test keeps them equal): what a chapter opened alone builds.
DEMO_STUDY = {"seed": 0, "n_images": 200, "gradient_truth": "paper", "noise": 1.0,
              "model": "efficientnet_lite0.imagenet", "weights": "pretrained",
              "gradient_loss": "ce", "sfreq": 100.0}


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
    built : bool
        The study was missing and this chapter built it (:func:`chapter_study`).
    """

    study: Study
    net: models.LoadedModel
    features: Features
    path: Path | None
    profile: str
    built: bool = False

    def ran_on(self) -> str:
        """Which data and weights the chapter ran on, in words (two lines)."""
        where = "built by this chapter and saved to" if self.built else "from"
        source = (f"{self.study.name} ({where} {shown_path(self.path)})" if self.path
                  else self.study.name)
        return (f"This chapter ran on profile '{self.profile}': {source},\n"
                f"features of {self.net.label}: {self.net.weights}; gradbrain {__version__}.")


def chapter_study(profile: str, dataset: str, study_dir=None, *, cache=True
                  ) -> tuple[Study, Path, bool]:
    """The study a chapter runs on: the one its data chapter saved.

    On the demo profile's simulated dataset, a study that is missing from its default
    place (a chapter opened alone, e.g. on Colab) is built with the data chapter's demo
    parameters (:data:`DEMO_STUDY`) and saved there, as the data chapter would have.
    Anything else that is missing raises one error naming the data chapter.

    Parameters
    ----------
    profile : str
        The parameter profile (names the study folder, :func:`gradbrain.data.study_path`).
    dataset : {"simulated", "nsd", "things"}
    study_dir : path-like or None
        A study folder chosen by the user (never built: it must exist).
    cache : bool or path-like
        Feature cache used when the study is built (as the data chapter's ``cache``).

    Returns
    -------
    (Study, Path, bool)
        The study, where it was read from (or saved to), and whether it was built now.
    """
    path = study_path(profile, dataset, study_dir)
    if not path.exists() and not study_dir and profile == "demo" and dataset == "simulated":
        study = load_study("simulated", **DEMO_STUDY, cache=cache)
        study.save(path)
        return study, path, True
    return Study.load(path), path, False   # a missing study: one error naming the chapter


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
        loaded from disk. Otherwise :func:`chapter_study` (which builds the demo's study
        when it is missing).

    Returns
    -------
    ChapterInputs
    """
    path, built = None, False
    if study is None:
        study, path, built = chapter_study(profile, dataset, study_dir, cache=cache)
    if study.images is None:
        raise ValueError(f"Study {study.name!r} has no images to extract features from (for "
                         "THINGS-MEG, give things['images_dir']).")
    net = models.load(model, weights=weights)
    features = extract(net, study.images, losses=tuple(losses), pool=pool, device=device,
                       cache=cache, progress=progress)
    return ChapterInputs(study=study, net=net, features=features, path=path, profile=profile,
                         built=built)
