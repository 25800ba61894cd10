"""THINGS-MEG (Hebart et al. 2023; OpenNeuro ds004212) as a :class:`~gradbrain.data.Study`.

Files used, per participant ``n`` in 1…4, under the dataset ``root``::

    derivatives/preprocessed/preprocessed_P{n}-epo.fif   # ≈8 GB in all, split by MNE into
    derivatives/preprocessed/preprocessed_P{n}-epo-1.fif # 2 GB parts (-epo.fif, -epo-1.fif,
    …                                                    # …), all needed
    sourcedata/sample_attributes_P{n}.csv                # one row per trial, same order

The epochs hold 271 magnetometers (the CTF-275 layout without MLF25, MRF43 and MRO13,
which the system did not record, and MRO11, dropped as malfunctioning; no reference
channels), 200 Hz, −100…1300 ms, 27,048 trials. Their values are z-scores
against each trial's baseline (the dataset's preprocessing, ``mne.baseline.rescale(...,
mode="zscore")``), unitless although MNE labels magnetometers in tesla.

``image_path`` in the trial table is ``images_meg/<concept>/<file>.jpg`` for images seen
once, ``images_test_meg/<file>.jpg`` for the 200 test images (no concept folder) and
``images_catch_meg/<file>.jpg`` for catch trials. An image's concept is its file name
without the exemplar suffix (``coat_rack_16s.jpg`` → ``coat_rack``).

Trials are ``trial_type`` ``"exp"`` (22,248 images seen once), ``"test"`` (200 images
seen 12 times) and ``"catch"`` (attention checks, always left out). The epochs file
is opened without loading its data (``preload=False``); only the selected trials are
read, once.

The THINGS images are not redistributed here (their own licence): download them from
the THINGS OSF project and pass the folder as ``images_dir`` (images are looked up as
``images_dir/<concept>/<file name>``, the layout of the THINGS image database, test
images included).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .._utils import check_in_allowed
from .images import ImageFiles, ImageSet, _check_readable
from .study import Study, stratified_subset

__all__ = ["OPENNEURO_ID", "SUBJECTS", "epochs_path", "attributes_path", "read_attributes",
           "load_subject", "download"]

OPENNEURO_ID = "ds004212"
SUBJECTS = (1, 2, 3, 4)
SPLITS = ("test", "train", "all")
_TRIAL_TYPES = {"test": ("test",), "train": ("exp",), "all": ("exp", "test")}
_REQUIRED_COLUMNS = ("trial_type", "image_path")
_IMAGES_HELP = (
    "Download the THINGS images from the THINGS OSF project (https://osf.io/jum2f/, "
    "images_THINGS.zip; read and accept the licence in password_images.txt before "
    "unzipping) and pass the folder holding one sub-folder per concept as 'images_dir'."
)


def _check_subject(subject) -> int:
    if isinstance(subject, str) and subject.upper().startswith("P"):
        subject = subject[1:]
    try:
        number = int(subject)
    except (TypeError, ValueError):
        number = None
    if number not in SUBJECTS:
        raise ValueError(f"'subject' must be one of THINGS-MEG's participants {SUBJECTS} (or "
                         f"'P1'…'P4'); got {subject!r}.")
    return number


def _check_root(root) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"THINGS-MEG folder {str(root)!r} does not exist. Give the folder of OpenNeuro "
            f"{OPENNEURO_ID} (it holds derivatives/ and sourcedata/), or fetch the needed "
            "files with gradbrain.data.things_meg.download(subject, root)."
        )
    return root


def epochs_path(root, subject) -> Path:
    """Path of a participant's preprocessed epochs (``-epo.fif``, the first of its parts)."""
    return (Path(root).expanduser() / "derivatives" / "preprocessed"
            / f"preprocessed_P{_check_subject(subject)}-epo.fif")


def attributes_path(root, subject) -> Path:
    """Path of a participant's per-trial table (``sample_attributes_P{n}.csv``)."""
    return (Path(root).expanduser() / "sourcedata"
            / f"sample_attributes_P{_check_subject(subject)}.csv")


def _missing(path: Path, subject: int) -> FileNotFoundError:
    return FileNotFoundError(
        f"THINGS-MEG file not found: {str(path)!r}. Download participant {subject}'s files "
        f"with gradbrain.data.things_meg.download({subject}, root) (needs openneuro-py), or "
        f"from OpenNeuro {OPENNEURO_ID} by hand, keeping the dataset's folder layout."
    )


