"""Embedded stimulus set and the folder loader."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from gradbrain.data import EMBEDDED_SOURCES, ImageSet, load_embedded, load_folder
from gradbrain.data.images import ImageFiles


@pytest.fixture(scope="module")
def embedded():
    return load_embedded(size=48)


def test_embedded_set_has_at_least_200_distinct_labelled_images(embedded):
    assert len(embedded) >= 200
    digests = {hashlib.sha1(np.asarray(im).tobytes()).hexdigest() for im in embedded.images}
    assert len(digests) == len(embedded)
    assert all(label for label in embedded.labels)
    assert set(embedded.labels) == set(EMBEDDED_SOURCES.values())
    assert all(im.size == (48, 48) and im.mode == "RGB" for im in embedded.images)


def test_embedded_set_is_deterministic(embedded):
    again = load_embedded(size=48)
    assert again.ids == embedded.ids
    assert again.fingerprint() == embedded.fingerprint()


def test_each_load_gives_the_caller_its_own_images(embedded):
    """The crops are made once per process and size (simulations load the set once per
    study); each call still hands out images of its own: drawing on one leaves the
    next load as it was."""
    first = load_embedded(5, size=48)
    first.images[0].paste((255, 0, 0), (0, 0, 48, 48))
    again = load_embedded(5, size=48)
    assert again.images[0] is not first.images[0]
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(embedded.images[0]))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


def test_prefix_covers_every_source():
    stimuli = load_embedded(len(EMBEDDED_SOURCES), size=32)
    assert sorted(stimuli.sources) == sorted(EMBEDDED_SOURCES)


def test_crop_content_comes_from_the_source_photograph():
    """The full-scale crop of 'astronaut' (square) is the whole photograph, resized."""
    import skimage.data

    stimuli = load_embedded(1, size=512)
    assert stimuli.ids[0] == "astronaut-s100-r0c0"
    np.testing.assert_array_equal(np.asarray(stimuli.images[0]), skimage.data.astronaut())


@pytest.mark.parametrize("n", [0, -1, 10_000, 2.5])
def test_bad_n_images(n):
    """Check for one clear error when n_images is out of range."""
    with pytest.raises(ValueError, match="'n_images' must be an integer between 1 and"):
        load_embedded(n)


def test_subset_and_fingerprint(embedded):
    sub = embedded[[3, 1]]
    assert sub.ids == [embedded.ids[3], embedded.ids[1]]
    assert sub.fingerprint() != embedded[[1, 3]].fingerprint()


def test_imageset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="ImageSet.labels has 1 entries but there are 2 images"):
        ImageSet(images=[Image.new("RGB", (4, 4))] * 2, ids=["a", "b"], labels=["x"])


def test_load_folder_labels_from_subfolders(tmp_path, rng):
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(2):
            array = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / label / f"img{i}.png")
    Image.new("L", (10, 10)).save(tmp_path / "loose.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    stimuli = load_folder(tmp_path, size=16)
    assert stimuli.ids == ["cats/img0", "cats/img1", "dogs/img0", "dogs/img1", "loose"]
    assert stimuli.labels == ["cats", "cats", "dogs", "dogs", ""]
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in stimuli.images)
    original = np.asarray(Image.open(tmp_path / "cats" / "img0.png"))
    np.testing.assert_array_equal(np.asarray(load_folder(tmp_path).images[0]), original)


def test_load_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="No image files found"):
        load_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Could not read image .*broken.png"):
        load_folder(tmp_path)


def test_folder_images_are_read_when_used_and_subsets_stay_lazy(tmp_path, rng):
    """load_folder keeps paths, not pixels (issue 33): the set reads each file when an
    image is used, a subset is still a set of files, and a file that breaks after loading
    gets one clear error naming it."""
    arrays = [rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) for _ in range(4)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"im{i}.png")
    stimuli = load_folder(tmp_path)
    assert isinstance(stimuli.images, ImageFiles)
    subset = stimuli[[3, 1]]
    assert isinstance(subset.images, ImageFiles) and subset.ids == ["im3", "im1"]
    np.testing.assert_array_equal(np.asarray(subset.images[0]), arrays[3])
    assert isinstance(stimuli[1:3].images, ImageFiles)
    # the fingerprint reads the same pixels as a set held in memory
    held = ImageSet(images=[Image.fromarray(a) for a in arrays], ids=stimuli.ids,
                    labels=stimuli.labels, sources=stimuli.sources)
    assert stimuli.fingerprint() == held.fingerprint()
    (tmp_path / "im2.png").write_bytes(b"broken after loading")
    with pytest.raises(ValueError, match="Could not read image .*im2.png"):
        stimuli.images[2]
