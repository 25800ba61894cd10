"""Scale-out: the book's chain per (model, subject) as submitit jobs, and one results table.

Command line::

    python -m gradbrain.sweep --profile demo --models efficientnet_lite0.imagenet \\
        dinov3_vits16 --subjects 0 1 2 --executor local
    python -m gradbrain.sweep --profile <real-data profile> --models ... --subjects 1 2 \\
        --executor slurm --partition gpu --timeout-min 600

Each subject first gets its *data* chapters (e.g. ``00_data``, which for the simulated
study draws one simulated participant per seed), then every (model, subject) pair gets
one job running the *chain* chapters (e.g. fMRI encoding → MEG → hierarchy tests) with
``model`` and ``weights`` set, one GPU per job. Jobs go through `submitit
<https://github.com/facebookincubator/submitit>`_: ``local`` runs them as processes on
this machine (at most one per visible GPU at a time, or ``--max-parallel``), ``slurm``
submits them as one Slurm job array (run from the login node), ``debug`` runs them in
this process and drops into pdb on a failure. Everything a job writes lands under ``--out``::

    <out>/studies/sub-<s>/                 the subject's data (the chain reads it)
    <out>/executed/data/sub-<s>/*.ipynb    the executed data chapters
    <out>/executed/<model>/sub-<s>/*.ipynb the executed chapters, one book per job
    <out>/results/<model>/sub-<s>.csv      the results chapter's table
    <out>/results.csv                      all of them, one row per (model, subject, signal)
    <out>/group.csv                        across subjects: Wilcoxon + FDR (with its
                                           floor), fixed- and random-effects estimates
    <out>/logs/                            submitit's logs and pickles

The results chapter runs without simulated studies (``n_sim_seeds=0``: nominal tests;
its error rates depend on the model and settings, not on the subject, so measure them
once with chapter 04, or pass ``-p n_sim_seeds=N`` to the sweep).

Rerunning the same command resumes: chapters whose notebook, parameters and library
are unchanged are skipped (the book's stamps), and jobs with nothing left to do are not
submitted at all. Feature caches are shared through ``$GRADBRAIN_DATA``.

The profile says how a sweep maps onto its chapters, in a ``sweep`` section::

    sweep:
      data_chapters: [00_data]      # once per subject, before the chain
      chapters: [02_fmri_encoding, 03_meg_decoding, 04_hierarchy_tests]
      results_chapter: 04_hierarchy_tests   # declares `results_path`
      subject: {00_data: seed}      # chapter -> parameter holding the subject
                                    # (dotted for a nested one, e.g. things.subject)
      weights: {efficientnet_lite0.imagenet: pretrained}   # others: random init
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import book
from . import models as registry
from ._utils import _pid_alive, atomic_path, check_in_allowed
from .stats import group_estimate, group_test

__all__ = ["SweepSpec", "Job", "load_spec", "plan", "run", "collect", "still_queued",
           "main"]

EXECUTORS = ("local", "slurm", "debug")


@dataclass(frozen=True)
class SweepSpec:
    """A profile's ``sweep`` section, checked against the chapters' parameters."""

    profile: str
    data_chapters: tuple[str, ...]
    chapters: tuple[str, ...]
    results_chapter: str
    subject: dict
    weights: dict


@dataclass
class Job:
    """One unit of work: some chapters of the book, with their parameter overrides.

    ``model`` is None for a subject's data job.
    """

    root: Path
    profile: str
    subject: object
    model: str | None
    chapters: tuple[str, ...]
    overrides: dict  # chapter name -> {parameter: value}
    output_dir: Path
    results_path: Path | None = None
    results_chapter: str | None = None
    pending: tuple[str, ...] = field(default=())
    driver_pid: int | None = None  # local jobs stop when this process (the sweep) is gone

    @property
    def name(self) -> str:
        return f"{self.model or 'data'}/sub-{self.subject}"

    @property
    def lock_path(self) -> Path:
        return self.output_dir / ".job.lock"

    def __call__(self) -> str | None:
        """Run the chapters in order (skipping up-to-date ones); return the results path.

        The job holds an exclusive lock on its folder while it runs (released by the
        system even if the job is killed), so a second sweep never runs the same job
        at once; a local job also stops when the sweep that started it is gone.
        """
        import fcntl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.lock_path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise RuntimeError(f"Job {self.name} is already running (lock {self.lock_path} "
                               "is held): wait for it to finish, or stop it.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        if self.driver_pid is not None and self.driver_pid != os.getpid():
            _stop_with(self.driver_pid)
        terminated = _watch_slurm_termination()
        try:
            force_results = self.results_path is not None and not self.results_path.is_file()
            for name in self.chapters:
                book.run(self.profile, only=[name], root=self.root, output_dir=self.output_dir,
                         overrides=self.overrides[name], progress=False,
                         force=force_results and name == self.results_chapter)
            if self.results_path is not None and not self.results_path.is_file():
                raise RuntimeError(f"Job {self.name} ran {list(self.chapters)} but "
                                   f"{self.results_path} was not written.")
            return str(self.results_path) if self.results_path else None
        except BaseException:
            if terminated:
                # Slurm stopped this job (scancel, requeue, preemption) and its SIGTERM
                # killed the chapter's kernel: that is no failure of the chapter. Leave
                # without a result, so that a requeued job runs again under the same id
                # and a cancelled one is seen as gone (squeue) and resubmitted next time.
                print(f"Job {self.name}: stopped by Slurm (SIGTERM) while running; "
                      "leaving no result so that it runs again.", file=sys.stderr, flush=True)
                os._exit(143)
            raise
        finally:
            lock.close()

    def running_pid(self) -> int | None:
        """The process id of a run of this job still holding its lock, else None."""
        import fcntl

        if not self.lock_path.is_file():
            return None
        with open(self.lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                text = lock.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(lock, fcntl.LOCK_UN)
        return None


def _watch_slurm_termination() -> list:
    """Inside a Slurm job, record a SIGTERM (Slurm's notice of scancel, requeue or
    preemption) in the returned list; elsewhere, change nothing and return an empty one.

    submitit ignores SIGTERM inside its jobs (its own handler only logs it): this one
    does the same, and also remembers it."""
    import signal

    seen: list = []
    if "SLURM_JOB_ID" not in os.environ:
        return seen
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    return seen


def _stop_with(pid: int, poll_s: float = 1.0) -> None:
    """Stop this process and its children (the notebook kernel) once process ``pid`` ends.

    submitit's local jobs are meant to outlive the Python session that submitted them,
    and submitit ignores SIGTERM inside a job; a sweep's jobs should not outlive the
    sweep: killing it (even with SIGKILL) ends them within about ``poll_s`` seconds, so a
    rerun never races a job left behind. Finished chapters are kept (each is written
    atomically); the one that was running reruns next time.
    """
    import signal
    import threading

    import psutil

    def watch():
        while _pid_alive(pid):
            time.sleep(poll_s)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="gradbrain-sweep-watchdog", daemon=True).start()


def load_spec(root: str | os.PathLike, profile: str) -> SweepSpec:
    """Read and check the ``sweep`` section of ``params/<profile>.yaml``.

    Raises
    ------
    ValueError
        When the profile has no ``sweep`` section, names unknown chapters, or a
        chapter does not declare the parameter the sweep sets.
    """
    root = Path(root)
    data = book.load_profile(root, profile)
    section = data.get("sweep")
    where = f"the 'sweep' section of profile {profile!r}"
    if not isinstance(section, dict):
        raise ValueError(
            f"Profile {profile!r} has no 'sweep' section, so it cannot be swept; add one "
            "(see `python -m gradbrain.sweep --help`), e.g. data_chapters: [00_data], "
            "chapters: [04_hierarchy_tests], results_chapter: 04_hierarchy_tests, "
            "subject: {00_data: seed}.")
    unknown = set(section) - {"data_chapters", "chapters", "results_chapter", "subject",
                              "weights"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; allowed: data_chapters, "
                         "chapters, results_chapter, subject, weights.")
    available = {c.name: c for c in book.chapters(root)}
    covered = data.get("chapters") or list(available)
    lists = {}
    for key in ("data_chapters", "chapters"):
        names = section.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: {key!r} must be a list of chapter names; got {names!r}.")
        bad = [n for n in names if n not in available or n not in covered]
        if bad:
            raise ValueError(f"{where}: {key} {bad} are not chapters this profile covers "
                             f"({covered}).")
        lists[key] = tuple(names)
    if not lists["chapters"]:
        raise ValueError(f"{where}: 'chapters' is empty; list the chapters each (model, "
                         "subject) job runs, e.g. [04_hierarchy_tests].")
    results = section.get("results_chapter")
    if results not in lists["chapters"]:
        raise ValueError(f"{where}: results_chapter {results!r} must be one of its chapters "
                         f"{list(lists['chapters'])}.")
    declared = {name: set(book.declared_parameters(available[name])) for name in
                lists["data_chapters"] + lists["chapters"]}
    if "results_path" not in declared[results]:
        raise ValueError(f"{where}: results_chapter {results!r} does not declare "
                         "'results_path' in its parameters cell.")
    for name in lists["chapters"]:
        missing = {"model", "weights"} - declared[name]
        if missing:
            raise ValueError(f"{where}: chapter {name!r} does not declare {sorted(missing)}, "
                             "which every chain chapter needs.")
    subject = section.get("subject") or {}
    if not isinstance(subject, dict) or not subject:
        raise ValueError(f"{where}: 'subject' must map chapters to the parameter holding the "
                         "subject, e.g. {00_data: seed} or {03_meg_decoding: things.subject}.")
    for name, parameter in subject.items():
        if name not in declared:
            raise ValueError(f"{where}: subject names chapter {name!r}, which the sweep does "
                             "not run.")
        if str(parameter).split(".")[0] not in declared[name]:
            raise ValueError(f"{where}: chapter {name!r} does not declare "
                             f"{str(parameter).split('.')[0]!r} (from subject: {parameter!r}).")
    weights = section.get("weights") or {}
    if not isinstance(weights, dict):
        raise ValueError(f"{where}: 'weights' must map model names to weights; got {weights!r}.")
    return SweepSpec(profile, lists["data_chapters"], lists["chapters"], results,
                     dict(subject), dict(weights))


def _subject_override(base: dict, parameter: str, subject) -> dict:
    """``{top-level parameter: value}`` setting ``parameter`` (maybe dotted) to ``subject``."""
    top, *path = parameter.split(".")
    if not path:
        return {top: subject}
    value = copy.deepcopy(base.get(top) or {})
    node = value
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = subject
    return {top: value}


def plan(spec: SweepSpec, models: Sequence[str], subjects: Sequence, out: str | os.PathLike,
         *, root: str | os.PathLike | None = None, overrides: dict | None = None,
         weights: dict | None = None, chapters: Sequence[str] | None = None
         ) -> tuple[list[Job], list[Job]]:
    """The data jobs (one per subject) and chain jobs (one per model and subject).

    Parameters
    ----------
    spec : SweepSpec
        From :func:`load_spec`.
    models : sequence of str
        Registry names (:func:`gradbrain.models.list_models`).
    subjects : sequence
        Values of the subject parameter (seeds for the simulated study, participant
        numbers for real data).
    out : path-like
        The sweep's folder.
    overrides : dict, optional
        Parameter values for every chapter that declares them (as ``-p KEY=VALUE``).
    weights : dict, optional
        Per model weights, replacing the profile's ``sweep.weights``; models in neither
        are randomly initialised (and labelled so in the results).
    chapters : sequence of str, optional
        Run only these of the profile's chain chapters (they must include its
        ``results_chapter``), e.g. to skip the figure-only ones.

    Returns
    -------
    data_jobs, chain_jobs : list of Job
        Each job's ``pending`` lists the chapters not yet up to date.
    """
    root = book.find_root(root)
    out = Path(out).expanduser().resolve()
    if not models:
        raise ValueError("No models given; e.g. --models efficientnet_lite0.imagenet")
    if not subjects:
        raise ValueError("No subjects given; e.g. --subjects 0 1 2")
    registry.check_names(models)
    if len(set(map(str, subjects))) != len(subjects):
        raise ValueError(f"Subjects repeat: {list(subjects)}; give each once.")
    chain = tuple(spec.chapters)
    if chapters:
        bad = [c for c in chapters if c not in spec.chapters]
        if bad or spec.results_chapter not in chapters:
            raise ValueError(
                f"chapters {list(chapters)} must be among the sweep's chain {list(chain)} and "
                f"include its results chapter {spec.results_chapter!r}.")
        chain = tuple(c for c in spec.chapters if c in chapters)
    profile = book.load_profile(root, spec.profile)
    every = book.chapters(root)
    chapters = {c.name: c for c in every}
    book.check_parameters([chapters[n] for n in spec.data_chapters + chain], profile, overrides,
                          every=every)
    stray = sorted(set(weights or {}) - set(models))
    if stray:
        raise ValueError(f"'weights' (--weights) names {stray}, which this sweep's models "
                         f"{list(models)} do not include: misspelt? Models without weights run "
                         "randomly initialised.")
    weights = {**spec.weights, **(weights or {})}

    def job(subject, model, names, output_dir, results_path=None):
        per_chapter, pending = {}, []
        for name in names:
            base = book.parameters_for(chapters[name], profile)
            values = dict(overrides or {})
            if "study_dir" in book.declared_parameters(chapters[name]):
                values["study_dir"] = str(out / "studies" / f"sub-{subject}")
            if name in spec.subject:
                values.update(_subject_override({**base, **values}, spec.subject[name], subject))
            if model is not None:
                values.update(model=model, weights=weights.get(model))
                if name == spec.results_chapter:
                    values["results_path"] = str(results_path)
            if name == spec.results_chapter and "n_sim_seeds" not in (overrides or {}):
                # error rates are a property of a model and settings, not of a subject:
                # measured by chapter 04 on its own, not in every job (-p n_sim_seeds=N)
                values["n_sim_seeds"] = 0
            # the sweep checked every override against all its chapters; each chapter is
            # given only those its parameters cell declares
            declared = book.declared_parameters(chapters[name])
            per_chapter[name] = values = {k: v for k, v in values.items() if k in declared}
            chapter = book.Chapter(name, chapters[name].source,
                                   Path(output_dir) / f"{name}.ipynb")
            parameters = book.parameters_for(chapter, profile, values)
            if not book.is_up_to_date(chapter, book.input_digest(chapter, parameters)):
                pending.append(name)
        if results_path is not None and not Path(results_path).is_file() \
                and spec.results_chapter not in pending:
            pending.append(spec.results_chapter)
        return Job(root, spec.profile, subject, model, tuple(names), per_chapter,
                   Path(output_dir), results_path,
                   spec.results_chapter if results_path is not None else None, tuple(pending))

    data_jobs = [job(s, None, spec.data_chapters, out / "executed" / "data" / f"sub-{s}")
                 for s in subjects] if spec.data_chapters else []
    chain_jobs = [job(s, m, chain, out / "executed" / m / f"sub-{s}",
                      out / "results" / m / f"sub-{s}.csv")
                  for m in models for s in subjects]
    return data_jobs, chain_jobs


def _executor(kind: str, folder: Path, *, gpus_per_job: int, timeout_min: int,
              cpus_per_job: int | None, mem_gb: int | None, partition: str | None,
              slurm_parallelism: int | None):
    """submitit's executor of that kind (local processes, a Slurm array, or in-process)."""
    import submitit

    if kind == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=timeout_min, tasks_per_node=1, nodes=1)
        return executor
    if kind == "debug":
        return submitit.DebugExecutor(folder=str(folder))
    if shutil.which("srun") is None or shutil.which("sbatch") is None:
        raise RuntimeError("The slurm executor needs Slurm's `srun` and `sbatch` on the PATH: "
                           "run the sweep from a cluster's login node, or use "
                           "--executor local on this machine.")
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = {"timeout_min": timeout_min, "tasks_per_node": 1, "nodes": 1,
              "name": "gradbrain-sweep", "gpus_per_node": gpus_per_job,
              "cpus_per_task": cpus_per_job, "mem_gb": mem_gb, "slurm_partition": partition,
              "slurm_array_parallelism": slurm_parallelism}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _visible_gpus() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # pragma: no cover - torch without a usable CUDA driver
        return []


