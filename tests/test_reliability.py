"""Never a stale or silently wrong result (issue #17).

Kill-and-rerun of the feature cache, Study.save, the book runner and the sweep (SIGKILL
at seeded random moments, each rerun compared with an uninterrupted run); chapters that
rerun when what they read changed; corrupt caches that heal; and a table of bad inputs,
each answered by one error that names the parameter.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from gradbrain import book, sweep
from gradbrain._utils import _pid_alive
from _books import write_notebook, write_toc  # tests/_books.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "_kill_child.py"
sys.path.insert(0, str(HERE))
import _kill_child  # noqa: E402

KILL_RNG = np.random.default_rng(17)  # the moments of the kills, reproducible


def _spawn(*args, **kwargs):
    """A Python child; stderr goes to a file (a full pipe would stall the child)."""
    import tempfile

    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=err, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            **kwargs)
    proc.error_text = lambda: (err.seek(0), err.read())[1][-3000:]
    return proc


def _started(proc) -> None:
    """Wait for the child's ``started`` line (it failed if stdout closes first)."""
    for line in proc.stdout:
        if line.strip() == "started":
            return
    proc.wait(timeout=30)
    raise AssertionError(f"the child failed before starting:\n{proc.error_text()}")


def _wait_for(condition, timeout=120.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _kill(proc, group=False):
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait(timeout=30)


def _leftovers(folder: Path) -> list[Path]:
    """Temporary files or folders that a killed writer could leave."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name
            or p.name.endswith(".running.ipynb")]


# --------------------------------------------------------------------------- Study.save


def test_study_save_killed_at_random_moments_keeps_a_whole_study(tmp_path):
    """Two studies saved in turn onto one folder; SIGKILL; the folder holds one of them."""
    digests = {_kill_child.small_study(s).digest() for s in (0, 1)}
    assert len(digests) == 2
    from gradbrain.data import Study

    path = tmp_path / "study"
    cut_short = 0
    for _ in range(3):
        proc = _spawn(CHILD, "save", path)
        _started(proc)
        time.sleep(KILL_RNG.uniform(0.0, 0.6))
        _kill(proc)
        cut_short += bool(_leftovers(tmp_path))  # the child does nothing but save
        loaded = Study.load(path)  # a swap cut short is undone here
        assert loaded.digest() in digests
        assert loaded.epochs is not None and loaded.betas.shape == (12, 2, 30)
    assert cut_short, "no kill hit a save in progress"
    # the next save removes what the killed ones left, and equals an uninterrupted save
    uninterrupted = _kill_child.small_study(0)
    uninterrupted.save(path)
    assert not _leftovers(tmp_path)
    again = Study.load(path)
    assert again.digest() == uninterrupted.digest()
    np.testing.assert_array_equal(again.betas, uninterrupted.betas)


def _dead_pid() -> int:
    done = subprocess.run(["true"])
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert done.returncode == 0 and not _pid_alive(proc.pid)
    return proc.pid


def test_a_swap_cut_between_aside_and_in_is_undone_by_the_next_load(tmp_path):
    """The one window of the swap: old folder renamed aside, new one not yet in place."""
    from gradbrain.data import Study

    study = _kill_child.small_study(3)
    study.save(tmp_path / "study")
    pid = _dead_pid()
    os.replace(tmp_path / "study", tmp_path / f".study.old-{pid}-abc")
    (tmp_path / f".study.tmp-{pid}-def").mkdir()  # the new one, half written
    (tmp_path / f".study.tmp-{pid}-def" / "study.h5").write_bytes(b"\x89HDF partial")
    assert Study.load(tmp_path / "study").digest() == study.digest()
    assert not _leftovers(tmp_path)


def test_temporaries_of_a_live_process_are_left_alone(tmp_path):
    from gradbrain._utils import clean_stale_temporaries

    mine = tmp_path / f".x.npz.tmp-{os.getpid()}-abc.npz"
    dead = tmp_path / f".x.npz.tmp-{_dead_pid()}-abc.npz"
    mine.write_bytes(b"1")
    dead.write_bytes(b"1")
    assert clean_stale_temporaries(tmp_path / "x.npz") == [dead]
    assert mine.exists() and not dead.exists()


@pytest.mark.parametrize("damage", ["truncated h5", "empty h5", "missing fif", "truncated fif",
                                    "missing h5"])
def test_a_damaged_study_gives_one_clear_error(tmp_path, damage):
    from gradbrain.data import Study

    path = _kill_child.small_study(0).save(tmp_path / "study")
    h5, fif = path / "study.h5", path / "meg-epo.fif"
    if damage == "truncated h5":
        h5.write_bytes(h5.read_bytes()[:2000])
    elif damage == "empty h5":
        h5.write_bytes(b"")
    elif damage == "missing fif":
        fif.unlink()
    elif damage == "truncated fif":
        fif.write_bytes(fif.read_bytes()[:3000])
    else:
        h5.unlink()
    error = FileNotFoundError if damage == "missing h5" else ValueError
    with pytest.raises(error) as info:
        Study.load(path)
    message = str(info.value)
    assert str(path) in message
    if error is ValueError:
        assert ("meg-epo.fif" if "fif" in damage else "study.h5") in message
        assert "00_data" in message  # how to rebuild it


# --------------------------------------------------------------------------- feature cache


@pytest.fixture(scope="module")
def extraction():
    """The child's extraction, uninterrupted and uncached: the reference."""
    from gradbrain import features

    model, images, kwargs = _kill_child.extraction_arguments()
    return model, images, kwargs, features.extract(model, images, **kwargs)


def _same_features(a, b):
    """Equal up to float32 summation order (the child may use another number of threads)."""
    assert a.layers == b.layers and a.backward_order == b.backward_order
    for layer in a.layers:
        reference = b.activations[layer]
        np.testing.assert_allclose(a.activations[layer], reference, rtol=1e-4,
                                   atol=1e-5 * np.abs(reference).max())
        for loss in a.losses:
            reference = b.gradients[loss][layer]
            np.testing.assert_allclose(a.gradients[loss][layer], reference, rtol=1e-4,
                                       atol=1e-4 * np.abs(reference).max())


def test_extraction_killed_at_random_moments_resumes_to_the_same_features(tmp_path,
                                                                          extraction):
    from gradbrain import features

    model, images, kwargs, reference = extraction
    for _ in range(2):
        proc = _spawn(CHILD, "extract", tmp_path)
        _started(proc)
        _wait_for(lambda: list(tmp_path.glob("*.partial/*.npz")) or proc.poll() is not None,
                  what="the first cached batch")
        time.sleep(KILL_RNG.uniform(0.0, 0.8))  # the whole extraction takes about 2 s
        _kill(proc)
    assert list(tmp_path.glob("*.partial/*.npz")), "the kills came too late to test resuming"
    resumed = features.extract(model, images, cache=tmp_path, **kwargs)
    _same_features(resumed, reference)
    assert not _leftovers(tmp_path) and not list(tmp_path.glob("*.partial"))


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "a text file": lambda p: p.write_text("not a cache\n"),
    "an array missing": lambda p: _rewrite(p, drop=1),
    "wrong number of images": lambda p: _rewrite(p, cut=1),
    # issue 30: caches that read well but are wrong
    "an extra column": lambda p: _rewrite(p, edit=lambda k, v: np.pad(v, ((0, 0), (0, 1)))
                                          if k.startswith("act/") else v),
    "an extra column everywhere": lambda p: _rewrite(
        p, edit=lambda k, v: np.pad(v, ((0, 0), (0, 1)))),
    "NaN gradients": lambda p: _rewrite(p, edit=lambda k, v: np.full_like(v, np.nan)
                                        if k.startswith("grad/") else v),
    "float64 arrays": lambda p: _rewrite(p, edit=lambda k, v: v.astype(np.float64)),
}


