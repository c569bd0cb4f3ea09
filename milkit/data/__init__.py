"""milkit.data."""
