"""Surgery: turn a LayerPlan into a checkpoint on disk (weight-tied layer list, or a mergekit passthrough merge)."""
