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

from .errors import RysForgeError
from .models import load_model
from .plan import LayerPlan, Window
from .repeat import apply_plan, repeated, restore


def __getattr__(name: str):  # heavier stages load on first use
    if name == "rank_windows":
        from .rank import rank_windows

        return rank_windows
    if name == "build":
        from .surgery import build

        return build
    if name == "verify":
        from .verify import verify

        return verify
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    if name == "publish":
        from .publish import publish

        return publish
    raise AttributeError(name)


try:
    __version__ = version("rys-forge")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "LayerPlan", "RysForgeError", "Window", "__version__", "apply_plan", "build", "evaluate", "load_model",
    "publish", "rank_windows", "repeated", "restore", "verify",
]