def _execute(jobs: list[Job], executor, kind: str, *, max_parallel: int, gpus: list[int],
             poll_s: float, log) -> dict[str, object]:
    """Run jobs; return job name -> results path (or None) or the exception it raised."""
    outcome: dict[str, object] = {}
    if not jobs:
        return outcome
    if kind == "slurm":
        with executor.batch():
            handles = [(job, executor.submit(job)) for job in jobs]
        _record_slurm_jobs(executor.folder, {job.name: handle.job_id for job, handle in handles})
        for job, handle in handles:
            log(f"  submitted {job.name}: slurm job {handle.job_id}")
        for job, handle in handles:
            outcome[job.name] = _wait_slurm(job, handle, log, poll_s)
        return outcome
    queue, running, free = list(jobs), [], list(gpus)
    while queue or running:
        while queue and len(running) < max_parallel:
            job = queue.pop(0)
            gpu = free.pop(0) if free else None
            if kind == "local":
                executor.update_parameters(gpus_per_node=1 if gpu is not None else 0,
                                           visible_gpus=(gpu,) if gpu is not None else ())
            handle = executor.submit(job)
            where = f"GPU {gpu}" if gpu is not None else "CPU"
            log(f"  started {job.name} on {where} (pending: {', '.join(job.pending)})")
            running.append((job, handle, gpu))
        for item in list(running):
            job, handle, gpu = item
            if handle.done():
                running.remove(item)
                if gpu is not None:
                    free.append(gpu)
                outcome[job.name] = _wait(job, handle, log)
        if running:
            time.sleep(poll_s)
    return outcome


