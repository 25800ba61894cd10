"""The sweep: jobs per (model, subject) through submitit, resuming, failures, collection."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from gradbrain import sweep
from _books import write_notebook  # tests/_books.py

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["efficientnet_lite0.imagenet", "dinov3_vits16"]


# The chain chapter writes a table whose scores are planted from (subject, model), so the
# collected table can be checked against values computed here, independently.
CHAIN = """
import pandas as pd, pathlib
seed = int(pathlib.Path(study_dir, "seed.txt").read_text())
if model == fail_model:
    raise ValueError(f"asked to fail for {model}")
offset = {"efficientnet_lite0.imagenet": 0.5, "dinov3_vits16": -0.5}[model]
pathlib.Path(results_path).parent.mkdir(parents=True, exist_ok=True)
pd.DataFrame([
    {"model": model, "weights": weights or "random init", "feature": "activation", "loss": "",
     "spatial": offset + 0.01 * seed, "temporal": 0.1 * seed,
     "spatial_ci_low": offset + 0.01 * seed - 0.05 * seed,
     "spatial_ci_high": offset + 0.01 * seed + 0.05 * seed, "ci": 0.9},
    {"model": model, "weights": weights or "random init", "feature": "gradient", "loss": "ce",
     "spatial": -offset + 0.02 * seed, "temporal": -0.1 * seed},
]).to_csv(results_path, index=False)
open(pathlib.Path(study_dir, f"ran-{model}.txt"), "a").write("x")
"""


@pytest.fixture
def sweep_book(tmp_path):
    """A book whose `data` chapter writes a subject's seed and `chain` a results table."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params").mkdir()
    write_notebook(tmp_path / "notebooks" / "data.ipynb", "seed = 0\nstudy_dir = None",
              "import pathlib\np = pathlib.Path(study_dir); p.mkdir(parents=True, exist_ok=True)\n"
              "(p / 'seed.txt').write_text(str(seed))")
    write_notebook(tmp_path / "notebooks" / "chain.ipynb",
              "model = 'x'\nweights = None\nstudy_dir = None\nresults_path = None\n"
              "fail_model = ''", CHAIN)
    write_notebook(tmp_path / "notebooks" / "plain.ipynb", "value = 1\nmodel = 'x'\nweights = None",
              "pass")
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump({
        "format": "jb-book", "root": "intro",
        "chapters": [{"file": "executed/data"}, {"file": "executed/chain"},
                     {"file": "executed/plain"}],
    }))
    (tmp_path / "params" / "demo.yaml").write_text(yaml.safe_dump({
        "defaults": {}, "notebooks": {},
        "sweep": {"data_chapters": ["data"], "chapters": ["chain"], "results_chapter": "chain",
                  "subject": {"data": "seed"},
                  "weights": {"efficientnet_lite0.imagenet": "pretrained"}},
    }))
    return tmp_path


