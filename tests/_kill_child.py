"""Work that tests/test_reliability.py kills with SIGKILL at a random moment.

Usage::

    python _kill_child.py save <folder>     # saves two small studies in turn, forever
    python _kill_child.py extract <cache>   # one cached feature extraction

Each mode prints ``started`` once its first unit of work is on disk, so the test kills
it in the middle of writing, not during imports.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def small_study(seed: int, n_images: int = 12, n_vertices: int = 30):
    """A study with fMRI and MEG whose every array depends on ``seed``."""
    import mne

    from gradbrain.data import Study

    mne.set_log_level("error")  # MNE logs to stdout, where the test waits for "started"

    rng = np.random.default_rng(seed)
    ids = [f"img{i:02d}" for i in range(n_images)]
    split = np.array(["test" if i < 4 else "train" for i in range(n_images)])
    info = mne.create_info([f"MEG{i:03d}" for i in range(5)], sfreq=100.0, ch_types="mag")
    epochs = mne.EpochsArray(rng.standard_normal((n_images, 5, 20)) * 1e-12, info, tmin=-0.05,
                             verbose="error")
    import pandas as pd

    epochs.metadata = pd.DataFrame({"image_id": ids, "repeat": 0, "split": split})
    return Study(
        name=f"small (seed {seed})", image_ids=ids, split=split,
        betas=rng.standard_normal((n_images, 2, n_vertices)).astype(np.float32),
        vertices=np.arange(n_vertices), hemi=np.array(["left"] * n_vertices),
        hierarchy=rng.uniform(0, 80, n_vertices), ncsnr=rng.uniform(0.1, 1, n_vertices),
        epochs=epochs, truth={"seed": seed, "weights": rng.standard_normal(3)},
    )


def extraction_arguments():
    from gradbrain import models
    from gradbrain.data import load_embedded

    model = models.load("efficientnet_lite0.imagenet", weights="pretrained")
    return model, load_embedded(32, size=64), dict(losses=("ce", "proj"), batch_size=1)


def main(mode: str, path: str) -> None:
    if mode == "save":
        studies = [small_study(0), small_study(1)]
        studies[0].save(path)
        print("started", flush=True)
        i = 1
        while True:
            studies[i % 2].save(path)
            i += 1
    elif mode == "extract":
        from gradbrain import features

        model, images, kwargs = extraction_arguments()
        print("started", flush=True)
        features.extract(model, images, cache=path, **kwargs)
        print("finished", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
