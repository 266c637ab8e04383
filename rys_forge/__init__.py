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
from rys_forge.models import load_model
from rys_forge.plan import LayerPlan, Window
from rys_forge.repeat import apply_plan, repeated, restore


def __getattr__(name: str):  # heavier stages load on first use
    if name == "rank_windows":
        from rys_forge.rank.pipeline import rank_windows

        return rank_windows
    if name == "build":
        from rys_forge.surgery import build

        return build
    if name == "verify":
        from rys_forge.verify import verify

        return verify
    if name == "evaluate":
        from rys_forge.evaluate.harness import evaluate

        return evaluate
    if name == "publish":
        from rys_forge.publish.card import publish

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
