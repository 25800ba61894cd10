"""Small books for the runner and sweep tests: notebooks and a table of contents."""

import nbformat
import yaml


def write_notebook(path, parameters: str, body: str) -> None:
    """A two-cell notebook: a ``parameters``-tagged cell, then ``body``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


def write_toc(root, names) -> None:
    """``_toc.yml`` listing ``executed/<name>`` for each chapter, in order."""
    (root / "_toc.yml").write_text(yaml.safe_dump({
        "format": "jb-book", "root": "intro",
        "chapters": [{"file": f"executed/{n}"} for n in names]}))


def run_profile_both_ways(profile: str, overrides: dict, tmp_path) -> dict:
    """Run a profile's chapters through the book runner, then each chapter again through
    papermill's own CLI with the flat file ``python -m gradbrain.book params`` writes.

    Returns the runner's status and, per chapter, the text of both executed copies'
    outputs (``{"status": ..., "runner": {chapter: text}, "cli": {chapter: text}}``).
    The CLI pass has its own ``GRADBRAIN_DATA`` folder, so its later chapters read the
    study its own data chapter saved, not the runner's.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gradbrain import book

    root = Path(__file__).resolve().parents[1]

    def text(path):
        return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                         + str(o.get("data", {}).get("text/plain", ""))
                         for c in nbformat.read(str(path), 4).cells for o in c.get("outputs", []))

    status = book.run(profile, root=root, output_dir=tmp_path / "executed", overrides=overrides,
                      progress=False)
    runner = {name: text(tmp_path / "executed" / f"{name}.ipynb") for name in status}
    cli = {}
    data_home = tmp_path / "cli-data"
    env = {**os.environ, "GRADBRAIN_DATA": str(data_home)}
    by_name = {c.name: c for c in book.chapters(root)}
    for name in status:
        declared = book.declared_parameters(by_name[name])
        args = [arg for k, v in overrides.items() if k in declared
                for arg in ("-p", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}")]
        flat = subprocess.run(
            [sys.executable, "-m", "gradbrain.book", "params", "--profile", profile,
             "--chapter", name, "--root", str(root), *args],
            capture_output=True, text=True, check=True, env=env).stdout
        (tmp_path / f"{name}.yaml").write_text(flat)
        out = subprocess.run(
            [sys.executable, "-m", "papermill", str(root / "notebooks" / f"{name}.ipynb"),
             str(tmp_path / f"cli-{name}.ipynb"), "-f", str(tmp_path / f"{name}.yaml"),
             "--cwd", str(root)], capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, (name, out.stderr[-3000:])
        cli[name] = text(tmp_path / f"cli-{name}.ipynb")
    return {"status": status, "runner": runner, "cli": cli}
