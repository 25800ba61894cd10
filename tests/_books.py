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
