"""Heatmaps from cached prediction files, tile galleries and QuPath GeoJSON.

Typical use (what ``milkit heatmap RUN_DIR``, :mod:`milkit.pipeline.heatmap`, does for every slide)::

    from milkit.heatmaps import read_predictions, render_heatmap, whole_slide_canvas
    from milkit.slides.reader import open_slide

    predictions = read_predictions("run/predictions/slide.h5")
    with open_slide(predictions.slide_path) as reader:
        canvas = whole_slide_canvas(reader, max_size_px=2048)
    heatmap = render_heatmap(canvas, predictions, "score:tumour")
    heatmap.figure()  # slide | heatmap with a colour bar in the value's units

Nothing here re-extracts features: every value comes from the prediction file.
"""

from milkit.heatmaps.colour import ColourScale, normalize_values
from milkit.heatmaps.figures import heatmap_figure, save_figure, save_image, tile_gallery_figure
from milkit.heatmaps.geojson import (
    read_geojson,
    tile_features,
    tissue_features,
    write_geojson,
)
from milkit.heatmaps.raster import TileRaster, Viewport, rasterize_tiles
from milkit.heatmaps.render import (
    Heatmap,
    SlideCanvas,
    region_canvas,
    render_heatmap,
    whole_slide_canvas,
)
from milkit.heatmaps.tiles import TileGallery, region_around, tile_gallery, top_bottom_indices
from milkit.slides.folder import index_slides
from milkit.training.prediction_file import (
    Predictions,
    TileValues,
    find_runs,
    locate_slide,
    prediction_files,
    read_predictions,
)

__all__ = [
    "ColourScale",
    "Heatmap",
    "Predictions",
    "SlideCanvas",
    "TileGallery",
    "TileRaster",
    "TileValues",
    "Viewport",
    "find_runs",
    "heatmap_figure",
    "index_slides",
    "locate_slide",
    "normalize_values",
    "prediction_files",
    "rasterize_tiles",
    "read_geojson",
    "read_predictions",
    "region_around",
    "region_canvas",
    "render_heatmap",
    "save_figure",
    "save_image",
    "tile_features",
    "tile_gallery",
    "tile_gallery_figure",
    "tissue_features",
    "top_bottom_indices",
    "whole_slide_canvas",
    "write_geojson",
]
