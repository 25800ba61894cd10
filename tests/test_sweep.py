"""The sweep: jobs per (model, subject) through submitit, resuming, failures, collection."""

import os
import subprocess
import sys
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
