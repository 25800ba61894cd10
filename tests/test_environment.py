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
