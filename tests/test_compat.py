"""The torchvision import work-around."""

import subprocess
import sys

import pytest

from gradbrain import _compat


def test_timm_imports_after_gradbrain_in_a_fresh_interpreter():
    """`import gradbrain` makes torchvision, timm and a torchvision transform usable."""
    code = (
        "import gradbrain, timm, torchvision.transforms as T, torch;"
        "x = T.Normalize([0.5]*3, [0.5]*3)(torch.ones(3, 4, 4));"
        "assert float(x.max()) == 1.0; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_other_import_errors_are_not_swallowed(monkeypatch):
    """Check that an unrelated RuntimeError during import propagates unchanged."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("something else broke")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(RuntimeError, match="something else broke"):
        _compat.import_torchvision()


def test_schema_definition_is_idempotent():
    """Defining the schemas twice neither fails nor duplicates an operator."""
    _compat._define_missing_torchvision_schemas()
    _compat._define_missing_torchvision_schemas()
    assert _compat._has_schema("nms")


def test_import_gradbrain_does_not_import_torchvision_yet_timm_imports_after_it():
    """Issue 33: `import gradbrain` imported torchvision, and through it torch._dynamo
    (25 s of a 55 s import on a loaded machine), in processes that never use a model
    (the book runner). The schemas are defined ahead instead, when needed."""
    code = ("import sys, gradbrain, gradbrain.book;"
            "print('torchvision' in sys.modules);"
            "import timm, torchvision.transforms;"
            "print(gradbrain._compat.shim_applied)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported_early, shimmed = out.stdout.split()
    assert imported_early == "False"
    # the version files are read right: the shim acts exactly where a plain import fails
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True,
                           text=True, timeout=120)
    fails = plain.returncode != 0 and "does not exist" in plain.stderr
    assert _compat.torchvision_is_cuda_build_beside_cpu_torch() == fails
    assert shimmed == str(fails)
