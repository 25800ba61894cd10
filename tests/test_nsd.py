"""gradbrain.data.nsd on a small NSD in the published formats (tests/_nsd_fake.py), read
from a local folder and from a local S3 server (moto) behind a fault-injecting proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from gradbrain.data import load_study, nsd
from gradbrain.data.images import ImageFiles

sys.path.insert(0, str(Path(__file__).parent))
import _nsd_fake  # noqa: E402

BETAS_PATH = "betas_fithrf_GLMdenoise_RR"


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return _nsd_fake.write_nsd(tmp_path_factory.mktemp("nsd") / "bucket", sessions=(1, 2),
                               n_vertices=643, n_images_per_session=30)


@pytest.fixture(scope="module")
def s3(fake):
    server, endpoint = _nsd_fake.start_moto()
    _nsd_fake.upload(fake["root"], endpoint)
    proxy = _nsd_fake.FaultProxy(endpoint)
    yield {"endpoint": endpoint, "proxy": proxy}
    proxy.close()
    server.stop()


def _source(url, retries=4):
    src = nsd.open_source(url)
    src.retries, src.backoff = retries, 0.01
    return src


def _reference(fake, n_repeats=3, roi="nsdgeneral"):
    """Per-session z-scored, ROI-restricted betas of the images shown n_repeats times,
    computed from nibabel's full reads and the design tables, independently of the loader."""
    root, subject = fake["root"], fake["subject"]
    order, subjectim = fake["masterordering"], fake["subjectim"]
    n_trials = len(fake["sessions"]) * 750
    ids = subjectim[subject - 1, order[:n_trials] - 1] - 1
    values, counts = np.unique(ids, return_counts=True)
    chosen = values[counts >= n_repeats]
    columns = []
    for hemi in ("lh", "rh"):
        label = np.asarray(nib.load(root / nsd.label_key(roi, hemi)).get_fdata()).ravel()
        ncsnr = np.asarray(nib.load(root / nsd.ncsnr_key(subject, hemi)).get_fdata()).ravel()
        z = np.concatenate([
            stats.zscore(np.asarray(nib.load(root / nsd.betas_key(subject, s, hemi))
                                    .get_fdata()).reshape(-1, 750), axis=1).T
            for s in fake["sessions"]])                          # (trials, vertices)
        keep = (label > 0) & np.isfinite(ncsnr) & np.isfinite(z).all(0)
        per_image = np.stack([z[np.flatnonzero(ids == i)[:n_repeats]][:, keep] for i in chosen])
        columns.append((per_image, np.flatnonzero(keep), ncsnr[keep]))
    betas = np.concatenate([c[0] for c in columns], axis=2)
    return chosen, betas, columns


def test_design_follows_expdesign_tables(fake):
    design = nsd.read_design(1, fake["root"], cache_dir=fake["root"].parent / "cache")
    order, subjectim = fake["masterordering"], fake["subjectim"]
    assert len(design) == 40 * 750
    t = np.array([0, 749, 750, 29_999])
    expected = [subjectim[0, order[i] - 1] - 1 for i in t]
    assert design.nsd_id.to_numpy()[t].tolist() == expected
    assert design.session.to_numpy()[t].tolist() == [1, 1, 2, 40]
    assert design.trial_in_session.to_numpy()[t].tolist() == [0, 749, 0, 749]
    assert design.shared.to_numpy().tolist() == np.isin(design.nsd_id, fake["sharedix"]).tolist()
    assert design.groupby("nsd_id").size().max() == 3
    assert set(design.repeat) == {0, 1, 2}


