"""Stimulus sets: the embedded natural-image crops and a loader for a user's folder.

The embedded set is built deterministically from photographs that ship inside
installed packages (scikit-image's ``skimage.data`` and scikit-learn's sample
images), so every chapter runs offline. Each source photograph yields 14 square
crops at three scales (the largest centred square, a 2×2 grid at 70 % and a 3×3
grid at 45 % of the short side); each crop carries its source and a coarse
category label.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .._utils import hash_update_array

__all__ = ["ImageSet", "ImageFiles", "LazyImages", "EMBEDDED_SOURCES", "N_EMBEDDED",
           "load_embedded", "load_folder"]

#: Source photograph → coarse category. ``skimage.data.cat`` is the same photograph
#: as ``chelsea`` and ``horse`` is a binary silhouette, so neither is used.
EMBEDDED_SOURCES: dict[str, str] = {
    "astronaut": "person",
    "camera": "person",
    "chelsea": "animal",
    "coffee": "food",
    "rocket": "vehicle",
    "hubble_deep_field": "space",
    "moon": "space",
    "retina": "microscopy",
    "immunohistochemistry": "microscopy",
    "brick": "texture",
    "grass": "texture",
    "gravel": "texture",
    "clock": "object",
    "coins": "object",
    "page": "text",
    "text": "text",
    "china": "building",
    "flower": "plant",
}

#: (scale of the short side, grid size) of the square crops taken from each source.
_CROP_GRID = ((1.0, 1), (0.7, 2), (0.45, 3))
#: Number of images in the embedded set.
N_EMBEDDED = len(EMBEDDED_SOURCES) * sum(grid * grid for _, grid in _CROP_GRID)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class LazyImages(Sequence):
    """A read-only list of RGB PIL images that reads each image when it is used and keeps
    none: what an :class:`ImageSet` holds when its images do not fit in memory decoded.

    Subclasses give ``__len__``, ``_read(i)`` (the image at position ``i``) and
    ``take(positions)`` (the images at those positions, still unread); a slice is a
    ``take``.
    """

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} indices must be integers or slices; got "
                            f"{type(index).__name__}.")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"image {index} of {n}")
        return self._read(int(index) % n)

    def take(self, positions) -> "LazyImages":
        raise NotImplementedError

    def _read(self, i: int):
        raise NotImplementedError


class ImageFiles(LazyImages):
    """Images read from their files when used: a read-only list of RGB PIL images that
    holds paths, not pixels.

    A real dataset's stimuli do not fit in memory decoded (NSD's 10,000 images of one
    subject are 5.4 GB as RGB arrays, THINGS' 22,448 more): an :class:`ImageSet` built
    on ``ImageFiles`` reads each image when it is used — by the extractor's data loader,
    a digest or a figure — and keeps none of them. Subsets stay lazy.

    Parameters
    ----------
    paths : sequence of path-like
        One image file per image, in order.
    size : int or None
        Resize each image to ``size × size`` pixels when read (LANCZOS); None keeps it.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(folder / "a.png")
    >>> files = ImageFiles([folder / "a.png"])
    >>> len(files), files[0].size, files[0].mode
    (1, (6, 4), 'RGB')
    """

    def __init__(self, paths, size: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, positions) -> "ImageFiles":
        """The images at ``positions`` (integers), still unread."""
        return ImageFiles([self.paths[int(i)] for i in positions], self.size)

    def _read(self, i: int) -> Image.Image:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"Could not read image {str(path)!r}: {err}. Replace or remove "
                             "the file, then load the images again.") from err
        if self.size is not None:
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        return image

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files{'' if self.size is None else f', size={self.size}'})"


@dataclass
class ImageSet:
    """An ordered set of RGB stimulus images with identifiers and labels.

    Attributes
    ----------
    images : list of PIL.Image.Image, or LazyImages
        RGB images, n_images of them (any size; models resize with their own
        preprocessing): in memory, or read when used (:class:`LazyImages`: from their
        files, :class:`ImageFiles`, what the real datasets' loaders give; or from a saved
        study, what :meth:`Study.load` gives).
    ids : list of str
        Unique identifier per image, length n_images.
    labels : list of str
        Category label per image, length n_images.
    sources : list of str
        Where each image came from (source photograph or file path), length n_images.
    """

    images: list
    ids: list[str]
    labels: list[str]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.images)
        if not self.sources:
            self.sources = list(self.ids)
        for name in ("ids", "labels", "sources"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"ImageSet.{name} has {len(getattr(self, name))} entries but there are "
                    f"{n} images; give one entry per image."
                )
        if len(set(self.ids)) != n:
            raise ValueError("ImageSet.ids must be unique; found duplicated identifiers.")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> "ImageSet":
        """Subset by slice, or by a sequence of integer positions."""
        if isinstance(index, slice):
            positions = range(len(self))[index]
        elif isinstance(index, (int, np.integer)):
            positions = [int(index)]
        else:
            positions = [int(i) for i in index]
        return ImageSet(
            images=(self.images.take(positions) if isinstance(self.images, LazyImages)
                    else [self.images[i] for i in positions]),
            ids=[self.ids[i] for i in positions],
            labels=[self.labels[i] for i in positions],
            sources=[self.sources[i] for i in positions],
        )

    @property
    def categories(self) -> list[str]:
        """Sorted unique category labels."""
        return sorted(set(self.labels))

    def fingerprint(self) -> str:
        """Hex digest of every image's pixels and identifier (for cache keys)."""
        h = hashlib.blake2b(digest_size=16)
        for image_id, image in zip(self.ids, self.images):
            h.update(image_id.encode())
            hash_update_array(h, np.asarray(image))
        return h.hexdigest()


