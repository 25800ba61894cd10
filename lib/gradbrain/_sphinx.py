"""A small Sphinx extension for the book: buttons of a chapter open its source notebook.

The book renders the executed copies in ``executed/`` (written by
``python -m gradbrain.book run``, not kept in the repository), but a reader who clicks
Binder, Colab, JupyterHub, "edit" or "source" wants the chapter's notebook in
``notebooks/``, with its ``parameters`` cell, to run it themselves. sphinx-book-theme
builds those links from the page's own path; this extension, listed under
``sphinx: extra_extensions`` in ``_config.yml``, rewrites them afterwards.
"""

from __future__ import annotations

from typing import Any

EXECUTED = "executed/"
SOURCE = "notebooks/"


def _rewrite(value: Any, old: str, new: str) -> Any:
    """``value`` with ``old`` replaced by ``new`` in every external ``url`` inside it.

    Links into the build itself (the "download .ipynb" button) are left alone: they
    serve the executed copy, with its outputs.
    """
    if isinstance(value, dict):
        return {k: (v.replace(old, new) if k == "url" and isinstance(v, str)
                    and v.startswith(("http://", "https://")) else _rewrite(v, old, new))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, old, new) for v in value]
    return value


def point_buttons_at_sources(app, pagename: str, templatename: str, context: dict,
                             doctree) -> None:
    """``html-page-context`` handler: executed/<chapter>.ipynb → notebooks/<chapter>.ipynb."""
    if not pagename.startswith(EXECUTED) or "header_buttons" not in context:
        return
    chapter = pagename[len(EXECUTED):]
    context["header_buttons"] = _rewrite(context["header_buttons"],
                                         f"{EXECUTED}{chapter}.ipynb",
                                         f"{SOURCE}{chapter}.ipynb")


def setup(app) -> dict:
    # after sphinx-book-theme has added its buttons (its handlers run at the default 500)
    app.connect("html-page-context", point_buttons_at_sources, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
