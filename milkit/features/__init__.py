"""milkit.features."""
