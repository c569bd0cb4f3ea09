"""milkit.slides."""