def read_attributes(root, subject) -> pd.DataFrame:
    """A participant's trial table, with ``image_id``, ``concept`` and ``split`` added.

    Returns
    -------
    DataFrame with one row per trial (in epochs order): the CSV's columns plus
    ``image_id`` (file name without suffix, e.g. ``"aardvark_01b"``), ``concept`` (the
    THINGS concept: the file name without its exemplar suffix, ``"coat_rack_16s"`` →
    ``"coat_rack"``; test images have no concept folder) and ``split`` (``"train"``,
    ``"test"`` or ``"catch"``).
    """
    subject = _check_subject(subject)
    path = attributes_path(_check_root(root), subject)
    if not path.is_file():
        raise _missing(path, subject)
    table = pd.read_csv(path)
    absent = [c for c in _REQUIRED_COLUMNS if c not in table.columns]
    if absent:
        raise ValueError(f"{str(path)!r} lacks column(s) {absent}; is it a THINGS-MEG "
                         "sample_attributes file?")
    image_path = table["image_path"].astype(str).str.replace("\\", "/", regex=False)
    table["image_id"] = image_path.map(lambda p: Path(p).stem)
    table["concept"] = image_path.map(_concept)
    catch = (table["trial_type"] == "catch") | image_path.str.startswith("images_catch")
    table["split"] = np.where(catch, "catch",
                              np.where(table["trial_type"] == "test", "test", "train"))
    return table


_EXEMPLAR = re.compile(r"^(?P<concept>.+)_\d+[a-z]?$")


def _concept(image_path: str) -> str:
    """THINGS concept of an image path (its folder for images_meg/<concept>/<file>,
    else the file name without the exemplar suffix ``_<number><letter>``)."""
    parts = image_path.split("/")
    if len(parts) >= 3 and parts[-3].startswith("images_meg"):
        return parts[-2]
    stem = Path(parts[-1]).stem
    match = _EXEMPLAR.match(stem)
    return match.group("concept") if match else stem


def _read_epochs(path: Path, subject: int):
    """Open the epochs lazily; a missing split part gets an error that names it."""
    import mne

    try:
        return mne.read_epochs(path, preload=False, verbose="error")
    except FileNotFoundError as err:
        missing = Path(getattr(err, "filename", None) or str(err)).name
        parts = sorted(p.name for p in path.parent.glob(f"{path.stem}*.fif"))
        raise FileNotFoundError(
            f"THINGS-MEG epochs of participant {subject} are split by MNE into parts "
            f"({path.stem}.fif, {path.stem}-1.fif, …); part {missing} is missing (found: "
            f"{', '.join(parts)}). Download every part with "
            f"gradbrain.data.things_meg.download({subject}, root)."
        ) from None


def load_subject(subject, root, *, split: str = "test", tmin: float | None = None,
                 tmax: float | None = None, decim: int = 1, picks="meg",
                 images_dir=None, max_images: int | None = None) -> Study:
    """Load one THINGS-MEG participant as a :class:`Study` (MEG only).

    Parameters
    ----------
    subject : int or str
        Participant 1…4 (``"P1"`` … also accepted).
    root : path-like
        Folder of OpenNeuro ds004212 (with ``derivatives/`` and ``sourcedata/``).
    split : {"test", "train", "all"}
        Trials to read: the 200 test images (12 repeats each), the 22,248 images seen
        once, or both. Catch trials are always left out.
    tmin, tmax : float or None
        Crop the epochs (s); None keeps the file's −0.1 … 1.3 s.
    decim : int
        Keep every ``decim``-th sample (the data are low-passed at 40 Hz, so up to
        ``decim=2`` from 200 Hz keeps them alias-free).
    picks : str or list
        Channels (MNE picks), default all MEG sensors.
    images_dir : path-like or None
        Folder of the THINGS images (one sub-folder per concept). None: the study has
        no images (``study.images is None``); features must then come from elsewhere.
    max_images : int or None
        Keep ``max_images`` images of the selection, e.g. to try a chapter quickly: at
        least half from the test split when both splits are read (the chapter scores on
        test images), each split's share spread evenly over its sorted image ids (so
        over concepts).

    Returns
    -------
    Study
        ``image_ids`` sorted, ``split`` per image, ``epochs`` (271 sensors, baseline
        z-scores) with the selected trials in file order and metadata columns
        ``image_id``, ``image_index``, ``repeat``, ``split``, ``category`` (the concept)
        plus the CSV's own. Nothing is printed (MNE's messages are silenced).
    """
    import mne

    with mne.utils.use_log_level("error"):
        return _load_subject(subject, root, split, tmin, tmax, decim, picks, images_dir,
                             max_images)