def _rewrite(path, drop=0, cut=0, edit=None):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for key in [k for k in arrays if k.startswith("act/")][:drop]:
        del arrays[key]
    if cut:
        arrays = {k: (v[:-cut] if k.startswith(("act/", "grad/")) else v)
                  for k, v in arrays.items()}
    if edit is not None:
        arrays = {k: (edit(k, v) if k.startswith(("act/", "grad/")) else v)
                  for k, v in arrays.items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@pytest.mark.parametrize("where", ["final", "batch"])
def test_a_corrupt_cache_file_is_named_deleted_and_recomputed(tmp_path, kind, where, cnn,
                                                              small_images):
    from gradbrain import features

    images = small_images[:4]
    args = dict(losses=("ce",), batch_size=2, layers=cnn.layers[-3:])
    reference = features.extract(cnn, images, **args)
    if where == "final":
        features.extract(cnn, images, cache=tmp_path, **args)
        target, = tmp_path.glob("*.npz")
    else:  # a batch of an interrupted run: the run dies after its first batch
        real, calls = features._extract_batch, []

        def dies_on_second(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*a, **k)

        features._extract_batch = dies_on_second
        try:
            with pytest.raises(KeyboardInterrupt):
                features.extract(cnn, images, cache=tmp_path, **args)
        finally:
            features._extract_batch = real
        target, = tmp_path.glob("*.partial/*.npz")
    CORRUPTIONS[kind](target)
    with pytest.warns(RuntimeWarning, match="Feature cache file .* is unreadable") as record:
        healed = features.extract(cnn, images, cache=tmp_path, **args)
    assert any(str(target) in str(w.message) for w in record)
    _same_features(healed, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the healed cache is read without complaint
        _same_features(features.extract(cnn, images, cache=tmp_path, **args), reference)


def test_a_folder_in_place_of_the_cache_file_is_left_alone(tmp_path, cnn, small_images):
    """Issue 30: a folder where the cache file goes raised IsADirectoryError. It is not
    the program's to delete: the features are computed without the cache, with a
    warning naming it."""
    from gradbrain import features

    images = small_images[:2]
    args = dict(losses=("ce",), layers=cnn.layers[-2:])
    reference = features.extract(cnn, images, cache=tmp_path, **args)
    target, = tmp_path.glob("*.npz")
    target.unlink()
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.warns(RuntimeWarning, match="in the way of the feature cache"):
        again = features.extract(cnn, images, cache=tmp_path, **args)
    _same_features(again, reference)
    assert (target / "mine.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- book runner


DATA = """
import numpy as np, pathlib
from gradbrain.data import Study
rng = np.random.default_rng(seed)
Study(name=f"toy (seed {seed})", image_ids=["a", "b", "c"],
      betas=rng.standard_normal((3, 1, 4)).astype("float32")).save(study_dir)
"""
USE = """
from gradbrain.data import Study
study = Study.load(study_dir)
print("read", study.name)
open(study_dir + ".used.txt", "a").write(study.name + "\\n")
"""


@pytest.fixture
def study_book(tmp_path):
    """`data` saves a study built from `seed`; `use` loads it and notes its name."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params").mkdir()
    study_dir = str(tmp_path / "study")
    write_notebook(tmp_path / "notebooks" / "data.ipynb", f"seed = 0\nstudy_dir = {study_dir!r}", DATA)
    write_notebook(tmp_path / "notebooks" / "use.ipynb", f"study_dir = {study_dir!r}", USE)
    write_toc(tmp_path, ["data", "use"])
    (tmp_path / "params" / "demo.yaml").write_text(yaml.safe_dump({"defaults": {}}))
    return tmp_path


def test_a_chapter_reruns_when_the_study_it_read_changed(study_book, capsys):
    used = study_book / "study.used.txt"
    assert book.run("demo", root=study_book, progress=False) == {"data": "executed",
                                                                 "use": "executed"}
    assert book.run("demo", root=study_book, progress=False) == {"data": "skipped",
                                                                 "use": "skipped"}
    # the case: a new seed reruns the data chapter, and so the chapter reading it
    status = book.run("demo", root=study_book, overrides={"seed": 1}, progress=False)
    assert status == {"data": "executed", "use": "executed"}
    assert used.read_text().splitlines() == ["toy (seed 0)", "toy (seed 1)"]
    assert "an input it read changed: " in capsys.readouterr().out
    # a study rebuilt outside the runner (by hand, another tool) is noticed as well
    sys.path.insert(0, str(HERE))
    _kill_child.small_study(5).save(study_book / "study")
    assert book.run("demo", root=study_book, only=["use"], progress=False) == {"use": "executed"}
    assert used.read_text().splitlines()[-1] == "small (seed 5)"
    # saving the same content again (new file times) is not a change
    _kill_child.small_study(5).save(study_book / "study")
    assert book.run("demo", root=study_book, only=["use"], progress=False) == {"use": "skipped"}
    stamp = json.loads((study_book / "executed" / ".stamps" / "use.json").read_text())
    assert [i["kind"] for i in stamp["inputs"]] == ["study"]


def test_a_chapter_reruns_when_a_recorded_weights_file_changes(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params").mkdir()
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1")
    write_notebook(tmp_path / "notebooks" / "a.ipynb", f"path = {str(weights)!r}",
              "from gradbrain.book import record_input\nrecord_input(path, kind='weights')")
    write_toc(tmp_path, ["a"])
    (tmp_path / "params" / "demo.yaml").write_text("defaults: {}\n")
    assert book.run("demo", root=tmp_path, progress=False) == {"a": "executed"}
    assert book.run("demo", root=tmp_path, progress=False) == {"a": "skipped"}
    weights.write_bytes(b"22")
    assert book.run("demo", root=tmp_path, progress=False) == {"a": "executed"}
    weights.unlink()
    assert book.stale_reason(book.chapters(tmp_path)[0], "x") is not None


SLOW = "import time\ntime.sleep(nap)\nresult = value * 3\nprint('result', result)"


def test_the_runner_killed_at_random_moments_reruns_to_the_same_book(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params").mkdir()
    for name in ("a", "b"):
        write_notebook(tmp_path / "notebooks" / f"{name}.ipynb", "value = 1\nnap = 0.0", SLOW)
    write_toc(tmp_path, ["a", "b"])
    (tmp_path / "params" / "demo.yaml").write_text(
        yaml.safe_dump({"defaults": {"nap": 1.0}, "notebooks": {"b": {"value": 7}}}))
    command = ["-m", "gradbrain.book", "run", "--root", tmp_path, "--quiet"]
    for _ in range(2):
        proc = _spawn(*command, start_new_session=True)
        _wait_for(lambda: list(tmp_path.glob("executed/.*.running.ipynb")),
                  what="a chapter to start")
        time.sleep(KILL_RNG.uniform(0.0, 2.5))
        _kill(proc, group=True)  # the runner and its kernel, as a closed terminal would
    status = book.run("demo", root=tmp_path, progress=False)
    assert "executed" in status.values()
    printed = {}
    for name in ("a", "b"):
        nb = nbformat.read(str(tmp_path / "executed" / f"{name}.ipynb"), as_version=4)
        printed[name] = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert printed == {"a": "result 3\n", "b": "result 21\n"}  # as an uninterrupted run prints
    assert not _leftovers(tmp_path)
    assert book.run("demo", root=tmp_path, progress=False) == {"a": "skipped", "b": "skipped"}


# --------------------------------------------------------------------------- sweep


CHAIN = """
import pathlib, time
import pandas as pd
from gradbrain.book import record_input
time.sleep(nap)
value = float(pathlib.Path(study_dir, "value.txt").read_text())
record_input(study_dir, kind="study")
pathlib.Path(results_path).parent.mkdir(parents=True, exist_ok=True)
pd.DataFrame([{"model": model, "weights": weights or "random init", "feature": "activation",
               "loss": "", "spatial": value, "temporal": -value}]).to_csv(results_path,
                                                                       index=False)
"""


@pytest.fixture
def sweep_book(tmp_path):
    """`data` writes seed + shift to the subject's folder; `chain` turns it into a table."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params").mkdir()
    write_notebook(tmp_path / "notebooks" / "data.ipynb", "seed = 0\nshift = 0\nstudy_dir = None",
              "import pathlib\np = pathlib.Path(study_dir); p.mkdir(parents=True, exist_ok=True)\n"
              "(p / 'value.txt').write_text(str(seed + shift))")
    write_notebook(tmp_path / "notebooks" / "chain.ipynb",
              "model = 'x'\nweights = None\nstudy_dir = None\nresults_path = None\nnap = 0.0",
              CHAIN)
    write_toc(tmp_path, ["data", "chain"])
    (tmp_path / "params" / "demo.yaml").write_text(yaml.safe_dump({
        "defaults": {}, "notebooks": {},
        "sweep": {"data_chapters": ["data"], "chapters": ["chain"], "results_chapter": "chain",
                  "subject": {"data": "seed"}}}))
    return tmp_path


MODEL = "efficientnet_lite0.imagenet"


def test_a_changed_data_parameter_reruns_the_sweep_chain(sweep_book, tmp_path):
    """The issue's case: `-p gradient_truth=…` reran the data job but kept old results."""
    out = tmp_path / "out"
    run = dict(out=out, executor="debug", root=sweep_book, verbose=False)
    table = sweep.run("demo", [MODEL], [2], **run)
    assert table.spatial.tolist() == [2.0]
    table = sweep.run("demo", [MODEL], [2], overrides={"shift": 10}, **run)
    assert table.spatial.tolist() == [12.0]
    data_jobs, chain_jobs = sweep.plan(sweep.load_spec(sweep_book, "demo"), [MODEL], [2], out,
                                       root=sweep_book, overrides={"shift": 10})
    assert not any(j.pending for j in data_jobs + chain_jobs)


def test_a_sweep_refuses_to_race_a_job_that_still_runs(sweep_book, tmp_path):
    import fcntl

    out = tmp_path / "out"
    data_jobs, _ = sweep.plan(sweep.load_spec(sweep_book, "demo"), [MODEL], [2], out,
                              root=sweep_book)
    lock_path = data_jobs[0].lock_path
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        with pytest.raises(RuntimeError, match=r"still running: data/sub-2 \(pid 4242\)"):
            sweep.run("demo", [MODEL], [2], out=out, executor="debug", root=sweep_book,
                      verbose=False)
    # released (as the system does when the holder dies): the same command runs
    table = sweep.run("demo", [MODEL], [2], out=out, executor="debug", root=sweep_book,
                      verbose=False)
    assert table.spatial.tolist() == [2.0]


def test_local_jobs_stop_with_a_killed_driver_and_the_rerun_finishes(sweep_book, tmp_path):
    out = tmp_path / "out"
    command = ["-m", "gradbrain.sweep", "--profile", "demo", "--models", MODEL, "--subjects", "3",
               "--executor", "local", "--out", out, "--root", sweep_book]
    proc = _spawn(*command, "-p", "nap=60")
    job = out / "executed" / MODEL / "sub-3" / ".job.lock"

    def job_pid():
        text = job.read_text().strip() if job.is_file() else ""
        return int(text) if text.isdigit() else None

    _wait_for(lambda: job_pid() is not None or proc.poll() is not None, timeout=180,
              what="the chain job to start")
    assert proc.poll() is None, proc.error_text()
    time.sleep(KILL_RNG.uniform(0.5, 2.0))
    pid = job_pid()
    assert _pid_alive(pid)
    _kill(proc)  # SIGKILL to the driver only
    _, chain_jobs = sweep.plan(sweep.load_spec(sweep_book, "demo"), [MODEL], [3], out,
                               root=sweep_book)
    # the job notices within a second; its lock is released once the system has closed
    # its files (a killed process with many threads takes a moment to be torn down)
    _wait_for(lambda: chain_jobs[0].running_pid() is None, timeout=20,
              what="the orphaned job to stop")
    assert not _pid_alive(pid)
    # the rerun (in this process, to save a start-up) finishes what the job had not
    assert [j.pending for j in chain_jobs] == [("chain",)]
    table = sweep.run("demo", [MODEL], [3], out=out, executor="debug", root=sweep_book,
                      verbose=False)
    assert table.spatial.tolist() == [3.0]


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """Small valid inputs that each bad-input case spoils in one place."""
    from gradbrain.data import Study

    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.txt").write_text("these are not weights\n")
    corrupt = folder / "corrupt"
    corrupt.mkdir()
    (corrupt / "study.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    rng = np.random.default_rng(0)
    return {"folder": folder, "X": rng.standard_normal((20, 3)), "y": rng.standard_normal(20),
            "corrupt": corrupt, "Study": Study}


def _api_cases():
    import torch

    from types import SimpleNamespace

    from gradbrain import compare, features, hierarchy, meg, models, plotting, ridge
    from gradbrain import stats as gstats
    from gradbrain.analysis import backprop
    from gradbrain.data.simulated import make_study

    nan_image = torch.zeros(1, 3, 64, 64)
    nan_image[0, 0, 0, 0] = float("nan")
    X = np.random.default_rng(0).standard_normal((20, 3))
    y = X[:, 0]
    meg_X = np.zeros((8, 3, 4))
    return [
        ("encoding_scores NC all 0", lambda t: ridge.encoding_scores(
            X[:15], X[:15, :2], X[15:], X[15:, :2], noise_ceiling=np.zeros(2)), ValueError,
         "noise_ceiling"),
        # validated when scoring, as MNE's SlidingEstimator does (its ported test fits first)
        ("SlidingRidgeCV scoring=acc", lambda t: meg.SlidingRidgeCV(scoring="acc").fit(
            meg_X, np.arange(8.0)).score(meg_X, np.arange(8.0)), ValueError, "scoring"),
        ("make_study seed<0", lambda t: make_study(-1), ValueError, "seed"),
        ("make_study seed float", lambda t: make_study(1.5), TypeError, "seed"),
        ("make_study n_fmri_repeats=0", lambda t: make_study(n_fmri_repeats=0), ValueError,
         "n_fmri_repeats"),
        ("make_study n_meg_test_repeats=0", lambda t: make_study(n_meg_test_repeats=0),
         ValueError, "n_meg_test_repeats"),
        ("make_study n_images=3", lambda t: make_study(n_images=3), ValueError, "n_images"),
        ("make_study gradient_truth", lambda t: make_study(gradient_truth="bogus"), ValueError,
         "gradient_truth"),
        ("hierarchy.run alpha=2", lambda t: backprop.backprop_tests(None, alpha=2), ValueError, "alpha"),
        ("hierarchy.run ci=1.5", lambda t: backprop.backprop_tests(None, ci=1.5), ValueError, "ci"),
        ("hierarchy.run n_perm=0", lambda t: backprop.backprop_tests(None, n_perm=0), ValueError,
         "n_perm"),
        ("hierarchy.run n_boot=-1", lambda t: backprop.backprop_tests(None, n_boot=-1), ValueError,
         "n_boot"),
        ("spatial_score NaN depth", lambda t: hierarchy.spatial_score(
            np.array([0, 1, 1, 0]), np.arange(4.0), np.array([0.0, np.nan])), ValueError,
         "values"),
        ("models.load text file", lambda t: models.load(
            "efficientnet_lite0.imagenet", weights=t["folder"] / "notes.txt"), ValueError,
         "notes.txt"),
        ("models.load unknown name", lambda t: models.load("resnet5O"), ValueError, "resnet5O"),
        ("extract NaN pixel", lambda t: features.extract("efficientnet_lite0.imagenet",
                                                         nan_image), ValueError, "images"),
        ("extract batch_size=0", lambda t: features.extract(
            "efficientnet_lite0.imagenet", nan_image, batch_size=0), ValueError, "batch_size"),
        ("extract unknown loss", lambda t: features.extract(
            "efficientnet_lite0.imagenet", nan_image, losses=("mse",)), ValueError, "losses"),
        ("extract unknown layer", lambda t: features.extract(
            "efficientnet_lite0.imagenet", nan_image, layers=["nope"]), ValueError, "layers"),
        ("extract device='gpu'", lambda t: features.extract(
            "efficientnet_lite0.imagenet", nan_image, device="gpu"), ValueError, "device"),
        ("compare.run empty", lambda t: compare.run([], None), ValueError, "model_names"),
        ("RidgeCV negative alpha", lambda t: ridge.RidgeCV(alphas=[1.0, -1.0]).fit(X, y),
         ValueError, "alphas"),
        ("RidgeCV cv=1", lambda t: ridge.RidgeCV(cv=1).fit(X, y), ValueError, "cv"),
        ("RidgeCV device='mps'", lambda t: ridge.RidgeCV(device="mps").fit(X, y), ValueError,
         "device"),
        ("RidgeCV y rows", lambda t: ridge.RidgeCV().fit(X, y[:5]), ValueError, "samples"),
        ("RidgeCV fold out of range", lambda t: ridge.RidgeCV(
            cv=[(np.arange(10), np.array([25]))]).fit(X, y), ValueError, "cv"),
        ("pearson_r shapes", lambda t: ridge.pearson_r(np.zeros((4, 2)), np.zeros((5, 2))),
         ValueError, "shape"),
        ("decode_time_resolved y length", lambda t: meg.decode_time_resolved(
            meg_X, np.zeros((5, 2)), meg_X), ValueError, "y_train"),
        ("backprop_tests n_units=1", lambda t: backprop.backprop_tests(None, n_units=1),
         ValueError, "n_units"),
        ("backprop_tests n_units=0", lambda t: backprop.backprop_tests(None, n_units=0),
         ValueError, "n_units"),
        ("backprop_tests seed=-1", lambda t: backprop.backprop_tests(None, seed=-1), ValueError,
         "seed"),
        ("backprop_tests min_noise_ceiling=150", lambda t: backprop.backprop_tests(
            None, min_noise_ceiling=150), ValueError, "min_noise_ceiling"),
        ("extract batch_size=True", lambda t: features.extract(
            "efficientnet_lite0.imagenet", nan_image, batch_size=True), ValueError, "batch_size"),
        ("extract loss_seed=-1", lambda t: features.extract(
            "efficientnet_lite0.imagenet", nan_image, loss_seed=-1), ValueError, "loss_seed"),
        ("models.load seed=-1", lambda t: models.load("dinov3_vits16", seed=-1), ValueError,
         "seed"),
        ("show_images n=0", lambda t: plotting.show_images(None, n=0), ValueError, "'n'"),
        ("plot_surface wrong length", lambda t: plotting.plot_surface(
            SimpleNamespace(n_vertices=5), np.zeros(4), label="x"), ValueError, "values"),
        ("plot_surface views=['top']", lambda t: plotting.plot_surface(
            SimpleNamespace(n_vertices=4), np.zeros(4), label="x", views=["top"]), ValueError,
         "views"),
        ("plot_layer_norms empty", lambda t: plotting.plot_layer_norms(pd.DataFrame()),
         ValueError, "table"),
        ("plot_model_comparison columns", lambda t: plotting.plot_model_comparison(
            pd.DataFrame({"model": ["m"]})), ValueError, "feature"),
        ("plot_time_courses {}", lambda t: plotting.plot_time_courses({}), ValueError,
         "results"),
        ("plot_contrast_by_hierarchy {}", lambda t: plotting.plot_contrast_by_hierarchy(
            {}, ylabel="y", title="t"), ValueError, "tables"),
        ("plot_contrast_over_time columns", lambda t: plotting.plot_contrast_over_time(
            {"a": pd.DataFrame({"x": [1]})}, ylabel="y", title="t"), ValueError, "time_ms"),
        ("plot_preferred_response {}", lambda t: plotting.plot_preferred_response(
            {}, {}, xlabel="x", title="t"), ValueError, "natural"),
        ("check_folds overlapping", lambda t: ridge.check_folds(
            [(np.arange(12), np.arange(10, 20))], 20), ValueError, "share samples"),
        ("group_test alpha=2", lambda t: gstats.group_test(pd.DataFrame({"a": [1.0, 2.0]}),
                                                           alpha=2), ValueError, "alpha"),
        ("group_estimate ci=1.5", lambda t: gstats.group_estimate(
            pd.DataFrame({"a": [1.0]}), pd.DataFrame({"a": [0.0]}), pd.DataFrame({"a": [2.0]}),
            ci=1.5), ValueError, "ci"),
        ("equivalence alpha=0", lambda t: gstats.equivalence(0.1, np.zeros(5), margin=0.3,
                                                             alpha=0), ValueError, "alpha"),
        ("temporal_score ci=1.5", lambda t: hierarchy.temporal_score(
            np.arange(4.0), np.linspace(0, 1, 4), ci=1.5), ValueError, "ci"),
        ("hierarchy_regions 0", lambda t: hierarchy.hierarchy_regions(np.arange(8.0), 0),
         ValueError, "n_regions"),
        ("peak_latency all NaN", lambda t: meg.peak_latency(np.arange(3.0), np.full(3, np.nan)),
         ValueError, "curve"),
        ("Study.load missing", lambda t: t["Study"].load(t["folder"] / "none"),
         FileNotFoundError, "study.h5"),
        ("Study.load corrupt", lambda t: t["Study"].load(t["corrupt"]), ValueError, "study.h5"),
    ]


@pytest.mark.parametrize("case", _api_cases(), ids=lambda c: c[0])
def test_bad_api_input_gives_one_error_naming_the_parameter(case, tiny_inputs):
    _, call, error, name = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            call(tiny_inputs)
    assert name in str(info.value), f"{name!r} not in: {info.value}"
    assert not isinstance(info.value, (AttributeError, IndexError, KeyError, ZeroDivisionError))


@pytest.fixture
def tiny_book(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params").mkdir()
    write_notebook(tmp_path / "notebooks" / "a.ipynb", "n_images = 200\nname = 'x'\nrate = 0.5",
              "pass")
    write_toc(tmp_path, ["a"])
    (tmp_path / "params" / "demo.yaml").write_text("defaults:\n  name: y\n")
    return tmp_path


BOOK_CASES = [
    ("-p typo", ["-p", "n_imgaes=40"], None, "n_imgaes"),
    ("-p wrong kind", ["-p", "n_images=many"], None, "n_images"),
    ("-p float for int", ["-p", "n_images=4.5"], None, "n_images"),
    ("-p string for number", ["-p", "rate=fast"], None, "rate"),
    ("-p no '='", ["-p", "n_images"], None, "KEY=VALUE"),
    ("unknown profile", ["--profile", "nds"], None, "nds"),
    ("unknown chapter", ["--only", "zz"], None, "zz"),
    ("typo under defaults", [], "defaults:\n  nmae: y\n", "nmae"),
    ("unknown chapter section", [], "notebooks:\n  b:\n    name: y\n", "'b'"),
    ("typo in a chapter section", [], "notebooks:\n  a:\n    nme: y\n", "nme"),
    ("YAML syntax", [], "defaults:\n  name: y\n    other: 1\n", "line 3"),
    ("not a mapping", [], "- a\n- b\n", "mapping"),
    ("unknown top-level key", [], "defualts: {}\n", "defualts"),
]


@pytest.mark.parametrize("case", BOOK_CASES, ids=lambda c: c[0])
def test_bad_book_command_lines_are_refused_before_anything_runs(case, tiny_book, capsys):
    _, argv, profile, name = case
    if profile is not None:
        (tiny_book / "params" / "demo.yaml").write_text(profile)
    try:
        code = book.main(["run", "--root", str(tiny_book), "--quiet", *argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None) and name in err, err
    assert "Traceback" not in err
    assert not (tiny_book / "executed" / "a.ipynb").exists()  # nothing ran


SWEEP_CASES = [
    ("--out is a file", ["--out", "{file}"], "--out"),
    ("--collect-only on nothing", ["--collect-only", "--out", "{missing}"], "does not exist"),
    ("-p typo", ["-p", "shfit=1"], "shfit"),
    ("unknown model", ["--models", "resnet5O"], "resnet5O"),
    ("unknown chapter", ["--chapters", "chian"], "chian"),
    ("unknown profile", ["--profile", "nsdd"], "nsdd"),
]


@pytest.mark.parametrize("case", SWEEP_CASES, ids=lambda c: c[0])
def test_bad_sweep_command_lines_are_refused(case, sweep_book, tmp_path, capsys):
    _, extra, name = case
    file = tmp_path / "a-file"
    file.write_text("x")
    argv = {"--profile": "demo", "--models": MODEL, "--subjects": "1",
            "--out": str(tmp_path / "out"), "--root": str(sweep_book), "--executor": "debug"}
    flags = []
    extra = [a.format(file=file, missing=tmp_path / "missing") for a in extra]
    for key in list(argv):
        if key in extra:
            i = extra.index(key)
            argv[key] = extra[i + 1]
            del extra[i:i + 2]
    for key, value in argv.items():
        flags += [key, value]
    try:
        code = sweep.main(flags + extra)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None) and name in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.csv").exists()


def test_the_command_lines_exit_non_zero_with_the_message(tiny_book, tmp_path):
    """The same refusals through real processes: exit status and stderr, no traceback."""
    book_run = subprocess.run(
        [sys.executable, "-m", "gradbrain.book", "run", "--root", str(tiny_book), "-p",
         "n_imgaes=40"], capture_output=True, text=True, timeout=120)
    assert book_run.returncode != 0 and "n_imgaes" in book_run.stderr
    assert "Traceback" not in book_run.stderr
    (tmp_path / "f").write_text("x")
    sweep_run = subprocess.run(
        [sys.executable, "-m", "gradbrain.sweep", "--profile", "demo", "--models", MODEL,
         "--subjects", "1", "--out", str(tmp_path / "f"), "--root", str(ROOT)],
        capture_output=True, text=True, timeout=120)
    assert sweep_run.returncode != 0 and "is a file" in sweep_run.stderr
    assert "Traceback" not in sweep_run.stderr


def test_compare_takes_one_model_name_as_one_model():
    from gradbrain import compare

    class Empty:
        name, images = "no images", None

    # a string split into 27 characters fails the name check; one name reaches the study
    with pytest.raises(ValueError, match="has no images"):
        compare.run("efficientnet_lite0.imagenet", Empty())


def test_atomic_writes_get_the_permissions_of_any_new_file(tmp_path):
    """A temporary file is owner-only (mkstemp: 0600); what it becomes must not be: a
    study or table saved in a shared folder is read by the others there."""
    from gradbrain._utils import atomic_path
    from gradbrain.data import Study

    old = os.umask(0o002)   # a group-shared project folder's usual umask
    try:
        with atomic_path(tmp_path / "table.csv") as tmp:
            tmp.write_text("a,b\n1,2\n")
        assert (tmp_path / "table.csv").stat().st_mode & 0o777 == 0o664
        _kill_child.small_study(1).save(tmp_path / "study")
        saved = [tmp_path / "study", *(tmp_path / "study").rglob("*")]
        modes = {p.name: p.stat().st_mode & 0o777 for p in saved}
        assert all(m == (0o775 if p.is_dir() else 0o664) for p, m in
                   zip(saved, modes.values())), modes
        assert Study.load(tmp_path / "study").name
    finally:
        os.umask(old)
