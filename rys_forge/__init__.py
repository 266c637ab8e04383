"""rys-forge: find, build, verify, evaluate and publish "Repeat Your Self" layer-repeat checkpoints.

The handful of functions a notebook user needs::

    from rys_forge import load_model, LayerPlan, repeated
    loaded = load_model("gemma-3-270m")
    plan = LayerPlan.from_windows(["6:10"], num_layers=18)
    with repeated(loaded.model, plan):
        ...
"""

from __future__ import annotations

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


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    # `verify`, `evaluate` and `publish` are also submodule names: importing the submodule set the
    # package attribute to the module; the public name is the function.
    globals()[name] = value
    return value


try:
    __version__ = version("rys-forge")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "LayerPlan", "RysForgeError", "Window", "__version__", "apply_plan", "build", "calibrate_score", "evaluate",
    "heal", "load_model", "publish", "rank_windows", "repeated", "restore", "sweep_windows", "validate_runs", "verify",
]
