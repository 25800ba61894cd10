"""The ``Study`` container shared by the simulated study and the real-data loaders.

Whatever the source — simulated, NSD or THINGS-MEG — downstream chapters see the same
attributes, so simulated and real data follow one path. A dataset without one
modality leaves its attributes ``None``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import _provenance
from .._provenance import digest_in, stored_digest
from .._utils import clean_stale_temporaries, default_permissions, hash_update_array
from .images import ImageSet, LazyImages

__all__ = ["Study", "StoredImages", "noise_ceiling", "stored_digest", "stratified_subset"]


def noise_ceiling(ncsnr: np.ndarray, n_repeats: int) -> np.ndarray:
    """NSD noise ceiling (percent of variance) of the mean of ``n_repeats`` repeats.

    ``NC = 100 · ncsnr² / (ncsnr² + 1 / n_repeats)`` (Allen et al. 2022).

    Parameters
    ----------
    ncsnr : ndarray of shape (n_vertices,)
        Noise-ceiling signal-to-noise ratio (signal sd / noise sd).
    n_repeats : int
        Number of averaged repeats.

    Returns
    -------
    ndarray of shape (n_vertices,), percent in [0, 100].
    """
    if n_repeats < 1:
        raise ValueError(f"'n_repeats' must be at least 1; got {n_repeats}.")
    ncsnr = np.asarray(ncsnr, dtype=float)
    return 100.0 * ncsnr**2 / (ncsnr**2 + 1.0 / n_repeats)


class StoredImages(LazyImages):
    """The images of a saved study, read from its ``study.h5`` one at a time when used
    (what :meth:`Study.load` gives: a real study's stimuli are gigabytes decoded).

    The file is opened when the study is loaded and kept open, so the images stay those
    that were loaded even if the study is saved again at the same path (the save swaps
    a new folder in; the open file survives on POSIX systems). Another process (a data
    loader's worker) opens the file again by its path, and refuses, naming the study,
    when the study there is no longer the one that was loaded (its content digest, the
    one :meth:`Study.save` stores, differs).

    Parameters
    ----------
    path : path-like
        The ``study.h5`` of a saved study.
    positions : sequence of int or None
        Which of its images, in order (None: all).
    """

    def __init__(self, path, positions=None, *, _shared=None):
        import h5py

        self.path = Path(path)
        if _shared is None:
            handle = h5py.File(self.path, "r")
            _shared = {"file": handle, "pid": os.getpid(), "digest": digest_in(handle),
                       "n": len(handle["images/pixels"])}
        self._shared = _shared
        self.positions = (np.arange(_shared["n"]) if positions is None
                          else np.asarray(positions, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, positions) -> "StoredImages":
        """The images at ``positions`` (integers), still unread."""
        return StoredImages(self.path, self.positions[np.asarray(list(positions), dtype=np.int64)],
                            _shared=self._shared)

    def _pixels(self):
        import h5py

        shared = self._shared
        if shared.get("file") is None or shared["pid"] != os.getpid():
            # another process (e.g. a data loader's worker): HDF5 handles are not shared
            # across processes, so open the file again, and read from it only if it
            # holds the study that was loaded (checked on the handle that will be read)
            try:
                handle = h5py.File(self.path, "r")
            except OSError:
                handle = None
            if handle is None or shared["digest"] is None \
                    or digest_in(handle) != shared["digest"]:
                if handle is not None:
                    handle.close()
                raise ValueError(
                    f"The study at {str(self.path.parent)!r} was saved again (or removed) "
                    "since its images were loaded: they can no longer be read from it. "
                    "Load the study again (Study.load).")
            shared.update(file=handle, pid=os.getpid())
        return shared["file"]["images/pixels"]

    def _read(self, i: int) -> Image.Image:
        return Image.fromarray(self._pixels()[int(self.positions[i])])

    def __getstate__(self):
        # the open handle stays behind; the other process opens its own (checked)
        return {"path": self.path, "positions": self.positions,
                "_shared": {k: v for k, v in self._shared.items() if k != "file"}}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._shared = {**state["_shared"], "file": None}

    def __repr__(self) -> str:
        return f"StoredImages({len(self)} images of {str(self.path)!r})"


def _spread(ids: list, k: int) -> list:
    """``k`` of the sorted ``ids``, evenly spaced (so across concepts, not the first k)."""
    if k >= len(ids):
        return list(ids)
    return [ids[i] for i in np.linspace(0, len(ids) - 1, k).round().astype(int)] if k else []


def stratified_subset(image_ids: list, split_of: dict, n: int) -> list:
    """A stratified subset of ``n`` images: at least half (or all) from the test split,
    the rest from the training split, each spread evenly over the sorted ids."""
    test = [i for i in image_ids if split_of[i] == "test"]
    train = [i for i in image_ids if split_of[i] != "test"]
    if n >= len(image_ids):
        return list(image_ids)
    n_test = min(len(test), max(n // 2 if train else n, round(n * len(test) / len(image_ids))))
    n_train = min(len(train), n - n_test)
    n_test = min(len(test), n - n_train)
    return sorted(_spread(test, n_test) + _spread(train, n_train))


@dataclass
class Study:
    """Brain responses to a set of images, fMRI and/or MEG.

    Attributes
    ----------
    name : str
        e.g. ``"simulated (paper, seed 0)"``, ``"NSD subj01"``.
    image_ids : list of str
        Identifier of each image, length n_images; rows of ``betas`` and the
        ``image_id`` column of the MEG metadata refer to these.
    images : ImageSet or None
        The stimuli, in ``image_ids`` order (None when they are not shipped).
    split : ndarray of shape (n_images,), str
        ``"train"`` or ``"test"`` per image (test = images shown with repeats,
        as NSD's shared images and THINGS-MEG's 200 test images).
    betas : ndarray of shape (n_images, n_repeats, n_vertices), float32, or None
        fMRI response amplitudes per repeat (z-scored units for NSD).
    vertices : ndarray of shape (n_vertices,), int, or None
        Vertex indices on the ``mesh`` hemisphere given by ``hemi``.
    hemi : ndarray of shape (n_vertices,), str, or None
        ``"left"`` or ``"right"``.
    hierarchy : ndarray of shape (n_vertices,), float, or None
        Cortical hierarchy coordinate: Euclidean distance from V1 (mm).
    ncsnr : ndarray of shape (n_vertices,), float, or None
        Noise-ceiling SNR (signal sd / noise sd of single trials).
    epochs : mne.BaseEpochs or None
        MEG epochs (n_trials, n_channels, n_times); ``epochs.metadata`` has one row
        per trial with columns ``image_id``, ``repeat`` and ``split``.
    truth : dict
        The planted ground truth (simulated data); empty for real data.
    mesh : str
        Surface the vertices live on (``"fsaverage5"``, ``"fsaverage"``).
    """

    name: str
    image_ids: list[str]
    images: ImageSet | None = None
    split: np.ndarray | None = None
    betas: np.ndarray | None = None
    vertices: np.ndarray | None = None
    hemi: np.ndarray | None = None
    hierarchy: np.ndarray | None = None
    ncsnr: np.ndarray | None = None
    epochs: object | None = None
    truth: dict = field(default_factory=dict)
    mesh: str = "fsaverage5"

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_vertices(self) -> int:
        return 0 if self.betas is None else self.betas.shape[2]

    def noise_ceiling(self, n_repeats: int | None = None) -> np.ndarray:
        """NC (percent) per vertex for the mean of ``n_repeats`` (default: all) repeats."""
        if self.ncsnr is None:
            raise ValueError(f"Study {self.name!r} has no fMRI data (ncsnr is None).")
        return noise_ceiling(self.ncsnr, n_repeats or self.betas.shape[1])

    def mean_betas(self) -> np.ndarray:
        """Betas averaged over repeats, ndarray of shape (n_images, n_vertices)."""
        if self.betas is None:
            raise ValueError(f"Study {self.name!r} has no fMRI data (betas is None).")
        return self.betas.mean(axis=1)

    # ------------------------------------------------------------------ files

    def digest(self) -> str:
        """Hex digest of the study's content (every array, the images, truth and MEG).

        Two studies with the same digest hold the same data; :meth:`save` stores it, and
        the book runner reruns a chapter when the study it read has another digest.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.name, self.mesh, list(self.image_ids)]).encode())
        for key in ("split", "betas", "vertices", "hemi", "hierarchy", "ncsnr"):
            value = getattr(self, key)
            h.update(key.encode())
            if value is not None:
                value = np.asarray(value)
                hash_update_array(h, value.astype("S") if value.dtype.kind == "U" else value)
        if self.images is not None:
            h.update(json.dumps([self.images.ids, self.images.labels]).encode())
            for image in self.images.images:
                hash_update_array(h, np.asarray(image.convert("RGB")))
        for key in sorted(self.truth):
            value = self.truth[key]
            h.update(key.encode())
            if isinstance(value, np.ndarray):
                hash_update_array(h, value.astype("S") if value.dtype.kind == "U" else value)
            else:
                h.update(json.dumps(value, sort_keys=True, default=str).encode())
        if self.epochs is not None:
            hash_update_array(h, self.epochs.get_data().astype(np.float32))
            h.update(np.asarray(self.epochs.times).tobytes())
            h.update(json.dumps(self.epochs.ch_names).encode())
            if self.epochs.metadata is not None:
                h.update(self.epochs.metadata.to_json().encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write to folder ``path`` (``study.h5`` + ``meg-epo.fif``), atomically.

        The folder is written under a temporary name, then swapped in: an existing
        folder is first renamed aside, the new one renamed into place, and only then the
        old one deleted — so a kill at any point leaves either the old or the new study
        at ``path`` (a swap cut short is undone by the next save or load). Temporary
        folders of killed saves are removed.

        Raises
        ------
        FileExistsError
            ``path`` is a file, or a non-empty folder that holds no saved study: it is
            not the program's to replace.
        """
        import h5py

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{str(path)!r} is a file, not a study folder: Study.save "
                                  "writes a folder and would replace it. Choose another path.")
        if path.is_dir() and not (path / "study.h5").is_file() and any(path.iterdir()):
            raise FileExistsError(f"{str(path)!r} is a folder that holds no saved study (no "
                                  "study.h5) and is not empty: Study.save would replace it and "
                                  "everything in it. Choose a new or empty folder.")
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        pid = os.getpid()
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{pid}-", dir=path.parent))
        default_permissions(tmp)   # not mkdtemp's owner-only: a shared folder's readers
        aside = None
        try:
            with h5py.File(tmp / "study.h5", "w") as f:
                f.attrs["name"] = self.name
                f.attrs["mesh"] = self.mesh
                f.attrs["image_ids"] = json.dumps(self.image_ids)
                f.attrs["has_meg"] = self.epochs is not None
                f.attrs["digest"] = self.digest()
                for key in ("split", "betas", "vertices", "hemi", "hierarchy", "ncsnr"):
                    value = getattr(self, key)
                    if value is None:
                        continue
                    value = np.asarray(value)
                    if value.dtype.kind == "U":
                        value = value.astype("S")
                    f.create_dataset(key, data=value, compression="gzip" if value.size > 1e5 else None)
                if self.images is not None:
                    group = f.create_group("images")
                    _write_pixels(group, self.images)
                    group.attrs["ids"] = json.dumps(self.images.ids)
                    group.attrs["labels"] = json.dumps(self.images.labels)
                    group.attrs["sources"] = json.dumps(self.images.sources)
                _write_truth(f.create_group("truth"), self.truth)
            if self.epochs is not None:
                self.epochs.save(tmp / "meg-epo.fif", overwrite=True, verbose="error")
            if path.exists():
                aside = path.with_name(f".{path.name}.old-{pid}-{tmp.name.rsplit('-', 1)[-1]}")
                os.replace(path, aside)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
            if aside is not None:
                if path.exists():
                    shutil.rmtree(aside, ignore_errors=True)
                elif aside.exists():  # the new study did not arrive: put the old one back
                    os.replace(aside, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Study":
        """Read a folder written by :meth:`save`.

        The responses are read now; the images are not: ``images.images`` is a
        :class:`StoredImages` that reads each image from ``study.h5`` when it is used
        (and keeps giving the images loaded here if the study is saved again).

        Raises
        ------
        FileNotFoundError
            No saved study at ``path``.
        ValueError
            The folder is incomplete or corrupt (a truncated ``study.h5``, a missing
            ``meg-epo.fif``…): one message naming the file and how to rebuild it.
        """
        import h5py

        path = Path(path).expanduser()
        clean_stale_temporaries(path)  # undo a swap a kill cut short
        if not (path / "study.h5").is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is not a saved Study (no study.h5 inside); save one with "
                "Study.save(path), e.g. by running the data chapter (00_data)."
            )
        rebuild = ("Rebuild it: rerun the data chapter (python -m gradbrain.book run --only "
                   "00_data --force), or Study.save it again.")
        try:
            with h5py.File(path / "study.h5", "r") as f:
                values = {}
                for key in ("split", "betas", "vertices", "hemi", "hierarchy", "ncsnr"):
                    if key in f:
                        value = f[key][()]
                        values[key] = value.astype("U") if value.dtype.kind == "S" else value
                described = None
                if "images" in f:
                    g = f["images"]
                    described = {key: json.loads(g.attrs[key])
                                  for key in ("ids", "labels", "sources")}
                truth = _read_truth(f["truth"])
                name, mesh = str(f.attrs["name"]), str(f.attrs["mesh"])
                image_ids = json.loads(f.attrs["image_ids"])
                has_meg = bool(f.attrs.get("has_meg", (path / "meg-epo.fif").is_file()))
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"The study at {str(path)!r} is incomplete or corrupt: "
                             f"study.h5 cannot be read ({type(err).__name__}: {err}). "
                             + rebuild) from err
        epochs = None
        if has_meg:
            fif = path / "meg-epo.fif"
            if not fif.is_file():
                raise ValueError(f"The study at {str(path)!r} has MEG data but its file "
                                 f"meg-epo.fif is missing. " + rebuild)
            import mne

            try:
                epochs = mne.read_epochs(fif, preload=True, verbose="error")
            except Exception as err:  # MNE raises many kinds on a truncated file
                raise ValueError(f"The study at {str(path)!r} is incomplete or corrupt: "
                                 f"meg-epo.fif cannot be read ({type(err).__name__}: {err}). "
                                 + rebuild) from err
        images = None
        if described is not None:   # opened on its own, after the reading above closed
            try:
                images = ImageSet(images=StoredImages(path / "study.h5"), **described)
            except (OSError, KeyError) as err:
                raise ValueError(f"The study at {str(path)!r} is incomplete or corrupt: its "
                                 f"images cannot be read ({type(err).__name__}: {err}). "
                                 + rebuild) from err
        _provenance.record_input(path, kind="study")
        return cls(name=name, image_ids=image_ids, images=images, epochs=epochs, truth=truth,
                   mesh=mesh, **values)


def _write_pixels(group, images: ImageSet) -> None:
    """Every image's RGB pixels into ``group["pixels"]`` (n, H, W, 3) uint8, written one
    image at a time (a lazy :class:`ImageFiles` set is read once, never held whole)."""
    n = len(images)
    if n == 0:
        group.create_dataset("pixels", shape=(0, 0, 0, 3), dtype=np.uint8)
        return
    dataset = None
    for i, image in enumerate(images.images):
        pixels = np.asarray(image.convert("RGB"))
        if dataset is None:
            dataset = group.create_dataset("pixels", shape=(n, *pixels.shape), dtype=np.uint8,
                                           compression="gzip", chunks=(1, *pixels.shape))
        elif pixels.shape != dataset.shape[1:]:
            raise ValueError(
                f"Study.save stores images of one size; image {images.ids[i]!r} is "
                f"{pixels.shape[1]} x {pixels.shape[0]} pixels, the first "
                f"{dataset.shape[2]} x {dataset.shape[1]}. Give images of one size (e.g. "
                "load_folder(..., size=256)).")
        dataset[i] = pixels


def _write_truth(group, truth: dict) -> None:
    """Arrays as datasets, everything else as JSON attributes."""
    for key, value in truth.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind == "U":
                value = value.astype("S")
                group.attrs[f"__unicode__{key}"] = True
            group.create_dataset(key, data=value)
        else:
            group.attrs[key] = json.dumps(value)


def _read_truth(group) -> dict:
    truth = {}
    for key in group:
        value = group[key][()]
        truth[key] = value.astype("U") if group.attrs.get(f"__unicode__{key}", False) else value
    for key, value in group.attrs.items():
        if not key.startswith("__unicode__"):
            truth[key] = json.loads(value)
    return truth
