"""THINGS-MEG loader on small files written in the real layout (MNE -epo.fif + CSV)."""

import sys
import types

import numpy as np
import pandas as pd
import pytest

from gradbrain import meg
from gradbrain.data import load_study, things_meg
from gradbrain.data.geometry import THINGS_MEG_EXCLUDED, ctf_info

# its module fixtures are computed once: the file stays on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_things_meg")

SFREQ = 200.0
N_TIMES = 281  # −100 … 1300 ms at 200 Hz, as in the real files


# Column names and order from the public sources below; the real table has 18 columns,
# of which these are the ones the loaders in those sources read (image_path is column 8).
COLUMNS = ["session_nr", "run_nr", "trial_type", "image_nr", "things_image_nr", "category_nr",
           "exemplar_nr", "test_image_nr", "image_path", "image_on", "image_off"]


def _write_dataset(root, subject=2, n_channels=271, split_size="2MB"):
    """A small ds004212 in the published layout: 4 test images × 3 repeats, 10 images
    seen once, 3 catch trials, shuffled.

    Layout, as published (OpenNeuro ds004212 file list; ViCCo-Group/THINGS-data
    MEG/step1_preprocessing.py; Meta's neuralset THINGS-MEG loader):

    * ``sourcedata/sample_attributes_P{n}.csv``: one row per trial, columns above;
      ``image_path`` is ``images_meg/<concept>/<file>.jpg`` for images seen once,
      ``images_test_meg/<file>.jpg`` for test images (no concept folder) and
      ``images_catch_meg/<file>.jpg`` for catch trials.
    * ``derivatives/preprocessed/preprocessed_P{n}-epo.fif``: MNE epochs saved with the
      table as metadata, split by MNE into ``-epo.fif``, ``-epo-1.fif``, … (2 GB parts
      there; ``split_size`` here). 271 magnetometer channels (CTF-275 without MLF25,
      MRF43, MRO13 and MRO11; no reference channels), −100…1300 ms at 200 Hz, values
      z-scored per trial against the baseline (unitless, although MNE labels them in T).
    """
    import mne

    rng = np.random.default_rng(subject)
    test = [("images_test_meg/ant_13s.jpg", "test"), ("images_test_meg/bear_12s.jpg", "test"),
            ("images_test_meg/coat_rack_14s.jpg", "test"), ("images_test_meg/drum_13s.jpg", "test")]
    exp = [(f"images_meg/{c}/{c}_{i:02d}b.jpg", "exp")
           for i, c in enumerate(["ant", "bear", "coat_rack", "drum", "eel"] * 2)]
    catch = [(f"images_catch_meg/catch{i:03d}.jpg", "catch") for i in range(3)]
    trials = test * 3 + exp + catch
    trials = [trials[i] for i in rng.permutation(len(trials))]
    n = len(trials)
    table = pd.DataFrame({
        "session_nr": rng.integers(1, 13, n), "run_nr": rng.integers(1, 11, n),
        "trial_type": [t for _, t in trials], "image_nr": np.arange(n),
        "things_image_nr": rng.integers(1, 26000, n), "category_nr": rng.integers(1, 1855, n),
        "exemplar_nr": rng.integers(1, 13, n),
        "test_image_nr": [1 + [p for p, _ in test].index(p) if t == "test" else np.nan
                          for p, t in trials],
        "image_path": [p for p, _ in trials],
        "image_on": np.arange(n) * 1.5, "image_off": np.arange(n) * 1.5 + 0.5,
    })[COLUMNS]
    # CTF-275 minus the three sensors the system lacks and MRO11, dropped in step 1
    info = ctf_info(SFREQ, None, exclude=THINGS_MEG_EXCLUDED)
    assert info["nchan"] == n_channels
    data = rng.normal(size=(n, n_channels, N_TIMES)).astype(np.float32)  # z-scores

    epochs = mne.EpochsArray(data, info, tmin=-0.1, metadata=table, verbose="error")
    (root / "derivatives" / "preprocessed").mkdir(parents=True)
    (root / "sourcedata").mkdir()
    epochs.save(root / "derivatives" / "preprocessed" / f"preprocessed_P{subject}-epo.fif",
                fmt="single", split_size=split_size, verbose="error")
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
    expected_concepts = [p.split("/")[1] if p.startswith("images_meg/")
                         else p.split("/")[-1].rsplit("_", 1)[0] for p in meta["image_path"]]
    assert meta["category"].tolist() == expected_concepts  # coat_rack_14s → coat_rack
    split = dict(zip(study.image_ids, study.split))
    assert split["ant_13s"] == "test" and split["eel_04b"] == "train"
    assert study.epochs.info["nchan"] == 271 and study.epochs.info["sfreq"] == SFREQ
    assert not set(THINGS_MEG_EXCLUDED) & set(study.epochs.ch_names)


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
    # spread over the sorted test images (ant, bear, coat_rack, drum): the first and last
    rows = np.flatnonzero(table["image_path"].str.contains("ant_13s|drum_13s"))
    start = 20  # sample of t = 0 s
    np.testing.assert_allclose(study.epochs.times, np.arange(0, 0.5 + 1e-9, 0.01))
    np.testing.assert_allclose(study.epochs.get_data(), data[rows][:, :, start:start + 101:2],
                               rtol=1e-6)
    assert study.image_ids == ["ant_13s", "drum_13s"]