def _reason(err: BaseException) -> str:
    """The line of a failed job's error that says what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for marker in ("ChapterFailed: ", "Error: ", "Exception: "):
        found = [line for line in lines if marker in line]
        if found:
            line = found[-1]
            return line.split("ChapterFailed: ", 1)[-1][:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


def _wait(job: Job, handle, log):
    try:
        result = handle.result()
    except Exception as err:  # a failed chapter: report it, go on with the others
        paths = getattr(handle, "paths", None)
        where = f" (logs: {paths.stderr})" if paths is not None else ""
        log(f"  FAILED {job.name}{where}: {_reason(err)}")
        return err
    log(f"  done {job.name}")
    return result


_SLURM_RECORD = "slurm_jobs.json"
#: Polls in a row that a job must be missing from ``squeue`` before it counts as gone.
_GONE_POLLS = 3


def _record_slurm_jobs(folder, ids: dict[str, str]) -> None:
    """Add ``job name → Slurm job id`` to the sweep's record (under its logs folder)."""
    path = Path(folder) / _SLURM_RECORD
    known = _slurm_record(path.parent)
    known.update(ids)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(known, indent=1))


def _slurm_record(folder) -> dict[str, str]:
    path = Path(folder) / _SLURM_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


#: Slurm job states of a job that has not ended (squeue's JOB STATE CODES). squeue lists
#: only pending, running and completing jobs unless asked: a requeued job (REQUEUED while
#: its killed step winds down, then PENDING) would look gone and be reported lost.
_LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED",
                "SIGNALING", "STAGE_OUT", "RESIZING", "REQUEUED", "REQUEUE_HOLD",
                "REQUEUE_FED", "SPECIAL_EXIT", "RESV_DEL_HOLD")


