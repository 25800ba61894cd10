"""The library's layers, read statically from its source (issue 29).

Every import of a gradbrain module is collected with :mod:`ast` — module-level ones and
the function-local ones that were written to dodge a cycle — and checked against the
layer plan of ``README.md`` ("How the library is layered"):

0. ``gradbrain`` (the package root), ``_utils``, ``_compat``: imported by all;
1. kernels on arrays — ``linear``, ``stats``, and the kernels still in ``ridge``/``meg``:
   no study, no features;
2. ``models``, ``features``, ``data``, ``_provenance``;
3. the hierarchy tests — ``hierarchy`` (scores, inference, verdicts, calibration);
4. the study-level analysis — ``analysis`` (and ``divergence``, ``compare``): the only
   place a ``Study`` meets features and kernels;
5. ``plotting``, ``book``, ``sweep``, ``insilico``, ``_sphinx``.

A module imports only modules of its own layer or below. What the code does today that
the plan forbids is listed below; each list may only shrink (an entry that no longer
occurs fails the test, so it is removed when it is fixed).

Deprecation shims — a module-level ``__getattr__`` that resolves an old public name
lazily from its new home for one release — are not dependencies and are not counted.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = LIB / "gradbrain"

#: Layer of each module, by longest matching prefix (see the module docstring).
LAYERS = {
    "gradbrain": 0, "gradbrain._utils": 0, "gradbrain._compat": 0,
    "gradbrain.linear": 1, "gradbrain.stats": 1, "gradbrain.ridge": 1, "gradbrain.meg": 1,
    "gradbrain.models": 2, "gradbrain.features": 2, "gradbrain.data": 2,
    "gradbrain._provenance": 2, "gradbrain.reference": 2,
    "gradbrain.hierarchy": 3,
    "gradbrain.analysis": 4, "gradbrain.divergence": 4, "gradbrain.compare": 4,
    "gradbrain.plotting": 5, "gradbrain.book": 5, "gradbrain.sweep": 5,
    "gradbrain.insilico": 5, "gradbrain._sphinx": 5,
}

#: Layers whose modules may import from the kernels (layers 0–1) only: the hierarchy
#: tests take arrays and tables, never a Study, Features or a model.
KERNELS_ONLY = ("gradbrain.hierarchy",)

#: Imports that point up the layers today (importer, imported). May only shrink.
ALLOWED_UPWARD: set[tuple[str, str]] = set()

#: Imports by KERNELS_ONLY modules of layer-2 modules today. May only shrink.
ALLOWED_BEYOND_KERNELS: set[tuple[str, str]] = set()

#: Function-local imports of gradbrain modules (importer, imported) kept on purpose, each
#: with its reason. May only shrink; new ones need a reason here.
ALLOWED_LOCAL: dict[tuple[str, str], str] = {
    **{("gradbrain.data", f"gradbrain.data.{loader}"): (
        "import cost: load_study imports a dataset's loader (boto3, mne, torch) only when "
        "that dataset is asked for") for loader in ("nsd", "simulated", "things_meg")},
}

#: Modules allowed over MAX_LINES today. May only shrink.
MAX_LINES = 1500
ALLOWED_LONG: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom, modules) -> list[str]:
    """The gradbrain modules a ``from … import …`` statement loads."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target != "gradbrain" and not target.startswith("gradbrain."):
        return []
    found = {f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
             for alias in node.names}
    return sorted(found)


def import_edges() -> list[dict]:
    """Every import of a gradbrain module by a gradbrain module.

    Returns
    -------
    list of dict with ``importer``, ``imported``, ``local`` (inside a function),
    ``shim`` (inside a module-level ``__getattr__``) and ``line``.
    """
    modules = _modules()
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"

        def visit(node, function):
            for child in ast.iter_child_nodes(node):
                inner = function
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner = function or child.name
                targets = []
                if isinstance(child, ast.ImportFrom):
                    targets = _resolve(name, is_package, child, modules)
                elif isinstance(child, ast.Import):
                    targets = [a.name for a in child.names
                               if a.name == "gradbrain" or a.name.startswith("gradbrain.")]
                for target in targets:
                    if target != name:
                        edges.append({"importer": name, "imported": target,
                                      "local": function is not None,
                                      "shim": function == "__getattr__",
                                      "line": child.lineno})
                visit(child, inner)
        visit(tree, None)
    return edges


def layer_of(module: str) -> int:
    matches = [prefix for prefix in LAYERS
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise KeyError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py "
                       "(and to the plan in README.md).")
    return LAYERS[max(matches, key=len)]


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = defaultdict(set)
    for e in edges:
        graph[e["importer"]].add(e["imported"])
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            connect(v)
    return out


@pytest.fixture(scope="module")
def edges():
    return [e for e in import_edges() if not e["shim"]]


