"""Surgery: turn a LayerPlan into a checkpoint on disk (weight-tied layer list, or a mergekit passthrough merge).

`build` (in `builder.py`) is the entry point; `modeling_rys.py` is the self-contained modelling file copied
into layer-list exports (and the one implementation of per-visit layer copies, also used in memory).
"""

__all__ = ["FORMATS", "BuildResult", "build"]


def __getattr__(name: str):  # lazy: `repeat` imports `modeling_rys` from this package
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.builder"), name)
    raise AttributeError(name)
