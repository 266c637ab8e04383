"""Surgery: turn a LayerPlan into a checkpoint on disk (weight-tied layer list, or a mergekit passthrough merge).

`build` (in `builder.py`) is the entry point: it loads the base, writes the export with `layerlist.py` (which
copies the self-contained `rys_forge/modeling_rys.py` into it) or `mergekit_export.py`, and verifies it before
renaming it into place.
"""

from rys_forge.surgery.builder import FORMATS, BuildResult, build

__all__ = ["FORMATS", "BuildResult", "build"]