def _slurm_queue(job_ids) -> dict[str, str] | None:
    """State of each of ``job_ids`` that Slurm still lists in a state of a job that has
    not ended (:data:`_LIVE_STATES`: pending, running, requeued, …); None when ``squeue``
    cannot be asked."""
    job_ids = [str(j) for j in job_ids]
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-t", ",".join(_LIVE_STATES),
                              "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # ids Slurm no longer knows (ended long ago) are "invalid": none of them is queued
        return {} if "Invalid job id" in out.stderr else None
    listed = dict(line.split(None, 1) for line in out.stdout.split("\n") if line.strip())
    return {j: listed[j] for j in job_ids if j in listed}


def still_queued(out: str | os.PathLike) -> dict[str, str]:
    """The jobs of a sweep that Slurm still lists: job name → "<slurm id> <state>".

    Read from the record the ``slurm`` executor keeps (``<out>/logs/slurm_jobs.json``);
    jobs that wrote their result are not counted. Empty when nothing was submitted to
    Slurm or ``squeue`` is not available.
    """
    logs = Path(out).expanduser() / "logs"
    # a job that wrote its result has ended, even while Slurm still winds it up
    record = {name: job_id for name, job_id in _slurm_record(logs).items()
              if not any(logs.glob(f"{job_id}_*_result.pkl"))}
    queued = _slurm_queue(record.values()) or {}
    return {name: f"{job_id} {queued[job_id]}" for name, job_id in record.items()
            if job_id in queued}