def test_max_images_keeps_test_images_and_spreads_over_concepts(dataset):
    """A quick run on 6 of the 14 images keeps half from the test split (the chapter
    scores on them), spread over concepts, instead of the first 6 names."""
    study = things_meg.load_subject(2, dataset[0], split="all", max_images=6)
    split = dict(zip(study.image_ids, study.split))
    assert sum(v == "test" for v in split.values()) == 3 and len(split) == 6
    concepts = set(study.epochs.metadata["category"])
    assert len(concepts) >= 4


def test_loading_prints_nothing(dataset, capfd):
    """MNE's 'Loading data…' and 'Replacing existing metadata…' stay out of chapters."""
    things_meg.load_subject(2, dataset[0], split="all", decim=2, tmin=0.0, tmax=0.5)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_missing_split_part_is_named(tmp_path):
    root = tmp_path / "ds"
    _write_dataset(root, subject=1)
    folder = root / "derivatives" / "preprocessed"
    parts = sorted(p.name for p in folder.glob("preprocessed_P1-epo*.fif"))
    assert parts[:2] == ["preprocessed_P1-epo-1.fif", "preprocessed_P1-epo-2.fif"]
    assert things_meg.load_subject(1, root).epochs.info["nchan"] == 271  # all parts: fine
    (folder / "preprocessed_P1-epo-2.fif").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"part preprocessed_P1-epo-2.fif is missing.*download\(1, root\)"):
        things_meg.load_subject(1, root)


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
    # THINGS images: one folder per concept, test images included (images_THINGS.zip)
    for concept, name in [("ant", "ant_13s"), ("bear", "bear_12s"),
                          ("coat_rack", "coat_rack_14s"), ("drum", "drum_13s")]:
        (tmp_path / concept).mkdir()
        Image.new("RGB", (20, 20), (len(name) * 9, 0, 0)).save(tmp_path / concept / f"{name}.jpg")
    study = things_meg.load_subject(2, root, images_dir=tmp_path)
    assert study.images.ids == study.image_ids
    assert study.images.labels == ["ant", "bear", "coat_rack", "drum"]


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


def test_download_fetches_the_epochs_parts_and_the_table(tmp_path, monkeypatch):
    calls = {}
    fake = types.SimpleNamespace(download=lambda **kwargs: calls.update(kwargs))
    monkeypatch.setitem(sys.modules, "openneuro", fake)
    paths = things_meg.download(4, tmp_path)
    assert calls["dataset"] == "ds004212"
    # the epochs are split by MNE into -epo.fif, -epo-1.fif, …: a glob fetches every part
    assert calls["include"] == ["derivatives/preprocessed/preprocessed_P4-epo*.fif",
                                "sourcedata/sample_attributes_P4.csv"]
    assert paths == [things_meg.epochs_path(tmp_path, 4), things_meg.attributes_path(tmp_path, 4)]
    monkeypatch.setitem(sys.modules, "openneuro", None)  # not installed
    with pytest.raises(ImportError, match="pip install openneuro-py"):
        things_meg.download(4, tmp_path)


