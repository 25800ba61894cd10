"""Run the book's notebooks with papermill on a parameter profile.

Command line::

    python -m gradbrain.book run --profile demo [--only 01_gradients] [--force]
    python -m gradbrain.book list

``run`` executes the chapters listed in ``_toc.yml`` (entries under ``executed/``)
in their order, from the sources in ``notebooks/``, with the parameters of
``params/<profile>.yaml``, and writes the executed copies that jupyter-book renders
to ``executed/``. A chapter whose notebook, parameters and library source are
unchanged since its last successful run, and whose inputs (the saved study it loaded,
weights files, real data — anything passed to :func:`record_input`) still have the
content they had then, is skipped; otherwise it reruns and the runner says why.
Parameters no chapter declares (a misspelt ``-p n_imgaes=40``, a typo under
``defaults:``) or of the wrong kind are refused before anything runs. A failing chapter stops the run
with its name, the failing cell and the path of the partial output
(``executed/<name>.failed.ipynb``); the previous good copy is left untouched.

Profile files
-------------
A profile is a YAML mapping with an optional ``description``, ``defaults`` (given to
every chapter that declares them in its ``parameters`` cell) and ``notebooks``
(per-chapter values, which must be declared by that chapter)::

    description: Embedded default (simulated study, weights that ship offline)
    defaults:
      profile: demo
    notebooks:
      01_gradients:
        n_images: 96

A profile for data that only some chapters use lists them under ``chapters`` (e.g.
``chapters: [03_meg_decoding]`` for THINGS-MEG); the others are then not run.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import __version__, _provenance
from ._provenance import record_input
from ._utils import atomic_path, usable_cores

__all__ = ["Chapter", "chapters", "load_profile", "check_parameters", "declared_parameters",
           "is_up_to_date", "stale_reason", "record_input", "run", "run_times",
           "write_run_times", "main"]

EXECUTED_DIR = "executed"
SOURCE_DIR = "notebooks"
PARAMS_DIR = "params"


class ChapterFailed(RuntimeError):
    """A chapter raised while papermill executed it."""


@dataclass(frozen=True)
class Chapter:
    """One notebook of the book: its name, source and executed copy."""

    name: str
    source: Path
    output: Path


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The book's root: the first folder upwards holding ``_toc.yml``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file():
            return folder
    raise FileNotFoundError(
        f"No _toc.yml found in {str(here)!r} or above; run from the gradbrain repository or "
        "pass --root."
    )


def _toc_files(node) -> list[str]:
    """Every ``root`` / ``file`` entry of a jupyter-book ``_toc.yml``, in book order."""
    files = []
    if isinstance(node, dict):
        files.extend(str(node[key]) for key in ("root", "file") if key in node)
        for key in ("parts", "chapters", "sections"):
            files.extend(_toc_files(node.get(key, [])))
    elif isinstance(node, list):
        for item in node:
            files.extend(_toc_files(item))
    return files


def chapters(root: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> list[Chapter]:
    """The notebooks listed in ``_toc.yml`` under ``executed/``, in book order."""
    root = Path(root)
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    out_dir = Path(output_dir) if output_dir is not None else root / EXECUTED_DIR
    found = []
    for entry in _toc_files(toc):
        entry_path = Path(entry)
        if entry_path.parts[:1] != (EXECUTED_DIR,):
            continue
        name = entry_path.with_suffix("").name
        source = root / SOURCE_DIR / f"{name}.ipynb"
        if not source.is_file():
            raise FileNotFoundError(
                f"_toc.yml lists {entry!r} but its source notebook {str(source)!r} is missing."
            )
        found.append(Chapter(name, source, out_dir / f"{name}.ipynb"))
    return found


def load_profile(root: str | os.PathLike, profile: str) -> dict:
    """Read ``params/<profile>.yaml``; an unknown profile lists the available ones."""
    params_dir = Path(root) / PARAMS_DIR
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else params_dir / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in params_dir.glob("*.yaml"))
        raise FileNotFoundError(
            f"Profile {profile!r} not found (looked for {str(path)!r}). Available profiles: "
            f"{', '.join(known)}. e.g. --profile demo"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"Profile {str(path)!r} is not valid YAML:{where}: {problem}. "
                         "Fix that line (indentation, a missing ':' or quote).") from None
    if not isinstance(data, dict):
        raise ValueError(f"Profile {str(path)!r} must be a YAML mapping (description, "
                         f"defaults, notebooks…); got {type(data).__name__}.")
    unknown = set(data) - {"description", "chapters", "defaults", "notebooks", "sweep"}
    if unknown:
        raise ValueError(
            f"Profile {str(path)!r} has unknown top-level keys {sorted(unknown)}; allowed: "
            "description, chapters, defaults, notebooks, sweep (see gradbrain.sweep)."
        )
    chapters_ = data.get("chapters")
    if chapters_ is not None and (not isinstance(chapters_, list)
                                  or not all(isinstance(c, str) for c in chapters_)):
        raise ValueError(f"Profile {str(path)!r}: 'chapters' must be a list of chapter names, "
                         f"e.g. [03_meg_decoding]; got {chapters_!r}.")
    for key in ("defaults", "notebooks"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"Profile {str(path)!r}: {key!r} must be a mapping; got "
                             f"{type(data[key]).__name__}.")
    for name, values in (data.get("notebooks") or {}).items():
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"Profile {str(path)!r}: notebooks.{name} must be a mapping of "
                             f"parameters; got {type(values).__name__}.")
    data["_path"] = str(path)
    return data


def declared_parameters(chapter: Chapter) -> dict:
    """The parameters a chapter's ``parameters`` cell declares, with their defaults.

    Read once per version of the notebook (the runner and the sweep ask many times).

    Returns
    -------
    dict of str to object
        Name → default value (the literal of the cell; ``None`` when it is not a literal).
    """
    source = Path(chapter.source)
    return dict(_read_declared(str(source), source.stat().st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _read_declared(source: str, mtime_ns: int) -> tuple:
    """Names and literal defaults of the assignments in a notebook's ``parameters`` cell.

    The notebook is read as JSON and the cell parsed with :mod:`ast`: every chapter
    checks its parameters when it starts (:func:`check_received`), and papermill's own
    reader costs an import of papermill and nbformat (1.4 s) there. A cell that does not
    parse as Python (e.g. it holds a magic) is read by papermill instead; the tests check
    that both readers agree on every chapter.
    """
    with open(source, encoding="utf-8") as f:
        notebook = json.load(f)
    cells = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"
             and "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        return ()
    text = cells[0]["source"]
    try:
        tree = ast.parse(text if isinstance(text, str) else "".join(text))
    except SyntaxError:
        return _read_declared_by_papermill(source)
    out = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                out.append((target.id, ast.literal_eval(node.value)))
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                out.append((target.id, None))
    return tuple(out)


def _read_declared_by_papermill(source: str) -> tuple:
    """:func:`_read_declared` by ``papermill.inspect_notebook`` (the reference)."""
    import papermill

    out = []
    for name, info in papermill.inspect_notebook(source).items():
        try:
            out.append((name, ast.literal_eval(info["default"])))
        except (ValueError, SyntaxError):
            out.append((name, None))
    return tuple(out)


def _type_problem(value, default) -> str | None:
    """Why ``value`` cannot stand for a parameter whose default is ``default`` (or None).

    None (the usual "automatic" value) is accepted for every parameter; otherwise the
    kind of the default decides: integers take integers, floats take numbers, strings,
    booleans, lists and mappings take their own kind.
    """
    if value is None or default is None:
        return None
    expected = [(bool, "true or false", lambda v: isinstance(v, bool)),
                (int, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                (float, "a number", lambda v: isinstance(v, (int, float))
                 and not isinstance(v, bool)),
                (str, "a string", lambda v: isinstance(v, str)),
                ((list, tuple), "a list", lambda v: isinstance(v, (list, tuple))),
                (dict, "a mapping", lambda v: isinstance(v, dict))]
    for kind, words, accepts in expected:
        if isinstance(default, kind):
            return None if accepts(value) else f"expects {words} (like its default {default!r})"
    return None


def check_parameters(todo: list[Chapter], profile: dict, overrides: dict | None = None,
                     every: list[Chapter] | None = None) -> None:
    """Refuse, before anything runs, parameters that no chapter would use or of the wrong kind.

    A misspelt ``-p`` override, profile default or chapter section would otherwise be
    silently ignored (a run with ``-p n_imgaes=40`` uses the default number of images).

    Parameters
    ----------
    todo : list of Chapter
        The chapters about to run.
    profile : dict
        From :func:`load_profile`.
    overrides : dict or None
        ``-p`` values: each must be declared by at least one chapter of ``todo``.
    every : list of Chapter or None
        All the book's chapters: profile ``defaults`` must be declared by one of them,
        and ``notebooks`` sections must name one of them.

    Raises
    ------
    ValueError
        One message naming the parameter (and chapter), with the valid names.
    """
    every = every if every is not None else todo
    where = f"profile {profile.get('_path', '')!r}"
    declared = {c.name: declared_parameters(c) for c in every}
    names = sorted({p for c in every for p in declared[c.name]})
    known = {c.name for c in every}
    for name in profile.get("notebooks") or {}:
        if name not in known:
            raise ValueError(f"The {where} sets parameters for chapter {name!r}, which the book "
                             f"does not have; chapters: {sorted(known)}.")
    for key in profile.get("defaults") or {}:
        if not any(key in d for d in declared.values()):
            raise ValueError(f"The {where} sets default {key!r}, which no chapter declares "
                             f"(a misspelling?); parameters: {names}.")
    run_names = sorted({p for c in todo for p in declared[c.name]})
    for key in overrides or {}:
        if not any(key in declared[c.name] for c in todo):
            raise ValueError(
                f"Parameter {key!r} (from -p/overrides) is declared by none of the chapters to "
                f"run ({[c.name for c in todo]}), so it would be ignored; is it misspelt? "
                f"Parameters they declare: {run_names}.")
    for chapter in todo:
        values = parameters_for(chapter, profile, overrides)
        for key, value in values.items():
            problem = _type_problem(value, declared[chapter.name].get(key))
            if problem:
                raise ValueError(f"Parameter {key!r} of chapter {chapter.name} {problem}; got "
                                 f"{value!r} ({type(value).__name__}).")


def parameters_for(chapter: Chapter, profile: dict, overrides: dict | None = None) -> dict:
    """The profile's values for one chapter, restricted to what its parameters cell declares.

    An override replaces the profile's value, except that a mapping given for a mapping
    (``-p nsd='{subject: 2}'``) is merged into it: the profile's other loader settings
    stay. To drop one of them, give it explicitly (``-p nsd='{max_images: null}'``).
    """
    declared = set(declared_parameters(chapter))
    specific = (profile.get("notebooks") or {}).get(chapter.name) or {}
    undeclared = set(specific) - declared
    if undeclared:
        raise ValueError(
            f"The profile sets {sorted(undeclared)} for {chapter.name}, whose parameters cell "
            f"declares only {sorted(declared)}."
        )
    values = {k: v for k, v in (profile.get("defaults") or {}).items() if k in declared}
    values.update(specific)
    for key, value in (overrides or {}).items():
        if key in declared:
            merge = isinstance(value, dict) and isinstance(values.get(key), dict)
            values[key] = {**values[key], **value} if merge else value
    return values


#: Values a parameter can have (anything else in a notebook's namespace at the check —
#: modules, functions, IPython's own — is not a parameter).
_PLAIN = (bool, int, float, str, list, dict, tuple, type(None))


def check_received(chapter: str, namespace: dict, *, root=None) -> None:
    """Refuse a notebook run that did not get its profile's parameters.

    Called by each chapter right after its parameters cell. A parameter the chapter does
    not declare (``papermill … -p n_imgaes 40`` injects it, and the chapter would run
    with its default number of images) is refused with the declared names.

    papermill's own CLI takes flat parameter files; a profile (``params/<name>.yaml``) is
    nested by chapter, so ``papermill … -f params/things.yaml`` would inject unused
    ``notebooks``/``defaults`` variables and run on the default data. This catches that, and
    a ``profile`` that declares another ``dataset`` for this chapter while the notebook kept
    its default one (``-p profile things`` alone); a dataset passed on purpose is left
    alone.

    Parameters
    ----------
    chapter : str
        The chapter's name, e.g. ``"03_meg_decoding"``.
    namespace : dict
        The notebook's ``globals()`` after its parameters cell.
    root : path-like or None
        The book's root (default: found from the working directory; without one, only
        the first check runs).

    Raises
    ------
    ValueError
        Naming the profile and the command that writes a flat parameter file.
    """
    profile = namespace.get("profile")
    nested = [k for k in ("notebooks", "defaults") if isinstance(namespace.get(k), dict)]
    name = profile  # with a profile file, its name is under defaults (if anywhere)
    if nested:
        name = namespace["defaults"].get("profile") if "defaults" in nested else None
    command = (f"python -m gradbrain.book params --profile {name or '<profile>'} "
               f"--chapter {chapter} > {chapter}.yaml; papermill notebooks/{chapter}.ipynb "
               f"out.ipynb -f {chapter}.yaml")
    if nested:
        raise ValueError(
            f"This notebook received {nested} as parameters: a profile file was given to "
            f"papermill (-f params/<profile>.yaml), but profiles are nested by chapter and "
            f"papermill reads flat files, so the chapter would run on its defaults. Write "
            f"the chapter's flat parameters first: {command}")
    try:
        root = Path(root) if root is not None else find_root()
        found = [c for c in chapters(root) if c.name == chapter]
    except (FileNotFoundError, ValueError):
        found = []   # no book here: nothing to compare with
    if found:
        declared = declared_parameters(found[0])
        # papermill's own -p injects any name: a misspelt one would be ignored silently
        stray = sorted(k for k, v in namespace.items() if isinstance(v, _PLAIN) and k not in
                       declared and not k.startswith("_") and k not in ("In", "Out"))
        if stray:
            raise ValueError(
                f"This notebook received {stray}, which its parameters cell does not declare "
                f"(misspelt?); {chapter} declares {sorted(declared)}.")
    if not found or not isinstance(profile, str) or "dataset" not in namespace:
        return
    default = declared.get("dataset")
    try:
        expected = parameters_for(found[0], load_profile(root, profile)).get("dataset")
    except (FileNotFoundError, ValueError):
        return  # no book here, or a profile it does not ship: nothing to compare with
    # only the silent fallback is refused: the notebook's own default where the profile
    # names another dataset (a dataset passed on purpose is the caller's choice)
    if expected is not None and namespace["dataset"] == default != expected:
        raise ValueError(
            f"Profile {profile!r} declares dataset={expected!r} for {chapter}, but this run "
            f"got the notebook's default dataset={default!r}: the profile's parameters were "
            f"not passed (papermill -p profile {profile} sets only the name). Run it with the "
            f"runner, python -m gradbrain.book run --profile {profile} --only {chapter}, or "
            f"pass the profile's parameters: {command}")


def _library_digest() -> str:
    """Hash of the gradbrain package's Python source (a library change reruns chapters)."""
    h = hashlib.blake2b(digest_size=16)
    package = Path(__file__).resolve().parent
    for file in sorted(package.rglob("*.py")):
        h.update(str(file.relative_to(package)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def input_digest(chapter: Chapter, parameters: dict) -> str:
    """Hash of everything that changes a chapter's output: notebook, parameters, library."""
    h = hashlib.blake2b(digest_size=16)
    h.update(chapter.source.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    h.update(_library_digest().encode())
    return h.hexdigest()


def _stamp_path(chapter: Chapter) -> Path:
    return chapter.output.parent / ".stamps" / f"{chapter.name}.json"


def _read_stamp(stamp: Path) -> dict | None:
    """A chapter's record of its last successful run; None when it cannot be read."""
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(chapter: Chapter, digest: str) -> bool:
    """True when the chapter's last successful run had the same inputs.

    Same notebook, parameters and library (``digest``), and every file or folder the
    chapter read during that run — the saved study, weights files, real data — still
    has the fingerprint it had then (see :mod:`gradbrain._provenance`).
    """
    return stale_reason(chapter, digest) is None


def stale_reason(chapter: Chapter, digest: str) -> str | None:
    """Why a chapter must rerun, in words (None when it is up to date)."""
    stamp = _stamp_path(chapter)
    if not (stamp.is_file() and chapter.output.is_file()):
        return "never ran" if not chapter.output.is_file() else "no record of its last run"
    recorded = _read_stamp(stamp)
    if recorded is None:
        return "its stamp is unreadable"
    if recorded.get("digest") != digest:
        return "its notebook, parameters or the library changed"
    stale = _provenance.stale_inputs(recorded.get("inputs", []))
    if stale:
        return f"an input it read changed: {stale[0]}"
    return None


def tidy_for_book(path: str | os.PathLike) -> None:
    """Retag papermill's cells so the rendered page shows the chapter, not plumbing.

    The injected-parameters cell is removed from the page (``remove-cell``); the
    notebook's own ``parameters`` cell is collapsed (``hide-cell``), since the
    chapter prints the values it actually ran with.
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
        elif "parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
    nbformat.write(nb, str(path))


def ran_on(parameters: dict, profile: str) -> str:
    """The one-line banner that opens a chapter's page: what this run used.

    Profile, dataset (or images), model(s) and weights, date, gradbrain version and
    device, from the parameters the chapter ran with (``device=None`` is reported as
    the device it resolves to on this machine).
    """
    import datetime

    parts = [f"profile `{profile}`"]
    for key in ("dataset", "images"):
        if parameters.get(key) not in (None, ""):
            parts.append(f"{key} `{parameters[key]}`")
    weights = parameters.get("weights")
    if parameters.get("model"):
        label = weights if isinstance(weights, str) else "random init"
        parts.append(f"model `{parameters['model']}` (weights: {label})")
    if parameters.get("models_to_compare"):
        names = parameters["models_to_compare"]
        weights = weights if isinstance(weights, dict) else {}
        parts.append("models " + ", ".join(
            f"`{m}` ({weights.get(m) or 'random init'})" for m in names))
    device = parameters.get("device")
    if device is None:  # None, or not a parameter: the library's choice on this machine
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    parts.append(f"{datetime.date.today().isoformat()}")
    parts.append(f"gradbrain {__version__}")
    parts.append(f"device {device}")
    return "**Ran on:** " + " · ".join(parts)


def add_banner(path: str | os.PathLike, banner: str) -> None:
    """Put ``banner`` right under the title of an executed chapter (a new first cell if
    the notebook does not open with a markdown title)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "markdown" and first.source.startswith("# "):
        title, _, rest = first.source.partition("\n")
        first.source = f"{title}\n\n{banner}\n{rest}"
    else:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(banner))
    nbformat.write(nb, str(path))


def execute_chapter(chapter: Chapter, parameters: dict, *, cwd: Path, progress: bool,
                    profile: str = "") -> list:
    """Execute one chapter to a temporary copy, then move it into place.

    Returns
    -------
    list of dict
        The inputs the chapter read (path and fingerprint each), for its stamp.

    Raises
    ------
    ChapterFailed
        With the failing cell; the partial output is kept as ``<name>.failed.ipynb``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    chapter.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = chapter.output.with_name(f".{chapter.name}.running.ipynb")
    failed = chapter.output.with_name(f"{chapter.name}.failed.ipynb")
    inputs = chapter.output.with_name(f".{chapter.name}.inputs.jsonl")
    _stamp_path(chapter).unlink(missing_ok=True)
    inputs.unlink(missing_ok=True)
    previous = os.environ.get(_provenance.ENV)
    os.environ[_provenance.ENV] = str(inputs)  # the kernel inherits it and records its inputs
    try:
        papermill.execute_notebook(
            str(chapter.source), str(tmp), parameters=parameters, kernel_name="python3",
            progress_bar=progress, cwd=str(cwd),
        )
    except PapermillExecutionError as err:
        os.replace(tmp, failed)
        raise ChapterFailed(
            f"Chapter {chapter.name} failed in cell {err.cell_index} (execution count "
            f"{err.exec_count}): {err.ename}: {err.evalue}\n--- cell source ---\n{err.source}\n"
            f"--- partial output saved to {failed}"
        ) from err
    except BaseException:
        if tmp.exists():
            os.replace(tmp, failed)
        raise
    finally:
        if previous is None:
            os.environ.pop(_provenance.ENV, None)
        else:
            os.environ[_provenance.ENV] = previous
    tidy_for_book(tmp)
    add_banner(tmp, ran_on(parameters, profile))
    os.replace(tmp, chapter.output)
    failed.unlink(missing_ok=True)
    records = _provenance.read_records(inputs)
    inputs.unlink(missing_ok=True)
    return records


def run(
    profile: str = "demo",
    *,
    only: list[str] | None = None,
    root: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: dict | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Execute the book's chapters on a profile.

    Parameters
    ----------
    profile : str
        Profile name (``params/<profile>.yaml``) or path of a YAML file.
    only : list of str or None
        Chapter names to run (e.g. ``["01_gradients"]``); ``None`` runs all.
    root : path-like or None
        Repository root (found from the working directory when None).
    output_dir : path-like or None
        Where executed copies go (default ``<root>/executed``, what the book renders).
    overrides : dict or None
        Parameter values that replace the profile's, for chapters that declare them.
    force : bool
        Rerun chapters even when their inputs are unchanged.
    progress : bool
        Show papermill's per-cell progress.

    Returns
    -------
    dict of str to str
        Chapter name → ``"executed"`` or ``"skipped"``.
    """
    root = find_root(root)
    data = load_profile(root, profile)
    every = chapters(root, output_dir)
    todo = list(every)
    names = [c.name for c in todo]
    # the profile may cover only some chapters; --only picks among those
    for source, wanted in (("the profile's 'chapters'", data.get("chapters")), ("'only'", only)):
        if not wanted:
            continue
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"Unknown chapter(s) {unknown} in {source}; available: {names}.")
        todo = [c for c in todo if c.name in wanted]
        names = [c.name for c in todo]
    check_parameters(todo, data, overrides, every=every)
    status = {}
    for i, chapter in enumerate(todo, 1):
        parameters = parameters_for(chapter, data, overrides)
        digest = input_digest(chapter, parameters)
        prefix = f"[{i}/{len(todo)}] {chapter.name}"
        reason = "forced" if force else stale_reason(chapter, digest)
        if reason is None:
            print(f"{prefix}: inputs unchanged, skipped", flush=True)
            status[chapter.name] = "skipped"
            continue
        print(f"{prefix}: running ({reason}) on profile {profile!r} with {parameters}",
              flush=True)
        start = time.perf_counter()
        inputs = execute_chapter(chapter, parameters, cwd=root, progress=progress,
                                 profile=profile)
        stamp = _stamp_path(chapter)
        with atomic_path(stamp, suffix=".json") as tmp:
            tmp.write_text(json.dumps({
                "digest": digest, "profile": profile, "parameters": parameters,
                "inputs": inputs, "seconds": round(time.perf_counter() - start, 1),
                "finished": time.strftime("%Y-%m-%d"), "cores": usable_cores(),
            }, default=str, indent=1))
        print(f"{prefix}: done in {time.perf_counter() - start:.0f} s → {chapter.output}", flush=True)
        status[chapter.name] = "executed"
    write_run_times(root, output_dir)
    return status


def run_times(root=None, output_dir=None) -> list[dict]:
    """How long each executed chapter took the last time it ran, from the runner's stamps.

    Returns
    -------
    list of dict
        In book order, one per chapter that has an executed copy: ``chapter``,
        ``profile``, ``seconds`` (wall time of the papermill run), ``finished`` (date)
        and ``cores`` (CPU cores the runner could use).
    """
    out = []
    for chapter in chapters(find_root(root), output_dir):
        stamp = _stamp_path(chapter)
        if not (stamp.is_file() and chapter.output.is_file()):
            continue
        record = _read_stamp(stamp)
        if record is None:
            continue
        out.append({"chapter": chapter.name, "profile": record.get("profile"),
                    "seconds": record.get("seconds"), "finished": record.get("finished"),
                    "cores": record.get("cores")})
    return out


def write_run_times(root=None, output_dir=None) -> Path:
    """Write ``<executed>/run_times.md``: the table of :func:`run_times`, in Markdown, which
    the teaching page includes, so the times it shows are those of the build it is in."""
    root = find_root(root)
    folder = Path(output_dir) if output_dir else root / EXECUTED_DIR
    rows = run_times(root, output_dir)
    lines = ["| Chapter | Profile | Run time | Date | CPU cores |", "|---|---|---|---|---|"]
    for row in rows:
        seconds = row["seconds"]
        shown = "?" if seconds is None else (f"{seconds:.0f} s" if seconds < 90
                                             else f"{seconds / 60:.1f} min")
        lines.append(f"| {row['chapter']} | {row['profile']} | {shown} | "
                     f"{row['finished'] or '?'} | {row['cores'] or '?'} |")
    if not rows:
        lines.append("| (no chapter has run yet) | | | | |")
    total = sum(r["seconds"] or 0 for r in rows)
    lines += ["", f"All chapters: {total / 60:.1f} min of papermill runs (the book's own build "
                  "adds about a minute)."]
    path = folder / "run_times.md"
    with atomic_path(path, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def flat_parameters(profile: str, chapter: str, *, root=None,
                    overrides: dict | None = None) -> str:
    """One chapter's parameters from a profile, as the flat YAML that ``papermill -f`` reads.

    Checked like a runner's run (names declared by the chapter, types of the defaults);
    ``profile`` is included so that the chapter can check what it received.
    """
    root = find_root(root)
    every = chapters(root)
    found = [c for c in every if c.name == chapter]
    if not found:
        raise ValueError(f"No chapter {chapter!r}; chapters: {[c.name for c in every]}.")
    loaded = load_profile(root, profile)
    check_parameters(found, loaded, overrides, every=every)
    values = parameters_for(found[0], loaded, overrides)
    if "profile" in declared_parameters(found[0]):
        values.setdefault("profile", Path(profile).stem if profile.endswith(
            (".yaml", ".yml")) else profile)
    header = (f"# parameters of {chapter} from profile {profile!r}; use with:\n"
              f"#   papermill notebooks/{chapter}.ipynb out.ipynb -f <this file>\n")
    return header + yaml.safe_dump(values, sort_keys=False)


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradbrain.book", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute chapters with papermill")
    p_run.add_argument("--profile", default="demo", help="params/<profile>.yaml (default: demo)")
    p_run.add_argument("--only", nargs="+", metavar="CHAPTER", help="e.g. --only 01_gradients")
    p_run.add_argument("--root", help="repository root (default: found from the cwd)")
    p_run.add_argument("--output-dir", help="where executed copies go (default: executed/)")
    p_run.add_argument("-p", "--param", action="append", type=_parse_override, default=[],
                       metavar="KEY=VALUE", help="override a parameter (YAML value; a "
                       "mapping merges into the profile's, e.g. -p nsd='{subject: 2}')")
    p_run.add_argument("--force", action="store_true", help="rerun even if inputs are unchanged")
    p_run.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    p_list = sub.add_parser("list", help="list the chapters in book order")
    p_list.add_argument("--root")
    p_params = sub.add_parser(
        "params", help="print one chapter's parameters from a profile, as a flat YAML file "
                       "for papermill -f")
    p_params.add_argument("--profile", default="demo", help="params/<profile>.yaml")
    p_params.add_argument("--chapter", required=True, help="e.g. 03_meg_decoding")
    p_params.add_argument("--root", help="repository root (default: found from the cwd)")
    p_params.add_argument("-p", "--param", action="append", type=_parse_override, default=[],
                          metavar="KEY=VALUE", help="override a parameter (YAML value)")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for chapter in chapters(find_root(args.root)):
                print(chapter.name)
            return 0
        if args.command == "params":
            print(flat_parameters(args.profile, args.chapter, root=args.root,
                                  overrides=dict(args.param)), end="")
            return 0
        run(args.profile, only=args.only, root=args.root, output_dir=args.output_dir,
            overrides=dict(args.param), force=args.force, progress=not args.quiet)
    except (ChapterFailed, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