def test_jobs_run_resume_and_collect_one_table(sweep_book, tmp_path):
    out = tmp_path / "sweep"
    table = sweep.run("demo", MODELS, [1, 2, 3], out=out, executor="debug", root=sweep_book,
                      verbose=False)
    assert len(table) == 2 * 3 * 2  # models x subjects x signals
    for _, row in table.iterrows():
        seed = int(row.subject)
        offset = 0.5 if row.model == MODELS[0] else -0.5
        expected = offset + 0.01 * seed if row.feature == "activation" else -offset + 0.02 * seed
        assert row.spatial == pytest.approx(expected)
    # weights from the profile's sweep section; models not listed run randomly initialised
    weights = table.groupby("model").weights.first()
    assert weights[MODELS[0]] == "pretrained" and weights[MODELS[1]] == "random init"
    assert (pd.read_csv(out / "results.csv").shape == table.shape)

    # the group test equals scipy's Wilcoxon on the per-subject scores
    group = pd.read_csv(out / "group.csv", index_col=0)
    key = f"{MODELS[0]} | gradient (ce) | spatial"
    values = table[(table.model == MODELS[0]) & (table.feature == "gradient")].spatial
    assert group.loc[key, "median"] == pytest.approx(np.median(values))
    assert group.loc[key, "p"] == pytest.approx(stats.wilcoxon(values).pvalue)
    assert len(group) == 8  # 2 models x 2 signals x (spatial, temporal)
    assert group.loc[key, "min_p"] == 0.25 and not group.loc[key, "can_reach_alpha"]
    # group estimates from the subjects' intervals (their level read from the tables),
    # against the precision-weighted mean written out here; no intervals: none
    key = f"{MODELS[0]} | activation | spatial"
    rows = table[(table.model == MODELS[0]) & (table.feature == "activation")]
    weights = 1 / ((rows.spatial_ci_high - rows.spatial_ci_low) / (2 * stats.norm.ppf(0.95)))**2
    assert group.loc[key, "fixed"] == pytest.approx(np.sum(weights * rows.spatial)
                                                    / weights.sum())
    assert np.isfinite(group.loc[key, "p_random"])
    assert np.isnan(group.loc[f"{MODELS[0]} | gradient (ce) | spatial", "fixed"])

    # rerunning submits nothing: every chapter is up to date
    data_jobs, chain_jobs = sweep.plan(sweep.load_spec(sweep_book, "demo"), MODELS, [1, 2, 3],
                                       out, root=sweep_book)
    assert all(not job.pending for job in data_jobs + chain_jobs)
    ran = out / "studies" / "sub-2" / f"ran-{MODELS[1]}.txt"
    assert ran.read_text() == "x"
    # a lost results table reruns only its job's results chapter
    (out / "results" / MODELS[1] / "sub-2.csv").unlink()
    _, chain_jobs = sweep.plan(sweep.load_spec(sweep_book, "demo"), MODELS, [1, 2, 3], out,
                               root=sweep_book)
    assert [(j.name, j.pending) for j in chain_jobs if j.pending] == \
        [(f"{MODELS[1]}/sub-2", ("chain",))]
    sweep.run("demo", MODELS, [1, 2, 3], out=out, executor="debug", root=sweep_book,
              verbose=False)
    assert ran.read_text() == "xx"
    assert (out / "studies" / "sub-1" / f"ran-{MODELS[1]}.txt").read_text() == "x"


def test_a_failing_job_is_reported_and_the_others_are_collected(sweep_book, tmp_path):
    """submitit's local executor: each job in its own process; a failure stops only it."""
    out = tmp_path / "sweep"
    with pytest.raises(RuntimeError) as info:
        sweep.run("demo", MODELS, [1], out=out, executor="local", root=sweep_book,
                  overrides={"fail_model": MODELS[1]}, verbose=False, poll_s=0.2,
                  max_parallel=2, timeout_min=10)
    message = str(info.value)
    assert "1 sweep job(s) failed" in message
    assert f"{MODELS[1]}/sub-1: Chapter chain failed in cell" in message
    assert "asked to fail for dinov3_vits16" in message
    assert "rerun the same command" in message
    table = pd.read_csv(out / "results.csv")
    assert set(table.model) == {MODELS[0]} and len(table) == 2
    assert len(list((out / "logs").glob("*_log.out"))) == 3  # data job + 2 chain jobs
    failed = out / "executed" / MODELS[1] / "sub-1" / "chain.failed.ipynb"
    assert failed.is_file()


def test_nested_subject_parameter_is_set_inside_its_mapping():
    base = {"things": {"subject": 1, "root": "~/data", "extra": {"a": 1}}}
    new = sweep._subject_override(base, "things.subject", 3)
    assert new == {"things": {"subject": 3, "root": "~/data", "extra": {"a": 1}}}
    assert base["things"]["subject"] == 1  # the profile's value is not modified
    assert sweep._subject_override(base, "seed", 5) == {"seed": 5}


@pytest.mark.parametrize("section, message", [
    (None, "has no 'sweep' section"),
    ({"chapters": ["nope"], "results_chapter": "nope", "subject": {"data": "seed"}},
     r"chapters \['nope'\] are not chapters"),
    ({"chapters": ["plain"], "results_chapter": "plain", "subject": {"data": "seed"}},
     "does not declare 'results_path'"),
    ({"chapters": ["chain"], "results_chapter": "chain", "data_chapters": ["data"],
      "subject": {"data": "sede"}}, "chapter 'data' does not declare 'sede'"),
    ({"chapters": ["chain"], "results_chapter": "chain", "subject": {}},
     "'subject' must map chapters"),
    ({"chapters": ["chain"], "results_chapter": "chain", "subject": {"data": "seed"},
      "walltime": 3}, r"unknown keys \['walltime'\]"),
])
def test_bad_sweep_sections_are_named(sweep_book, section, message):
    profile = {"defaults": {}}
    if section is not None:
        profile["sweep"] = section
    (sweep_book / "params" / "bad.yaml").write_text(yaml.safe_dump(profile))
    with pytest.raises(ValueError, match=message):
        sweep.load_spec(sweep_book, "bad")


