"""Surgery: turn a LayerPlan into a checkpoint on disk (weight-tied layer list, or a mergekit passthrough merge)."""

from .build import FORMATS, BuildResult, build

__all__ = ["FORMATS", "BuildResult", "build"]