def _wait_slurm(job: Job, handle, log, poll_s: float):
    """Wait for a Slurm job. submitit learns that a job ended from ``sacct``; where
    accounting is off (test clusters, some sites) a job cancelled with ``scancel`` or
    killed would be waited for forever. So ``squeue`` is asked too: a job that Slurm no
    longer lists, ``_GONE_POLLS`` polls in a row, without a result, is reported lost."""
    gone = 0
    while not handle.done():
        queued = _slurm_queue([handle.job_id])
        gone = gone + 1 if queued == {} else 0
        if gone >= _GONE_POLLS and not handle.done(force_check=True):
            where = handle.paths.stderr
            log(f"  LOST {job.name}: slurm job {handle.job_id} left the queue without a "
                f"result (cancelled, killed, or preempted and not requeued; logs: {where})")
            return RuntimeError(f"slurm job {handle.job_id} ended without a result "
                                f"(cancelled or killed; logs: {where}); rerun the same "
                                "command to submit it again")
        time.sleep(poll_s)
    return _wait(job, handle, log)


def run(profile: str, models: Sequence[str], subjects: Sequence, *, out: str | os.PathLike,
        executor: str = "local", root: str | os.PathLike | None = None,
        overrides: dict | None = None, weights: dict | None = None,
        chapters: Sequence[str] | None = None, max_parallel: int | None = None,
        gpus_per_job: int = 1, timeout_min: int = 240,
        cpus_per_job: int | None = None, mem_gb: int | None = None,
        partition: str | None = None, poll_s: float = 2.0, verbose: bool = True
        ) -> pd.DataFrame:
    """Run a sweep (data jobs, then chain jobs) and collect its results table.

    Parameters
    ----------
    profile : str
        A profile with a ``sweep`` section (``params/<profile>.yaml``).
    models, subjects : sequences
        What to sweep over; see :func:`plan` (also for ``overrides``, ``weights`` and
        ``chapters``).
    out : path-like
        The sweep's folder (layout in the module docstring).
    executor : {"local", "slurm", "debug"}
        submitit's executor: ``local`` processes, a ``slurm`` job array, or ``debug``
        (in this process, for stepping through a failing job).
    max_parallel : int, optional
        ``local``: jobs at once (default: one per visible GPU, or 1 on CPU; jobs
        beyond the number of GPUs run on the CPU);
        ``slurm``: the job array's parallelism (default: unlimited).
    gpus_per_job, timeout_min, cpus_per_job, mem_gb, partition
        Resources of each Slurm job (``timeout_min`` also bounds local jobs).

    Returns
    -------
    DataFrame
        :func:`collect`'s table (also written to ``<out>/results.csv``).

    Raises
    ------
    RuntimeError
        After all jobs ended, when some failed (their names and logs are listed); the
        table of the others is written first.
    """
    check_in_allowed("executor", executor, EXECUTORS)
    for name, value, low in (("timeout_min", timeout_min, 1), ("gpus_per_job", gpus_per_job, 0),
                             ("cpus_per_job", cpus_per_job, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, np.integer)) or value < low):
            raise ValueError(f"'{name}' (--{name.replace('_', '-')}) must be an integer >= "
                             f"{low}; got {value!r}.")
    if mem_gb is not None and (isinstance(mem_gb, bool) or not isinstance(
            mem_gb, (int, float)) or not mem_gb > 0):
        raise ValueError(f"'mem_gb' (--mem-gb) must be a positive number; got {mem_gb!r}.")
    log = print if verbose else (lambda *a, **k: None)
    root = book.find_root(root)
    spec = load_spec(root, profile)
    out = Path(out).expanduser().resolve()
    data_jobs, chain_jobs = plan(spec, models, subjects, out, root=root, overrides=overrides,
                                 weights=weights, chapters=chapters)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "sweep.json", suffix=".json") as tmp:
        tmp.write_text(json.dumps({
            "profile": profile, "models": list(models), "subjects": list(subjects),
            "executor": executor, "overrides": overrides or {}, "weights": weights or {},
        }, indent=1, default=str))
    gpus = _visible_gpus() if executor == "local" else []
    if max_parallel is None:
        max_parallel = max(1, len(gpus)) if executor == "local" else None
    if executor != "slurm" and max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1; got {max_parallel}.")
    ex = _executor(executor, out / "logs", gpus_per_job=gpus_per_job, timeout_min=timeout_min,
                   cpus_per_job=cpus_per_job, mem_gb=mem_gb, partition=partition,
                   slurm_parallelism=max_parallel if executor == "slurm" else None)
    failures = {}
    for stage, jobs in (("data", data_jobs), ("chain", chain_jobs)):
        if stage == "chain" and any(j.pending for j in data_jobs):
            # the data jobs rewrote studies: the chain's stamps are checked against them now
            _, jobs = plan(spec, models, subjects, out, root=root, overrides=overrides,
                           weights=weights, chapters=chapters)
        todo = [j for j in jobs if j.pending]
        busy = [(j.name, j.running_pid()) for j in todo if j.running_pid() is not None]
        queued = still_queued(out) if executor == "slurm" else {}
        busy += [(j.name, f"slurm job {queued[j.name]}") for j in todo if j.name in queued]
        if busy:
            raise RuntimeError(
                "Job(s) of an earlier run of this sweep are still running: "
                + ", ".join(f"{name} ({pid if isinstance(pid, str) else f'pid {pid}'})"
                            for name, pid in busy)
                + ". Wait for them to finish (or stop them), then rerun: finished chapters "
                "are skipped.")
        if executor == "local":
            for j in todo:
                j.driver_pid = os.getpid()
        log(f"{stage}: {len(todo)} of {len(jobs)} job(s) to run, "
            f"{len(jobs) - len(todo)} up to date")
        if stage == "chain" and failures:
            failed_subjects = {j.subject for j in data_jobs if j.name in failures}
            skipped = [j for j in todo if j.subject in failed_subjects]
            for j in skipped:
                failures[j.name] = RuntimeError("its subject's data job failed")
            todo = [j for j in todo if j not in skipped]
        outcome = _execute(todo, ex, executor, max_parallel=max_parallel or len(todo) or 1,
                           gpus=gpus, poll_s=poll_s, log=log)
        failures.update({k: v for k, v in outcome.items() if isinstance(v, BaseException)})
    table = collect(out, models=models, subjects=subjects)
    log(f"results: {len(table)} row(s) → {out / 'results.csv'}")
    if failures:
        lines = "\n".join(f"  {name}: {_reason(err)}"
                          for name, err in failures.items())
        raise RuntimeError(f"{len(failures)} sweep job(s) failed (logs under {out / 'logs'}):\n"
                           f"{lines}\nFix the cause and rerun the same command: finished "
                           "chapters are skipped.")
    return table