def test_bad_models_subjects_and_chapters_are_named(sweep_book, tmp_path):
    spec = sweep.load_spec(sweep_book, "demo")
    with pytest.raises(ValueError, match=r"Unknown model\(s\) \['resnet5'\]; known:"):
        sweep.plan(spec, ["resnet5"], [1], tmp_path, root=sweep_book)
    with pytest.raises(ValueError, match=r"Subjects repeat: \[1, 1\]"):
        sweep.plan(spec, MODELS, [1, 1], tmp_path, root=sweep_book)
    with pytest.raises(ValueError, match="No subjects given"):
        sweep.plan(spec, MODELS, [], tmp_path, root=sweep_book)
    with pytest.raises(ValueError, match="include its results chapter 'chain'"):
        sweep.plan(spec, MODELS, [1], tmp_path, root=sweep_book, chapters=["plain"])
    with pytest.raises(ValueError, match="'executor' must be one of"):
        sweep.run("demo", MODELS, [1], out=tmp_path, executor="pbs", root=sweep_book)
    # issue 30: a misspelt weights key, a zero timeout and an empty collection were silent
    with pytest.raises(ValueError, match=r"'weights' \(--weights\) names \['dinov3_vits1'\]"):
        sweep.plan(spec, MODELS, [1], tmp_path, root=sweep_book,
                   weights={"dinov3_vits1": "pretrained"})
    for bad, message in ((dict(timeout_min=0), "'timeout_min' (--timeout-min) must be an"),
                         (dict(gpus_per_job=-1), "'gpus_per_job'"),
                         (dict(mem_gb=0), "'mem_gb' (--mem-gb) must be a positive number")):
        with pytest.raises(ValueError, match=re.escape(message)):
            sweep.run("demo", MODELS, [1], out=tmp_path / "x", root=sweep_book, **bad)
    assert not (tmp_path / "x").exists()   # refused before anything was written
    (tmp_path / "empty" / "results").mkdir(parents=True)
    assert sweep.main(["--profile", "demo", "--models", *MODELS, "--subjects", "1",
                       "--root", str(sweep_book), "--out", str(tmp_path / "empty"),
                       "--collect-only"]) == 1


def test_every_shipped_sweep_section_is_valid():
    for path in sorted((ROOT / "params").glob("*.yaml")):
        if "sweep" in yaml.safe_load(path.read_text()):
            sweep.load_spec(ROOT, path.stem)


