"""The environment: pins agree, and the README's commands are the ones CI runs."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirement_map(lines):
    out = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("-e"):
            continue
        name = re.split(r"[=<>!~ ]", line, maxsplit=1)[0].lower()
        out[name] = line[len(name):].strip()
    return out


def test_pins_agree_between_pyproject_and_environment_yml():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = _requirement_map(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = _requirement_map(pip_list)
    assert pyproject == conda


def test_torch_and_torchvision_are_pinned_together():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _requirement_map(project["dependencies"])
    assert pins["torch"].startswith("==") and pins["torchvision"].startswith("==")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^\s*make test\b", ci, flags=re.M)


#: Packages of pyproject.toml that a reader on Binder does not need: the book's own
#: build (jupyter-book and its Sphinx extensions), the ridge reference of the tests and
#: benchmarks (himalaya), and cluster sweeps (submitit).
NOT_ON_BINDER = {"himalaya", "jupyter-book", "sphinx-exercise", "sphinx-mathjax-offline",
                 "submitit"}


def test_binder_environment_is_cpu_torch_the_chapters_needs_and_no_test_tools():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _requirement_map(project["dependencies"])
    dev = _requirement_map(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "binder" / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    options = [line for line in pip_list if line.startswith("--")]
    binder = _requirement_map([line for line in pip_list if not line.startswith("--")])
    # CPU wheels from PyTorch's CPU index, of the very versions pyproject pins
    assert options == ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    for name in ("torch", "torchvision"):
        assert binder[name] == runtime[name] + "+cpu", (name, binder[name])
    others = {k: v for k, v in binder.items() if k not in ("torch", "torchvision")}
    assert others == {k: v for k, v in runtime.items()
                      if k not in NOT_ON_BINDER | {"torch", "torchvision"}}
    assert not set(binder) & set(dev), "a test-only package in Binder's environment"
    # gradbrain itself, without dependencies (they would pull the CUDA torch back)
    post = (ROOT / "binder" / "postBuild").read_text()
    assert re.search(r"pip install --no-deps .*-e \.$", post, flags=re.M)
    assert (ROOT / "binder" / "postBuild").stat().st_mode & 0o100, "postBuild not executable"


def test_launch_buttons_point_at_the_repository_and_no_placeholder_hub():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    launch, repo = config["launch_buttons"], config["repository"]
    assert launch["binderhub_url"] == "https://mybinder.org"
    assert launch["colab_url"] == "https://colab.research.google.com"
    assert "jupyterhub_url" not in launch or "example" not in launch["jupyterhub_url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo["url"])
    assert repo["path_to_book"] == "" and (ROOT / "notebooks").is_dir()


def test_the_publishing_workflow_checks_pull_requests_and_deploys_only_main():
    """Issue 31: build on pull requests too (no deploy), cache pip and the features,
    install only what the book needs, and enable Pages before uploading."""
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    triggers = flow[True]   # YAML 1.1 reads the key `on` as True
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["main"]
    steps = flow["jobs"]["build"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    assert python["with"]["cache"] == "pip"
    cached = next(s for s in steps if s.get("uses", "").startswith("actions/cache"))
    assert cached["with"]["path"] == ".gradbrain_data"
    assert flow["jobs"]["build"]["env"]["GRADBRAIN_DATA"].endswith("/.gradbrain_data")
    runs = " ".join(s.get("run", "") for s in steps)
    assert "make book EXTRAS=" in runs and "[dev]" not in runs
    assert "EXTRAS ?= [dev]" in (ROOT / "Makefile").read_text()
    configure = uses.index(next(u for u in uses if u.startswith("actions/configure-pages")))
    upload = uses.index(next(u for u in uses if u.startswith("actions/upload-pages-artifact")))
    assert configure < upload
    for i in (configure, upload):
        assert steps[i]["if"] == "github.event_name != 'pull_request'"
    assert flow["jobs"]["deploy"]["if"] == "github.event_name != 'pull_request'"
