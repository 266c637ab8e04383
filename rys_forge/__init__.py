"""rys-forge: find, build, verify, evaluate and publish "Repeat Your Self" layer-repeat checkpoints.

The handful of functions a notebook user needs::

    from rys_forge import load_model, LayerPlan, repeated
    loaded = load_model("gemma-3-270m")
    plan = LayerPlan.from_windows(["6:10"], num_layers=18)
    with repeated(loaded.model, plan):
        ...
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import PackageNotFoundError, version

from rys_forge.errors import RysForgeError
from rys_forge.plan import LayerPlan, Window


_LAZY = {  # public name -> module holding it; everything that imports torch loads on first use
    "load_model": "rys_forge.models",
    "apply_plan": "rys_forge.repeat",
    "repeated": "rys_forge.repeat",
    "restore": "rys_forge.repeat",
    "rank_windows": "rys_forge.rank",
    "build": "rys_forge.surgery",
    "verify": "rys_forge.verify",
    "evaluate": "rys_forge.evaluate",
    "publish": "rys_forge.publish",
    "heal": "rys_forge.heal",
    "sweep_windows": "rys_forge.research.sweep",
    "validate_runs": "rys_forge.research.validate",
    "calibrate_score": "rys_forge.research.calibrate",
}


#: Public functions that share their name with the submodule that holds them (`rys_forge.verify.verify`, ...).
_SHADOWED = frozenset(name for name, module in _LAZY.items() if module == f"rys_forge.{name}")


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # the dict itself: `_Package.__setattr__` keeps modules, not functions, out
    return value


class _Package(types.ModuleType):
    """The package module: Python's import system binds every loaded submodule as an attribute of its package
    (`rys_forge.verify` = the module), which would hide the public function of that name from then on (and
    `build` loads `rys_forge.verify`). Those bindings are dropped for the shadowed names; the submodules stay
    importable (`from rys_forge.verify import ...`, `importlib.import_module`)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


try:
    __version__ = version("rys-forge")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "LayerPlan", "RysForgeError", "Window", "__version__", "apply_plan", "build", "calibrate_score", "evaluate",
    "heal", "load_model", "publish", "rank_windows", "repeated", "restore", "sweep_windows", "validate_runs", "verify",
]
