"""THINGS-MEG loader on small files written in the real layout (MNE -epo.fif + CSV)."""

import sys
import types

import numpy as np
import pandas as pd
import pytest

from gradbrain import meg
from gradbrain.data import load_study, things_meg
from gradbrain.data.geometry import ctf_info

SFREQ = 200.0
N_TIMES = 281  # −100 … 1300 ms at 200 Hz, as in the real files


def _write_dataset(root, subject=2, n_channels=272):
    """4 test images × 3 repeats, 10 images seen once, 3 catch trials, shuffled."""
    rng = np.random.default_rng(subject)
    test = [("images_test_meg/ant/ant_13s.jpg", "test"), ("images_test_meg/bear/bear_12s.jpg", "test"),
            ("images_test_meg/cake/cake_14s.jpg", "test"), ("images_test_meg/drum/drum_13s.jpg", "test")]
    exp = [(f"images_meg/{c}/{c}_{i:02d}b.jpg", "exp")
           for i, c in enumerate(["ant", "bear", "cake", "drum", "eel"] * 2)]
    catch = [(f"images_catch_meg/catch_{i}.jpg", "catch") for i in range(3)]
    trials = test * 3 + exp + catch
    trials = [trials[i] for i in rng.permutation(len(trials))]
    table = pd.DataFrame({
        "trial_type": [t for _, t in trials],
        "image_path": [p for p, _ in trials],
        "session_nr": rng.integers(1, 13, len(trials)),
        "run_nr": rng.integers(1, 11, len(trials)),
        "image_nr": np.arange(len(trials)),
        "things_image_nr": rng.integers(1, 26000, len(trials)),
        "things_category_nr": rng.integers(1, 1855, len(trials)),
        "image_on": np.arange(len(trials)) * 1.5, "image_off": np.arange(len(trials)) * 1.5 + 0.5,
    })
    info = ctf_info(SFREQ, n_channels)
    data = rng.normal(size=(len(trials), n_channels, N_TIMES)).astype(np.float32)
    import mne

    epochs = mne.EpochsArray(data, info, tmin=-0.1, metadata=table, verbose="error")
    (root / "derivatives" / "preprocessed").mkdir(parents=True)
    (root / "sourcedata").mkdir()
    epochs.save(root / "derivatives" / "preprocessed" / f"preprocessed_P{subject}-epo.fif",
                fmt="single", verbose="error")
    table.to_csv(root / "sourcedata" / f"sample_attributes_P{subject}.csv", index=False)
    return table, data.astype(np.float64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds004212")
    table, data = _write_dataset(root)
    return root, table, data


def test_trials_align_with_the_table_and_catch_trials_are_left_out(dataset):
    root, table, data = dataset
    study = things_meg.load_subject(2, root, split="all")
    meta = study.epochs.metadata
    expected = np.flatnonzero(table["trial_type"] != "catch")
    np.testing.assert_array_equal(meta["image_path"], table["image_path"].iloc[expected])
    np.testing.assert_allclose(study.epochs.get_data(), data[expected], rtol=1e-6)
    assert study.image_ids == sorted(meta["image_id"].unique()) and len(study.image_ids) == 14
    assert np.asarray(study.image_ids)[meta["image_index"]].tolist() == meta["image_id"].tolist()
    assert meta.loc[meta.image_id == "bear_12s", "repeat"].tolist() == [0, 1, 2]
    assert (meta["category"] == [p.split("/")[1] for p in meta["image_path"]]).all()
    split = dict(zip(study.image_ids, study.split))
    assert split["ant_13s"] == "test" and split["eel_04b"] == "train"
    assert study.epochs.info["nchan"] == 272 and study.epochs.info["sfreq"] == SFREQ


def test_test_split_averages_repeats_like_numpy(dataset):
    root, table, data = dataset
    study = things_meg.load_subject("P2", root)  # default: the test images
    assert set(study.split) == {"test"} and len(study.epochs) == 12
    averaged = meg.average_by_image(study.epochs, study.image_ids)
    for i, image_id in enumerate(study.image_ids):
        rows = table["image_path"].str.contains(f"/{image_id}.jpg", regex=False).to_numpy()
        np.testing.assert_allclose(averaged[i], data[rows].mean(0), rtol=1e-6)
    train = things_meg.load_subject(2, root, split="train")
    assert set(train.split) == {"train"} and len(train.epochs) == 10


def test_crop_decimate_and_max_images(dataset):
    root, table, data = dataset
    study = things_meg.load_subject(2, root, tmin=0.0, tmax=0.5, decim=2, max_images=2)
    rows = np.flatnonzero(table["image_path"].str.contains("ant_13s|bear_12s"))
    start = 20  # sample of t = 0 s
    np.testing.assert_allclose(study.epochs.times, np.arange(0, 0.5 + 1e-9, 0.01))
    np.testing.assert_allclose(study.epochs.get_data(), data[rows][:, :, start:start + 101:2],
                               rtol=1e-6)
    assert study.image_ids == ["ant_13s", "bear_12s"]


def test_epochs_are_opened_lazily(dataset, monkeypatch):
    """The 8 GB file is never preloaded whole: read_epochs gets preload=False."""
    import mne

    calls = []
    real = mne.read_epochs

    def spy(*args, **kwargs):
        calls.append(kwargs.get("preload"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mne, "read_epochs", spy)
    things_meg.load_subject(2, dataset[0])
    assert calls == [False]


def test_images_come_from_the_users_folder(dataset, tmp_path):
    from PIL import Image

    root = dataset[0]
    with pytest.raises(FileNotFoundError, match="4 of 4 THINGS images are missing.*osf.io"):
        things_meg.load_subject(2, root, images_dir=tmp_path)
    for concept, name in [("ant", "ant_13s"), ("bear", "bear_12s"), ("cake", "cake_14s"),
                          ("drum", "drum_13s")]:
        (tmp_path / concept).mkdir()
        Image.new("RGB", (20, 20), (len(name) * 9, 0, 0)).save(tmp_path / concept / f"{name}.jpg")
    study = things_meg.load_subject(2, root, images_dir=tmp_path)
    assert study.images.ids == study.image_ids
    assert study.images.labels == ["ant", "bear", "cake", "drum"]


def test_load_study_dispatches_to_the_loader(dataset):
    study = load_study("things", subject=2, root=dataset[0])
    assert study.name == "THINGS-MEG P2 (test)"


@pytest.mark.parametrize("kwargs,error,match", [
    ({"subject": 5}, ValueError, r"'subject' must be one of THINGS-MEG's participants"),
    ({"subject": 1}, FileNotFoundError, r"preprocessed_P1-epo.fif.*things_meg.download\(1, root\)"),
    ({"subject": 2, "split": "val"}, ValueError, r"'split' must be one of"),
    ({"subject": 2, "decim": 0}, ValueError, r"'decim' must be a positive integer"),
    ({"subject": 2, "max_images": 0}, ValueError, r"'max_images' must be a positive integer"),
])
def test_bad_inputs_each_give_one_clear_error(dataset, kwargs, error, match):
    with pytest.raises(error, match=match):
        things_meg.load_subject(root=dataset[0], **kwargs)


def test_bad_folders_and_mismatched_files(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="does not exist.*ds004212"):
        things_meg.load_subject(2, tmp_path / "nowhere")
    root, table, _ = dataset
    other = tmp_path / "other"
    _write_dataset(other, subject=3)
    table.iloc[:-1].to_csv(other / "sourcedata" / "sample_attributes_P3.csv", index=False)
    with pytest.raises(ValueError, match="has 25 epochs but sample_attributes_P3.csv has 24"):
        things_meg.load_subject(3, other)
    pd.DataFrame({"x": [1]}).to_csv(other / "sourcedata" / "sample_attributes_P3.csv")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['trial_type', 'image_path'\]"):
        things_meg.read_attributes(other, 3)


def test_download_fetches_only_the_two_files(tmp_path, monkeypatch):
    calls = {}
    fake = types.SimpleNamespace(download=lambda **kwargs: calls.update(kwargs))
    monkeypatch.setitem(sys.modules, "openneuro", fake)
    paths = things_meg.download(4, tmp_path)
    assert calls["dataset"] == "ds004212"
    assert calls["include"] == ["derivatives/preprocessed/preprocessed_P4-epo.fif",
                                "sourcedata/sample_attributes_P4.csv"]
    assert paths == [things_meg.epochs_path(tmp_path, 4), things_meg.attributes_path(tmp_path, 4)]
    monkeypatch.setitem(sys.modules, "openneuro", None)  # not installed
    with pytest.raises(ImportError, match="pip install openneuro-py"):
        things_meg.download(4, tmp_path)