def _embedded_source(name: str) -> np.ndarray:
    """Load one source photograph as an (H, W, 3) uint8 array, without network."""
    if name in ("china", "flower"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg"
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3].astype(np.uint8))


def _square_crops(height: int, width: int) -> list[tuple[str, int, int, int]]:
    """Crop boxes (tag, top, left, side) of the embedded grid, in a fixed order."""
    boxes = []
    short = min(height, width)
    for scale, grid in _CROP_GRID:
        side = int(round(scale * short))
        # one centred crop, or a grid spread over the whole photograph
        tops = np.linspace(0, height - side, grid) if grid > 1 else [(height - side) / 2]
        lefts = np.linspace(0, width - side, grid) if grid > 1 else [(width - side) / 2]
        for r, top in enumerate(tops):
            for c, left in enumerate(lefts):
                boxes.append((f"s{int(scale * 100):03d}-r{r}c{c}", int(top), int(left), side))
    return boxes


def load_embedded(n_images: int | None = None, *, size: int = 256) -> ImageSet:
    """The embedded stimulus set: natural-image crops that ship with our dependencies.

    Parameters
    ----------
    n_images : int or None
        How many images to return; ``None`` returns all of them (252). Images are
        ordered round-robin over the source photographs, so any prefix covers all
        sources and categories as evenly as possible.
    size : int
        Side of the square RGB output images, in pixels.

    Returns
    -------
    ImageSet
        ``n_images`` RGB images of ``size × size`` pixels with ids such as
        ``"chelsea-s070-r0c1"``, category labels and source names.

    Examples
    --------
    >>> stimuli = load_embedded(20, size=64)
    >>> len(stimuli), stimuli.images[0].size
    (20, (64, 64))
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"'size' must be an integer of at least 16 pixels; got {size!r}. "
                         "e.g. size=256")
    ordered = _embedded_crops(int(size))
    total = len(ordered)
    if n_images is None:
        n_images = total
    if not isinstance(n_images, (int, np.integer)) or n_images < 1 or n_images > total:
        raise ValueError(
            f"'n_images' must be an integer between 1 and {total} (the size of the embedded "
            f"set); got {n_images!r}. e.g. n_images=64"
        )
    ordered = ordered[:n_images]
    return ImageSet(
        images=[c[1].copy() for c in ordered],   # the caller's own, not the cache's
        ids=[c[0] for c in ordered],
        labels=[c[2] for c in ordered],
        sources=[c[3] for c in ordered],
    )


@functools.lru_cache(maxsize=2)
def _embedded_crops(size: int) -> tuple:
    """Every embedded crop at ``size`` pixels, in load order: (id, image, category,
    source) each. Kept for the process (about 50 MB at 256 px): simulations load the
    same set once per simulated study, and resizing is most of its cost."""
    per_source = []
    for name, category in EMBEDDED_SOURCES.items():
        array = _embedded_source(name)
        crops = []
        for tag, top, left, side in _square_crops(*array.shape[:2]):
            crop = Image.fromarray(array[top : top + side, left : left + side])
            crop = crop.resize((size, size), Image.Resampling.LANCZOS)
            crops.append((f"{name}-{tag}", crop, category, name))
        per_source.append(crops)
    return tuple(crops[k] for k in range(max(map(len, per_source))) for crops in per_source
                 if k < len(crops))


def load_folder(
    path: str | os.PathLike, *, size: int | None = None, n_images: int | None = None
) -> ImageSet:
    """Load a folder of the user's images (searched recursively, sorted by path).

    Parameters
    ----------
    path : str or path-like
        Folder holding image files (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``,
        ``.tif``). An image's label is the name of the folder it sits in, relative to
        ``path`` (``""`` for images directly in ``path``), as in
        ``torchvision.datasets.ImageFolder``.
    size : int or None
        Resize every image to ``size × size`` pixels; ``None`` keeps them as they are.
    n_images : int or None
        Keep only the first ``n_images`` files.

    Returns
    -------
    ImageSet
        RGB images with ids = paths relative to ``path`` (without suffix), read from
        their files when used (:class:`ImageFiles`; each file is checked here).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Image folder {str(root)!r} does not exist or is not a folder; give the folder "
            "that holds your image files."
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"No image files found under {str(root)!r}; expected files ending in "
            f"{', '.join(_IMAGE_SUFFIXES)}."
        )
    if n_images is not None:
        files = files[:n_images]
    ids, labels = [], []
    for file in files:
        _check_readable(file)
        rel = file.relative_to(root)
        ids.append(str(rel.with_suffix("")))
        labels.append(rel.parent.as_posix() if rel.parent != Path(".") else "")
    return ImageSet(images=ImageFiles(files, size), ids=ids, labels=labels,
                    sources=[str(f) for f in files])


def _check_readable(file: Path) -> None:
    """Refuse a file PIL cannot open as an image (its header and structure are checked
    without decoding the pixels, which :class:`ImageFiles` reads when they are used)."""
    try:
        with Image.open(file) as im:
            im.verify()
    except Exception as err:  # PIL raises several types for unreadable files
        raise ValueError(f"Could not read image {str(file)!r}: {err}. Replace or remove the "
                         "file, then load the images again.") from err


def as_image_list(images: Sequence) -> list:
    """Return the PIL images of an ImageSet or a sequence of PIL images."""
    if isinstance(images, ImageSet):
        return list(images.images)
    return list(images)