def _write_chapter_dataset(root, images_dir, subject=1):
    """Enough trials for the MEG chapter: 4 concepts × (10 images seen once + 2 test
    images × 4 repeats), in the published layout (see _write_dataset), plus the THINGS
    image folder (<concept>/<file>.jpg, test images included)."""
    import mne
    from PIL import Image

    rng = np.random.default_rng(7)
    concepts = ["ant", "bear", "coat_rack", "drum"]
    exp = [(f"images_meg/{c}/{c}_{i:02d}b.jpg", "exp") for c in concepts for i in range(1, 11)]
    test = [(f"images_test_meg/{c}_{i}s.jpg", "test") for c in concepts for i in (13, 14)]
    trials = exp + test * 4 + [("images_catch_meg/catch001.jpg", "catch")]
    trials = [trials[i] for i in rng.permutation(len(trials))]
    n = len(trials)
    table = pd.DataFrame({
        "session_nr": 1, "run_nr": 1, "trial_type": [t for _, t in trials],
        "image_nr": np.arange(n), "things_image_nr": np.arange(n), "category_nr": 1,
        "exemplar_nr": 1, "test_image_nr": np.nan, "image_path": [p for p, _ in trials],
        "image_on": np.arange(n) * 1.5, "image_off": np.arange(n) * 1.5 + 0.5,
    })[COLUMNS]
    info = ctf_info(SFREQ, None, exclude=THINGS_MEG_EXCLUDED)
    data = rng.normal(size=(n, 271, N_TIMES)).astype(np.float32)
    (root / "derivatives" / "preprocessed").mkdir(parents=True)
    (root / "sourcedata").mkdir()
    mne.EpochsArray(data, info, tmin=-0.1, metadata=table, verbose="error").save(
        root / "derivatives" / "preprocessed" / f"preprocessed_P{subject}-epo.fif",
        fmt="single", split_size="10MB", verbose="error")
    table.to_csv(root / "sourcedata" / f"sample_attributes_P{subject}.csv", index=False)
    for path, kind in set(trials):
        if kind == "catch":
            continue
        name = path.split("/")[-1]
        concept = name.rsplit("_", 1)[0]
        (images_dir / concept).mkdir(parents=True, exist_ok=True)
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        Image.new("RGB", (48, 48), colour).save(images_dir / concept / name)


@pytest.mark.slow
def test_the_things_profile_runs_its_chapters_through_the_runner_and_papermill(tmp_path):
    """params/things.yaml on a fake participant in the real layout (split epochs, test
    images without concept folders, 271 sensors), with the packaged EfficientNet-Lite0
    instead of the hub's DINOv3: chapters 00, 01, 03, 04, 06 through the runner, then each
    through papermill's CLI with the flat file `gradbrain.book params` writes; chapter 04
    measures its error rates at the participant's own size (``sim_images="study"``)."""
    from _books import run_profile_both_ways

    data_root, images_dir = tmp_path / "ds004212", tmp_path / "THINGS"
    _write_chapter_dataset(data_root, images_dir)
    overrides = {"things": {"subject": 1, "root": str(data_root), "images_dir": str(images_dir),
                            "split": "all", "decim": 2, "tmin": -0.1, "tmax": 0.8},
                 "model": "efficientnet_lite0.imagenet", "losses": ["ce"], "n_boot": 5,
                 "control_model": "dinov3_vits16", "n_images": 40, "n_perm": 200,
                 "n_sim_seeds": 1, "sim_images": "study",   # at the participant's size
                 "n_novel": 8, "synth_steps": 1, "synth_size": 32}
    runs = run_profile_both_ways("things", overrides, tmp_path)
    assert runs["status"] == dict.fromkeys(
        ["00_data", "01_gradients", "03_meg_decoding", "04_hierarchy_tests", "06_in_silico"],
        "executed")
    for texts in (runs["runner"], runs["cli"]):
        assert "THINGS-MEG P1 (all)" in texts["03_meg_decoding"]
        assert "271 sensors" in texts["03_meg_decoding"]
        assert "What gradients add to their activations" in texts["03_meg_decoding"]
        assert "images of this study" in texts["04_hierarchy_tests"]
        for name in ("00_data", "03_meg_decoding"):
            assert "Loading data" not in texts[name]
            assert "Replacing existing metadata" not in texts[name]
        assert "**not tested** (no fMRI data in this study)" in texts["04_hierarchy_tests"]
        assert "This study has no fMRI: the fMRI sections are skipped." in texts["06_in_silico"]
        assert "activation encoder**: peaks at" in texts["06_in_silico"]   # MEG contrast