@pytest.mark.slow  # ~2 min: the real chain, two subjects, local processes (`make test-slow`)
def test_demo_profile_sweep_from_the_command_line(tmp_path):
    """The real chain on the demo profile: two simulated participants, local executor."""
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "gradbrain.sweep", "--profile", "demo", "--models",
               MODELS[0], "--subjects", "0", "1", "--executor", "local", "--out", str(out),
               "--chapters", "04_hierarchy_tests", "-p", "n_images=60", "-p", "n_perm=500",
               "-p", "n_boot=20", "--root", str(ROOT)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert len(table) == 4 and set(table.feature) == {"activation", "gradient"}
    # each subject is its own simulated participant: the data chapter's seed
    for subject, study in zip(table.subject, table.study):
        assert study == f"simulated (paper, seed {subject})"
    assert table.trained.astype(str).eq("True").all()
    assert (out / "executed" / MODELS[0] / "sub-1" / "04_hierarchy_tests.ipynb").is_file()
    assert (out / "group.csv").is_file()
    # the same command again: nothing left to run
    again = subprocess.run(command, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "data: 0 of 2 job(s) to run" in again.stdout
    assert "chain: 0 of 2 job(s) to run" in again.stdout


def test_slurm_jobs_ask_for_one_gpu_each(tmp_path, monkeypatch):
    """The sbatch script submitit writes carries our resources (a fake srun/sbatch on PATH)."""
    with pytest.raises(RuntimeError, match="needs Slurm's `srun` and `sbatch`"):
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        sweep._executor("slurm", tmp_path / "logs", gpus_per_job=1, timeout_min=60,
                        cpus_per_job=None, mem_gb=None, partition=None, slurm_parallelism=None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.defpath}")
    executor = sweep._executor("slurm", tmp_path / "logs", gpus_per_job=1, timeout_min=600,
                               cpus_per_job=8, mem_gb=64, partition="gpu", slurm_parallelism=4)
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=600",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in script, f"{line!r} missing from:\n{script}"


def test_a_lost_table_reruns_its_chapter_even_when_it_is_not_the_last(sweep_book, tmp_path):
    profile = yaml.safe_load((sweep_book / "params" / "demo.yaml").read_text())
    profile["sweep"]["chapters"] = ["chain", "plain"]
    (sweep_book / "params" / "two.yaml").write_text(yaml.safe_dump(profile))
    out = tmp_path / "sweep"
    sweep.run("two", MODELS[:1], [1], out=out, executor="debug", root=sweep_book, verbose=False)
    table_path = out / "results" / MODELS[0] / "sub-1.csv"
    table_path.unlink()
    table = sweep.run("two", MODELS[:1], [1], out=out, executor="debug", root=sweep_book,
                      verbose=False)
    assert table_path.is_file() and len(table) == 2
    assert (out / "studies" / "sub-1" / f"ran-{MODELS[0]}.txt").read_text() == "xx"


# --------------------------------------------------------------------------- a real Slurm

SLURM_STATE = Path(os.environ.get("GRADBRAIN_SLURM_DIR", "/tmp/gradbrain-slurm"))

# The chain of the Slurm tests: a job sleeps once (while the test cancels or requeues
# it) where the test left a marker, then writes the same planted table as CHAIN.
SLEEPY_CHAIN = """
import pathlib, time
marker = pathlib.Path(study_dir, f"sleep-{model}")
if marker.exists():
    marker.unlink()
    pathlib.Path(study_dir, f"sleeping-{model}").write_text("x")
    time.sleep(120)
""" + CHAIN


@pytest.fixture
def slurm(monkeypatch):
    """The local Slurm cluster (scripts/local-slurm.sh start; .ci/run starts it). Under
    CI=true a missing cluster fails the test: this is the real engine's only check."""
    conf = os.environ.get("SLURM_CONF") or str(SLURM_STATE / "slurm.conf")
    monkeypatch.setenv("SLURM_CONF", conf)
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        state = ""
    if not state or not any(state.startswith(s) for s in ("idle", "mix", "alloc")):
        message = ("NO SLURM: no running Slurm cluster answers `sinfo` (SLURM_CONF="
                   f"{conf}). Start the local one with `scripts/local-slurm.sh start` "
                   "(root; it installs slurm-wlm and munge with apt if missing).")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return conf


def _squeue(job_name_part: str) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %j"], capture_output=True,
                         text=True, timeout=30).stdout
    return [tuple(line.split()[:2]) for line in out.splitlines() if job_name_part in line]


def _sorted(table):
    return table.sort_values(["model", "subject", "feature"]).reset_index(drop=True)


def test_slurm_array_gives_the_planted_table_and_reports_failures(
        slurm, sweep_book, tmp_path):
    out = tmp_path / "slurm"
    with pytest.raises(RuntimeError) as info:
        sweep.run("demo", MODELS, [1, 2], out=out, executor="slurm", root=sweep_book,
                  overrides={"fail_model": MODELS[1]}, verbose=False, poll_s=0.5,
                  gpus_per_job=0, timeout_min=10)
    message = str(info.value)
    assert "2 sweep job(s) failed" in message and "asked to fail for dinov3_vits16" in message
    assert f"logs under {out / 'logs'}" in message
    assert list((out / "logs").glob("*_log.err"))        # the failed jobs' logs are there
    assert set(pd.read_csv(out / "results.csv").model) == {MODELS[0]}
    on_slurm = sweep.run("demo", MODELS, [1, 2], out=out, executor="slurm", root=sweep_book,
                         verbose=False, poll_s=0.5, gpus_per_job=0, timeout_min=10)
    # the table the local executor gives (test_a_failing_job_is_reported_… runs it) is
    # the planted one: check the Slurm table against the planted values directly
    assert len(on_slurm) == 2 * 2 * 2
    for _, row in on_slurm.iterrows():
        seed, offset = int(row.subject), (0.5 if row.model == MODELS[0] else -0.5)
        expected = offset + 0.01 * seed if row.feature == "activation" else -offset + 0.02 * seed
        assert row.spatial == pytest.approx(expected)
        assert row.weights == ("pretrained" if row.model == MODELS[0] else "random init")
    record = json.loads((out / "logs" / "slurm_jobs.json").read_text())
    assert set(record) >= {f"{m}/sub-{s}" for m in MODELS for s in (1, 2)}


def _sleepy_book(sweep_book):
    write_notebook(sweep_book / "notebooks" / "chain.ipynb",
                   "model = 'x'\nweights = None\nstudy_dir = None\nresults_path = None\n"
                   "fail_model = ''", SLEEPY_CHAIN)
    return sweep_book


