"""milkit.heatmaps."""