def _load_subject(subject, root, split, tmin, tmax, decim, picks, images_dir, max_images):
    subject = _check_subject(subject)
    check_in_allowed("split", split, SPLITS)
    if not isinstance(decim, (int, np.integer)) or decim < 1:
        raise ValueError(f"'decim' must be a positive integer; got {decim!r}. e.g. decim=2")
    root = _check_root(root)
    path = epochs_path(root, subject)
    if not path.is_file():
        raise _missing(path, subject)
    table = read_attributes(root, subject)
    epochs = _read_epochs(path, subject)
    if len(epochs) != len(table):
        raise ValueError(
            f"{path.name} has {len(epochs)} epochs but {attributes_path(root, subject).name} "
            f"has {len(table)} rows; they must describe the same trials in the same order "
            "(use the files of the same dataset version)."
        )
    keep = table["trial_type"].isin(_TRIAL_TYPES[split]).to_numpy() & (table["split"] != "catch")
    image_ids = sorted(set(table.loc[keep, "image_id"]))
    if max_images is not None:
        if not isinstance(max_images, (int, np.integer)) or max_images < 1:
            raise ValueError(f"'max_images' must be a positive integer or None; got "
                             f"{max_images!r}.")
        split_of = dict(zip(table.loc[keep, "image_id"], table.loc[keep, "split"]))
        image_ids = stratified_subset(image_ids, split_of, int(max_images))
        keep &= table["image_id"].isin(image_ids).to_numpy()
    if not keep.any():
        raise ValueError(f"No {split!r} trials in {path.name}.")
    index = np.flatnonzero(keep)
    selected = epochs[index]  # still not loaded: only these trials are read below
    if decim > 1:
        selected.decimate(decim, verbose="error")  # applied while reading
    selected.load_data()
    if tmin is not None or tmax is not None:
        selected.crop(tmin, tmax)
    selected.pick(picks)

    rows = table.iloc[index].reset_index(drop=True)
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    metadata = rows.assign(
        image_index=rows["image_id"].map(position).to_numpy(),
        repeat=rows.groupby("image_id").cumcount().to_numpy(),
        category=rows["concept"],
    )
    selected.metadata = metadata
    per_image = metadata.drop_duplicates("image_id").set_index("image_id")
    study = Study(
        name=f"THINGS-MEG P{subject} ({split})",
        image_ids=list(image_ids),
        split=per_image.loc[image_ids, "split"].to_numpy().astype("<U5"),
        epochs=selected,
    )
    if images_dir is not None:
        study.images = _load_images(images_dir, per_image.loc[image_ids])
    return study


def _load_images(images_dir, per_image: pd.DataFrame):
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"THINGS image folder {str(folder)!r} does not exist. "
                                + _IMAGES_HELP)
    files = [folder / concept / Path(p).name
             for concept, p in zip(per_image["concept"], per_image["image_path"])]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(files)} THINGS images are missing under "
            f"{str(folder)!r}, e.g. {str(missing[0])!r}. " + _IMAGES_HELP
        )
    for file in files:
        _check_readable(file)
    return ImageSet(images=ImageFiles(files), ids=list(per_image.index),
                    labels=list(per_image["concept"]), sources=[str(f) for f in files])


def download(subject, root, *, max_concurrent_downloads: int = 5) -> list[Path]:
    """Fetch one participant's preprocessed epochs and trial table from OpenNeuro.

    Only what :func:`load_subject` reads is downloaded (≈8 GB), into ``root`` with the
    dataset's layout: every part of the split epochs file (``-epo.fif``, ``-epo-1.fif``,
    …, fetched with a glob) and the trial table. Needs the ``openneuro-py`` package
    (``pip install openneuro-py``) and a network connection; files already complete
    are skipped by openneuro-py. The THINGS images are not part of the MEG dataset
    (see :func:`load_subject`'s ``images_dir``).

    Returns
    -------
    list of Path
        The epochs file's first part (MNE reads the others from it) and the trial table.
    """
    subject = _check_subject(subject)
    try:
        import openneuro
    except ImportError as error:
        raise ImportError("Downloading THINGS-MEG needs openneuro-py: pip install "
                          "openneuro-py") from error
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    wanted = [epochs_path(root, subject), attributes_path(root, subject)]
    epochs_glob = wanted[0].relative_to(root).as_posix().replace("-epo.fif", "-epo*.fif")
    openneuro.download(dataset=OPENNEURO_ID, target_dir=os.fspath(root),
                       include=[epochs_glob, wanted[1].relative_to(root).as_posix()],
                       max_concurrent_downloads=max_concurrent_downloads)
    return wanted