def test_the_reader_finds_imports_of_every_kind(edges):
    """Check the import reader itself: module-level, relative, function-local."""
    pairs = {(e["importer"], e["imported"], e["local"]) for e in edges}
    assert ("gradbrain.features", "gradbrain.models", False) in pairs
    assert ("gradbrain.data", "gradbrain.data.images", False) in pairs
    assert any(local for _, _, local in pairs)


def test_no_import_cycles(edges):
    """Check that no gradbrain modules import each other (function-local imports too)."""
    # a package importing its own submodules (``data`` → ``data.images``) is how a
    # package is built, not a cycle between layers
    between = [e for e in edges
               if not e["imported"].startswith(e["importer"] + ".")]
    assert _cycles(between) == []


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_imports_point_down_the_layers(edges):
    """Check that a module imports only its own layer or the layers below."""
    upward = {(e["importer"], e["imported"]) for e in edges
              if layer_of(e["imported"]) > layer_of(e["importer"])}
    new = upward - ALLOWED_UPWARD
    assert not new, f"imports that point up the layers: {sorted(new)}"
    stale = ALLOWED_UPWARD - upward
    assert not stale, f"fixed, remove from ALLOWED_UPWARD: {sorted(stale)}"


def test_hierarchy_tests_take_arrays_not_studies(edges):
    """Check that the hierarchy tests import only the kernels (and _utils)."""
    beyond = {(e["importer"], e["imported"]) for e in edges
              if any(e["importer"] == m or e["importer"].startswith(m + ".")
                     for m in KERNELS_ONLY)
              and layer_of(e["imported"]) == 2}
    new = beyond - ALLOWED_BEYOND_KERNELS
    assert not new, f"the hierarchy tests import beyond the kernels: {sorted(new)}"
    stale = ALLOWED_BEYOND_KERNELS - beyond
    assert not stale, f"fixed, remove from ALLOWED_BEYOND_KERNELS: {sorted(stale)}"


def test_function_local_imports_are_few_and_explained(edges):
    """Check that gradbrain modules are imported at module level, save listed reasons."""
    local = {(e["importer"], e["imported"]) for e in edges if e["local"]}
    new = local - set(ALLOWED_LOCAL)
    assert not new, (f"function-local imports of gradbrain modules: {sorted(new)}; import "
                     "at module level, or add each to ALLOWED_LOCAL with its reason")
    stale = set(ALLOWED_LOCAL) - local
    assert not stale, f"fixed, remove from ALLOWED_LOCAL: {sorted(stale)}"


def test_modules_stay_small():
    """Check that no module holds more than one concern's worth of lines."""
    long = {name for name, path in _modules().items()
            if len(path.read_text(encoding="utf-8").splitlines()) > MAX_LINES}
    assert long <= ALLOWED_LONG, f"over {MAX_LINES} lines: {sorted(long - ALLOWED_LONG)}"
    assert not ALLOWED_LONG - long, f"fixed, remove: {sorted(ALLOWED_LONG - long)}"


#: Public names that moved in the redesign: old place → new place (kept one release).
MOVED = {
    "gradbrain.ridge:fmri_encoding": "gradbrain.analysis.encoding:fmri_encoding",
    "gradbrain.ridge:fmri_partition": "gradbrain.analysis.encoding:fmri_partition",
    "gradbrain.ridge:check_same_images": "gradbrain.analysis.encoding:check_same_images",
    "gradbrain.meg:meg_encoding": "gradbrain.analysis.encoding:meg_encoding",
    "gradbrain.meg:meg_partition": "gradbrain.analysis.encoding:meg_partition",
    "gradbrain.hierarchy:run": "gradbrain.analysis.backprop:backprop_tests",
    "gradbrain.hierarchy:simulate_tests": "gradbrain.analysis.simulation:simulate_tests",
    "gradbrain.hierarchy:study_sizes": "gradbrain.analysis.simulation:study_sizes",
    "gradbrain.hierarchy:write_reference": "gradbrain.analysis.simulation:write_reference",
    "gradbrain.hierarchy:group_test": "gradbrain.stats:group_test",
    "gradbrain.hierarchy:group_estimate": "gradbrain.stats:group_estimate",
    "gradbrain.hierarchy:equivalence": "gradbrain.stats:equivalence",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_names_still_import_with_a_deprecation_warning(old):
    """Check that an old public name is the new object, with a warning naming its home."""
    import importlib

    module, name = old.split(":")
    new_module, new_name = MOVED[old].split(":")
    with pytest.warns(DeprecationWarning, match=f"moved to {new_module}.{new_name}"):
        found = getattr(importlib.import_module(module), name)
    assert found is getattr(importlib.import_module(new_module), new_name)


def test_unknown_names_still_raise_attribute_error():
    import gradbrain.ridge

    with pytest.raises(AttributeError, match="no attribute 'fmri_encodng'"):
        gradbrain.ridge.fmri_encodng  # noqa: B018