def _start_sweep(book_root, out, *extra):
    """The sweep's command line in the background (it blocks until its jobs end)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gradbrain.sweep", "--profile", "demo", "--models", MODELS[0],
         "--subjects", "1", "--executor", "slurm", "--gpus-per-job", "0", "--timeout-min",
         "10", "--root", str(book_root), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for(path: Path, process, seconds: float = 120):
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < seconds, f"{path} never appeared"
        time.sleep(0.3)


@pytest.mark.parametrize("interruption", ["scancel", "requeue"])
def test_a_cancelled_or_requeued_job_is_detected_and_finishes_on_rerun(
        slurm, sweep_book, tmp_path, interruption):
    """scancel mid-run: the sweep reports the job lost (no sacct here: squeue tells) and
    the next call reruns it. scontrol requeue (what preemption does): Slurm runs the job
    again and the same sweep call finishes. Either way the table is the planted one."""
    book_root, out = _sleepy_book(sweep_book), tmp_path / "sweep"
    first = sweep.run("demo", MODELS[:1], [1], out=out, executor="slurm", root=book_root,
                      verbose=False, poll_s=0.5, gpus_per_job=0, timeout_min=10)
    study = out / "studies" / "sub-1"
    (out / "results" / MODELS[0] / "sub-1.csv").unlink()      # the chain runs again…
    (study / f"sleep-{MODELS[0]}").write_text("x")            # …and sleeps once
    process = _start_sweep(book_root, out)
    _wait_for(study / f"sleeping-{MODELS[0]}", process)
    # while it runs, --collect-only says so
    collected = subprocess.run(
        [sys.executable, "-m", "gradbrain.sweep", "--profile", "demo", "--models", MODELS[0],
         "--subjects", "1", "--root", str(book_root), "--out", str(out), "--collect-only"],
        capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stderr
    assert "still in the Slurm queue" in collected.stdout and MODELS[0] in collected.stdout
    record = json.loads((out / "logs" / "slurm_jobs.json").read_text())
    job_id = record[f"{MODELS[0]}/sub-1"]
    if interruption == "scancel":
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 1
        # scancel's SIGTERM kills the chapter's kernel: submitit records that failure; a
        # job killed outright leaves no result and squeue tells the sweep it is gone
        assert f"{MODELS[0]}/sub-1: " in stderr
        assert (f"slurm job {job_id} ended without a result" in stderr
                or "Kernel died" in stderr), stderr[-2000:]
        again = sweep.run("demo", MODELS[:1], [1], out=out, executor="slurm", root=book_root,
                          verbose=False, poll_s=0.5, gpus_per_job=0, timeout_min=10)
    else:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        # Slurm holds a requeued job back for a while (its begin time moves on): release
        # it now, as an administrator would, so that the test does not wait minutes
        for _ in range(100):
            if _release(job_id):
                break
            time.sleep(0.3)
        stdout, stderr = process.communicate(timeout=400)
        assert process.returncode == 0, stderr[-3000:]
        assert "stopped by Slurm (SIGTERM)" in "".join(
            p.read_text() for p in (out / "logs").glob(f"{job_id}_*_log.err"))
        again = sweep.collect(out)
    pd.testing.assert_frame_equal(_sorted(again), _sorted(first))


def _release(job_id: str) -> bool:
    """Set a pending requeued job's begin time to now; True once it is pending."""
    state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                           text=True, timeout=30).stdout.strip()
    if state != "PENDING":
        return False
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                   capture_output=True, timeout=30)
    return True


def test_slurm_jobs_carry_the_resources_asked_for(slurm, sweep_book, tmp_path):
    """--gpus-per-job, --partition, --timeout-min and --mem-gb reach Slurm: read back
    from the submitted job with scontrol show job."""
    executor = sweep._executor("slurm", tmp_path / "logs", gpus_per_job=1, timeout_min=7,
                               cpus_per_job=1, mem_gb=1, partition="debug",
                               slurm_parallelism=None)
    job = executor.submit(time.sleep, 60)
    try:
        shown = subprocess.run(["scontrol", "show", "job", str(job.job_id)],
                               capture_output=True, text=True, timeout=30, check=True).stdout
    finally:
        subprocess.run(["scancel", str(job.job_id)], timeout=30)
    assert "Partition=debug" in shown and "TimeLimit=00:07:00" in shown
    assert "gres:gpu:1" in shown or "gres/gpu=1" in shown or "gpu:1" in shown, shown
    assert "MinMemoryNode=1G" in shown and "MinCPUsNode=1" in shown