def test_ranged_reads_equal_nibabel_bit_for_bit(fake, s3):
    src = _source(s3["endpoint"] + "/" + nsd.BUCKET)
    trials = [0, 1, 2, 57, 400, 401, 749]
    got = nsd.read_trials(1, 2, "right", trials, resolution="fsaverage", source=src)
    full = np.asarray(nib.load(fake["root"] / nsd.betas_key(1, 2, "rh")).dataobj)
    want = full.reshape(-1, 750)[:, trials].T
    assert got.dtype == np.float32 and got.shape == (7, fake["n_vertices"])
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_load_subject_equals_numpy_reference(fake, tmp_path):
    study = nsd.load_subject(1, source=fake["root"], cache_dir=tmp_path, resolution="fsaverage",
                             progress=False)
    chosen, betas, columns = _reference(fake)
    assert study.image_ids == [f"nsd{i:05d}" for i in chosen]
    np.testing.assert_allclose(study.betas, betas, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(study.mean_betas(), betas.mean(1), rtol=1e-5, atol=1e-5)
    assert study.vertices.tolist() == columns[0][1].tolist() + columns[1][1].tolist()
    assert (study.hemi == "left").sum() == len(columns[0][1])
    np.testing.assert_allclose(study.ncsnr, np.concatenate([columns[0][2], columns[1][2]]),
                               rtol=1e-6)
    # the all-NaN vertices and the one without an NC estimate are gone
    for hemi, side in (("lh", "left"), ("rh", "right")):
        assert not set(fake["nan_vertices"][hemi]) & set(study.vertices[study.hemi == side])
    assert study.split.tolist() == ["test" if i in set(fake["sharedix"]) else "train"
                                    for i in chosen]
    assert {"test", "train"} == set(study.split)
    # images are the stimulus file's, COCO ids from the stimulus table (cocoId = 7 id + 9)
    assert np.array_equal(np.asarray(study.images.images[0]), _nsd_fake._image(int(chosen[0])))
    assert study.images.sources[0] == f"NSD {chosen[0]} (COCO {7 * chosen[0] + 9})"
    # hierarchy: distance from V1, smaller inside V1 than outside
    assert study.hierarchy.min() == 0 and study.mesh == "fsaverage"
    # the same study through the one entry point, from the cache
    again = load_study("nsd", subject=1, source=fake["root"], cache_dir=tmp_path,
                       resolution="fsaverage", progress=False)
    assert again.digest() == study.digest()


def test_faults_are_retried_and_reads_stay_exact(fake, s3, tmp_path):
    proxy = s3["proxy"]
    key = nsd.betas_key(1, 1, "lh")
    proxy.faults = {key: ["500", "drop", "short", "truncate", "500"]}
    proxy.min_bytes = 1000  # the data, not the 284-byte header
    proxy.requests.clear()
    src = _source(proxy.url + "/" + nsd.BUCKET, retries=6)
    got = nsd.read_trials(1, 1, "left", range(0, 750), resolution="fsaverage", source=src,
                          max_workers=4)
    full = np.asarray(nib.load(fake["root"] / key).dataobj).reshape(-1, 750).T
    assert np.array_equal(got.view(np.uint32), full.astype(np.float32).view(np.uint32))
    proxy.min_bytes = 0
    assert proxy.faults[key] == []  # every fault was served, and recovered from
    gets = [r for r in proxy.requests if r[0] == "GET" and key in r[1]]
    assert len(gets) == 1 + 5 + 1  # header, five failures, the good read


def test_faults_beyond_the_retries_raise_a_clear_error(fake, s3):
    proxy = s3["proxy"]
    key = nsd.betas_key(1, 2, "lh")
    proxy.faults = {key: ["500"] * 10}
    src = _source(proxy.url + "/" + nsd.BUCKET, retries=2)
    with pytest.raises(ConnectionError, match="natural-scenes-dataset"):
        nsd.read_trials(1, 2, "left", [5], resolution="fsaverage", source=src)
    proxy.faults = {}


def test_s3_study_equals_local_study(fake, s3, tmp_path):
    local = nsd.load_subject(1, source=fake["root"], cache_dir=tmp_path / "a",
                             resolution="fsaverage", max_images=12, progress=False)
    remote = nsd.load_subject(1, source=_source(s3["endpoint"] + "/" + nsd.BUCKET),
                              cache_dir=tmp_path / "b", resolution="fsaverage", max_images=12,
                              progress=False)
    assert remote.digest() == local.digest()
    assert sorted(set(local.split)) == ["test", "train"] and local.n_images == 12


def test_interrupted_download_resumes_without_refetching(fake, s3, tmp_path):
    """A load killed mid-download; the next one fetches only the blocks not finished."""
    proxy = s3["proxy"]
    cache = tmp_path / "cache"
    url = proxy.url + "/" + nsd.BUCKET
    script = textwrap.dedent(f"""
        import time
        from gradbrain.data import nsd
        src = nsd.open_source({url!r})
        read = src._read
        def slow(key, start, stop):
            time.sleep(0.05)
            return read(key, start, stop)
        src._read = slow
        nsd.load_subject(1, source=src, cache_dir={str(cache)!r}, resolution="fsaverage",
                         max_workers=1, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    blocks = cache / "subj01" / "fsaverage"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(blocks.rglob("trials*.npy"))) < 4:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    finished = sorted(blocks.rglob("trials*.npy"))
    assert 4 <= len(finished) < 2 * 2 * 15, "the kill must land mid-download"
    before = {p: p.stat().st_mtime_ns for p in finished}
    proxy.requests.clear()
    study = nsd.load_subject(1, source=_source(url), cache_dir=cache, resolution="fsaverage",
                             progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # not rewritten
    ranged = [r for r in proxy.requests if r[0] == "GET" and r[2] and BETAS_PATH in r[1]]
    header_reads = [r for r in ranged if r[2] == f"bytes=0-{nsd.MGH_HEADER_BYTES - 1}"]
    block_reads = len(ranged) - len(header_reads)
    assert block_reads == 2 * 2 * 15 - len(finished)  # one request per missing block
    np.testing.assert_allclose(study.betas, _reference(fake)[1], rtol=1e-5, atol=1e-5)
    assert not list(cache.rglob(".*tmp-*"))  # the killed writer's temporary is gone
    proxy.requests.clear()                   # from a full cache: no betas file is read
    again = nsd.load_subject(1, source=_source(url), cache_dir=cache, resolution="fsaverage",
                             progress=False)
    assert not [r for r in proxy.requests if r[0] == "GET" and ".betas_session" in r[1]]
    assert again.digest() == study.digest()


def test_corrupt_cache_entries_are_detected_and_refetched(fake, tmp_path):
    kwargs = dict(source=fake["root"], cache_dir=tmp_path, resolution="fsaverage",
                  max_images=6, progress=False)
    first = nsd.load_subject(1, **kwargs)
    block = sorted(tmp_path.rglob("trials*.npy"))[3]
    block.write_bytes(block.read_bytes()[:1000])
    image = sorted((tmp_path / "stimuli").glob("*.png"))[0]
    image.write_bytes(b"not a png")
    with pytest.warns(RuntimeWarning, match="unreadable") as caught:
        second = nsd.load_subject(1, **kwargs)
    assert {str(block), str(image)} <= {w.message.args[0].split("'")[1] for w in caught}
    assert second.digest() == first.digest()


def test_dry_run_prints_the_plan_and_reads_no_betas(fake, tmp_path, capsys):
    plan = nsd.load_subject(1, source=fake["root"], cache_dir=tmp_path, resolution="fsaverage",
                            dry_run=True)
    out = capsys.readouterr().out
    assert plan["sessions"] == [1, 2] and len(plan["files"]) == 4
    assert plan["betas_bytes"] == 4 * 750 * fake["n_vertices"] * 4
    assert plan["n_trials_read"] == 1500 and plan["n_trials_kept"] == 3 * plan["n_images"]
    for text in ("sessions [1, 2]", "1500 trials", nsd.betas_key(1, 2, "rh"), "GB"):
        assert text in out
    assert not list(tmp_path.rglob("trials*.npy"))


def test_selection_by_ids_sessions_and_repeats(fake, tmp_path):
    kwargs = dict(source=fake["root"], cache_dir=tmp_path, resolution="fsaverage",
                  progress=False)
    one = nsd.load_subject(1, sessions=[1], n_repeats=1, max_images=10, **kwargs)
    assert one.betas.shape[:2] == (10, 1) and set(one.split) == {"test", "train"}
    shared = nsd.load_subject(1, images="shared1000", **kwargs)
    assert set(shared.split) == {"test"}
    ids = [int(i[3:]) for i in shared.image_ids[:2]]
    picked = nsd.load_subject(1, images=ids, **kwargs)
    assert picked.image_ids == shared.image_ids[:2]
    np.testing.assert_array_equal(picked.betas, shared.betas[:2])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(subject=9), ValueError, r"subjects \[1, 2, 3, 4, 5, 6, 7, 8\]"),
    (dict(sessions=[3]), ValueError, r"Session 3 of subj01 is not in .*available: \[1, 2\]"),
    (dict(sessions=[41]), ValueError, r"sessions 1…40"),
    (dict(images=[72_999]), ValueError, r"never shown to subj01"),
    (dict(images="some"), ValueError, r"'images' must be"),
    (dict(n_repeats=4), ValueError, r"'n_repeats' must be 1, 2 or 3"),
    (dict(roi="V1"), ValueError, r"'roi' must be one of"),
    (dict(resolution="fsaverage6"), ValueError, r"'resolution' must be one of"),
    (dict(hemis=("lh",)), ValueError, r"'hemis' must be"),
    (dict(max_images=0), ValueError, r"'max_images' must be"),
])
def test_bad_inputs_get_one_clear_error(fake, tmp_path, kwargs, error, match):
    kwargs = {"subject": 1, "source": fake["root"], "cache_dir": tmp_path,
              "resolution": "fsaverage", "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        nsd.load_subject(**kwargs)


def test_missing_or_unreachable_sources(fake, s3, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nsd.load_subject(1, source=tmp_path / "nowhere", progress=False)
    with pytest.raises(FileNotFoundError, match="No betas of subj02"):
        nsd.load_subject(2, source=fake["root"], cache_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="lh.betas_session09"):
        nsd.read_trials(1, 9, "lh", [0], source=_source(s3["endpoint"] + "/" + nsd.BUCKET))
    closed = _nsd_fake.FaultProxy(s3["endpoint"])
    url = closed.url
    closed.close()
    with pytest.raises(ConnectionError, match="naturalscenesdataset.org"):
        nsd.load_subject(1, source=_source(url + "/" + nsd.BUCKET, retries=1),
                         cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="neither s3://"):
        nsd.open_source("ftp://example.org/nsd")


def test_fsaverage5_cut_is_checked_on_the_surfaces(tmp_path):
    fake = _nsd_fake.write_nsd(tmp_path / "bucket", sessions=(1,), n_vertices=10_243,
                               n_images_per_session=10)
    study = nsd.load_subject(1, source=fake["root"], cache_dir=tmp_path / "cache", n_repeats=1,
                             max_images=8, progress=False)
    assert study.mesh == "fsaverage5" and study.vertices.max() < nsd.N_FSAVERAGE5
    full = np.asarray(nib.load(fake["root"] / nsd.betas_key(1, 1, "lh")).dataobj).reshape(-1, 750)
    z = stats.zscore(full[: nsd.N_FSAVERAGE5], axis=1)
    left = study.hemi == "left"
    trial = nsd.read_design(1, fake["root"], cache_dir=tmp_path / "cache").query(
        f"nsd_id == {int(study.image_ids[0][3:])}").trial_in_session.iloc[0]
    np.testing.assert_allclose(study.betas[0, 0, left], z[study.vertices[left], trial],
                               rtol=1e-5, atol=1e-5)
    # a surface whose first vertices are not fsaverage5's is refused
    surf = fake["root"] / nsd.surface_key("rh")
    coords, faces = nib.freesurfer.read_geometry(str(surf))
    nib.freesurfer.write_geometry(str(surf), coords[::-1].copy(), faces)
    with pytest.raises(ValueError, match="resolution='fsaverage'"):
        nsd.load_subject(1, source=fake["root"], cache_dir=tmp_path / "cache2", n_repeats=1,
                         max_images=8, progress=False)


def test_contiguous_stimulus_file_is_read_by_offset(tmp_path, s3):
    import h5py

    root = tmp_path / "bucket"
    path = root / nsd.STIMULI_KEY
    path.parent.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=pixels)   # contiguous, as h5py writes by default
    _nsd_fake.upload(root, s3["endpoint"], bucket="contiguous")
    proxy = s3["proxy"]
    proxy.requests.clear()
    src = _source(proxy.url + "/contiguous")
    images = nsd.read_images([3, 39, 0], src, cache_dir=tmp_path / "cache")
    # the images are read from their cached PNGs when used, not held (issue 33)
    assert isinstance(images, ImageFiles) and len(images) == 3
    assert [p.name for p in images.paths] == ["nsd00003.png", "nsd00039.png", "nsd00000.png"]
    for i, image in zip([3, 39, 0], images):
        assert np.array_equal(np.asarray(image), pixels[i])
    size = 24 * 24 * 3
    lengths = [int(b) - int(a) + 1 for a, b in
               (r[2][len("bytes="):].split("-") for r in proxy.requests if r[2])]
    image_reads = [n for n in lengths if n == size]
    assert len(image_reads) == 3  # one range request per image
    # a cached PNG cut short is named, deleted and fetched again; the others are not
    cached = tmp_path / "cache" / "stimuli" / "nsd00039.png"
    cached.write_bytes(cached.read_bytes()[:-20])
    proxy.requests.clear()
    with pytest.warns(RuntimeWarning, match="nsd00039.png"):
        again = nsd.read_images([3, 39], src, cache_dir=tmp_path / "cache")
    assert np.array_equal(np.asarray(again[1]), pixels[39])
    lengths = [int(b) - int(a) + 1 for a, b in
               (r[2][len("bytes="):].split("-") for r in proxy.requests if r[2])]
    assert lengths.count(size) == 1


@pytest.mark.slow
def test_the_nsd_profile_runs_its_chapters_through_the_runner_and_papermill(tmp_path):
    """params/nsd.yaml on a fake subject in the published formats (one session, fsaverage5
    cut, local copy of the bucket), with the packaged EfficientNet-Lite0 instead of the
    hub's DINOv3: chapters 00, 01, 02, 04, 06 through the runner, then each through papermill's
    CLI with the flat file `gradbrain.book params` writes."""
    from _books import run_profile_both_ways

    fake = _nsd_fake.write_nsd(tmp_path / "bucket", sessions=(1,), n_vertices=10_243,
                               n_images_per_session=10)
    overrides = {"nsd": {"subject": 1, "source": str(fake["root"]),
                         "cache_dir": str(tmp_path / "cache"), "sessions": [1], "n_repeats": 1,
                         "max_images": 40},
                 "model": "efficientnet_lite0.imagenet", "losses": ["ce"],
                 "control_model": "dinov3_vits16", "n_images": 40, "n_perm": 200, "n_boot": 10,
                 "n_sim_seeds": 1, "sim_n_images": 40,
                 "n_novel": 8, "synth_steps": 1, "synth_size": 32}
    runs = run_profile_both_ways("nsd", overrides, tmp_path)
    assert runs["status"] == dict.fromkeys(
        ["00_data", "01_gradients", "02_fmri_encoding", "04_hierarchy_tests", "06_in_silico"],
        "executed")
    for texts in (runs["runner"], runs["cli"]):
        assert "profile 'nsd': NSD subj01, recorded responses" in texts["00_data"]
        assert "fMRI (n_images, n_repeats, n_vertices) = (40, 1," in texts["00_data"]
        assert "profile 'nsd': NSD subj01 (from" in texts["02_fmri_encoding"]
        assert "**not tested** (no MEG data in this study)" in texts["04_hierarchy_tests"]
        # real data: no planted answer, the encoders are scored on the test images only
        assert "Real data: there is no planted answer" in texts["06_in_silico"]
        assert "on the test images." in texts["06_in_silico"]


def test_a_listed_but_forbidden_session_is_skipped_and_said(tmp_path, capsys):
    """NSD lists held-out sessions but answers 403 (issue 30): a default load skips
    them and says which sessions it used; asking for one by name is one clear error."""
    fake = _nsd_fake.write_nsd(tmp_path / "bucket", sessions=(1, 2, 3), n_vertices=643,
                               n_images_per_session=20)
    server, endpoint = _nsd_fake.start_moto()
    try:
        held_out = tuple(nsd.betas_key(1, 2, h) for h in ("lh", "rh"))
        _nsd_fake.upload(fake["root"], endpoint, private=held_out)
        url = f"{endpoint}/{nsd.BUCKET}"
        kwargs = dict(cache_dir=tmp_path / "cache", resolution="fsaverage", progress=False)
        plan = nsd.load_subject(1, source=_source(url), dry_run=True, **kwargs)
        out = capsys.readouterr().out
        assert plan["sessions"] == [1, 3] and plan["sessions_forbidden"] == [2]
        assert ("using sessions 1, 3 of 40; 2 listed but not downloadable (HTTP 403); "
                "4–40 not in the source") in out
        study = nsd.load_subject(1, source=_source(url), **kwargs)
        reference = nsd.load_subject(1, source=fake["root"], sessions=[1, 3], **kwargs)
        assert study.digest() == reference.digest()
        with pytest.raises(PermissionError, match=r"Session\(s\) \[2\] of subj01 are listed"):
            nsd.load_subject(1, source=_source(url), sessions=[1, 2], **kwargs)
    finally:
        server.stop()
