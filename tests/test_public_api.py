"""The package root's public API (`rys_forge.__all__`): each name is what it documents, whatever was imported first."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import rys_forge

#: Public functions that live in a submodule of the same name.
SAME_NAME = ("verify", "evaluate", "heal", "publish")


def test_every_public_name_resolves():
    for name in rys_forge.__all__:
        assert getattr(rys_forge, name) is not None, name
    for name in SAME_NAME:
        assert inspect.isfunction(getattr(rys_forge, name)), name


def test_functions_named_like_their_modules_stay_functions_after_those_modules_load():
    """Loading a submodule binds it on its package; `build` and the research stages load `rys_forge.verify` and
    `rys_forge.evaluate`, so without care `from rys_forge import verify` would give the module. A fresh
    interpreter: every submodule first, then the public names; the submodules stay importable."""
    code = textwrap.dedent(f"""
        import importlib, inspect, sys
        import rys_forge
        modules = [importlib.import_module(m) for m in
                   ("rys_forge.surgery", "rys_forge.research.sweep", "rys_forge.heal", "rys_forge.verify",
                    "rys_forge.evaluate", "rys_forge.publish")]
        from rys_forge import build, verify, evaluate, heal, publish
        for name in {SAME_NAME!r}:
            value = getattr(rys_forge, name)
            module = sys.modules["rys_forge." + name]
            assert inspect.ismodule(module), name
            assert inspect.isfunction(value) and value is getattr(module, name), (name, value)
        from rys_forge.evaluate import harness
        from rys_forge.verify import verify as direct
        assert direct is verify and inspect.ismodule(harness)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