def collect(out: str | os.PathLike, *, models: Sequence[str] | None = None,
            subjects: Sequence | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """Gather ``<out>/results/<model>/sub-<s>.csv`` into one table, and a group summary.

    Parameters
    ----------
    out : path-like
        The sweep's folder.
    models, subjects : sequences, optional
        Restrict to these (default: every table found).
    alpha : float
        FDR level of the across-subject tests.

    Returns
    -------
    DataFrame
        One row per (model, subject, signal), with a ``subject`` column first; written
        atomically to ``<out>/results.csv``. With at least two subjects per model,
        ``<out>/group.csv`` gets, per (model, feature, loss) and score (``spatial``,
        ``temporal``), the median over subjects and a two-sided Wilcoxon test against 0,
        FDR-corrected across all of them, with the smallest p it can reach
        (:func:`gradbrain.stats.group_test`), and the fixed- and random-effects
        estimates from the subjects' bootstrap intervals (:func:`group_summary`).
    """
    out = Path(out).expanduser()
    wanted_subjects = None if subjects is None else {str(s) for s in subjects}
    frames = []
    for path in sorted((out / "results").glob("*/sub-*.csv")):
        model, subject = path.parent.name, path.stem.split("sub-", 1)[1]
        if models is not None and model not in models:
            continue
        if wanted_subjects is not None and subject not in wanted_subjects:
            continue
        frame = pd.read_csv(path, keep_default_na=True)
        frame.insert(0, "subject", subject)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(table):
        table["loss"] = table["loss"].astype(object).fillna("")  # all-NaN reads as float
    with atomic_path(out / "results.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    group = group_summary(table, alpha=alpha)
    if group is not None:
        with atomic_path(out / "group.csv", suffix=".csv") as tmp:
            group.to_csv(tmp)
    return table


def group_summary(table: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame | None:
    """Across subjects, each model's spatial and temporal scores: tests and estimates.

    Per (model, signal, score): the median and an exact two-sided Wilcoxon test against 0
    with its floor (:func:`gradbrain.stats.group_test`; with 4 subjects it cannot
    reach 0.05, and says so), and — where the per-subject tables carry bootstrap
    intervals — the fixed-effect (these subjects) and random-effects (people) estimates
    with their intervals and p-values (:func:`gradbrain.stats.group_estimate`).

    Returns None when no model has at least two subjects with scores.
    """
    if table.empty or "model" not in table:
        return None
    columns, lows, highs = {}, {}, {}
    for (model, feature, loss), rows in table.groupby(["model", "feature", "loss"], sort=False):
        rows = rows.set_index("subject")
        for score in ("spatial", "temporal"):
            if score in rows and rows[score].notna().sum() >= 2:
                name = f"{model} | {feature}{f' ({loss})' if loss else ''} | {score}"
                columns[name] = rows[score]
                missing = pd.Series(np.nan, index=rows.index)
                lows[name] = rows.get(f"{score}_ci_low", missing)
                highs[name] = rows.get(f"{score}_ci_high", missing)
    if not columns:
        return None
    values = pd.DataFrame(columns)
    ci = float(table["ci"].dropna().iloc[0]) if "ci" in table and table["ci"].notna().any() \
        else 0.95
    estimates = group_estimate(values, pd.DataFrame(lows)[values.columns],
                               pd.DataFrame(highs)[values.columns], ci=ci, alpha=alpha)
    tests = group_test(values, alternative="two-sided", alpha=alpha)
    return tests.join(estimates.drop(columns="n_subjects").rename(
        columns={"significant": "significant_random"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradbrain.sweep",
        description="Run the book's chain per (model, subject) through submitit and collect "
                    "one results table.", epilog=__doc__.split("\n\n", 3)[3],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, help="params/<profile>.yaml with a sweep "
                                                         "section, e.g. demo")
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL")
    parser.add_argument("--subjects", nargs="+", required=True, metavar="SUBJECT",
                        type=yaml_value)
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--out", help="the sweep's folder (default: sweeps/<profile>)")
    parser.add_argument("--root", help="repository root (default: found from the cwd)")
    parser.add_argument("-p", "--param", action="append", type=book._parse_override,
                        default=[], metavar="KEY=VALUE", help="override a parameter")
    parser.add_argument("--weights", action="append", type=book._parse_override, default=[],
                        metavar="MODEL=WEIGHTS", help="e.g. dinov3_vitb16=/ckpt/dinov3.pth")
    parser.add_argument("--chapters", nargs="+", metavar="CHAPTER",
                        help="only these chain chapters (with the results chapter)")
    parser.add_argument("--max-parallel", type=int,
                        help="local: jobs at once (default: one per GPU, 1 on CPU); "
                             "slurm: array parallelism")
    parser.add_argument("--gpus-per-job", type=int, default=1, help="slurm (default: 1)")
    parser.add_argument("--timeout-min", type=int, default=240,
                        help="per job, local and slurm (default: 240)")
    parser.add_argument("--cpus-per-job", type=int, help="slurm")
    parser.add_argument("--mem-gb", type=int, help="slurm")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--collect-only", action="store_true",
                        help="only gather the tables already written under --out")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out or Path(book.find_root(args.root)) / "sweeps" / args.profile)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file; give a folder for the sweep "
                             "(it is created if missing).")
        if args.collect_only and not (out / "results").is_dir():
            raise FileNotFoundError(f"Nothing to collect: {str(out / 'results')!r} does not "
                                    "exist. Run the sweep first (without --collect-only), or "
                                    "give the --out of an existing sweep.")
        if args.collect_only:
            table = collect(out, models=args.models, subjects=args.subjects)
            if not len(table) and not still_queued(out):
                raise FileNotFoundError(f"Nothing to collect: no finished job has written a "
                                        f"result under {str(out / 'results')!r} yet. Run the "
                                        "sweep first (without --collect-only).")
            print(f"results: {len(table)} row(s) → {Path(out) / 'results.csv'}")
            running = still_queued(out)
            if running:
                print(f"note: {len(running)} job(s) of this sweep are still in the Slurm "
                      "queue, so their results are not in the table yet: "
                      + ", ".join(f"{name} (slurm job {state})"
                                  for name, state in running.items())
                      + ". Collect again when they have finished.")
        else:
            table = run(args.profile, args.models, args.subjects, out=out,
                        executor=args.executor, root=args.root, overrides=dict(args.param),
                        weights=dict(args.weights), chapters=args.chapters,
                        max_parallel=args.max_parallel,
                        gpus_per_job=args.gpus_per_job, timeout_min=args.timeout_min,
                        cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb,
                        partition=args.partition)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if len(table):
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.round(3).to_string(index=False))
    return 0


def yaml_value(text: str):
    """A subject as YAML reads it (``1`` → int, ``CSI1`` → str)."""
    import yaml

    return yaml.safe_load(text)


if __name__ == "__main__":
    sys.exit(main())
