"""milkit.training."""
