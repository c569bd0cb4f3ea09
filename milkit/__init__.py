"""milkit: weakly supervised computational pathology.

Slides -> tissue mask -> tile grid -> tile features (.h5) -> MIL heads -> slide predictions
and tile scores -> heatmaps.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("milkit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
